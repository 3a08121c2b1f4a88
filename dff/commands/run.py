"""`dff-run`: videos through the DFF runtime (DESIGN.md §1) into annotated videos, JSON Lines
and a summary, for a segmentation or a detection model (the manifest's `task.kind`).

One video runs as one stream (runtime/loop.py Pipeline); several, with --output-dir, as batched
streams (StreamPipeline); with --server, one video through a Triton server's `dff` model
(runtime/remote.py). Everything that can be checked is checked before the first frame (engine
folder or served model, videos, frame sizes, backend, output paths), then frames are decoded,
run and written in their own threads. Outputs are staged beside their targets and appear only
when the whole run succeeded: a failure or Ctrl-C leaves none.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dff.commands.common import (
    Log,
    add_backend_args,
    add_flow_args,
    backend_label,
    budget_arg,
    check_backend_args,
    choose_backend,
    choose_flow,
    guarded,
    int_at_least,
    resolve_engines,
    schedule_label,
    size_arg,
)
from dff.commands.demo import DEMO_TASKS, demo_clip, demo_dir, ensure_demo_clip
from dff.errors import DffError
from dff.export.manifest import deploy_settings
from dff.runtime.backends import check_quality, task_spec
from dff.runtime.flows import dis_flow
from dff.runtime.loop import FrameResult, Pipeline, StreamPipeline
from dff.runtime.propagate import make_propagator
from dff.runtime.remote import TIMEOUT_S, RemoteError, RemoteStream, parse_address, stream_frames
from dff.runtime.scheduler import SCHEDULES, make_schedulers
from dff.runtime.video import (
    FOURCC,
    VideoError,
    check_folder,
    check_size,
    fit_frame,
    open_video,
)
from dff.runtime.writers import ResultWriter, write_summary
from dff.tasks import DETECTION, RAW, SEGMENTATION

DEPLOY_PROPAGATE = ("dff", "copy", "warp-output", "track")  # --propagate; dff-tune's kinds
# the compute stages the summary lists first (key: the flow's key_code, where it is cached)
SHOWN_STAGES = ("feature", "key", "flow", "task")
MIN_SCORE = 0.3  # detection: default --min-score
SUMMARY = "summary.json"  # --output-dir's summary file
# options that apply to one task only: argument name -> (task, what it does)
TASK_OPTIONS = {"alpha": (SEGMENTATION, "blends segmentation class colours"),
                "min_score": (DETECTION, "picks the detection boxes drawn and counted")}
# options of a local run that --server replaces, with their defaults
_LOCAL_ONLY = (("engine_dir", None, "--engine-dir"), ("demo", None, "--demo"),
               ("backend", "auto", "--backend"), ("checkpoint", None, "--checkpoint"),
               ("precision", None, "--precision"), ("useCudaGraph", False, "--useCudaGraph"),
               ("threads", 0, "--threads"), ("device", 0, "--device"),
               ("output_dir", None, "--output-dir"), ("max_batch", None, "--max-batch"),
               ("key_budget", None, "--key-budget"), ("flow", None, "--flow"),
               ("dis_preset", None, "--dis-preset"), ("dis_scale", None, "--dis-scale"),
               ("propagate", None, "--propagate"))
_SERVER_ONLY = (("server_model", "dff", "--server-model"), ("sequence_id", None, "--sequence-id"),
                ("server_timeout", TIMEOUT_S, "--server-timeout"))

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-run", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a video through the DFF engines: segmentation or detection with key "
                    "frames and flow-warped features in between.")
    p.add_argument("video", nargs="*", metavar="VIDEO",
                   help="input video (with --demo: default, a synthetic clip in ./dff-demo/); "
                        "several run together as batched streams, with --output-dir")
    add_backend_args(p)
    add_flow_args(p)
    p.add_argument("-k", "--key-interval", type=int_at_least(1), metavar="K",
                   help="frames per key frame (default: the manifest's key_interval); the "
                        "adaptive schedule's longest gap")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="key-frame schedule (default: fixed; with --server: the model's)")
    p.add_argument("--propagate", choices=DEPLOY_PROPAGATE,
                   help="how the frames between key frames get their outputs: dff (features "
                        "warped along the flow, the default), copy (the key frame's features as "
                        "they are), warp-output (segmentation: the key frame's labels warped "
                        "along DIS's flow) or track (detection: the key frame's boxes carried "
                        "by a Kalman-filter tracker); default: the manifest's 'deploy' (dff-tune "
                        "--write), else dff")
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
                        "refused) and DIR/summary.json, creating DIR if needed; needed for "
                        "several videos")
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
    g = p.add_argument_group("serving (--server)")
    g.add_argument("--server", metavar="HOST:PORT",
                   help="run on a Triton server's gRPC port (dff-serve start) instead of a "
                        "local backend; the model's config gives the task and classes")
    g.add_argument("--server-model", default="dff", metavar="NAME",
                   help="the served DFF model (default: dff)")
    g.add_argument("--sequence-id", type=int, metavar="ID",
                   help="the video's sequence id, 1 .. 2^63-1 (default: a random one)")
    g.add_argument("--server-timeout", type=float, default=TIMEOUT_S, metavar="S",
                   help=f"seconds to keep retrying an unreachable server (default {TIMEOUT_S:g})")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no notes; the final summary only")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say: --server takes one video and no local option (--server-*
    need --server); several videos need --output-dir, which replaces --output, --json and
    --summary."""
    if args.server is None:
        extra = [flag for name, default, flag in _SERVER_ONLY if getattr(args, name) != default]
        if extra:
            parser.error(f"{', '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} to "
                         "--server runs only")
    else:
        given = [flag for name, default, flag in _LOCAL_ONLY if getattr(args, name) != default]
        if given:
            parser.error(f"--server runs the server's model; drop {', '.join(given)}")
        if len(args.video) != 1:
            parser.error("--server takes one VIDEO (run one dff-run per video)")
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


