"""The video pipeline (DESIGN.md §1, §5): decode ▶ schedule ▶ feature or flow+warp ▶ task.

Decoding runs in a background thread feeding a bounded queue; compute runs in the caller's
thread, one frame at a time (batch 1); `run_to` hands results to a sink (a writer) in a third
thread through another bounded queue. Results come out in frame order. Nothing accumulates:
at most `queue_size` frames wait on either side, and the stage times keep running totals and
a fixed-size sample for the medians. A result holds one frame's task outputs (docs/DESIGN.md
§6): the backend's dict with the batch dimension dropped and detection rows cut to `num`.
"""

from __future__ import annotations

import itertools
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dff.runtime.backends import Backend, host_quality
from dff.runtime.scheduler import Scheduler

from dff import tasks
from dff.errors import DffError

STAGES = ("upload", "schedule", "feature", "flow", "task")
_END = object()  # end of a queue's stream
_POLL = 0.05  # s: how often a blocked thread looks at the stop flag
_JOIN = 5.0  # s: how long a failing run waits for a busy thread before leaving it (daemon)
# detection's per-row outputs (a K axis), cut to `num` rows per frame
ROWS = tuple(o.name for o in tasks.OUTPUTS[tasks.DETECTION] if "K" in o.shape)


@dataclass
class FrameResult:
    index: int           # 0-based position in the video
    frame: np.ndarray    # HWC uint8 RGB, as decoded
    outputs: dict[str, np.ndarray]  # the task outputs of this frame (frame_outputs)
    is_key: bool         # ran N_feat (a redone frame of the adaptive schedule included)
    times: dict[str, float] = field(default_factory=dict)  # s per stage, plus decode, total

    @property
    def labels(self) -> np.ndarray:
        """Segmentation's uint8 [H,W] class map."""
        if "labels" not in self.outputs:
            raise AttributeError(f"this result has no labels (outputs {sorted(self.outputs)}: "
                                 "a detection model); read .outputs")
        return self.outputs["labels"]


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


def check_first_frame(backend: Backend, index: int, frame: Any) -> None:
    """Refuse a video's first frame that is not HxWx3 uint8, not a multiple of the stride or
    outside the profile (at batch 1), naming the fix."""
    if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
            and frame.shape[2] == 3):
        what = (f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray)
                else type(frame).__name__)
        raise DffError(f"frame {index}: {what}, expected an HxWx3 uint8 RGB array")
    h, w = frame.shape[:2]
    stride = getattr(backend, "stride", 1)
    if h % stride or w % stride:
        raise DffError(f"frame {index}: {w}x{h} is not a multiple of the stride {stride} "
                       "in both sides; resize or crop the video to one (e.g. "
                       f"{w // stride * stride or stride}x{h // stride * stride or stride})")
    profile = getattr(backend, "profile", None)
    if profile:
        lo, hi = profile["min"], profile["max"]
        if not (lo[0] <= 1 <= hi[0] and lo[1] <= h <= hi[1] and lo[2] <= w <= hi[2]):
            raise DffError(
                f"frame {index}: batch 1 at {h}x{w} (HxW) is outside the engines' profile "
                f"{'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))} (NxHxW, "
                "manifest.json 'profile'); resize the video into it, or re-export with "
                f"--min-shape/--max-shape covering 1x{h}x{w}")


class _Failure:
    """An exception raised in the decode thread, carried to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put, waiting for room until `stop` is set; False if it was."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _nchw(frame: Any) -> np.ndarray | None:
    """HWC -> [1,3,H,W] contiguous, the layout the graphs take; None for what is not an HxWx3
    array (the compute thread's checks then say what is wrong with it)."""
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3):
        return None
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None])


def _decode(frames: Iterable[np.ndarray], q: queue.Queue, stop: threading.Event) -> None:
    """The decode thread: frames, their NCHW copy (made here, off the compute thread) and
    their decode time into `q`, then _END or a failure."""
    it = iter(frames)
    try:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                _put(q, _END, stop)
                return
            nchw = _nchw(frame)
            if not _put(q, (frame, nchw, time.perf_counter() - start), stop):
                return
    except BaseException as e:  # noqa: BLE001 - the consumer re-raises it
        _put(q, _Failure(e), stop)
    finally:
        close = getattr(it, "close", None)  # a generator's file or decoder, in its own thread
        if close is not None:
            close()


