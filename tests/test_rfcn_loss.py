"""R-FCN's training losses (models/rfcn_loss.py): anchor and RoI targets on hand-made boxes, the
sampler's counts, gradients that reach only what each term trains, and a head that learns to
detect two boxes on a fixed feature map, checked through rfcn_decode."""

import math

import numpy as np
import pytest
import torch
from dff.models.rfcn import BBOX_STDS, RFCNHead, anchor_grid, decode_boxes, rfcn_decode
from dff.models.rfcn_loss import (
    assign_anchors,
    box_iou,
    roi_targets,
    rpn_targets,
    sample_labels,
    training_proposals,
)
from dff.models.rfcn_loss import rfcn_loss as loss_fn
from torch import nn

CLASSES = 3
IMAGE = (64, 96)  # a 4×6 grid of stride-16 cells, 216 anchors
NONE = torch.zeros(0, 4)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid():
    return anchor_grid(RFCNHead(16, CLASSES).anchors, (4, 6), 16)


def _index(row, col, anchor, w=6, a=9):
    return (row * w + col) * a + anchor


# ----------------------------------------------------------------------------- RPN targets

def test_an_anchor_on_a_gt_box_is_positive_with_zero_targets_and_far_anchors_negative():
    grid = _grid()
    on = _index(1, 2, 4)  # the 32-px square anchor centred at (40, 24)
    assert grid[on].tolist() == [24.0, 8.0, 56.0, 40.0]
    labels, deltas = assign_anchors(grid, grid[on:on + 1].clone(), NONE, IMAGE)
    assert labels[on] == 1 and deltas[on].tolist() == [0.0, 0.0, 0.0, 0.0]
    iou = box_iou(grid, grid[on:on + 1])[:, 0]
    assert ((iou >= 0.7) == (labels == 1)).all()  # no best-anchor extras: the best is at 1.0
    far = iou < 0.3
    inside = (grid[:, :2] >= -16).all(1) & (grid[:, 2] <= 96 + 16) & (grid[:, 3] <= 64 + 16)
    assert (labels[far & inside] == 0).all() and (labels[~inside] == -1).all()
    assert (labels[(iou >= 0.3) & (iou < 0.7)] == -1).all()
    assert (~inside).sum() > 0 and (far & inside).sum() > 100


def test_the_best_anchor_of_a_gt_is_positive_under_0_7_and_regresses_onto_it():
    grid = _grid()
    gt = torch.tensor([[30.0, 12.0, 50.0, 30.0], [60.0, 30.0, 68.0, 40.0]])  # 20×18, 8×10 px
    iou = box_iou(grid, gt)
    assert iou.max() < 0.7
    labels, deltas = assign_anchors(grid, gt, NONE, IMAGE)
    best = iou.argmax(0)
    assert (labels[best] == 1).all() and int((labels == 1).sum()) == 2
    np.testing.assert_allclose(decode_boxes(grid[best], deltas[best]), gt, atol=1e-4)


def test_regression_targets_of_every_positive_round_trip_through_decode_boxes():
    grid = _grid()
    gt = torch.tensor([[5.0, 3.0, 47.0, 50.0], [50.0, 10.0, 92.0, 30.0]])
    labels, deltas = assign_anchors(grid, gt, NONE, IMAGE)
    pos = labels == 1
    assert pos.sum() >= 2
    matched = gt[box_iou(grid[pos], gt).argmax(1)]
    np.testing.assert_allclose(decode_boxes(grid[pos], deltas[pos]), matched, atol=1e-4)


def test_ignore_regions_make_anchors_near_them_ignored_and_are_never_positives():
    grid = _grid()
    ignore = torch.tensor([[24.0, 8.0, 56.0, 40.0]])  # exactly an anchor
    labels, _ = assign_anchors(grid, NONE, ignore, IMAGE)
    near = box_iou(grid, ignore)[:, 0] >= 0.3
    assert (labels[near] == -1).all() and not (labels == 1).any()
    plain, _ = assign_anchors(grid, NONE, NONE, IMAGE)
    assert (plain[near] == 0).all()  # without the region they would be negatives
    assert torch.equal(labels[~near], plain[~near])


def test_anchors_far_across_the_border_are_neither_positive_nor_negative():
    grid = _grid()
    corner = _index(0, 0, 5)  # 64 × 64 at (8, 8): 24 px out on two sides
    gt = grid[corner:corner + 1].clone()  # the anchor itself, IoU 1
    labels, _ = assign_anchors(grid, gt, NONE, IMAGE)
    assert labels[corner] == -1
    assert (labels == 1).any()  # the gt still gets its best anchor inside
    wide, _ = assign_anchors(grid, gt, NONE, IMAGE, allowed_border=24)
    assert wide[corner] == 1 and box_iou(grid[corner:corner + 1], gt) == 1


