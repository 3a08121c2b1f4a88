"""runtime/buffers.py: device buffers, pools, the pinned ring and event timing, on HostMemory
always and on CudaMemory when a CUDA device is present; a fake memory whose copies run late
proves the ring waits before it overwrites a slot; ONNX Runtime's IOBinding path over
HostMemory gives the labels of a plain run."""

from __future__ import annotations

import ctypes
import gc
import time
import types
from collections import defaultdict

import numpy as np
import pytest
from dff.plugins.kernel import cuda_device_count
from dff.runtime import buffers
from dff.runtime.buffers import (
    BufferPool,
    CudaError,
    CudaMemory,
    DeviceBuffer,
    HostMemory,
    PinnedBuffer,
    PinnedRing,
    Timer,
    host_view,
)

HAVE_CUDA = cuda_device_count() > 0


class Counting:
    """A Memory that counts allocations and frees of the one it wraps."""

    def __init__(self, memory):
        self.inner = memory
        self.calls = defaultdict(int)

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("alloc", "free", "alloc_host", "free_host", "destroy_event",
                    "destroy_stream"):
            def counted(*args):
                self.calls[name] += 1
                return attr(*args)
            return counted
        return attr


@pytest.fixture(params=["host", "cuda"])
def memory(request):
    if request.param == "cuda":
        if not HAVE_CUDA:
            pytest.skip("no CUDA device (cuda_device_count() == 0)")
        return Counting(CudaMemory(0))
    return Counting(HostMemory())


# --- buffers and pools ----------------------------------------------------------------------

def test_device_buffer_reallocates_only_when_the_byte_size_grows(memory):
    with DeviceBuffer(memory) as buf:
        assert buf.ptr == 0 and buf.nbytes == 0
        buf.ensure((2, 3), np.float32)
        first = buf.ptr
        assert (buf.shape, buf.dtype, buf.nbytes, buf.capacity) == ((2, 3), np.float32, 24, 24)
        buf.ensure((3, 2), np.float32)
        buf.ensure((4, 3), np.float16)  # same bytes
        buf.ensure((5,), np.uint8)  # fewer
        assert buf.ptr == first and memory.calls["alloc"] == 1
        assert (buf.shape, buf.dtype, buf.nbytes, buf.capacity) == ((5,), np.uint8, 5, 24)
        buf.ensure((1, 3, 4, 4), np.float32)
        assert memory.calls["alloc"] == 2 and memory.calls["free"] == 1 and buf.capacity == 192
    assert memory.calls["free"] == 2 and buf.ptr == 0


def test_close_is_idempotent_everywhere(memory):
    buf = DeviceBuffer(memory).ensure((8,), np.uint8)
    pinned = PinnedBuffer(memory).ensure((8,), np.uint8)
    pool = BufferPool(memory)
    held = pool.take((4,), np.float32)
    ring = PinnedRing(memory, slots=2)
    _, view = ring.stage(np.zeros((2, 2), np.uint8))
    timer = Timer(memory)
    with timer.span("x", ring.compute):
        pass
    for _ in range(2):
        for owned in (buf, pinned, pool, ring, timer):
            owned.close()
    assert memory.calls["free"] == memory.calls["alloc"] == 3  # buf, pool's, ring's device slot
    assert memory.calls["free_host"] == memory.calls["alloc_host"] == 2  # pinned, ring's slot
    assert memory.calls["destroy_stream"] == 2
    assert memory.calls["destroy_event"] == 2 * 2 * 2 + 2  # 2 events x (2 in + 2 out) + timer
    del held, view  # dropping a view after its ring closed records nothing
    gc.collect()


def test_pool_reuses_a_buffer_only_after_its_views_are_gone(memory):
    with BufferPool(memory) as pool:
        a = pool.take((2, 4), np.float32)
        b = pool.take((2, 4), np.float32)
        assert a.ptr != b.ptr and len(pool) == 2
        ptr_a = a.ptr
        del a
        c = pool.take((1, 4), np.float32)  # fits the freed buffer: no allocation
        assert c.ptr == ptr_a and len(pool) == 2 and memory.calls["alloc"] == 2
        assert (c.shape, c.dtype, c.nbytes) == ((1, 4), np.float32, 16)
        d = pool.take((2, 4), np.float32)  # b and c held: a third buffer
        assert len(pool) == 3 and d.ptr not in (b.ptr, c.ptr)


