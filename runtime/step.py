"""The one DFF step (DESIGN.md §1): a set of frames, from any number of streams, one step on.

Per frame its stream's scheduler decides key or not; the frames are uploaded in chunks of one
frame size and at most `max_batch` frames; the non-key frames get their features by flow +
FlowWarp from their stream's key frame (`_flow`, the one place a flow source is called), and a
frame whose propagation the schedule does not trust is redone as a key frame; the key frames go
through `feature` and become their streams' key frames; every frame goes through `task`. Key
images and features stay backend handles: a batch and a row in it (`Rows`), so a key frame's
data is never copied back to the host. dff-run (one stream or many), dff-profile and the Triton
`dff` model all step frames with `Step`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dff.runtime.backends import Backend, host_quality
from dff.runtime.scheduler import Scheduler

from dff import tasks
from dff.errors import DffError

STAGES = ("upload", "schedule", "feature", "flow", "task")
# detection's per-row outputs (a K axis), cut to `num` rows per frame
ROWS = tuple(o.name for o in tasks.OUTPUTS[tasks.DETECTION] if "K" in o.shape)


def frame_outputs(outputs: dict[str, np.ndarray], i: int = 0) -> dict[str, np.ndarray]:
    """Frame `i` of a backend's batched task outputs: batch dimension dropped, and with `num`
    (detection) boxes, scores and classes cut to its first `num` rows (the rest is padding)."""
    one = {name: value[i] for name, value in outputs.items()}
    if "num" in one:
        n = max(0, int(one["num"]))
        for name in ROWS:
            if name in one:
                one[name] = one[name][:n]
    return one


def check_frame_size(index: int, h: int, w: int, stride: int, profile: dict | None) -> None:
    """Refuse frame sides that are not multiples of the stride, or a size outside the profile
    (at batch 1), naming the fix."""
    if h % stride or w % stride:
        raise DffError(f"frame {index}: {w}x{h} is not a multiple of the stride {stride} "
                       "in both sides; resize or crop the video to one (e.g. "
                       f"{w // stride * stride or stride}x{h // stride * stride or stride})")
    if profile:
        lo, hi = profile["min"], profile["max"]
        if not (lo[0] <= 1 <= hi[0] and lo[1] <= h <= hi[1] and lo[2] <= w <= hi[2]):
            raise DffError(
                f"frame {index}: batch 1 at {h}x{w} (HxW) is outside the engines' profile "
                f"{'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))} (NxHxW, "
                "manifest.json 'profile'); resize the video into it, or re-export with "
                f"--min-shape/--max-shape covering 1x{h}x{w}")


def nchw(frame: Any) -> np.ndarray | None:
    """HWC -> [1,3,H,W] contiguous, the layout the graphs take; None for what is not an HxWx3
    array (the step's checks then say what is wrong with it)."""
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3):
        return None
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None])


class Timings:
    """Running count and total of one stage's times, and a uniform sample (reservoir) of
    them for the median: exact up to SAMPLE entries, an estimate beyond."""

    SAMPLE = 4096

    def __init__(self) -> None:
        self.count, self.total, self.frames = 0, 0.0, 0
        self.sample: list[float] = []
        self._rng = random.Random(0)

    def add(self, seconds: float, frames: int = 1) -> None:
        self.count += 1
        self.frames += frames
        self.total += seconds
        if len(self.sample) < self.SAMPLE:
            self.sample.append(seconds)
        else:
            j = self._rng.randrange(self.count)
            if j < self.SAMPLE:
                self.sample[j] = seconds

    def median(self) -> float:
        return statistics.median(self.sample) if self.sample else 0.0


class StreamState:
    """One stream: its scheduler, key frame (image and features: a `Rows` batch and this
    stream's row in it), frame size, and counts. `name` (of one of several streams) starts
    its errors."""

    def __init__(self, scheduler: Scheduler, name: str | None = None, number: int = 0):
        self.scheduler, self.name, self.number = scheduler, name, number
        self.key_image: tuple[Rows, int] | None = None
        self.key_feat: tuple[Rows, int] | None = None
        self.shape: tuple[int, ...] | None = None  # the first frame's HWC shape
        self.next = 0  # index of its next frame
        self.frames = self.key_frames = 0

    def release(self) -> None:
        """Let go of the key frame's handles (device memory back)."""
        self.key_image = self.key_feat = None


