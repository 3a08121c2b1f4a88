"""`dff-profile`: how fast each stage is alone, and what DFF buys end to end (DESIGN.md §5),
in trtexec's vocabulary (--warmUp, --duration, --iterations, --noDataTransfers); the timing
itself is runtime/profile.py's.

Every number comes from real frames of a synthetic clip (the evaluation split's first seed),
not random tensors: flow and task run on what feature and flow really produce. Per stage:
latency percentiles, throughput and enqueue time (GPU backends also H2D, compute and D2H; CPU
backends have no such split: null in --json). End to end: per frame (K=1) and a fixed schedule
at each --key-intervals K, batch 1. With --streams N (N > 1): N copies of the clip as batched
streams at the manifest's key interval against one stream.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dff.commands.common import (
    add_backend_args,
    add_flow_args,
    backend_label,
    check_backend_args,
    choose_backend,
    choose_flow,
    guarded,
    int_at_least,
    resolve_engines,
    shape_arg,
)
from dff.errors import DffError
from dff.export.profile import format_shape
from dff.runtime.backends import task_spec
from dff.runtime.profile import (
    STAGES,
    key_share,
    profile_end_to_end,
    profile_stages,
    profile_streams,
    stage_ratio,
)
from dff.runtime.video import check_size
from dff.runtime.writers import write_summary

CPU_NA = "n/a (CPU backend)"

EPILOG = """\
speedup model (DESIGN.md §5): with r = (flow + task) / (feature + task), from the stage
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
    add_flow_args(p)
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
        flow = choose_flow(args, manifest, str(engine_dir), backend)
        frames = make_clip(EVAL_SEEDS[0], args.frames, height, width).frames
        timing = {"transfers": not args.noDataTransfers, "warmup_s": args.warmUp / 1000,
                  "iterations": args.iterations, "duration_s": args.duration}
        stages = profile_stages(backend, frames, batch, flow, **timing)
        med = {name: stages[name]["latency_ms"]["median"] for name in STAGES}
        r = stage_ratio(med["feature"], med["flow"], med["task"])
        end_to_end = profile_end_to_end(backend, frames, args.key_intervals, r, flow,
                                        key_share(stages))
        streams = (profile_streams(backend, frames, args.streams, int(manifest["key_interval"]),
                                   flow) if args.streams > 1 else None)
        name, precision, int8_check = backend.name, backend.precision, backend.int8_check
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
        "flow": flow.settings() if flow is not None else {"source": "learned"},
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
    dis = res.get("flow", {}).get("source") == "dis"
    name = 16 if dis else 13  # "flow (DIS+warp)"
    columns = (f"{'stage (ms)':<{name}}" + "".join(f"{k:>{wide}}" for k in stats)
               + f"{'qps':>9}{'enqueue':>9}  H2D / GPU compute / D2H (median)")
    lines = [head, "", columns]
    keyed = "key" in res["stages"]
    for stage in (*STAGES[:1], *(("key",) if keyed else ()), *STAGES[1:],
                  *(("dis", "warp") if dis else ())):
        s = res["stages"][stage]
        lat = s["latency_ms"]
        if s["gpu_compute_ms"] is None:
            gpu = CPU_NA
        else:
            gpu = " / ".join("-" if s[k] is None else f"{s[k]['median']:.3f}"
                             for k in ("h2d_ms", "gpu_compute_ms", "d2h_ms"))
        label = {"flow": "flow (DIS+warp)" if dis else "flow (+warp)", "dis": "  DIS (host)",
                 "warp": "  warp", "key": "key (flow's)"}.get(stage, stage)
        lines.append(f"{label:<{name}}" + "".join(f"{lat[k]:>{wide}.3f}" for k in stats)
                     + f"{s['throughput_qps']:>9.1f}{s['enqueue_ms']['median']:>9.3f}  {gpu}")
    lines.append(f"r = (flow + task) / (feature + task) = {res['r']:.3f} (latency medians)")
    if keyed:
        share = key_share(res["stages"])
        lines.append(f"key: the flow's key_code, once per key frame, adds {share:.3f} of "
                     "(feature + task) to each key frame (in the predicted speedups)")
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
