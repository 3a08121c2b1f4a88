"""What tests/gpu_checks.py runs inside Python: the probe of this machine, and the GPU checks
that run in-process (the sm_80 PTX, the kernel's numerics, a CUDA graph capture), each in its
own subprocess: `python tests/gpu_steps.py NAME --figures FILE [--quick]`, exit 1 on a problem.

dff, numpy, torch and cuda-python are imported where used: gpu_checks.py imports this module
before it has made `dff` importable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

TORCH_CUDA = "pip install torch --index-url https://download.pytorch.org/whl/cu130"


# --- this machine ---------------------------------------------------------------------------

def probe() -> tuple[dict, dict[str, str | None]]:
    """(environment, facts): versions of everything the GPU path uses, and per fact a step
    can need, None when it holds here or the reason it does not."""
    from dff.plugins import kernel
    from dff.runtime.loaders import tensorrt_status

    from dff.errors import DffError

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    facts: dict[str, str | None] = {}
    count = kernel.cuda_device_count()
    env["cuda_devices"] = count
    facts["gpu"] = None if count else ("no CUDA device here (the CUDA driver, through "
                                       "cuda-python, sees none)")
    if count:
        try:
            env.update(gpu_info())
        except RuntimeError as e:
            env["gpu"] = f"unknown: {e}"
    try:
        env["cuda_bindings"] = importlib.import_module("cuda.bindings").__version__
    except (ImportError, AttributeError) as e:
        env["cuda_bindings"] = f"missing: {e}"
    try:
        from dff.plugins.trt_plugin import PTX_ARCH

        env["nvrtc"] = "{}.{}".format(*kernel.nvrtc_version())
        env["ptx_arch"], env["ptx_isa"] = PTX_ARCH, ptx_isa(kernel.compile_ptx(PTX_ARCH))
        facts["nvrtc"] = None
    except (ImportError, DffError, RuntimeError, OSError) as e:  # NVRTC cannot make it here
        env["nvrtc"] = f"unavailable: {e}"
        # without a GPU that is a skip; on a GPU machine the ptx step must fail with it
        facts["nvrtc"] = None if count else f"NVRTC cannot compile here ({e})"
    facts["torch_cuda"] = torch_fact(env)
    usable, why = tensorrt_status()
    env["tensorrt"] = why if usable else f"no TensorRT here ({why})"
    facts["tensorrt"] = None if usable else env["tensorrt"]
    facts["fast_fp16"] = fast_fp16() if usable else facts["tensorrt"]
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        env["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(providers)})"
        cuda = "CUDAExecutionProvider" in providers
        facts["ort_cuda"] = None if cuda else (f"ONNX Runtime {onnxruntime.__version__} has no "
                                               "CUDA execution provider here")
    except ImportError as e:
        env["onnxruntime"] = facts["ort_cuda"] = f"onnxruntime is not importable ({e})"
    none = [facts[k] for k in ("torch_cuda", "ort_cuda", "tensorrt")]
    facts["gpu_backend"] = (None if None in none else "nothing to profile on a GPU here (no CUDA "
                            "torch, no ONNX Runtime CUDA provider, no TensorRT)")
    return env, facts


def gpu_info() -> dict:
    """Device 0's name and compute capability and the driver's CUDA version (cuda-python)."""
    from cuda.bindings import driver

    def get(result: tuple) -> Any:
        if int(result[0]) != 0:
            raise RuntimeError(f"CUDA driver call failed: {result[0]}")
        return result[1]

    device = get(driver.cuDeviceGet(0))
    attr = driver.CUdevice_attribute
    cc = [get(driver.cuDeviceGetAttribute(a, device)) for a in (
        attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)]
    version = get(driver.cuDriverGetVersion())
    return {"gpu": get(driver.cuDeviceGetName(256, device)).split(b"\0")[0].decode(),
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "driver_cuda": f"{version // 1000}.{version % 1000 // 10}"}


def torch_fact(env: dict) -> str | None:
    """Record torch's version and CUDA build; None if torch runs on CUDA here, else why not."""
    try:
        import torch
    except ImportError as e:
        env["torch"] = f"missing: {e}"
        return f"torch is not importable ({e}): {TORCH_CUDA}"
    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build: the torch-cuda steps need {TORCH_CUDA}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


def fast_fp16() -> str | None:
    try:
        import tensorrt as trt

        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        fast = getattr(builder, "platform_has_fast_fp16", True)
    except (RuntimeError, TypeError, AttributeError) as e:  # the build steps will say more
        return f"TensorRT could not make a builder to ask about fp16 ({e})"
    return None if fast else "TensorRT reports no fast fp16 on this GPU"


