"""Stage medians of several exports, interleaved in one sitting, and their r (issue 23).

dff-profile times each stage alone, one stage after the other, and on a shared 2-core machine
the speed drifts between them: r from two dff-profile runs of the same export differed by
0.08 (docs/MEASUREMENTS.md). Here every round runs each export's feature, flow (+ FlowWarp)
and task graphs in turn, a few calls each, so drift lands on all of them alike; the medians
over the rounds give r = (flow + task) / (feature + task) per export and thread count, and the
flow stage's ratio against the first export's from the same run, and for an export whose
learned flow caches its key frame, the key_code's time (flow_key.onnx, once per key frame; not
in r, which is per non-key frame).

Backends are opened as dff-profile opens them (runtime/loaders.open_backend, ONNX Runtime CPU,
`--threads`); the inputs are real frames of a fetched clip at the export's opt size: the flow
is from frame --offset to frame 0, the task runs on frame 0's features.

    python scripts/fetch_material.py bikes.mp4
    python benchmarks/stage_ab.py ENGINES_A ENGINES_B --threads 1,2

About 3 s per export and thread count with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import islice

import numpy as np
from dff.data import real
from dff.export.manifest import load_manifest
from dff.runtime.loaders import open_backend
from dff.runtime.profile import stage_ratio
from dff.runtime.video import fit_frame, open_video

STAGES = ("feature", "flow", "task")


def read_pair(clip: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames 0 and `offset` of the clip (RGB, its own size)."""
    with open_video(real.path(clip)) as video:
        got = list(islice(iter(video), offset + 1))
    if len(got) <= offset:
        raise SystemExit(f"{clip}: fewer than {offset + 1} frames")
    return got[0], got[offset]


def fit_pair(pair: tuple[np.ndarray, np.ndarray], engine_dir: str) -> list[np.ndarray]:
    """The pair at the export's opt size, each [1,3,H,W] uint8 RGB."""
    _, height, width = load_manifest(engine_dir)["profile"]["opt"][:3]
    return [np.ascontiguousarray(fit_frame(f, (height, width)).transpose(2, 0, 1)[None])
            for f in pair]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dirs", nargs="+", metavar="ENGINES")
    p.add_argument("--threads", default="1,2", help="comma-separated (default 1,2)")
    p.add_argument("--clip", default="bikes.mp4", help="a fetched clip (default bikes.mp4)")
    p.add_argument("--offset", type=int, default=5, help="frames between key and current")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=8, help="timed calls per stage per round")
    args = p.parse_args(argv)
    pair = read_pair(args.clip, args.offset)
    for threads in (int(t) for t in args.threads.split(",")):
        runs = {}
        for d in args.engine_dirs:
            backend = open_backend("onnxruntime-cpu", d, threads=threads)
            key, image = fit_pair(pair, d)
            key_feat = backend.feature(backend.upload(key))
            up_image, up_key = backend.upload(image), backend.upload(key)
            code = backend.key(up_key)  # what flow takes: the key image, or its key_code
            runs[d] = {"feature": lambda b=backend, x=up_image: b.feature(x),
                       "flow": lambda b=backend, x=up_image, k=code, f=key_feat:
                       b.flow(x, k, f),
                       "task": lambda b=backend, f=key_feat: b.task(f)}
            if backend.keyed:  # the key frame's key_code (flow_key.onnx), once per key frame
                runs[d]["key"] = lambda b=backend, k=up_key: b.key(k)
        times: dict[tuple[str, str], list[float]] = {(d, s): [] for d in runs for s in runs[d]}
        for _ in range(args.rounds):
            for d, calls in runs.items():
                for stage, call in calls.items():
                    call()  # untimed: the stage's caches, after the other stages' turn
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    times[d, stage].append((time.perf_counter() - start) / args.calls * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        first = args.engine_dirs[0]
        print(f"\n{threads} thread(s), {args.rounds} rounds of {args.calls} calls per stage "
              "(ms, medians)")
        print(f"{'export':<40} {'feature':>8} {'flow':>8} {'task':>8} {'r':>7} {'flow/first':>10}"
              f" {'key':>7}")
        for d in args.engine_dirs:
            f, w, t = (med[d, s] for s in STAGES)
            key = f"{med[d, 'key']:>7.3f}" if (d, "key") in med else f"{'-':>7}"
            print(f"{d:<40} {f:>8.3f} {w:>8.3f} {t:>8.3f} {stage_ratio(f, w, t):>7.3f} "
                  f"{w / med[first, 'flow']:>10.3f} {key}")


if __name__ == "__main__":
    main()
