"""TensorRT's `dff::FlowWarp` plugin: `tensorrt.plugin` (TensorRT 10.10+) with an AOT kernel.

`register_plugin()` registers, once per process, the shape/type rule, the supported formats
(fp32 or fp16, LINEAR) and an ahead-of-time implementation: the FlowWarp kernel's PTX
(NVRTC, `dff.plugins.kernel`), its launch grid as shape expressions and the scalar arguments
N, C, H, W. The ONNX parser then maps the node FlowWarp in domain "dff" to this plugin.
It compiles the PTX and checks that this machine's driver loads it first: TensorRT only logs
an exception raised inside the AOT callback, and the build then fails without saying why.

Why AOT `tensorrt.plugin` rather than a C++ IPluginV3: TensorRT embeds the PTX and launch
rule in the engine, so the engine runs with no Python callback (from C++ too) and there is
no plugin .so to build and ship per platform; and FlowWarp has no attributes, which AOT
plugins do not serialise. Python (with cuda-python) is needed only to build the engine; the
runtime never registers the plugin.

The rules themselves are plain functions of ints and dtype names, so they are tested
without TensorRT; the decorated functions only translate TensorRT's descriptors.
"""

# No `from __future__ import annotations`: tensorrt.plugin checks the decorated functions'
# annotations as classes, so they must be evaluated when the functions are defined.

import functools
from typing import Any

from dff.plugins import kernel

from dff.errors import DffError

PLUGIN_ID = "dff::FlowWarp"
# The AOT API does not say which GPU the engine is for: sm_80 PTX loads on Ampere and every
# later GPU (the driver compiles it for the device); the kernel needs nothing newer.
PTX_ARCH = "sm_80"
DTYPES = ("FP32", "FP16")  # tensorrt.plugin's names for trt.float32 and trt.float16
KERNEL_FOR_DTYPE = {"FP32": kernel.KERNEL_NAMES["float32"], "FP16": kernel.KERNEL_NAMES["float16"]}

Dims = tuple[int | None, ...]  # a shape with None where the size is not known at build time


def output_dtype(feat: str, flow: str, scale: str) -> str:
    """The output's dtype name: feat's, when all three inputs share a supported dtype."""
    if feat not in DTYPES:
        raise DffError(f"FlowWarp supports {' and '.join(DTYPES)} tensors, got feat {feat}")
    if flow != feat or scale != feat:
        raise DffError(f"FlowWarp inputs must share one dtype, got feat {feat}, flow {flow}, "
                       f"scale {scale}")
    return feat


def output_shape(feat: Dims, flow: Dims, scale: Dims) -> Dims:
    """The output's shape (feat's), after checking flow is [N,2,H,W] and scale is feat's shape.

    Sizes given as None (unknown until run time) are not checked; known ones must agree."""
    if len(feat) != 4 or len(flow) != 4 or len(scale) != 4:
        raise DffError(f"FlowWarp wants feat [N,C,H,W], flow [N,2,H,W], scale [N,C,H,W]; got "
                       f"ranks {len(feat)}, {len(flow)}, {len(scale)}")
    want_flow = (feat[0], 2, feat[2], feat[3])
    for name, got, want in (("flow", flow, want_flow), ("scale", scale, feat)):
        if any(g is not None and w is not None and g != w for g, w in zip(got, want)):
            raise DffError(f"FlowWarp {name} shape {_show(got)} does not match "
                           f"{_show(want)} (feat {_show(feat)})")
    return feat