def ptx_isa(ptx: bytes) -> str:
    match = re.search(rb"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    return match.group(1).decode() if match else "unknown"


# --- the in-process steps -------------------------------------------------------------------

WARP_SHAPES = [(1, 1, 1, 1), (2, 3, 1, 9), (3, 33, 17, 11), (1, 1024, 38, 63)]
WARP_SHAPES_FULL = [(1, 2, 7, 1), (2, 64, 9, 13), (2, 1024, 68, 120)]
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3}  # max abs error against both float64 references
FLOWS = {"small": 0.3, "outside": 2.0}  # flow up to this many map sizes: 2 leaves the map
REPLAYS = 3


def step_ptx(quick: bool) -> dict:
    from dff.plugins import kernel
    from dff.plugins.trt_plugin import PTX_ARCH

    from dff.errors import DffError

    ptx = kernel.compile_ptx(PTX_ARCH)
    names = list(kernel.KERNEL_NAMES.values())
    problems = [f"{n} is not in the PTX" for n in names if f".entry {n}(".encode() not in ptx]
    figures = {"arch": PTX_ARCH, "isa": ptx_isa(ptx), "bytes": len(ptx), "kernels": names,
               "driver_loads": None}
    if kernel.cuda_device_count():
        try:
            kernel.FlowWarpKernel(0, ptx=ptx).close()
            figures["driver_loads"] = True
        except (DffError, RuntimeError) as e:  # too new an ISA, or another load error
            figures["driver_loads"] = False
            problems.append(str(e))
    where = "loaded by the driver" if figures["driver_loads"] else "compiled"
    return {**figures, "problems": problems,
            "headline": f"{PTX_ARCH} PTX ISA {figures['isa']}, {len(names)} kernels, {where}"}


def warp_inputs(shape: tuple, flow_range: float, dtype: Any, seed: int = 0) -> list:
    """feat in [-1, 1), flow within ±flow_range·(W, H) cells, scale in [0.5, 1.5)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, _, h, w = shape
    extent = np.array([w, h], dtype=np.float64).reshape(1, 2, 1, 1)
    return [rng.uniform(-1, 1, shape).astype(dtype),
            (rng.uniform(-1, 1, (n, 2, h, w)) * flow_range * extent).astype(dtype),
            rng.uniform(0.5, 1.5, shape).astype(dtype)]


def upload(memory: Any, stream: Any, arrays: list) -> list:
    """DeviceBuffers (the project's) holding copies of host `arrays`."""
    from dff.runtime.buffers import DeviceBuffer

    buffers = [DeviceBuffer(memory).ensure(a.shape, a.dtype) for a in arrays]
    for b, a in zip(buffers, arrays):
        memory.copy(b.ptr, a.ctypes.data, a.nbytes, "h2d", stream)
    memory.synchronize(stream)
    return buffers


def download(memory: Any, stream: Any, buffer: Any) -> Any:
    import numpy as np

    out = np.empty(buffer.shape, buffer.dtype)
    memory.copy(out.ctypes.data, buffer.ptr, out.nbytes, "d2h", stream)
    memory.synchronize(stream)
    return out


def max_abs(a: Any, b: Any) -> float | None:
    """max |a - b| in float64; None when either holds a NaN or an infinity."""
    import numpy as np

    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()) if np.isfinite(d).all() else None


def step_kernel(quick: bool) -> dict:
    import numpy as np
    import torch
    from dff.models.warp import flow_warp
    from dff.plugins import kernel
    from dff.plugins.reference import flow_warp_numpy
    from dff.plugins.trt_plugin import PTX_ARCH
    from dff.runtime.buffers import CudaMemory

    memory = CudaMemory(0)
    warp = kernel.FlowWarpKernel(0, ptx=kernel.compile_ptx(PTX_ARCH))
    stream = memory.stream()
    cases, problems = [], []
    try:
        for shape in WARP_SHAPES + WARP_SHAPES_FULL * (not quick):
            for flow_name, flow_range in FLOWS.items():
                for name, dtype in (("fp32", np.float32), ("fp16", np.float16)):
                    arrays = warp_inputs(shape, flow_range, dtype)
                    buffers = upload(memory, stream, [*arrays, np.full_like(arrays[0], np.nan)])
                    warp(*(b.ptr for b in buffers), *shape, dtype=np.dtype(dtype).name,
                         stream=memory.stream_handle(stream))
                    out = download(memory, stream, buffers[3])
                    for b in buffers:
                        b.close()
                    exact = [a.astype(np.float64) for a in arrays]  # the references in float64
                    errors = {"numpy": max_abs(out, flow_warp_numpy(*exact)),
                              "torch": max_abs(out, flow_warp(*map(torch.from_numpy,
                                                                   exact)).numpy())}
                    case = {"shape": "x".join(map(str, shape)), "dtype": name, "flow": flow_name,
                            "tol": TOLERANCE[name], **{f"max_abs_vs_{k}": v
                                                        for k, v in errors.items()}}
                    cases.append(case)
                    problems += [f"{name} {case['shape']} {flow_name} flow: max |kernel - {ref}|"
                                 f" = {'NaN' if err is None else f'{err:.2e}'} > {TOLERANCE[name]:g}"
                                 for ref, err in errors.items()
                                 if err is None or err > TOLERANCE[name]]
    finally:
        memory.destroy_stream(stream)
        warp.close()
    errors = {d: [c[f"max_abs_vs_{r}"] for c in cases if c["dtype"] == d
                  for r in ("numpy", "torch")] for d in TOLERANCE}
    worst = {d: None if None in e else max(e) for d, e in errors.items()}  # None: a NaN
    return {"ptx_arch": PTX_ARCH, "cases": cases, "worst": worst, "problems": problems,
            "headline": ", ".join(f"{d} max|err| {'NaN' if e is None else f'{e:.1e}'}"
                                  for d, e in worst.items())}


