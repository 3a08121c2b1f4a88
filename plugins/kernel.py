"""The FlowWarp CUDA kernel (`flow_warp.cu`): its source, PTX compilation, which PTX ISA a GPU
driver loads, launch geometry, and a small launcher over the CUDA driver API, shared by the
TensorRT plugin, the runtime and tests.

Kernels `flow_warp_f32` and `flow_warp_f16` take, in TensorRT's AOT plugin order (input
pointers, scalar extras, output pointers):

    (const T* feat, const T* flow, const T* scale, int N, int C, int H, int W, T* out)

all NCHW and contiguous; fp16 tensors are read and written as fp16, arithmetic is fp32.
cuda-python (`pip install dff-trt[gpu]`) is imported only where a function needs it; the
geometry and the PTX ISA rules are plain Python.
"""

from __future__ import annotations

import functools
import re
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
        why = " ".join(str(e).split())  # one line, whatever the loader said
        raise DffError(f"compiling the FlowWarp kernel needs cuda-python and NVRTC ({why}): "
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


# The NVRTC that dff-trt[gpu] pins (pyproject.toml): the oldest CUDA 13, whose PTX (ISA 9.0)
# loads on every CUDA 13 driver.
NVRTC_PIN = (13, 0)
NVRTC_FIX = f"pip install 'nvidia-cuda-nvrtc=={NVRTC_PIN[0]}.{NVRTC_PIN[1]}.*'"

# The newest PTX ISA a driver of each CUDA version loads. Documented (the PTX ISA manual's
# release notes): 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8, 13.0 -> 9.0.
# Extrapolated: 13.N -> 9.N for N >= 1, and any CUDA M.N newer than the table -> (M-4).N.
_PTX_ISA = {(12, 0): (8, 0), (12, 1): (8, 1), (12, 2): (8, 2), (12, 3): (8, 3), (12, 4): (8, 4),
            (12, 5): (8, 5), (12, 6): (8, 5), (12, 8): (8, 7), (12, 9): (8, 8), (13, 0): (9, 0)}


def ptx_isa(ptx: bytes | str) -> tuple[int, int]:
    """The PTX ISA version (major, minor) of a PTX text, from its `.version X.Y` line."""
    text = ptx.decode("ascii", "replace") if isinstance(ptx, bytes) else ptx
    match = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", text, re.MULTILINE)
    if match is None:
        raise ValueError("not PTX: no `.version X.Y` line")
    return int(match.group(1)), int(match.group(2))


def newest_ptx_isa(cuda: tuple[int, int]) -> tuple[int, int] | None:
    """The newest PTX ISA a driver of CUDA version `cuda` loads; None before CUDA 12.0."""
    if cuda in _PTX_ISA:
        return _PTX_ISA[cuda]
    if cuda > max(_PTX_ISA):  # extrapolated: ISA major = CUDA major - 4, minor = minor
        return cuda[0] - 4, cuda[1]
    known = [v for v in _PTX_ISA if v <= cuda]  # a release between entries (12.7): the one below
    return _PTX_ISA[max(known)] if known else None


def driver_loads_ptx(isa: tuple[int, int], cuda: tuple[int, int]) -> bool:
    """Whether a driver of CUDA version `cuda` loads PTX of ISA version `isa`."""
    newest = newest_ptx_isa(cuda)
    return newest is not None and isa <= newest


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def check_ptx_loads(isa: tuple[int, int], driver_cuda: tuple[int, int],
                    nvrtc: tuple[int, int]) -> None:
    """Raise DffError unless the driver (CUDA `driver_cuda`) loads PTX of ISA `isa` that NVRTC
    `nvrtc` made; the message names all three and the fix."""
    if driver_loads_ptx(isa, driver_cuda):
        return
    fix = (NVRTC_FIX if driver_cuda >= NVRTC_PIN else
           f"update the GPU driver to CUDA {_dotted(NVRTC_PIN)} or newer (R580+), which "
           "dff-trt[gpu] is built for")
    raise DffError(f"NVRTC {_dotted(nvrtc)} makes FlowWarp PTX of ISA {_dotted(isa)}, which "
                   f"this GPU driver (CUDA {_dotted(driver_cuda)}) cannot load: {fix}")


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version (major, minor) of this machine's GPU driver; None without a driver."""
    try:
        version = _check(_driver().cuDriverGetVersion(), "cuDriverGetVersion")
    except (DffError, RuntimeError, OSError):  # no cuda-python, or no driver library here
        return None
    return version // 1000, version % 1000 // 10


def check_driver_can_load_nvrtc_ptx(ptx: bytes) -> None:
    """Raise DffError if this machine's GPU driver cannot load `ptx` (from this NVRTC): its
    PTX ISA follows the compiler. Without a driver (building PTX only) it passes."""
    driver_cuda = driver_cuda_version()
    if driver_cuda is not None:
        check_ptx_loads(ptx_isa(ptx), driver_cuda, nvrtc_version())


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
                self.arch = self._best_arch()
                ptx = compile_ptx(self.arch)
                check_driver_can_load_nvrtc_ptx(ptx)
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
            raise DffError(f"NVRTC {_dotted(nvrtc_version())} cannot compile for sm_{major}{minor}")
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
