"""Runtime core: backends (ONNX Runtime vs the PyTorch reference), key-frame schedulers, and
the threaded pipeline (order, bounded queues, errors from any thread, flat memory)."""

from __future__ import annotations

import gc
import itertools
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import weakref
from typing import ClassVar

import numpy as np
import pytest
import torch
from dff.data.synthetic import make_clip
from dff.runtime import backends, loaders
from dff.runtime.backends import Backend
from dff.runtime.loaders import open_backend, pick_auto
from dff.runtime.loop import FrameResult, Pipeline
from dff.runtime.ort_backend import OrtBackend
from dff.runtime.scheduler import Adaptive, FixedInterval, flow_stats, make_scheduler
from dff.runtime.step import frame_outputs

from dff.errors import DffError

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return make_clip(7, 12, 64, 96)


@pytest.fixture(scope="module")
def ort_cpu(engines):
    b = open_backend("onnxruntime-cpu", engines, threads=1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def torch_cpu(engines):
    return open_backend("torch-cpu", engines)  # the checkpoint named in the manifest


def within(seconds, fn):
    """Run fn in a thread; fail (instead of hanging the suite) if it takes longer. Returns
    the exception fn raised, or None."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["exc"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    return box.get("exc")


class FakeBackend(Backend):
    """A backend of numpy one-liners, for the pipeline's threading and scheduling logic.
    `flows` maps a frame's first pixel value to the flow the flow stage returns."""

    name, stride, profile = "fake", 16, None
    task_spec: ClassVar[dict] = {"kind": "segmentation", "outputs": ["labels"]}

    def __init__(self, flows=None):
        self.flows = flows or {}
        self.calls = []

    def feature(self, image):
        self.calls.append(("feature", int(image[0, 0, 0, 0])))
        return image.mean(1)

    def flow(self, image, key_image, key_feat):
        self.calls.append(("flow", int(image[0, 0, 0, 0])))
        h, w = image.shape[2] // 16, image.shape[3] // 16
        flow = self.flows.get(int(image[0, 0, 0, 0]), np.zeros((1, 2, h, w), np.float32))
        return flow, None, key_feat

    def task(self, feat):
        return {"labels": np.zeros(feat.shape, np.uint8)}

    def upload(self, image):
        return image

    def to_host(self, handle):
        return np.asarray(handle)

    def synchronize(self):
        pass

    def close(self):
        pass


K = 5  # the detection stand-in's max_detections


class FakeDetection(FakeBackend):
    """A FakeBackend with detection's outputs: frame i (first pixel value) has i % 4 + 1
    detections of class (row % 4), scores descending from 0.9, a box at x = 10 * row; the
    rest of the K rows is padding."""

    task_spec: ClassVar[dict] = {"kind": "detection", "max_detections": K,
                                 "outputs": ["boxes", "scores", "classes", "num"],
                                 "score_threshold": 0.05}

    def task(self, feat):
        n = feat.shape[0]
        values = feat.reshape(n, -1)[:, 0].astype(int)
        boxes, scores = np.zeros((n, K, 4), np.float32), np.zeros((n, K), np.float32)
        classes, num = np.full((n, K), -1, np.int32), np.zeros(n, np.int32)
        for b, v in enumerate(values):
            num[b] = v % 4 + 1
            for row in range(num[b]):
                boxes[b, row] = (10 * row, 2, 10 * row + 8, 12)
                scores[b, row] = 0.9 - 0.1 * row
                classes[b, row] = row % 4
        return {"boxes": boxes, "scores": scores, "classes": classes, "num": num}


def frames(n, h=32, w=32):
    """n distinct small frames; frame i has value i % 256 in its first pixel."""
    for i in range(n):
        frame = np.full((h, w, 3), 100, np.uint8)
        frame[0, 0, 0] = i % 256
        yield frame


# --- backends agree ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5])
def test_onnxruntime_and_torch_labels_agree_through_the_pipeline(ort_cpu, torch_cpu, clip, k):
    labels = {}
    for backend in (ort_cpu, torch_cpu):
        results = list(Pipeline(backend, FixedInterval(k)).run(iter(clip.frames)))
        assert [r.index for r in results] == list(range(len(clip.frames)))
        assert [r.is_key for r in results] == [t % k == 0 for t in range(len(clip.frames))]
        assert all(np.array_equal(r.frame, f) for r, f in zip(results, clip.frames))
        assert all(r.labels.shape == (64, 96) and r.labels.dtype == np.uint8 for r in results)
        labels[backend.name] = np.stack([r.labels for r in results])
    assert len(np.unique(labels["torch-cpu"])) >= 3, "a model predicting one class tests nothing"
    agree = (labels["onnxruntime-cpu"] == labels["torch-cpu"]).mean()
    assert agree >= 0.999, agree


def test_iobinding_path_matches_plain_run_and_keeps_handles_apart(engines, ort_cpu, clip):
    """The CUDA code path (IOBinding, OrtValues from every stage) on the CPU provider."""
    bound = OrtBackend(engines, threads=1, io_binding=True)
    a, b = (np.ascontiguousarray(f.transpose(2, 0, 1)[None]) for f in clip.frames[:2])
    key_image = bound.upload(a)
    key_feat = bound.feature(key_image)
    assert isinstance(key_image, ort.OrtValue) and isinstance(key_feat, ort.OrtValue)
    kept = bound.to_host(key_feat).copy()
    bound.feature(b)  # a second run must not write into the first run's output
    np.testing.assert_array_equal(bound.to_host(key_feat), kept)
    flow, scale, feat = bound.flow(b, key_image, key_feat)
    assert all(isinstance(v, ort.OrtValue) for v in (flow, scale, feat))
    outputs = bound.task(feat)
    assert list(outputs) == ["labels"] and outputs["labels"].shape == (1, 64, 96)
    plain = ort_cpu.task(ort_cpu.flow(b, a, ort_cpu.feature(a))[2])
    np.testing.assert_array_equal(outputs["labels"], plain["labels"])
    np.testing.assert_allclose(bound.to_host(flow), ort_cpu.flow(b, a, ort_cpu.feature(a))[0],
                               atol=1e-5)
    bound.close()


def test_batch_of_two_runs_within_the_profile(ort_cpu, clip):
    images = np.ascontiguousarray(clip.frames[:2].transpose(0, 3, 1, 2))
    feat = ort_cpu.feature(images)
    assert ort_cpu.task(ort_cpu.flow(images, images, feat)[2])["labels"].shape == (2, 64, 96)


@pytest.fixture(scope="module")
def det_engines(detection_engines):
    """conftest's tiny detection export, under a shorter name."""
    return detection_engines


def test_detection_outputs_agree_across_onnxruntime_iobinding_and_torch(det_engines, clip):
    got = {}
    for backend in (OrtBackend(det_engines, threads=1),
                    OrtBackend(det_engines, threads=1, io_binding=True),
                    open_backend("torch-cpu", det_engines)):
        assert backend.task_spec["outputs"] == ["boxes", "scores", "classes", "num"]
        got[(backend.name, getattr(backend, "io_binding", None))] = list(
            Pipeline(backend, FixedInterval(5)).run(iter(clip.frames)))
        backend.close()
    plain, bound, ref = got.values()
    assert sum(len(r.outputs["scores"]) for r in ref) > 0, "no detections test nothing"
    for p, b, r in zip(plain, bound, ref):
        for name in ("boxes", "scores", "classes", "num"):
            np.testing.assert_array_equal(p.outputs[name], b.outputs[name])  # same graphs
        n = int(r.outputs["num"])
        assert p.outputs["boxes"].shape == (n, 4) and p.outputs["classes"].dtype == np.int32
        assert (np.diff(p.outputs["scores"]) <= 0).all() and (p.outputs["classes"] >= 0).all()
        np.testing.assert_allclose(p.outputs["scores"], r.outputs["scores"], atol=1e-4)
        np.testing.assert_allclose(p.outputs["boxes"], r.outputs["boxes"], atol=1e-2)


def test_torch_backend_gives_a_detection_checkpoints_contract_outputs(tmp_path, clip):
    from conftest import tiny_config
    from dff.models.checkpoint import save_checkpoint
    from dff.models.dff import DFF
    from dff.runtime.torch_backend import open_torch

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "det.pth", DFF(tiny_config().for_task("detection")).eval())
    backend = open_torch(None, tmp_path / "det.pth")
    k = backend.task_spec["max_detections"]
    images = np.ascontiguousarray(clip.frames[:2].transpose(0, 3, 1, 2))
    out = backend.task(backend.feature(images))
    assert {n: (v.dtype, v.shape) for n, v in out.items()} == {
        "boxes": (np.float32, (2, k, 4)), "scores": (np.float32, (2, k)),
        "classes": (np.int32, (2, k)), "num": (np.int32, (2,))}
    results = list(Pipeline(backend, FixedInterval(3)).run(iter(clip.frames[:4])))
    assert [len(r.outputs["boxes"]) for r in results] == [int(r.outputs["num"]) for r in results]
    with pytest.raises(AttributeError, match="no labels.*detection"):
        results[0].labels  # noqa: B018 - the property is the test