# --- the ring -------------------------------------------------------------------------------

def frames(n, shape=(3, 4, 5)):
    return [np.full(shape, i, np.uint8) + np.arange(shape[-1], dtype=np.uint8) for i in range(n)]


def test_round_trip_h2d_d2h_is_exact(memory):
    rng = np.random.default_rng(0)
    with PinnedRing(memory) as ring:
        for array in (rng.integers(0, 255, (1, 3, 16, 32), dtype=np.uint8),
                      rng.standard_normal((2, 8, 3, 5)).astype(np.float32),
                      rng.standard_normal((7,)).astype(np.float16)):
            _, view = ring.stage(array)
            assert (view.shape, view.dtype) == (array.shape, array.dtype)
            np.testing.assert_array_equal(ring.to_host(view), array)
        with DeviceBuffer(memory).ensure(view.shape, view.dtype) as copy:  # D2D
            memory.copy(copy.ptr, view.ptr, view.nbytes, "d2d", ring.compute)
            np.testing.assert_array_equal(ring.to_host(copy.view()), array)


def test_ring_skips_a_slot_whose_view_is_alive_and_grows_when_all_are(memory):
    data = frames(12)
    with PinnedRing(memory, slots=3) as ring:
        slot, key = ring.stage(data[0])  # kept, as the pipeline keeps the key frame's image
        for frame in data[1:8]:
            assert ring.stage(frame)[0] != slot  # (its view dies at once)
        np.testing.assert_array_equal(ring.to_host(key), data[0])
        assert len(ring) == 3
        held = [ring.stage(f)[1] for f in data[8:11]]  # now every slot is held
        assert len(ring) == 4
        for view, frame in zip([key, *held], [data[0], *data[8:11]]):
            np.testing.assert_array_equal(ring.to_host(view), frame)


def test_results_come_back_through_the_output_slots_in_order(memory):
    with PinnedRing(memory, slots=2) as ring:
        views = [ring.stage(f)[1] for f in frames(2)]
        slots = [ring.download(v) for v in views]
        assert slots == [0, 1]
        for i, frame in zip(slots, frames(2)):
            np.testing.assert_array_equal(ring.result(i), frame)
        assert ring.download(views[0]) == 0  # wraps around


def test_to_host_all_brings_back_more_arrays_than_output_slots_each_intact():
    """A detection task's four outputs through a ring of two output slots, copies running late:
    every D2H is queued before the first wait, the slots grow, none is reused among them."""
    memory = LateMemory()
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((1, 5, 4)).astype(np.float32),
              rng.standard_normal((1, 5)).astype(np.float32),
              np.arange(5, dtype=np.int32)[None], np.int32([3])]
    with PinnedRing(memory, slots=2) as ring:
        views = [ring.stage(a)[1] for a in arrays]
        ring.synchronize()
        start = len(memory.log)
        got = ring.to_host_all(views)
        d2h = [i for i, entry in enumerate(memory.log[start:]) if entry[:2] == ("copy", "d2h")]
        assert len(d2h) == 4 and len(ring._out) == 4
        for a, b in zip(got, arrays):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        again = ring.to_host_all(views[:1])  # fewer: the grown slots stay
        np.testing.assert_array_equal(again[0], arrays[0])


