"""The run loop (DESIGN.md §1, §6): decode ▶ step ▶ write, for one stream or many.

Each stream's video is decoded in a thread of its own into a bounded queue (its NCHW copy made
there, off the compute thread); the caller's thread takes the next frame of every stream that
has not ended (waiting for its decoder, so the batches depend on the videos alone) and steps
them together (runtime/step.py); `run_to` hands each stream's results to its sink in a writer
thread through another bounded queue. Results come out per stream in frame order. Nothing
accumulates: at most `queue_size` frames wait on either side, and the stage times keep running
totals and a fixed-size sample for the medians. `Pipeline` is the loop over one stream,
`StreamPipeline` over several (batched across streams, DESIGN.md §9).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dff.export.manifest import DIS, LEARNED
from dff.runtime.backends import Backend, warp_missing
from dff.runtime.flows import DisFlow
from dff.runtime.propagate import Propagator
from dff.runtime.scheduler import Scheduler
from dff.runtime.step import STAGES, Frame, Step, StreamState, Timings, nchw

from dff.errors import DffError

_END = object()  # end of a queue's stream
_POLL = 0.05  # s: how often a blocked thread looks at the stop flag
_JOIN = 5.0  # s: how long a failing run waits for a busy thread before leaving it (daemon)


@dataclass
class FrameResult:
    index: int           # 0-based position in the video
    frame: np.ndarray    # HWC uint8 RGB, as decoded
    outputs: dict[str, np.ndarray]  # the task outputs of this frame (step.frame_outputs)
    is_key: bool         # ran N_feat (a redone frame of the adaptive schedule included)
    times: dict[str, float] = field(default_factory=dict)  # s per stage, plus decode, total

    @property
    def labels(self) -> np.ndarray:
        """Segmentation's uint8 [H,W] class map."""
        if "labels" not in self.outputs:
            raise AttributeError(f"this result has no labels (outputs {sorted(self.outputs)}: "
                                 "a detection model); read .outputs")
        return self.outputs["labels"]


class _Failure:
    """An exception raised in a decode thread, carried to the consumer."""

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


def _decode(frames: Iterable[np.ndarray], q: queue.Queue, stop: threading.Event) -> None:
    """A decode thread: frames, their NCHW copy and their decode time into `q`, then _END or
    a failure."""
    it = iter(frames)
    try:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                _put(q, _END, stop)
                return
            if not _put(q, (frame, nchw(frame), time.perf_counter() - start), stop):
                return
    except BaseException as e:  # noqa: BLE001 - the consumer re-raises it
        _put(q, _Failure(e), stop)
    finally:
        close = getattr(it, "close", None)  # a generator's file or decoder, in its own thread
        if close is not None:
            close()


def _drain(q: queue.Queue, sink: Callable[[Any], None], stop: threading.Event,
           errors: list[BaseException]) -> None:
    """A writer thread: hand each queued result to `sink` until _END or `stop`; an error goes
    to `errors` (re-raised by the caller) and stops the run."""
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


class _Input:
    """A stream of the loop: its state and its decode queue and thread."""

    def __init__(self, state: StreamState, queue_size: int):
        self.state = state
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.decoder: threading.Thread | None = None
        self.done = False