def check_task_options(args: argparse.Namespace, kind: str, model: str) -> None:
    """Refuse an option of TASK_OPTIONS given for a model of the other task (one line);
    `model` says whose task `kind` is, e.g. "e/manifest.json holds a detection model"."""
    for name, (task, does) in TASK_OPTIONS.items():
        if getattr(args, name) is not None and kind != task:
            flag = "--" + name.replace("_", "-")
            raise DffError(f"{flag}: {model}, and {flag} {does}; drop {flag}")


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


# --- outputs --------------------------------------------------------------------------------

def _outputs(args: argparse.Namespace, video_path: Path, demo: str | None, kind: str = ""
             ) -> tuple[Path | None, Path | None, Path | None, bool]:
    """One video's (video, jsonl, summary) output paths and whether the video is the default
    one (in the demo's folder when `demo` names the task of a demo clip); refuses paths that
    are the input or each other, and folders that do not exist. A raw task's (`kind` raw)
    "video" is the .npz of its outputs (runtime/writers.py NpzWriter)."""
    out_video = Path(args.output) if args.output else None
    out_json = Path(args.json) if args.json else None
    out_summary = Path(args.summary) if args.summary else None
    default = out_video is None and out_json is None
    suffix = ".npz" if kind == RAW else ".mp4"
    if default:
        out_video = (demo_dir(demo) if demo else Path(".")) / f"{video_path.stem}.dff{suffix}"
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
    if kind == RAW:
        if out_video is not None and out_video.suffix.lower() != ".npz":
            raise DffError(f"{out_video}: this model's task is raw (its own outputs, nothing to "
                           "draw); --output takes a .npz, which gets every frame's outputs")
    elif out_video is not None and out_video.suffix.lower() not in FOURCC:
        raise VideoError(f"{out_video}: cannot write '{out_video.suffix or 'no extension'}' "
                         "videos; use .mp4 (mp4v) or .avi (MJPG)")
    return out_video, out_json, out_summary, default


