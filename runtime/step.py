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
from dff.runtime.flows import DisFlow
from dff.runtime.propagate import Propagator
from dff.runtime.scheduler import Scheduler

from dff import tasks
from dff.errors import DffError

# key: the learned flow's key-frame part (flow_key.onnx, where the backend is `keyed`)
STAGES = ("upload", "schedule", "feature", "key", "flow", "task")
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


def _frame(index: int | None, h: int, w: int) -> str:
    return f"frame {w}x{h}" if index is None else f"frame {index}: {w}x{h}"


def check_frame(frame: Any, stride: int, profile: dict | None, index: int | None = None) -> None:
    """Refuse a stream's first frame that is not HxWx3 uint8, has sides that are not
    multiples of the stride, or a size outside the profile (at batch 1), naming the fix."""
    if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
            and frame.shape[2] == 3):
        what = (f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray)
                else type(frame).__name__)
        raise DffError(f"frame {index}: {what}, expected an HxWx3 uint8 RGB array")
    h, w = frame.shape[:2]
    if h % stride or w % stride:
        raise DffError(f"{_frame(index, h, w)} is not a multiple of the stride {stride} in both "
                       "sides; resize or crop the video to one (e.g. "
                       f"{w // stride * stride or stride}x{h // stride * stride or stride})")
    if profile:
        lo, hi = profile["min"], profile["max"]
        if not (lo[0] <= 1 <= hi[0] and lo[1] <= h <= hi[1] and lo[2] <= w <= hi[2]):
            raise DffError(
                f"{_frame(index, h, w)} at batch 1 is outside the engines' profile "
                f"{'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))} (NxHxW, "
                "manifest.json 'profile'); resize the video into it, or re-export with "
                f"--min-shape/--max-shape covering 1x{h}x{w}")


def check_same_size(shape: tuple[int, ...], first: tuple[int, ...], index: int | None = None,
                    fix: str = "") -> None:
    """Refuse a frame whose HxW differs from its stream's first frame's."""
    if shape[:2] != first[:2]:
        raise DffError(f"{_frame(index, *shape[:2])}, but it started at {first[1]}x{first[0]}; "
                       f"every frame of a video must have one size{fix}")


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
        self.key_image: tuple[Rows, int] | None = None  # what `flow` takes: Backend.key
        self.key_feat: tuple[Rows, int] | None = None
        self.key_grey: np.ndarray | None = None  # a host flow's prepared key frame (DisFlow)
        self.carried: Any = None  # a Propagator's state (runtime/propagate.py)
        self.shape: tuple[int, ...] | None = None  # the first frame's HWC shape
        self.next = 0  # index of its next frame
        self.frames = self.key_frames = 0

    def release(self) -> None:
        """Let go of the key frame's handles (device memory back)."""
        self.key_image = self.key_feat = self.key_grey = self.carried = None


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
    grey: np.ndarray | None = None  # prepared for a host flow (DisFlow.prepare), when needed
    is_key: bool = False
    image: tuple[Rows, int] | None = None
    feat: tuple[Rows, int] | None = None
    task_out: dict[str, np.ndarray] = field(default_factory=dict)
    row: int = 0
    features: np.ndarray | None = None  # [C,h,w] on the host, with Step(features=True)
    times: dict[str, float] = field(default_factory=dict)

    def outputs(self) -> dict[str, np.ndarray]:
        """This frame's task outputs (`frame_outputs`)."""
        return frame_outputs(self.task_out, self.row)


