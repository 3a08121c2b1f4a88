"""runtime/trt_backend.py: without TensorRT, its one-sentence refusals and, against a recording
stand-in for TensorRT's engine API over HostMemory, what it binds (tensor names, input shapes,
every tensor's address, the compute stream, buffers kept apart and reused), what it refuses
(wrong tensors, shapes outside the profile, engines for another GPU); with TensorRT and a GPU,
a real engine build run against ONNX Runtime. The stand-in computes nothing: no test here
reads a TensorRT result that TensorRT did not make."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import Untouchable
from dff.engines import entries
from dff.engines.compat import EngineError
from dff.engines.profile import profile_shapes
from dff.export.manifest import load_manifest
from dff.plugins.kernel import cuda_device_count
from dff.runtime import loaders
from dff.runtime.backends import BackendError
from dff.runtime.buffers import BufferPool, HostMemory
from dff.runtime.loaders import open_backend, tensorrt_status
from dff.runtime.trt_backend import TrtBackend, _Stage, engine_tensors

HAVE_TRT = tensorrt_status()[0]
needs_no_trt = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is usable here")
REPO = Path(__file__).resolve().parents[1]
GPU, CC, TRT = "NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35"
C = 16  # the tiny preset's feature channels


# --- without TensorRT -----------------------------------------------------------------------

@needs_no_trt
def test_open_backend_tensorrt_without_tensorrt_says_what_to_install(tmp_path):
    with pytest.raises(BackendError) as info:
        open_backend("tensorrt", tmp_path)
    msg = str(info.value)
    assert msg.startswith("--backend tensorrt: not available here (import tensorrt: ")
    assert "TensorRT 10.10 or later and cuda-python" in msg and "onnxruntime-cpu" in msg


@needs_no_trt
def test_trt_backend_without_tensorrt_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, whatever is installed
    with pytest.raises(BackendError, match=r"^--backend tensorrt needs TensorRT \(import "
                                           r"tensorrt: .*\): pip install tensorrt"):
        TrtBackend(tmp_path)


def fake_tensorrt(**attrs):
    module = types.ModuleType("tensorrt")
    module.__dict__.update(attrs)
    return module


def test_tensorrt_status_wants_real_tensorrt_and_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    usable, why = tensorrt_status()
    assert not usable and "found only an empty package" in why
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(Runtime=object, __version__=TRT))
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # as if it were missing
    no_cuda = f"TensorRT {TRT} is importable but cuda-python is not (pip install dff-trt[gpu])"
    assert tensorrt_status() == (False, no_cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    assert tensorrt_status() == (True, f"TensorRT {TRT}")
    assert "tensorrt" in loaders.available_backends()


# --- a recording stand-in for TensorRT's engine API -----------------------------------------

K = 100  # detection's max_detections in the tiny detection export


def dff_shapes(graph, shapes):
    """The output shapes DESIGN.md §3 gives `graph` ("task:detection": a detection task graph)
    for these input shapes."""
    if graph == "task:detection":
        n = shapes["feat"][0]
        return {"boxes": (n, K, 4), "scores": (n, K), "classes": (n, K), "num": (n,)}
    if graph == "task":
        n, _, h, w = shapes["feat"]
        return {"labels": (n, 16 * h, 16 * w), "probs": (n, 5, 16 * h, 16 * w)}
    n, _, hh, ww = shapes["image"]
    h, w = hh // 16, ww // 16
    if graph == "feature":
        return {"feat": (n, C, h, w)}
    return {"flow": (n, 2, h, w), "scale": (n, C, h, w), "feat": (n, C, h, w)}


TENSORS = {
    "feature": [("image", "INPUT", "UINT8"), ("feat", "OUTPUT", "FLOAT")],
    "flow": [("image", "INPUT", "UINT8"), ("key_image", "INPUT", "UINT8"),
             ("key_feat", "INPUT", "FLOAT"), ("flow", "OUTPUT", "FLOAT"),
             ("scale", "OUTPUT", "FLOAT"), ("feat", "OUTPUT", "FLOAT")],
    "task": [("feat", "INPUT", "FLOAT"), ("labels", "OUTPUT", "UINT8"),
             ("probs", "OUTPUT", "FLOAT")],
    "task:detection": [("feat", "INPUT", "FLOAT"), ("boxes", "OUTPUT", "FLOAT"),
                       ("scores", "OUTPUT", "FLOAT"), ("classes", "OUTPUT", "INT32"),
                       ("num", "OUTPUT", "INT32")],
}


class FakeEngine:
    """ICudaEngine's I/O-tensor methods; contexts log every call into `log`. `kind` is a key
    of TENSORS: the graph's name, or "task:detection"."""

    def __init__(self, kind, tensors=None, max_side=128, log=None):
        self.kind, self.graph, self.max_side = kind, kind.split(":")[0], max_side
        self.tensors = tensors or TENSORS[kind]
        self.log = [] if log is None else log
        self.refused: set[str] = set()  # tensors whose address set_tensor_address refuses

    num_io_tensors = property(lambda self: len(self.tensors))

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def _find(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name):
        return types.SimpleNamespace(name=self._find(name)[1])

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self._find(name)[2])

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.engine.log.append((self.engine.graph, "shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return max(shape[2:]) <= self.engine.max_side  # the profile's limit

    def get_tensor_shape(self, name):
        return dff_shapes(self.engine.kind, self.shapes)[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name not in self.engine.refused

    def execute_async_v3(self, stream):
        self.engine.log.append((self.engine.graph, "execute", stream, dict(self.addresses)))
        return True


def test_engine_tensors_checks_names_and_dtypes():
    path = Path("e/flow.plan")
    tensors = engine_tensors(FakeEngine("flow"), "flow", path)
    assert [(t.name, t.is_input, t.dtype) for t in tensors][:3] == [
        ("image", True, np.uint8), ("key_image", True, np.uint8), ("key_feat", True, np.float32)]
    wrong = TENSORS["flow"][:2] + [("feat_in", "INPUT", "FLOAT")] + TENSORS["flow"][3:]
    with pytest.raises(BackendError, match=r"^e/flow.plan: inputs \['feat_in', 'image', "
                                           r"'key_image'\].*dff-export and dff-build"):
        engine_tensors(FakeEngine("flow", wrong), "flow", path)
    fp8 = [("feat", "INPUT", "FP8"), *TENSORS["task"][1:]]
    with pytest.raises(BackendError, match="tensor 'feat' is FP8, which dff-trt does not bind"):
        engine_tensors(FakeEngine("task", fp8), "task", Path("task.plan"), ["labels"])


def test_an_address_tensorrt_refuses_is_an_error_naming_the_tensor():
    memory = HostMemory()
    engine = FakeEngine("task")
    engine.refused.add("labels")
    stage = _Stage("task", engine, memory, Path("task.plan"), ["labels"])
    feat = BufferPool(memory).take((1, C, 4, 6), np.float32)
    with pytest.raises(RuntimeError, match="task.plan: TensorRT refused the address .* labels"):
        stage.bind({"feat": feat})


def test_stage_sets_shapes_once_addresses_always_and_outputs_from_its_pools():
    memory = HostMemory()
    engine = FakeEngine("flow")
    stage = _Stage("flow", engine, memory, Path("flow.plan"))
    inputs = BufferPool(memory)
    x = {"image": inputs.take((1, 3, 64, 96), np.uint8),
         "key_image": inputs.take((1, 3, 64, 96), np.uint8),
         "key_feat": inputs.take((1, C, 4, 6), np.float32)}
    out = stage.bind(x)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "flow": ((1, 2, 4, 6), np.float32), "scale": ((1, C, 4, 6), np.float32),
        "feat": ((1, C, 4, 6), np.float32)}
    stage.enqueue(7)
    (_, _, stream, addresses), = [e for e in engine.log if e[1] == "execute"]
    assert stream == 7
    assert addresses == {**{n: v.ptr for n, v in x.items()}, **{n: v.ptr for n, v in out.items()}}
    assert [e[2] for e in engine.log if e[1] == "shape"] == ["image", "key_image", "key_feat"]
    held = out["feat"]
    del out
    again = stage.bind(x)  # same shapes: none set again; freed outputs reused, held one not
    assert len([e for e in engine.log if e[1] == "shape"]) == 3
    assert again["feat"].ptr != held.ptr and len(stage.pools["feat"]) == 2
    assert len(stage.pools["flow"]) == 1


def test_stage_refuses_a_shape_outside_the_profile_and_a_wrong_dtype():
    memory = HostMemory()
    stage = _Stage("feature", FakeEngine("feature", max_side=64), memory, Path("f.plan"))
    pool = BufferPool(memory)
    with pytest.raises(BackendError, match=r"f.plan: input image of shape \[1, 3, 64, 128\] is "
                                           r"outside the engine's profile"):
        stage.bind({"image": pool.take((1, 3, 64, 128), np.uint8)})
    with pytest.raises(TypeError, match="feature input image is float32, the engine wants uint8"):
        stage.bind({"image": pool.take((1, 3, 64, 64), np.float32)})


# --- TrtBackend on the stand-in -------------------------------------------------------------

def with_stand_in_engines(export, out, task="task"):
    """A copy of the engine folder `export` at `out` with three stand-in 'engines' recorded in
    its manifest for GPU/TRT; a plan's bytes are its TENSORS key (`task` for the task graph)."""
    shutil.copytree(export, out)
    manifest = load_manifest(out)
    made = {}
    for graph in ("feature", "flow", "task"):
        plan = (task if graph == "task" else graph).encode()
        name, entry = entries.engine_entry(
            graph=graph, plan=plan, gpu_name=GPU, cc=CC, trt_version=TRT,
            precision="fp32", onnx_sha256=manifest["graphs"][graph]["sha256"],
            shapes=profile_shapes(manifest, graph), workspace_mib=None, timing_cache="t.cache",
            seconds=0.0)
        entries.write_atomic(out / entry["file"], plan)
        made[name] = entry
    entries.record_engines(out, manifest, made)
    return out


@pytest.fixture
def engine_dir(tiny_export, tmp_path):
    """The tiny export with stand-in engines (with_stand_in_engines)."""
    return with_stand_in_engines(tiny_export[1], tmp_path / "engines")


@pytest.fixture
def detection_engine_dir(request, tmp_path):
    """The tiny detection export (conftest's, engineer E's) with stand-in engines."""
    try:
        export = request.getfixturevalue("detection_engines")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no detection_engines fixture (a tiny detection export)")
    return with_stand_in_engines(export, tmp_path / "engines", task="task:detection")


@pytest.fixture
def stand_in(monkeypatch):
    """`tensorrt` replaced by a module whose Runtime makes FakeEngines from plan bytes (the
    TENSORS key; anything else does not deserialize); the GPU reported as GPU."""
    log: list = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            graph = bytes(plan).decode()
            return FakeEngine(graph, log=log) if graph in TENSORS else None

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    monkeypatch.setitem(sys.modules, "tensorrt",
                        fake_tensorrt(Runtime=Runtime, Logger=Logger, __version__=TRT))
    monkeypatch.setattr("dff.engines.builder.device_info", lambda device=0: (GPU, CC))
    monkeypatch.setattr("dff.plugins.kernel.driver_cuda_version", lambda: (13, 0))
    return log


def test_backend_runs_the_pipeline_on_the_stand_in_keeping_the_key_buffers(engine_dir,
                                                                           stand_in):
    from dff.runtime.loop import Pipeline
    from dff.runtime.scheduler import FixedInterval

    backend = TrtBackend(engine_dir, memory=HostMemory())
    assert (backend.name, backend.stride, backend.precision) == ("tensorrt", 16, "fp32")
    frames = [np.full((64, 96, 3), i, np.uint8) for i in range(7)]
    results = list(Pipeline(backend, FixedInterval(3)).run(frames))
    assert [r.is_key for r in results] == [True, False, False] * 2 + [True]
    assert all(r.labels.shape == (64, 96) and r.labels.dtype == np.uint8 for r in results)
    runs = [(e[0], e[3]) for e in stand_in if e[1] == "execute"]
    assert [g for g, _ in runs] == ["feature", "task", "flow", "task", "flow", "task"] * 2 + [
        "feature", "task"]
    stream = backend.memory.stream_handle(backend._ring.compute)
    assert {e[2] for e in stand_in if e[1] == "execute"} == {stream}
    for start in (0, 6):  # each key frame's image and features feed both of its flows
        (_, key), (_, flow1), (_, flow2) = runs[start], runs[start + 2], runs[start + 4]
        assert flow1["key_image"] == flow2["key_image"] == key["image"]
        assert flow1["key_feat"] == flow2["key_feat"] == key["feat"]
        assert flow1["feat"] != key["feat"] and flow1["image"] != key["image"]
    assert len(backend._ring) == 3 and len(backend._stages["feature"].pools["feat"]) <= 2
    backend.close()
    backend.close()


def test_detection_backend_binds_and_returns_every_task_output(detection_engine_dir, stand_in):
    from dff.runtime.loop import Pipeline
    from dff.runtime.scheduler import FixedInterval

    backend = TrtBackend(detection_engine_dir, memory=HostMemory())
    assert backend.task_spec["kind"] == "detection"
    out = backend.task(backend.feature(np.zeros((2, 3, 64, 96), np.uint8)))
    assert {n: (v.dtype, v.shape) for n, v in out.items()} == {
        "boxes": (np.float32, (2, K, 4)), "scores": (np.float32, (2, K)),
        "classes": (np.int32, (2, K)), "num": (np.int32, (2,))}
    (_, _, _, addresses), = [e for e in stand_in if e[:2] == ("task", "execute")]
    fixed = {n: b.ptr for n, b in backend._task_out.items()}
    assert {n: addresses[n] for n in fixed} == fixed  # every output bound, to its own buffer
    assert len(set(fixed.values())) == 4
    results = list(Pipeline(backend, FixedInterval(2)).run([np.zeros((64, 96, 3), np.uint8)] * 3))
    assert [r.is_key for r in results] == [True, False, True]
    for r in results:  # the stand-in computes nothing: only names and layout are checked
        assert set(r.outputs) == {"boxes", "scores", "classes", "num"}
        assert r.outputs["boxes"].shape[1:] == (4,)
        assert len(r.outputs["boxes"]) == len(r.outputs["scores"]) == len(r.outputs["classes"])
    backend.close()


def test_a_detection_engine_without_an_output_the_manifest_lists_is_refused():
    engine = FakeEngine("task:detection", TENSORS["task:detection"][:-1])  # no `num`
    with pytest.raises(BackendError, match=r"^task.plan: inputs \['feat'\] and outputs .* "
                                           r"expected .*'num'\].*dff-build"):
        engine_tensors(engine, "task", Path("task.plan"),
                       ["boxes", "scores", "classes", "num"])


def test_backend_refuses_engines_built_for_another_gpu_with_the_rebuild_command(
        engine_dir, stand_in, monkeypatch):
    monkeypatch.setattr("dff.engines.builder.device_info", lambda device=0: ("NVIDIA L4", "8.9"))
    with pytest.raises(EngineError, match=r"was built for NVIDIA H100 .* this machine has NVIDIA "
                                          r"L4 .*rebuild with `dff-build .*/engines/ --fp32`"):
        TrtBackend(engine_dir, memory=HostMemory())


def test_backend_names_an_engine_that_does_not_deserialize(engine_dir, stand_in):
    manifest = load_manifest(engine_dir)
    (name, entry), = [(k, e) for k, e in manifest["engines"].items() if e["graph"] == "task"]
    entries.write_atomic(engine_dir / entry["file"], b"garbage")
    entry = {**entry, "sha256": entries._sha256(engine_dir / entry["file"]), "bytes": 7}
    entries.record_engines(engine_dir, manifest, {name: entry})
    with pytest.raises(BackendError, match=r"task\..*\.plan: TensorRT could not deserialize this "
                                           r"engine .*rebuild it with `dff-build .* --fp32`"):
        TrtBackend(engine_dir, memory=HostMemory())


def test_opening_the_backend_never_touches_the_python_plugin(engine_dir, stand_in, monkeypatch):
    """AOT engines embed the kernel; a registered creator would make a JIT plugin instead."""
    import dff.plugins

    plugin = Untouchable("dff.plugins.trt_plugin")
    monkeypatch.setitem(sys.modules, "dff.plugins.trt_plugin", plugin)
    monkeypatch.setattr(dff.plugins, "trt_plugin", plugin, raising=False)
    backend = TrtBackend(engine_dir, memory=HostMemory())
    backend.task(backend.feature(np.zeros((1, 3, 64, 96), np.uint8)))
    backend.close()
    assert plugin.reads == []


def with_ptx_isa(engine_dir, isa):
    """Record `isa` as the flow engine's ptx_isa, as dff-build does for the FlowWarp plugin."""
    manifest = load_manifest(engine_dir)
    (name, entry), = [(k, e) for k, e in manifest["engines"].items() if e["graph"] == "flow"]
    entries.record_engines(engine_dir, manifest, {name: {**entry, "ptx_isa": isa}})
    return entry["file"]


def test_backend_refuses_engines_whose_ptx_this_driver_cannot_load(engine_dir, stand_in):
    flow = with_ptx_isa(engine_dir, "9.5")
    with pytest.raises(BackendError) as info:
        TrtBackend(engine_dir, memory=HostMemory())
    assert str(info.value) == (
        f"{engine_dir}/{flow} embeds FlowWarp PTX of ISA 9.5, which this GPU driver (CUDA 13.0) "
        f"cannot load: update the driver, or rebuild here with `dff-build {engine_dir}/ --fp32` "
        "after pip install 'nvidia-cuda-nvrtc==13.0.*'")


def test_backend_loads_engines_whose_ptx_this_driver_loads(engine_dir, stand_in, monkeypatch):
    with_ptx_isa(engine_dir, "9.0")
    TrtBackend(engine_dir, memory=HostMemory()).close()
    with_ptx_isa(engine_dir, "9.5")
    monkeypatch.setattr("dff.plugins.kernel.driver_cuda_version", lambda: (13, 5))
    TrtBackend(engine_dir, memory=HostMemory()).close()


def test_backend_refuses_a_ptx_isa_that_is_not_major_minor(engine_dir, stand_in):
    flow = with_ptx_isa(engine_dir, "nine")
    with pytest.raises(BackendError, match=rf"manifest.json: engine {flow} has ptx_isa 'nine', "
                                           r"not 'major.minor'; rebuild with `dff-build "):
        TrtBackend(engine_dir, memory=HostMemory())


def test_cuda_graph_needs_cuda_memory(engine_dir, stand_in):
    with pytest.raises(ValueError, match="cuda_graph=True needs CudaMemory"):
        TrtBackend(engine_dir, memory=HostMemory(), cuda_graph=True)


# --- TensorRT and a GPU ---------------------------------------------------------------------

needs_trt_gpu = pytest.mark.skipif(
    not HAVE_TRT or cuda_device_count() == 0,
    reason=f"needs TensorRT and a CUDA device ({tensorrt_status()[1]}; "
           f"{cuda_device_count()} CUDA devices)")


@pytest.fixture(scope="module")
def built(tiny_export, tmp_path_factory):
    from dff.engines.builder import build_engines

    out = tmp_path_factory.mktemp("trt") / "engines"
    shutil.copytree(tiny_export[1], out)
    build_engines(out, precision="fp32")
    return out


def clip_labels(backend) -> np.ndarray:
    """The labels of a 9-frame synthetic clip through the pipeline at key interval 3 (as
    RUN_ENGINES below computes them)."""
    from dff.data.synthetic import make_clip
    from dff.runtime.loop import Pipeline
    from dff.runtime.scheduler import FixedInterval

    results = Pipeline(backend, FixedInterval(3)).run(iter(make_clip(7, 9, 64, 96).frames))
    return np.stack([r.labels for r in results])


@pytest.fixture(scope="module")
def ort_labels(built):
    backend = open_backend("onnxruntime-cpu", built, threads=1)
    try:
        return clip_labels(backend)
    finally:
        backend.close()


@needs_trt_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_labels_agree_with_onnxruntime_through_the_pipeline(built, ort_labels,
                                                                    cuda_graph):
    """In the process that built the engines (where the plugin is registered)."""
    assert "dff.plugins.trt_plugin" in sys.modules
    backend = TrtBackend(built, cuda_graph=cuda_graph, timing=True)
    try:
        labels = clip_labels(backend)
        assert {"feature", "task", "h2d", "d2h"} <= set(backend.stage_ms())
    finally:
        backend.close()
    agree = (labels == ort_labels).mean()
    assert agree >= 0.99, agree


@needs_trt_gpu
def test_the_flow_engine_records_the_ptx_isa_it_embeds_and_this_driver_loads(built):
    from dff.plugins import kernel

    (flow,) = [e for e in load_manifest(built)["engines"].values() if e["graph"] == "flow"]
    assert flow["flow_warp"] == "plugin"
    assert flow["ptx_isa"] == "{}.{}".format(*kernel.ptx_isa(kernel.compile_ptx("sm_80")))
    major, minor = map(int, flow["ptx_isa"].split("."))
    assert kernel.driver_loads_ptx((major, minor), kernel.driver_cuda_version())


# Runs the engines as a deployment box would: no dff.plugins.trt_plugin, no dff creator.
RUN_ENGINES = """
import sys
import numpy as np
import tensorrt as trt
from dff.data.synthetic import make_clip
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import FixedInterval
from dff.runtime.trt_backend import TrtBackend

backend = TrtBackend(sys.argv[1])
results = Pipeline(backend, FixedInterval(3)).run(iter(make_clip(7, 9, 64, 96).frames))
labels = np.stack([r.labels for r in results])
backend.close()
assert "dff.plugins.trt_plugin" not in sys.modules, "the runtime imported the Python plugin"
registry = trt.get_plugin_registry()
dff = [c.name for c in registry.all_creators if getattr(c, "plugin_namespace", "") == "dff"]
assert not dff, f"dff plugin creators registered: {dff}"
np.save(sys.argv[2], labels)
"""


@needs_trt_gpu
def test_engines_run_in_a_fresh_process_that_never_imports_the_plugin(built, ort_labels,
                                                                      tmp_path):
    """AOT engines embed the FlowWarp kernel: a process without the Python plugin runs them."""
    out = tmp_path / "labels.npy"
    result = subprocess.run([sys.executable, "-c", RUN_ENGINES, str(built), str(out)],
                            cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = np.load(out)
    assert labels.shape == ort_labels.shape
    agree = (labels == ort_labels).mean()
    assert agree >= 0.99, agree
