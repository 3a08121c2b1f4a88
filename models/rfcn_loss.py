"""R-FCN's training losses (Dai et al. 2016), for RFCNHead's raw maps (models/rfcn.py).

Two stages, as the original's approximate joint training: the RPN learns objectness and box
deltas on 256 sampled anchors per image; its proposals, decoded without gradient, plus the
ground-truth boxes, are the RoIs on which the position-sensitive maps learn the class (softmax
over background + classes) and the class-agnostic box deltas. Thresholds are Faster R-CNN's
and R-FCN's: anchors positive at IoU ≥ 0.7 (or the best of a ground truth), negative < 0.3;
RoIs foreground at IoU ≥ 0.5, background below; OHEM (the original's default) keeps the 128
RoIs of highest loss per image. Ignore regions (docs/DESIGN.md §14) are never positives, and
anchors or RoIs overlapping one by IoU ≥ 0.3 are not negatives either.

Training-time code only: plain PyTorch with loops over the images of a batch, never exported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dff.models.rfcn import (
    BBOX_STDS,
    DELTA_CLAMP,
    Raw,
    RFCNHead,
    anchor_grid,
    clip_boxes,
    decode_boxes,
    non_max_suppression,
    ps_roi_align,
)

RPN_POSITIVE, RPN_NEGATIVE = 0.7, 0.3  # anchor IoU thresholds (Faster R-CNN)
RPN_BATCH, RPN_FG_FRACTION = 256, 0.5  # anchors sampled per image, at most half positive
RPN_BETA = 1 / 9  # smooth-L1 transition of the RPN box loss (the original's sigma 3)
ROI_FOREGROUND = 0.5  # RoI IoU for a foreground RoI; background is [0, 0.5)
ROI_BATCH, ROI_FG_FRACTION = 128, 0.25  # RoIs per image, at most a quarter foreground
IGNORE_OVERLAP = 0.3  # IoU with an ignore region that takes an anchor or RoI out of background
ALLOWED_BORDER = 16.0  # px an anchor may cross the image border and still be trained


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU [M,K] of boxes a [M,4] and b [K,4] (x0,y0,x1,y1); 0 where a box has no area."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a[:, None] + area_b[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-9), torch.zeros_like(inter))


def encode_boxes(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Deltas [...,4] (dx, dy, dw, dh) that `decode_boxes(boxes, deltas)` turns into targets:
    the centre shift in box sizes and the log size ratios (dw, dh clamped at DELTA_CLAMP, as
    decode_boxes clamps them)."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    tw, th = targets[..., 2] - targets[..., 0], targets[..., 3] - targets[..., 1]
    dx = (targets[..., 0] + 0.5 * tw - boxes[..., 0] - 0.5 * w) / w
    dy = (targets[..., 1] + 0.5 * th - boxes[..., 1] - 0.5 * h) / h
    dw = torch.log(tw / w).clamp(max=DELTA_CLAMP)
    dh = torch.log(th / h).clamp(max=DELTA_CLAMP)
    return torch.stack((dx, dy, dw, dh), -1)


def assign_anchors(grid: torch.Tensor, gt: torch.Tensor, ignore_boxes: torch.Tensor,
                   image_size: tuple[int, int], positive: float = RPN_POSITIVE,
                   negative: float = RPN_NEGATIVE, allowed_border: float = ALLOWED_BORDER,
                   ignore_overlap: float = IGNORE_OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors grid [G,4], ground truths gt [M,4] and ignore regions [I,4] (pixels) → labels
    [G] int64 (1 positive, 0 negative, -1 neither) and deltas [G,4] to each anchor's best gt
    (zeros where there is none).

    Positive: IoU ≥ `positive`, or an anchor of highest IoU (> 0) with some gt, so that every
    gt has one. Negative: IoU < `negative` with every gt and < `ignore_overlap` with every
    ignore region. Anchors crossing the image border by more than `allowed_border` px are
    neither, as the original drops them; its 0 px would leave the 64-px anchors only the 4
    middle rows of cell centres on our 8×14 grid, so one cell is allowed."""
    height, width = image_size
    inside = ((grid[:, 0] >= -allowed_border) & (grid[:, 1] >= -allowed_border)
              & (grid[:, 2] <= width + allowed_border) & (grid[:, 3] <= height + allowed_border))
    labels = torch.full((len(grid),), -1, dtype=torch.int64, device=grid.device)
    deltas = grid.new_zeros(len(grid), 4)
    if len(gt):
        iou = box_iou(grid, gt) * inside[:, None]  # outside anchors match nothing
        best, which = iou.max(1)
        labels[best < negative] = 0
        per_gt = iou.max(0).values
        is_best = ((iou == per_gt[None]) & (per_gt[None] > 0)).any(1)
        labels[is_best | (best >= positive)] = 1
        deltas = encode_boxes(grid, gt[which])
    else:
        labels.zero_()
    if len(ignore_boxes):
        near = box_iou(grid, ignore_boxes).max(1).values >= ignore_overlap
        labels[near & (labels == 0)] = -1
    labels[~inside] = -1
    return labels, deltas


