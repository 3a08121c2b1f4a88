"""dff-tune's measurement (issue 24; DESIGN.md §21): every candidate way of running an export
on the user's footage, each timed end to end and scored against per-frame inference, in one
sitting. What to deploy is chosen from these figures by dff.models.frontier.

Candidates (`grid`):
- `dff`: DFF at each k, with each flow source the export and backend have (`learned`, `dis`)
  and each schedule that source supports: fixed; adaptive at a key-frame budget of 1/k;
  learned at 1/k where the flow graph has a `quality` output;
- `copy`: the key frame's features as they are, at each k;
- `per-frame`: every frame a key frame (the reference itself: its agreement is 1);
- `resize`: per-frame inference at about 0.75 and 0.5 of each side (rounded to a multiple of
  the stride, within the export's profile), its outputs resized back (labels nearest
  neighbour, boxes scaled) before they are scored;
- `warp-output` (segmentation) and `track` (detection): outputs carried between key frames at
  each k (runtime/propagate.py).

Footage: videos (their frames decoded and timed), or a synthetic split rendered in memory
(`split_clips`: eval, motion, motion-tuning; no decode time) whose ground truth can replace
per-frame inference as the reference (`labels`: accuracy instead of agreement).

Scoring is dff.models.agreement's Tally (segmentation: mIoU; detection: AP@[.5:.95] by
pycocotools against the per-frame detections above `task.score_threshold`; raw: the output
error, lower is better, so raw tasks are refused here) over **every** frame, key frames
included: that is what a deployment delivers, and it compares schedules whose key frames
differ and candidates that have none.

Timing: each frame is decoded once; per-frame inference (the reference) steps it, then every
candidate steps it, each its own stream and Step (runtime/step.py), so all of them run in one
sitting under the same load. A candidate's ms per frame is the decode time plus the wall time
of its own calls (for resize: both resizes included), over the frames. Every candidate first
runs untimed on copies of the first frame (sessions, allocations). Also measured, outside the
timings: r per flow source (flow + warp + task over feature + task, from the stage medians of
the fixed-schedule run with the largest k) and the footage's motion (the mean length of DIS's
flow between consecutive frames, in pixels).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dff.export.manifest import DIS, LEARNED
from dff.models.agreement import (
    METRIC,
    Clip,
    Tally,
    ms_per_frame,
    open_clip,
    progress_bar,
    tally_for,
)
from dff.runtime.backends import Backend, task_spec
from dff.runtime.flows import DisFlow, dis_flow
from dff.runtime.profile import stage_ratio
from dff.runtime.propagate import TRACK, WARP_OUTPUT, make_propagator
from dff.runtime.scheduler import make_scheduler
from dff.runtime.step import STAGES, Frame, Step, StreamState, Timings
from dff.runtime.video import check_size

from dff.errors import DffError
from dff.tasks import DETECTION, SEGMENTATION

DFF, COPY, RESIZE, PER_FRAME = "dff", "copy", "resize", "per-frame"
KINDS = (DFF, COPY, RESIZE, WARP_OUTPUT, TRACK, PER_FRAME)
INTERVALS = tuple(range(2, 21))
QUICK_INTERVALS = (2, 5, 10, 20)
RESIZE_FACTORS = (0.75, 0.5)
WARMUP_FRAMES = 3
SCHEDULES = ("fixed", "adaptive", "learned")


@dataclass
class Candidate:
    """One way to run the export: its kind, key interval, flow source, schedule and input
    size (None: the footage's)."""

    kind: str
    k: int | None = None
    flow: str | None = None
    schedule: str | None = None
    size: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        parts = [self.kind]
        if self.flow:
            parts.append(self.flow)
        if self.k:
            parts.append(f"k={self.k}")
        if self.schedule and self.schedule not in ("fixed", "per-frame"):
            parts.append(f"[{self.schedule}]")  # the schedule, as its key-frame budget 1/k
        if self.kind == RESIZE and self.size:
            parts.append(f"{self.size[0]}x{self.size[1]}")
        return " ".join(parts)

    def record(self, size: tuple[int, int]) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "flow": self.flow, "schedule": self.schedule,
                "size": list(self.size or size)}


