"""Whole-pipeline parity on the evaluation split: ONNX Runtime vs the PyTorch reference.

Runs the exported graphs (ONNX Runtime CPU) and the PyTorch backend through the same
Pipeline and fixed schedule on every clip of the synthetic evaluation split, and prints the
fraction of label pixels on which they agree (segmentation; detection has
benchmarks/detection_parity.py), per key interval (issue 3 asks ≥ 99.9 % at
k=1 and k=10). Also the mIoU of each against the ground truth. With `--precision int8`
ONNX Runtime runs the int8 feature graph of `dff-build --int8` instead: the agreement and the
mIoU then measure what quantization costs, and no agreement is required.

    python benchmarks/pipeline_parity.py --engine-dir dff-demo/engines --intervals 1,10
    python benchmarks/pipeline_parity.py --engine-dir dff-demo/engines --precision int8
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from dff.data.synthetic import EVAL_FRAMES, EVAL_SEEDS, make_clip
from dff.export.manifest import load_manifest
from dff.models.evaluate import confusion, miou
from dff.runtime.backends import task_spec
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import make_scheduler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--intervals", default="1,10")
    p.add_argument("--clips", type=int, default=len(EVAL_SEEDS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="ONNX Runtime's feature graph: the exported one or dff-build --int8's")
    p.add_argument("--json")
    args = p.parse_args(argv)
    manifest = load_manifest(args.engine_dir)
    if task_spec(manifest)["kind"] != "segmentation":
        print(f"pipeline_parity: {args.engine_dir}/manifest.json holds a detection model (field "
              "'task.kind'); compare it with benchmarks/detection_parity.py", file=sys.stderr)
        return 1
    k = len(manifest["class_names"])
    _, h, w = manifest["profile"]["opt"]
    backends = {name: open_backend(name, args.engine_dir, threads=args.threads,
                                   precision=args.precision if name == "onnxruntime-cpu" else None)
                for name in ("onnxruntime-cpu", "torch-cpu")}
    results = {}
    check = backends["onnxruntime-cpu"].int8_check
    if check is not None:  # int8: this CPU's kernels against the graph's own error
        from dff.engines.quantize import describe_kernel_check

        print(describe_kernel_check(check, args.engine_dir), flush=True)
        results["int8_check"] = check
    for interval in (int(x) for x in args.intervals.split(",")):
        agree = total = 0
        confs = {name: np.zeros((k, k), np.int64) for name in backends}
        for seed in EVAL_SEEDS[:args.clips]:
            clip = make_clip(seed, EVAL_FRAMES, h, w)
            labels = {}
            for name, backend in backends.items():
                pipe = Pipeline(backend, make_scheduler("fixed", interval))
                labels[name] = np.stack([r.labels for r in pipe.run(iter(clip.frames))])
                for t, lab in enumerate(labels[name]):
                    confs[name] += confusion(lab.astype(np.int64), clip.labels[t], k)
            agree += int((labels["onnxruntime-cpu"] == labels["torch-cpu"]).sum())
            total += labels["torch-cpu"].size
        results[str(interval)] = {"agreement": agree / total,
                                  **{f"miou_{n}": round(miou(c), 5) for n, c in confs.items()}}
        r = results[str(interval)]
        print(f"k={interval:<3} pixels agreeing {100 * r['agreement']:.4f} %   "
              f"mIoU onnxruntime {r['miou_onnxruntime-cpu']:.4f}  torch {r['miou_torch-cpu']:.4f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.precision == "int8":
        return 0
    return 0 if all(r["agreement"] >= 0.999 for k, r in results.items() if k.isdigit()) else 1


if __name__ == "__main__":
    sys.exit(main())
