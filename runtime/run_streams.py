"""`dff-run VIDEO... --output-dir DIR`: the videos as batched streams (runtime/streams.py).

Writes DIR/<name>.dff.mp4 and DIR/<name>.jsonl per video (<name>: the file name without its
extension) and DIR/summary.json. Everything is checked before the first frame (every video,
its size, the output names, the folder); outputs are staged, and appear only when the whole run
succeeded: a failure or Ctrl-C leaves none of them.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from dff.runtime.backends import check_quality, task_spec
from dff.runtime.cli import MIN_SCORE, _frames, _ms, _progress
from dff.runtime.loop import FrameResult, StreamPipeline
from dff.runtime.scheduler import make_schedulers
from dff.runtime.video import check_size, open_video
from dff.runtime.writers import ResultWriter, write_summary

from dff.commands.common import (
    Log,
    backend_label,
    choose_backend,
    schedule_label,
    video_record,
    warn_truncated,
)
from dff.errors import DffError
from dff.tasks import DETECTION

SUMMARY = "summary.json"


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


def _targets(paths: list[Path], out_dir: Path) -> tuple[list[tuple[Path, Path]], Path]:
    """(video, jsonl) per stream and the summary path, none of them an input video."""
    if not out_dir.is_dir():
        what = "is a file, not a folder" if out_dir.exists() else "does not exist"
        raise DffError(f"{out_dir}: --output-dir {what}; create the folder first")
    names = stream_names(paths, out_dir)
    outputs = [(out_dir / f"{n}.dff.mp4", out_dir / f"{n}.jsonl") for n in names]
    summary = out_dir / SUMMARY
    inputs = {p.resolve(): p for p in paths}
    for target in (*(t for pair in outputs for t in pair), summary):
        if target.resolve() in inputs:
            raise DffError(f"{target}: an output of --output-dir is the input video "
                           f"{inputs[target.resolve()]}; pick another --output-dir")
    return outputs, summary


def run_streams(args: argparse.Namespace, engine_dir: Path, manifest: dict, paths: list[Path],
                say: Log) -> int:
    with contextlib.ExitStack() as stack:
        videos = []
        for path in paths:
            videos.append(open_video(path))
            stack.callback(videos[-1].close)
        return _run(args, engine_dir, manifest, videos, say)


def _run(args: argparse.Namespace, engine_dir: Path, manifest: dict, videos: list[Any],
         say: Log) -> int:
    profile, stride = manifest["profile"], int(manifest["stride"])
    sizes = []
    for video in videos:
        if args.resize:
            check_size(*args.resize, profile["min"], profile["max"], stride, what="--resize")
        else:
            check_size(video.height, video.width, profile["min"], profile["max"], stride,
                       what=str(video.path))
        sizes.append(args.resize or video.size)
    out_dir = Path(args.output_dir)
    outputs, summary_path = _targets([v.path for v in videos], out_dir)
    kind = task_spec(manifest)["kind"]
    min_score = MIN_SCORE if args.min_score is None else args.min_score
    key_interval = args.key_interval or int(manifest["key_interval"])
    schedulers = make_schedulers(len(videos), args.schedule, key_interval, stride=stride,
                                 key_budget=args.key_budget)
    backend, reason = choose_backend(args, engine_dir, say)
    writers: list[ResultWriter] = []
    try:
        check_quality(backend, schedulers, args.checkpoint or str(engine_dir))
        runtime = StreamPipeline(backend, schedulers, max_batch=args.max_batch)
        counts = [v.frame_count for v in videos]
        total = None
        if all(c is not None for c in counts):
            total = sum(min(c, args.max_frames) if args.max_frames else c for c in counts)
        bar = _progress(total, args.quiet)
        try:
            for video, size, (out_video, out_json) in zip(videos, sizes, outputs):
                writers.append(ResultWriter(out_video, out_json, video.fps, size,
                                            manifest["class_names"],
                                            0.5 if args.alpha is None else args.alpha,
                                            task=kind, min_score=min_score))
            summary = runtime.run_to([_frames(v, s, args.max_frames) for v, s in
                                      zip(videos, sizes)],
                                     [_sink(w, bar) for w in writers],
                                     [str(v.path) for v in videos])
        finally:
            bar.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        backend.close()
    _describe(summary, args, reason, engine_dir, videos, sizes, writers, outputs, summary_path,
              kind, min_score, key_interval)
    summary["int8_check"] = getattr(backend, "int8_check", None)
    _commit(writers, outputs, summary_path, summary)
    for video in videos:
        warn_truncated(video)
    for line in format_streams(summary):
        print(line)
    print(f"wrote {len(videos)} annotated videos and JSON Lines files and {summary_path} "
          f"into {out_dir}")
    return 0


def _sink(writer: ResultWriter, bar: Any) -> Any:
    def sink(result: FrameResult) -> None:
        writer.write(result.index, result.frame, result.outputs, result.is_key,
                     _ms(result.times))
        bar.update(1)
    return sink


def _commit(writers: list[ResultWriter], outputs: list[tuple[Path, Path]], summary_path: Path,
            summary: dict) -> None:
    """Every writer's files into place, then the summary; on a failure none of them stays."""
    done: list[Path] = []
    try:
        for writer, pair in zip(writers, outputs):
            writer.close()
            done.extend(pair)
        write_summary(summary_path, summary)
    except BaseException:
        for writer in writers:
            writer.abort()
        for path in done:
            path.unlink(missing_ok=True)
        raise