def test_task_spec_reads_the_old_string_and_the_new_object(engines):
    from dff.export.manifest import load_manifest

    manifest = load_manifest(engines, verify_hashes=False)
    spec = backends.task_spec(manifest)  # what this checkout's dff-export writes, either form
    assert (spec["kind"], spec["outputs"]) == ("segmentation", ["labels"])
    old = {"task": "segmentation", "graphs": {"task": {"outputs": [
        {"name": "labels"}, {"name": "probs"}]}}}
    assert backends.task_spec(old) == {"kind": "segmentation", "outputs": ["labels", "probs"]}
    old_det = {"task": "detection", "graphs": {"task": {"outputs": [
        {"name": "boxes", "shape": ["N", 7, 4]}, {"name": "scores", "shape": ["N", 7]}]}}}
    assert backends.task_spec(old_det)["max_detections"] == 7
    new = {"kind": "detection", "outputs": ["boxes", "scores", "classes", "num"],
           "max_detections": 100, "score_threshold": 0.05}
    assert backends.task_spec({"task": new}) == new
    assert backends.graph_outputs({"task": new}, "task") == new["outputs"]
    assert backends.graph_outputs({"task": new}, "flow") == ["flow", "scale", "feat"]
    # the object may hold an --onnx split's raw task; the old string form never did
    for bad, field, kinds in (({"task": {"kind": "pose"}}, "task.kind", ", raw"),
                              ({"task": "pose"}, "task", "")):
        with pytest.raises(DffError, match=rf"^e/manifest.json: field '{field}' is 'pose', "
                                           rf"expected one of segmentation, detection{kinds}; "
                                           "re-export"):
            backends.task_spec(bad, "e/manifest.json")


