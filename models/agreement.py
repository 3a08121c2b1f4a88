"""How close DFF's propagated frames come to per-frame inference, on real video (issue 22;
DESIGN.md §15).

Real footage has no labels, so the export's own per-frame output is the reference: every frame
of each video runs as a key frame (per-frame inference), then each mode runs the same frames
at each key interval k, and every non-key frame (the propagated ones; key frames are the
reference itself) is scored against the per-frame output of that frame:

- segmentation: mIoU of the propagated labels against the per-frame labels, one confusion
  matrix pooled over all non-key frames (of all videos for the totals), classes the manifest's
  `class_names`, a class absent from both left out of the mean;
- detection: AP@[.5:.95] and AP@0.5 (pycocotools, dff.models.metrics) with the per-frame
  detections scoring above the export's `task.score_threshold` as ground truth; the propagated
  detections are scored as they come (all `num` rows with their scores, no threshold);
- raw (a task whose outputs are the model's own tensors): the relative error of each output,
  sqrt(Σ(out − ref)²) / sqrt(Σref²) pooled over the frames, and their mean;
- every task: the relative error of the propagated features against the per-frame features,
  pooled the same way (a diagnostic: 0 is per-frame's features exactly).

Modes: `dff` (the export's learned flow graph), `dff-dis` (OpenCV DIS on the host + the warp
graph, runtime/flows.py) and `copy` (the naive baseline: the key frame's features as they
are), all through the runtime's one step (runtime/step.py) on any backend, a frame at a time.

The runs are interleaved: each frame is decoded (and resized) once, timed, then stepped by
per-frame inference and by every mode at every k, each a stream of its own, and scored; so no
frame is kept, and a shared machine's changing load falls on every mode alike. Timing: a
mode's ms per frame is the decode time plus the wall time of its own Step calls, over the
frames (per-frame's likewise): decode counted once per frame for each mode, as a run of that
mode alone would pay it. Metrics and the reference's copies are outside the timed spans; the
copy of each frame's features to the host inside the step (Step's `features=True`, in every
mode and in per-frame alike) is in them: a no-op on the CPU backends, one device-to-host copy
a frame on a GPU. Every Step first runs untimed on copies of the first frame of each new frame
size (one-time costs: sessions, allocations).

Needs numpy and the runtime's backend; pycocotools only for detection, imported when scored.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dff.export.manifest import DIS, LEARNED, flow_sources
from dff.runtime.backends import Backend, task_spec
from dff.runtime.flows import DisFlow, FlowError, dis_flow
from dff.runtime.scheduler import FixedInterval
from dff.runtime.step import Frame, Step, StreamState
from dff.runtime.video import check_size, fit_frame, open_video

from dff.errors import DffError
from dff.tasks import DETECTION, SEGMENTATION

DFF, DFF_DIS, COPY = "dff", "dff-dis", "copy"
MODES = (DFF, DFF_DIS, COPY)
PER_FRAME = "per-frame"
RAW = "raw"  # a task kind whose outputs are the model's own tensors
DEFAULT_INTERVALS = (5, 10)
WARMUP_FRAMES = 3


@dataclass
class Clip:
    """One video being scored: its name, file, size (after --resize) and size in the file,
    and, once stepped, its frames, the seconds its decoding (and resizing) took and whether
    decoding stopped early."""

    name: str
    path: Path
    size: tuple[int, int]
    source_size: tuple[int, int]
    video: Any = None
    frames: int = 0
    decode_s: float = 0.0
    truncated: bool = False

    def read(self, max_frames: int | None) -> Iterator[np.ndarray]:
        """The frames (the first `max_frames`), resized; each one's decode time added to
        `decode_s`, the opening (which decodes the first frame) to the first."""
        it = itertools.islice(iter(self.video), max_frames)
        try:
            while True:
                start = time.perf_counter()
                try:
                    frame = fit_frame(next(it), self.size)
                except StopIteration:
                    break
                self.decode_s += time.perf_counter() - start
                self.frames += 1
                yield frame
        finally:
            self.video.close()
            self.truncated = bool(self.video.truncated)


def open_clip(path: str | Path, size: tuple[int, int] | None, manifest: dict,
              name: str | None = None) -> Clip:
    """Open a video (its first frame decoded, timed) at `size` (None: its own); refuses a size
    the export cannot take (check_size: multiples of the stride, within the profile), naming
    --resize."""
    profile, stride = manifest["profile"], int(manifest["stride"])
    start = time.perf_counter()
    video = open_video(path)
    opened = time.perf_counter() - start
    h, w = size or video.size
    try:
        check_size(h, w, profile["min"], profile["max"], stride,
                   what="--resize" if size else str(video.path))
    except DffError:
        video.close()
        raise
    return Clip(name or video.path.name, video.path, (h, w), video.size, video, decode_s=opened)


def _rel(err2: float, ref2: float) -> float | None:
    """sqrt(err2 / ref2), rounded; 0 where both are 0, None where only the reference is."""
    if ref2 <= 0:
        return 0.0 if err2 <= 0 else None
    return round(math.sqrt(err2 / ref2), 6)


@dataclass
class Tally:
    """One run's (a mode at a k, on a clip or on all clips) scores, added a frame at a time."""

    kind: str
    class_names: Sequence[str]
    score_threshold: float = 0.0
    max_dets: int = 100
    frames: int = 0
    conf: np.ndarray | None = None
    found: list = field(default_factory=list)  # detection: (gt, det) per frame
    out_err2: dict[str, float] = field(default_factory=dict)
    out_ref2: dict[str, float] = field(default_factory=dict)
    feat_err2: float = 0.0
    feat_ref2: float = 0.0

    def add(self, out: dict[str, np.ndarray], ref: dict[str, np.ndarray],
            feat: np.ndarray | None, ref_feat: np.ndarray | None) -> None:
        self.frames += 1
        if self.kind == SEGMENTATION:
            k = len(self.class_names)
            if self.conf is None:
                self.conf = np.zeros((k, k), np.int64)
            self.conf += np.bincount(ref["labels"].ravel().astype(np.int64) * k
                                     + out["labels"].ravel().astype(np.int64),
                                     minlength=k * k).reshape(k, k)
        elif self.kind == DETECTION:
            if "ignore" in ref:  # ground truth itself (dff-tune --split): boxes, classes, ignore
                gt = ref
            else:
                keep = np.asarray(ref["scores"]).reshape(-1) > self.score_threshold
                gt = {"boxes": np.asarray(ref["boxes"]).reshape(-1, 4)[keep],
                      "classes": np.asarray(ref["classes"]).reshape(-1)[keep],
                      "ignore": np.zeros(int(keep.sum()), bool)}
            det = {"boxes": out["boxes"], "scores": out["scores"], "classes": out["classes"]}
            self.found.append((gt, det))
        else:  # raw, or any other kind: each output's error
            for name, value in ref.items():
                r = np.asarray(value, np.float64)
                o = np.asarray(out[name], np.float64)
                self.out_err2[name] = self.out_err2.get(name, 0.0) + float(((o - r) ** 2).sum())
                self.out_ref2[name] = self.out_ref2.get(name, 0.0) + float((r ** 2).sum())
        if feat is not None and ref_feat is not None:
            r = ref_feat.astype(np.float64)
            self.feat_err2 += float(((feat.astype(np.float64) - r) ** 2).sum())
            self.feat_ref2 += float((r ** 2).sum())

    def result(self) -> dict[str, Any]:
        """{agreement (and agreement50 for detection; output_error and output_errors for
        raw), feature_error, frames}; a score without frames to score is None."""
        res: dict[str, Any] = {}
        if self.kind == SEGMENTATION:
            res["agreement"] = (None if self.conf is None or not self.conf.any()
                                else round(_miou(self.conf), 6))
        elif self.kind == DETECTION:
            res["agreement"] = res["agreement50"] = None
            if self.found and any(len(g["boxes"]) for g, _ in self.found):
                from dff.models.metrics import detection_ap

                ap = detection_ap(self.found, list(self.class_names), self.max_dets)
                res["agreement"], res["agreement50"] = ap["map"], ap["map50"]
        else:
            errors = {name: _rel(self.out_err2[name], self.out_ref2[name])
                      for name in self.out_err2}
            known = [e for e in errors.values() if e is not None]
            res["output_error"] = round(float(np.mean(known)), 6) if known else None
            res["output_errors"] = errors
        res["feature_error"] = _rel(self.feat_err2, self.feat_ref2) if self.frames else None
        res["frames"] = self.frames
        return res


