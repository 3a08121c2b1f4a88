"""The reference FlowWarp in pure PyTorch (DESIGN.md §3).

out[n,c,y,x] = scale[n,c,y,x] * bilinear(feat[n,c], x + flow[n,0,y,x], y + flow[n,1,y,x])

Sampling is at integer cell centres (align_corners=True) and every corner that falls
outside the map contributes zero, as MXNet's GridGenerator(warp) + BilinearSampler in the
original DFF. Flow is in feature cells and points from the current frame to the key frame
(backward warping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_to_grid(flow: torch.Tensor) -> torch.Tensor:
    """Turn a flow [N,2,h,w] in cells into grid_sample's normalised grid [N,h,w,2].

    The grid is written for align_corners=False, where g = (2·x + 1) / w − 1 unnormalises to
    exactly x, the cell-centre coordinate. This is the same sampling as align_corners=True
    (MXNet's (w−1) normalisation) but also right on a map one cell wide, where (w−1) = 0
    would pin every sample to the only cell, and it rounds less on large maps."""
    h, w = flow.shape[-2:]
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    gx = ((xs + flow[:, 0]) * 2.0 + 1.0) / w - 1.0
    gy = ((ys + flow[:, 1]) * 2.0 + 1.0) / h - 1.0
    return torch.stack((gx, gy), dim=-1)


def flow_warp(feat: torch.Tensor, flow: torch.Tensor,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """Warp key-frame features [N,C,h,w] along flow [N,2,h,w], then multiply by scale [N,C,h,w]."""
    if feat.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"flow grid {tuple(flow.shape[-2:])} != feature grid {tuple(feat.shape[-2:])}")
    out = F.grid_sample(feat, flow_to_grid(flow), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out if scale is None else out * scale