def stream_names(paths: list[Path], out_dir: Path) -> list[str]:
    """Each video's output name, its file name without the extension; two videos of one name
    (case aside, for case-insensitive file systems) are a DffError naming both."""
    seen: dict[str, Path] = {}
    for path in paths:
        other = seen.get(path.stem.casefold())
        if other is not None:
            raise DffError(f"{other} and {path} would both write {out_dir / path.stem}.dff.mp4 "
                           f"and .jsonl (--output-dir names outputs by the video's file name); "
                           "rename one, or run them with different --output-dir")
        seen[path.stem.casefold()] = path
    return [path.stem for path in paths]


def _targets(paths: list[Path], out_dir: Path, kind: str = ""
             ) -> tuple[list[tuple[Path, Path]], Path]:
    """--output-dir's (video, jsonl) per stream and its summary path, none of them an input
    video; the folder is made if it is missing. A raw task's "video" is a .npz."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DffError(f"{out_dir}: --output-dir is a file, not a folder; pick a folder")
    names = stream_names(paths, out_dir)
    suffix = ".npz" if kind == RAW else ".mp4"
    outputs = [(out_dir / f"{n}.dff{suffix}", out_dir / f"{n}.jsonl") for n in names]
    summary = out_dir / SUMMARY
    inputs = {p.resolve(): p for p in paths}
    for target in (*(t for pair in outputs for t in pair), summary):
        if target.resolve() in inputs:
            raise DffError(f"{target}: an output of --output-dir is the input video "
                           f"{inputs[target.resolve()]}; pick another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    return outputs, summary


def _commit(writers: list[ResultWriter], written: list[Path], summary_path: Path | None,
            summary: dict) -> None:
    """Every writer's files into place, then the summary; on a failure none of them stays."""
    try:
        for writer in writers:
            writer.close()
        if summary_path is not None:
            write_summary(summary_path, summary)
    except BaseException:
        for writer in writers:
            writer.abort()
        for path in written:
            path.unlink(missing_ok=True)
        raise


# --- the runs -------------------------------------------------------------------------------

class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(videos: Sequence[Any], max_frames: int | None, quiet: bool) -> Any:
    """A tqdm bar on stderr over the videos' frames (frames/s is the live fps), or a stand-in
    when tqdm is missing, --quiet is given or stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or quiet or not sys.stderr.isatty():
        return _NoBar()
    counts = [v.frame_count or None for v in videos]
    total = None
    if all(counts):
        total = sum(min(c, max_frames) if max_frames else c for c in counts)  # type: ignore[type-var]
    elif len(videos) == 1:
        total = max_frames
    return tqdm(total=total, unit="frame", dynamic_ncols=True, leave=False)


def _frames(video: Any, size: tuple[int, int], max_frames: int | None) -> Iterator[np.ndarray]:
    for frame in itertools.islice(video, max_frames):
        yield fit_frame(frame, size)


def _sink(writer: ResultWriter, bar: Any, keys: list[int]) -> Callable[[FrameResult], None]:
    """A stream's sink: the result written, the bar moved on (with the key frames so far)."""
    def sink(result: FrameResult) -> None:
        writer.write(result.index, result.frame, result.outputs, result.is_key,
                     {name: seconds * 1000 for name, seconds in result.times.items()})
        keys[0] += result.is_key
        bar.update(1)
        bar.set_postfix(keys=keys[0], refresh=False)
    return sink


def _writers(videos: list[Any], sizes: list[tuple[int, int]],
             paths: list[tuple[Path | None, Path | None]], class_names: list[str],
             args: argparse.Namespace, kind: str) -> list[ResultWriter]:
    writers: list[ResultWriter] = []
    try:
        for video, size, (out_video, out_json) in zip(videos, sizes, paths):
            writers.append(ResultWriter(
                out_video, out_json, video.fps, size, class_names,
                0.5 if args.alpha is None else args.alpha, task=kind,
                min_score=MIN_SCORE if args.min_score is None else args.min_score))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return writers