def tally_for(manifest: dict) -> Tally:
    """An empty Tally for the export's task: its kind, class names, score threshold and rows."""
    task = task_spec(manifest)
    return Tally(task["kind"], manifest["class_names"], float(task.get("score_threshold", 0.0)),
                 int(task.get("max_detections", 100)))


def _miou(conf: np.ndarray) -> float:
    from dff.models.metrics import miou

    return miou(conf)


@dataclass
class Run:
    """A mode at a key interval: how its Step is made."""

    mode: str
    k: int

    def step(self, backend: Backend, preset: str, scale: float) -> Step:
        flow = DisFlow(preset, scale) if self.mode == DFF_DIS else None
        return Step(backend, max_batch=1, copy=self.mode == COPY, flow=flow, features=True)


def available_modes(manifest: dict, backend: Backend) -> list[str]:
    """The modes this export and backend can run: dff where both have the learned flow,
    dff-dis where both have the warp graph, copy always."""
    have = set(flow_sources(manifest)) & set(backend.flow_sources)
    return [m for m in MODES
            if m == COPY or (m == DFF and LEARNED in have) or (m == DFF_DIS and DIS in have)]


def check_modes(modes: Sequence[str], manifest: dict, backend: Backend, where: str) -> None:
    """Refuse a mode the export or the backend cannot run, naming why."""
    have = available_modes(manifest, backend)
    for m in modes:
        if m not in MODES:
            raise DffError(f"--modes {m!r}: choose among {', '.join(MODES)}")
        if m not in have:
            source = LEARNED if m == DFF else DIS
            raise FlowError(f"mode {m} needs the {source} flow source, but {where} (with this "
                            f"backend) runs {', '.join(have)}")