def reduced_sizes(size: tuple[int, int], stride: int, profile: dict,
                  factors: Sequence[float] = RESIZE_FACTORS,
                  takes: Callable[[tuple[int, int]], bool] | None = None
                  ) -> list[tuple[int, int]]:
    """Each factor of each side of `size`, rounded (half up) to a multiple of `stride`, or of
    2, 4, ... 32 times it where `takes` (the graphs run at that size) says the export needs it
    (a model split from an ONNX file may need sides in multiples of 32 at stride 4); kept where
    the profile takes it and it is smaller than `size`; no size twice."""
    lo, out = profile["min"], []
    for f in factors:
        for m in (stride * 2 ** i for i in range(6)):
            h, w = (max(m, int(s * f / m + 0.5) * m) for s in size)
            if lo[1] <= h and lo[2] <= w and (takes is None or takes((h, w))):
                if (h, w) != tuple(size) and (h, w) not in out:
                    out.append((h, w))
                break
    return out


def graph_takes(backend: Backend) -> Callable[[tuple[int, int]], bool]:
    """Whether the export's feature and task graphs run on a frame of a size (a zero frame, once
    per size)."""
    seen: dict[tuple[int, int], bool] = {}

    def takes(size: tuple[int, int]) -> bool:
        if size not in seen:
            try:
                feat = backend.feature(backend.upload(np.zeros((1, 3, *size), np.uint8)))
                backend.task(feat)
                seen[size] = True
            except Exception:  # noqa: BLE001 - whatever the runtime raises: not this size
                seen[size] = False
        return seen[size]

    return takes


def grid(manifest: dict, backend: Backend, size: tuple[int, int],
         intervals: Sequence[int] = INTERVALS,
         takes: Callable[[tuple[int, int]], bool] | None = None) -> list[Candidate]:
    """Every candidate this export and backend can run (module docstring), per-frame first.
    `takes`: graph_takes(backend)'s answers, where the caller already has them."""
    kind = task_spec(manifest)["kind"]
    sources = [s for s in (LEARNED, DIS) if s in backend.flow_sources]
    out = [Candidate(PER_FRAME, schedule="per-frame")]
    out += [Candidate(RESIZE, schedule="per-frame", size=s)
            for s in reduced_sizes(size, int(manifest["stride"]), manifest["profile"],
                                   takes=takes or graph_takes(backend))]
    for source in sources:
        schedules = ["fixed", "adaptive"] + (["learned"] if source == LEARNED
                                             and backend.has_quality else [])
        out += [Candidate(DFF, k, source, s) for s in schedules for k in intervals]
    out += [Candidate(COPY, k, schedule="fixed") for k in intervals]
    carried = {SEGMENTATION: WARP_OUTPUT, DETECTION: TRACK}.get(kind)
    if carried == WARP_OUTPUT and DIS in backend.flow_sources or carried == TRACK:
        out += [Candidate(carried, k, schedule="fixed") for k in intervals]
    return out