def _per_class(kind: str, writer: ResultWriter) -> dict:
    """The summary's per-class counts of one stream."""
    if kind == RAW:
        return {"unit": None, "min_score": None, "counts": {}}  # the model's own outputs
    return {"unit": "detections" if kind == DETECTION else "pixels",
            "min_score": writer.min_score if kind == DETECTION else None,
            "counts": writer.class_counts()}


def video_record(video: Any, size: Any) -> dict:
    """The summary's `video` entry: the file, its size and frames, and `size` if resized."""
    return {"path": str(video.path), "size": [video.height, video.width],
            "fps": video.fps, "frame_count": video.frame_count,
            "frames_read": video.frames_read, "truncated": video.truncated,
            "resized_to": list(size) if tuple(size) != tuple(video.size) else None}


def _paths_record(video: Any, jsonl: Any) -> dict:
    """The summary's `outputs` entry of one stream: each path written, or None."""
    return {"video": str(video) if video else None, "jsonl": str(jsonl) if jsonl else None}


def warn_truncated(video: Any) -> None:
    """The warning for a video whose decoding stopped before its last frame."""
    if video.truncated:
        print(f"dff-run: warning: {video.path}: decoding stopped after {video.frames_read} of "
              f"{video.frame_count} frames (the file is truncated or damaged); the outputs "
              "cover the frames decoded", file=sys.stderr)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.server is not None:
        return run_remote(args)
    say: Log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    engine_dir, manifest = resolve_engines(args, parser, say)
    where = engine_dir / "manifest.json"
    kind = task_spec(manifest, str(where))["kind"]
    check_task_options(args, kind, f"{where} holds a {kind} model (field 'task.kind')")
    demo = args.demo if not args.video else None  # the task of a demo clip
    if demo:
        paths = [ensure_demo_clip(demo_clip(demo), manifest, log=say)]
    elif not args.video:
        parser.error("VIDEO is required (or --demo to run on a synthetic clip)")
    else:
        paths = [Path(v) for v in args.video]
    out_dir = Path(args.output_dir) if args.output_dir is not None else None
    made = ([d for d in (out_dir, *out_dir.parents) if not d.exists()]
            if out_dir is not None else [])
    try:
        with contextlib.ExitStack() as stack:
            videos = []
            for path in paths:
                videos.append(open_video(path))
                stack.callback(videos[-1].close)
            return _run_local(args, engine_dir, manifest, videos, demo, say)
    except BaseException:
        for folder in made:  # the --output-dir folders this run made, empty again
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def apply_deploy(args: argparse.Namespace, manifest: dict, where: Path, say: Log) -> None:
    """The manifest's `deploy` (dff-tune --write) as the defaults of --schedule,
    --key-interval, --flow, --resize, --propagate and (adaptive, learned) --key-budget 1/k;
    an option given on the command line wins. Without one: the fixed schedule, dff."""
    rec = deploy_settings(manifest)
    kind = rec.get("kind")
    if kind is not None:
        k, size = rec.get("k"), rec.get("size")
        schedule = ("per-frame" if kind in ("per-frame", "resize")
                    else rec.get("schedule") or "fixed")
        settings = {"schedule": schedule, "key_interval": k if schedule != "per-frame" else None,
                    "flow": rec.get("flow") if kind == "dff" else None,
                    "resize": tuple(size) if size else None,
                    "propagate": kind if kind in DEPLOY_PROPAGATE else None,
                    "key_budget": (1 / k if k and schedule in ("adaptive", "learned")
                                   and args.schedule in (None, schedule) else None)}
        taken = []
        for name, value in settings.items():
            if getattr(args, name) is None and value is not None:
                setattr(args, name, value)
                taken.append(name)
        if taken:
            say(f"deploying dff-tune's choice recorded in {where} (field 'deploy'): {kind}"
                + "".join(f", {n.replace('_', ' ')} {_shown(getattr(args, n))}" for n in taken
                          if n != "propagate")
                + " (an option given here wins)")
    if args.schedule is None:
        args.schedule = "fixed"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _between(args: argparse.Namespace, manifest: dict, kind: str, key_interval: int,
             where: str, backend: Any) -> tuple[Any, bool, Any]:
    """(flow source, copy, propagator) of --propagate: dff's flow is --flow's (else the
    manifest's default); copy and the carried outputs compute no flow (an explicit --flow is
    left for the loop to refuse)."""
    mode = args.propagate or "dff"
    if mode == "dff":
        return choose_flow(args, manifest, where, backend), False, None
    flow = choose_flow(args, manifest, where, backend) if args.flow else None
    if mode == "copy":
        return flow, True, None
    task = task_spec(manifest)
    return flow, False, make_propagator(mode, kind, key_interval,
                                        dis_flow(manifest, args.dis_preset, args.dis_scale),
                                        float(task.get("score_threshold", 0.0)))