class Loop:
    """One backend, one scheduler per stream: `run` videos to (stream number, FrameResult).
    `max_batch`: frames per backend call (default and at most the profile's batch limit,
    manifest["profile"]["max"][0]; None on a backend without a profile: any). A FrameResult's
    stage times are its share of each batched call."""

    batched = False  # StreamPipeline: refuses a one-stream CUDA-graph backend even for one

    def __init__(self, backend: Backend, schedulers: Sequence[Scheduler], *,
                 max_batch: int | None = None, queue_size: int = 8,
                 flow: DisFlow | None = None, copy: bool = False,
                 propagate: Propagator | None = None):
        if not schedulers:
            raise ValueError("a run needs one scheduler per stream, got none")
        if len({id(s) for s in schedulers}) != len(schedulers):
            raise ValueError("each stream needs its own scheduler object (they keep state)")
        if queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, got {queue_size}")
        limit = int(backend.profile["max"][0]) if backend.profile else None
        if max_batch is not None and max_batch < 1:
            raise DffError(f"max batch {max_batch}: need at least 1 frame per call")
        if max_batch is not None and limit is not None and max_batch > limit:
            raise DffError(f"max batch {max_batch} is above the engines' batch limit {limit} "
                           "(manifest.json 'profile' max); pick at most that, or re-export with "
                           f"a batch of {max_batch} in --max-shape NxHxW")
        if backend.cuda_graph and (self.batched or len(schedulers) > 1):
            raise DffError(  # its flow outputs live until the next flow: one stream's replay
                           "a CUDA-graph backend (--useCudaGraph) replays one stream's flow and "
                           "task; open the backend without it for batched streams")
        check_flow(backend, flow, schedulers)
        check_between(flow, copy, propagate, schedulers)
        self.backend, self.schedulers, self.flow = backend, list(schedulers), flow
        self.copy, self.propagate = copy, propagate
        self.max_batch = max_batch if max_batch is not None else limit
        self.queue_size = queue_size
        self._reset([f"stream {i}" for i in range(len(self.schedulers))])

    def _reset(self, names: Sequence[str | None]) -> None:
        self._inputs = [_Input(StreamState(s, name, i), self.queue_size)
                        for i, (name, s) in enumerate(zip(names, self.schedulers))]
        self._step = Step(self.backend, self.max_batch, flow=self.flow, copy=self.copy,
                          propagate=self.propagate)
        self._per_frame = {name: Timings() for name in ("decode", "total")}
        self._wait = 0.0
        self._start: float | None = None
        self._end: float | None = None

    def run(self, videos: Sequence[Iterable[np.ndarray]],
            names: Sequence[str | None] | None = None
            ) -> Generator[tuple[int, FrameResult], None, None]:
        """Yield (stream number, FrameResult) for every frame; per stream in frame order, per
        step in stream order. `names` label the streams in errors and the summary. Restarts
        every schedule and the statistics; an exception of a decoder is re-raised here."""
        if len(videos) != len(self.schedulers):
            raise ValueError(f"{len(videos)} videos for {len(self.schedulers)} schedulers")
        if names is None:  # one stream of a Pipeline needs no name in its errors
            unnamed = len(videos) == 1 and not self.batched
            names = [None if unnamed else f"stream {i}" for i in range(len(videos))]
        self._reset(list(names))
        stop = threading.Event()
        for i, frames in zip(self._inputs, videos):
            i.state.scheduler.reset()
            i.decoder = threading.Thread(target=_decode, args=(frames, i.queue, stop),
                                         name=f"dff-decode-{i.state.number}", daemon=True)
        self._start = time.perf_counter()
        for i in self._inputs:
            i.decoder.start()  # type: ignore[union-attr]
        # one stream: the next frame is uploaded ahead where that overlaps (Step's docstring)
        ahead = self._peek if len(self._inputs) == 1 else None
        try:
            while True:
                frames = self._next_frames()
                if not frames:
                    break
                self._step([f for f, _ in frames], ahead)
                for f, decode_s in frames:
                    f.times["decode"] = decode_s
                    for name in self._per_frame:
                        self._per_frame[name].add(f.times[name])
                    yield f.stream.number, FrameResult(f.index, f.frame, f.outputs(), f.is_key,
                                                       f.times)
            self.backend.synchronize()
        finally:
            self._end = time.perf_counter()
            stop.set()
            for i in self._inputs:
                if i.decoder is not None:
                    i.decoder.join(_JOIN)
                i.state.release()
            self._step.drop_staged()

    def _next_frames(self) -> list[Any]:
        frames = []
        for i in self._inputs:
            if i.done:
                continue
            wait = time.perf_counter()
            item = i.queue.get()
            self._wait += time.perf_counter() - wait
            if item is _END:
                i.done = True
                continue
            if isinstance(item, _Failure):
                raise item.exc
            frame, array, decode_s = item
            s = i.state
            frames.append((Frame(s, s.next, frame, array), decode_s))
            s.next += 1
        return frames

    def _peek(self) -> list[np.ndarray]:
        """The first stream's next decoded frame's NCHW copy, if it is already waiting."""
        q = self._inputs[0].queue
        with q.mutex:
            item = q.queue[0] if q.queue else None
        return [item[1]] if isinstance(item, tuple) and item[1] is not None else []

    def run_to(self, videos: Sequence[Iterable[np.ndarray]],
               sinks: Sequence[Callable[[FrameResult], None]],
               names: Sequence[str | None] | None = None) -> dict:
        """`run` with `sinks[i](result)` called for stream i's results, in order, each sink in
        its own writer thread at most `queue_size` results behind. An exception in a decoder,
        the compute or a sink stops every thread and is re-raised here. Returns `summary()`;
        its wall time ends when the sinks have taken the last result."""
        if len(sinks) != len(videos):
            raise ValueError(f"{len(sinks)} sinks for {len(videos)} videos")
        queues: list[queue.Queue] = [queue.Queue(maxsize=self.queue_size) for _ in sinks]
        stop = threading.Event()
        errors: list[BaseException] = []
        writers = [threading.Thread(target=_drain, args=(q, sink, stop, errors),
                                    name=f"dff-write-{i}", daemon=True)
                   for i, (q, sink) in enumerate(zip(queues, sinks))]
        for w in writers:
            w.start()
        results = Loop.run(self, videos, names)
        try:
            for number, result in results:
                if not _put(queues[number], result, stop):
                    break  # a sink failed
            for q in queues:
                _put(q, _END, stop)
            for w in writers:
                while w.is_alive():  # a join that Ctrl-C can interrupt
                    w.join(_POLL)
        except BaseException:
            stop.set()
            raise
        finally:
            results.close()
            for w in writers:
                w.join(_JOIN)
        if errors:
            raise errors[0]
        self._end = time.perf_counter()
        return self.summary()

    def summary(self) -> dict:
        """Frames, key frames, wall time and fps in all and per stream; per stage the backend
        calls, frames through them (`count`), mean batch, total and median seconds per call
        (decode and total: per frame); the runtime efficiency of DESIGN.md §5 (Σ over compute
        stages of median × calls / wall; decode runs beside compute, so it is not in the sum)
        and `busy` (their total time / wall: the compute thread's share of the wall time)."""
        end = self._end if self._end is not None else time.perf_counter()
        wall = end - self._start if self._start is not None else 0.0
        states = [i.state for i in self._inputs]
        frames = sum(s.frames for s in states)
        calls = self._step.calls
        stages = {name: {"calls": c.count, "count": c.frames,
                         "batch": c.frames / c.count if c.count else 0.0,
                         "total_s": c.total, "median_s": c.median()}
                  for name, c in (*calls.items(), *self._per_frame.items())}
        by_median = sum(calls[n].median() * calls[n].count for n in STAGES)
        busy = sum(calls[n].total for n in STAGES)
        return {
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "flow": self.flow.settings() if self.flow is not None else {"source": LEARNED},
            "propagate": (self.propagate.kind if self.propagate is not None
                          else "copy" if self.copy else "dff"),
            "streams": len(states),
            "max_batch": self.max_batch,
            "frames": frames,
            "key_frames": sum(s.key_frames for s in states),
            "wall_s": wall,
            "fps": frames / wall if wall > 0 else 0.0,
            "fps_per_stream": frames / wall / len(states) if wall > 0 else 0.0,
            "stages": stages,
            "efficiency": by_median / wall if wall > 0 else 0.0,
            "busy": busy / wall if wall > 0 else 0.0,
            "decode_wait_s": self._wait,
            "per_stream": [{"name": s.name, "scheduler": repr(s.scheduler), "frames": s.frames,
                            "key_frames": s.key_frames, "schedule": s.scheduler.stats()}
                           for s in states],
        }


