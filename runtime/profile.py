"""Timing DFF's stages alone and end to end (DESIGN.md §5), for dff-profile (dff/commands/
profile.py) and the benchmarks: trtexec's vocabulary (warm-up, duration or iterations, data
transfers or not).

- `profile_stages`: each stage (feature, flow with its FlowWarp, task; and `key`, the key
  frame's key_code, where the backend caches it) alone, one call per
  iteration after a warm-up: latency (min/mean/median/p90/p95/p99), throughput (calls per
  second) and enqueue time (the wall time of the call itself). As trtexec, a latency includes
  copying every input to the backend's device and every output back, unless `transfers` is
  off. A backend with a device timer (CUDA) also splits it into H2D, compute and D2H.
- `profile_end_to_end`: the run loop over frames in memory, batch 1, per frame (K=1) and a
  fixed schedule at each K: fps, speedup, the speedup DESIGN.md §5's model predicts from the
  stage medians, and the runtime efficiency.
- `profile_streams`: N copies of a clip as batched streams against one stream.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dff.runtime.backends import Backend
from dff.runtime.flows import DisFlow
from dff.runtime.loop import Pipeline, StreamPipeline
from dff.runtime.scheduler import make_scheduler

STAGES = ("feature", "flow", "task")
PERCENTILES = (90, 95, 99)


# --- timing ---------------------------------------------------------------------------------

def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99 of `seconds`, in ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    out = {"min": float(ms.min()), "mean": float(ms.mean()), "median": float(np.median(ms))}
    out.update({f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES})
    return out


class _Clock:
    """Times a span of device work: the backend's device timer (CUDA events on its compute
    stream), else the host clock up to a synchronize (on the CPU a call is done when it
    returns)."""

    def __init__(self, backend: Backend):
        self.backend, self.timer = backend, backend.device_timer()
        self.method = "cuda events" if self.timer is not None else "host clock, synchronised"

    def span(self, work: Callable[[], Any]) -> tuple[Any, float, float]:
        """(result, seconds of the call alone (enqueue), seconds until the device is done)."""
        if self.timer is not None:
            return self.timer.span(work)
        start = time.perf_counter()
        result = work()
        enqueue = time.perf_counter() - start
        self.backend.synchronize()
        return result, enqueue, time.perf_counter() - start

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()


def _outputs(result: Any) -> tuple[Any, ...]:
    """A stage's outputs: flow's tuple, task's dict of arrays (either task), feature's one."""
    if isinstance(result, dict):
        return tuple(result.values())
    return result if isinstance(result, tuple) else (result,)


def time_stage(backend: Backend, call: Callable[..., Any], inputs: Callable[[int], list],
               *, transfers: bool, warmup_s: float, iterations: int | None,
               duration_s: float) -> dict:
    """Time `call(*inputs(i))`: inputs are host arrays, uploaded inside the timing when
    `transfers` (outputs copied back too), else uploaded before it. Returns the stats."""
    clock = _Clock(backend)
    gpu = clock.timer is not None
    staged: dict[tuple[int, ...], list] = {}

    def once(i: int) -> tuple[float, float, float, float, float]:
        host = inputs(i)
        if not transfers:
            key = tuple(id(a) for a in host)  # the same few arrays, uploaded once each
            if key not in staged:
                staged[key] = [backend.upload(a) for a in host]
            args = staged[key]
        start = time.perf_counter()
        if transfers:
            args = [backend.upload(a) for a in host]
            backend.synchronize()
        up = time.perf_counter()
        result, enqueue, compute = clock.span(lambda: call(*args))
        down = time.perf_counter()
        if transfers:
            for out in _outputs(result):
                backend.to_host(out)
        end = time.perf_counter()
        return end - start, enqueue, up - start, compute, end - down

    try:
        start, i = time.perf_counter(), 0
        while time.perf_counter() - start < warmup_s:
            once(i)
            i += 1
        samples = []
        start = time.perf_counter()
        while (len(samples) < iterations if iterations is not None
               else not samples or time.perf_counter() - start < duration_s):
            samples.append(once(i))
            i += 1
        wall = time.perf_counter() - start
    finally:
        clock.close()
    latency, enqueue, h2d, compute, d2h = zip(*samples)
    return {
        "iterations": len(samples),
        "latency_ms": stats_ms(latency),
        "throughput_qps": len(samples) / wall,
        "enqueue_ms": stats_ms(enqueue),
        "h2d_ms": stats_ms(h2d) if gpu and transfers else None,
        "gpu_compute_ms": stats_ms(compute) if gpu else None,
        "d2h_ms": stats_ms(d2h) if gpu and transfers else None,
        "gpu_timing": clock.method if gpu else None,
    }


def profile_stages(backend: Backend, frames: np.ndarray, batch: int,
                   flow: DisFlow | None = None, **timing: Any) -> dict:
    """Each stage alone on real data: frames batched `batch` at a time (cycling), flow against
    the clip's first frame, task on the features of real frames. With a host `flow` (DIS), the
    flow stage is DIS on the host (the current frames' grey images made inside it, the key
    frame's once before, as the step does) and the warp graph; `dis` and `warp` are also
    timed alone."""
    n = len(frames)
    images = [np.ascontiguousarray(np.stack([frames[(i + j) % n] for j in range(batch)])
                                   .transpose(0, 3, 1, 2)) for i in range(n)]
    key_feat = backend.to_host(backend.feature(images[0]))
    feats = [backend.to_host(backend.feature(images[i])) for i in range(min(n, 8))]
    # what flow takes of the key frame: its image, or the key_code of a keyed backend
    key = backend.to_host(backend.key(images[0])) if backend.keyed else images[0]
    inputs = {
        "feature": lambda i: [images[i % n]],
        "flow": lambda i: [images[1 + i % (n - 1)], key, key_feat],
        "task": lambda i: [feats[i % len(feats)]],
    }
    calls = {"feature": backend.feature, "flow": backend.flow, "task": backend.task}
    extra = {}
    if backend.keyed and flow is None:  # the key_code, once per key frame
        extra["key"] = time_stage(backend, backend.key, lambda i: [images[i % n]], **timing)
    if flow is not None:
        key_grey = flow.prepare(frames[0])
        cells = (frames.shape[1] // backend.stride, frames.shape[2] // backend.stride)
        turn = itertools.count()

        def dis() -> np.ndarray:  # the next `batch` frames' flows to the clip's first
            i = next(turn)
            current = [flow.prepare(frames[1 + (i + j) % (n - 1)]) for j in range(batch)]
            return flow.batch(current, [key_grey] * batch, cells)

        calls["flow"] = lambda key: backend.warp(key, backend.upload(dis()))
        inputs["flow"] = lambda i: [key_feat]  # [batch,C,h,w]: images[0]'s, `batch` frames
        flows = [dis() for _ in range(min(n, 8))]
        extra = {"dis": time_stage(backend, dis, lambda i: [], **timing),
                 "warp": time_stage(backend, backend.warp,
                                    lambda i: [key_feat, flows[i % len(flows)]], **timing)}
    return {stage: time_stage(backend, calls[stage], inputs[stage], **timing)
            for stage in STAGES} | extra


def stage_ratio(feature: float, flow: float, task: float) -> float:
    """DESIGN.md §5: r = (flow + task) / (feature + task), from the stage medians."""
    return (flow + task) / (feature + task)


def key_share(stages: dict) -> float:
    """κ of DESIGN.md §5: the key_code's median over feature + task's (profile_stages'
    `stages`); 0 where no key_code was timed."""
    if "key" not in stages:
        return 0.0
    med = {s: stages[s]["latency_ms"]["median"] for s in ("key", "feature", "task")}
    return med["key"] / (med["feature"] + med["task"])


def predicted_speedup(k: int, r: float, key: float = 0.0) -> float:
    """DESIGN.md §5: s = k / (1 + (k-1) r), and with `key` (a key frame's extra cost, the
    key_code, over feature + task) s = k / (1 + key + (k-1) r)."""
    return k / (1 + key + (k - 1) * r)


def profile_end_to_end(backend: Backend, frames: np.ndarray, intervals: Sequence[int],
                       r: float, flow: DisFlow | None = None, key: float = 0.0) -> list[dict]:
    """The pipeline over `frames` once per key interval (fixed schedule, batch 1); `key`: a
    key frame's key_code over feature + task, for the predicted speedup."""
    rows = []
    for k in intervals:
        pipe = Pipeline(backend, make_scheduler("fixed", k), flow=flow)
        for _ in pipe.run(iter(frames)):
            pass
        s = pipe.summary()
        rows.append({"key_interval": k, "frames": s["frames"], "key_frames": s["key_frames"],
                     "wall_s": s["wall_s"], "fps": s["fps"], "efficiency": s["efficiency"],
                     "predicted_speedup": predicted_speedup(k, r, key if k > 1 else 0.0),
                     "stage_median_ms": {name: 1000 * v["median_s"]
                                         for name, v in s["stages"].items() if v["count"]},
                     "stage_counts": {name: v["count"] for name, v in s["stages"].items()}})
    base = rows[0]["fps"]
    for row in rows:
        row["speedup"] = row["fps"] / base if base > 0 else 0.0
    return rows


def profile_streams(backend: Backend, frames: np.ndarray, n: int, k: int,
                    flow: DisFlow | None = None) -> dict:
    """One stream through Pipeline, then `n` copies of it through StreamPipeline, fixed
    schedule at key interval `k`: fps of each, per stream, and the ratio of the totals."""
    one = Pipeline(backend, make_scheduler("fixed", k), flow=flow)
    for _ in one.run(iter(frames)):
        pass
    runtime = StreamPipeline(backend, [make_scheduler("fixed", k) for _ in range(n)],
                             flow=flow)
    for _ in runtime.run([iter(frames) for _ in range(n)]):
        pass
    single, s = one.summary()["fps"], runtime.summary()
    return {"streams": n, "key_interval": k, "max_batch": s["max_batch"],
            "frames": s["frames"], "key_frames": s["key_frames"], "single_fps": single,
            "total_fps": s["fps"], "per_stream_fps": s["fps_per_stream"],
            "ratio": s["fps"] / single if single > 0 else 0.0,
            "frames_per_call": {name: s["stages"][name]["batch"] for name in STAGES}}