def _copy(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in outputs.items()}


def _clip_runs(backend: Backend, clip: Clip, max_frames: int | None, runs: list[Run],
               tallies: list[dict[tuple[str, int], Tally]], bar: Any, preset: str,
               scale: float, warm: bool) -> tuple[float, dict[tuple[str, int], float]]:
    """Per-frame inference (the reference) and every run on a clip's frames, interleaved: each
    frame is decoded once, stepped per-frame, then by each run (a stream of its own), so the
    load of a shared machine falls on all of them alike and no frame is kept. A run's non-key
    frames are scored into each of `tallies`. With `warm`, every Step runs first, untimed, on
    the first frame (one-time costs: sessions, allocations). Returns the seconds of per-frame's
    Step calls and of each run's."""
    ref_step = Step(backend, max_batch=1, features=True)
    steps = [(r, r.step(backend, preset, scale)) for r in runs]
    ref_stream = StreamState(FixedInterval(1), name=clip.name)
    streams = [StreamState(FixedInterval(r.k), name=clip.name) for r in runs]
    ref_s, run_s = 0.0, {(r.mode, r.k): 0.0 for r in runs}
    try:
        for t, image in enumerate(clip.read(max_frames)):
            if t == 0 and warm:
                _warm(backend, image, [ref_step, *(s for _, s in steps)],
                      [1, *(r.k for r in runs)])
            frame = Frame(ref_stream, t, image)
            start = time.perf_counter()
            ref_step([frame])
            ref_s += time.perf_counter() - start
            ref, ref_feat = _copy(frame.outputs()), _features(frame)
            for (r, step), stream in zip(steps, streams):
                frame = Frame(stream, t, image)
                start = time.perf_counter()
                step([frame])
                run_s[(r.mode, r.k)] += time.perf_counter() - start
                if not frame.is_key:
                    out, feat = frame.outputs(), frame.features
                    for tally in tallies:
                        tally[(r.mode, r.k)].add(out, ref, feat, ref_feat)
            if bar is not None:
                bar.update(1 + len(runs))
    finally:
        for stream in [ref_stream, *streams]:
            stream.release()
    return ref_s, run_s


def _warm(backend: Backend, image: np.ndarray, steps: list[Step], ks: list[int]) -> None:
    """Each step on a few copies of `image` (a key frame, then non-key ones; k = 1, the
    reference: key frames only), untimed."""
    for step, k in zip(steps, ks):
        stream = StreamState(FixedInterval(1 if k == 1 else max(2, min(k, WARMUP_FRAMES))))
        for t in range(WARMUP_FRAMES):
            step([Frame(stream, t, image)])
        stream.release()