def check_flow(backend: Backend, flow: DisFlow | None, schedulers: Sequence[Scheduler]) -> None:
    """Refuse, before any frame, a host flow the backend cannot warp, or with a schedule that
    needs what only a learned flow graph gives (the learned schedule's quality; a CUDA graph's
    replay of flow.onnx)."""
    if flow is None:
        return
    if DIS not in backend.flow_sources:
        raise warp_missing(backend.name)
    if any(s.needs_quality for s in schedulers):
        raise DffError("--schedule learned reads the learned flow graph's quality output, "
                       "which --flow dis has not; pick --schedule adaptive or fixed")
    if backend.cuda_graph:
        raise DffError("--useCudaGraph replays the learned flow graph; drop it with --flow dis")


def check_between(flow: DisFlow | None, copy: bool, propagate: Propagator | None,
                  schedulers: Sequence[Scheduler]) -> None:
    """Refuse two ways of filling the frames between key frames at once, and a schedule that
    reads a flow (adaptive, learned) where no flow is computed (copy, carried outputs)."""
    if copy and propagate is not None:
        raise DffError(f"--propagate: copy and {propagate.kind} are two ways of filling the "
                       "frames between key frames; pick one")
    if (copy or propagate is not None) and flow is not None:
        raise DffError(f"--propagate {propagate.kind if propagate else 'copy'} computes no "
                       "feature flow; drop --flow dis")
    if (copy or propagate is not None) and any(s.needs_flow for s in schedulers):
        raise DffError(f"--propagate {propagate.kind if propagate else 'copy'} computes no "
                       "flow for the adaptive or learned schedule to judge; pick --schedule "
                       "fixed")


class Pipeline(Loop):
    """One backend, one scheduler; `run` a video's frames (HWC uint8 RGB) to FrameResults."""

    def __init__(self, backend: Backend, scheduler: Scheduler, *, queue_size: int = 8,
                 flow: DisFlow | None = None, copy: bool = False,
                 propagate: Propagator | None = None):
        super().__init__(backend, [scheduler], max_batch=1, queue_size=queue_size, flow=flow,
                         copy=copy, propagate=propagate)
        self.scheduler = scheduler

    def run(self, frames: Iterable[np.ndarray]  # type: ignore[override]
            ) -> Generator[FrameResult, None, None]:
        """Yield one FrameResult per frame, in order. Frames are decoded (iterated) in a
        background thread at most `queue_size` ahead; an exception there is re-raised here.
        Restarts the schedule (key frame at the first frame) and the statistics."""
        results = Loop.run(self, [frames])
        try:
            for _, result in results:
                yield result
        finally:
            results.close()

    def run_to(self, frames: Iterable[np.ndarray],  # type: ignore[override]
               sink: Callable[[FrameResult], None]) -> dict:
        """`run` with `sink(result)` called in a writer thread (Loop.run_to)."""
        return super().run_to([frames], [sink])

    def summary(self) -> dict:
        """Loop.summary, with the one stream's scheduler and schedule statistics."""
        s = super().summary()
        return s | {"scheduler": repr(self.scheduler), "schedule": self.scheduler.stats()}


class StreamPipeline(Loop):
    """Loop over several streams (DESIGN.md §9): each stream's results equal a `Pipeline` run
    of its video."""

    batched = True
