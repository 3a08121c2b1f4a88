"""Device and pinned host memory, streams and events: the runtime's whole memory story.

A `Memory` allocates, copies and orders work: `CudaMemory` through cuda-python's runtime API
(every call's error code checked), or `HostMemory`, numpy and memmove, synchronous, which exists
so that everything above it runs and is tested without a GPU (it is not a performance path).
On top: `DeviceBuffer`/`PinnedBuffer` (one tensor's memory, grown only when needed), `BufferPool`
(buffers handed out as `DeviceArray` views, one reused only when no view of it is left, so a
handle a caller keeps stays intact), `PinnedRing` (frames through pinned slots, H2D on an upload
stream that the compute stream waits for, results back by async D2H) and `Timer` (GPU ms of
named spans from event pairs). Each has an idempotent close() and works with `with`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import time
import types
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from dff.errors import DffError


class CudaError(DffError):
    """cuda-python missing, no usable GPU, or a CUDA call that failed."""


class Memory(Protocol):
    """Allocation, copies, streams and events; pointers are ints, streams and events opaque."""

    device_type: str  # where device memory lives, as ONNX Runtime names it: "cuda" or "cpu"
    device_id: int

    def activate(self) -> None: ...  # make the device current in the calling thread
    def alloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def alloc_host(self, nbytes: int) -> int: ...  # pinned (page-locked) host memory
    def free_host(self, ptr: int) -> None: ...
    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None: ...
    def stream(self) -> Any: ...
    def stream_handle(self, stream: Any) -> int: ...  # what ONNX Runtime and TensorRT take
    def destroy_stream(self, stream: Any) -> None: ...
    def synchronize(self, stream: Any) -> None: ...
    def event(self, timing: bool = False) -> Any: ...
    def destroy_event(self, event: Any) -> None: ...
    def record(self, event: Any, stream: Any) -> None: ...
    def wait(self, stream: Any, event: Any) -> None: ...  # `stream` waits, not the host
    def event_synchronize(self, event: Any) -> None: ...  # the host waits
    def event_done(self, event: Any) -> bool: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...


def nbytes_of(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def host_view(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy array over host memory at `ptr` (pinned, or HostMemory's device memory)."""
    nbytes = nbytes_of(shape, dtype)
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))
    return raw[:nbytes].view(dtype).reshape(shape)


# --- CUDA (cuda-python) ---------------------------------------------------------------------

def cuda_runtime() -> Any:
    """`cuda.bindings.runtime`, or one CudaError saying how to install it."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise CudaError(f"the GPU path needs cuda-python ({e}): pip install dff-trt[gpu]") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings.runtime call's (err, *values); CudaError on an error code."""
    err, *values = result
    if int(err) != 0:
        rt = cuda_runtime()
        name, text = (f(err)[1] for f in (rt.cudaGetErrorName, rt.cudaGetErrorString))
        raise CudaError(f"{what} failed: {name.decode()} ({text.decode()})")
    return values[0] if len(values) == 1 else tuple(values)


class CudaMemory:
    """The Memory of CUDA device `device`: each operation one runtime call, its error checked."""

    device_type = "cuda"

    def __init__(self, device: int = 0):
        self.rt = rt = cuda_runtime()
        self.device_id = device
        try:
            self.activate()
            self._call("cudaFree", 0)  # creates the device's primary context now
        except CudaError as e:
            raise CudaError(f"no usable CUDA device {device}: {e}; check nvidia-smi, or pick a "
                            "CPU backend (--backend onnxruntime-cpu)") from None
        kind = rt.cudaMemcpyKind
        self._kinds = {"h2d": kind.cudaMemcpyHostToDevice, "d2h": kind.cudaMemcpyDeviceToHost,
                       "d2d": kind.cudaMemcpyDeviceToDevice}

    def _call(self, name: str, *args: Any) -> Any:
        return check(getattr(self.rt, name)(*args), name)

    def activate(self) -> None:
        self._call("cudaSetDevice", self.device_id)

    def alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(nbytes, 1)))

    def alloc_host(self, nbytes: int) -> int:
        return int(self._call("cudaMallocHost", max(nbytes, 1)))

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, self._kinds[kind], stream)

    def stream(self) -> Any:
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def event(self, timing: bool = False) -> Any:
        flags = self.rt.cudaEventDefault if timing else self.rt.cudaEventDisableTiming
        return self._call("cudaEventCreateWithFlags", flags)

    def event_done(self, event: Any) -> bool:
        result = self.rt.cudaEventQuery(event)
        if result[0] == self.rt.cudaError_t.cudaErrorNotReady:
            return False
        check(result, "cudaEventQuery")
        return True

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cudaEventElapsedTime", start, end))

    # the rest is one call each
    def free(self, ptr: int) -> None: self._call("cudaFree", ptr)
    def free_host(self, ptr: int) -> None: self._call("cudaFreeHost", ptr)
    def stream_handle(self, stream: Any) -> int: return int(stream)
    def destroy_stream(self, stream: Any) -> None: self._call("cudaStreamDestroy", stream)
    def synchronize(self, stream: Any) -> None: self._call("cudaStreamSynchronize", stream)
    def destroy_event(self, event: Any) -> None: self._call("cudaEventDestroy", event)
    def record(self, event: Any, stream: Any) -> None: self._call("cudaEventRecord", event, stream)
    def wait(self, stream: Any, event: Any) -> None:
        self._call("cudaStreamWaitEvent", stream, event, 0)
    def event_synchronize(self, event: Any) -> None: self._call("cudaEventSynchronize", event)