def _features(frame: Frame) -> np.ndarray | None:
    return None if frame.features is None else np.array(frame.features)


def evaluate_agreement(backend: Backend, manifest: dict, videos: Sequence[str | Path],
                       intervals: Sequence[int] = DEFAULT_INTERVALS, *,
                       size: tuple[int, int] | None = None, max_frames: int | None = None,
                       modes: Sequence[str] | None = None, dis_preset: str | None = None,
                       dis_scale: float | None = None, progress: bool = True,
                       where: str = "the export") -> dict[str, Any]:
    """The agreement of each mode at each k with per-frame inference on `videos` (module
    docstring); the dict dff-eval --video writes (see `format_agreement` for a table)."""
    kind = task_spec(manifest)["kind"]
    if not videos:
        raise DffError("no videos to evaluate; pass --video FILE")
    intervals = [int(k) for k in intervals]
    bad = [k for k in intervals if k < 2]
    if bad or not intervals:
        raise DffError(f"--intervals {','.join(map(str, intervals))}: every k must be at least "
                       "2 (k=1 is per-frame inference, the reference itself), e.g. 5,10")
    modes = list(modes) if modes else available_modes(manifest, backend)
    check_modes(modes, manifest, backend, where)
    if DFF_DIS in modes:  # the export's recorded settings where not given; bad ones refused
        dis = dis_flow(manifest, dis_preset, dis_scale)  # before any decoding
        dis_preset, dis_scale = dis.preset, dis.scale

    runs = [Run(m, k) for m in modes for k in intervals]
    pooled = {(r.mode, r.k): tally_for(manifest) for r in runs}
    seconds: dict[Any, float] = {PER_FRAME: 0.0, **{(r.mode, r.k): 0.0 for r in runs}}
    decode_s, total = 0.0, 0
    clips: dict[str, dict[str, Any]] = {}
    names = _names(videos)
    for path in videos:  # every video readable and of a size the export takes, before any work
        open_clip(path, size, manifest).video.close()
    bar = progress_bar(progress)
    warmed: set[tuple[int, int]] = set()
    for path, name in zip(videos, names):
        clip = open_clip(path, size, manifest, name)
        if bar is not None:
            count = clip.video.frame_count
            if count and bar.total is not None:
                bar.total += min(count, max_frames or count) * (1 + len(runs))
                bar.refresh()
            else:
                bar.total = None
        mine = {(r.mode, r.k): tally_for(manifest) for r in runs}
        ref_s, run_s = _clip_runs(backend, clip, max_frames, runs, [mine, pooled], bar,
                                  dis_preset, dis_scale, clip.size not in warmed)
        warmed.add(clip.size)
        n = clip.frames
        seconds[PER_FRAME] += ref_s
        for key, s in run_s.items():
            seconds[key] += s
        decode_s += clip.decode_s
        total += n
        ms = {PER_FRAME: ms_per_frame(clip.decode_s + ref_s, n)}
        ms.update({key: ms_per_frame(clip.decode_s + s, n) for key, s in run_s.items()})
        clips[clip.name] = {"path": str(clip.path), "frames": n, "size": list(clip.size),
                            "source_size": list(clip.source_size), "truncated": clip.truncated,
                            "decode_ms_per_frame": ms_per_frame(clip.decode_s, n),
                            **_layout(kind, runs, {key: t.result() for key, t in mine.items()},
                                      ms)}
    if bar is not None:
        bar.close()
    ms = {PER_FRAME: ms_per_frame(decode_s + seconds[PER_FRAME], total)}
    ms.update({(r.mode, r.k): ms_per_frame(decode_s + seconds[(r.mode, r.k)], total)
               for r in runs})
    flow: dict[str, Any] = {}
    if DFF in modes:
        flow[DFF] = {"source": LEARNED}
    if DFF_DIS in modes:
        flow[DFF_DIS] = DisFlow(dis_preset, dis_scale).settings()
    return {"task": kind, "metric": METRIC.get(kind, METRIC[RAW]), "modes": modes,
            "intervals": intervals, "videos": [str(p) for p in videos],
            "frames": {c: v["frames"] for c, v in clips.items()},
            "size": {c: v["size"] for c, v in clips.items()},
            "source_size": {c: v["source_size"] for c, v in clips.items()},
            "total_frames": total, "decode_ms_per_frame": ms_per_frame(decode_s, total),
            "flow": flow,
            **_layout(kind, runs, {key: t.result() for key, t in pooled.items()}, ms),
            "clips": clips}


