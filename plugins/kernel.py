"""The FlowWarp CUDA kernel (`flow_warp.cu`): its source, PTX compilation, launch geometry, and a
small launcher over the CUDA driver API, shared by the TensorRT plugin, the runtime and tests.

Kernels `flow_warp_f32` and `flow_warp_f16` take, in TensorRT's AOT plugin order (input
pointers, scalar extras, output pointers):

    (const T* feat, const T* flow, const T* scale, int N, int C, int H, int W, T* out)

all NCHW and contiguous; fp16 tensors are read and written as fp16, arithmetic is fp32.
cuda-python (`pip install dff-trt[gpu]`) is imported only where a function needs it; the
geometry is plain Python.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dff.errors import DffError

KERNEL_SOURCE = Path(__file__).with_name("flow_warp.cu")
KERNEL_NAMES = {"float32": "flow_warp_f32", "float16": "flow_warp_f16"}

# Launch geometry. A block is a TILE_X x TILE_Y tile of output cells (32 x 8 = 256 threads; a
# warp spans 32 consecutive x, so scale/out accesses coalesce). Grid z is N * G: G shares of
# the channels per batch item, each thread looping over at most CHANNELS_PER_THREAD channels
# with its corner weights computed once. Splitting C keeps the GPU busy on stride-16 feature
# maps (38 x 63 cells is only 10 tiles) while the flow reads stay under 1/16 of the traffic.
TILE_X = 32
TILE_Y = 8
CHANNELS_PER_THREAD = 32
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z

_GPU_HINT = "pip install dff-trt[gpu]"


def kernel_source() -> str:
    """The CUDA C++ text of `flow_warp.cu`."""
    return KERNEL_SOURCE.read_text()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def geometry(n: Any, c: Any, h: Any, w: Any, cdiv: Any = _ceil_div) -> tuple[tuple, tuple]:
    """(grid, block) as expressions in n, c, h, w: ints here, TensorRT shape symbols in the
    plugin (which passes `cdiv=tensorrt.plugin.cdiv`). Unchecked; see `launch_geometry`."""
    groups = cdiv(c, CHANNELS_PER_THREAD)
    return (cdiv(w, TILE_X), cdiv(h, TILE_Y), n * groups), (TILE_X, TILE_Y, 1)


Dim3 = tuple[int, int, int]


def launch_geometry(n: int, c: int, h: int, w: int) -> tuple[Dim3, Dim3]:
    """The (grid, block) for FlowWarp on an [n, c, h, w] map, checked against CUDA's limits."""
    if min(n, c, h, w) < 1:
        raise ValueError(f"FlowWarp needs a non-empty [N,C,H,W] map, got {[n, c, h, w]}")
    grid, block = geometry(n, c, h, w)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"FlowWarp map [N,C,H,W]={[n, c, h, w]} needs grid {grid}; "
                         f"CUDA allows at most {MAX_GRID_YZ} blocks in y and z")
    return grid, block


def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()  # loads the library (the nvidia-cuda-nvrtc wheel or a toolkit's)
    except (ImportError, RuntimeError) as e:
        raise DffError(f"compiling the FlowWarp kernel needs cuda-python and NVRTC ({e}): "
                       f"{_GPU_HINT}") from e
    return nvrtc


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise DffError(f"launching the FlowWarp kernel needs cuda-python: {_GPU_HINT}") from e
    return driver


def _compute_arch(arch: str) -> str:
    """'sm_80', 'compute_80' or '80' -> 'compute_80' (a virtual arch: NVRTC emits PTX for it)."""
    digits = arch.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"want a GPU architecture such as 'sm_80', got {arch!r}")
    return f"compute_{digits}"


