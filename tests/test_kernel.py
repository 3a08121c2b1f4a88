"""The FlowWarp CUDA kernel: it compiles (nvcc, NVRTC), its launch geometry covers every cell
and channel, and on a GPU it matches the NumPy reference and the PyTorch warp.

Tolerances on the GPU: the kernel splits x + flow into integer and fraction exactly, so against
the float64 NumPy reference it is within 1e-5 in fp32 and 2e-3 in fp16 (one fp16 rounding of
values up to 1.5). PyTorch's normalised grid rounds the sample position by up to ~1e-5 cells on
a 120-cell map (tests/test_warp.py), so against it the fp32 bound is 1e-5 on small maps and
5e-5 on the real ones.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from dff.models.warp import flow_warp
from dff.plugins import kernel
from dff.plugins.reference import flow_warp_numpy

from dff.errors import DffError

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

# (N, C, H, W): single cells, rows and columns, odd sizes, C not a multiple of the channel
# share, and the stride-16 maps of 600x1000 and 1088x1920 frames.
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 9), (1, 2, 7, 1), (1, 1, 5, 7), (2, 64, 9, 13),
          (3, 33, 17, 11), (1, 100, 38, 63)]
REAL_SHAPES = [(1, 1024, 38, 63), (2, 1024, 68, 120)]


def entry_params(ptx: str, name: str) -> list[str]:
    """The .param types of kernel `name` in a PTX text, in order."""
    match = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.DOTALL)
    assert match, f"{name} not in the PTX"
    return re.findall(r"\.param \.(\w+)", match.group(1))


# TensorRT's AOT plugins pass input pointers, then the scalar extras, then output pointers.
AOT_ORDER = ["u64", "u64", "u64", "u32", "u32", "u32", "u32", "u64"]


# --- compilation ------------------------------------------------------------------------------

@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_the_kernel_without_warnings(arch, tmp_path):
    for kind in ("-cubin", "-ptx"):
        out = tmp_path / f"flow_warp{kind}"
        result = subprocess.run(
            [NVCC, f"-arch={arch}", kind, "-Werror", "all-warnings", "-o", str(out),
             str(kernel.KERNEL_SOURCE)], check=False, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == ""
    ptx = (tmp_path / "flow_warp-ptx").read_text()
    for name in kernel.KERNEL_NAMES.values():
        assert entry_params(ptx, name) == AOT_ORDER


@pytest.fixture(scope="module")
def nvrtc_ptx() -> str:
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python is not installed")
    try:
        return kernel.compile_ptx("sm_80").decode()
    except DffError as e:
        pytest.skip(str(e))


def test_nvrtc_ptx_has_both_kernels_in_the_aot_argument_order(nvrtc_ptx):
    assert ".target sm_80" in nvrtc_ptx
    for name in kernel.KERNEL_NAMES.values():
        assert entry_params(nvrtc_ptx, name) == AOT_ORDER


def test_nvrtc_without_fp16_compiles_only_the_fp32_kernel(nvrtc_ptx):
    ptx = kernel.compile_ptx("compute_90", fp16=False).decode()
    assert ".target sm_90" in ptx
    assert "flow_warp_f32" in ptx and "flow_warp_f16" not in ptx


def test_kernel_source_needs_no_headers():
    # NVRTC from the nvidia-cuda-nvrtc wheel has no CUDA headers to include.
    assert not re.search(r"^\s*#\s*include", kernel.kernel_source(), re.MULTILINE)


def test_bad_architecture_name_is_refused():
    with pytest.raises(ValueError, match="sm_80"):
        kernel._compute_arch("ampere")


# --- PTX ISA and the driver that loads it -----------------------------------------------------

def test_ptx_isa_is_read_from_real_nvrtc_output(nvrtc_ptx):
    line = next(x for x in nvrtc_ptx.splitlines() if x.startswith(".version"))
    major, minor = line.split()[1].split(".")
    isa = kernel.ptx_isa(nvrtc_ptx.encode())
    assert isa == kernel.ptx_isa(nvrtc_ptx) == (int(major), int(minor))
    nvrtc = kernel.nvrtc_version()
    if nvrtc == kernel.NVRTC_PIN:  # the pinned NVRTC 13.0 (pyproject.toml's gpu extra)
        assert isa == (9, 0)
    assert kernel.driver_loads_ptx(isa, nvrtc)  # a driver of NVRTC's own CUDA loads its PTX


def test_text_without_a_version_line_is_not_ptx():
    with pytest.raises(ValueError, match="no `.version X.Y` line"):
        kernel.ptx_isa(b"// .version 9.0\n.target sm_80\n")


@pytest.mark.parametrize("isa, cuda, loads", [
    ((9, 0), (13, 0), True), ((9, 5), (13, 0), False), ((9, 5), (13, 5), True),
    ((9, 1), (13, 0), False), ((8, 8), (13, 0), True), ((9, 0), (12, 9), False),
    ((8, 8), (12, 9), True), ((8, 8), (12, 8), False), ((8, 7), (12, 8), True),
    ((8, 5), (12, 6), True), ((8, 6), (12, 6), False), ((8, 4), (12, 4), True),
    ((8, 5), (12, 4), False), ((8, 0), (12, 0), True), ((8, 5), (12, 7), True),
    ((8, 6), (12, 7), False), ((10, 2), (14, 2), True), ((10, 3), (14, 2), False),
    ((7, 8), (11, 8), False),
])
def test_driver_loads_ptx_up_to_its_cuda_versions_isa(isa, cuda, loads):
    assert kernel.driver_loads_ptx(isa, cuda) is loads


def test_drivers_before_cuda_12_are_not_in_the_table():
    assert kernel.newest_ptx_isa((11, 8)) is None
    assert kernel.newest_ptx_isa((12, 0)) == (8, 0)
    assert kernel.newest_ptx_isa((13, 0)) == (9, 0)


def test_ptx_newer_than_a_cuda_13_driver_names_both_and_the_nvrtc_pin():
    with pytest.raises(DffError) as info:
        kernel.check_ptx_loads((9, 5), (13, 0), nvrtc=(13, 5))
    assert str(info.value) == ("NVRTC 13.5 makes FlowWarp PTX of ISA 9.5, which this GPU driver "
                               "(CUDA 13.0) cannot load: pip install 'nvidia-cuda-nvrtc==13.0.*'")


def test_ptx_for_a_cuda_12_driver_says_update_the_driver():
    with pytest.raises(DffError, match=r"^NVRTC 13.0 makes FlowWarp PTX of ISA 9.0, which this "
                                       r"GPU driver \(CUDA 12.8\) cannot load: update the GPU "
                                       r"driver to CUDA 13.0 or newer"):
        kernel.check_ptx_loads((9, 0), (12, 8), nvrtc=(13, 0))
    kernel.check_ptx_loads((9, 0), (13, 2), nvrtc=(13, 0))  # loads: no error


class FakeDriver:
    def __init__(self, version=None):
        self.version = version

    def cuDriverGetVersion(self):
        if self.version is None:  # as cuda.bindings without libcuda
            raise RuntimeError('"cuda" is an NVIDIA driver library')
        return 0, self.version


def test_driver_check_compares_the_ptxs_isa_with_the_drivers(monkeypatch):
    monkeypatch.setattr(kernel, "nvrtc_version", lambda: (13, 5))
    ptx95, ptx90 = b".version 9.5\n.target sm_80\n", b".version 9.0\n.target sm_80\n"
    monkeypatch.setattr(kernel, "_driver", lambda: FakeDriver(13000))
    assert kernel.driver_cuda_version() == (13, 0)
    kernel.check_driver_can_load_nvrtc_ptx(ptx90)  # the ISA decides, not NVRTC's version
    with pytest.raises(DffError, match=r"ISA 9.5, which this GPU driver \(CUDA 13.0\)"):
        kernel.check_driver_can_load_nvrtc_ptx(ptx95)
    monkeypatch.setattr(kernel, "_driver", lambda: FakeDriver(13050))
    kernel.check_driver_can_load_nvrtc_ptx(ptx95)
    monkeypatch.setattr(kernel, "_driver", lambda: FakeDriver(None))  # no driver: PTX only
    assert kernel.driver_cuda_version() is None
    kernel.check_driver_can_load_nvrtc_ptx(ptx95)


def test_the_gpu_extra_admits_no_nvrtc_newer_than_cuda_13_0():
    """The pin and the ISA rule cannot drift apart: the extra admits NVRTC 13.0 only, whose
    PTX (ISA 9.0) every CUDA 13 driver loads, and the fix the errors print is that pin."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from packaging.requirements import Requirement  # pytest's own dependency

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    gpu = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    (nvrtc,) = [r for r in gpu if r.name == "nvidia-cuda-nvrtc"]
    assert nvrtc.specifier.contains("13.0.88")
    newer = [f"13.{n}.{m}" for n in range(1, 10) for m in (0, 99)] + ["14.0.0", "15.1.0"]
    assert [v for v in newer if nvrtc.specifier.contains(v)] == []
    assert kernel.NVRTC_PIN == (13, 0)
    assert kernel.NVRTC_FIX == "pip install 'nvidia-cuda-nvrtc==13.0.*'"
    assert kernel.newest_ptx_isa((13, 0)) == (9, 0)


