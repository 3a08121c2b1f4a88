"""runtime/loop.py StreamPipeline: many streams batched through one backend. Every stream's results equal a
single-stream Pipeline run of its video frame by frame (segmentation labels; detection boxes,
scores, classes, num), fixed and adaptive, on ONNX Runtime CPU and torch CPU, with streams of
different lengths, contents and frame sizes and a batch limit below the number of streams;
the backends' split/stack keep rows apart; TensorRT's, on a stand-in that computes over
HostMemory, moves the right rows."""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import pytest
from dff.data.synthetic import make_clip
from dff.plugins.kernel import cuda_device_count
from dff.runtime import buffers
from dff.runtime.buffers import BufferPool, HostMemory
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline, StreamPipeline
from dff.runtime.ort_backend import OrtBackend
from dff.runtime.scheduler import Adaptive, FixedInterval, flow_stats
from dff.runtime.trt_backend import TrtBackend
from test_trt_backend import (
    CC,
    GPU,
    TRT,
    C,
    FakeContext,
    FakeEngine,
    fake_tensorrt,
    with_stand_in_engines,
)

from dff.errors import DffError

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def videos() -> list[np.ndarray]:
    """Five streams: lengths 12, 7, 15, 1, 9; each its own clip; the third one a cut between
    two clips, the fourth (one frame) at 32x64, the others at 64x96."""
    cut = np.concatenate([make_clip(3, 8, 64, 96).frames, make_clip(4, 7, 64, 96).frames])
    return [make_clip(1, 12, 64, 96).frames, make_clip(2, 7, 64, 96).frames, cut,
            make_clip(5, 1, 32, 64).frames, make_clip(6, 9, 64, 96).frames]


class Recording(Adaptive):
    """An Adaptive schedule that notes the mean flow of every frame it is asked about."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[float] = []

    def accept(self, flow, quality=None):
        self.seen.append(flow_stats(flow)[0])
        return super().accept(flow, quality)


def adaptive_factory(backend, clips):
    """Adaptive schedules whose flow threshold is the median mean flow of these clips on this
    backend (so some frames propagate and some are redone as key frames), longest gap 4."""
    probe = Recording(max_mean_flow=math.inf, max_outside=1.0, max_interval=4)
    for clip in clips:
        list(Pipeline(backend, probe).run(iter(clip)))
    threshold = float(np.median(probe.seen))
    return lambda: Adaptive(max_mean_flow=threshold, max_outside=1.0, max_interval=4)


def run_streams(runtime, clips):
    got: list[list] = [[] for _ in clips]
    for number, result in runtime.run([iter(c) for c in clips]):
        got[number].append(result)
    return got


def assert_same_outputs(a, b, exact):
    assert set(a) == set(b)
    for name in a:
        if exact or a[name].dtype.kind in "iu":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:  # torch's CPU kernels are not batch-invariant in the last bits
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def opened(engines, detection_engines):
    made: dict = {}

    def get(kind, task):
        if (kind, task) not in made:
            folder = engines if task == "segmentation" else detection_engines
            made[kind, task] = open_backend(kind, folder, threads=1)
        return made[kind, task]

    yield get
    for backend in made.values():
        backend.close()


# --- every stream equals its own single-stream run ------------------------------------------

@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
@pytest.mark.parametrize("task", ["segmentation", "detection"])
@pytest.mark.parametrize("kind", ["onnxruntime-cpu", "torch-cpu"])
def test_every_stream_equals_a_single_stream_run_frame_by_frame(kind, task, schedule, opened):
    backend = opened(kind, task)
    clips = videos()
    make = (lambda: FixedInterval(4)) if schedule == "fixed" else adaptive_factory(backend, clips)
    alone = []
    for clip in clips:
        pipe = Pipeline(backend, make())
        alone.append((list(pipe.run(iter(clip))), pipe.summary()["schedule"]))
    runtime = StreamPipeline(backend, [make() for _ in clips], max_batch=2)  # 5 streams
    got = run_streams(runtime, clips)
    for results, (expected, schedule_stats), entry in zip(got, alone,
                                                          runtime.summary()["per_stream"]):
        assert [r.index for r in results] == [r.index for r in expected]
        assert [r.is_key for r in results] == [r.is_key for r in expected]
        for r, e in zip(results, expected):
            assert_same_outputs(r.outputs, e.outputs, exact=kind.startswith("onnxruntime"))
            assert r.frame is not None and np.array_equal(r.frame, e.frame)
        assert entry["schedule"] == schedule_stats
    s = runtime.summary()
    assert s["frames"] == sum(len(c) for c in clips) == 44 and s["streams"] == 5
    for stage in ("feature", "flow", "task"):  # batches really formed, none above the limit
        assert 1 < s["stages"][stage]["batch"] <= 2, (stage, s["stages"][stage])
    if schedule == "adaptive":  # the test means something: both outcomes of the flow test
        reasons = [e["schedule"]["reasons"] for e in s["per_stream"]]
        assert sum(r["flow"] for r in reasons) > 0
        assert s["frames"] - s["key_frames"] > 0
    if task == "detection":
        assert any(len(r.outputs["scores"]) for results in got for r in results)
    else:
        assert len(np.unique(np.stack([r.labels for r in got[0]]))) >= 2


class Counting(OrtBackend):
    """ONNX Runtime CPU noting the input shape of every stage call."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[tuple[str, tuple]] = []

    def feature(self, image):
        self.calls.append(("feature", np.asarray(image).shape))
        return super().feature(image)

    def flow(self, image, key_image, key_feat):
        shapes = {np.asarray(x).shape[0] for x in (image, key_image, key_feat)}
        assert len(shapes) == 1, "image, key_image and key_feat of one batch"
        self.calls.append(("flow", np.asarray(image).shape))
        return super().flow(image, key_image, key_feat)

    def task(self, feat):
        self.calls.append(("task", np.asarray(feat).shape))
        return super().task(feat)