class LateMemory(HostMemory):
    """HostMemory whose copies run late, as on a GPU: a copy waits in its stream's queue until
    an event recorded after it is synchronised (or the stream is). `carried` is what each copy
    moved when it ran; `log` the ordering calls, events by number."""

    def __init__(self):
        super().__init__()
        self.queues = defaultdict(list)  # stream -> [copy], run or not
        self.ran = defaultdict(int)  # stream -> how many of its copies ran
        self.carried, self.log = [], []
        self.events = 0

    def copy(self, dst, src, nbytes, kind, stream):
        self.queues[stream].append((dst, src, nbytes, kind))
        self.log.append(("copy", kind, stream))

    def _run(self, stream, upto):
        for dst, src, nbytes, kind in self.queues[stream][self.ran[stream]:upto]:
            self.carried.append((kind, bytes(host_view(src, (nbytes,), np.uint8))))
            ctypes.memmove(dst, src, nbytes)
        self.ran[stream] = max(self.ran[stream], upto)

    def event(self, timing=False):
        self.events += 1
        return types.SimpleNamespace(time=0.0, id=self.events, stream=None, upto=0)

    def record(self, event, stream):
        event.stream, event.upto = stream, len(self.queues[stream])
        self.log.append(("record", event.id, stream))

    def wait(self, stream, event):
        self.log.append(("wait", stream, event.id))

    def event_synchronize(self, event):
        if event.stream is not None:
            self._run(event.stream, event.upto)

    def event_done(self, event):
        return event.stream is None or self.ran[event.stream] >= event.upto

    def synchronize(self, stream):
        self._run(stream, len(self.queues[stream]))


def stage_and_drop(ring, data):
    for frame in data:
        ring.stage(frame)  # the view dies at once


def test_fake_memory_catches_a_ring_that_overwrites_an_in_flight_slot(monkeypatch):
    memory = LateMemory()
    monkeypatch.setattr(memory, "event_synchronize", lambda event: None)  # a ring that never waits
    data = frames(6)
    with PinnedRing(memory, slots=3) as ring:
        stage_and_drop(ring, data)
        ring.synchronize()
    carried = [c for kind, c in memory.carried if kind == "h2d"]
    assert carried != [f.tobytes() for f in data]  # frames 0-2 left as frames 3-5


def test_stage_waits_for_a_slots_h2d_before_overwriting_its_pinned_memory():
    memory = LateMemory()
    data = frames(7)
    with PinnedRing(memory, slots=3) as ring:
        stage_and_drop(ring, data)
        assert len(ring) == 3
        in_flight = [not memory.event_done(slot.copied) for slot in ring._slots]
        assert sum(in_flight) == 3  # the last three copies are still queued
        ring.synchronize()
    carried = [c for kind, c in memory.carried if kind == "h2d"]
    assert carried == [f.tobytes() for f in data]


def test_close_lets_copies_in_flight_finish_before_freeing_their_memory():
    memory = LateMemory()
    data = frames(3)
    ring = PinnedRing(memory, slots=3)
    stage_and_drop(ring, data)
    assert memory.carried == []  # all three uploads still queued
    ring.close()
    assert [c for kind, c in memory.carried if kind == "h2d"] == [f.tobytes() for f in data]


def test_stage_orders_h2d_after_computes_last_use_and_compute_after_h2d():
    memory = LateMemory()
    with PinnedRing(memory, slots=1) as ring:
        _, view = ring.stage(frames(1)[0])
        used, copied = ring._slots[0].used.id, ring._slots[0].copied.id
        assert memory.log[-2:] == [("record", copied, ring.upload),
                                   ("wait", ring.compute, copied)]
        del view  # its last use: recorded on the compute stream
        assert memory.log[-1] == ("record", used, ring.compute)
        ring.stage(frames(1)[0])
        log = memory.log[memory.log.index(("record", used, ring.compute)):]
        assert log[:5] == [("record", used, ring.compute), ("wait", ring.upload, used),
                           ("copy", "h2d", ring.upload), ("record", copied, ring.upload),
                           ("wait", ring.compute, copied)]


# --- timing ---------------------------------------------------------------------------------

def test_timer_gives_the_latest_span_of_each_name_in_ms(memory):
    with PinnedRing(memory) as ring, Timer(memory) as timer:
        ring.timer = timer
        with timer.span("wait", ring.compute):
            time.sleep(0.02)
        ring.to_host(ring.stage(np.zeros((64, 64), np.float32))[1])
        ms = timer.read()
    assert sorted(ms) == ["d2h", "h2d", "wait"]
    assert all(v >= 0 for v in ms.values())
    if isinstance(memory.inner, HostMemory):  # host clock: the sleep is in it
        assert 15 <= ms["wait"] < 1000


