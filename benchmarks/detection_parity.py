"""Detection parity on the evaluation split: dff-run's pipeline on the exported graphs against
dff-eval's PyTorch, by AP.

For each key interval, every clip of the synthetic evaluation split runs through dff-run's
Pipeline on ONNX Runtime (the exported graphs, fixed schedule), its results are written as
dff-run's JSON Lines (ResultWriter, as `dff-run --json` writes them) and read back, and AP is
computed from those records with models.metrics.detection_ap. The same clips and schedule run
through dff-eval's PyTorch path (models.evaluate.detect_clip) on the checkpoint the graphs were
exported from. Both are printed; the issue's criterion is the same AP@0.5 and AP@0.5:0.95
within 0.5 points at k=1 and k=10 (exit 1 otherwise). COCO's 101-point AP (docs/DESIGN.md §15).

    python benchmarks/detection_parity.py --engine-dir dff-demo/detection/engines
    python benchmarks/detection_parity.py --engine-dir engines/ --intervals 1,5,10 --json p.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from dff.data.synthetic import EVAL_FRAMES, EVAL_SEEDS, make_clip
from dff.export.manifest import load_manifest
from dff.models.checkpoint import load_checkpoint
from dff.models.evaluate import detect_clip
from dff.models.metrics import clip_ground_truth, detection_ap
from dff.runtime.backends import task_spec
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import make_scheduler
from dff.runtime.torch_backend import torch_checkpoint
from dff.runtime.writers import ResultWriter, read_detections

from dff.errors import DffError
from dff.tasks import DETECTION


def pipeline_records(backend, frames: np.ndarray, interval: int, class_names, path: Path,
                     fps: float = 25.0) -> list[dict]:
    """The frames through dff-run's pipeline and writer (--json only), read back from `path`."""
    pipe = Pipeline(backend, make_scheduler("fixed", interval))
    with ResultWriter(None, path, fps, None, class_names, task=DETECTION) as writer:
        pipe.run_to(iter(frames), lambda r: writer.write(
            r.index, r.frame, r.outputs, r.is_key,
            {name: 1000 * s for name, s in r.times.items()}))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def compare(engine_dir: str, intervals: list[int], clips: int, frames: int, threads: int,
            out_dir: Path, checkpoint: str | None = None) -> dict:
    """{interval: {onnxruntime: AP, pytorch: AP, delta_points}} over `clips` clips."""
    manifest = load_manifest(engine_dir)
    task = task_spec(manifest, f"{engine_dir}/manifest.json")
    if task["kind"] != DETECTION:
        raise DffError(f"{engine_dir}/manifest.json: field 'task.kind' is {task['kind']!r}; "
                       "this benchmark compares detection AP (for segmentation run "
                       "benchmarks/pipeline_parity.py)")
    names, k = manifest["class_names"], int(task["max_detections"])
    model = load_checkpoint(torch_checkpoint(engine_dir, checkpoint)).eval()
    h, w = model.config.input_size
    backend = open_backend("onnxruntime-cpu", engine_dir, threads=threads)
    results: dict = {}
    try:
        for interval in intervals:
            found: dict[str, list] = {"onnxruntime": [], "pytorch": []}
            for seed in EVAL_SEEDS[:clips]:
                clip = make_clip(seed, frames, h, w)
                gts = clip_ground_truth(clip)
                records = pipeline_records(backend, clip.frames, interval, names,
                                           out_dir / f"k{interval}_{seed}.jsonl")
                found["onnxruntime"] += zip(gts, (read_detections(r) for r in records))
                found["pytorch"] += zip(gts, detect_clip(model, clip.frames, interval, False)[0])
            aps = {name: detection_ap(pairs, names, k) for name, pairs in found.items()}
            results[str(interval)] = {
                **{name: {m: ap[m] for m in ("map50", "map", "detections")}
                   for name, ap in aps.items()},
                "delta_points": {m: round(100 * (aps["onnxruntime"][m] - aps["pytorch"][m]), 3)
                                 for m in ("map50", "map")}}
    finally:
        backend.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True, help="a detection model's dff-export folder")
    p.add_argument("--checkpoint", help="the PyTorch side (default: the manifest's checkpoint)")
    p.add_argument("--intervals", default="1,10")
    p.add_argument("--clips", type=int, default=len(EVAL_SEEDS))
    p.add_argument("--frames", type=int, default=EVAL_FRAMES, help="frames per clip")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.5, help="AP points (default 0.5)")
    p.add_argument("--keep", metavar="DIR", help="keep the JSON Lines here (default: a temp "
                   "folder, removed)")
    p.add_argument("--json", help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    intervals = [int(x) for x in args.intervals.split(",")]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = Path(args.keep) if args.keep else Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            results = compare(args.engine_dir, intervals, args.clips, args.frames, args.threads,
                              out_dir, args.checkpoint)
    except DffError as e:
        print(f"detection_parity: {e}", file=sys.stderr)
        return 1
    ok = True
    for interval, r in results.items():
        ort, ref, delta = r["onnxruntime"], r["pytorch"], r["delta_points"]
        ok &= all(abs(d) <= args.tolerance for d in delta.values())
        print(f"k={interval:<3} AP@0.5 onnxruntime {ort['map50']:.4f}  pytorch {ref['map50']:.4f}"
              f"  ({delta['map50']:+.2f} points)   AP@0.5:0.95 onnxruntime {ort['map']:.4f}  "
              f"pytorch {ref['map']:.4f}  ({delta['map']:+.2f} points)   detections "
              f"{ort['detections']} / {ref['detections']}", flush=True)
    print(f"{'within' if ok else 'NOT within'} {args.tolerance:g} AP points at k="
          f"{', '.join(results)} ({args.clips} clips x {args.frames} frames, COCO 101-point AP)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tolerance_points": args.tolerance, "clips": args.clips,
                       "frames": args.frames, "intervals": results, "passed": ok}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
