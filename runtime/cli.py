"""`dff-run`: a video through the DFF pipeline (DESIGN.md §1) into an annotated video, JSON
Lines and a summary, for a segmentation or a detection model (the manifest's `task.kind`).

Checks everything it can before the first frame (engine folder, video, frame size, backend,
output folders), then decodes, runs and writes in three threads. Outputs are staged beside
their targets and appear only when the whole run succeeded: a failure or Ctrl-C leaves none.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from dff.runtime.backends import check_quality, task_spec
from dff.runtime.loop import FrameResult, Pipeline
from dff.runtime.remote import add_server_args, check_server_args
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

from dff.commands.common import (
    Log,
    add_backend_args,
    backend_label,
    budget_arg,
    check_backend_args,
    choose_backend,
    guarded,
    int_at_least,
    outputs_record,
    resolve_engines,
    schedule_label,
    video_record,
    warn_truncated,
)
from dff.commands.demo import DEMO_TASKS, demo_clip, demo_dir, ensure_demo_clip
from dff.errors import DffError
from dff.tasks import DETECTION, SEGMENTATION

SHOWN_STAGES = ("feature", "flow", "task")  # the compute stages the summary lists first
MIN_SCORE = 0.3  # detection: default --min-score
# options that apply to one task only: argument name -> (task, what it does)
TASK_OPTIONS = {"alpha": (SEGMENTATION, "blends segmentation class colours"),
                "min_score": (DETECTION, "picks the detection boxes drawn and counted")}

EPILOG = """\
backends (--backend):
  auto              tensorrt if usable and built, else onnxruntime-cuda, else onnxruntime-cpu
  onnxruntime[-cpu|-cuda], tensorrt: the graphs/engines of --engine-dir
  torch[-cpu|-cuda] the PyTorch reference, on --checkpoint or the manifest's checkpoint

schedules (--schedule):
  fixed       a key frame every --key-interval frames (default: the manifest's key_interval)
  per-frame   every frame a key frame (no flow): the baseline
  adaptive    key frames at scene cuts, large or outgoing flow, or --key-interval at the latest
  learned     key frames where the flow net's own `quality` output (a model with a quality
              head: python -m dff.models.quality) predicts the warped features worst
  --key-budget F caps adaptive's and learned's key frames at a fraction F of the frames
              (learned: 1/--key-interval without it); several videos share one budget, so key
              frames go to the busy streams

outputs: an annotated video (--output, .mp4 or .avi), one JSON record per frame (--json) and
the run's summary (--summary). With neither --output nor --json: ./<video name>.dff.mp4.
  segmentation: class colours blended over the frame (--alpha); records hold frame, key,
                labels as row-major run-length codes, pixels per class, stage times in ms
  detection:    boxes scoring at least --min-score drawn with class name and score; records
                hold frame, key, every detection {box, score, class, name}, detections per
                class, stage times in ms

examples:
  dff-run --demo                                     # shipped demo model on a synthetic clip
  dff-run --demo detection                           # the shipped detection model
  dff-run clip.mp4 -e engines/ -o clip.dff.mp4 --json clip.jsonl
  dff-run clip.mp4 -e engines/ --schedule adaptive --resize 256x448 --summary run.json
  dff-run clip.mp4 -e engines_quality/ --schedule learned --key-budget 0.1
  dff-run cam1.mp4 cam2.mp4 cam3.mp4 -e engines/ --output-dir out/   # batched streams
  dff-run clip.mp4 --server 127.0.0.1:8001 --json clip.jsonl  # on Triton (dff-serve start)

