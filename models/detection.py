"""CenterNet-style detection ("Objects as Points", Zhou et al. 2019) on DFF's stride-16 features.

The head predicts, per cell of its output map, a centre heatmap per class (logits), the box
size (width, height in cells of that map) and the centre's sub-cell offset (0..1). `decode`
turns them into the task contract's fixed-size rows (dff/tasks.py): sigmoid, a 3×3 max-pool
peak test, TopK over classes × cells, gathers; no NMS. The same code runs in PyTorch and in
task.onnx, and uses only ops that ONNX Runtime runs and TensorRT's parser imports natively.
"""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------- training targets and loss
# CenterNet's penalty-reduced focal loss (alpha 2, beta 4) on Gaussian centre targets, L1 on size
# and offset at the centre cells only. The Gaussian's sigma is a sixth of the box size per axis
# (elliptical, as TTFNet; simpler than CenterNet's IoU-0.7 radius, which at stride 16 is
# below one cell for our 3-6 cell objects). Ignore regions (docs/DESIGN.md §14) get no centre,
# and the heatmap loss of their class is masked inside their box.


def detection_targets(boxes: list, classes: list, ignore: list, num_classes: int,
                      map_size: tuple[int, int], stride: int) -> dict[str, torch.Tensor]:
    """Per image: boxes [M,4] x0,y0,x1,y1 pixels, classes [M] (0-based), ignore [M] bool →
    `heat` [B,K,h,w] (1 at centres), `weight` [B,K,h,w] (0 where the heatmap loss is masked),
    `centre` [B,1,h,w], `size` [B,2,h,w] (cells) and `offset` [B,2,h,w] (0..1) at centres."""
    import numpy as np

    h, w = map_size
    out = {"heat": np.zeros((len(boxes), num_classes, h, w), np.float32),
           "weight": np.ones((len(boxes), num_classes, h, w), np.float32),
           "centre": np.zeros((len(boxes), 1, h, w), np.float32),
           "size": np.zeros((len(boxes), 2, h, w), np.float32),
           "offset": np.zeros((len(boxes), 2, h, w), np.float32)}
    rows, cols = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None]
    for b, (bx, cl, ig) in enumerate(zip(boxes, classes, ignore)):
        bx = np.asarray(bx, np.float32).reshape(-1, 4) / stride
        for (x0, y0, x1, y1), c, skip in zip(bx, np.asarray(cl), np.asarray(ig, bool)):
            if skip:  # cells a centre inside the box would fall in
                r0, r1 = int(np.floor(y0)), int(np.ceil(y1))
                c0, c1 = int(np.floor(x0)), int(np.ceil(x1))
                out["weight"][b, c, max(r0, 0):r1, max(c0, 0):c1] = 0
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            j, i = min(int(cx), w - 1), min(int(cy), h - 1)
            sx, sy = max(x1 - x0, 1e-3) / 6, max(y1 - y0, 1e-3) / 6
            gauss = np.exp(-(cols - j) ** 2 / (2 * sx * sx) - (rows - i) ** 2 / (2 * sy * sy))
            np.maximum(out["heat"][b, c], gauss, out=out["heat"][b, c])
            out["heat"][b, c, i, j] = 1.0
            out["centre"][b, 0, i, j] = 1.0
            out["size"][b, :, i, j] = (x1 - x0, y1 - y0)
            out["offset"][b, :, i, j] = (cx - j, cy - i)
    out["weight"][out["heat"] >= 1] = 1.0  # a centre is never masked
    return {k: torch.from_numpy(v) for k, v in out.items()}


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor,
               alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed over unmasked cells / centres."""
    pos = (heat >= 1).to(logits.dtype)
    p = logits.sigmoid()
    pos_loss = -(1 - p) ** alpha * F.logsigmoid(logits) * pos
    neg_loss = -(1 - heat) ** beta * p ** alpha * F.logsigmoid(-logits) * (1 - pos)
    return ((pos_loss + neg_loss) * weight).sum() / pos.sum().clamp(min=1)


def detection_loss(raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   targets: dict[str, torch.Tensor], size_weight: float = 0.1,
                   offset_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """`loss` = focal heatmap loss + size_weight · L1(size) + offset_weight · L1(offset), the
    L1 terms at centre cells per object; also each term (`heat`, `size`, `offset`)."""
    heat_logits, size, offset = raw
    t = {k: v.to(heat_logits.device) for k, v in targets.items()}
    n = t["centre"].sum().clamp(min=1)
    heat = focal_loss(heat_logits, t["heat"], t["weight"])
    size_l1 = ((size - t["size"]).abs() * t["centre"]).sum() / n
    offset_l1 = ((offset - t["offset"]).abs() * t["centre"]).sum() / n
    return {"loss": heat + size_weight * size_l1 + offset_weight * offset_l1,
            "heat": heat, "size": size_l1, "offset": offset_l1}


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes x0,y0,x1,y1 [M,4] of an image `width` pixels wide, mirrored left to right."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out
