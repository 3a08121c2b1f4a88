"""R-FCN detection (Dai et al. 2016), the head of the original DFF, on our stride-16 features.

The head splits feat's channels in halves, as DFF's R-FCN does: the first half feeds an RPN of
two 1×1 convs (objectness, box deltas per anchor), the second half the position-sensitive
maps (k·k·(classes+1) class maps, k·k·8 class-agnostic box maps). `rfcn_decode` turns them into
the task contract's fixed-size rows (dff/tasks.py) with standard ONNX ops only: anchors →
TopK(pre_nms) → NonMaxSuppression → TopK(R) proposals → PS-RoIAlign (one GridSample) → vote,
softmax, box regression → per-class NonMaxSuppression → TopK(K). NMS is the custom op
`dff::non_max_suppression`: in PyTorch an exact greedy NMS with ONNX Runtime's semantics, in
the graph one ONNX NonMaxSuppression node (`custom_translation_table`), which TensorRT's parser
imports natively (INMSLayer; boxes [B,N,4], scores [B,C,N]).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dff.tasks import MAX_DETECTIONS, SCORE_THRESHOLD, TOPK_LIMIT

BBOX_STDS = (0.1, 0.1, 0.2, 0.2)  # R-FCN's box-target normalisation (dx, dy, dw, dh)
DELTA_CLAMP = math.log(1000 / 16)  # largest dw, dh: exp() stays finite
# objectness is ranked by its logit, not its sigmoid: a trained RPN's sigmoids saturate at
# exactly 1.0 on many anchors, and TopK and NMS order such ties as each runtime likes
LOGIT_FLOOR = -1e3  # real logits are clamped here, far above PAD
PAD = -1e4  # objectness of padding and too-small candidates, below any real logit
NMS_OP = "dff::non_max_suppression"
Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_anchors(base: float = 16.0, scales: Sequence[float] = (1, 2, 4),
                 ratios: Sequence[float] = (0.5, 1, 2)) -> torch.Tensor:
    """Anchors [A,4] x0,y0,x1,y1 around a cell's centre, A = scales × ratios, ratio-major (the
    scales vary fastest); each of area (base·scale)², height / width = ratio."""
    out = []
    for ratio in ratios:
        for scale in scales:
            size = base * scale
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            out.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(out, dtype=torch.float32)


def anchor_grid(anchors: torch.Tensor, map_size: tuple[int, int], stride: int) -> torch.Tensor:
    """All anchors of an h×w map [h·w·A, 4] in image pixels, centred on the cells, index
    (row·w + col)·A + a (the order of rpn_cls.permute(0, 2, 3, 1)): rfcn_decode's proposals
    and rfcn_loss's targets both use it."""
    h, w = map_size
    xs = (torch.arange(w, dtype=torch.float32, device=anchors.device) + 0.5) * stride
    ys = (torch.arange(h, dtype=torch.float32, device=anchors.device) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack((gx, gy, gx, gy), -1).reshape(-1, 1, 4)
    return (centres + anchors.to(torch.float32).unsqueeze(0)).reshape(-1, 4)


class RFCNHead(nn.Module):
    """feat [N,C,h,w] at `stride` → raw maps (rpn_cls [N,A,h,w], rpn_box [N,4A,h,w], ps_cls
    [N,k·k·(classes+1),h,w], ps_box [N,k·k·8,h,w]); A = len(scales)·len(ratios).

    Objectness is one sigmoid logit per anchor: the original's two-way softmax is
    sigmoid(l_fg − l_bg), so one logit is the same model with half the channels. rpn_box is
    anchor-major (channel 4a + i: dx, dy, dw, dh of anchor a); ps maps are class-major (channel
    c·k² + bin, bins row by row), as R-FCN's PSROIPooling reads them; of ps_box's 8 groups,
    4..7 are the foreground deltas (the original's class-agnostic 2 × 4).

    Default anchors are 16, 32 and 64 px (scales 1, 2, 4 of a 16 px base; the original's 8, 16,
    32 were for 600-px frames): our 128×224 frames hold objects of about 12 to 80 px. k is 3,
    not the original's 7: the stride-16 grid of a 128×224 frame is only 8×14 cells and most
    RoIs span 1 to 3 cells, so a 7×7 bin grid would mostly interpolate between the same cells.
    """

    task = "detection"

    def __init__(self, in_channels: int, num_classes: int, k: int = 3, stride: int = 16,
                 base: float = 16.0, scales: Sequence[float] = (1, 2, 4),
                 ratios: Sequence[float] = (0.5, 1, 2)):
        super().__init__()
        if in_channels < 2 or in_channels % 2:
            raise ValueError(f"RFCNHead needs an even number of feature channels (half for the "
                             f"RPN, half for the score maps), got {in_channels}; put a 1×1 conv "
                             "to an even width in front")
        if k < 1 or num_classes < 1:
            raise ValueError(f"k {k} and num_classes {num_classes} must be at least 1")
        self.num_classes, self.k, self.stride = num_classes, k, stride
        self.register_buffer("anchors", make_anchors(base, scales, ratios), persistent=False)
        a, half = len(self.anchors), in_channels // 2
        self.rpn_cls = nn.Conv2d(half, a, 1)
        self.rpn_box = nn.Conv2d(half, 4 * a, 1)
        self.ps_cls = nn.Conv2d(half, k * k * (num_classes + 1), 1)
        self.ps_box = nn.Conv2d(half, k * k * 8, 1)
        for conv in (self.rpn_cls, self.rpn_box, self.ps_cls, self.ps_box):
            nn.init.normal_(conv.weight, std=0.01)  # the original's initialisation
            nn.init.zeros_(conv.bias)

    def forward(self, feat: torch.Tensor) -> Raw:
        half = feat.shape[1] // 2
        rpn, ps = feat[:, :half], feat[:, half:]
        return self.rpn_cls(rpn), self.rpn_box(rpn), self.ps_cls(ps), self.ps_box(ps)


def rfcn_decode(raw: Raw, anchors: torch.Tensor, stride: int, k: int = 3, pre_nms: int = 1000,
                rpn_nms: float = 0.7, proposals: int = 100, nms: float = 0.3,
                max_detections: int = MAX_DETECTIONS, score_threshold: float = SCORE_THRESHOLD,
                min_size: float = 1.0) -> tuple[torch.Tensor, ...]:
    """RFCNHead's raw maps → (boxes f32 [N,K,4] x0,y0,x1,y1 in input pixels, scores f32 [N,K]
    descending, classes i32 [N,K], num i32 [N]); rows scoring ≤ score_threshold are padding
    (boxes 0, score 0, class -1). The image is h·stride × w·stride.

    RPN: anchors decoded and clipped, boxes under `min_size` px dropped, TopK(pre_nms) by
    objectness, NMS at `rpn_nms`, then `proposals` (R) RoIs per image, padded to R when fewer
    survive. R is 100, not the original's 300: a 128×224 frame has only 8·14·9 = 1008 anchors
    and a handful of objects, and the PS-RoIAlign cost grows with R. Then per RoI: class scores
    by voting over the k×k bins and softmax, class-agnostic box regression (BBOX_STDS), per-class
    NMS at `nms`, and the top K = max_detections over all classes (R-FCN scores by class alone;
    objectness only picks RoIs). Every TopK has a constant K ≤ 3840 (TensorRT's limit).
    """
    check_options(pre_nms, proposals, max_detections, score_threshold)
    rpn_cls, rpn_box, ps_cls, ps_box = raw
    n, a, h, w = rpn_cls.shape
    limits = _image_limits(rpn_cls, stride)

    # proposals: anchors at cell centres, anchor fastest (index (row·w + col)·A + a)
    grid = anchor_grid(anchors.to(rpn_cls.device), (h, w), stride).unsqueeze(0)
    deltas = rpn_box.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    boxes = clip_boxes(decode_boxes(grid, deltas), limits)
    objectness = rpn_cls.permute(0, 2, 3, 1).reshape(n, -1).clamp(min=LOGIT_FLOOR)
    size = torch.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    objectness = torch.where(size >= min_size, objectness, torch.full_like(objectness, PAD))
    # pre_nms padding candidates behind the real ones, so TopK(pre_nms) is valid on small maps
    objectness = torch.cat((objectness, objectness.new_full((n, pre_nms), PAD)), 1)
    boxes = torch.cat((boxes, boxes.new_zeros(n, pre_nms, 4)), 1)
    top, index = objectness.topk(pre_nms, 1)
    candidates = boxes.gather(1, index.unsqueeze(2).expand(n, pre_nms, 4))
    selected = nms_op()(candidates, top.unsqueeze(1), proposals, rpn_nms, PAD / 2)
    kept = _selected_mask(selected, top.new_zeros(n, 1, pre_nms)).squeeze(1)
    # kept candidates in score order first; the rest (2·PAD) only fill R and are zeroed
    rank, order = torch.where(kept, top, torch.full_like(top, 2 * PAD)).topk(proposals, 1)
    valid = (rank > PAD).to(torch.float32)
    rois = candidates.gather(1, order.unsqueeze(2).expand(n, proposals, 4)) * valid.unsqueeze(2)

    # R-FCN on the RoIs: class and box maps pooled together
    c1, kk = ps_cls.shape[1] // (k * k), k * k
    maps = torch.cat((ps_cls.reshape(n, c1, kk, h, w), ps_box.reshape(n, 8, kk, h, w)), 1)
    pooled = ps_roi_align(maps, rois, k, limits)  # [N, c1 + 8, R]
    probs = pooled[:, :c1].softmax(1)[:, 1:] * valid.unsqueeze(1)  # [N, classes, R]
    fg = pooled[:, c1 + 4:c1 + 8].transpose(1, 2) * rois.new_tensor(BBOX_STDS)
    final = clip_boxes(decode_boxes(rois, fg), limits)  # [N, R, 4]

    # per-class NMS, then the top K over classes × RoIs (K zero candidates appended)
    num_classes = probs.shape[1]
    selected = nms_op()(final, probs, max_detections, nms, score_threshold)
    kept = _selected_mask(selected, probs.new_zeros(n, num_classes, proposals))
    flat = torch.where(kept, probs, torch.zeros_like(probs)).reshape(n, num_classes * proposals)
    flat = torch.cat((flat, flat.new_zeros(n, max_detections)), 1)
    scores, index = flat.topk(max_detections, 1)
    # index → class, RoI in float arithmetic (exact below 2**24); a padding index still lands
    # on a RoI in range (class >= classes), and its row is zeroed below
    where = index.to(torch.float32)
    cls = torch.floor(where / proposals)
    roi = (where - cls * proposals).to(torch.int64)
    picked = final.gather(1, roi.unsqueeze(2).expand(n, max_detections, 4))
    keep = scores > score_threshold
    keep_f = keep.to(torch.float32)
    classes = torch.where(keep, cls.to(torch.int32), torch.full_like(cls, -1).to(torch.int32))
    return (picked * keep_f.unsqueeze(2), scores * keep_f, classes,
            keep.to(torch.int32).sum(1, dtype=torch.int32))


def check_options(pre_nms: int, proposals: int, max_detections: int,
                  score_threshold: float) -> None:
    """rfcn_decode's sizes and threshold, each with the range it needs."""
    for name, value in (("pre_nms", pre_nms), ("max_detections", max_detections)):
        if not 1 <= value <= TOPK_LIMIT:
            raise ValueError(f"{name} must be in 1..{TOPK_LIMIT} (TensorRT's TopK), got {value}")
    if not 1 <= proposals <= pre_nms:
        raise ValueError(f"proposals must be in 1..pre_nms ({pre_nms}), got {proposals}")
    if score_threshold < 0:
        raise ValueError(f"score_threshold must be >= 0 (padding scores 0), got {score_threshold}")


def decode_boxes(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Boxes [...,4] x0,y0,x1,y1 moved by deltas [...,4] (dx, dy in box sizes, dw, dh as log
    scales clamped at DELTA_CLAMP): the standard Faster R-CNN parametrisation."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h
    cx, cy = cx + deltas[..., 0] * w, cy + deltas[..., 1] * h
    w = w * deltas[..., 2].clamp(max=DELTA_CLAMP).exp()
    h = h * deltas[..., 3].clamp(max=DELTA_CLAMP).exp()
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def clip_boxes(boxes: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Boxes clipped to the image, limits [W, H, W, H]."""
    return torch.minimum(boxes.clamp(min=0), limits)


def ps_roi_align(maps: torch.Tensor, rois: torch.Tensor, k: int, limits: torch.Tensor,
                 samples: int = 2) -> torch.Tensor:
    """Position-sensitive RoIAlign and voting: maps [N,C,k·k,h,w] (bin-wise channel groups),
    rois [N,R,4] in image pixels → [N,C,R], the mean over the k×k bins of each bin's own maps
    sampled bilinearly at samples×samples sub-bin points.

    The bins fold into the batch ([N·k², C, h, w]), so one GridSample (align_corners False,
    zeros outside) samples every bin of every RoI. With align_corners False, grid = 2x/W − 1
    puts image pixel x on feature cell x/stride − 0.5, cell centres at (i + 0.5)·stride, as the
    anchors. Points within half a cell of the border blend towards zero (RoIAlign would clamp).
    """
    n, c, kk, h, w = maps.shape
    r = rois.shape[1]
    # fractions of the RoI's width / height of each bin's sample points: [k², samples²]
    step = [(i + 0.5) / (k * samples) for i in range(k * samples)]
    fx = [[step[bx * samples + u] for _v in range(samples) for u in range(samples)]
          for _by in range(k) for bx in range(k)]
    fy = [[step[by * samples + v] for v in range(samples) for _u in range(samples)]
          for by in range(k) for _bx in range(k)]
    fx_t, fy_t = rois.new_tensor(fx).reshape(1, kk, 1, -1), rois.new_tensor(fy).reshape(1, kk, 1, -1)
    x0, y0 = rois[..., 0].reshape(n, 1, r, 1), rois[..., 1].reshape(n, 1, r, 1)
    rw = (rois[..., 2] - rois[..., 0]).reshape(n, 1, r, 1)
    rh = (rois[..., 3] - rois[..., 1]).reshape(n, 1, r, 1)
    gx = (x0 + fx_t * rw) * (2 / limits[0]) - 1  # [N, k², R, samples²]
    gy = (y0 + fy_t * rh) * (2 / limits[1]) - 1
    grid = torch.stack((gx, gy), -1).reshape(n * kk, r, samples * samples, 2)
    folded = maps.transpose(1, 2).reshape(n * kk, c, h, w)
    sampled = F.grid_sample(folded, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [N·k², C, R, samples²]
    return sampled.reshape(n, kk, c, r, samples * samples).mean((1, 4))


def _image_limits(like: torch.Tensor, stride: int) -> torch.Tensor:
    """[W, H, W, H] of the input image from a map's (possibly symbolic) size, as a tensor, so
    that clipping and grid normalisation follow the input size in the exported graph."""
    ones_w = like.new_ones(like.shape[3]).sum() * stride
    ones_h = like.new_ones(like.shape[2]).sum() * stride
    return torch.stack((ones_w, ones_h, ones_w, ones_h)).to(torch.float32)


def _selected_mask(selected: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """NMS's selected_indices [M,3] (batch, class, box) as a bool mask shaped like `zeros`
    [B,C,N]: one ScatterND, so the batch comes from the graph, not a Python loop."""
    ones = torch.ones_like(selected[:, 0], dtype=zeros.dtype)
    mask = zeros.index_put((selected[:, 0], selected[:, 1], selected[:, 2]), ones)
    return mask > 0


# ------------------------------------------------------------------ NMS: eager and ONNX

def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, max_output: int,
                        iou_threshold: float, score_threshold: float) -> torch.Tensor:
    """Greedy NMS with ONNX NonMaxSuppression's semantics as ONNX Runtime computes them
    (center_point_box 0): boxes [B,N,4] (two opposite corners, either order), scores [B,C,N]
    → selected_indices int64 [M,3] (batch, class, box), batch then class then score order.
    Per batch and class: boxes scoring > score_threshold, highest first (ties by lower index;
    ONNX Runtime leaves their order open), each kept unless its IoU with a kept box is
    > iou_threshold, at most max_output kept. IoU in float32 as ONNX Runtime's: 0 for boxes
    that do not overlap or have no area."""
    b, c, n = scores.shape
    if boxes.dim() != 3 or tuple(boxes.shape) != (b, n, 4):
        raise ValueError(f"boxes {list(boxes.shape)} and scores {list(scores.shape)}: expected "
                         "boxes [B,N,4] and scores [B,C,N]")
    out: list[tuple[int, int, int]] = []
    for bi in range(b if max_output > 0 else 0):
        lo = torch.minimum(boxes[bi, :, :2], boxes[bi, :, 2:]).float()
        hi = torch.maximum(boxes[bi, :, :2], boxes[bi, :, 2:]).float()
        for ci in range(c):
            s = scores[bi, ci].float()
            order = torch.nonzero(s > score_threshold).flatten()
            order = order[torch.sort(-s[order], stable=True).indices]
            over = _iou(lo[order], hi[order]) > iou_threshold
            keep: list[int] = []
            suppressed = torch.zeros(len(order), dtype=torch.bool)
            for i in range(len(order)):
                if suppressed[i]:
                    continue
                keep.append(i)
                if len(keep) == max_output:
                    break
                suppressed |= over[i]
            out += [(bi, ci, int(order[i])) for i in keep]
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)


def _iou(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """IoU [M,M] of boxes given by their low and high corners [M,2], float32, as ONNX Runtime
    computes it: 0 where the intersection, an area or the union is not positive."""
    inter_lo = torch.maximum(lo.unsqueeze(1), lo.unsqueeze(0))
    inter_hi = torch.minimum(hi.unsqueeze(1), hi.unsqueeze(0))
    overlaps = (inter_hi > inter_lo).all(2)
    extent = inter_hi - inter_lo
    inter = extent[..., 0] * extent[..., 1]
    area = (hi - lo)[:, 0] * (hi - lo)[:, 1]
    union = area.unsqueeze(1) + area.unsqueeze(0) - inter
    ok = overlaps & (inter > 0) & (area.unsqueeze(1) > 0) & (area.unsqueeze(0) > 0) & (union > 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


@functools.cache
def nms_op() -> Callable[..., torch.Tensor]:
    """The torch custom op `torch.ops.dff.non_max_suppression(boxes, scores, max_output,
    iou_threshold, score_threshold)`, defined on first call: eager it runs
    `non_max_suppression`; to the exporter it is one node with a data-dependent row count,
    translated to ONNX NonMaxSuppression by `custom_translation_table`."""

    @torch.library.custom_op(NMS_OP, mutates_args=(),
                             schema="(Tensor boxes, Tensor scores, int max_output, "
                                    "float iou_threshold, float score_threshold) -> Tensor")
    def nms(boxes: torch.Tensor, scores: torch.Tensor, max_output: int, iou_threshold: float,
            score_threshold: float) -> torch.Tensor:
        # on the host: the greedy loop is sequential, and its masks are made there
        return non_max_suppression(boxes.detach().cpu(), scores.detach().cpu(), max_output,
                                   iou_threshold, score_threshold).to(boxes.device)

    @nms.register_fake
    def _(boxes: torch.Tensor, scores: torch.Tensor, max_output: int, iou_threshold: float,
          score_threshold: float) -> torch.Tensor:
        rows = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((rows, 3), dtype=torch.int64)

    return torch.ops.dff.non_max_suppression.default


def custom_translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """`torch.onnx.export(custom_translation_table=...)` entry: the NMS op as one standard
    NonMaxSuppression node (center_point_box 0; the thresholds as constant inputs). Merge it
    with `dff.plugins.onnx_op.custom_translation_table()` where FlowWarp is exported too."""
    from onnxscript import opset18 as op

    def nms_to_onnx(boxes: Any, scores: Any, max_output: int, iou_threshold: float,
                    score_threshold: float) -> Any:
        return op.NonMaxSuppression(
            boxes, scores, op.Constant(value_ints=[max_output]),
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[score_threshold]), center_point_box=0)

    return {nms_op(): nms_to_onnx}


class RFCNDetect(nn.Module):
    """RFCNHead and rfcn_decode as one detection task module: feat [N,C,h,w] → (boxes, scores,
    classes, num) of the task contract, what `DFFModules(kind="detection", task=...)` takes.
    Export it with `custom_translation_table()` (the NMS op)."""

    task = "detection"

    def __init__(self, head: RFCNHead, pre_nms: int = 1000, rpn_nms: float = 0.7,
                 proposals: int = 100, nms: float = 0.3, max_detections: int = MAX_DETECTIONS,
                 score_threshold: float = SCORE_THRESHOLD, min_size: float = 1.0):
        super().__init__()
        self.head = head
        self.options: dict[str, Any] = {
            "k": head.k, "pre_nms": pre_nms, "rpn_nms": rpn_nms, "proposals": proposals,
            "nms": nms, "max_detections": max_detections, "score_threshold": score_threshold,
            "min_size": min_size}
        check_options(pre_nms, proposals, max_detections, score_threshold)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rfcn_decode(self.head(feat), self.head.anchors, self.head.stride, **self.options)
