"""`dff-profile`: how fast each stage is alone, and what DFF buys end to end (DESIGN.md §5),
in trtexec's vocabulary (--warmUp, --duration, --iterations, --noDataTransfers).

Every number comes from real frames of a synthetic clip (the evaluation split's first seed),
not random tensors: flow and task run on what feature and flow really produce.

- Per stage (feature, flow with its FlowWarp, task: whatever outputs the manifest's task has,
  segmentation or detection), one call per iteration after `--warmUp`
  ms of calls: latency (min/mean/median/p90/p95/p99), throughput (calls per second) and
  enqueue time (the wall time of the call itself). As trtexec, a latency includes copying
  every input to the backend's device and every output back, unless --noDataTransfers. GPU
  backends also split it into H2D, compute (CUDA events on torch-cuda, else the call up to a
  synchronize) and D2H; CPU backends have no such split (null in --json).
- End to end, through `Pipeline` on the same frames in memory, batch 1: per frame (K=1) and
  a fixed schedule at each --key-intervals K: fps, speedup fps_K / fps_1, the speedup that
  DESIGN.md §4's model predicts from the stage medians, and the runtime efficiency.
- With --streams N (N > 1): N copies of the clip through the batched runtime
  (runtime/streams.py) at the manifest's key interval: total fps, fps per stream, and the
  ratio of the total to one stream through `Pipeline` at that interval.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dff.export.profile import format_shape, shape_arg
from dff.runtime.backends import Backend, task_spec
from dff.runtime.loop import Pipeline, StreamPipeline
from dff.runtime.scheduler import make_scheduler
from dff.runtime.video import check_size
from dff.runtime.writers import write_summary

from dff.commands.common import (
    add_backend_args,
    backend_label,
    check_backend_args,
    choose_backend,
    guarded,
    int_at_least,
    resolve_engines,
)
from dff.errors import DffError

STAGES = ("feature", "flow", "task")
PERCENTILES = (90, 95, 99)
CPU_NA = "n/a (CPU backend)"

EPILOG = """\
speedup model (DESIGN.md §4): with r = (flow + task) / (feature + task), from the stage
medians, DFF at key interval K runs K / (1 + (K-1) r) times faster than per-frame inference.
runtime efficiency (§5) = sum of stage medians x frames that ran them / wall time.

examples:
  dff-profile --demo
  dff-profile -e engines/ --iterations 200 --key-intervals 1,5,10 --json profile.json
  dff-profile -e engines/ --backend onnxruntime-cuda --noDataTransfers --duration 5
"""


def intervals_arg(text: str) -> list[int]:
    """'1,5,10' -> [1, 5, 10]; 1 (the per-frame baseline) is added when missing."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 1,5,10") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: key intervals must be integers >= 1")
    return values if values[0] == 1 else [1, *values]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-profile", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time each DFF stage alone and the pipeline end to end at several key "
                    "intervals, on real frames of a synthetic clip.")
    add_backend_args(p)
    p.add_argument("--warmUp", type=float, default=200.0, metavar="MS",
                   help="warm up each stage for this many ms before timing (default: 200)")
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument("--duration", type=float, default=3.0, metavar="S",
                          help="time each stage for S seconds (default: 3)")
    how_long.add_argument("--iterations", type=int_at_least(1), metavar="N",
                          help="time each stage for exactly N calls instead of --duration")
    p.add_argument("--key-intervals", type=intervals_arg, default=[1, 5, 10, 20],
                   metavar="K,K,...", help="end to end at these key intervals (default: "
                   "1,5,10,20; 1 is always run, as the baseline)")
    p.add_argument("--shape", type=shape_arg, metavar="NxHxW",
                   help="input shape of the stage timings (default: the manifest's opt "
                        "shape); end to end runs batch 1 at HxW")
    p.add_argument("--frames", type=int_at_least(2), default=60, metavar="N",
                   help="frames of the synthetic clip (default: 60)")
    p.add_argument("--noDataTransfers", action="store_true",
                   help="keep inputs and outputs on the backend's device during the stage "
                        "timings")
    p.add_argument("--streams", type=int_at_least(1), default=1, metavar="N",
                   help="also run N copies of the clip as batched streams and report their "
                        "total fps against one stream (default: 1, no such run)")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    return p


