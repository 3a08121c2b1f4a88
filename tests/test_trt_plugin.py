"""The TensorRT FlowWarp plugin: its shape, type and format rules as plain Python (always), its
registration (TensorRT installed), and an engine built from the exported ONNX FlowWarp node
that runs the AOT kernel, also in a process that never registered the plugin (TensorRT and a
GPU).
"""

import __future__

import functools
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from conftest import Untouchable
from dff.plugins import kernel, trt_plugin
from dff.plugins.reference import flow_warp_numpy

from dff.errors import DffError


def real_tensorrt():
    """tensorrt if it is TensorRT; None if missing or only stubs (an empty namespace package)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


TRT = real_tensorrt()
needs_trt = pytest.mark.skipif(TRT is None, reason="TensorRT is not installed")


# --- plain rules, no TensorRT -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["FP32", "FP16"])
def test_output_dtype_is_the_shared_input_dtype(dtype):
    assert trt_plugin.output_dtype(dtype, dtype, dtype) == dtype


@pytest.mark.parametrize("types_", [("FP32", "FP16", "FP32"), ("FP16", "FP16", "FP32")])
def test_mixed_input_dtypes_are_refused(types_):
    with pytest.raises(DffError, match="share one dtype"):
        trt_plugin.output_dtype(*types_)


@pytest.mark.parametrize("dtype", ["BF16", "INT8", "FP8"])
def test_unsupported_dtypes_are_refused(dtype):
    with pytest.raises(DffError, match="FP32 and FP16"):
        trt_plugin.output_dtype(dtype, dtype, dtype)


def test_output_shape_is_feats_shape():
    assert trt_plugin.output_shape((2, 8, 5, 7), (2, 2, 5, 7), (2, 8, 5, 7)) == (2, 8, 5, 7)


def test_symbolic_sizes_are_not_checked():
    feat = (None, 8, None, None)
    assert trt_plugin.output_shape(feat, (None, 2, None, None), feat) == feat
    assert trt_plugin.output_shape(feat, (3, 2, 4, 5), (3, None, 4, 5)) == feat


@pytest.mark.parametrize("flow, scale, what", [
    ((2, 3, 5, 7), (2, 8, 5, 7), r"flow shape \[2,3,5,7\]"),
    ((1, 2, 5, 7), (2, 8, 5, 7), "flow shape"),
    ((2, 2, 5, 6), (2, 8, 5, 7), "flow shape"),
    ((2, 2, 5, 7), (2, 4, 5, 7), r"scale shape \[2,4,5,7\] does not match \[2,8,5,7\]"),
    ((2, 2, 5, 7), (2, 8, None, 9), "scale shape"),
])
def test_mismatched_shapes_are_refused(flow, scale, what):
    with pytest.raises(DffError, match=what):
        trt_plugin.output_shape((2, 8, 5, 7), flow, scale)


def test_wrong_ranks_are_refused():
    with pytest.raises(DffError, match="ranks 4, 3, 4"):
        trt_plugin.output_shape((2, 8, 5, 7), (2, 5, 7), (2, 8, 5, 7))


def test_formats_are_all_fp32_or_all_fp16():
    # tensorrt.plugin: '|' ties the positions together (feat, flow, scale, out).
    assert trt_plugin.type_combinations() == "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16"


def test_each_dtype_launches_its_kernel():
    assert trt_plugin.kernel_name("FP32") == "flow_warp_f32"
    assert trt_plugin.kernel_name("FP16") == "flow_warp_f16"
    assert set(trt_plugin.KERNEL_FOR_DTYPE.values()) == set(kernel.KERNEL_NAMES.values())


def test_plugin_module_evaluates_annotations_for_tensorrt_plugin():
    # tensorrt.plugin checks annotations as classes; postponed (string) ones break it.
    flags = trt_plugin.register_plugin.__code__.co_flags
    assert not flags & __future__.annotations.compiler_flag


def test_missing_tensorrt_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DffError, match=r"TensorRT is not usable here \(import tensorrt: "):
        trt_plugin.register_plugin()


def test_stubs_without_tensorrt_are_not_taken_for_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(DffError, match="found only an empty package"):
        trt_plugin.register_plugin()


# --- the eager PTX compile, with TensorRT stand-ins -------------------------------------------

@pytest.fixture
def eager(monkeypatch):
    """TensorRT 'present' as stand-ins that record any use, and fresh PTX caches."""
    trtp = Untouchable("tensorrt.plugin")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_plugin, "_ptx", functools.cache(trt_plugin._ptx.__wrapped__))
    monkeypatch.setattr(kernel, "compile_ptx", functools.cache(kernel.compile_ptx.__wrapped__))
    return trtp


NVRTC_LOG = ('NVRTC failed on flow_warp.cu for sm_80:\nflow_warp.cu(40): error: identifier '
             '"__half" is undefined\n\n1 error detected in the compilation of "flow_warp.cu".\n')


def test_register_plugin_turns_an_nvrtc_failure_into_one_line_before_registering(
        eager, monkeypatch):
    def fail(arch="sm_80", fp16=True):
        raise RuntimeError(NVRTC_LOG)

    monkeypatch.setattr(kernel, "compile_ptx", fail)
    with pytest.raises(DffError) as info:
        trt_plugin.register_plugin()
    assert str(info.value) == (
        "NVRTC could not compile plugins/flow_warp.cu for the FlowWarp plugin (flow_warp.cu(40): "
        "error: identifier \"__half\" is undefined): install the NVRTC it is built with, "
        "pip install 'nvidia-cuda-nvrtc==13.0.*'")
    assert eager.reads == []  # tensorrt.plugin never imported: nothing registered


def test_register_plugin_without_a_loadable_nvrtc_is_one_line_before_registering(
        eager, monkeypatch):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python is not installed")

    def missing():
        raise RuntimeError("libnvrtc.so.13: cannot open shared object file\n  (searched: wheel)")

    monkeypatch.setattr(nvrtc, "nvrtcVersion", missing)
    with pytest.raises(DffError, match=r"^compiling the FlowWarp kernel needs cuda-python and "
                                       r"NVRTC \(libnvrtc.so.13: cannot open shared object file "
                                       r"\(searched: wheel\)\): pip install dff-trt\[gpu\]$"):
        trt_plugin.register_plugin()
    assert eager.reads == []


def test_register_plugin_refuses_ptx_this_driver_cannot_load_before_registering(
        eager, monkeypatch):
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python is not installed")
    monkeypatch.setattr(kernel, "driver_cuda_version", lambda: (12, 8))  # older than the PTX
    with pytest.raises(DffError, match=r"GPU driver \(CUDA 12.8\) cannot load: update the GPU "
                                       r"driver to CUDA 13.0"):
        trt_plugin.register_plugin()
    assert eager.reads == []


def test_the_plugins_ptx_isa_is_the_version_of_the_ptx_it_compiled(eager):
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python is not installed")
    try:
        ptx = trt_plugin.compile_plugin_ptx().decode()
    except DffError as e:  # no NVRTC library, or a driver that cannot load its PTX
        pytest.skip(str(e))
    assert f".version {trt_plugin.ptx_isa()}\n" in ptx and ".target sm_80" in ptx


# --- with TensorRT ----------------------------------------------------------------------------

@needs_trt
def test_register_plugin_adds_the_creator_once():
    trt_plugin.register_plugin()
    trt_plugin.register_plugin()
    creator = TRT.get_plugin_registry().get_creator("FlowWarp", "1", "dff")
    assert creator is not None


C = 8
PROFILE = {"min": (1, 1, 1), "opt": (2, 9, 13), "max": (3, 40, 70)}  # (N, H, W)


def onnx_warp_model(dtype):
    """The exported one-node FlowWarp graph (C fixed), its I/O retyped for fp16 if asked."""
    import onnx
    from dff.plugins import onnx_op

    model = onnx_op.export_warp_model(channels=C, dynamic_channels=False)
    if dtype == np.float16:
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model.SerializeToString()


@functools.cache
def build_plan(dtype) -> bytes:
    """A serialized engine for the FlowWarp graph over PROFILE (one build per dtype)."""
    trt = TRT
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_warp_model(dtype)), [str(parser.get_error(i))
                                                  for i in range(parser.num_errors)]
    layers = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.PLUGIN_V3 in layers, f"FlowWarp was not mapped to the plugin: {layers}"
    assert trt.LayerType.GRID_SAMPLE not in layers
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, channels in (("feat", C), ("flow", 2), ("scale", C)):
        shapes = [(ni, channels, hi, wi) for ni, hi, wi in PROFILE.values()]
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the FlowWarp engine"
    return bytes(plan)


RUN_PLAN = """
import sys, numpy as np, tensorrt as trt, torch
plan, inputs, out_path = open(sys.argv[1], "rb").read(), np.load(sys.argv[2]), sys.argv[3]
engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
context = engine.create_execution_context()
tensors = {k: torch.from_numpy(inputs[k]).cuda() for k in ("feat", "flow", "scale")}
tensors["out"] = torch.empty_like(tensors["feat"])
for name, t in tensors.items():
    if name != "out":
        context.set_input_shape(name, tuple(t.shape))
    context.set_tensor_address(name, t.data_ptr())
