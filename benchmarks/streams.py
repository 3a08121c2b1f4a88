"""Many streams in one process: total frames per second of N streams batched through
StreamPipeline (runtime/loop.py) against the same N streams run one after another through
Pipeline, on ONNX Runtime CPU (issue 12: batching 8 streams at least as fast in total as 8
sequential runs).

Each stream is its own synthetic clip (seed 100 + i) at the manifest's opt size, decoded from
memory, fixed schedule at the manifest's key interval (or --key-interval). One warm-up run of
each kind is off the clock; then for each N the sequential and the batched runs take turns
--repeats times and each reports its median fps (on a shared machine single runs are noisy),
so the ratios come from one run of this script.

    python benchmarks/streams.py --engine-dir dff-demo/engines --frames 60 --threads 2

The same streams through Triton against these: benchmarks/triton_streams.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from dff.data.synthetic import make_clip
from dff.export.manifest import load_manifest
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline, StreamPipeline
from dff.runtime.scheduler import make_scheduler


def sequential(backend, clips, k: int) -> float:
    """Total fps of the clips through Pipeline, one after another."""
    start, frames = time.perf_counter(), 0
    for clip in clips:
        for _ in Pipeline(backend, make_scheduler("fixed", k)).run(iter(clip)):
            frames += 1
    return frames / (time.perf_counter() - start)


def batched(backend, clips, k: int, max_batch: int | None) -> tuple[float, dict]:
    """Total fps of the clips as streams of one StreamPipeline, and its summary."""
    runtime = StreamPipeline(backend, [make_scheduler("fixed", k) for _ in clips],
                             max_batch=max_batch)
    start, frames = time.perf_counter(), 0
    for _ in runtime.run([iter(clip) for clip in clips]):
        frames += 1
    return frames / (time.perf_counter() - start), runtime.summary()


def stream_parser(doc: str, threads: int, threads_help: str) -> argparse.ArgumentParser:
    """The options this benchmark and triton_streams.py share, described by the first
    paragraph of `doc` (`--threads` defaults to `threads`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--engine-dir", required=True, help="a dff-export folder")
    p.add_argument("--frames", type=int, default=60, help="frames per stream (default: 60)")
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--streams", default="1,2,4,8", help="stream counts (default: 1,2,4,8)")
    p.add_argument("--key-interval", type=int, help="default: the manifest's key_interval")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each kind per N, taking turns; the median counts (default: 3)")
    p.add_argument("--json", help="write the figures as JSON")
    return p


def stream_clips(args) -> tuple[list[int], int, int, int, list[np.ndarray]]:
    """The stream counts, key interval, frame size (the manifest's opt) and one synthetic clip
    per stream (seed 100 + i) of the benchmark's arguments."""
    manifest = load_manifest(args.engine_dir)
    counts = [int(n) for n in args.streams.split(",")]
    k = args.key_interval or int(manifest["key_interval"])
    _, h, w = manifest["profile"]["opt"]
    clips = [make_clip(100 + i, args.frames, h, w).frames for i in range(max(counts))]
    return counts, k, h, w, clips


def main(argv=None) -> int:
    p = stream_parser(__doc__, 0, "ONNX Runtime threads per stage (default: 0, its choice)")
    p.add_argument("--max-batch", type=int,
                   help="frames per backend call (default: the profile's batch limit)")
    args = p.parse_args(argv)
    counts, k, h, w, clips = stream_clips(args)
    backend = open_backend("onnxruntime-cpu", args.engine_dir, threads=args.threads)
    try:
        sequential(backend, [clips[0][:k + 1]], k)  # warm-up, off the clock
        batched(backend, [c[:k + 1] for c in clips[:2]], k, args.max_batch)
        rows = []
        for n in counts:
            seqs, bats = [], []
            for _ in range(args.repeats):
                seqs.append(sequential(backend, clips[:n], k))
                fps, s = batched(backend, clips[:n], k, args.max_batch)
                bats.append(fps)
            seq, bat = statistics.median(seqs), statistics.median(bats)
            rows.append({"streams": n, "sequential_fps": seq, "batched_fps": bat,
                         "ratio": bat / seq, "sequential_runs": seqs, "batched_runs": bats,
                         "max_batch": s["max_batch"],
                         "frames_per_call": {g: s["stages"][g]["batch"]
                                             for g in ("feature", "flow", "task")}})
    finally:
        backend.close()
    print(f"onnxruntime-cpu, {args.engine_dir}, {h}x{w}, {args.frames} frames a stream, fixed "
          f"K={k}, threads {args.threads or 'default'}, frames per call at most "
          f"{rows[0]['max_batch'] or 'any'}, median of {args.repeats} runs each")
    print(f"{'streams':>8}{'sequential fps':>16}{'batched fps':>13}{'batched/seq':>13}"
          f"   frames per call (feature, flow, task)")
    for r in rows:
        calls = ", ".join(f"{v:.2f}" for v in r["frames_per_call"].values())
        print(f"{r['streams']:>8}{r['sequential_fps']:>16.1f}{r['batched_fps']:>13.1f}"
              f"{r['ratio']:>12.2f}x   {calls}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine_dir": args.engine_dir, "frames": args.frames, "key_interval": k,
                       "threads": args.threads, "size": [h, w], "repeats": args.repeats,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