@functools.cache
def compile_ptx(arch: str = "sm_80", fp16: bool = True) -> bytes:
    """PTX for both kernels (only `flow_warp_f32` if not `fp16`) for `arch`, via NVRTC.

    PTX for sm_80 runs on every later GPU: the driver compiles it for the device at load time.
    Returned without the trailing NUL."""
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(kernel_source().encode(), b"flow_warp.cu", 0, [], [])
    _check_nvrtc(nvrtc, err, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={_compute_arch(arch)}".encode(), b"--std=c++17"]
        if not fp16:
            opts.append(b"-DFLOW_WARP_NO_FP16")
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed on flow_warp.cu for {arch}:\n{log.decode()}")
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        _check_nvrtc(nvrtc, err, "nvrtcGetPTXSize")
        ptx = b" " * size
        (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
        _check_nvrtc(nvrtc, err, "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\0")


def compile_ptx_nvcc(arch: str = "sm_80") -> bytes:
    """The same PTX through `nvcc -ptx`, for machines with a CUDA toolkit but no NVRTC wheel."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise DffError("nvcc is not on PATH: install the CUDA toolkit, or NVRTC with "
                       f"{_GPU_HINT}")
    arch = "sm_" + _compute_arch(arch).split("_")[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flow_warp.ptx"
        subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-o", str(out), str(KERNEL_SOURCE)],
                       check=True, capture_output=True)
        return out.read_bytes()


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(nvrtc, err, "nvrtcVersion")
    return major, minor


def check_driver_can_load_nvrtc_ptx() -> None:
    """Raise DffError if NVRTC is newer than the GPU driver, which could not load its PTX (the
    PTX ISA version follows the compiler). Without a driver (building PTX only) it passes."""
    try:
        version = _check(_driver().cuDriverGetVersion(), "cuDriverGetVersion")
    except RuntimeError:  # no driver library on this machine
        return
    driver_cuda = (version // 1000, version % 1000 // 10)
    nvrtc_cuda = nvrtc_version()
    if nvrtc_cuda > driver_cuda:
        fix = (f"pip install 'nvidia-cuda-nvrtc=={driver_cuda[0]}.{driver_cuda[1]}.*', or update "
               "the driver" if driver_cuda[0] == nvrtc_cuda[0] else
               "update the driver: dff-trt[gpu] is built for CUDA 13 (R580 or newer)")
        raise DffError(f"NVRTC {nvrtc_cuda[0]}.{nvrtc_cuda[1]} makes PTX that the GPU driver "
                       f"(CUDA {driver_cuda[0]}.{driver_cuda[1]}) cannot load: {fix}")


def _check_nvrtc(nvrtc: Any, err: Any, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings.driver call's (err, *values), raising on an error."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else (values or None)


def cuda_device_count() -> int:
    """How many CUDA devices the driver sees; 0 without cuda-python, a driver or a device."""
    try:
        driver = _driver()
        _check(driver.cuInit(0), "cuInit")
        return int(_check(driver.cuDeviceGetCount(), "cuDeviceGetCount"))
    except (DffError, RuntimeError, OSError):  # no library, driver or device: "none here"
        return 0


class FlowWarpKernel:
    """Both kernels loaded into `device`'s primary context (the one torch and TensorRT use).

    `kernel(feat, flow, scale, out, n, c, h, w, dtype, stream)` takes device pointers (ints)
    and a CUstream handle (int, 0 = legacy default stream); GPU only."""

    def __init__(self, device: int = 0, ptx: bytes | None = None) -> None:
        driver = self._driver = _driver()
        self._module = None
        _check(driver.cuInit(0), "cuInit")
        self._device = _check(driver.cuDeviceGet(device), "cuDeviceGet")
        self._context = _check(driver.cuDevicePrimaryCtxRetain(self._device),
                               "cuDevicePrimaryCtxRetain")
        try:
            _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
            # PTX for the device's architecture (NVRTC), unless the caller brings its own.
            self.arch = None
            if ptx is None:
                check_driver_can_load_nvrtc_ptx()
                self.arch = self._best_arch()
                ptx = compile_ptx(self.arch)
            self.ptx = ptx
            self._module = self._load(self.ptx)
            self._functions = {
                dtype: _check(driver.cuModuleGetFunction(self._module, name.encode()),
                              f"cuModuleGetFunction({name})")
                for dtype, name in KERNEL_NAMES.items()
            }
        except BaseException:
            self.close()
            raise

    def _load(self, ptx: bytes) -> Any:
        driver = self._driver
        result = driver.cuModuleLoadData(ptx.rstrip(b"\0") + b"\0")  # PTX text, NUL-ended
        if int(result[0]) == int(driver.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION):
            raise DffError("the GPU driver is older than the compiler of FlowWarp's PTX: "
                           "compile it with the driver's CUDA version, or update the driver")
        return _check(result, "cuModuleLoadData")

    def _best_arch(self) -> str:
        """sm_XY of the device, or the newest architecture NVRTC knows that is not newer."""
        attr = self._driver.CUdevice_attribute
        major = _check(self._driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device), "compute capability")
        minor = _check(self._driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device), "compute capability")
        nvrtc = _nvrtc()
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        _check_nvrtc(nvrtc, err, "nvrtcGetSupportedArchs")
        usable = [a for a in archs if a <= 10 * major + minor]
        if not usable:
            raise DffError(f"NVRTC {nvrtc_version()} cannot compile for sm_{major}{minor}")
        return f"sm_{max(usable)}"

    def __call__(self, feat: int, flow: int, scale: int, out: int, n: int, c: int, h: int,
                 w: int, dtype: str = "float32", stream: int = 0) -> None:
        """Enqueue out = FlowWarp(feat, flow, scale) on `stream`; pointers to [n,c,h,w] data."""
        if dtype not in self._functions:
            raise ValueError(f"FlowWarp supports {sorted(self._functions)}, not {dtype!r}")
        grid, block = launch_geometry(n, c, h, w)
        # kernelParams: an array of addresses, each pointing at one argument's value.
        values = [np.array([p], dtype=np.uint64) for p in (feat, flow, scale)]
        values += [np.array([v], dtype=np.int32) for v in (n, c, h, w)]
        values.append(np.array([out], dtype=np.uint64))
        params = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        driver = self._driver
        _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        _check(driver.cuLaunchKernel(self._functions[dtype], *grid, *block, 0,
                                     driver.CUstream(stream), params.ctypes.data, 0),
               "cuLaunchKernel(FlowWarp)")

    def close(self) -> None:
        """Unload the module and release the primary context (once)."""
        if self._module is not None:
            self._driver.cuModuleUnload(self._module)
            self._module = None
        if self._context is not None:
            self._driver.cuDevicePrimaryCtxRelease(self._device)
            self._context = None