def test_sampling_takes_at_most_256_anchors_half_positive_deterministically():
    labels = torch.zeros(1000, dtype=torch.int64)
    labels[:300], labels[900:] = 1, -1
    out = sample_labels(labels, 256, 0.5, torch.Generator().manual_seed(0))
    assert int((out == 1).sum()) == 128 and int((out == 0).sum()) == 128
    assert (labels[out >= 0] == out[out >= 0]).all()  # sampled entries keep their label
    same = sample_labels(labels, 256, 0.5, torch.Generator().manual_seed(0))
    other = sample_labels(labels, 256, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and not torch.equal(out, other)
    labels[10:300] = 0  # few positives: negatives fill the batch
    out = sample_labels(labels, 256, 0.5, torch.Generator().manual_seed(0))
    assert int((out == 1).sum()) == 10 and int((out == 0).sum()) == 246
    grid = anchor_grid(RFCNHead(16, CLASSES).anchors, (8, 14), 16)
    gt = torch.tensor([[0.0, 0.0, 224.0, 128.0], [10.0, 10.0, 60.0, 50.0]])
    sampled, _ = rpn_targets(grid, gt, NONE, (128, 224), torch.Generator().manual_seed(0))
    assert int((sampled >= 0).sum()) == 256 and int((sampled == 1).sum()) <= 128


def test_anchor_grid_has_rfcn_decodes_anchor_order():
    """One confident anchor and zero deltas: rfcn_decode's single RoI and box is that anchor."""
    head = RFCNHead(16, CLASSES)
    h, w, a, kk = 4, 6, 9, 9
    rpn_cls = torch.full((1, a, h, w), -10.0)
    rpn_cls[0, 7, 1, 3] = 10.0  # 22.6 × 45.3 px (ratio 2), fully inside
    ps_cls = torch.zeros(1, CLASSES + 1, kk, h, w)
    ps_cls[:, 2] = 8.0
    raw = (rpn_cls, torch.zeros(1, 4 * a, h, w), ps_cls.reshape(1, -1, h, w),
           torch.zeros(1, 8 * kk, h, w))
    boxes, _, classes, num = rfcn_decode(raw, head.anchors, 16, proposals=1)
    grid = anchor_grid(head.anchors, (h, w), 16)
    assert num.tolist() == [1] and classes[0, 0] == 1
    np.testing.assert_allclose(boxes[0, 0], grid[_index(1, 3, 7)], atol=1e-4)


# ----------------------------------------------------------------------------- RoI targets

def test_roi_targets_label_foreground_background_and_ignore_and_round_trip():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    rois = torch.tensor([[10.0, 10.0, 40.0, 40.0],   # the gt: class 2 + 1
                         [12.0, 8.0, 44.0, 38.0],    # IoU ≈ 0.76: foreground
                         [25.0, 25.0, 55.0, 55.0],   # IoU ≈ 0.14: background
                         [60.0, 30.0, 90.0, 60.0],   # on the ignore region: neither
                         [70.0, 0.0, 90.0, 20.0]])   # IoU 0 with both: background
    ignore = torch.tensor([[60.0, 30.0, 90.0, 62.0]])
    labels, deltas = roi_targets(rois, gt, torch.tensor([2]), ignore)
    assert labels.tolist() == [3, 3, 0, -1, 0]
    assert deltas[0].abs().max() < 1e-6 and (deltas[2:] == 0).all()
    decoded = decode_boxes(rois[:2], deltas[:2] * torch.tensor(BBOX_STDS))
    np.testing.assert_allclose(decoded, gt.expand(2, 4), atol=1e-4)


def test_training_proposals_are_nms_filtered_decoded_anchors_without_gradient():
    head = RFCNHead(16, CLASSES)
    gen = torch.Generator().manual_seed(0)
    rpn_cls = torch.randn(9, 8, 14, generator=gen, requires_grad=True)
    rpn_box = 0.1 * torch.randn(36, 8, 14, generator=gen)
    grid = anchor_grid(head.anchors, (8, 14), 16)
    limits = torch.tensor([224.0, 128.0, 224.0, 128.0])
    rois = training_proposals(rpn_cls, rpn_box, grid, limits, post_nms=50)
    assert rois.shape == (50, 4) and not rois.requires_grad
    assert rois.min() >= 0 and (rois[:, 2] <= 224).all() and (rois[:, 3] <= 128).all()
    iou = box_iou(rois, rois) - torch.eye(50)
    assert iou.max() <= 0.7


# ---------------------------------------------------------------------------------- losses

def _batch():
    """Two images of 8×14 cells: two objects and an ignore region, and an empty frame."""
    boxes = [np.array([[20, 16, 60, 50], [120, 40, 190, 110], [80, 90, 100, 110]], np.float32),
             np.zeros((0, 4), np.float32)]
    return boxes, [np.array([0, 2, 1]), np.zeros(0, np.int64)], [np.array([0, 0, 1], bool),
                                                                 np.zeros(0, bool)]


def _head(seed=0, spread=0.2):
    torch.manual_seed(seed)
    head = RFCNHead(32, CLASSES)
    for conv in head.modules():  # larger weights than the initialisation: non-trivial maps
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=spread)
    return head