several videos (--output-dir DIR): one backend, each video a stream with its own schedule and
key frame; at each step the key frames of all streams go to the feature graph as one batch, the
others to the flow graph as one batch, all to the task graph as one batch (in chunks of at most
--max-batch); each stream's outputs equal a run of that video alone.
"""


# --- arguments ------------------------------------------------------------------------------

def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..1")
    return value


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except VideoError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-run", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a video through the DFF engines: segmentation or detection with key "
                    "frames and flow-warped features in between.")
    p.add_argument("video", nargs="*", metavar="VIDEO",
                   help="input video (with --demo: default, a synthetic clip in ./dff-demo/); "
                        "several run together as batched streams, with --output-dir")
    add_backend_args(p)
    p.add_argument("-k", "--key-interval", type=int_at_least(1), metavar="K",
                   help="frames per key frame (default: the manifest's key_interval); the "
                        "adaptive schedule's longest gap")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="key-frame schedule (default: fixed; with --server: the model's)")
    p.add_argument("--key-budget", type=budget_arg, metavar="F",
                   help="adaptive and learned schedules: at most this fraction of the frames "
                        "are key frames, e.g. 0.1 (one budget for all the videos of a run)")
    p.add_argument("-o", "--output", metavar="OUT.mp4", help="annotated video (.mp4 or .avi)")
    p.add_argument("--json", metavar="OUT.jsonl", help="one JSON record per frame")
    p.add_argument("--summary", metavar="OUT.json",
                   help="the run's summary as JSON (stage times, key frames, backend, outputs)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="write DIR/<name>.dff.mp4 and DIR/<name>.jsonl for each VIDEO (<name>: "
                        "its file name without the extension; two videos of one name are "
                        "refused) and DIR/summary.json; needed for several videos")
    p.add_argument("--max-batch", type=int_at_least(1), metavar="N",
                   help="with --output-dir: frames per backend call across the streams "
                        "(default: the engines' batch limit, manifest.json 'profile' max)")
    p.add_argument("--resize", type=size_arg, metavar="HxW",
                   help="resize every frame to HxW (multiples of the manifest's stride, within "
                        "the engines' profile) instead of refusing a video of another size")
    p.add_argument("--max-frames", type=int_at_least(1), metavar="N",
                   help="stop after N frames")
    p.add_argument("--alpha", type=fraction, metavar="A",
                   help="segmentation: opacity of the class colours in the video (default 0.5)")
    p.add_argument("--min-score", type=fraction, metavar="S",
                   help=f"detection: draw and count boxes scoring at least S (default "
                        f"{MIN_SCORE}); the JSON records keep every detection")
    add_server_args(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no notes; the final summary only")
    return p


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


def check_task_options(args: argparse.Namespace, kind: str, engine_dir: Path) -> None:
    """Refuse an option of TASK_OPTIONS given for a model of the other task (one line)."""
    for name, (task, does) in TASK_OPTIONS.items():
        if getattr(args, name, None) is not None and kind != task:
            flag = "--" + name.replace("_", "-")
            raise DffError(f"{flag}: {engine_dir / 'manifest.json'} holds a {kind} model "
                           f"(field 'task.kind'), and {flag} {does}; drop {flag}")


def _outputs(args: argparse.Namespace, video_path: Path, demo: str | None
             ) -> tuple[Path | None, Path | None, Path | None, bool]:
    """(video, jsonl, summary) output paths and whether the video is the default one (in the
    demo's folder when `demo` names the task of a demo clip); refuses paths that are the input
    or each other, and folders that do not exist."""
    out_video = Path(args.output) if args.output else None
    out_json = Path(args.json) if args.json else None
    out_summary = Path(args.summary) if args.summary else None
    default = out_video is None and out_json is None
    if default:
        out_video = (demo_dir(demo) if demo else Path(".")) / f"{video_path.stem}.dff.mp4"
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
    if args.server is not None:
        from dff.runtime.run_remote import run_remote

        return run_remote(args)
    say: Log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    engine_dir, manifest = resolve_engines(args, parser, say)
    check_task_options(args, task_spec(manifest, str(engine_dir / "manifest.json"))["kind"],
                       engine_dir)
    demo = args.demo if not args.video else None  # the task of a demo clip
    if demo:
        video_path = ensure_demo_clip(demo_clip(demo), manifest, log=say)
    elif not args.video:
        parser.error("VIDEO is required (or --demo to run on a synthetic clip)")
    else:
        video_path = Path(args.video[0])
    if args.output_dir is not None:
        from dff.runtime.run_streams import run_streams

        paths = [video_path] if demo else [Path(v) for v in args.video]
        return run_streams(args, engine_dir, manifest, paths, say)
    video = open_video(video_path)
    try:
        return _run_video(args, engine_dir, manifest, video, demo, say)
    finally:
        video.close()


def _run_video(args: argparse.Namespace, engine_dir: Path, manifest: dict, video: Any,
               demo: str | None, say: Log) -> int:
    profile, stride = manifest["profile"], int(manifest["stride"])
    if args.resize:
        h, w = args.resize
        check_size(h, w, profile["min"], profile["max"], stride, what="--resize")
        size = args.resize
    else:
        check_size(video.height, video.width, profile["min"], profile["max"], stride,
                   what=str(video.path))
        size = video.size
    out_video, out_json, out_summary, default_out = _outputs(args, video.path, demo)
    kind = task_spec(manifest)["kind"]
    min_score = MIN_SCORE if args.min_score is None else args.min_score
    key_interval = args.key_interval or int(manifest["key_interval"])
    scheduler = make_scheduler(args.schedule, key_interval, stride=stride,
                               key_budget=args.key_budget)
    backend, reason = choose_backend(args, engine_dir, say)
    try:
        check_quality(backend, [scheduler], args.checkpoint or str(engine_dir))
        total = video.frame_count
        if args.max_frames is not None:
            total = min(total, args.max_frames) if total else args.max_frames
        bar = _progress(total, args.quiet)
        keys = [0]

        def sink(result: FrameResult) -> None:
            writer.write(result.index, result.frame, result.outputs, result.is_key,
                         _ms(result.times))
            keys[0] += result.is_key
            bar.update(1)
            bar.set_postfix(keys=keys[0], refresh=False)

        try:
            with ResultWriter(out_video, out_json, video.fps, size, manifest["class_names"],
                              0.5 if args.alpha is None else args.alpha, task=kind,
                              min_score=min_score) as writer:
                summary = Pipeline(backend, scheduler).run_to(
                    _frames(video, size, args.max_frames), sink)
        finally:
            bar.close()
    finally:
        backend.close()
    written = [p for p in (out_video, out_json) if p is not None]
    summary.update({
        "task": kind,
        "per_class": {"unit": "detections" if kind == DETECTION else "pixels",
                      "min_score": min_score if kind == DETECTION else None,
                      "counts": writer.class_counts()},
        "backend_reason": reason,
        "int8_check": getattr(backend, "int8_check", None),
        "schedule_name": args.schedule,
        "key_interval": None if args.schedule == "per-frame" else key_interval,
        "key_budget": args.key_budget,
        "engine_dir": str(engine_dir),
        "video": video_record(video, size),
        "outputs": outputs_record(out_video, out_json, out_summary),
    })
    if out_summary is not None:
        try:
            write_summary(out_summary, summary)
        except BaseException:
            for path in written:  # all or nothing: the run's other outputs go too
                path.unlink(missing_ok=True)
            raise
    warn_truncated(video)
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


def format_summary(s: dict) -> list[str]:
    """The human summary: frames, key frames and why, fps, median ms per stage, efficiency."""
    video = s["video"]
    h, w = video["resized_to"] or video["size"]
    schedule = schedule_label(s)
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
    per_class = s.get("per_class") or {}
    if per_class.get("unit") == "detections":
        counts = per_class["counts"]
        lines.append(f"  detections scoring >= {per_class['min_score']:g}: {sum(counts.values())}"
                     f" ({', '.join(f'{n} {c}' for n, c in counts.items()) or 'no classes'})")
    return lines


def demo_video_first(argv: list[str]) -> list[str]:
    """`dff-run --demo VIDEO` keeps meaning the segmentation demo model on VIDEO: argparse
    would take VIDEO for --demo's TASK, so the task is spelt out before it. A word that is
    neither a task nor a path (a misspelt task) is left for argparse to refuse."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--":
            break
        nxt = argv[i + 1]
        if (arg == "--demo" and nxt not in DEMO_TASKS and not nxt.startswith("-")
                and (Path(nxt).suffix or Path(nxt).exists())):
            argv.insert(i + 1, SEGMENTATION)
            break
    return argv


def check_stream_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Several videos need --output-dir, which replaces --output, --json and --summary."""
    if len(args.video) > 1 and args.output_dir is None:
        parser.error(f"{len(args.video)} videos: pass --output-dir DIR for their outputs")
    if args.output_dir is None:
        if args.max_batch is not None:
            parser.error("--max-batch applies to --output-dir runs (batched streams)")
        return
    given = [flag for flag, value in (("--output", args.output), ("--json", args.json),
                                      ("--summary", args.summary)) if value]
    if given:
        parser.error(f"--output-dir names every output; drop {', '.join(given)}")
    if args.useCudaGraph:
        parser.error("--useCudaGraph replays one stream's flow and task; drop it with "
                     "--output-dir (batched streams)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(demo_video_first(sys.argv[1:] if argv is None else argv))
    check_backend_args(parser, args)
    check_server_args(parser, args)
    check_stream_args(parser, args)
    if args.server is None and args.schedule is None:
        args.schedule = "fixed"
    if not args.verbose:  # FFmpeg's own log lines ("moov atom not found") would precede ours
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    return guarded("dff-run", args.verbose, lambda: run(args, parser))


if __name__ == "__main__":
    sys.exit(main())