class _Runner:
    """A candidate's Step (one for all clips), and its stream and timing on the current clip
    (`start`)."""

    def __init__(self, cand: Candidate, backend: Backend, manifest: dict, dis: DisFlow,
                 stride: int):
        task = task_spec(manifest)
        self.cand, self.name, self.stride = cand, "", stride
        flow = DisFlow(dis.preset, dis.scale) if cand.flow == DIS else None
        propagate = (make_propagator(cand.kind, task["kind"], cand.k or 1,
                                     DisFlow(dis.preset, dis.scale),
                                     float(task.get("score_threshold", 0.0)))
                     if cand.kind in (WARP_OUTPUT, TRACK) else None)
        self.step = Step(backend, max_batch=1, copy=cand.kind == COPY, flow=flow,
                         propagate=propagate)
        self.stream = self._stream()
        self.start(self.name)

    def start(self, name: str) -> None:
        """A fresh stream (its schedule from the start) named `name`, and the times, counts
        and stage calls from zero."""
        self.stream.release()
        self.name = name
        self.stream = self._stream()
        self.seconds, self.frames, self.key_frames = 0.0, 0, 0
        self.step.calls = {stage: Timings() for stage in STAGES}

    def _stream(self) -> StreamState:
        c = self.cand
        k = c.k or 1
        schedule = "per-frame" if c.kind in (PER_FRAME, RESIZE) else c.schedule or "fixed"
        budget = 1 / k if schedule in ("adaptive", "learned") else None
        return StreamState(make_scheduler(schedule, k, self.stride, key_budget=budget),
                           name=self.name)

    def __call__(self, t: int, image: np.ndarray) -> dict[str, np.ndarray]:
        """The candidate's outputs of frame `t` at the footage's size (timed)."""
        start = time.perf_counter()
        size = self.cand.size if self.cand.kind == RESIZE else None
        frame = Frame(self.stream, t, _resize(image, size) if size else image)
        self.step([frame])
        out = frame.outputs()
        if size:
            out = _resize_back(out, size, image.shape[:2])
        self.seconds += time.perf_counter() - start
        self.frames += 1
        self.key_frames += frame.is_key
        return out

    def warm(self, image: np.ndarray) -> None:
        """A few untimed steps on copies of `image`, then `start` again (the medians leave
        them out)."""
        for t in range(WARMUP_FRAMES):
            self(t, image)
        self.start(self.name)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _resize_back(out: dict[str, np.ndarray], small: tuple[int, int],
                 full: tuple[int, int]) -> dict[str, np.ndarray]:
    """Outputs at `small` brought to `full` (H, W): labels nearest neighbour, boxes scaled."""
    import cv2

    res = dict(out)
    if "labels" in out:
        res["labels"] = cv2.resize(out["labels"], (full[1], full[0]),
                                   interpolation=cv2.INTER_NEAREST)
    if "boxes" in out:
        sx, sy = full[1] / small[1], full[0] / small[0]
        res["boxes"] = (np.asarray(out["boxes"], np.float32)
                        * np.array([sx, sy, sx, sy], np.float32))
    return res


@dataclass
class Measured:
    """What one candidate gathered over all clips."""

    tally: Tally
    seconds: float = 0.0
    frames: int = 0
    key_frames: int = 0
    calls: dict[str, Timings] = field(default_factory=dict)


@dataclass
class Rendered:
    """A synthetic clip rendered in memory (Clip's interface: name, path, size, read) and its
    ground truth per frame (segmentation {"labels"}; detection {"boxes", "classes",
    "ignore"})."""

    name: str
    images: np.ndarray
    truth: list[dict[str, np.ndarray]]
    decode_s: float = 0.0
    frames: int = 0

    @property
    def path(self) -> str:
        return self.name

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def read(self, max_frames: int | None):
        for image in self.images[:max_frames]:
            self.frames += 1
            yield image


SPLITS = ("eval", "motion", "motion-tuning")


def split_clips(spec: str, kind: str, size: tuple[int, int] = (128, 224)) -> list[Rendered]:
    """The synthetic clips of `spec`, NAME or NAME:FIRST-LAST (0-based clip numbers, both
    included): eval (dff-eval's 20 clips), motion (dff-eval --split motion's, 8 per category)
    or motion-tuning (its tuning clips, 4 per category); rendered at `size` with the ground
    truth of `kind`."""
    from dff.data.motion import motion_split
    from dff.data.synthetic import EVAL_FRAMES, EVAL_SEEDS, make_clip
    from dff.models.metrics import clip_ground_truth

    name, _, part = spec.partition(":")
    if name not in SPLITS:
        raise DffError(f"--split {spec!r}: choose among {', '.join(SPLITS)}, optionally with "
                       "a range of clips, e.g. eval:0-9")
    count = {"eval": len(EVAL_SEEDS), "motion": 40, "motion-tuning": 20}[name]
    first, last = 0, count - 1
    if part:
        try:
            a, _, b = part.partition("-")
            first, last = int(a), int(b or a)
        except ValueError:
            first, last = -1, -1
        if not 0 <= first <= last < count:
            raise DffError(f"--split {spec!r}: clips are numbered 0-{count - 1}; give a range "
                           f"like {name}:0-{count // 2 - 1}")
    h, w = size
    if name == "eval":
        clips = [(f"eval:{i}", make_clip(EVAL_SEEDS[i], EVAL_FRAMES, h, w))
                 for i in range(first, last + 1)]
    else:
        made = list(motion_split("eval" if name == "motion" else "tuning", height=h, width=w))
        clips = [(f"{name}:{i} ({made[i].category})", made[i].clip)
                 for i in range(first, last + 1)]
    out = []
    for label, clip in clips:
        truth = ([{"labels": lab} for lab in clip.labels] if kind == SEGMENTATION
                 else clip_ground_truth(clip))
        out.append(Rendered(label, clip.frames, truth))
    return out


