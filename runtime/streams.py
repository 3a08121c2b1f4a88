"""Many streams through one backend, batched (DESIGN.md §7).

Each stream has its own scheduler and key image and features; its video is decoded in its own
thread, as in `Pipeline`. A step takes the next frame of every stream that has not ended
(waiting for its decoder, so the batches depend on the videos alone), then runs the non-key
frames through `flow` as one batch (image, key_image, key_feat stacked across streams), the key
frames through `feature` as one batch (a frame whose flow the adaptive schedule rejects joins
them, as in `Pipeline`), and every frame through `task` as one batch; each call in chunks of at
most `max_batch` frames (the profile's batch limit) of one frame size. Key images and features
stay backend handles: rows of a batch come out with `backend.split`, and `backend.stack` puts
rows of different streams together. Each stream's results equal a `Pipeline` run of its video.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dff.runtime.backends import Backend, host_quality
from dff.runtime.pipeline import (
    _END,
    _JOIN,
    _POLL,
    STAGES,
    FrameResult,
    _decode,
    _Failure,
    _nchw,
    _put,
    _Stage,
    check_first_frame,
    drain,
    frame_outputs,
)
from dff.runtime.scheduler import Scheduler

from dff.errors import DffError


class _Stream:
    """One stream's state: scheduler, decode queue, key handles, frame size and counts."""

    def __init__(self, number: int, name: str, scheduler: Scheduler, queue_size: int):
        self.number, self.name, self.scheduler = number, name, scheduler
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.decoder: threading.Thread | None = None
        self.next = 0  # index of its next frame
        self.done = False
        self.key_image: tuple[_Batch, int] | None = None  # a batch and this stream's row
        self.key_feat: tuple[_Batch, int] | None = None
        self.shape: tuple[int, ...] | None = None
        self.frames = self.key_frames = 0


class _Batch:
    """A batched handle (images or features of n frames); its rows (`backend.split`) made
    once, when first needed."""

    def __init__(self, backend: Backend, handle: Any, n: int):
        self.backend, self.handle, self.n = backend, handle, n
        self._rows: list[Any] | None = None

    def row(self, j: int) -> Any:
        if self._rows is None:
            self._rows = self.backend.split(self.handle) if self.n > 1 else [self.handle]
        return self._rows[j]


def _gather(backend: Backend, rows: list[Any]) -> Any:
    """One handle of these rows, in order: a whole batch in its own order as it is (no copy),
    else the rows stacked (`backend.stack`)."""
    first = rows[0][0]
    if first.n == len(rows) and all(r == (first, j) for j, r in enumerate(rows)):
        return first.handle
    return backend.stack([batch.row(j) for batch, j in rows])


@dataclass
class _Item:
    """One frame of a step."""

    stream: _Stream
    index: int
    frame: np.ndarray
    nchw: Any
    decode_s: float
    is_key: bool = False
    feat: tuple[_Batch, int] | None = None  # its features: a batch and the row in it
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)


