"""`dff-run VIDEO --server HOST:PORT`: the video through a Triton server's DFF model
(runtime/remote.py), into the outputs a local run writes, through the same ResultWriter: the
annotated video, --json JSON Lines (equal to a local run's but for the times: `request` and
`decode` ms here) and --summary.

No engine folder: the served model's config gives the task, classes, profile and schedule
(--schedule and -k, if given, must match it). Video and output paths are checked before the
server is asked; outputs appear only when the whole run succeeded. A run that fails or is
interrupted leaves its sequence on the server until the server's idle timeout frees it.
"""

from __future__ import annotations

import argparse

from dff.runtime.cli import MIN_SCORE, TASK_OPTIONS, _frames, _ms, _outputs, _progress
from dff.runtime.loop import FrameResult
from dff.runtime.remote import (
    RemoteError,
    RemoteStream,
    ServedModel,
    parse_address,
    stream_frames,
)
from dff.runtime.video import check_size, open_video
from dff.runtime.writers import ResultWriter, write_summary

from dff.commands.common import outputs_record, video_record, warn_truncated
from dff.tasks import DETECTION

# --- the run ----------------------------------------------------------------------------------

def run_remote(args: argparse.Namespace) -> int:
    """dff-run's body for --server."""
    address = parse_address(args.server)
    with open_video(args.video[0]) as video:
        out_video, out_json, out_summary, default = _outputs(args, video.path, None)
        stream = RemoteStream(address, args.server_model, sequence_id=args.sequence_id,
                              timeout=args.server_timeout)
        try:
            model = stream.connect()
            summary, writer, size = _run(args, stream, model, video, out_video, out_json)
        finally:
            stream.close()
        summary.update({
            "server": stream.url, "model": model.name, "task": model.kind,
            "schedule_name": model.schedule,
            "key_interval": None if model.schedule == "per-frame" else model.key_interval,
            "per_class": {"unit": "detections" if model.kind == DETECTION else "pixels",
                          "min_score": writer.min_score if model.kind == DETECTION else None,
                          "counts": writer.class_counts()},
            "video": video_record(video, size),
            "outputs": outputs_record(out_video, out_json, out_summary)})
    if out_summary is not None:
        try:
            write_summary(out_summary, summary)
        except BaseException:
            for path in (out_video, out_json):  # all or nothing
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
    warn_truncated(video)
    for line in format_remote(summary):
        print(line)
    if out_video is not None:
        how = " (the default: neither --output nor --json given)" if default else ""
        print(f"wrote {out_video.resolve() if default else out_video}: annotated video{how}")
    if out_json is not None:
        print(f"wrote {out_json}: {summary['frames']} JSON records, one per frame")
    if out_summary is not None:
        print(f"wrote {out_summary}: run summary")
    return 0


def _run(args: argparse.Namespace, stream: RemoteStream, model: ServedModel, video, out_video,
         out_json) -> tuple[dict, ResultWriter, tuple[int, int]]:
    """Check the options and the frame size against the served model, then stream."""
    where = f"model {model.name!r} on {stream.url}"
    for name, (task, does) in TASK_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(args, name, None) is not None and model.kind != task:
            raise RemoteError(f"{flag}: {where} serves a {model.kind} model, and {flag} "
                              f"{does}; drop {flag}")
    _check_schedule(args, model, where)
    size = args.resize or video.size
    check_size(*size, model.profile["min"], model.profile["max"], model.stride,
               what="--resize" if args.resize else str(video.path))
    total = video.frame_count
    if args.max_frames is not None:
        total = min(total, args.max_frames) if total else args.max_frames
    bar = _progress(total, args.quiet)

    def sink(result: FrameResult) -> None:
        writer.write(result.index, result.frame, result.outputs, result.is_key,
                     _ms(result.times))
        bar.update(1)

    try:
        with ResultWriter(out_video, out_json, video.fps, size, model.class_names,
                          0.5 if args.alpha is None else args.alpha, task=model.kind,
                          min_score=MIN_SCORE if args.min_score is None else args.min_score
                          ) as writer:
            summary = stream_frames(stream, _frames(video, size, args.max_frames), sink)
    finally:
        bar.close()
    return summary, writer, size


def _check_schedule(args: argparse.Namespace, model: ServedModel, where: str) -> None:
    """--schedule and -k, when given, must be what the served model runs."""
    asked = [(flag, value, served) for flag, value, served in (
        ("--schedule", args.schedule, model.schedule),
        ("--key-interval", args.key_interval, model.key_interval)) if value is not None]
    for flag, value, served in asked:
        if value != served:
            raise RemoteError(f"{flag} {value}: {where} runs the {model.schedule} schedule "
                              f"with key interval {model.key_interval}; drop {flag}, or serve "
                              f"a model with it (dff-serve repo {flag} {value})")


def format_remote(s: dict) -> list[str]:
    """The human summary of a --server run."""
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
    per_class = s["per_class"]
    if per_class["unit"] == "detections":
        counts = per_class["counts"]
        lines.append(f"  detections scoring >= {per_class['min_score']:g}: {sum(counts.values())}"
                     f" ({', '.join(f'{n} {c}' for n, c in counts.items()) or 'no classes'})")
    return lines