def test_calls_hold_at_most_max_batch_frames_of_one_size(engines):
    backend = Counting(engines, threads=1)
    clips = videos()
    runtime = StreamPipeline(backend, [FixedInterval(4) for _ in clips])
    assert runtime.max_batch == 2  # the profile's limit: manifest.json profile max [2, ...]
    run_streams(runtime, clips)
    assert all(shape[0] <= 2 for _, shape in backend.calls)
    # the first step: five key frames, four at 64x96 in two calls, one at 32x64 in its own
    assert backend.calls[:3] == [("feature", (2, 3, 64, 96)), ("feature", (2, 3, 64, 96)),
                                 ("feature", (1, 3, 32, 64))]
    assert backend.calls[3:6] == [("task", (2, 16, 4, 6)), ("task", (2, 16, 4, 6)),
                                  ("task", (1, 16, 2, 4))]
    assert backend.calls[6] == ("flow", (2, 3, 64, 96))  # the second step propagates
    backend.close()


def test_run_to_hands_each_stream_to_its_own_sink_in_order(opened):
    backend = opened("onnxruntime-cpu", "segmentation")
    clips = videos()[:3]
    seen: list[list] = [[] for _ in clips]
    threads: list[set] = [set() for _ in clips]

    def sink(i):
        def take(result):
            seen[i].append((result.index, result.is_key))
            threads[i].add(threading.current_thread().name)
        return take

    summary = StreamPipeline(backend, [FixedInterval(5) for _ in clips]).run_to(
        [iter(c) for c in clips], [sink(i) for i in range(3)], names=["a", "b", "c"])
    assert [[t for t, _ in s] for s in seen] == [list(range(len(c))) for c in clips]
    assert [[k for _, k in s] for s in seen] == [[t % 5 == 0 for t in range(len(c))]
                                                for c in clips]
    assert [t.pop() for t in threads] == ["dff-write-0", "dff-write-1", "dff-write-2"]
    assert [e["name"] for e in summary["per_stream"]] == ["a", "b", "c"]
    assert [e["frames"] for e in summary["per_stream"]] == [12, 7, 15]
    assert summary["fps"] > 0 and summary["fps_per_stream"] == pytest.approx(summary["fps"] / 3)


# --- errors ---------------------------------------------------------------------------------

def test_a_bad_frame_names_its_stream_and_a_failing_video_stops_every_stream(opened):
    backend = opened("onnxruntime-cpu", "segmentation")
    good = make_clip(1, 6, 64, 96).frames
    odd = [np.zeros((64, 90, 3), np.uint8)]
    runtime = StreamPipeline(backend, [FixedInterval(3), FixedInterval(3)])
    with pytest.raises(DffError, match=r"^cam2: frame 0: 90x64 is not a multiple of the "
                                       r"stride 16"):
        list(runtime.run([iter(good), iter(odd)], names=["cam1", "cam2"]))

    def broken():
        yield good[0]
        yield good[1]
        raise OSError("disk gone")

    endless = (good[t % 6] for t in range(10 ** 9))  # only a stop can end its decoder
    runtime = StreamPipeline(backend, [FixedInterval(3), FixedInterval(3)])
    results = runtime.run([endless, broken()])
    done = []
    with pytest.raises(OSError, match="disk gone"):
        for number, result in results:
            done.append((number, result.index))
    assert done == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_the_batch_limit_and_schedulers_are_checked(opened):
    backend = opened("onnxruntime-cpu", "segmentation")
    with pytest.raises(DffError, match=r"max batch 3 is above the engines' batch limit 2"):
        StreamPipeline(backend, [FixedInterval(2)], max_batch=3)
    shared = FixedInterval(2)
    with pytest.raises(ValueError, match="its own scheduler"):
        StreamPipeline(backend, [shared, shared])
    runtime = StreamPipeline(backend, [FixedInterval(2)])
    with pytest.raises(ValueError, match="2 videos for 1 schedulers"):
        list(runtime.run([[], []]))