# --- choosing and opening backends ---------------------------------------------------------

def test_pick_auto_on_a_cpu_machine_picks_onnxruntime_cpu_with_a_reason(engines):
    if loaders.tensorrt_status()[0] or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has TensorRT or ONNX Runtime's CUDA provider")
    kind, reason = pick_auto(engines)
    assert kind == "onnxruntime-cpu"
    assert reason.startswith("picked onnxruntime-cpu: no TensorRT (")
    assert "no CUDA execution provider" in reason
    assert "onnxruntime-cpu" in loaders.available_backends()
    assert open_backend("auto", engines, threads=1).name == "onnxruntime-cpu"


def test_pick_auto_takes_tensorrt_only_with_engines_for_all_three_graphs(engines, tmp_path,
                                                                        monkeypatch):
    copy = tmp_path / "engines"
    shutil.copytree(engines, copy)
    monkeypatch.setattr(loaders, "tensorrt_status", lambda: (True, "TensorRT 10.13"))
    monkeypatch.setattr(loaders, "_ort_has_cuda", lambda: False)
    manifest = json.loads((copy / "manifest.json").read_text())
    for graph in ("feature", "flow", "task"):
        (copy / f"{graph}.plan").write_bytes(b"plan")
        manifest["engines"][graph] = {"file": f"{graph}.plan", "graph": graph}
        (copy / "manifest.json").write_text(json.dumps(manifest))
        kind, reason = pick_auto(copy)
        if graph != "task":
            assert kind == "onnxruntime-cpu", reason
            assert "TensorRT 10.13 but manifest.json lists no engine for" in reason
    assert kind == "tensorrt"
    assert reason == "picked tensorrt: TensorRT 10.13, engines for feature, flow, task"