# --- timing ---------------------------------------------------------------------------------

def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99 of `seconds`, in ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    out = {"min": float(ms.min()), "mean": float(ms.mean()), "median": float(np.median(ms))}
    out.update({f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES})
    return out


def is_gpu(backend: Backend) -> bool:
    return backend.name == "tensorrt" or backend.name.endswith("-cuda")


class _Clock:
    """Times a span of device work: CUDA events on torch-cuda's stream or on the compute
    stream of the backends built on runtime/buffers.py (tensorrt, onnxruntime-cuda), else the
    host clock up to a synchronize (on the CPU backends a run is done when it returns)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.torch: Any = None
        self.timer: Any = None
        memory = getattr(backend, "memory", None)
        if backend.name == "torch-cuda":
            import torch  # there since the backend runs on it

            self.torch = torch
        elif getattr(memory, "device_type", None) == "cuda":
            from dff.runtime.buffers import Timer

            self.timer = Timer(memory)
            self.stream = backend.compute_stream  # type: ignore[attr-defined]
        gpu = self.torch is not None or self.timer is not None
        self.method = "cuda events" if gpu else "host clock, synchronised"

    def span(self, work: Callable[[], Any]) -> tuple[Any, float, float]:
        """(result, seconds of the call alone (enqueue), seconds until the device is done)."""
        if self.timer is not None:
            start = time.perf_counter()
            with self.timer.span("span", self.stream):
                result = work()
            enqueue = time.perf_counter() - start
            return result, enqueue, self.timer.read()["span"] / 1000
        if self.torch is not None:
            begin = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            begin.record()
            start = time.perf_counter()
            result = work()
            enqueue = time.perf_counter() - start
            end.record()
            end.synchronize()
            return result, enqueue, begin.elapsed_time(end) / 1000
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
    clock, gpu = _Clock(backend), is_gpu(backend)
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


def profile_stages(backend: Backend, frames: np.ndarray, batch: int, **timing: Any) -> dict:
    """Each stage alone on real data: frames batched `batch` at a time (cycling), flow against
    the clip's first frame, task on the features of real frames."""
    n = len(frames)
    images = [np.ascontiguousarray(np.stack([frames[(i + j) % n] for j in range(batch)])
                                   .transpose(0, 3, 1, 2)) for i in range(n)]
    key_feat = backend.to_host(backend.feature(images[0]))
    feats = [backend.to_host(backend.feature(images[i])) for i in range(min(n, 8))]
    inputs = {
        "feature": lambda i: [images[i % n]],
        "flow": lambda i: [images[1 + i % (n - 1)], images[0], key_feat],
        "task": lambda i: [feats[i % len(feats)]],
    }
    calls = {"feature": backend.feature, "flow": backend.flow, "task": backend.task}
    return {stage: time_stage(backend, calls[stage], inputs[stage], **timing)
            for stage in STAGES}


def predicted_speedup(k: int, r: float) -> float:
    """DESIGN.md §4: s = k / (1 + (k-1) r)."""
    return k / (1 + (k - 1) * r)