# --- launch geometry --------------------------------------------------------------------------

def test_launch_geometry_of_a_stride16_feature_map():
    assert kernel.launch_geometry(1, 1024, 38, 63) == ((2, 5, 32), (32, 8, 1))
    assert kernel.launch_geometry(4, 1024, 68, 120) == ((4, 9, 128), (32, 8, 1))
    assert kernel.launch_geometry(1, 1, 1, 1) == ((1, 1, 1), (32, 8, 1))


def kernel_channel_ranges(n_batch: int, c: int, grid_z: int) -> list[tuple[int, int, int]]:
    """(n, first, end) per block z-index, as flow_warp.cu splits them."""
    groups = grid_z // n_batch
    share = -(-c // groups)
    return [(z // groups, (z % groups) * share, min(c, (z % groups) * share + share))
            for z in range(grid_z)]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 9), (3, 33, 17, 11),
                                   (1, 100, 38, 63), (2, 1024, 68, 120), (1, 31, 1, 33)])
def test_launch_geometry_covers_every_cell_and_channel_once(shape):
    n, c, h, w = shape
    grid, block = kernel.launch_geometry(n, c, h, w)
    assert block[0] * block[1] * block[2] <= 1024
    assert grid[0] * block[0] >= w > (grid[0] - 1) * block[0]
    assert grid[1] * block[1] >= h > (grid[1] - 1) * block[1]
    covered = np.zeros((n, c), dtype=int)
    for item, first, end in kernel_channel_ranges(n, c, grid[2]):
        assert end - first <= kernel.CHANNELS_PER_THREAD
        covered[item, first:end] += 1
    assert (covered == 1).all()