def measure(backend: Backend, manifest: dict, videos: Sequence[str | Path | Rendered], *,
            size: tuple[int, int] | None = None, intervals: Sequence[int] = INTERVALS,
            max_frames: int | None = None, kinds: Sequence[str] | None = None,
            dis_preset: str | None = None, dis_scale: float | None = None,
            labels: bool = False, candidates: Sequence[Candidate] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Every candidate of `grid` (those of `kinds`, default all) on `videos` (files, or
    Rendered clips), in one sitting (module docstring): the dict dff-tune writes, without
    target and recommendation. `labels`: score against the Rendered clips' ground truth.
    `candidates`: these instead of the grid (per-frame is added first where missing)."""
    kind = task_spec(manifest)["kind"]
    if kind not in (SEGMENTATION, DETECTION):
        raise DffError(f"dff-tune scores segmentation (mIoU) or detection (AP) against "
                       f"per-frame inference; this export's task is {kind} (its own outputs)")
    if not videos:
        raise DffError("no videos to tune on; pass --video FILE")
    if labels and not all(isinstance(v, Rendered) for v in videos):
        raise DffError("--labels: ground truth exists for the synthetic splits only (--split); "
                       "real footage is scored against per-frame inference")
    stride = int(manifest["stride"])
    clips: list[Any] = [v if isinstance(v, Rendered) else open_clip(v, size, manifest)
                        for v in videos]  # all readable, sizes checked
    for c in clips:
        if isinstance(c, Rendered):
            check_size(*c.size, manifest["profile"]["min"], manifest["profile"]["max"], stride,
                       what="--resize (the synthetic split's size)")
        else:
            c.video.close()
    sizes = {c.size for c in clips}
    if len(sizes) > 1:
        raise DffError("the videos have different sizes ("
                       + ", ".join(f"{c.path}: {c.size[0]}x{c.size[1]}" for c in clips)
                       + "); dff-tune measures one deployment size: pass --resize HxW")
    (frame_size,) = sizes
    dis = dis_flow(manifest, dis_preset, dis_scale)
    cands = grid(manifest, backend, frame_size, intervals) if candidates is None else [
        *([] if candidates and candidates[0].kind == PER_FRAME
          else [Candidate(PER_FRAME, schedule="per-frame")]), *candidates]
    if kinds:
        cands = [c for c in cands if c.kind in kinds or c.kind == PER_FRAME]
    measured = [Measured(tally_for(manifest)) for _ in cands]
    motion: list[float] = []
    decode_s, total = 0.0, 0
    bar = progress_bar(progress)
    runners = [_Runner(c, backend, manifest, dis, stride) for c in cands]
    for i, path in enumerate(videos):
        clip = path if isinstance(path, Rendered) else open_clip(path, size, manifest)
        if bar is not None:
            count = len(clip.images) if isinstance(clip, Rendered) else clip.video.frame_count
            if count and bar.total is not None:
                bar.total += min(count, max_frames or count) * len(cands)
                bar.refresh()
            else:
                bar.total = None
        for r in runners:
            r.start(clip.name)
        _run_clip(clip, max_frames, runners, measured, motion, dis, bar,
                  clip.truth if labels else None, warm=i == 0)  # one size: warmed once
        decode_s += clip.decode_s
        total += clip.frames
    if bar is not None:
        bar.close()
    if not total:
        raise DffError(f"{', '.join(map(str, videos))}: no frames decoded")
    rows = []
    for c, m in zip(cands, measured):
        score = m.tally.result()
        rows.append({**c.record(frame_size), "label": c.label,
                     "ms_per_frame": ms_per_frame(decode_s + m.seconds, total),
                     "agreement": score["agreement"],
                     "key_fraction": round(m.key_frames / m.frames, 4) if m.frames else None,
                     "stage_ms": {n: round(1000 * t.median(), 3) for n, t in m.calls.items()
                                  if t.count}})
    base = rows[0]["ms_per_frame"]
    for row in rows:
        row["speedup"] = round(base / row["ms_per_frame"], 3) if base and row["ms_per_frame"] \
            else None
    reference = "labels" if labels else "per-frame"
    return {"task": kind, "reference": reference,
            "metric": (METRIC[kind] if not labels else
                       "accuracy against the ground truth: mIoU" if kind == SEGMENTATION else
                       "accuracy against the ground truth: AP@[.5:.95] (pycocotools)"),
            "videos": [str(v.name if isinstance(v, Rendered) else v) for v in videos],
            "size": list(frame_size), "frames": total, "intervals": list(intervals),
            "decode_ms_per_frame": ms_per_frame(decode_s, total), "timing": "end to end, one sitting",
            "dis": dis.settings(), "r": _ratios(cands, measured),
            "motion_px_per_frame": round(float(np.mean(motion)), 3) if motion else None,
            "candidates": rows}


def _run_clip(clip: Clip | Rendered, max_frames: int | None, runners: list[_Runner],
              measured: list[Measured], motion: list[float], dis: DisFlow, bar: Any,
              truth: list[dict] | None = None, warm: bool = True) -> None:
    """Every runner on the clip's frames, interleaved (runners[0] is per-frame: the
    reference, unless `truth` gives each frame's ground truth); their outputs scored, their
    times and stage calls added to `measured`. With `warm`, every runner first steps the
    first frame untimed (`_Runner.warm`)."""
    ref_runner = runners[0]
    prev = None
    try:
        for t, image in enumerate(clip.read(max_frames)):
            if t == 0 and warm:
                for r in runners:
                    r.warm(image)
            outputs = [ref_runner(t, image)]
            ref = (truth[t] if truth is not None
                   else {n: np.array(v) for n, v in outputs[0].items()})
            for r in runners[1:]:
                outputs.append(r(t, image))
            for m, out in zip(measured, outputs):
                m.tally.add(out, ref, None, None)
            grey = dis.prepare(image)
            if prev is not None:
                flow = dis.pixels(grey, prev, image.shape[:2])
                motion.append(float(np.sqrt((flow ** 2).sum(-1)).mean()))
            prev = grey
            if bar is not None:
                bar.update(len(runners))
    finally:
        for r, m in zip(runners, measured):
            r.stream.release()
            m.seconds += r.seconds
            m.frames += r.frames
            m.key_frames += r.key_frames
            for stage, timings in r.step.calls.items():
                m.calls.setdefault(stage, Timings())
                for s in timings.sample:
                    m.calls[stage].add(s)


def _ratios(cands: list[Candidate], measured: list[Measured]) -> dict[str, float | None]:
    """r per flow source: (flow + task) / (feature + task) from the stage medians: feature
    and task of per-frame, flow of that source's fixed-schedule run at the largest k."""
    ref = measured[0].calls
    feature, task = ref["feature"].median(), ref["task"].median()
    out: dict[str, float | None] = {}
    for source in (LEARNED, DIS):
        runs = [(c.k or 0, m) for c, m in zip(cands, measured)
                if c.kind == DFF and c.flow == source and c.schedule == "fixed"]
        if runs and feature + task > 0:
            m = max(runs, key=lambda x: x[0])[1]
            out[source] = round(stage_ratio(feature, m.calls["flow"].median(), task), 4)
    return out