def _describe(summary: dict, args: argparse.Namespace, reason: str | None, engine_dir: Path,
              videos: list[Any], sizes: list[tuple[int, int]], writers: list[ResultWriter],
              outputs: list[tuple[Path, Path]], summary_path: Path, kind: str,
              min_score: float, key_interval: int) -> None:
    """Add what dff-run's one-video summary says to the batched runtime's, per stream."""
    summary.update({
        "task": kind, "backend_reason": reason,
        "schedule_name": args.schedule,
        "key_interval": None if args.schedule == "per-frame" else key_interval,
        "key_budget": args.key_budget,
        "engine_dir": str(engine_dir), "summary": str(summary_path)})
    for entry, video, size, writer, (out_video, out_json) in zip(
            summary["per_stream"], videos, sizes, writers, outputs):
        entry.update({
            "video": video_record(video, size),
            "outputs": {"video": str(out_video), "jsonl": str(out_json)},
            "per_class": {"unit": "detections" if kind == DETECTION else "pixels",
                          "min_score": min_score if kind == DETECTION else None,
                          "counts": writer.class_counts()}})


def format_streams(s: dict) -> list[str]:
    """The human summary: per stream frames and key frames, then the total fps."""
    schedule = schedule_label(s)
    batch = f"batches of at most {s['max_batch']}" if s["max_batch"] else "batches of any size"
    lines = [f"{s['streams']} streams on {backend_label(s)}, {schedule}, {batch}"]
    for entry in s["per_stream"]:
        video = entry["video"]
        h, w = video["resized_to"] or video["size"]
        reasons = ", ".join(f"{k} {v}" for k, v in entry["schedule"]["reasons"].items() if v)
        lines.append(f"  {video['path']}: {entry['frames']} frames at {h}x{w}, key frames "
                     f"{entry['key_frames']} ({reasons or 'none'}) -> {entry['outputs']['video']},"
                     f" {entry['outputs']['jsonl']}")
    stages = s["stages"]
    batches = ", ".join(f"{n} {stages[n]['batch']:.1f}" for n in ("feature", "flow", "task")
                        if stages[n]["calls"])
    lines.append(f"  total: {s['frames']} frames in {s['wall_s']:.2f} s: {s['fps']:.1f} fps "
                 f"({s['fps_per_stream']:.1f} per stream); frames per call: {batches}")
    return lines