def _run_local(args: argparse.Namespace, engine_dir: Path, manifest: dict, videos: list[Any],
               demo: str | None, say: Log) -> int:
    apply_deploy(args, manifest, engine_dir / "manifest.json", say)
    profile, stride = manifest["profile"], int(manifest["stride"])
    sizes = []
    for video in videos:
        h, w = args.resize or video.size
        check_size(h, w, profile["min"], profile["max"], stride,
                   what="--resize" if args.resize else str(video.path))
        sizes.append((h, w))
    streams = args.output_dir is not None
    kind = task_spec(manifest)["kind"]
    if streams:
        out_dir = Path(args.output_dir)
        pairs, summary_path = _targets([v.path for v in videos], out_dir, kind)
        paths: list[tuple[Path | None, Path | None]] = list(pairs)
        default = False
    else:
        out_video, out_json, summary_path, default = _outputs(args, videos[0].path, demo, kind)
        paths = [(out_video, out_json)]
    key_interval = args.key_interval or int(manifest["key_interval"])
    schedulers = make_schedulers(len(videos), args.schedule, key_interval, stride=stride,
                                 key_budget=args.key_budget)
    backend, reason = choose_backend(args, engine_dir, say)
    try:
        check_quality(backend, schedulers, args.checkpoint or str(engine_dir))
        flow, copy, propagate = _between(args, manifest, kind, key_interval, str(engine_dir),
                                         backend)
        runtime = (StreamPipeline(backend, schedulers, max_batch=args.max_batch, flow=flow,
                                  copy=copy, propagate=propagate)
                   if streams else Pipeline(backend, schedulers[0], flow=flow, copy=copy,
                                            propagate=propagate))
        writers = _writers(videos, sizes, paths, manifest["class_names"], args, kind)
        bar = _progress(videos, args.max_frames, args.quiet)
        try:
            sinks = [_sink(w, bar, [0]) for w in writers]
            frames = [_frames(v, s, args.max_frames) for v, s in zip(videos, sizes)]
            summary = (runtime.run_to(frames, sinks, [str(v.path) for v in videos]) if streams
                       else runtime.run_to(frames[0], sinks[0]))
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        finally:
            bar.close()
    finally:
        backend.close()
    summary.update({"task": kind, "backend_reason": reason, "int8_check": backend.int8_check,
                    "schedule_name": args.schedule,
                    "key_interval": None if args.schedule == "per-frame" else key_interval,
                    "key_budget": args.key_budget, "engine_dir": str(engine_dir)})
    records = [{"video": video_record(v, s), "per_class": _per_class(kind, w),
                "outputs": _paths_record(*p)}
               for v, s, w, p in zip(videos, sizes, writers, paths)]
    if streams:
        summary["summary"] = str(summary_path)
        for entry, record in zip(summary["per_stream"], records):
            entry.update(record)
    else:
        summary.update(records[0])
        summary["outputs"]["summary"] = str(summary_path) if summary_path else None
    _commit(writers, [p for pair in paths for p in pair if p is not None], summary_path,
            summary)
    for video in videos:
        warn_truncated(video)
    for line in (format_streams(summary) if streams else format_summary(summary)):
        print(line)
    if streams:
        print(f"wrote {len(videos)} annotated videos and JSON Lines files and {summary_path} "
              f"into {args.output_dir}")
        return 0
    _say_written(paths[0], summary_path, default, summary["frames"])
    if args.demo:
        out_video = paths[0][0]
        print(f"output video: {out_video if out_video is not None else 'none (--json only)'}")
    return 0