# --- the CPU stand-in -----------------------------------------------------------------------

class HostMemory:
    """The Memory interface on plain host memory: copies are memmove, done when they return,
    streams are tokens and events always complete (timed with the host clock). It exists to
    test the logic above it without a GPU; it is not a performance path."""

    device_type = "cpu"
    device_id = 0

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}  # ptr -> the array that owns it
        self._tokens = itertools.count(1)

    def alloc(self, nbytes: int) -> int:
        block = np.empty(max(nbytes, 1), np.uint8)
        self._blocks[block.ctypes.data] = block
        return int(block.ctypes.data)

    def free(self, ptr: int) -> None:
        del self._blocks[ptr]  # a KeyError is a double free: a bug above

    alloc_host, free_host = alloc, free

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        ctypes.memmove(dst, src, nbytes)

    def stream(self) -> Any: return next(self._tokens)
    def stream_handle(self, stream: Any) -> int: return int(stream)
    def event(self, timing: bool = False) -> Any: return types.SimpleNamespace(time=0.0)
    def record(self, event: Any, stream: Any) -> None: event.time = time.perf_counter()
    def elapsed_ms(self, start: Any, end: Any) -> float: return (end.time - start.time) * 1e3
    def event_done(self, event: Any) -> bool: return True
    # synchronous: nothing to order, wait for or destroy
    def activate(self) -> None: pass
    def destroy_stream(self, stream: Any) -> None: pass
    def synchronize(self, stream: Any) -> None: pass
    def destroy_event(self, event: Any) -> None: pass
    def wait(self, stream: Any, event: Any) -> None: pass
    def event_synchronize(self, event: Any) -> None: pass


# --- buffers --------------------------------------------------------------------------------