METRIC = {
    SEGMENTATION: "agreement: mIoU of the propagated labels against the per-frame labels",
    DETECTION: "agreement: AP@[.5:.95] (agreement50: AP@0.5), pycocotools, against the "
               "per-frame detections above task.score_threshold",
    RAW: "output_error: sqrt(sum (out - ref)^2) / sqrt(sum ref^2) per output, pooled over "
         "frames; output_error the mean over outputs",
}


def ms_per_frame(seconds: float, frames: int) -> float | None:
    """Milliseconds a frame, rounded to the microsecond; None for no frames."""
    return round(1000 * seconds / frames, 3) if frames else None


def _layout(kind: str, runs: list[Run], results: dict[tuple[str, int], dict],
            ms: dict) -> dict[str, Any]:
    """results[(mode, k)] -> {field: {mode: {"k": value}}}, with ms_per_frame (per-frame's
    beside the modes') and scored_frames."""
    fields = (["agreement", "agreement50"] if kind == DETECTION
              else ["agreement"] if kind == SEGMENTATION else ["output_error", "output_errors"])
    out: dict[str, Any] = {f: {} for f in [*fields, "feature_error", "scored_frames"]}
    out["ms_per_frame"] = {PER_FRAME: ms[PER_FRAME]}
    for r in runs:
        res, k = results[(r.mode, r.k)], str(r.k)
        for f in fields + ["feature_error"]:
            out[f].setdefault(r.mode, {})[k] = res[f]
        out["scored_frames"].setdefault(r.mode, {})[k] = res["frames"]
        out["ms_per_frame"].setdefault(r.mode, {})[k] = ms[(r.mode, r.k)]
    return out


def _names(videos: Sequence[str | Path]) -> list[str]:
    """Each video's name in `clips`: its file name, or its path where two share one."""
    base = [Path(v).name for v in videos]
    return [Path(v).name if base.count(Path(v).name) == 1 else str(v) for v in videos]


def progress_bar(progress: bool) -> Any:
    """A tqdm bar counting frames (its total grows as clips open), or None: no progress
    wanted, or no tqdm installed."""
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=0, unit="frame", dynamic_ncols=True, leave=False)


def format_agreement(res: dict) -> str:
    """The table: per mode and k, the agreement (or output error), the feature error, ms per
    frame and the speedup over per-frame (decode included in both)."""
    kind = res["task"]
    head: tuple[str, ...]
    cols: tuple[str, ...]
    if kind == DETECTION:
        head, cols = ("AP", "AP@0.5"), ("agreement", "agreement50")
    elif kind == SEGMENTATION:
        head, cols = ("mIoU",), ("agreement",)
    else:
        head, cols = ("out err",), ("output_error",)
    ms = res["ms_per_frame"]
    base = ms[PER_FRAME]

    def num(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    rows = [f"{'mode':<14}" + "".join(f"{h:>9}" for h in head)
            + f"{'feat err':>10}{'ms/frame':>10}{'speedup':>9}",
            f"{PER_FRAME:<14}" + "".join(f"{'(ref)':>9}" for _ in head)
            + f"{0:>10.4f}{num(base, '.2f'):>10}{1:>9.2f}"]
    for mode in res["modes"]:
        for k in map(str, res["intervals"]):
            m = ms[mode][k]
            rows.append(f"{mode + ' k=' + k:<14}"
                        + "".join(f"{num(res[c][mode][k]):>9}" for c in cols)
                        + f"{num(res['feature_error'][mode][k]):>10}{num(m, '.2f'):>10}"
                        + f"{num(base / m if base and m else None, '.2f'):>9}")
    sizes = ", ".join(f"{c} {'x'.join(map(str, s))} ({res['frames'][c]} frames)"
                      for c, s in res["size"].items())
    rows.append(f"{res['metric']}; non-key frames only; {sizes}; ms/frame: decode + step")
    return "\n".join(rows)