def _say_written(pair: tuple[Path | None, Path | None], summary_path: Path | None,
                 default: bool, frames: int) -> None:
    out_video, out_json = pair
    if out_video is not None:
        where, how = out_video, ""
        if default:  # say where, since nobody asked for this path
            where, how = out_video.resolve(), " (the default: neither --output nor --json given)"
        what = ("raw outputs, one .npz entry per frame and output" if out_video.suffix == ".npz"
                else "annotated video")
        print(f"wrote {where}: {what}{how}")
    if out_json is not None:
        print(f"wrote {out_json}: {frames} JSON records, one per frame")
    if summary_path is not None:
        print(f"wrote {summary_path}: run summary")


def run_remote(args: argparse.Namespace) -> int:
    """One video through a Triton server's `dff` model (runtime/remote.py), into the outputs
    a local run writes (the JSON records' times: `request` and `decode` ms). No engine
    folder: the served model's config gives the task, classes, profile and schedule
    (--schedule and -k, if given, must match it). A run that fails or is interrupted leaves
    its sequence on the server until the server's idle timeout frees it."""
    address = parse_address(args.server)
    with open_video(args.video[0]) as video:
        out_video, out_json, summary_path, default = _outputs(args, video.path, None)
        stream = RemoteStream(address, args.server_model, sequence_id=args.sequence_id,
                              timeout=args.server_timeout)
        try:
            model = stream.connect()
            where = f"model {model.name!r} on {stream.url}"
            check_task_options(args, model.kind, f"{where} serves a {model.kind} model")
            _check_schedule(args, model, where)
            size = args.resize or video.size
            check_size(*size, model.profile["min"], model.profile["max"], model.stride,
                       what="--resize" if args.resize else str(video.path))
            writer = _writers([video], [size], [(out_video, out_json)], model.class_names,
                              args, model.kind)[0]
            bar = _progress([video], args.max_frames, args.quiet)
            try:
                summary = stream_frames(stream, _frames(video, size, args.max_frames),
                                        _sink(writer, bar, [0]))
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
        finally:
            stream.close()
        summary.update({
            "server": stream.url, "model": model.name, "task": model.kind,
            "schedule_name": model.schedule,
            "key_interval": None if model.schedule == "per-frame" else model.key_interval,
            "per_class": _per_class(model.kind, writer), "video": video_record(video, size),
            "outputs": _paths_record(out_video, out_json)
            | {"summary": str(summary_path) if summary_path else None}})
    _commit([writer], [p for p in (out_video, out_json) if p is not None], summary_path,
            summary)
    warn_truncated(video)
    for line in format_remote(summary):
        print(line)
    _say_written((out_video, out_json), summary_path, default, summary["frames"])
    return 0


def _check_schedule(args: argparse.Namespace, model: Any, where: str) -> None:
    """--schedule and -k, when given, must be what the served model runs."""
    for flag, value, served in (("--schedule", args.schedule, model.schedule),
                                ("--key-interval", args.key_interval, model.key_interval)):
        if value is not None and value != served:
            raise RemoteError(f"{flag} {value}: {where} runs the {model.schedule} schedule "
                              f"with key interval {model.key_interval}; drop {flag}, or serve "
                              f"a model with it (dff-serve repo {flag} {value})")


# --- the human summaries --------------------------------------------------------------------

def _detections_line(per_class: dict) -> list[str]:
    if per_class.get("unit") != "detections":
        return []
    counts = per_class["counts"]
    return [(f"  detections scoring >= {per_class['min_score']:g}: {sum(counts.values())}"
            f" ({', '.join(f'{n} {c}' for n, c in counts.items()) or 'no classes'})")]