def test_a_span_cut_short_by_an_error_is_dropped_not_paired_with_an_old_end(memory):
    with PinnedRing(memory) as ring, Timer(memory) as timer:
        with timer.span("flow", ring.compute):
            pass
        with pytest.raises(ValueError), timer.span("flow", ring.compute):
            raise ValueError("the stage failed")
        assert "flow" not in timer.read()
        assert memory.calls["destroy_event"] == 2  # the cut span's pair, at once
        with timer.span("flow", ring.compute):
            pass
        assert sorted(timer.read()) == ["flow"]


# --- CUDA without a device ------------------------------------------------------------------

@pytest.mark.skipif(HAVE_CUDA, reason="a CUDA device is present")
def test_cuda_memory_without_a_device_is_one_clear_error():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    with pytest.raises(CudaError, match=r"^no usable CUDA device 0: cudaSetDevice failed: "
                                        r"cudaError\w+ \(.*\); check nvidia-smi, or pick a CPU"):
        CudaMemory(0)


def test_missing_cuda_python_is_one_sentence(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(CudaError, match=r"needs cuda-python .*pip install dff-trt\[gpu\]"):
        buffers.cuda_runtime()


# --- ONNX Runtime's IOBinding over the buffer layer -----------------------------------------

@pytest.fixture(scope="module")
def clip():
    from dff.data.synthetic import make_clip

    return make_clip(7, 9, 64, 96)


def nchw(frame):
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None])


def pipeline_labels(backend, clip, k=3):
    from dff.runtime.loop import Pipeline
    from dff.runtime.scheduler import FixedInterval

    return np.stack([r.labels for r in Pipeline(backend, FixedInterval(k)).run(clip.frames)])


@pytest.mark.usefixtures("one_thread")
def test_ort_iobinding_over_host_memory_gives_the_labels_of_a_plain_run(engines, clip):
    from dff.runtime.ort_backend import OrtBackend

    plain = OrtBackend(engines, threads=1)
    memory = Counting(HostMemory())
    with_buffers = OrtBackend(engines, threads=1, io_binding=True, memory=memory)
    want = pipeline_labels(plain, clip)
    assert len(np.unique(want)) >= 3, "a model predicting one class tests nothing"
    np.testing.assert_array_equal(pipeline_labels(with_buffers, clip), want)
    allocated = dict(memory.calls)
    np.testing.assert_array_equal(pipeline_labels(with_buffers, clip), want)
    assert memory.calls == allocated, "a second run of the same size allocated again"
    assert len(with_buffers._ring) <= 3
    assert all(len(pool) <= 2 for pool in with_buffers._pools.values())
    with_buffers.close()
    with_buffers.close()
    assert memory.calls["free"] == memory.calls["alloc"]
    assert memory.calls["free_host"] == memory.calls["alloc_host"]


@pytest.mark.usefixtures("one_thread")
def test_ort_iobinding_never_overwrites_a_key_feature_handle(engines, clip):
    from dff.runtime.ort_backend import OrtBackend

    plain = OrtBackend(engines, threads=1)
    bound = OrtBackend(engines, threads=1, io_binding=True, memory=HostMemory())
    images = [nchw(f) for f in clip.frames[:4]]
    key_image = bound.upload(images[0])
    key_feat = bound.feature(key_image)
    kept = bound.to_host(key_feat).copy()
    for image in images[1:]:  # warped features and later key features go elsewhere
        feat = bound.flow(bound.upload(image), key_image, key_feat)[2]
        bound.task(feat)
        bound.feature(image)
    np.testing.assert_array_equal(bound.to_host(key_feat), kept)
    np.testing.assert_array_equal(bound.to_host(key_image), images[0])
    # host arrays for every input (as dff-profile passes them) give the same as handles
    host = bound.flow(images[3], images[0], kept)
    want = plain.flow(images[3], images[0], plain.feature(images[0]))
    for got, ref in zip(host, want):
        np.testing.assert_allclose(bound.to_host(got), ref, atol=1e-5)
    bound.close()