class Rows:
    """A batched handle (images or features of n frames); its rows (`backend.split`) made
    once, when first needed."""

    def __init__(self, backend: Backend, handle: Any, n: int):
        self.backend, self.handle, self.n = backend, handle, n
        self._rows: list[Any] | None = None

    def row(self, j: int) -> Any:
        if self._rows is None:
            self._rows = self.backend.split(self.handle) if self.n > 1 else [self.handle]
        return self._rows[j]


def gather(backend: Backend, rows: list[tuple[Rows, int]]) -> Any:
    """One handle of these rows, in order: a whole batch in its own order as it is (no copy),
    else the rows stacked (`backend.stack`)."""
    first = rows[0][0]
    if first.n == len(rows) and all(r == (first, j) for j, r in enumerate(rows)):
        return first.handle
    return backend.stack([batch.row(j) for batch, j in rows])


@dataclass
class Frame:
    """One frame of a step: its stream, index and pixels (HWC uint8 RGB, and `nchw` when the
    decoder made it); the step fills in is_key, `task_out` (the batched task outputs of its
    chunk, this frame at row `row`) and its share of each backend call in `times` (s)."""

    stream: StreamState
    index: int
    frame: Any
    nchw: np.ndarray | None = None
    is_key: bool = False
    image: tuple[Rows, int] | None = None
    feat: tuple[Rows, int] | None = None
    task_out: dict[str, np.ndarray] = field(default_factory=dict)
    row: int = 0
    times: dict[str, float] = field(default_factory=dict)

    def outputs(self) -> dict[str, np.ndarray]:
        """This frame's task outputs (`frame_outputs`)."""
        return frame_outputs(self.task_out, self.row)