def test_launch_geometry_refuses_empty_maps_and_grids_over_cuda_limits():
    with pytest.raises(ValueError, match="non-empty"):
        kernel.launch_geometry(0, 4, 5, 6)
    with pytest.raises(ValueError, match="65535"):
        kernel.launch_geometry(4096, 1024, 5, 6)


def test_geometry_works_on_symbols_through_the_given_ceil_div():
    calls = []

    def cdiv(a, b):
        calls.append((a, b))
        return -(-a // b)

    assert kernel.geometry(2, 64, 9, 40, cdiv=cdiv) == ((2, 2, 4), (32, 8, 1))
    assert calls == [(64, kernel.CHANNELS_PER_THREAD), (40, kernel.TILE_X), (9, kernel.TILE_Y)]


# --- GPU correctness --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")
    torch.cuda.init()
    try:
        warp = kernel.FlowWarpKernel(torch.cuda.current_device())
    except DffError as e:  # no NVRTC library: the toolkit's nvcc makes the same PTX
        if NVCC is None:
            pytest.skip(str(e))
        warp = kernel.FlowWarpKernel(torch.cuda.current_device(),
                                     ptx=kernel.compile_ptx_nvcc("sm_80"))
    yield warp
    warp.close()


def make_inputs(shape, flow_range, dtype=np.float32, seed=0):
    """feat in [-1, 1), flow uniform in ±flow_range·(W, H) cells, scale in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = shape
    feat = rng.uniform(-1, 1, shape).astype(dtype)
    extent = np.array([w, h], dtype=np.float64).reshape(1, 2, 1, 1)
    flow = (rng.uniform(-1, 1, (n, 2, h, w)) * flow_range * extent).astype(dtype)
    scale = rng.uniform(0.5, 1.5, shape).astype(dtype)
    return feat, flow, scale


def run_kernel(warp, feat, flow, scale, stream=None):
    """The kernel's output for NumPy inputs, through torch CUDA memory."""
    f, fl, s = (torch.from_numpy(a).cuda() for a in (feat, flow, scale))
    out = torch.full_like(f, float("nan"))
    if stream is None:
        stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())  # the uploads above
    warp(f.data_ptr(), fl.data_ptr(), s.data_ptr(), out.data_ptr(), *f.shape,
         dtype=str(f.dtype).removeprefix("torch."), stream=stream.cuda_stream)
    stream.synchronize()
    return out.cpu().numpy()