class _Owned:
    """close() (idempotent) and `with`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceArray:
    """A typed view of device memory: the handle the GPU backends hand out. It keeps its
    buffer alive, and a pool or ring reuses that buffer only once the view is gone."""

    __slots__ = ("__weakref__", "buffer", "dtype", "ptr", "shape")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: Any, buffer: Any = None):
        self.ptr, self.shape, self.dtype, self.buffer = ptr, tuple(shape), np.dtype(dtype), buffer

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


class DeviceBuffer(_Owned):
    """Device memory for one tensor: allocated by the first `ensure`, reallocated only when a
    later shape needs more bytes than it has."""

    pinned = False

    def __init__(self, memory: Memory):
        self.memory, self.ptr, self.capacity = memory, 0, 0
        self.shape: tuple[int, ...] = (0,)
        self.dtype = np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    def ensure(self, shape: tuple[int, ...], dtype: Any) -> DeviceBuffer:
        nbytes = nbytes_of(shape, dtype)
        if nbytes > self.capacity:
            self.close()
            alloc = self.memory.alloc_host if self.pinned else self.memory.alloc
            self.ptr, self.capacity = alloc(nbytes), nbytes
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        return self

    def view(self) -> DeviceArray:
        return DeviceArray(self.ptr, self.shape, self.dtype, self)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr, self.capacity = self.ptr, 0, 0
            (self.memory.free_host if self.pinned else self.memory.free)(ptr)


class PinnedBuffer(DeviceBuffer):
    """Pinned host memory for one tensor, grown like DeviceBuffer; `array()` views it."""

    pinned = True

    def array(self) -> np.ndarray:
        return host_view(self.ptr, self.shape, self.dtype)


class BufferPool(_Owned):
    """Device buffers handed out as views; a buffer is reused once no view of it is alive, and
    the pool grows while all are held. On one stream nothing more is needed: a later write
    is ordered after every read enqueued before it."""

    def __init__(self, memory: Memory):
        self.memory = memory
        self._buffers: list[DeviceBuffer] = []
        self._views: list[weakref.ref[DeviceArray] | None] = []

    def __len__(self) -> int:
        return len(self._buffers)

    def take(self, shape: tuple[int, ...], dtype: Any) -> DeviceArray:
        free = [i for i, ref in enumerate(self._views) if ref is None or ref() is None]
        fits = [i for i in free if self._buffers[i].capacity >= nbytes_of(shape, dtype)]
        if not free:
            free = [len(self._buffers)]
            self._buffers.append(DeviceBuffer(self.memory))
            self._views.append(None)
        i = (fits or free)[0]
        view = self._buffers[i].ensure(shape, dtype).view()
        self._views[i] = weakref.ref(view)
        return view

    def close(self) -> None:
        buffers, self._buffers, self._views = self._buffers, [], []
        for buffer in buffers:
            buffer.close()


# TensorRT refuses tensor addresses that are not aligned (256 bytes is what cudaMalloc gives
# and what its docs ask for); a row view is only made at such an offset
ALIGN = 256


def split_rows(x: DeviceArray, memory: Memory, stream: Any,
               pool: BufferPool) -> list[DeviceArray]:
    """`x` [N,...] as N arrays [1,...] along the batch axis: views of its rows when a row is a
    multiple of ALIGN bytes (each view keeps `x`, and so its pool buffer, alive), else copies
    into buffers from `pool`, enqueued on `stream` (d2d)."""
    n, row = x.shape[0], (1, *x.shape[1:])
    step = nbytes_of(row, x.dtype)
    if n == 1:
        return [x]
    if step % ALIGN == 0:
        return [DeviceArray(x.ptr + i * step, row, x.dtype, x) for i in range(n)]
    parts = []
    for i in range(n):
        y = pool.take(row, x.dtype)
        memory.copy(y.ptr, x.ptr + i * step, step, "d2d", stream)
        parts.append(y)
    return parts


def stack_rows(xs: Sequence[DeviceArray], memory: Memory, stream: Any,
               pool: BufferPool) -> DeviceArray:
    """`xs` [n_i,...] (equal trailing shapes and dtype) concatenated along the batch axis into
    a buffer from `pool`, one d2d copy each on `stream`; a single array is returned as it is."""
    if len(xs) == 1:
        return xs[0]
    first = xs[0]
    if any(x.shape[1:] != first.shape[1:] or x.dtype != first.dtype for x in xs):
        raise ValueError(f"cannot stack {[(x.shape, str(x.dtype)) for x in xs]} along the batch")
    out = pool.take((sum(x.shape[0] for x in xs), *first.shape[1:]), first.dtype)
    offset = 0
    for x in xs:
        memory.copy(out.ptr + offset, x.ptr, x.nbytes, "d2d", stream)
        offset += x.nbytes
    return out


class _Slot:
    def __init__(self, memory: Memory):
        self.host = PinnedBuffer(memory)
        self.device = DeviceBuffer(memory)
        self.copied = memory.event()  # its last H2D (D2H) is done: the pinned memory is free
        self.used = memory.event()  # the compute stream's last read of `device` is done
        self.view: weakref.finalize | None = None  # alive while the staged view is


class PinnedRing(_Owned):
    """Pinned slots between the host and two streams: `upload` (H2D) and `compute`.

    `stage` copies a frame into a free slot's pinned memory once that slot's previous H2D is
    done, enqueues its H2D on `upload` once `compute` is done with the slot's device buffer,
    and makes `compute` wait for it: the upload of frame t+1 overlaps compute of frame t. A
    slot whose view is still alive (the key frame's image) is skipped; when all are, the ring
    grows. `download` enqueues D2H on `compute` into the next pinned output slot; `result`
    waits for it and returns a copy. `timer` (optional) times each H2D and D2H."""

    def __init__(self, memory: Memory, slots: int = 3, timer: Timer | None = None):
        if slots < 1:
            raise ValueError(f"a ring needs at least one slot, got {slots}")
        self.memory, self.timer = memory, timer
        self.upload, self.compute = memory.stream(), memory.stream()
        self._slots = [_Slot(memory) for _ in range(slots)]
        self._out = [_Slot(memory) for _ in range(slots)]
        self._next = self._next_out = 0

    def __len__(self) -> int:
        return len(self._slots)

    def _free_slot(self) -> int:
        n = len(self._slots)
        for i in (j % n for j in range(self._next, self._next + n)):
            view = self._slots[i].view
            if view is None or not view.alive:
                return i
        self._slots.append(_Slot(self.memory))
        return n

    def _span(self, name: str, stream: Any) -> Any:
        return self.timer.span(name, stream) if self.timer else contextlib.nullcontext()

    def stage(self, frame: np.ndarray) -> tuple[int, DeviceArray]:
        """(slot index, device view of `frame`), `compute` ordered after its H2D."""
        frame = np.ascontiguousarray(frame)
        mem, i = self.memory, self._free_slot()
        slot = self._slots[i]
        mem.event_synchronize(slot.copied)  # never overwrite pinned memory mid-H2D
        slot.host.ensure(frame.shape, frame.dtype)
        np.copyto(slot.host.array(), frame)
        mem.wait(self.upload, slot.used)  # nor device memory that compute may still read
        slot.device.ensure(frame.shape, frame.dtype)
        with self._span("h2d", self.upload):
            mem.copy(slot.device.ptr, slot.host.ptr, frame.nbytes, "h2d", self.upload)
        mem.record(slot.copied, self.upload)
        mem.wait(self.compute, slot.copied)
        view = slot.device.view()
        # the view's death is its last use: every read of it was enqueued before that
        slot.view = weakref.finalize(view, mem.record, slot.used, self.compute)
        slot.view.atexit = False
        self._next = (i + 1) % len(self._slots)
        return i, view

    def download(self, src: DeviceArray) -> int:
        """Enqueue D2H of `src` on `compute` into the next output slot; the slot's index."""
        with self._span("d2h", self.compute):
            return self._download(src)

    def _download(self, src: DeviceArray) -> int:
        i, mem = self._next_out, self.memory
        out, self._next_out = self._out[i], (i + 1) % len(self._out)
        mem.event_synchronize(out.copied)
        out.host.ensure(src.shape, src.dtype)
        mem.copy(out.host.ptr, src.ptr, src.nbytes, "d2h", self.compute)
        mem.record(out.copied, self.compute)
        return i

    def result(self, index: int) -> np.ndarray:
        """Output slot `index`'s data once its D2H is done (a copy: the slot gets reused)."""
        out = self._out[index]
        self.memory.event_synchronize(out.copied)
        return out.host.array().copy()

    def to_host(self, src: DeviceArray) -> np.ndarray:
        return self.result(self.download(src))

    def to_host_all(self, srcs: Sequence[DeviceArray]) -> list[np.ndarray]:
        """Copies of all `srcs` (a task's outputs): every D2H enqueued, as one "d2h" span,
        before the first wait; the output slots grow so that none is reused among them."""
        while len(self._out) < len(srcs):
            self._out.append(_Slot(self.memory))
        with self._span("d2h", self.compute):
            slots = [self._download(src) for src in srcs]
        return [self.result(i) for i in slots]

    def synchronize(self) -> None:
        self.memory.synchronize(self.upload)
        self.memory.synchronize(self.compute)

    def close(self) -> None:
        """Wait for copies in flight (an upload may still be reading a slot), then free."""
        if self.upload is not None:
            self.synchronize()
        slots, self._slots, self._out = self._slots + self._out, [], []
        for slot in slots:
            if slot.view is not None:
                slot.view.detach()
            slot.host.close()
            slot.device.close()
            self.memory.destroy_event(slot.copied)
            self.memory.destroy_event(slot.used)
        if self.upload is not None:
            streams, self.upload, self.compute = (self.upload, self.compute), None, None
            for stream in streams:
                self.memory.destroy_stream(stream)


class Timer(_Owned):
    """GPU time of named spans from event pairs on the span's stream (host time on
    HostMemory): `with timer.span("flow", stream): ...`, then `read()`: ms of the latest span
    of each name, once it has ended."""

    def __init__(self, memory: Memory):
        self.memory = memory
        self._events: dict[str, tuple[Any, Any]] = {}

    @contextlib.contextmanager
    def span(self, name: str, stream: Any) -> Iterator[None]:
        if name not in self._events:
            self._events[name] = (self.memory.event(timing=True), self.memory.event(timing=True))
        start, end = self._events[name]
        self.memory.record(start, stream)
        try:
            yield
        except BaseException:  # a span cut short has no time: `read` must not pair its start
            del self._events[name]  # with an older end, or with an end never recorded
            for event in (start, end):
                self.memory.destroy_event(event)
            raise
        self.memory.record(end, stream)

    def read(self) -> dict[str, float]:
        for _, end in self._events.values():
            self.memory.event_synchronize(end)
        return {name: self.memory.elapsed_ms(*pair) for name, pair in self._events.items()}

    def close(self) -> None:
        events, self._events = self._events, {}
        for pair in events.values():
            for event in pair:
                self.memory.destroy_event(event)


class StreamTimer:
    """dff-profile's device timer of a backend on this layer: `span(work)` brackets the work
    with a Timer's events on `stream` and returns (its result, seconds the call took, seconds
    until the device was done)."""

    def __init__(self, memory: Memory, stream: Any):
        self.timer, self.stream = Timer(memory), stream

    def span(self, work: Any) -> tuple[Any, float, float]:
        start = time.perf_counter()
        with self.timer.span("span", self.stream):
            result = work()
        enqueue = time.perf_counter() - start
        return result, enqueue, self.timer.read()["span"] / 1000

    def close(self) -> None:
        self.timer.close()