class Step:
    """Steps frames through one backend: `step(frames)`. `max_batch`: frames per backend call
    (None: any). `flow`: where the non-key frames' flow comes from: None, the backend's learned
    flow graph; a DisFlow, DIS on the host, warped by the backend's warp graph (runtime/
    flows.py). `copy`: the naive baseline, non-key frames take their key frame's features as
    they are (no flow, no warp). `propagate`: a Propagator (runtime/propagate.py): non-key
    frames take outputs carried from their key frame's outputs (no upload, flow or task; its
    time is the `flow` stage's, and its intake of a key frame's outputs the `task` stage's);
    their `features` stay None. `features`: each Frame's `features` is set to its features on
    the host (for evaluation; a copy from the device on a GPU backend). `calls` holds each
    stage's call times and the frames through them.
    `upload_ahead()`, when given to a step, returns the next step's frames' NCHW arrays, if
    already decoded: a backend whose uploads are asynchronous (`overlaps_uploads`) then
    uploads them before this step's task outputs are waited for, so the H2D overlaps compute."""

    def __init__(self, backend: Backend, max_batch: int | None = None, copy: bool = False,
                 flow: DisFlow | None = None, features: bool = False,
                 propagate: Propagator | None = None):
        self.backend, self.max_batch, self.copy, self.source = backend, max_batch, copy, flow
        self.propagate = propagate
        self.features = features  # copy each frame's features to the host (evaluation)
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
        computed = frames if self.propagate is None else [f for f in frames if f.is_key]
        for chunk in self.chunks(computed):
            self._upload(chunk)
        if self.propagate is None:
            for chunk in self.chunks([f for f in frames if not f.is_key]):
                self._flow(chunk)
        else:
            self._carry([f for f in frames if not f.is_key])
        for chunk in self.chunks([f for f in frames if f.is_key]):  # redone ones too
            self._feature(chunk)
        if upload_ahead is not None and self.backend.overlaps_uploads and computed:
            self._ahead(upload_ahead(), computed)
        for chunk in self.chunks(computed):
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
        """A stream's first frame checked against the backend; the others against it."""
        s = f.stream
        try:
            if s.shape is None:
                check_frame(f.frame, self.backend.stride, self.backend.profile, f.index)
                s.shape = f.frame.shape
            else:
                check_same_size(f.frame.shape, s.shape, f.index)
        except DffError as e:
            raise DffError(f"{s.name}: {e}" if s.name else str(e)) from None

    def _call(self, stage: str, chunk: list[Frame], seconds: float) -> None:
        self._pending.append([stage, chunk, seconds])

    def _upload(self, chunk: list[Frame]) -> None:
        """One upload of the chunk's frames as [N,3,H,W] (from the NCHW copies the decoder
        made, or straight from HWC: one copy a frame); a frame uploaded ahead is taken as is."""
        start = time.perf_counter()
        first = chunk[0]
        staged = self._staged.pop(id(first.nchw), None) if len(chunk) == 1 else None
        self._staged.clear()
        if staged is not None and staged[0] is first.nchw:
            handle = staged[1]
        elif len(chunk) == 1:
            handle = self.backend.upload(first.nchw if first.nchw is not None
                                         else nchw(first.frame))
        else:
            h, w, c = first.frame.shape
            images = np.empty((len(chunk), c, h, w), np.uint8)
            for j, f in enumerate(chunk):
                images[j] = f.nchw[0] if f.nchw is not None else f.frame.transpose(2, 0, 1)
            handle = self.backend.upload(images)
        batch = Rows(self.backend, handle, len(chunk))
        for j, f in enumerate(chunk):
            f.image = (batch, j)
        self._call("upload", chunk, time.perf_counter() - start)

    def _ahead(self, arrays: list[np.ndarray], frames: list[Frame]) -> None:
        """Upload the next step's frames now (one each, as `_upload` would take them)."""
        start = time.perf_counter()
        for a in arrays:
            if a.shape[2:] == frames[0].frame.shape[:2]:
                self._staged[id(a)] = (a, self.backend.upload(a))
        upload = next(p for p in self._pending if p[0] == "upload")
        upload[2] += time.perf_counter() - start

    def _flow(self, chunk: list[Frame]) -> None:
        """The non-key frames' features: flow + FlowWarp from their key frames; a frame whose
        propagation its schedule rejects is marked a key frame (redone by `_feature`)."""
        b, start = self.backend, time.perf_counter()
        if self.copy:
            for f in chunk:
                f.feat = f.stream.key_feat
            self._call("flow", chunk, time.perf_counter() - start)
            return
        key_feat = gather(b, [f.stream.key_feat for f in chunk])  # type: ignore[misc]
        schedulers = [f.stream.scheduler for f in chunk]
        if self.source is not None:  # a host flow: on the frames, then the warp graph
            for f in chunk:
                if f.grey is None:
                    f.grey = self.source.prepare(f.frame)
            h, w = chunk[0].frame.shape[:2]
            cells = (h // b.stride, w // b.stride)
            host = self.source.batch([f.grey for f in chunk],
                                     [f.stream.key_grey for f in chunk], cells)
            feats = Rows(b, b.warp(key_feat, b.upload(host)), len(chunk))
            quality = None
        else:
            out = b.flow(gather(b, [f.image for f in chunk]),  # type: ignore[misc]
                         gather(b, [f.stream.key_image for f in chunk]),  # type: ignore[misc]
                         key_feat)
            feats = Rows(b, out[2], len(chunk))
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

    def _carry(self, frames: list[Frame]) -> None:
        """Non-key frames' outputs carried from their key frames' (`propagate`), one call."""
        if not frames:
            return
        start = time.perf_counter()
        for f in frames:
            out = self.propagate.carry(f.stream, f.frame)  # type: ignore[union-attr]
            f.task_out, f.row = {name: np.asarray(v)[None] for name, v in out.items()}, 0
        self._call("flow", frames, time.perf_counter() - start)

    def _feature(self, chunk: list[Frame]) -> None:
        b, start = self.backend, time.perf_counter()
        image = gather(b, [f.image for f in chunk])  # type: ignore[misc]
        images, feats = Rows(b, image, len(chunk)), Rows(b, b.feature(image), len(chunk))
        for j, f in enumerate(chunk):
            f.stream.key_image, f.stream.key_feat = (images, j), (feats, j)
            f.feat = (feats, j)
            if self.source is not None and not self.copy:  # (its time counts as feature's)
                f.stream.key_grey = (f.grey if f.grey is not None
                                     else self.source.prepare(f.frame))
        self._call("feature", chunk, time.perf_counter() - start)
        if b.keyed and self.source is None and not self.copy and self.propagate is None:
            start = time.perf_counter()  # the learned flow's key_code, once per key frame
            codes = Rows(b, b.key(image), len(chunk))
            for j, f in enumerate(chunk):
                f.stream.key_image = (codes, j)
            self._call("key", chunk, time.perf_counter() - start)

    def _task(self, chunk: list[Frame]) -> None:
        start = time.perf_counter()
        feat = gather(self.backend, [f.feat for f in chunk])  # type: ignore[misc]
        outputs = self.backend.task(feat)
        host = self.backend.to_host(feat) if self.features else None
        for j, f in enumerate(chunk):
            if host is not None:
                f.features = host[j]
            f.task_out, f.row = outputs, j
            f.image = f.feat = None
            if self.propagate is not None:
                self.propagate.key(f.stream, f.frame, f.outputs())
        self._call("task", chunk, time.perf_counter() - start)