class Step:
    """Steps frames through one backend: `step(frames)`. `max_batch`: frames per backend call
    (None: any). `calls` holds each stage's call times and the frames through them.
    `upload_ahead()`, when given to a step, returns the next step's frames' NCHW arrays, if
    already decoded: a backend whose uploads are asynchronous (`overlaps_uploads`) then
    uploads them before this step's task outputs are waited for, so the H2D overlaps compute."""

    def __init__(self, backend: Backend, max_batch: int | None = None):
        self.backend, self.max_batch = backend, max_batch
        self.calls = {name: Timings() for name in STAGES}
        self._staged: dict[int, tuple[np.ndarray, Any]] = {}  # id(nchw) -> (nchw, upload)
        self._pending: list[list[Any]] = []  # this step's [stage, frames, seconds]

    def __call__(self, frames: list[Frame],
                 upload_ahead: Callable[[], list[np.ndarray]] | None = None) -> None:
        start = time.perf_counter()
        for f in frames:
            s = f.stream
            f.is_key = s.scheduler.decide(f.index, f.frame)
            if not f.is_key and s.key_feat is None:
                raise RuntimeError(f"{s.scheduler!r} made no key frame at the start"
                                   + (f" of {s.name}" if s.name else ""))
            self._check(f)
        self._call("schedule", frames, time.perf_counter() - start)
        for chunk in self.chunks(frames):
            self._upload(chunk)
        for chunk in self.chunks([f for f in frames if not f.is_key]):
            self._flow(chunk)
        for chunk in self.chunks([f for f in frames if f.is_key]):  # redone ones too
            self._feature(chunk)
        if upload_ahead is not None and self.backend.overlaps_uploads:
            self._ahead(upload_ahead(), frames)
        for chunk in self.chunks(frames):
            self._task(chunk)
        for stage, chunk, seconds in self._pending:
            self.calls[stage].add(seconds, len(chunk))
            for f in chunk:
                f.times[stage] = f.times.get(stage, 0.0) + seconds / len(chunk)
        self._pending = []
        for f in frames:
            f.times["total"] = sum(f.times.values())
            f.stream.frames += 1
            f.stream.key_frames += f.is_key

    def drop_staged(self) -> None:
        """Let go of uploads made ahead for a step that will not come."""
        self._staged.clear()

    def chunks(self, frames: list[Frame]) -> Iterator[list[Frame]]:
        """`frames` by frame size (in order of first appearance), in runs of max_batch."""
        groups: dict[tuple[int, ...], list[Frame]] = {}
        for f in frames:
            groups.setdefault(f.frame.shape, []).append(f)
        for group in groups.values():
            n = self.max_batch or len(group)
            for i in range(0, len(group), n):
                yield group[i:i + n]

    def _check(self, f: Frame) -> None:
        """The first frame of a stream checked against the backend; the others against it."""
        s, frame = f.stream, f.frame
        try:
            if s.shape is None:
                if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8
                        and frame.ndim == 3 and frame.shape[2] == 3):
                    what = (f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray)
                            else type(frame).__name__)
                    raise DffError(f"frame {f.index}: {what}, expected an HxWx3 uint8 RGB array")
                check_frame_size(f.index, *frame.shape[:2], self.backend.stride,
                                 self.backend.profile)
                s.shape = frame.shape
            elif frame.shape != s.shape:
                raise DffError(f"frame {f.index}: {frame.shape[1]}x{frame.shape[0]}, but the "
                               f"video started at {s.shape[1]}x{s.shape[0]}; every frame of a "
                               "video must have one size")
        except DffError as e:
            raise DffError(f"{s.name}: {e}" if s.name else str(e)) from None
        if f.nchw is None:
            f.nchw = nchw(frame)

    def _call(self, stage: str, chunk: list[Frame], seconds: float) -> None:
        self._pending.append([stage, chunk, seconds])

    def _upload(self, chunk: list[Frame]) -> None:
        start = time.perf_counter()
        staged = self._staged.pop(id(chunk[0].nchw), None) if len(chunk) == 1 else None
        self._staged.clear()
        if staged is not None and staged[0] is chunk[0].nchw:
            handle = staged[1]
        else:
            images = [f.nchw for f in chunk]
            handle = self.backend.upload(images[0] if len(images) == 1
                                         else np.concatenate(images))  # type: ignore[arg-type]
        batch = Rows(self.backend, handle, len(chunk))
        for j, f in enumerate(chunk):
            f.image = (batch, j)
        self._call("upload", chunk, time.perf_counter() - start)

    def _ahead(self, arrays: list[np.ndarray], frames: list[Frame]) -> None:
        """Upload the next step's frames now (one each, as `_upload` would take them)."""
        start = time.perf_counter()
        for a in arrays:
            if a.shape == frames[0].nchw.shape:  # type: ignore[union-attr]
                self._staged[id(a)] = (a, self.backend.upload(a))
        upload = next(p for p in self._pending if p[0] == "upload")
        upload[2] += time.perf_counter() - start

    def _flow(self, chunk: list[Frame]) -> None:
        """The non-key frames' features: flow + FlowWarp from their key frames; a frame whose
        propagation its schedule rejects is marked a key frame (redone by `_feature`)."""
        b, start = self.backend, time.perf_counter()
        out = b.flow(gather(b, [f.image for f in chunk]),  # type: ignore[misc]
                     gather(b, [f.stream.key_image for f in chunk]),  # type: ignore[misc]
                     gather(b, [f.stream.key_feat for f in chunk]))  # type: ignore[misc]
        feats = Rows(b, out[2], len(chunk))
        schedulers = [f.stream.scheduler for f in chunk]
        host = b.to_host(out[0]) if any(s.needs_flow for s in schedulers) else None
        quality = host_quality(b, out, schedulers)
        for j, f in enumerate(chunk):
            scheduler = f.stream.scheduler
            if host is not None and scheduler.needs_flow and not scheduler.accept(
                    host[j:j + 1], None if quality is None else quality[j:j + 1]):
                f.is_key = True  # propagation not trusted: redone as a key frame
            else:
                f.feat = (feats, j)
        self._call("flow", chunk, time.perf_counter() - start)

    def _feature(self, chunk: list[Frame]) -> None:
        b, start = self.backend, time.perf_counter()
        image = gather(b, [f.image for f in chunk])  # type: ignore[misc]
        images, feats = Rows(b, image, len(chunk)), Rows(b, b.feature(image), len(chunk))
        for j, f in enumerate(chunk):
            f.stream.key_image, f.stream.key_feat = (images, j), (feats, j)
            f.feat = (feats, j)
        self._call("feature", chunk, time.perf_counter() - start)

    def _task(self, chunk: list[Frame]) -> None:
        start = time.perf_counter()
        outputs = self.backend.task(gather(self.backend, [f.feat for f in chunk]))  # type: ignore[misc]
        for j, f in enumerate(chunk):
            f.task_out, f.row = outputs, j
            f.image = f.feat = None
        self._call("task", chunk, time.perf_counter() - start)
