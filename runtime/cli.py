"""`dff-run`: a video through the DFF pipeline (DESIGN.md §1) into an annotated video, JSON
Lines and a summary.

Checks everything it can before the first frame (engine folder, video, frame size, backend,
output folders), then decodes, runs and writes in three threads. Outputs are staged beside
their targets and appear only when the whole run succeeded: a failure or Ctrl-C leaves none.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from dff.export.manifest import load_manifest
from dff.runtime.backends import (
    ALIASES,
    KINDS,
    PRECISIONS,
    Backend,
    open_backend,
    pick_auto,
)
from dff.runtime.demo import (
    DEMO_CLIP,
    DEMO_DIR,
    DEMO_ENGINES,
    ensure_demo_clip,
    ensure_demo_engines,
)
from dff.runtime.pipeline import FrameResult, Pipeline
from dff.runtime.scheduler import SCHEDULES, make_scheduler
from dff.runtime.video import (
    FOURCC,
    VideoError,
    check_folder,
    check_size,
    fit_frame,
    open_video,
    parse_size,
)
from dff.runtime.writers import ResultWriter, write_summary

from dff.errors import DffError

BACKENDS = ("auto", *ALIASES, *KINDS)
SHOWN_STAGES = ("feature", "flow", "task")  # the compute stages the summary lists first
Log = Callable[[str], None]

EPILOG = """\
backends (--backend):
  auto              tensorrt if usable and built, else onnxruntime-cuda, else onnxruntime-cpu
  onnxruntime[-cpu|-cuda], tensorrt: the graphs/engines of --engine-dir
  torch[-cpu|-cuda] the PyTorch reference, on --checkpoint or the manifest's checkpoint

schedules (--schedule):
  fixed       a key frame every --key-interval frames (default: the manifest's key_interval)
  per-frame   every frame a key frame (no flow): the baseline
  adaptive    key frames at scene cuts, large or outgoing flow, or --key-interval at the latest

outputs: an annotated video (--output, .mp4 or .avi), one JSON record per frame (--json: frame,
key, labels as row-major run-length codes, class pixel counts, stage times in ms) and the run's
summary (--summary). With neither --output nor --json: ./<video name>.dff.mp4.

examples:
  dff-run --demo                                     # shipped demo model on a synthetic clip
  dff-run clip.mp4 -e engines/ -o clip.dff.mp4 --json clip.jsonl
  dff-run clip.mp4 -e engines/ --schedule adaptive --resize 256x448 --summary run.json
"""


# --- arguments ------------------------------------------------------------------------------

def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except VideoError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--engine-dir, --backend, --checkpoint, --device, --threads, --demo, --precision,
    --useCudaGraph, --verbose: shared by dff-run and dff-profile."""
    p.add_argument("-e", "--engine-dir", metavar="DIR",
                   help="folder written by dff-export (with --demo: default ./dff-demo/engines)")
    p.add_argument("-b", "--backend", default="auto", choices=BACKENDS, metavar="NAME",
                   help=f"one of {', '.join(BACKENDS)} (default: auto)")
    p.add_argument("--checkpoint", metavar="MODEL.pth",
                   help="torch backends: the checkpoint to run (default: the one the manifest "
                        "was exported from)")
    p.add_argument("--device", type=int_at_least(0), default=0, metavar="N",
                   help="CUDA device index for GPU backends (default: 0)")
    p.add_argument("--threads", type=int_at_least(0), default=0, metavar="N",
                   help="CPU threads per stage (default: 0 = the library's choice)")
    p.add_argument("--demo", action="store_true",
                   help="export the shipped demo model into --engine-dir (cached) and use it")
    p.add_argument("--precision", choices=PRECISIONS["tensorrt"],
                   help="tensorrt: the engine set to load (default: fp16 if built, else fp32, "
                        "else int8); onnxruntime: fp32 (the default) or int8, the feature graph "
                        "of dff-build --int8; torch: fp32 only")
    p.add_argument("--useCudaGraph", action="store_true",
                   help="tensorrt backend: replay flow + task of non-key frames as one CUDA "
                        "graph (dff-profile's flow stage then includes the task); refused by "
                        "other backends")
    p.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-run", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a video through the DFF engines: segmentation with key frames and "
                    "flow-warped features in between.")
    p.add_argument("video", nargs="?", metavar="VIDEO",
                   help="input video (with --demo: default, a synthetic clip in ./dff-demo/)")
    add_backend_args(p)
    p.add_argument("-k", "--key-interval", type=int_at_least(1), metavar="K",
                   help="frames per key frame (default: the manifest's key_interval); the "
                        "adaptive schedule's longest gap")
    p.add_argument("--schedule", choices=SCHEDULES, default="fixed",
                   help="key-frame schedule (default: fixed)")
    p.add_argument("-o", "--output", metavar="OUT.mp4", help="annotated video (.mp4 or .avi)")
    p.add_argument("--json", metavar="OUT.jsonl", help="one JSON record per frame")
    p.add_argument("--summary", metavar="OUT.json",
                   help="the run's summary as JSON (stage times, key frames, backend, outputs)")
    p.add_argument("--resize", type=size_arg, metavar="HxW",
                   help="resize every frame to HxW (multiples of 16 within the engines' "
                        "profile) instead of refusing a video of another size")
    p.add_argument("--max-frames", type=int_at_least(1), metavar="N",
                   help="stop after N frames")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no notes; the final summary only")
    return p