def test_ort_cuda_runs_on_the_rings_compute_stream(engines, monkeypatch):
    """The provider options that hand ONNX Runtime our stream (checked without a GPU)."""
    import onnxruntime as ort
    from dff.runtime.ort_backend import OrtBackend

    class CudaLike(HostMemory):
        device_type = "cuda"

    seen = []

    def session(path, options, providers):
        seen.append(providers)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    memory = Counting(CudaLike())
    with pytest.raises(Exception, match="onnxruntime cannot load it \\(stop here\\)"):
        OrtBackend(engines, cuda=True, memory=memory)
    streams = memory.calls["destroy_stream"]
    assert streams == 2, "the failed backend's ring was not closed"
    (providers,) = seen
    name, options = providers[0]
    assert name == "CUDAExecutionProvider" and providers[1:] == ["CPUExecutionProvider"]
    assert options["device_id"] == "0" and options["has_user_compute_stream"] == "1"
    assert options["user_compute_stream"].isdigit()
    with pytest.raises(ValueError, match="onnxruntime-cpu binds cpu memory, got CudaLike"):
        OrtBackend(engines, io_binding=True, memory=CudaLike())


def test_ort_cuda_runs_return_without_synchronising_and_close_waits(engines, monkeypatch):
    """On CUDA a run only queues its kernels, as TensorRT's enqueue does (ordering is the
    compute stream's); on the CPU runs keep ONNX Runtime's default. Checked with stand-ins for
    the CUDA provider's session and a CUDA-typed HostMemory."""
    import onnxruntime as ort
    from dff.runtime.ort_backend import NO_SYNC, OrtBackend

    class CudaLike(HostMemory):
        device_type = "cuda"

    runs = []
    real_session = ort.InferenceSession

    class Binding:
        def bind_input(self, *args): pass
        def bind_output(self, *args): pass

    class Session:
        def __init__(self, path, options, providers):
            real = real_session(path, providers=["CPUExecutionProvider"])
            self.inputs, self.outputs = real.get_inputs(), real.get_outputs()

        def get_inputs(self): return self.inputs
        def get_outputs(self): return self.outputs
        def get_providers(self): return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        def io_binding(self): return Binding()

        def run_with_iobinding(self, binding, run_options=None):
            try:
                runs.append(run_options.get_run_config_entry(NO_SYNC))
            except RuntimeError:  # no such entry: ONNX Runtime's default, synchronised
                runs.append(None)

    memory = Counting(CudaLike())
    synced = []
    monkeypatch.setattr(memory.inner, "synchronize", lambda stream: synced.append(stream))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    backend = OrtBackend(engines, cuda=True, memory=memory)
    image = np.zeros((1, 3, 64, 96), np.uint8)
    backend.feature(image)
    assert runs == ["1"]
    streams = {backend._ring.upload, backend._ring.compute}
    backend.close()
    assert streams <= set(synced)  # queued work done before freeing
    cpu = OrtBackend(engines, io_binding=True, memory=HostMemory())
    cpu.feature(image)
    assert runs == ["1", None]
    cpu.close()


def test_profile_times_buffer_layer_backends_with_events_on_their_compute_stream():
    """dff-profile's clock on a CUDA-memory backend (a stand-in over host memory): the span
    is bracketed by the Timer's events on the backend's compute stream, and freed after."""
    from dff.runtime.buffers import StreamTimer
    from dff.runtime.profile import _Clock

    class CudaLike(HostMemory):
        device_type = "cuda"

    memory = Counting(CudaLike())
    recorded = []
    record = memory.inner.record
    memory.inner.record = lambda event, stream: (recorded.append(stream), record(event, stream))
    stream = memory.stream()
    backend = types.SimpleNamespace(name="onnxruntime-cuda",
                                    device_timer=lambda: StreamTimer(memory, stream))
    clock = _Clock(backend)
    assert clock.method == "cuda events"
    result, enqueue, compute = clock.span(lambda: time.sleep(0.01) or "done")
    assert result == "done" and 0.005 < compute < 1 and enqueue >= compute * 0.5
    assert recorded == [stream] * 2
    clock.close()
    assert memory.calls["destroy_event"] == 2