def test_losses_are_finite_positive_and_reproducible_given_the_generator():
    head = _head()
    feat = torch.randn(2, 32, 8, 14, generator=torch.Generator().manual_seed(1))
    terms = loss_fn(head(feat), *_batch(), head, (128, 224), torch.Generator().manual_seed(0))
    assert set(terms) == {"rpn_cls", "rpn_box", "rfcn_cls", "rfcn_box", "loss"}
    assert all(torch.isfinite(v) and v > 0 and v.dim() == 0 for v in terms.values())
    total = sum(terms[k] for k in ("rpn_cls", "rpn_box", "rfcn_cls", "rfcn_box"))
    torch.testing.assert_close(terms["loss"], total)
    again = loss_fn(head(feat), *_batch(), head, (128, 224), torch.Generator().manual_seed(0))
    assert all(torch.equal(terms[k], again[k]) for k in terms)


def test_each_term_trains_only_its_maps_and_every_head_conv_gets_a_gradient():
    head = _head()
    feat = torch.randn(2, 32, 8, 14, generator=torch.Generator().manual_seed(1))
    terms = loss_fn(head(feat), *_batch(), head, (128, 224), torch.Generator().manual_seed(0))
    convs = {name: getattr(head, name).weight for name in ("rpn_cls", "rpn_box", "ps_cls",
                                                           "ps_box")}
    reaches = {"rpn_cls": {"rpn_cls"}, "rpn_box": {"rpn_box"}, "rfcn_cls": {"ps_cls"},
               "rfcn_box": {"ps_box"}}
    for term, trained in reaches.items():
        grads = torch.autograd.grad(terms[term], list(convs.values()), retain_graph=True,
                                    allow_unused=True)
        for (name, _), grad in zip(convs.items(), grads):
            nonzero = grad is not None and bool(grad.abs().sum() > 0)
            assert nonzero == (name in trained), (term, name)
    terms["loss"].backward()
    for conv in (head.rpn_cls, head.rpn_box, head.ps_cls, head.ps_box):
        assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0
    kk = head.k * head.k  # class-agnostic: the background deltas (groups 0..3) are not trained
    assert (head.ps_box.weight.grad[:4 * kk] == 0).all()
    assert (head.ps_box.weight.grad[4 * kk:].abs().sum((1, 2, 3)) > 0).all()


def test_ohem_keeps_the_hardest_rois():
    head = _head(spread=0.4)
    feat = torch.randn(1, 32, 8, 14, generator=torch.Generator().manual_seed(2))
    boxes, classes, ignore = (x[:1] for x in _batch())

    def rfcn_terms(ohem):
        terms = loss_fn(head(feat), boxes, classes, ignore, head, (128, 224),
                        torch.Generator().manual_seed(0), ohem=ohem)
        return (terms["rfcn_cls"] + terms["rfcn_box"]).item()

    assert rfcn_terms(True) > rfcn_terms(False)


def test_bad_inputs_are_refused_with_the_fix():
    head = _head()
    raw = head(torch.randn(2, 32, 8, 14))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="multiple of the stride"):
        loss_fn(raw, *_batch(), head, (120, 224), gen)
    boxes, classes, ignore = _batch()
    with pytest.raises(ValueError, match="one of each per image"):
        loss_fn(raw, boxes[:1], classes[:1], ignore[:1], head, (128, 224), gen)
    with pytest.raises(ValueError, match="segmentation label - 1"):
        loss_fn(raw, boxes, [np.array([0, 3, 1]), classes[1]], ignore, head, (128, 224), gen)
    with pytest.raises(ValueError, match="one class and one flag per box"):
        loss_fn(raw, boxes, [np.array([0, 2]), classes[1]], ignore, head, (128, 224), gen)


# ------------------------------------------------------------------------------- overfit

def test_a_head_trained_on_two_boxes_detects_them_through_rfcn_decode(one_thread):
    torch.manual_seed(0)
    head = RFCNHead(32, CLASSES)
    feat = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(1))
    gt = np.array([[12, 10, 44, 42], [54, 20, 90, 60]], np.float32)
    classes, ignore = np.array([1, 2]), np.zeros(2, bool)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        terms = loss_fn(head(feat), [gt], [classes], [ignore], head, IMAGE, gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < losses[0] / 5 and all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        boxes, scores, found, num = rfcn_decode(head(feat), head.anchors, 16)
    rows = int(num[0])
    iou = box_iou(boxes[0, :rows], torch.from_numpy(gt))
    for j, cls in enumerate(classes):
        hit = (iou[:, j] > 0.5) & (found[0, :rows] == int(cls)) & (scores[0, :rows] > 0.5)
        assert hit.any(), (j, boxes[0, :rows], scores[0, :rows], found[0, :rows])