def sample_labels(labels: torch.Tensor, batch: int, fg_fraction: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Labels [G] (> 0 foreground, 0 background, < 0 neither) with all but a random sample set
    to -1: at most round(batch·fg_fraction) foreground, background filling up to `batch`.
    Deterministic given the generator's state (one uniform key per entry)."""
    keys = torch.rand(len(labels), generator=generator, device=generator.device)
    keys = keys.to(labels.device)
    fg, bg = labels > 0, labels == 0
    num_fg = min(round(batch * fg_fraction), int(fg.sum()))
    num_bg = min(batch - num_fg, int(bg.sum()))
    out = torch.full_like(labels, -1)
    for mask, count in ((fg, num_fg), (bg, num_bg)):
        picked = torch.where(mask, keys, torch.full_like(keys, math.inf)).argsort()[:count]
        out[picked] = labels[picked]
    return out


def rpn_targets(grid: torch.Tensor, gt: torch.Tensor, ignore_boxes: torch.Tensor,
                image_size: tuple[int, int], generator: torch.Generator,
                batch: int = RPN_BATCH, fg_fraction: float = RPN_FG_FRACTION,
                **assign: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`assign_anchors`, then `sample_labels` of up to `batch` anchors (half positive at most):
    labels [G] (1, 0, or -1 for anchors not in the sample) and deltas [G,4]."""
    labels, deltas = assign_anchors(grid, gt, ignore_boxes, image_size, **assign)
    return sample_labels(labels, batch, fg_fraction, generator), deltas


def training_proposals(rpn_cls: torch.Tensor, rpn_box: torch.Tensor, grid: torch.Tensor,
                       limits: torch.Tensor, pre_nms: int = 1000, nms: float = 0.7,
                       post_nms: int = 300, min_size: float = 1.0) -> torch.Tensor:
    """One image's RPN maps (rpn_cls [A,h,w], rpn_box [4A,h,w]) → proposals [R,4], R ≤
    post_nms, highest objectness first, without gradient: anchors decoded and clipped, boxes
    under min_size px dropped, TopK(pre_nms), NMS at `nms` (the eager NMS of models/rfcn.py,
    on the CPU). 300 is the original's count for training (rfcn_decode keeps 100 at test)."""
    a, h, w = rpn_cls.shape
    with torch.no_grad():
        deltas = rpn_box.reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        boxes = clip_boxes(decode_boxes(grid, deltas), limits)
        scores = rpn_cls.permute(1, 2, 0).reshape(-1)  # logits: sigmoids saturate and tie
        size = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        boxes, scores = boxes[size >= min_size], scores[size >= min_size]
        scores, order = scores.topk(min(pre_nms, len(scores)))
        boxes = boxes[order]
        kept = non_max_suppression(boxes[None].cpu(), scores[None, None].cpu(), post_nms, nms,
                                   -math.inf)[:, 2]
        return boxes[kept.to(boxes.device)]


def roi_targets(rois: torch.Tensor, gt: torch.Tensor, gt_classes: torch.Tensor,
                ignore_boxes: torch.Tensor, foreground: float = ROI_FOREGROUND,
                ignore_overlap: float = IGNORE_OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIs [R,4] → labels [R] int64 (class + 1 for foreground, IoU ≥ `foreground` with a gt;
    0 background; -1 neither: background that overlaps an ignore region by ≥ ignore_overlap)
    and deltas [R,4] to the best gt divided by BBOX_STDS (zeros for background)."""
    labels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
    deltas = rois.new_zeros(len(rois), 4)
    if len(gt):
        best, which = box_iou(rois, gt).max(1)
        fg = best >= foreground
        labels = torch.where(fg, gt_classes[which] + 1, labels)
        stds = rois.new_tensor(BBOX_STDS)
        deltas = torch.where(fg[:, None], encode_boxes(rois, gt[which]) / stds, deltas)
    if len(ignore_boxes):
        near = box_iou(rois, ignore_boxes).max(1).values >= ignore_overlap
        labels[near & (labels == 0)] = -1
    return labels, deltas


def _smooth_l1(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 per element, summed over the last axis (the 4 deltas)."""
    return F.smooth_l1_loss(x, torch.zeros_like(x), beta=beta, reduction="none").sum(-1)


def _as_tensors(boxes: Any, classes: Any, ignore: Any, device: torch.device,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's TrainData.boxes entries → gt boxes [M,4], gt classes [M] (ignore regions
    removed) and ignore regions [I,4], on `device`."""
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=device)
    c = torch.as_tensor(np.asarray(classes, np.int64).reshape(-1), device=device)
    i = torch.as_tensor(np.asarray(ignore, bool).reshape(-1), device=device)
    if not len(b) == len(c) == len(i):
        raise ValueError(f"{len(b)} boxes, {len(c)} classes and {len(i)} ignore flags: an image "
                         "needs one class and one flag per box (TrainData.boxes' format)")
    real = c[~i]
    if len(real) and (real.min() < 0 or real.max() >= num_classes):
        raise ValueError(f"box classes must be 0-based detection classes in 0..{num_classes - 1}"
                         f", got {real.tolist()}; pass segmentation label - 1")
    return b[~i], real, b[i]


def rfcn_loss(raw: Raw, boxes: Sequence[Any], classes: Sequence[Any], ignore: Sequence[Any],
              head: RFCNHead, image_size: tuple[int, int], generator: torch.Generator, *,
              ohem: bool = True, rpn_batch: int = RPN_BATCH, roi_batch: int = ROI_BATCH,
              pre_nms: int = 1000, rpn_nms: float = 0.7, post_nms: int = 300,
              allowed_border: float = ALLOWED_BORDER) -> dict[str, torch.Tensor]:
    """RFCNHead's raw maps of a batch and its boxes, classes (0-based) and ignore flags, one
    array per image as TrainData.boxes gives them → {"rpn_cls", "rpn_box", "rfcn_cls",
    "rfcn_box", "loss"} (loss = the sum). image_size (H, W) is the input's, h·stride × w·stride.

    RPN: binary cross-entropy of the sampled anchors' objectness and smooth-L1 (beta 1/9) of
    the positives' deltas, both summed over the batch and divided by the sampled count (the
    original's 'valid' softmax and 1/256). R-FCN: the RoIs (proposals + gts) sampled to at most
    a quarter foreground; with `ohem` all of them are pooled (one PS-RoIAlign per image, cheap
    at ~300 RoIs) and the `roi_batch` of highest loss per image are kept, else `roi_batch` are
    sampled. Softmax cross-entropy over background + classes and smooth-L1 (beta 1) of the
    foreground's BBOX_STDS-normalised deltas, both divided by the kept count (the original's
    'valid' softmax and 1/128)."""
    rpn_cls, rpn_box, ps_cls, ps_box = raw
    n, a, h, w = rpn_cls.shape
    if tuple(image_size) != (h * head.stride, w * head.stride):
        raise ValueError(f"image_size {tuple(image_size)} is not the maps' {h}×{w} cells × "
                         f"stride {head.stride}; pass the network input's (H, W), a multiple "
                         "of the stride")
    if not len(boxes) == len(classes) == len(ignore) == n:
        raise ValueError(f"{len(boxes)} box, {len(classes)} class and {len(ignore)} ignore "
                         f"arrays for a batch of {n}: pass one of each per image")
    k, kk, c1 = head.k, head.k * head.k, head.num_classes + 1
    device = rpn_cls.device
    grid = anchor_grid(head.anchors.to(device), (h, w), head.stride)
    height, width = image_size
    limits = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    maps = torch.cat((ps_cls.reshape(n, c1, kk, h, w), ps_box.reshape(n, 8, kk, h, w)), 1)

    rpn_ce, rpn_l1, rpn_count = rpn_cls.new_zeros(()), rpn_cls.new_zeros(()), 0
    roi_ce, roi_l1, roi_count = rpn_cls.new_zeros(()), rpn_cls.new_zeros(()), 0
    for i in range(n):
        gt, gt_classes, ignored = _as_tensors(boxes[i], classes[i], ignore[i], device,
                                              head.num_classes)
        # RPN
        labels, targets = rpn_targets(grid, gt, ignored, image_size, generator, rpn_batch,
                                      allowed_border=allowed_border)
        logits = rpn_cls[i].permute(1, 2, 0).reshape(-1)
        deltas = rpn_box[i].reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        sampled, pos = labels >= 0, labels == 1
        rpn_ce = rpn_ce + F.binary_cross_entropy_with_logits(
            logits[sampled], labels[sampled].to(logits.dtype), reduction="sum")
        rpn_l1 = rpn_l1 + _smooth_l1(deltas[pos] - targets[pos], RPN_BETA).sum()
        rpn_count += int(sampled.sum())

        # R-FCN on the proposals and the gts
        rois = torch.cat((training_proposals(rpn_cls[i], rpn_box[i], grid, limits, pre_nms,
                                             rpn_nms, post_nms), gt))
        labels, targets = roi_targets(rois, gt, gt_classes, ignored)
        labels = sample_labels(labels, len(rois) if ohem else roi_batch, ROI_FG_FRACTION,
                               generator)
        keep = torch.nonzero(labels >= 0).flatten()
        rois, labels, targets = rois[keep], labels[keep], targets[keep]
        pooled = ps_roi_align(maps[i:i + 1], rois[None], k, limits)[0].t()  # [R, c1 + 8]
        ce = F.cross_entropy(pooled[:, :c1], labels, reduction="none")
        l1 = _smooth_l1(pooled[:, c1 + 4:] - targets, 1.0) * (labels > 0)
        if ohem and len(rois) > roi_batch:  # the roi_batch hardest RoIs, by their loss
            hard = (ce + l1).detach().topk(roi_batch).indices
            ce, l1 = ce[hard], l1[hard]
        roi_ce, roi_l1, roi_count = roi_ce + ce.sum(), roi_l1 + l1.sum(), roi_count + len(ce)

    out = {"rpn_cls": rpn_ce / max(rpn_count, 1), "rpn_box": rpn_l1 / max(rpn_count, 1),
           "rfcn_cls": roi_ce / max(roi_count, 1), "rfcn_box": roi_l1 / max(roi_count, 1)}
    out["loss"] = out["rpn_cls"] + out["rpn_box"] + out["rfcn_cls"] + out["rfcn_box"]
    return out