def test_missing_engine_dir_is_a_dff_error_naming_it(tmp_path):
    missing = tmp_path / "no-engines"
    for call in (lambda: pick_auto(missing), lambda: open_backend("onnxruntime-cpu", missing),
                 lambda: open_backend("auto", missing)):
        with pytest.raises(DffError, match=f"{missing}: no such directory.*dff-export"):
            call()
    with pytest.raises(DffError, match="needs an engine folder"):
        open_backend("onnxruntime-cpu", None)


def test_unknown_backend_and_tensorrt_are_dff_errors(engines):
    with pytest.raises(DffError, match=r"unknown backend 'tensorflow'; choose one of auto, "
                                       r"tensorrt, onnxruntime-cuda, onnxruntime-cpu"):
        open_backend("tensorflow", engines)
    with pytest.raises(DffError, match="--backend tensorrt: .*onnxruntime"):
        open_backend("tensorrt", engines)


def test_cuda_backends_without_cuda_say_so(engines):
    if "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DffError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        open_backend("onnxruntime-cuda", engines)
    with pytest.raises(DffError, match=r"torch-cuda: torch.cuda.is_available\(\) is False"):
        open_backend("torch-cuda", engines)


def test_torch_backend_names_a_manifest_checkpoint_that_is_gone(engines, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(engines, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["export"]["checkpoint"] = str(tmp_path / "moved.pth")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DffError, match=r"field 'export.checkpoint' is .*moved.pth.*--checkpoint"):
        open_backend("torch-cpu", copy)
    with pytest.raises(DffError, match="needs --checkpoint"):
        open_backend("torch-cpu", None)


def test_runtime_imports_and_runs_without_torch(engines):
    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` now fails, as on a deployment box
import numpy as np
from dff.runtime.loaders import open_backend
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import make_scheduler
from dff.errors import DffError
backend = open_backend("onnxruntime-cpu", {str(engines)!r}, threads=1)
frames = [np.zeros((32, 48, 3), np.uint8)] * 3
results = list(Pipeline(backend, make_scheduler("fixed", 2)).run(frames))
assert [r.is_key for r in results] == [True, False, True]
try:
    open_backend("torch-cpu", {str(engines)!r})
except DffError as e:
    print("torch:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "torch: the torch backend needs PyTorch, which is not importable" in out.stdout


# --- schedulers ------------------------------------------------------------------------------

def test_fixed_interval_keys_every_k_frames_from_the_start():
    s = FixedInterval(3)
    assert [s.decide(t, None) for t in range(10)] == [t % 3 == 0 for t in range(10)]
    assert s.accept(np.full((2, 4, 4), 9.0)) is True
    assert s.stats() == {"frames": 10, "key_frames": 4, "reasons": {
        "start": 1, "interval": 3, "scene_cut": 0, "flow": 0, "outside": 0, "max_interval": 0,
        "quality": 0, "budget": 0}}
    s.reset()
    assert s.stats()["frames"] == 0 and s.decide(0, None) is True


def test_per_frame_is_interval_one_and_make_scheduler_checks_its_arguments():
    s = make_scheduler("per-frame", 10)
    assert all(s.decide(t, None) for t in range(5)) and s.stats()["key_frames"] == 5
    assert make_scheduler("fixed", 4).k == 4
    assert make_scheduler("adaptive", 7).max_interval == 7
    assert make_scheduler("adaptive", 7, max_interval=3, scene_cut=5).max_interval == 3
    for bad in (lambda: FixedInterval(0), lambda: make_scheduler("sometimes", 3),
                lambda: make_scheduler("fixed", 3, scene_cut=4.0),
                lambda: Adaptive(max_interval=0), lambda: Adaptive(max_mean_flow=-1)):
        with pytest.raises(DffError):
            bad()


def test_adaptive_flow_threshold_is_image_motion_whatever_the_stride():
    """4.8 px: 0.3 cells at stride 16 (the default that was tuned), 0.6 at 8, 0.15 at 32."""
    assert Adaptive().max_mean_flow == pytest.approx(0.3)
    for stride, cells in ((8, 0.6), (16, 0.3), (32, 0.15)):
        assert make_scheduler("adaptive", 10, stride=stride).max_mean_flow == pytest.approx(cells)
    assert make_scheduler("adaptive", 10, stride=8, max_mean_flow=0.2).max_mean_flow == 0.2
    with pytest.raises(DffError, match="stride 0 must be an integer"):
        Adaptive(stride=0)


def test_flow_stats_measures_magnitude_and_samples_outside_the_map():
    assert flow_stats(np.zeros((1, 2, 4, 6), np.float32)) == (0.0, 0.0)
    flow = np.zeros((2, 4, 6), np.float32)
    flow[0] = 0.4  # right by 0.4 cell: the last column samples x = 5.4, still inside
    assert flow_stats(flow) == pytest.approx((0.4, 0.0))
    flow[0] = 0.6  # now x = 5.6 > w - 0.5
    assert flow_stats(flow) == pytest.approx((0.6, 1 / 6))
    flow[:] = 0
    flow[1, :2] = -3.0  # two top rows up by 3 cells: both outside
    assert flow_stats(flow) == pytest.approx((1.5, 0.5))


def _still(value=100):
    return np.full((64, 96, 3), value, np.uint8)


def test_adaptive_redoes_a_frame_with_large_flow_as_a_key_frame():
    s = Adaptive(max_mean_flow=0.3, max_outside=0.1, max_interval=100)
    assert s.decide(0, _still()) is True
    assert s.decide(1, _still()) is False
    assert s.accept(np.full((1, 2, 4, 6), 0.1, np.float32)) is True  # |flow| = 0.14
    assert s.decide(2, _still()) is False
    assert s.accept(np.full((1, 2, 4, 6), 0.5, np.float32)) is False  # |flow| = 0.71
    assert s.last["mean_flow"] == pytest.approx(0.5 * math.sqrt(2))
    assert s.stats()["reasons"]["flow"] == 1 and s.stats()["key_frames"] == 2


def test_adaptive_makes_a_key_frame_when_flow_samples_outside_the_map():
    s = Adaptive(max_mean_flow=0.3, max_outside=0.1, max_interval=100)
    s.decide(0, _still())
    flow = np.zeros((1, 2, 4, 6), np.float32)
    flow[0, 0, :, 0] = -0.6  # first column looks left of the map: 1/6 of the cells, mean 0.1
    assert s.decide(1, _still()) is False and s.accept(flow) is False
    assert s.stats()["reasons"] == {"start": 1, "interval": 0, "scene_cut": 0, "flow": 0,
                                    "outside": 1, "max_interval": 0, "quality": 0, "budget": 0}


def test_adaptive_scene_cut_on_a_different_frame(clip):
    s = Adaptive(max_interval=100)
    other = make_clip(99, 1, 64, 96).frames[0]
    assert s.decide(0, clip.frames[0]) is True
    assert s.decide(1, clip.frames[1]) is False and s.accept(np.zeros((2, 4, 6))) is True
    assert s.last["scene_diff"] < s.scene_cut
    assert s.decide(2, 255 - clip.frames[2]) is True  # a cut: no flow run at all
    assert s.decide(3, other) is True
    assert s.stats()["reasons"]["scene_cut"] == 2
    # the key thumbnail moved with the cut: the frame after it is no cut
    assert s.decide(4, other) is False
    off = Adaptive(scene_cut=math.inf, max_interval=100)
    assert off.decide(0, clip.frames[0]) and not off.decide(1, 255 - clip.frames[0])


def test_adaptive_max_interval_counts_from_the_last_key_frame_even_a_redone_one():
    s = Adaptive(max_interval=4)
    zero, big = np.zeros((2, 4, 6), np.float32), np.full((2, 4, 6), 2.0, np.float32)
    keys = []
    for t in range(12):
        key = s.decide(t, _still())
        if not key:
            key = not s.accept(big if t == 6 else zero)
        keys.append(key)
    assert [t for t, k in enumerate(keys) if k] == [0, 4, 6, 10]
    assert s.stats()["reasons"] == {"start": 1, "interval": 0, "scene_cut": 0, "flow": 1,
                                    "outside": 0, "max_interval": 2, "quality": 0, "budget": 0}
    assert s.stats()["frames"] == 12 and s.stats()["key_frames"] == 4


# --- the pipeline ----------------------------------------------------------------------------

def test_pipeline_redoes_rejected_frames_as_keys_and_times_both_stages():
    big = np.full((1, 2, 2, 2), 3.0, np.float32)
    backend = FakeBackend(flows={3: big})
    pipe = Pipeline(backend, Adaptive(scene_cut=math.inf, max_interval=100))
    results = list(pipe.run(frames(6)))
    assert [r.is_key for r in results] == [True, False, False, True, False, False]
    assert {"flow", "feature", "task", "upload", "schedule", "total"} <= set(results[3].times)
    assert backend.calls[:5] == [("feature", 0), ("flow", 1), ("flow", 2), ("flow", 3),
                                 ("feature", 3)]
    summary = pipe.summary()
    assert (summary["frames"], summary["key_frames"]) == (6, 2)
    assert summary["stages"]["flow"]["count"] == 5 and summary["stages"]["feature"]["count"] == 2
    assert summary["schedule"]["reasons"]["flow"] == 1


def test_frame_outputs_drop_the_batch_and_cut_detection_rows_to_num():
    batch = FakeDetection().task(np.array([[[[1.0]]], [[[2.0]]]]))  # frames with 2 and 3 rows
    one = frame_outputs(batch, 1)
    assert {n: v.shape for n, v in one.items()} == {"boxes": (3, 4), "scores": (3,),
                                                   "classes": (3,), "num": ()}
    np.testing.assert_array_equal(one["scores"], np.float32([0.9, 0.8, 0.7]))
    assert one["classes"].tolist() == [0, 1, 2] and int(one["num"]) == 3
    labels = frame_outputs({"labels": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)}, 1)
    assert labels["labels"].tolist() == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
def test_detection_results_come_through_both_schedules(schedule):
    backend = FakeDetection(flows={3: np.full((1, 2, 2, 2), 3.0, np.float32)})
    scheduler = (FixedInterval(3) if schedule == "fixed"
                 else Adaptive(scene_cut=math.inf, max_interval=100))
    results = list(Pipeline(backend, scheduler).run(frames(6)))
    if schedule == "adaptive":  # frame 3's large flow redoes it as a key frame
        assert [r.is_key for r in results] == [True, False, False, True, False, False]
    for r in results:
        assert set(r.outputs) == {"boxes", "scores", "classes", "num"}
        assert len(r.outputs["boxes"]) == len(r.outputs["scores"]) == int(r.outputs["num"])
        assert (r.outputs["classes"] >= 0).all()


def test_pipeline_summary_counts_stages_and_efficiency(ort_cpu, clip):
    pipe = Pipeline(ort_cpu, FixedInterval(4))
    for _ in pipe.run(clip.frames):
        pass
    s = pipe.summary()
    assert (s["frames"], s["key_frames"], s["backend"]) == (12, 3, "onnxruntime-cpu")
    assert s["stages"]["feature"]["count"] == 3 and s["stages"]["flow"]["count"] == 9
    assert s["stages"]["task"]["count"] == 12 and s["stages"]["task"]["median_s"] > 0
    assert s["fps"] == pytest.approx(12 / s["wall_s"])
    assert 0 < s["efficiency"] <= 1.5 and 0 < s["busy"] <= 1.0
    assert s["schedule"]["reasons"]["interval"] == 2


def test_decoder_exception_reaches_the_consumer_after_the_frames_before_it():
    def broken():
        yield from frames(3)
        raise OSError("decoder: corrupt packet at frame 3")

    seen = []

    def consume():
        for r in Pipeline(FakeBackend(), FixedInterval(2)).run(broken()):
            seen.append(r.index)

    exc = within(20, consume)
    assert isinstance(exc, OSError) and "corrupt packet" in str(exc)
    assert seen == [0, 1, 2]
    exc = within(20, lambda: Pipeline(FakeBackend(), FixedInterval(2)).run_to(broken(), seen.append))
    assert isinstance(exc, OSError)


def test_sink_exception_stops_an_endless_video_without_hanging():
    decoded = itertools.count()
    written = []

    def endless():
        for i in decoded:
            yield np.full((32, 32, 3), i % 256, np.uint8)

    def sink(result):
        if result.index == 5:
            raise ValueError("disk full")
        written.append(result.index)

    exc = within(20, lambda: Pipeline(FakeBackend(), FixedInterval(3)).run_to(endless(), sink))
    assert isinstance(exc, ValueError) and str(exc) == "disk full"
    assert written == [0, 1, 2, 3, 4]
    time.sleep(0.2)
    stopped_at = next(decoded)
    time.sleep(0.2)
    assert next(decoded) == stopped_at + 1, "the decoder kept running after the failure"


def test_compute_exception_stops_decoder_and_writer():
    def bad_size():
        yield from frames(2)
        yield np.zeros((48, 32, 3), np.uint8)  # a different size mid-video

    exc = within(20, lambda: Pipeline(FakeBackend(), FixedInterval(1)).run_to(bad_size(),
                                                                              lambda r: None))
    assert isinstance(exc, DffError) and "every frame of a video must have one size" in str(exc)


def test_decoding_runs_ahead_but_never_more_than_the_queue():
    queue_size, produced, consumed, ahead = 4, [0], [0], []

    def counted():
        for frame in frames(40):
            produced[0] += 1
            ahead.append(produced[0] - consumed[0])
            yield frame

    for result in Pipeline(FakeBackend(), FixedInterval(5), queue_size=queue_size).run(counted()):
        consumed[0] = result.index + 1
        time.sleep(0.002)  # a slow consumer: decoding fills the queue
    assert max(ahead) <= queue_size + 2
    assert max(ahead) >= queue_size, "decoding never ran ahead"


class AsyncUploads(FakeBackend):
    """A FakeBackend whose uploads are 'asynchronous': it logs uploads and tasks in order."""

    overlaps_uploads = True

    def upload(self, image):
        self.calls.append(("upload", int(image[0, 0, 0, 0])))
        return image.copy()  # a handle of its own, as a device buffer would be

    def task(self, feat):
        self.calls.append(("task", None))
        return super().task(feat)

    def feature(self, image):
        time.sleep(0.05)  # slow compute: the decoder has queued the next frame by now
        return super().feature(image)

    def flow(self, image, key_image, key_feat):
        time.sleep(0.05)
        return super().flow(image, key_image, key_feat)


def test_next_frame_is_uploaded_before_this_frames_labels_are_waited_for():
    backend = AsyncUploads()
    results = list(Pipeline(backend, FixedInterval(3)).run(frames(6)))
    uploads = [v for op, v in backend.calls if op == "upload"]
    assert uploads == list(range(6)), "each frame uploaded exactly once, in order"
    order = [op if op != "upload" else f"upload {v}" for op, v in backend.calls
             if op in ("upload", "task")]
    for t in range(5):  # frame t+1's upload comes before frame t's task
        assert order.index(f"upload {t + 1}") < [i for i, op in enumerate(order)
                                                 if op == "task"][t]
    assert [r.is_key for r in results] == [True, False, False, True, False, False]
    assert all(r.times["upload"] >= 0 for r in results)


def test_a_synchronous_backend_is_not_uploaded_ahead():
    backend = AsyncUploads()
    backend.overlaps_uploads = False
    list(Pipeline(backend, FixedInterval(3)).run(frames(4)))
    order = [op for op, _ in backend.calls if op in ("upload", "task")]
    assert order == ["upload", "task"] * 4


def test_run_to_writes_in_order_and_keeps_no_frames_alive():
    alive = []

    def tracked():
        for frame in frames(300):
            alive.append(weakref.ref(frame))
            yield frame

    order = []
    summary = Pipeline(FakeBackend(), FixedInterval(10), queue_size=3).run_to(
        tracked(), lambda r: order.append((r.index, r.is_key)))
    assert order == [(t, t % 10 == 0) for t in range(300)]
    assert summary["frames"] == 300 and summary["key_frames"] == 30
    gc.collect()
    assert sum(ref() is not None for ref in alive) <= 1


def test_frames_that_do_not_fit_the_engines_are_dff_errors(ort_cpu):
    for frame, match in ((np.zeros((40, 64, 3), np.uint8), "not a multiple of the stride 16"),
                         (np.zeros((256, 64, 3), np.uint8), "outside the engines' profile"),
                         (np.zeros((64, 64), np.uint8), "expected an HxWx3 uint8 RGB")):
        with pytest.raises(DffError, match=match):
            list(Pipeline(ort_cpu, FixedInterval(1)).run([frame]))


def test_frame_result_carries_frame_labels_and_times(ort_cpu, clip):
    result = next(iter(Pipeline(ort_cpu, FixedInterval(1)).run(clip.frames[:1])))
    assert isinstance(result, FrameResult) and result.index == 0 and result.is_key
    assert list(result.outputs) == ["labels"] and result.labels is result.outputs["labels"]
    assert result.labels.shape == (64, 96)
    assert result.times["total"] >= result.times["feature"] + result.times["task"]
    assert set(result.times) == {"schedule", "upload", "feature", "task", "total", "decode"}


def test_leaving_the_loop_early_stops_the_decoder():
    decoded = itertools.count()

    def endless():
        for _ in decoded:
            yield np.zeros((32, 32, 3), np.uint8)

    def take_three():
        results = Pipeline(FakeBackend(), FixedInterval(2), queue_size=2).run(endless())
        assert [r.index for r in itertools.islice(results, 3)] == [0, 1, 2]
        results.close()  # what a `break` out of a for loop does once the generator is dropped

    assert within(20, take_three) is None
    stopped_at = next(decoded)
    time.sleep(0.2)
    assert next(decoded) == stopped_at + 1 and stopped_at <= 3 + 2 + 2


def test_check_names_takes_inputs_in_any_order_and_refuses_a_missing_output():
    from dff.runtime.backends import BackendError, check_names

    check_names("flow.onnx", "flow", ["key_feat", "image", "key_image"],
                ["feat", "scale", "flow", "extra"], "fix it")
    with pytest.raises(BackendError, match=r"^flow.onnx: inputs .* expected .*; re-export"):
        check_names("flow.onnx", "flow", ["image", "key_image", "key_feat"], ["flow", "scale"],
                    "re-export")
    with pytest.raises(BackendError, match="inputs \\['image'\\]"):
        check_names("task.plan", "task", ["image"], ["labels"], "rebuild", want=["labels"])
    with pytest.raises(BackendError, match=r"outputs \['boxes', 'scores'\].*expected .*'num'"):
        check_names("task.onnx", "task", ["feat"], ["scores", "boxes"], "re-export",
                    want=["boxes", "scores", "classes", "num"])