def _show(dims: Dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def type_combinations() -> str:
    """tensorrt.plugin's type string for (feat, flow, scale, out): all fp32 or all fp16."""
    return ", ".join(["|".join(DTYPES)] * 4)


def kernel_name(dtype: str) -> str:
    """The kernel in the PTX that handles `dtype` ('FP32' or 'FP16')."""
    return KERNEL_FOR_DTYPE[dtype]


@functools.cache
def _ptx() -> bytes:
    """The sm_80 PTX that engines embed, compiled once and checked against this driver."""
    ptx = kernel.compile_ptx(PTX_ARCH)
    kernel.check_driver_can_load_nvrtc_ptx(ptx)
    return ptx


def compile_plugin_ptx() -> bytes:
    """`_ptx()`, with NVRTC's failures as one DffError line naming the fix."""
    try:
        return _ptx()
    except RuntimeError as e:  # NVRTC refused flow_warp.cu, or one of its calls failed
        raise DffError(f"NVRTC could not compile plugins/flow_warp.cu for the FlowWarp plugin "
                       f"({_first_error(str(e))}): install the NVRTC it is built with, "
                       f"{kernel.NVRTC_FIX}") from e


def _first_error(log: str) -> str:
    """The first line of an NVRTC message that names an error (else its first line)."""
    lines = [" ".join(line.split()) for line in log.splitlines() if line.strip()] or ["?"]
    return next((line for line in lines[1:] if "error" in line), lines[0])[:200]


def ptx_isa() -> str:
    """The PTX ISA version ('9.0') of the kernel that engines embed, for their manifest entry."""
    return "{}.{}".format(*kernel.ptx_isa(compile_plugin_ptx()))


def _require_tensorrt() -> None:
    """One DffError saying why TensorRT cannot register the plugin, if it cannot."""
    from dff.plugins.find_tensorrt import find_tensorrt

    trt, why = find_tensorrt()
    if trt is None:
        raise DffError(f"TensorRT is not usable here ({why}): pip install tensorrt (10.10 or "
                       "later) to build engines with the FlowWarp plugin")
    import tensorrt.plugin as trtp

    if not hasattr(trtp, "KernelLaunchParams"):
        raise DffError(f"TensorRT {trt.__version__} has no AOT plugins (tensorrt.plugin "
                       "aot_impl): install TensorRT 10.10 or later")


def _dtype_name(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype))  # DataType.FLOAT / DataType.HALF
    return {"FLOAT": "FP32", "HALF": "FP16"}.get(name, name)


def _dims(desc: Any) -> Dims:
    """A TensorDesc's shape as build-time constants; None where symbolic, or where TensorRT
    asks for output types only and gives fake shape expressions (then only ranks count)."""
    return tuple(None if e.is_fake or not e.is_constant else e.constant_value()
                 for e in desc.shape_expr)


def register_plugin() -> None:
    """Register `dff::FlowWarp` with TensorRT's plugin registry; later calls do nothing. Call
    it before parsing: it compiles the PTX here, so that TensorRT's callback cannot fail."""
    _require_tensorrt()
    compile_plugin_ptx()
    import tensorrt.plugin as trtp

    namespace, name = PLUGIN_ID.split("::")
    if hasattr(trtp.op, namespace) and hasattr(getattr(trtp.op, namespace), name):
        return

    @trtp.register(PLUGIN_ID)
    def flow_warp_desc(feat: trtp.TensorDesc, flow: trtp.TensorDesc,
                       scale: trtp.TensorDesc) -> trtp.TensorDesc:
        output_dtype(_dtype_name(feat.dtype), _dtype_name(flow.dtype), _dtype_name(scale.dtype))
        output_shape(_dims(feat), _dims(flow), _dims(scale))
        return feat.like()

    @trtp.autotune(PLUGIN_ID)
    def flow_warp_formats(feat: trtp.TensorDesc, flow: trtp.TensorDesc, scale: trtp.TensorDesc,
                          outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(type_combinations(), "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def flow_warp_aot(feat: trtp.TensorDesc, flow: trtp.TensorDesc, scale: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc], tactic: int
                      ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams,
                                 trtp.SymExprs]:
        n, c, h, w = feat.shape_expr
        grid, block = kernel.geometry(n, c, h, w, cdiv=trtp.cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x, params.block_y, params.block_z = block
        params.shared_mem = 0
        # Scalar arguments go between the input and output pointers (see flow_warp.cu).
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(d) for d in (n, c, h, w)])
        return kernel_name(_dtype_name(feat.dtype)), _ptx(), params, extra