def profile_end_to_end(backend: Backend, frames: np.ndarray, intervals: Sequence[int],
                       r: float) -> list[dict]:
    """The pipeline over `frames` once per key interval (fixed schedule, batch 1)."""
    rows = []
    for k in intervals:
        pipe = Pipeline(backend, make_scheduler("fixed", k))
        for _ in pipe.run(iter(frames)):
            pass
        s = pipe.summary()
        rows.append({"key_interval": k, "frames": s["frames"], "key_frames": s["key_frames"],
                     "wall_s": s["wall_s"], "fps": s["fps"], "efficiency": s["efficiency"],
                     "predicted_speedup": predicted_speedup(k, r),
                     "stage_median_ms": {name: 1000 * v["median_s"]
                                         for name, v in s["stages"].items() if v["count"]},
                     "stage_counts": {name: v["count"] for name, v in s["stages"].items()}})
    base = rows[0]["fps"]
    for row in rows:
        row["speedup"] = row["fps"] / base if base > 0 else 0.0
    return rows


def profile_streams(backend: Backend, frames: np.ndarray, n: int, k: int) -> dict:
    """One stream through Pipeline, then `n` copies of it through StreamPipeline, fixed
    schedule at key interval `k`: fps of each, per stream, and the ratio of the totals."""
    one = Pipeline(backend, make_scheduler("fixed", k))
    for _ in one.run(iter(frames)):
        pass
    runtime = StreamPipeline(backend, [make_scheduler("fixed", k) for _ in range(n)])
    for _ in runtime.run([iter(frames) for _ in range(n)]):
        pass
    single, s = one.summary()["fps"], runtime.summary()
    return {"streams": n, "key_interval": k, "max_batch": s["max_batch"],
            "frames": s["frames"], "key_frames": s["key_frames"], "single_fps": single,
            "total_fps": s["fps"], "per_stream_fps": s["fps_per_stream"],
            "ratio": s["fps"] / single if single > 0 else 0.0,
            "frames_per_call": {name: s["stages"][name]["batch"] for name in STAGES}}


# --- the command ----------------------------------------------------------------------------

def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dff.data.synthetic import EVAL_SEEDS, make_clip

    engine_dir, manifest = resolve_engines(args, parser, print)
    profile, stride = manifest["profile"], int(manifest["stride"])
    shape = tuple(args.shape or profile["opt"])
    batch, height, width = shape
    check_size(height, width, profile["min"], profile["max"], stride,
               what=f"--shape {format_shape(shape)}")
    if not profile["min"][0] <= batch <= profile["max"][0]:
        raise DffError(f"--shape {format_shape(shape)}: batch {batch} is outside the profile's "
                       f"{profile['min'][0]}..{profile['max'][0]} ({engine_dir}/manifest.json "
                       "'profile'); pick a batch within it")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise DffError(f"{json_path}: the folder {json_path.parent} does not exist; create it "
                       "first")
    backend, reason = choose_backend(args, engine_dir, print)
    try:
        frames = make_clip(EVAL_SEEDS[0], args.frames, height, width).frames
        timing = {"transfers": not args.noDataTransfers, "warmup_s": args.warmUp / 1000,
                  "iterations": args.iterations, "duration_s": args.duration}
        stages = profile_stages(backend, frames, batch, **timing)
        med = {name: stages[name]["latency_ms"]["median"] for name in STAGES}
        r = (med["flow"] + med["task"]) / (med["feature"] + med["task"])
        end_to_end = profile_end_to_end(backend, frames, args.key_intervals, r)
        streams = (profile_streams(backend, frames, args.streams, int(manifest["key_interval"]))
                   if args.streams > 1 else None)
        name, precision = backend.name, getattr(backend, "precision", None)
        int8_check = getattr(backend, "int8_check", None)
    finally:
        backend.close()
    result = {
        "tool": "dff-profile", "task": task_spec(manifest)["kind"], "backend": name, "precision": precision, "backend_reason": reason,
        "int8_check": int8_check,
        "gpu": stages["feature"]["gpu_compute_ms"] is not None,
        "engine_dir": str(engine_dir), "shape": list(shape), "frames": args.frames,
        "clip_seed": EVAL_SEEDS[0], "warmUp_ms": args.warmUp,
        "iterations": args.iterations, "duration_s": None if args.iterations else args.duration,
        "noDataTransfers": args.noDataTransfers, "useCudaGraph": args.useCudaGraph,
        "stages": stages, "r": r, "end_to_end": end_to_end,
    }
    if streams is not None:  # N = 1 keeps the report as it was
        result["streams"] = streams
    for line in format_report(result):
        print(line)
    if json_path is not None:
        write_summary(json_path, result)
        print(f"wrote {json_path}")
    return 0