stream = torch.cuda.current_stream()
assert context.execute_async_v3(stream.cuda_stream)
stream.synchronize()
np.save(out_path, tensors["out"].cpu().numpy())
"""


@pytest.fixture(scope="module")
def gpu():
    if TRT is None:
        pytest.skip("TensorRT is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        trt_plugin.register_plugin()
        trt_plugin._ptx()
    except DffError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 2e-3)],
                         ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, C, 1, 1), (2, C, 9, 13), (3, C, 38, 63)])
def test_engine_runs_the_aot_kernel_without_the_python_plugin(gpu, tmp_path, dtype, tol, shape):
    """Built here; run in a fresh process that never registers the plugin (AOT = in the plan)."""
    rng = np.random.default_rng(0)
    n, _, h, w = shape
    inputs = {"feat": rng.uniform(-1, 1, shape).astype(dtype),
              "flow": (rng.uniform(-2, 2, (n, 2, h, w)) * [[[[w]], [[h]]]]).astype(dtype),
              "scale": rng.uniform(0.5, 1.5, shape).astype(dtype)}
    (tmp_path / "warp.plan").write_bytes(build_plan(dtype))
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(RUN_PLAN)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "warp.plan"),
                             str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == dtype
    expected = flow_warp_numpy(*(inputs[k].astype(np.float64) for k in ("feat", "flow", "scale")))
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)