# --- split and stack per backend ------------------------------------------------------------

@pytest.mark.parametrize("how", ["onnxruntime-cpu", "onnxruntime iobinding", "torch-cpu"])
def test_split_and_stack_keep_rows_where_the_backend_computes(how, engines):
    if how == "onnxruntime iobinding":
        backend = OrtBackend(engines, threads=1, io_binding=True)
    else:
        backend = open_backend(how, engines, threads=1)
    frames = make_clip(9, 6, 64, 96).frames.transpose(0, 3, 1, 2)
    batch = backend.feature(np.ascontiguousarray(frames[:2]))
    whole = backend.to_host(batch).copy()
    rows = backend.split(batch)
    assert len(rows) == 2 and type(rows[0]) is type(batch)  # handles of the backend's kind
    for j, row in enumerate(rows):
        np.testing.assert_array_equal(backend.to_host(row), whole[j:j + 1])
    del batch
    for t in range(2, 6):  # later calls must not write into rows still held
        backend.feature(np.ascontiguousarray(frames[t:t + 1]))
        backend.feature(np.ascontiguousarray(frames[t - 2:t]))
    for j, row in enumerate(rows):
        np.testing.assert_array_equal(backend.to_host(row), whole[j:j + 1])
    swapped = backend.stack([rows[1], rows[0]])
    np.testing.assert_array_equal(backend.to_host(swapped), whole[::-1])
    assert backend.stack([rows[0]]) is rows[0]
    image = backend.upload(np.ascontiguousarray(frames[:2]))
    np.testing.assert_array_equal(backend.to_host(backend.split(image)[1]), frames[1:2])
    # a stacked batch runs like the original one
    np.testing.assert_array_equal(backend.task(swapped)["labels"],
                                  backend.task(backend.feature(frames[1::-1].copy()))["labels"])
    backend.close()


def test_split_rows_views_aligned_rows_and_copies_the_rest():
    memory = HostMemory()
    pool, rows_pool = BufferPool(memory), BufferPool(memory)
    aligned = pool.take((3, 64), np.float32)  # 256 bytes a row
    buffers.host_view(aligned.ptr, aligned.shape, aligned.dtype)[:] = np.arange(192).reshape(3, 64)
    views = buffers.split_rows(aligned, memory, None, rows_pool)
    assert [v.ptr - aligned.ptr for v in views] == [0, 256, 512] and len(rows_pool) == 0
    assert all(v.buffer is aligned for v in views)  # each keeps the batch alive
    del aligned
    again = pool.take((3, 64), np.float32)  # the batch's buffer is still held by the views
    assert again.ptr != views[0].ptr
    odd = pool.take((2, 5), np.float32)  # 20 bytes a row: copies
    buffers.host_view(odd.ptr, odd.shape, odd.dtype)[:] = [[1] * 5, [2] * 5]
    copies = buffers.split_rows(odd, memory, None, rows_pool)
    assert len(rows_pool) == 2 and all(c.buffer is not odd for c in copies)
    assert [buffers.host_view(c.ptr, c.shape, c.dtype).tolist() for c in copies] == [
        [[1.0] * 5], [[2.0] * 5]]
    both = buffers.stack_rows([copies[1], copies[0]], memory, None, rows_pool)
    assert buffers.host_view(both.ptr, both.shape, both.dtype).tolist() == [[2.0] * 5, [1.0] * 5]
    with pytest.raises(ValueError, match="cannot stack"):
        buffers.stack_rows([copies[0], views[0]], memory, None, rows_pool)