# --- shared with dff-profile ----------------------------------------------------------------

def check_backend_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.checkpoint and not ALIASES.get(args.backend, args.backend).startswith("torch"):
        parser.error("--checkpoint applies to the torch backends only (--backend torch)")


def resolve_engines(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    log: Log) -> tuple[Path, dict]:
    """The engine folder (exporting the demo model into it for --demo) and its manifest.
    Hashes are checked when the backend opens the graphs."""
    if args.demo:
        engine_dir = Path(args.engine_dir) if args.engine_dir else DEMO_ENGINES
        ensure_demo_engines(engine_dir, log=log)
    elif args.engine_dir is None:
        parser.error("--engine-dir DIR (written by dff-export) is required, or --demo")
    else:
        engine_dir = Path(args.engine_dir)
    return engine_dir, load_manifest(engine_dir, verify_hashes=False)


def choose_backend(args: argparse.Namespace, engine_dir: Path,
                   log: Log) -> tuple[Backend, str | None]:
    """Open --backend; for `auto`, log which one pick_auto took and why (one line); for ONNX
    Runtime int8, how its kernels here compare with the graph's own error (one line)."""
    kind, reason = ALIASES.get(args.backend, args.backend), None
    if kind == "auto":
        kind, reason = pick_auto(engine_dir)
        log(reason)
    backend = open_backend(kind, engine_dir, device=args.device, checkpoint=args.checkpoint,
                           threads=args.threads, cuda_graph=args.useCudaGraph,
                           precision=args.precision)
    check = getattr(backend, "int8_check", None)  # ONNX Runtime int8: its kernels, measured
    if check is not None:
        from dff.engines.quantize import describe_kernel_check

        line = describe_kernel_check(check, engine_dir)
        if check.get("ok", True):
            log(line)
        else:  # a worse model than the graph: said even with --quiet
            print(line, file=sys.stderr, flush=True)
    return backend, reason


def report_error(prog: str, error: BaseException, verbose: bool) -> int:
    """The one line a user error gets (a traceback before it with --verbose); exit code 1."""
    if verbose:
        traceback.print_exception(error)
    message = " ".join(str(error).split("\n")) or type(error).__name__
    print(f"{prog}: {message}", file=sys.stderr)
    return 1


def guarded(prog: str, verbose: bool, body: Callable[[], int]) -> int:
    """Run a command's body: DffError and OSError (missing files, full disks) become one
    line and exit 1, Ctrl-C exit 130; other exceptions are bugs and keep their traceback."""
    try:
        return body()
    except (DffError, OSError) as e:
        return report_error(prog, e, verbose)
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: interrupted (Ctrl-C); no outputs written", file=sys.stderr)
        return 130


