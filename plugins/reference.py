"""A slow, obvious NumPy FlowWarp to test every other implementation against (DESIGN.md §3).

out[n,c,y,x] = scale[n,c,y,x] * bilinear(feat[n,c], x + flow[n,0,y,x], y + flow[n,1,y,x])

Cell (x, y) samples at its centre moved by the flow, in cells (align_corners=True: the first
and last centres are the map's ends). Each of the four bilinear corners that falls outside
the map contributes zero. Written straight from that sentence, with no torch and no
normalised grid, so it shares no code or convention with the implementations it checks.
"""

from __future__ import annotations

import numpy as np


def flow_warp_numpy(feat: np.ndarray, flow: np.ndarray,
                    scale: np.ndarray | None = None) -> np.ndarray:
    """Warp feat [N,C,h,w] along flow [N,2,h,w], times scale [N,C,h,w] if given.

    Computed in float64; returned in feat's dtype (float64 if feat is not floating point).
    """
    if feat.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"want feat [N,C,h,w] and flow [N,2,h,w], got {feat.shape}, {flow.shape}")
    if flow.shape[0] != feat.shape[0] or flow.shape[2:] != feat.shape[2:]:
        raise ValueError(f"flow {flow.shape} does not match feat {feat.shape}")
    n_batch, _, h, w = feat.shape
    src = np.asarray(feat, dtype=np.float64)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    out = np.zeros(feat.shape, dtype=np.float64)
    for n in range(n_batch):
        # Where cell (x, y) samples, in cells of the source map.
        px = xs + np.asarray(flow[n, 0], dtype=np.float64)
        py = ys + np.asarray(flow[n, 1], dtype=np.float64)
        x0 = np.floor(px)
        y0 = np.floor(py)
        for cy in (y0, y0 + 1):
            for cx in (x0, x0 + 1):
                # Bilinear weight of this corner: 1 - distance along each axis.
                weight = (1.0 - np.abs(px - cx)) * (1.0 - np.abs(py - cy))
                inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
                # Read a valid cell everywhere, then zero the corners that are outside.
                ix = np.clip(cx, 0, w - 1).astype(np.intp)
                iy = np.clip(cy, 0, h - 1).astype(np.intp)
                out[n] += src[n][:, iy, ix] * np.where(inside, weight, 0.0)
    if scale is not None:
        out *= np.asarray(scale, dtype=np.float64)
    dtype = feat.dtype if np.issubdtype(feat.dtype, np.floating) else np.float64
    return out.astype(dtype, copy=False)