class StreamPipeline:
    """One backend, one scheduler per stream; `run` videos (iterables of HWC uint8 RGB frames)
    to (stream number, FrameResult) pairs. `max_batch`: frames per backend call (default and
    at most the profile's batch limit, manifest["profile"]["max"][0]; None on a backend
    without a profile: any). A FrameResult's stage times are its share of each batched call.
    Not with a TensorRT backend that replays CUDA graphs (`cuda_graph=True`)."""

    def __init__(self, backend: Backend, schedulers: Sequence[Scheduler], *,
                 max_batch: int | None = None, queue_size: int = 8):
        if not schedulers:
            raise ValueError("StreamPipeline needs one scheduler per stream, got none")
        if len({id(s) for s in schedulers}) != len(schedulers):
            raise ValueError("each stream needs its own scheduler object (they keep state)")
        if queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, got {queue_size}")
        profile = getattr(backend, "profile", None)
        limit = int(profile["max"][0]) if profile else None
        if max_batch is not None and max_batch < 1:
            raise DffError(f"max batch {max_batch}: need at least 1 frame per call")
        if max_batch is not None and limit is not None and max_batch > limit:
            raise DffError(f"max batch {max_batch} is above the engines' batch limit {limit} "
                           "(manifest.json 'profile' max); pick at most that, or re-export with "
                           f"a batch of {max_batch} in --max-shape NxHxW")
        if getattr(backend, "cuda_graph", False):  # its flow outputs live until the next flow
            raise DffError("a CUDA-graph backend (--useCudaGraph) replays one stream's flow and "
                           "task; open the backend without it for batched streams")
        self.backend, self.schedulers = backend, list(schedulers)
        self.max_batch = max_batch if max_batch is not None else limit
        self.queue_size = queue_size
        self._reset([f"stream {i}" for i in range(len(self.schedulers))])

    def _reset(self, names: list[str]) -> None:
        self._streams = [_Stream(i, name, s, self.queue_size)
                         for i, (name, s) in enumerate(zip(names, self.schedulers))]
        self._calls = {name: _Stage() for name in STAGES}
        self._call_frames = dict.fromkeys(STAGES, 0)
        self._wait = 0.0
        self._start: float | None = None
        self._end: float | None = None

    # --- the loop ---------------------------------------------------------------------------

    def run(self, videos: Sequence[Iterable[np.ndarray]], names: Sequence[str] | None = None
            ) -> Generator[tuple[int, FrameResult], None, None]:
        """Yield (stream number, FrameResult) for every frame; per stream in frame order, per
        step in stream order. `names` label the streams in errors and the summary. Restarts
        every schedule and the statistics; an exception of a decoder is re-raised here."""
        if len(videos) != len(self.schedulers):
            raise ValueError(f"{len(videos)} videos for {len(self.schedulers)} schedulers")
        names = list(names) if names is not None else [f"stream {i}" for i in range(len(videos))]
        self._reset(names)
        stop = threading.Event()
        for s, frames in zip(self._streams, videos):
            s.scheduler.reset()
            s.decoder = threading.Thread(target=_decode, args=(frames, s.queue, stop),
                                         name=f"dff-decode-{s.number}", daemon=True)
        self._start = time.perf_counter()
        for s in self._streams:
            assert s.decoder is not None
            s.decoder.start()
        try:
            while True:
                items = self._next_frames()
                if not items:
                    break
                self._step(items)
                for it in items:
                    result = FrameResult(it.index, it.frame, it.outputs, it.is_key, it.times)
                    it.stream.frames += 1
                    it.stream.key_frames += it.is_key
                    yield it.stream.number, result
            self.backend.synchronize()
        finally:
            self._end = time.perf_counter()
            stop.set()
            for s in self._streams:
                if s.decoder is not None:
                    s.decoder.join(_JOIN)
                s.key_image = s.key_feat = None  # device memory back

    def _next_frames(self) -> list[_Item]:
        items = []
        for s in self._streams:
            if s.done:
                continue
            wait = time.perf_counter()
            item = s.queue.get()
            self._wait += time.perf_counter() - wait
            if item is _END:
                s.done = True
                continue
            if isinstance(item, _Failure):
                raise item.exc
            frame, nchw, decode_s = item
            items.append(_Item(s, s.next, frame, nchw, decode_s))
            s.next += 1
        return items

    def run_to(self, videos: Sequence[Iterable[np.ndarray]],
               sinks: Sequence[Callable[[FrameResult], None]],
               names: Sequence[str] | None = None) -> dict:
        """`run` with `sinks[i](result)` called for stream i's results, in order, each sink in
        its own writer thread at most `queue_size` results behind. An exception in a decoder,
        the compute or a sink stops every thread and is re-raised here. Returns `summary()`."""
        if len(sinks) != len(videos):
            raise ValueError(f"{len(sinks)} sinks for {len(videos)} videos")
        queues: list[queue.Queue] = [queue.Queue(maxsize=self.queue_size) for _ in sinks]
        stop = threading.Event()
        errors: list[BaseException] = []

        writers = [threading.Thread(target=drain, args=(q, sink, stop, errors),
                                    name=f"dff-write-{i}", daemon=True)
                   for i, (q, sink) in enumerate(zip(queues, sinks))]
        for w in writers:
            w.start()
        results = self.run(videos, names)
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

    # --- one step ---------------------------------------------------------------------------

    def _step(self, items: list[_Item]) -> None:
        start = time.perf_counter()
        for it in items:
            s = it.stream
            it.is_key = s.scheduler.decide(it.index, it.frame)
            if not it.is_key and s.key_feat is None:
                raise RuntimeError(f"{s.scheduler!r} made no key frame at the start of {s.name}")
            it.nchw = self._to_nchw(it)
        self._call("schedule", items, time.perf_counter() - start)
        for chunk in self._chunks([it for it in items if not it.is_key]):
            self._flow(chunk)
        for chunk in self._chunks([it for it in items if it.is_key]):  # redone ones too
            self._feature(chunk)
        for chunk in self._chunks(items):
            self._task(chunk)
        for it in items:
            it.times["total"] = sum(it.times.values())
            it.times["decode"] = it.decode_s

    def _chunks(self, items: list[_Item]) -> Iterator[list[_Item]]:
        """`items` by frame size (in order of first appearance), in runs of max_batch."""
        groups: dict[tuple[int, ...], list[_Item]] = {}
        for it in items:
            groups.setdefault(it.nchw.shape, []).append(it)
        for group in groups.values():
            n = self.max_batch or len(group)
            for i in range(0, len(group), n):
                yield group[i:i + n]

    def _upload(self, chunk: list[_Item]) -> Any:
        images = [it.nchw for it in chunk]
        return self.backend.upload(images[0] if len(images) == 1 else np.concatenate(images))

    def _flow(self, chunk: list[_Item]) -> None:
        b, start = self.backend, time.perf_counter()
        image = self._upload(chunk)
        key_image = _gather(b, [it.stream.key_image for it in chunk])
        key_feat = _gather(b, [it.stream.key_feat for it in chunk])
        mid = time.perf_counter()
        self._call("upload", chunk, mid - start)
        out = b.flow(image, key_image, key_feat)
        batch = _Batch(b, out[2], len(chunk))
        schedulers = [it.stream.scheduler for it in chunk]
        host = b.to_host(out[0]) if any(s.needs_flow for s in schedulers) else None
        quality = host_quality(b, out, schedulers)
        for j, it in enumerate(chunk):
            scheduler = it.stream.scheduler
            if host is not None and scheduler.needs_flow and not scheduler.accept(
                    host[j:j + 1], None if quality is None else quality[j:j + 1]):
                it.is_key = True  # propagation not trusted: redone as a key frame
            else:
                it.feat = (batch, j)
        self._call("flow", chunk, time.perf_counter() - mid)

    def _feature(self, chunk: list[_Item]) -> None:
        b, start = self.backend, time.perf_counter()
        image = self._upload(chunk)
        mid = time.perf_counter()
        self._call("upload", chunk, mid - start)
        images, feats = _Batch(b, image, len(chunk)), _Batch(b, b.feature(image), len(chunk))
        for j, it in enumerate(chunk):
            it.stream.key_image, it.stream.key_feat = (images, j), (feats, j)
            it.feat = (feats, j)
        self._call("feature", chunk, time.perf_counter() - mid)

    def _task(self, chunk: list[_Item]) -> None:
        start = time.perf_counter()
        outputs = self.backend.task(_gather(self.backend, [it.feat for it in chunk]))
        for j, it in enumerate(chunk):
            it.outputs = frame_outputs(outputs, j)
            it.feat = None
        self._call("task", chunk, time.perf_counter() - start)

    def _call(self, stage: str, chunk: list[_Item], seconds: float) -> None:
        self._calls[stage].add(seconds)
        self._call_frames[stage] += len(chunk)
        for it in chunk:
            it.times[stage] = it.times.get(stage, 0.0) + seconds / len(chunk)

    def _to_nchw(self, it: _Item) -> Any:
        s, frame = it.stream, it.frame
        try:
            if s.shape is None:
                check_first_frame(self.backend, it.index, frame)
                s.shape = frame.shape
            elif frame.shape != s.shape:
                raise DffError(f"frame {it.index}: {frame.shape[1]}x{frame.shape[0]}, but the "
                               f"video started at {s.shape[1]}x{s.shape[0]}; every frame of a "
                               "video must have one size")
        except DffError as e:
            raise DffError(f"{s.name}: {e}") from None
        return it.nchw if it.nchw is not None else _nchw(frame)

    # --- statistics -------------------------------------------------------------------------

    def summary(self) -> dict:
        """Frames, key frames, wall time and fps in all and per stream; per stage the backend
        calls, frames through them, mean batch, total and median seconds per call; the
        runtime efficiency (Σ compute stages' median × calls / wall) and `busy` (their total
        time / wall), as in Pipeline.summary."""
        end = self._end if self._end is not None else time.perf_counter()
        wall = end - self._start if self._start is not None else 0.0
        frames = sum(s.frames for s in self._streams)
        stages = {name: {"calls": c.count, "count": self._call_frames[name],
                         "batch": self._call_frames[name] / c.count if c.count else 0.0,
                         "total_s": c.total, "median_s": c.median()}
                  for name, c in self._calls.items()}
        by_median = sum(c.median() * c.count for c in self._calls.values())
        busy = sum(c.total for c in self._calls.values())
        return {
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "precision": getattr(self.backend, "precision", None),
            "streams": len(self._streams),
            "max_batch": self.max_batch,
            "frames": frames,
            "key_frames": sum(s.key_frames for s in self._streams),
            "wall_s": wall,
            "fps": frames / wall if wall > 0 else 0.0,
            "fps_per_stream": frames / wall / len(self._streams) if wall > 0 else 0.0,
            "stages": stages,
            "efficiency": by_median / wall if wall > 0 else 0.0,
            "busy": busy / wall if wall > 0 else 0.0,
            "decode_wait_s": self._wait,
            "per_stream": [{"name": s.name, "scheduler": repr(s.scheduler), "frames": s.frames,
                            "key_frames": s.key_frames, "schedule": s.scheduler.stats()}
                           for s in self._streams],
        }
