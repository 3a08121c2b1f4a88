"""The motion split's key-frame schedules through the exported runtime (issue 13): accuracy,
the key-frame fraction really used and fps per schedule at one key-frame budget, on ONNX
Runtime CPU, as dff-run runs them.

dff-eval --split motion measures the schedules in PyTorch, with a budget per clip and with one
budget shared by all the clips. This script runs the same clips (dff.data.motion's evaluation
split, decoded from memory) through the exported graphs:

- a budget per stream: each clip alone through `Pipeline`, one after another;
- one budget for all: the clips as concurrent streams of one `StreamPipeline`, the schedulers
  holding one KeyBudget (`make_schedulers`, as `dff-run` with several videos), batched.

Fixed k = 1/budget runs both ways as the baseline. Each row: mIoU (segmentation) or AP@0.5
(detection, pycocotools), per category and overall, the key-frame fraction and fps (frames /
wall seconds of that row's run). Starting thresholds come from dff-eval's JSON (--thresholds,
picked on the tuning split) or the schedules' defaults.

    dff-export -o dff-demo/engines
    python benchmarks/schedules.py --engine-dir dff-demo/engines --thresholds motion.json

A benchmark, not a test: about 2,400 frames per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dff.data.motion import CATEGORIES, motion_split
from dff.export.manifest import load_manifest
from dff.models.checkpoint import load_checkpoint
from dff.models.motion_eval import BUDGET, Tally
from dff.runtime.backends import check_quality, task_spec
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline, StreamPipeline
from dff.runtime.scheduler import make_scheduler, make_schedulers
from dff.runtime.writers import write_summary

from dff.commands.common import budget_arg, guarded
from dff.errors import DffError
from dff.tasks import DETECTION

SCHEDULES = ("fixed", "adaptive", "learned")


def thresholds_from(path: str | None) -> dict[str, dict[str, float]]:
    """{"stream"|"pooled": {schedule: starting threshold}} from dff-eval --split motion's JSON
    (its `schedules` and `schedules_pooled` rows); empty: the defaults."""
    if path is None:
        return {"stream": {}, "pooled": {}}
    try:
        res = json.loads(Path(path).read_text())
        return {mode: {n: float(r["threshold"]) for n, r in res[key].items()
                       if r.get("threshold") is not None}
                for mode, key in (("stream", "schedules"), ("pooled", "schedules_pooled"))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DffError(f"--thresholds {path}: not dff-eval --split motion's JSON ({e}); write "
                       "one with `dff-eval --split motion --json motion.json`") from e


def scheduler_args(name: str, budget: float, threshold: float | None) -> dict:
    if name == "fixed":
        return {"key_interval": round(1 / budget)}
    return {"key_budget": budget, **({"threshold": threshold} if threshold is not None else {})}


def run_row(backend, clips, name: str, budget: float, threshold: float | None, pooled: bool,
            model, stride: int, max_batch: int | None) -> dict:
    """One schedule over all the clips: a budget per clip (Pipeline, one after another) or one
    for all (StreamPipeline); accuracy per category and overall, key fraction, fps."""
    opts = scheduler_args(name, budget, threshold)
    tallies = {c: Tally(model) for c in [*CATEGORIES, "all"]}
    outs: list[list] = [[] for _ in clips]
    keys = [0] * len(clips)
    start = time.perf_counter()
    if pooled:
        schedulers = make_schedulers(len(clips), name, stride=stride, **opts)
        check_quality(backend, schedulers, "the engine folder")
        runtime = StreamPipeline(backend, schedulers, max_batch=max_batch)
        for i, result in runtime.run([iter(m.clip.frames) for m in clips]):
            outs[i].append(result.outputs)
            keys[i] += result.is_key
    else:
        for i, m in enumerate(clips):
            scheduler = make_scheduler(name, stride=stride, **opts)
            check_quality(backend, [scheduler], "the engine folder")
            for result in Pipeline(backend, scheduler).run(iter(m.clip.frames)):
                outs[i].append(result.outputs)
                keys[i] += result.is_key
    seconds = time.perf_counter() - start
    frames = sum(len(o) for o in outs)
    for m, o, k in zip(clips, outs, keys):
        share = seconds * len(o) / frames
        for c in (m.category, "all"):
            tallies[c].add(m.clip, o, k, share)
    row = tallies["all"].result()
    row["threshold"] = threshold
    row["by_category"] = {c: tallies[c].result() for c in CATEGORIES}
    return row


def format_rows(res: dict) -> list[str]:
    metric = "map50" if res["task"] == DETECTION else "miou"
    label = "AP50" if metric == "map50" else "mIoU"
    head = f"{'schedule':<32}{label + ' all':>10}" + "".join(f"{c:>9}" for c in CATEGORIES) \
        + f"{'keys':>8}{'fps':>8}"
    title = (f"{res['frames']} frames of the motion split on {res['backend']}, budget "
             f"{res['budget']:g}")
    lines = [title, head]
    for mode, how in (("stream", "a budget per stream"), ("pooled", "one budget for all")):
        for name, r in res[mode].items():
            lines.append(f"{name + ', ' + how:<32}{r[metric]:>10.3f}"
                         + "".join(f"{r['by_category'][c][metric]:>9.3f}" for c in CATEGORIES)
                         + f"{r['key_fraction']:>8.3f}{r['fps']:>8.1f}")
    return lines


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.engine_dir)
    model = load_checkpoint(args.checkpoint or manifest["export"].get("checkpoint"))
    thresholds = thresholds_from(args.thresholds)
    h, w = model.config.input_size
    print(f"rendering the motion split's evaluation clips at {h}x{w} ...", flush=True)
    clips = list(motion_split("eval", clips=args.clips, height=h, width=w))
    backend = open_backend("onnxruntime-cpu", args.engine_dir, threads=args.threads)
    names = [n for n in SCHEDULES if n != "learned" or backend.has_quality]
    res: dict = {"task": task_spec(manifest)["kind"], "backend": backend.name,
                 "budget": args.budget, "frames": sum(len(m.clip.frames) for m in clips),
                 "clips": len(clips), "engine_dir": str(args.engine_dir),
                 "stream": {}, "pooled": {}}
    try:
        for mode in ("stream", "pooled"):
            for name in names:
                print(f"{name}, {mode} ...", flush=True)
                res[mode][name] = run_row(backend, clips, name, args.budget,
                                          thresholds[mode].get(name), mode == "pooled", model,
                                          int(manifest["stride"]), args.max_batch)
    finally:
        backend.close()
    for line in format_rows(res):
        print(line)
    if args.json:
        write_summary(args.json, res)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True, help="dff-export's folder (with `quality` "
                   "for the learned schedule)")
    p.add_argument("--checkpoint", help="the checkpoint it came from (default: the manifest's)")
    p.add_argument("--thresholds", metavar="JSON", help="dff-eval --split motion's JSON: the "
                   "starting thresholds it tuned")
    p.add_argument("--budget", type=budget_arg, default=BUDGET, help="key-frame fraction")
    p.add_argument("--clips", type=int, help="clips per category (default: all 8)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per stage")
    p.add_argument("--max-batch", type=int, help="one budget for all: frames per call "
                   "(default: the profile's largest batch)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    return guarded("schedules", args.verbose, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