# --- the run --------------------------------------------------------------------------------

def _progress(total: int | None, quiet: bool) -> Any:
    """A tqdm bar on stderr (frames/s is the live fps), or a stand-in when tqdm is missing,
    --quiet is given or stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or quiet or not sys.stderr.isatty():
        return _NoBar()
    return tqdm(total=total, unit="frame", dynamic_ncols=True, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _outputs(args: argparse.Namespace, video_path: Path, demo_clip: bool
             ) -> tuple[Path | None, Path | None, Path | None, bool]:
    """(video, jsonl, summary) output paths and whether the video is the default one;
    refuses paths that are the input or each other, and folders that do not exist."""
    out_video = Path(args.output) if args.output else None
    out_json = Path(args.json) if args.json else None
    out_summary = Path(args.summary) if args.summary else None
    default = out_video is None and out_json is None
    if default:
        out_video = (DEMO_DIR if demo_clip else Path(".")) / f"{video_path.stem}.dff.mp4"
    seen = {video_path.resolve(): "the input video"}
    for path, flag in ((out_video, "--output"), (out_json, "--json"),
                       (out_summary, "--summary")):
        if path is None:
            continue
        if path.is_dir():
            raise DffError(f"{path}: {flag} names a folder; give a file path in it")
        if path.resolve() in seen:
            raise DffError(f"{path}: {flag} is also {seen[path.resolve()]}; pick another path")
        seen[path.resolve()] = flag
        check_folder(path)
    if out_video is not None and out_video.suffix.lower() not in FOURCC:
        raise VideoError(f"{out_video}: cannot write '{out_video.suffix or 'no extension'}' "
                         "videos; use .mp4 (mp4v) or .avi (MJPG)")
    return out_video, out_json, out_summary, default


def _frames(video: Any, size: tuple[int, int], max_frames: int | None) -> Iterator[np.ndarray]:
    for frame in itertools.islice(video, max_frames):
        yield fit_frame(frame, size)


def _ms(times: dict[str, float]) -> dict[str, float]:
    return {name: seconds * 1000 for name, seconds in times.items()}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    say: Log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    engine_dir, manifest = resolve_engines(args, parser, say)
    demo_clip = args.demo and args.video is None
    if demo_clip:
        video_path = ensure_demo_clip(DEMO_CLIP, manifest, log=say)
    elif args.video is None:
        parser.error("VIDEO is required (or --demo to run on a synthetic clip)")
    else:
        video_path = Path(args.video)
    video = open_video(video_path)
    try:
        return _run_video(args, engine_dir, manifest, video, demo_clip, say)
    finally:
        video.close()


def _run_video(args: argparse.Namespace, engine_dir: Path, manifest: dict, video: Any,
               demo_clip: bool, say: Log) -> int:
    profile, stride = manifest["profile"], int(manifest["stride"])
    if args.resize:
        h, w = args.resize
        check_size(h, w, profile["min"], profile["max"], stride, what="--resize")
        size = args.resize
    else:
        check_size(video.height, video.width, profile["min"], profile["max"], stride,
                   what=str(video.path))
        size = video.size
    out_video, out_json, out_summary, default_out = _outputs(args, video.path, demo_clip)
    key_interval = args.key_interval or int(manifest["key_interval"])
    scheduler = make_scheduler(args.schedule, key_interval)
    backend, reason = choose_backend(args, engine_dir, say)
    try:
        total = video.frame_count
        if args.max_frames is not None:
            total = min(total, args.max_frames) if total else args.max_frames
        bar = _progress(total, args.quiet)
        keys = [0]

        def sink(result: FrameResult) -> None:
            writer.write(result.index, result.frame, result.labels, result.is_key,
                         _ms(result.times))
            keys[0] += result.is_key
            bar.update(1)
            bar.set_postfix(keys=keys[0], refresh=False)

        try:
            with ResultWriter(out_video, out_json, video.fps, size,
                              manifest["class_names"]) as writer:
                summary = Pipeline(backend, scheduler).run_to(
                    _frames(video, size, args.max_frames), sink)
        finally:
            bar.close()
    finally:
        backend.close()
    written = [p for p in (out_video, out_json) if p is not None]
    summary.update({
        "backend_reason": reason,
        "int8_check": getattr(backend, "int8_check", None),
        "schedule_name": args.schedule,
        "key_interval": None if args.schedule == "per-frame" else key_interval,
        "engine_dir": str(engine_dir),
        "video": {"path": str(video.path), "size": [video.height, video.width],
                  "fps": video.fps, "frame_count": video.frame_count,
                  "frames_read": video.frames_read, "truncated": video.truncated,
                  "resized_to": list(size) if size != video.size else None},
        "outputs": {"video": str(out_video) if out_video else None,
                    "jsonl": str(out_json) if out_json else None,
                    "summary": str(out_summary) if out_summary else None},
    })
    if out_summary is not None:
        try:
            write_summary(out_summary, summary)
        except BaseException:
            for path in written:  # all or nothing: the run's other outputs go too
                path.unlink(missing_ok=True)
            raise
    if video.truncated:
        print(f"dff-run: warning: {video.path}: decoding stopped after {video.frames_read} of "
              f"{video.frame_count} frames (the file is truncated or damaged); the outputs "
              "cover the frames decoded", file=sys.stderr)
    for line in format_summary(summary):
        print(line)
    if out_video is not None:
        where, how = out_video, ""
        if default_out:  # say where, since nobody asked for this path
            where, how = out_video.resolve(), " (the default: neither --output nor --json given)"
        print(f"wrote {where}: annotated video{how}")
    if out_json is not None:
        print(f"wrote {out_json}: {summary['frames']} JSON records, one per frame")
    if out_summary is not None:
        print(f"wrote {out_summary}: run summary")
    if args.demo:
        print(f"output video: {out_video if out_video is not None else 'none (--json only)'}")
    return 0


def backend_label(report: dict) -> str:
    """'onnxruntime-cpu (int8)': a report's backend and, when it has one, its precision."""
    precision = report.get("precision")
    return report["backend"] + (f" ({precision})" if precision else "")