def _reasons(schedule: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in schedule["reasons"].items() if v) or "none"


def format_summary(s: dict) -> list[str]:
    """One video: frames, key frames and why, fps, median ms per stage, efficiency."""
    video = s["video"]
    h, w = video["resized_to"] or video["size"]
    lines = [(f"{video['path']}: {s['frames']} frames at {h}x{w} on {backend_label(s)}, "
             f"{schedule_label(s)}")]
    if video["resized_to"]:
        lines.append(f"  resized from {video['size'][0]}x{video['size'][1]} to {h}x{w} "
                     "(--resize)")
    lines.append(f"  key frames: {s['key_frames']} of {s['frames']} ({_reasons(s['schedule'])})")
    lines.append(f"  speed: {s['fps']:.1f} fps ({s['wall_s']:.2f} s wall); runtime efficiency "
                 f"{s['efficiency']:.2f} (stage medians x counts / wall)")
    stages = s["stages"]
    main = [f"{n} {1000 * stages[n]['median_s']:.2f} (x{stages[n]['count']})"
            for n in SHOWN_STAGES if stages[n]["count"]]
    rest = [f"{n} {1000 * stages[n]['median_s']:.2f}"
            for n in ("upload", "schedule", "decode") if stages[n]["count"]]
    lines.append(f"  median ms per stage: {', '.join(main)}; {', '.join(rest)}")
    return lines + _detections_line(s.get("per_class") or {})


def format_streams(s: dict) -> list[str]:
    """Several videos: per stream frames and key frames, then the total fps."""
    batch = f"batches of at most {s['max_batch']}" if s["max_batch"] else "batches of any size"
    lines = [f"{s['streams']} streams on {backend_label(s)}, {schedule_label(s)}, {batch}"]
    for entry in s["per_stream"]:
        video = entry["video"]
        h, w = video["resized_to"] or video["size"]
        lines.append(f"  {video['path']}: {entry['frames']} frames at {h}x{w}, key frames "
                     f"{entry['key_frames']} ({_reasons(entry['schedule'])}) -> "
                     f"{entry['outputs']['video']}, {entry['outputs']['jsonl']}")
    stages = s["stages"]
    batches = ", ".join(f"{n} {stages[n]['batch']:.1f}" for n in SHOWN_STAGES
                        if stages[n]["calls"])
    lines.append(f"  total: {s['frames']} frames in {s['wall_s']:.2f} s: {s['fps']:.1f} fps "
                 f"({s['fps_per_stream']:.1f} per stream); frames per call: {batches}")
    return lines


def format_remote(s: dict) -> list[str]:
    """A --server run."""
    video, ms = s["video"], s["request_ms"]
    h, w = video["resized_to"] or video["size"]
    k = f", key interval {s['key_interval']}" if s["key_interval"] else ""
    new = "".join(f"; frame {r['frame']} started a new one" for r in s["restarts"])
    lines = [(f"{video['path']}: {s['frames']} frames at {h}x{w} on {s['model']} at "
              f"{s['server']}, {s['schedule_name']}{k}")]
    lines.append(f"  key frames: {s['key_frames']} of {s['frames']}; sequences: "
                 f"{len(s['sequence_ids'])}{new}")
    lines.append(f"  speed: {s['fps']:.1f} fps ({s['wall_s']:.2f} s wall); request "
                 f"{ms['mean']:.2f} ms mean, {ms['max']:.2f} ms max")
    return lines + _detections_line(s["per_class"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(demo_video_first(sys.argv[1:] if argv is None else argv))
    check_backend_args(parser, args)
    check_args(parser, args)
    if not args.verbose:  # FFmpeg's own log lines ("moov atom not found") would precede ours
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    return guarded("dff-run", args.verbose, lambda: run(args, parser))


if __name__ == "__main__":
    sys.exit(main())