def step_graph(quick: bool) -> dict:
    import numpy as np
    from dff.plugins import kernel
    from dff.plugins.reference import flow_warp_numpy
    from dff.plugins.trt_plugin import PTX_ARCH
    from dff.runtime.buffers import CudaMemory, check

    memory, shape = CudaMemory(0), (2, 64, 9, 13)
    rt = memory.rt
    warp = kernel.FlowWarpKernel(0, ptx=kernel.compile_ptx(PTX_ARCH))
    stream = memory.stream()
    handle = memory.stream_handle(stream)
    arrays = warp_inputs(shape, FLOWS["outside"], np.float32)
    nan = np.full_like(arrays[0], np.nan)
    buffers = upload(memory, stream, [*arrays, nan, nan])  # ..., direct out, graph out
    inputs = [b.ptr for b in buffers[:3]]
    graph = graph_exec = None
    try:
        warp(*inputs, buffers[3].ptr, *shape, stream=handle)
        check(rt.cudaStreamBeginCapture(
            stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture")
        try:
            warp(*inputs, buffers[4].ptr, *shape, stream=handle)
        finally:  # end the capture in any case; its error is checked only after a clean launch
            ended = rt.cudaStreamEndCapture(stream)
        graph = check(ended, "cudaStreamEndCapture")
        graph_exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        unrun = bool(np.isnan(download(memory, stream, buffers[4])).all())
        for _ in range(REPLAYS):
            check(rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")
        direct, replayed = (download(memory, stream, b) for b in buffers[3:])
    finally:
        if graph_exec is not None:
            rt.cudaGraphExecDestroy(graph_exec)
        if graph is not None:
            rt.cudaGraphDestroy(graph)
        for b in buffers:
            b.close()
        memory.destroy_stream(stream)
        warp.close()
    same = bool(np.array_equal(direct, replayed))
    error = max_abs(replayed, flow_warp_numpy(*(a.astype(np.float64) for a in arrays)))
    problems = ([] if unrun else ["the capture ran the kernel instead of recording it"]) + (
        [] if same else ["the replayed graph's output differs from the direct launch's"]) + (
        [] if error is not None and error <= TOLERANCE["fp32"] else
        [f"replayed output is {error} from the NumPy reference"])
    return {"shape": "x".join(map(str, shape)), "replays": REPLAYS, "capture_ran_nothing": unrun,
            "replay_equals_direct": same, "max_abs_vs_numpy": error, "problems": problems,
            "headline": f"{REPLAYS} replays {'equal' if same else 'DIFFER FROM'} the direct "
                        "launch"}


STEPS = {"ptx": step_ptx, "kernel": step_kernel, "graph": step_graph}


def main(argv: list[str] | None = None) -> int:
    """Run one step: its figures to --figures; 1 if it found a problem."""
    p = argparse.ArgumentParser(description="one in-process step of tests/gpu_checks.py")
    p.add_argument("name", choices=sorted(STEPS))
    p.add_argument("--figures", required=True, metavar="FILE")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    figures = STEPS[args.name](args.quick)
    Path(args.figures).write_text(json.dumps(figures, indent=2, allow_nan=False))
    for problem in figures["problems"]:
        print(f"gpu_steps {args.name}: {problem}", file=sys.stderr)
    return int(bool(figures["problems"]))


if __name__ == "__main__":
    sys.exit(main())
