"""CenterNet-style detection ("Objects as Points", Zhou et al. 2019) on DFF's stride-16 features.

The head predicts, per cell of its output map, a centre heatmap per class (logits), the box
size (width, height in cells of that map) and the centre's sub-cell offset (0..1). `decode`
turns them into the task contract's fixed-size rows (dff/tasks.py): sigmoid, a 3×3 max-pool
peak test, TopK over classes × cells, gathers; no NMS. The same code runs in PyTorch and in
task.onnx, and uses only ops that ONNX Runtime runs and TensorRT's parser imports natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dff.tasks import MAX_DETECTIONS, SCORE_THRESHOLD, TOPK_LIMIT

HEAT_PRIOR = 0.1  # initial centre probability (CenterNet's heatmap bias -2.19)


class DetectionHead(nn.Module):
    """feat [N,C,h,w] → (heat logits [N,K,h',w'], size [N,2,h',w'], offset [N,2,h',w']) at
    stride `stride / upsample`: `upsample` 2 doubles the map (bilinear, then a 3×3 conv) for
    small objects and same-class centres that would share a coarse cell."""

    task = "detection"

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64,
                 stride: int = 16, upsample: int = 1):
        super().__init__()
        if upsample not in (1, 2):
            raise ValueError(f"head_upsample must be 1 or 2, got {upsample}")
        self.num_classes, self.upsample = num_classes, upsample
        self.out_stride = stride // upsample

        def conv(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.neck = conv(in_channels)
        self.refine = conv(channels) if upsample > 1 else nn.Identity()
        self.heat = nn.Conv2d(channels, num_classes, 1)
        self.size = nn.Conv2d(channels, 2, 1)
        self.offset = nn.Conv2d(channels, 2, 1)
        nn.init.constant_(self.heat.bias, float(torch.logit(torch.tensor(HEAT_PRIOR))))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.neck(feat)
        if self.upsample > 1:
            x = self.refine(F.interpolate(x, scale_factor=self.upsample, mode="bilinear",
                                          align_corners=False))
        return self.heat(x), self.size(x), self.offset(x).sigmoid()


def decode(heat_logits: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, stride: int,
           max_detections: int = MAX_DETECTIONS, score_threshold: float = SCORE_THRESHOLD
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head outputs at `stride` → (boxes f32 [N,K,4] x0,y0,x1,y1 in input pixels, scores f32
    [N,K] descending, classes i32 [N,K], num i32 [N]); rows scoring ≤ score_threshold are
    padding (boxes 0, score 0, class -1). K = max_detections at any input size."""
    if not 1 <= max_detections <= TOPK_LIMIT:
        raise ValueError(f"max_detections must be in 1..{TOPK_LIMIT}, got {max_detections}")
    n, c, h, w = heat_logits.shape
    k = max_detections
    heat = heat_logits.sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    # k zero candidates behind the real ones, so TopK(k) is valid on maps smaller than k
    flat = torch.cat((peaks.reshape(n, c * h * w), peaks.new_zeros(n, k)), 1)
    scores, index = flat.topk(k, dim=1)
    # the map's size and offset, tiled once per class, indexed by TopK's own indices
    reg = torch.cat((size, offset), 1).reshape(n, 4, h * w).repeat(1, 1, c)
    reg = torch.cat((reg, reg.new_zeros(n, 4, k)), 2)
    picked = reg.gather(2, index.unsqueeze(1).expand(n, 4, k))
    # index → class, row, column in float arithmetic (exact below 2**24 candidates)
    where = index.to(heat.dtype)
    cls = torch.floor(where / (h * w))
    cell = where - cls * (h * w)
    row = torch.floor(cell / w)
    col = cell - row * w
    half_w = picked[:, 0].clamp(min=0) * (stride / 2)
    half_h = picked[:, 1].clamp(min=0) * (stride / 2)
    cx, cy = (col + picked[:, 2]) * stride, (row + picked[:, 3]) * stride
    boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), 2)
    boxes = torch.minimum(boxes.clamp(min=0), _image_limits(heat, stride))
    keep = scores > score_threshold
    keep_f = keep.to(scores.dtype)
    classes = torch.where(keep, cls.to(torch.int32), torch.full_like(cls, -1).to(torch.int32))
    return (boxes * keep_f.unsqueeze(2), scores * keep_f, classes,
            keep.to(torch.int32).sum(1, dtype=torch.int32))


def _image_limits(heat: torch.Tensor, stride: int) -> torch.Tensor:
    """[W, H, W, H] of the input image as a tensor, from the heat map's (possibly symbolic)
    size, so that boxes are clipped to the image in the exported graph too."""
    ones_w = heat.new_ones(heat.shape[3]).sum() * stride
    ones_h = heat.new_ones(heat.shape[2]).sum() * stride
    return torch.stack((ones_w, ones_h, ones_w, ones_h))
