"""Two detection heads side by side (issue 14): CenterNet and R-FCN on the same evaluation
split and the same runtime, in one table.

For each checkpoint: AP@0.5 and AP@[.5:.95] from pycocotools per-frame, with DFF at k=10 and
with the copy baseline at k=10 (dff-eval's evaluation split, PyTorch); then the export's stage
medians on ONNX Runtime CPU (dff-profile: the task graph alone, flow + warp + task for a
non-key frame, the feature graph) and its measured end-to-end speedup at k=10 over per-frame.
Accuracy and timing come from this one run, unless --eval-json reuses dff-eval's JSON of the
same checkpoint (its per_frame, dff and copy rows at k=10).

    python benchmarks/heads.py models/weights/dff_small_detection.pth \\
        models/weights/dff_small_rfcn.pth --threads 2 --json heads.json

A benchmark, not a test: a few minutes per head (the evaluation split is 1,200 frames a mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from dff.export.exporter import export_model
from dff.models.checkpoint import load_checkpoint
from dff.models.evaluate import evaluate
from dff.runtime import profile
from dff.runtime.writers import write_summary

from dff.commands.common import guarded
from dff.errors import DffError
from dff.tasks import DETECTION

INTERVAL = 10


def k10_rows(res: dict) -> dict:
    """{mode: {"map50", "map"}} for per_frame, dff and copy at k=10 of dff-eval's result."""
    rows = {"per_frame": res["per_frame"], "dff": res["dff"][str(INTERVAL)],
            "copy": res["copy"][str(INTERVAL)]}
    return {m: {"map50": float(r["map50"]), "map": float(r["map"])} for m, r in rows.items()}


def accuracy(model, checkpoint: Path, eval_json: str | None, threads: int) -> dict:
    """k10_rows of dff-eval's JSON `eval_json` of `checkpoint`, or of evaluating `model`
    (the checkpoint, loaded) here."""
    if eval_json is not None:
        try:
            return k10_rows(json.loads(Path(eval_json).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DffError(f"--eval-json {eval_json}: not dff-eval's JSON of a detection model "
                           f"with k={INTERVAL} ({e}); write one with `dff-eval {checkpoint} "
                           "--json eval.json`") from e
    import torch

    if threads:
        torch.set_num_threads(threads)
    return k10_rows(evaluate(model, intervals=(INTERVAL,)))


def timing(checkpoint: Path, threads: int, duration: float) -> dict:
    """Stage medians (ms) and the measured k=10 speedup of the export on ONNX Runtime CPU."""
    with tempfile.TemporaryDirectory(prefix="dff-heads-") as tmp:
        engines, out = Path(tmp) / "engines", Path(tmp) / "profile.json"
        export_model(checkpoint, engines)
        code = profile.main(["-e", str(engines), "--backend", "onnxruntime-cpu", "--threads",
                             str(threads), "--duration", str(duration), "--key-intervals",
                             str(INTERVAL), "--json", str(out)])
        if code != 0:
            raise DffError(f"dff-profile failed on the export of {checkpoint} (exit {code})")
        prof = json.loads(out.read_text())
    median = {s: v["latency_ms"]["median"] for s, v in prof["stages"].items()}
    run = {r["key_interval"]: r for r in prof["end_to_end"]}
    return {"feature_ms": median["feature"], "flow_ms": median["flow"],
            "task_ms": median["task"], "non_key_ms": median["flow"] + median["task"],
            "r": prof["r"], "fps_per_frame": run[1]["fps"], "fps_k10": run[INTERVAL]["fps"],
            "speedup_k10": run[INTERVAL]["speedup"]}


def ap_cells(acc: dict, key: str) -> str:
    """Per-frame, then DFF and copy at k=10 with their change in points, as table cells."""
    base = acc["per_frame"][key]
    return f"{base:.4f} | " + " | ".join(
        f"{acc[m][key]:.4f} ({100 * (acc[m][key] - base):+.2f})".replace("-", "−")
        for m in ("dff", "copy"))


def format_table(rows: dict) -> list[str]:
    head = ("| head | AP@0.5 per-frame | DFF k=10 | copy k=10 | AP@[.5:.95] per-frame | DFF k=10 "
            "| copy k=10 | task ms | flow + warp + task ms | feature ms | k=10 speedup |")
    lines = [head, "|" + " --- |" * 11]
    for name, r in rows.items():
        a, t = r["accuracy"], r["timing"]
        lines.append(f"| {name} | {ap_cells(a, 'map50')} | {ap_cells(a, 'map')} | "
                     f"{t['task_ms']:.2f} | {t['non_key_ms']:.2f} | {t['feature_ms']:.1f} | "
                     f"{t['speedup_k10']:.2f}× |")
    return lines


def run(args: argparse.Namespace) -> int:
    evals = args.eval_json or [None] * len(args.checkpoints)
    if len(evals) != len(args.checkpoints):
        raise DffError(f"--eval-json takes one JSON per checkpoint ({len(args.checkpoints)}), "
                       f"got {len(evals)}")
    rows: dict = {}
    for path, eval_json in zip(args.checkpoints, evals):
        ckpt = Path(path)
        model = load_checkpoint(ckpt)
        if model.config.task != DETECTION:
            raise DffError(f"{ckpt}: a {model.config.task} model; this compares detection heads")
        name = "R-FCN" if model.config.head == "rfcn" else "CenterNet"
        if name in rows:
            name = f"{name} ({ckpt.name})"
        print(f"{name}: {ckpt} ...", flush=True)
        rows[name] = {"checkpoint": str(ckpt),
                      "accuracy": accuracy(model, ckpt, eval_json, args.threads),
                      "timing": timing(ckpt, args.threads, args.duration)}
    for line in format_table(rows):
        print(line)
    if args.json:
        write_summary(args.json, {"interval": INTERVAL, "threads": args.threads, "heads": rows})
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="MODEL.pth", help="detection checkpoints")
    p.add_argument("--eval-json", nargs="+", metavar="JSON",
                   help="dff-eval --json of each checkpoint, in order, instead of evaluating")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (PyTorch and each "
                   "ONNX Runtime stage)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per stage timing")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    return guarded("heads", args.verbose, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
