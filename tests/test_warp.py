"""The PyTorch reference FlowWarp against two independent ones: NumPy and OpenCV's remap.

Tolerance: the PyTorch warp goes through grid_sample's normalised grid and back, which costs
a few fp32 roundings of a coordinate up to the map size. Position error grows with the map
size, so fp32 maps are kept at most 17 cells across for 1e-5 and one larger map has a
tolerance that grows with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dff.models.warp import flow_warp
from dff.plugins.reference import flow_warp_numpy

cv2 = pytest.importorskip("cv2")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
TOL = {np.float32: 1e-5, np.float64: 1e-12}
# (N, C, h, w): single cells, single rows and columns, odd sizes, one and many channels.
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 9), (1, 2, 7, 1), (1, 1, 5, 7), (2, 64, 9, 13),
          (3, 4, 17, 11)]


def make_inputs(shape, flow_range, dtype=np.float32, seed=0):
    """feat in [-1, 1), flow uniform in ±flow_range·(w, h), scale in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = shape
    feat = rng.uniform(-1, 1, shape).astype(dtype)
    extent = np.array([w, h], dtype=np.float64).reshape(1, 2, 1, 1)
    flow = (rng.uniform(-1, 1, (n, 2, h, w)) * flow_range * extent).astype(dtype)
    scale = rng.uniform(0.5, 1.5, shape).astype(dtype)
    return feat, flow, scale


def torch_warp(feat, flow, scale=None, device="cpu"):
    as_t = lambda a: None if a is None else torch.from_numpy(a).to(device)
    return flow_warp(as_t(feat), as_t(flow), as_t(scale)).cpu().numpy()


def remap_warp(feat, flow):
    """OpenCV's warp, one channel at a time: remap samples src at (map_x, map_y)."""
    n, c, h, w = feat.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty_like(feat)
    for i in range(n):
        map_x, map_y = xs + flow[i, 0], ys + flow[i, 1]
        for j in range(c):
            out[i, j] = cv2.remap(feat[i, j], map_x, map_y, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def quantise_for_remap(flow):
    """Round to 1/32 cell: remap keeps 5 fractional bits (INTER_BITS) of each position."""
    return (np.round(flow * 32) / 32).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flow_range", [0.3, 2.0], ids=["small", "outside"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no_scale"])
def test_torch_warp_matches_numpy_reference(shape, flow_range, with_scale, dtype, device):
    feat, flow, scale = make_inputs(shape, flow_range, dtype)
    scale = scale if with_scale else None
    expected = flow_warp_numpy(feat, flow, scale)
    np.testing.assert_allclose(torch_warp(feat, flow, scale, device), expected,
                               rtol=0, atol=TOL[dtype])


def test_torch_warp_on_a_larger_map_is_within_rounding_of_numpy():
    feat, flow, scale = make_inputs((2, 8, 48, 64), 2.0)
    np.testing.assert_allclose(torch_warp(feat, flow, scale), flow_warp_numpy(feat, flow, scale),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flow_range", [0.3, 2.0], ids=["small", "outside"])
def test_torch_warp_matches_cv2_remap(shape, flow_range):
    feat, flow, _ = make_inputs(shape, flow_range)
    flow = quantise_for_remap(flow)
    np.testing.assert_allclose(torch_warp(feat, flow), remap_warp(feat, flow), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flow_range", [0.3, 2.0], ids=["small", "outside"])
def test_numpy_reference_matches_cv2_remap(shape, flow_range):
    # cv2 with BORDER_CONSTANT 0 zeroes each outside corner, as FlowWarp does, size-1 axes
    # included.
    feat, flow, _ = make_inputs(shape, flow_range)
    flow = quantise_for_remap(flow)
    np.testing.assert_allclose(flow_warp_numpy(feat, flow), remap_warp(feat, flow),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 6), (1, 2, 6, 1)])
def test_flow_along_a_size_one_axis_moves_the_sample(shape):
    feat, flow, scale = make_inputs(shape, 0.5)
    np.testing.assert_allclose(torch_warp(feat, flow, scale), flow_warp_numpy(feat, flow, scale),
                               rtol=0, atol=1e-5)


def shifted(feat, dx, dy):
    """feat moved so that out[y, x] = feat[y + dy, x + dx], zero where that is off the map."""
    out = np.zeros_like(feat)
    h, w = feat.shape[-2:]
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    src_ys, src_xs = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    if ys.start < ys.stop and xs.start < xs.stop:
        out[..., ys, xs] = feat[..., src_ys, src_xs]
    return out


@pytest.mark.parametrize("dx, dy", [(0, 0), (1, 0), (0, -1), (2, -3), (-4, 5), (11, 0),
                                    (-30, 22)])
def test_integer_flow_is_an_exact_shift(dx, dy):
    feat, _, scale = make_inputs((2, 3, 9, 11), 0.0)
    flow = np.empty((2, 2, 9, 11), np.float32)
    flow[:, 0], flow[:, 1] = dx, dy
    expected = shifted(feat, dx, dy) * scale
    np.testing.assert_allclose(torch_warp(feat, flow, scale), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(flow_warp_numpy(feat, flow, scale), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_flow_is_identity_times_scale(shape):
    feat, _, scale = make_inputs(shape, 0.0)
    flow = np.zeros((shape[0], 2, *shape[2:]), np.float32)
    np.testing.assert_allclose(torch_warp(feat, flow, scale), feat * scale, rtol=0, atol=1e-5)
    np.testing.assert_allclose(torch_warp(feat, flow), feat, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(flow_warp_numpy(feat, flow, scale), feat * scale)


def test_flow_entirely_off_the_map_gives_zeros():
    feat, _, scale = make_inputs((1, 4, 6, 8), 0.0)
    flow = np.full((1, 2, 6, 8), 9.0, np.float32)
    assert not torch_warp(feat, flow, scale).any()
    assert not flow_warp_numpy(feat, flow, scale).any()


def test_mismatched_flow_grid_is_refused():
    feat, flow, _ = make_inputs((1, 2, 4, 5), 0.3)
    with pytest.raises(ValueError):
        torch_warp(feat, flow[..., :4])
    with pytest.raises(ValueError):
        flow_warp_numpy(feat, flow[..., :4])