def format_report(res: dict) -> list[str]:
    """The short human table: stages, then end to end."""
    amount = (f"{res['iterations']} iterations" if res["iterations"]
              else f"{res['duration_s']:g} s")
    moves = "without data transfers" if res["noDataTransfers"] else "data transfers included"
    head = (f"{backend_label(res)} on {res['engine_dir']} ({res['task']}) at "
            f"{format_shape(res['shape'])}: "
            f"{amount} per stage after {res['warmUp_ms']:g} ms warm-up ({moves})")
    stats = ("min", "mean", "median", "p90", "p95", "p99")
    # 8 characters a column, wider where a latency needs it (a paper-scale trunk: seconds)
    wide = max(8, 1 + max(len(f"{res['stages'][st]['latency_ms'][k]:.3f}")
                          for st in STAGES for k in stats))
    columns = (f"{'stage (ms)':<13}" + "".join(f"{k:>{wide}}" for k in stats)
               + f"{'qps':>9}{'enqueue':>9}  H2D / GPU compute / D2H (median)")
    lines = [head, "", columns]
    for stage in STAGES:
        s = res["stages"][stage]
        lat = s["latency_ms"]
        if s["gpu_compute_ms"] is None:
            gpu = CPU_NA
        else:
            gpu = " / ".join("-" if s[k] is None else f"{s[k]['median']:.3f}"
                             for k in ("h2d_ms", "gpu_compute_ms", "d2h_ms"))
        label = "flow (+warp)" if stage == "flow" else stage
        lines.append(f"{label:<13}" + "".join(f"{lat[k]:>{wide}.3f}" for k in stats)
                     + f"{s['throughput_qps']:>9.1f}{s['enqueue_ms']['median']:>9.3f}  {gpu}")
    lines.append(f"r = (flow + task) / (feature + task) = {res['r']:.3f} (latency medians)")
    _, h, w = res["shape"]
    columns = (f"{'K':>4}{'key frames':>12}{'fps':>10}{'speedup':>10}{'predicted':>11}"
               f"{'efficiency':>12}")
    lines += ["", f"end to end: {res['frames']} frames at {h}x{w}, batch 1, fixed schedule",
              columns]
    for row in res["end_to_end"]:
        lines.append(f"{row['key_interval']:>4}{row['key_frames']:>12}{row['fps']:>10.1f}"
                     f"{row['speedup']:>9.2f}x{row['predicted_speedup']:>10.2f}x"
                     f"{row['efficiency']:>12.2f}")
    st = res.get("streams")
    if st:
        batch = f"at most {st['max_batch']}" if st["max_batch"] else "any size"
        head = (f"streams: {st['streams']} copies of the clip, batched (frames per call "
                f"{batch}), fixed schedule, K={st['key_interval']}")
        fps = (f"  total {st['total_fps']:.1f} fps, {st['per_stream_fps']:.1f} fps per stream; "
               f"one stream {st['single_fps']:.1f} fps: total / one stream {st['ratio']:.2f}x")
        lines += ["", head, fps]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_backend_args(parser, args)
    if not args.warmUp >= 0:
        parser.error(f"--warmUp must be >= 0 ms, got {args.warmUp}")
    if not args.duration > 0:
        parser.error(f"--duration must be > 0 s, got {args.duration}")
    if args.streams > 1 and args.useCudaGraph:
        parser.error("--useCudaGraph replays one stream's flow and task; drop it with --streams")
    return guarded("dff-profile", args.verbose, lambda: run(args, parser))


if __name__ == "__main__":
    sys.exit(main())