class _Stage:
    """Running count and total of one stage's times, and a uniform sample (reservoir) of
    them for the median: exact up to SAMPLE frames, an estimate beyond."""

    SAMPLE = 4096

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0
        self.sample: list[float] = []
        self._rng = random.Random(0)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if len(self.sample) < self.SAMPLE:
            self.sample.append(seconds)
        else:
            j = self._rng.randrange(self.count)
            if j < self.SAMPLE:
                self.sample[j] = seconds

    def median(self) -> float:
        return statistics.median(self.sample) if self.sample else 0.0


def drain(q: queue.Queue, sink: Callable[[Any], None], stop: threading.Event,
          errors: list[BaseException]) -> None:
    """A writer thread's loop: hand each queued result to `sink` until _END or `stop`; an
    error goes to `errors` (re-raised by the caller) and stops the run."""
    try:
        while not stop.is_set():
            try:
                item = q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if item is _END:
                return
            sink(item)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
        errors.append(e)
        stop.set()


class Pipeline:
    """One backend, one scheduler; `run` a video's frames (HWC uint8 RGB) to FrameResults."""

    def __init__(self, backend: Backend, scheduler: Scheduler, *, queue_size: int = 8):
        if queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, got {queue_size}")
        self.backend, self.scheduler, self.queue_size = backend, scheduler, queue_size
        self._reset()

    def _reset(self) -> None:
        self._stages = {name: _Stage() for name in (*STAGES, "decode", "total")}
        self._frames = self._key_frames = 0
        self._wait = 0.0
        self._start: float | None = None
        self._end: float | None = None
        self._key_image: Any = None
        self._key_feat: Any = None
        self._shape: tuple[int, ...] | None = None
        self._staged: tuple[np.ndarray, Any] | None = None  # next frame's NCHW, its upload

    # --- the loop ---------------------------------------------------------------------------

    def run(self, frames: Iterable[np.ndarray]) -> Generator[FrameResult, None, None]:
        """Yield one FrameResult per frame, in order. Frames are decoded (iterated) in a
        background thread at most `queue_size` ahead; an exception there is re-raised here.
        Restarts the schedule (key frame at the first frame) and the statistics."""
        self._reset()
        self.scheduler.reset()
        q: queue.Queue = queue.Queue(maxsize=self.queue_size)
        stop = threading.Event()
        decoder = threading.Thread(target=_decode, args=(frames, q, stop), name="dff-decode",
                                   daemon=True)
        self._start = time.perf_counter()
        decoder.start()

        def peek() -> np.ndarray | None:
            """The next decoded frame's NCHW copy, if it is already waiting."""
            with q.mutex:
                item = q.queue[0] if q.queue else None
            return item[1] if isinstance(item, tuple) else None

        try:
            for index in itertools.count():
                wait = time.perf_counter()
                item = q.get()
                self._wait += time.perf_counter() - wait
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                frame, nchw, decode_s = item
                result = self._step(index, frame, nchw, peek)
                result.times["decode"] = decode_s
                self._record(result)
                yield result
            self.backend.synchronize()
        finally:
            self._end = time.perf_counter()
            stop.set()
            decoder.join(_JOIN)
            self._key_image = self._key_feat = self._staged = None  # device memory back

    def run_to(self, frames: Iterable[np.ndarray],
               sink: Callable[[FrameResult], None]) -> dict:
        """`run` with `sink(result)` called in a writer thread, in order, at most `queue_size`
        results behind. An exception in the decoder, the compute or the sink stops the other
        threads and is re-raised here. Returns `summary()`; its wall time ends when the sink
        has taken the last result."""
        q: queue.Queue = queue.Queue(maxsize=self.queue_size)
        stop = threading.Event()
        errors: list[BaseException] = []

        writer = threading.Thread(target=drain, args=(q, sink, stop, errors), name="dff-write",
                                  daemon=True)
        writer.start()
        results = self.run(frames)
        try:
            for result in results:
                if not _put(q, result, stop):
                    break  # the sink failed
            _put(q, _END, stop)
            while writer.is_alive():  # a join that Ctrl-C can interrupt
                writer.join(_POLL)
        except BaseException:
            stop.set()
            raise
        finally:
            results.close()
            writer.join(_JOIN)
        if errors:
            raise errors[0]
        self._end = time.perf_counter()
        return self.summary()

    def _step(self, index: int, frame: np.ndarray, nchw: np.ndarray | None = None,
              peek: Callable[[], np.ndarray | None] | None = None) -> FrameResult:
        """One frame: schedule, upload, then feature (key) or flow + warp, then task. On a
        backend whose uploads are asynchronous (`overlaps_uploads`), the next frame, when
        already decoded, is uploaded before this one's outputs are waited for, so its H2D
        overlaps this frame's compute."""
        b, times = self.backend, {}
        start = last = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal last
            now = time.perf_counter()
            times[stage], last = now - last, now

        is_key = self.scheduler.decide(index, frame)
        if not is_key and self._key_feat is None:
            raise RuntimeError(f"{self.scheduler!r} made no key frame at the start")
        lap("schedule")
        nchw = self._to_nchw(index, frame, nchw)
        staged, self._staged = self._staged, None
        # the key image, if it becomes one
        image = staged[1] if staged is not None and staged[0] is nchw else b.upload(nchw)
        lap("upload")
        feat = None
        if not is_key:
            out = b.flow(image, self._key_image, self._key_feat)
            feat = out[2]
            if self.scheduler.needs_flow and not self.scheduler.accept(
                    b.to_host(out[0]), host_quality(b, out, [self.scheduler])):
                is_key = True  # propagation not trusted: redo as a key frame
            lap("flow")
        if is_key:
            feat = self._key_feat = b.feature(image)
            self._key_image = image
            lap("feature")
        if peek is not None and getattr(b, "overlaps_uploads", False):
            ahead = peek()
            if ahead is not None and ahead.shape == nchw.shape:
                self._staged = (ahead, b.upload(ahead))
                now = time.perf_counter()
                times["upload"] += now - last
                last = now
        outputs = frame_outputs(b.task(feat))
        lap("task")
        times["total"] = last - start
        return FrameResult(index, frame, outputs, is_key, times)

    def _to_nchw(self, index: int, frame: np.ndarray, nchw: np.ndarray | None) -> np.ndarray:
        """HWC uint8 RGB -> [1,3,H,W] contiguous (`nchw`, when the decode thread made it),
        checking the size against the backend."""
        if self._shape is None:
            self._check_first(index, frame)
            self._shape = frame.shape
        elif frame.shape != self._shape:
            raise DffError(f"frame {index}: {frame.shape[1]}x{frame.shape[0]}, but the video "
                           f"started at {self._shape[1]}x{self._shape[0]}; every frame of a "
                           "video must have one size")
        return nchw if nchw is not None else _nchw(frame)  # type: ignore[return-value]

    def _check_first(self, index: int, frame: Any) -> None:
        check_first_frame(self.backend, index, frame)

    # --- statistics -------------------------------------------------------------------------

    def _record(self, result: FrameResult) -> None:
        self._frames += 1
        self._key_frames += result.is_key
        for name, seconds in result.times.items():
            self._stages[name].add(seconds)

    def summary(self) -> dict:
        """Frames, key frames, wall time, fps, per-stage totals and medians, and the runtime
        efficiency of DESIGN.md §5: Σ over compute stages of (median × frames that ran it) /
        wall time (decode runs beside compute, so it is not in the sum). `busy` is the same
        with the stages' total time: the compute thread's share of the wall time."""
        end = self._end if self._end is not None else time.perf_counter()
        wall = end - self._start if self._start is not None else 0.0
        stages = {name: {"count": s.count, "total_s": s.total, "median_s": s.median()}
                  for name, s in self._stages.items()}
        by_median = sum(s.median() * s.count for n, s in self._stages.items() if n in STAGES)
        busy = sum(s.total for n, s in self._stages.items() if n in STAGES)
        return {
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "precision": getattr(self.backend, "precision", None),
            "scheduler": repr(self.scheduler),
            "frames": self._frames,
            "key_frames": self._key_frames,
            "wall_s": wall,
            "fps": self._frames / wall if wall > 0 else 0.0,
            "stages": stages,
            "efficiency": by_median / wall if wall > 0 else 0.0,
            "busy": busy / wall if wall > 0 else 0.0,
            "decode_wait_s": self._wait,
            "schedule": self.scheduler.stats(),
        }