@pytest.mark.parametrize("where", ["host", "cuda"])
@pytest.mark.parametrize("width", [64, 5])  # 256-byte rows (views) and 20-byte rows (copies)
def test_split_and_stack_rows_round_trip_through_device_memory(where, width):
    if where == "cuda":
        if cuda_device_count() == 0:
            pytest.skip("no CUDA device (cuda_device_count() == 0)")
        memory = buffers.CudaMemory(0)
    else:
        memory = HostMemory()
    ring, pool = buffers.PinnedRing(memory), BufferPool(memory)
    data = np.arange(3 * width, dtype=np.float32).reshape(3, width)
    _, batch = ring.stage(data)
    rows = buffers.split_rows(batch, memory, ring.compute, pool)
    del batch
    _, other = ring.stage(-data)  # may reuse nothing a row still needs
    back = buffers.stack_rows([rows[2], rows[0], rows[1]], memory, ring.compute, pool)
    np.testing.assert_array_equal(ring.to_host(back), data[[2, 0, 1]])
    np.testing.assert_array_equal(ring.to_host(other), -data)
    del rows, back, other
    pool.close()
    ring.close()

# --- TensorRT's split and stack, on a stand-in that computes --------------------------------

class Computing(FakeContext):
    """A stand-in execution context that computes, in numpy over the bound HostMemory, a
    function of every input row: feature from the image, flow's feat from image, key_image
    and key_feat, labels from the features. A row swapped, lost or overwritten shows."""

    def execute_async_v3(self, stream):
        def bound(name, shape, dtype):
            return buffers.host_view(self.addresses[name], shape, dtype)

        graph, shapes = self.engine.graph, self.shapes
        channels = np.arange(C) % 3
        if graph == "task":
            n, _, h, w = shapes["feat"]
            feat = bound("feat", shapes["feat"], np.float32)
            cells = (np.floor(feat.sum(1)) % 251).astype(np.uint8)
            bound("labels", (n, 16 * h, 16 * w), np.uint8)[:] = cells.repeat(16, 1).repeat(16, 2)
            return super().execute_async_v3(stream)
        n, _, hh, ww = shapes["image"]
        out = (n, C, hh // 16, ww // 16)
        image = bound("image", shapes["image"], np.uint8)[:, :, 8::16, 8::16].astype(np.float32)
        if graph == "feature":
            bound("feat", out, np.float32)[:] = image[:, channels] + np.arange(C)[:, None, None]
        else:
            key = bound("key_image", shapes["key_image"], np.uint8)[:, :, 8::16, 8::16]
            key_feat = bound("key_feat", shapes["key_feat"], np.float32)
            bound("flow", (n, 2, *out[2:]), np.float32)[:] = 0
            bound("scale", out, np.float32)[:] = 1
            bound("feat", out, np.float32)[:] = (0.5 * key_feat + image[:, channels]
                                                 + 0.25 * key[:, channels])
        return super().execute_async_v3(stream)


class ComputingEngine(FakeEngine):
    def create_execution_context(self):
        return Computing(self)


@pytest.fixture
def computing_trt(monkeypatch, tiny_export, tmp_path):
    """A TrtBackend over HostMemory on the Computing stand-in (tensorrt replaced, as in
    test_trt_backend's `stand_in`)."""

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return ComputingEngine(bytes(plan).decode())

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    monkeypatch.setitem(sys.modules, "tensorrt",
                        fake_tensorrt(Runtime=Runtime, Logger=Logger, __version__=TRT))
    monkeypatch.setattr("dff.engines.builder.device_info", lambda device=0: (GPU, CC))
    monkeypatch.setattr("dff.plugins.kernel.driver_cuda_version", lambda: (13, 0))
    backend = TrtBackend(with_stand_in_engines(tiny_export[1], tmp_path / "engines"),
                         memory=HostMemory())
    yield backend
    backend.close()


@pytest.mark.parametrize("size, feat_rows", [((64, 96), "views"), ((48, 80), "copies")])
def test_tensorrt_streams_equal_single_runs_on_a_computing_stand_in(size, feat_rows,
                                                                    computing_trt):
    h, w = size
    row = C * (h // 16) * (w // 16) * 4  # bytes of one stream's features
    assert (row % buffers.ALIGN == 0) == (feat_rows == "views")
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) for n in (7, 4, 9, 1)]
    backend = computing_trt
    alone = [[r.labels for r in Pipeline(backend, FixedInterval(3)).run(iter(c))] for c in clips]
    runtime = StreamPipeline(backend, [FixedInterval(3) for _ in clips])
    got = run_streams(runtime, clips)
    assert runtime.max_batch == 2
    for results, expected in zip(got, alone):
        assert len(results) == len(expected)
        for r, e in zip(results, expected):
            np.testing.assert_array_equal(r.labels, e)
    assert len({lab.tobytes() for labels in alone for lab in labels}) > 10  # rows differ
    assert runtime.summary()["stages"]["flow"]["batch"] > 1
    backend.cuda_graph = True  # as TrtBackend(cuda_graph=True) says: one stream's replay
    with pytest.raises(DffError, match="--useCudaGraph"):
        StreamPipeline(backend, [FixedInterval(3)])