def reference(feat, flow, scale):
    return flow_warp_numpy(*(a.astype(np.float64) for a in (feat, flow, scale)))


@pytest.mark.parametrize("shape", SHAPES + REAL_SHAPES)
@pytest.mark.parametrize("flow_range", [0.3, 2.0], ids=["small", "outside"])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 2e-3)],
                         ids=["fp32", "fp16"])
def test_kernel_matches_numpy_reference(gpu_kernel, shape, flow_range, dtype, tol):
    feat, flow, scale = make_inputs(shape, flow_range, dtype)
    out = run_kernel(gpu_kernel, feat, flow, scale)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, reference(feat, flow, scale), rtol=0, atol=tol)


@pytest.mark.parametrize("shape", SHAPES + REAL_SHAPES)
def test_kernel_matches_torch_warp_on_cuda(gpu_kernel, shape):
    feat, flow, scale = make_inputs(shape, 2.0, seed=1)
    expected = flow_warp(*(torch.from_numpy(a).cuda() for a in (feat, flow, scale)))
    tol = 5e-5 if max(shape[2:]) > 17 else 1e-5
    np.testing.assert_allclose(run_kernel(gpu_kernel, feat, flow, scale),
                               expected.cpu().numpy(), rtol=0, atol=tol)


def test_half_cell_outside_takes_half_of_the_edge(gpu_kernel):
    feat, _, scale = make_inputs((1, 3, 4, 5), 0.0)
    flow = np.zeros((1, 2, 4, 5), np.float32)
    flow[:, 0] = -0.5  # column 0 samples at x = -0.5: half of column 0, half of nothing
    out = run_kernel(gpu_kernel, feat, flow, scale)
    np.testing.assert_allclose(out[..., 0], 0.5 * feat[..., 0] * scale[..., 0], atol=1e-6)


def test_integer_flow_is_an_exact_shift(gpu_kernel):
    feat, _, scale = make_inputs((2, 40, 9, 11), 0.0)
    flow = np.zeros((2, 2, 9, 11), np.float32)
    flow[:, 0], flow[:, 1] = 2, -3
    expected = np.zeros_like(feat)
    expected[..., 3:, :9] = feat[..., :6, 2:] * scale[..., 3:, :9]
    np.testing.assert_array_equal(run_kernel(gpu_kernel, feat, flow, scale), expected)


def test_non_finite_flow_reads_nothing_and_gives_zeros(gpu_kernel):
    feat, _, scale = make_inputs((1, 4, 6, 8), 0.0)
    flow = np.zeros((1, 2, 6, 8), np.float32)
    flow[0, 0, :2], flow[0, 1, 2:4], flow[0, 0, 4:] = np.inf, -np.inf, np.nan
    flow[0, 1, 5, 5] = 3e9
    assert not run_kernel(gpu_kernel, feat, flow, scale).any()


def test_kernel_runs_on_a_side_stream(gpu_kernel):
    feat, flow, scale = make_inputs((2, 64, 9, 13), 2.0)
    out = run_kernel(gpu_kernel, feat, flow, scale, stream=torch.cuda.Stream())
    np.testing.assert_allclose(out, reference(feat, flow, scale), rtol=0, atol=1e-5)


def test_unsupported_dtype_is_refused(gpu_kernel):
    with pytest.raises(ValueError, match="float16"):
        gpu_kernel(0, 0, 0, 0, 1, 1, 1, 1, dtype="bfloat16")