def format_summary(s: dict) -> list[str]:
    """The human summary: frames, key frames and why, fps, median ms per stage, efficiency."""
    video = s["video"]
    h, w = video["resized_to"] or video["size"]
    schedule = s["schedule_name"] + (f", key interval {s['key_interval']}"
                                     if s["key_interval"] else "")
    on = backend_label(s)
    lines = [f"{video['path']}: {s['frames']} frames at {h}x{w} on {on}, {schedule}"]
    if video["resized_to"]:
        lines.append(f"  resized from {video['size'][0]}x{video['size'][1]} to {h}x{w} "
                     "(--resize)")
    reasons = ", ".join(f"{k} {v}" for k, v in s["schedule"]["reasons"].items() if v)
    lines.append(f"  key frames: {s['key_frames']} of {s['frames']} ({reasons or 'none'})")
    lines.append(f"  speed: {s['fps']:.1f} fps ({s['wall_s']:.2f} s wall); runtime efficiency "
                 f"{s['efficiency']:.2f} (stage medians x counts / wall)")
    stages = s["stages"]
    main = [f"{n} {1000 * stages[n]['median_s']:.2f} (x{stages[n]['count']})"
            for n in SHOWN_STAGES if stages[n]["count"]]
    rest = [f"{n} {1000 * stages[n]['median_s']:.2f}"
            for n in ("upload", "schedule", "decode") if stages[n]["count"]]
    lines.append(f"  median ms per stage: {', '.join(main)}; {', '.join(rest)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_backend_args(parser, args)
    if not args.verbose:  # FFmpeg's own log lines ("moov atom not found") would precede ours
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    return guarded("dff-run", args.verbose, lambda: run(args, parser))


if __name__ == "__main__":
    sys.exit(main())

