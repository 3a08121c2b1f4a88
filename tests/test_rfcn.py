"""R-FCN (models/rfcn.py): the eager NMS against a slow reference and ONNX Runtime, the decode's
detection contract on random and hand-made maps, and task.onnx with standard ops only."""

import math

import numpy as np
import onnx
import pytest
import torch
from dff.engines import onnx_ops
from dff.export.modules import DFFModules, check_modules
from dff.models.rfcn import (
    BBOX_STDS,
    RFCNDetect,
    RFCNHead,
    custom_translation_table,
    nms_op,
    non_max_suppression,
    rfcn_decode,
)
from dff.plugins.onnx_op import DEFAULT_OPSET
from torch import nn

ort = pytest.importorskip("onnxruntime")

CLASSES = 3


def _reference_nms(boxes, scores, max_output, iou_threshold, score_threshold):
    """Greedy NMS the slow, obvious way, in float64: per batch and class, candidates above the
    threshold by descending score, each kept unless it overlaps a kept one by IoU > threshold."""
    def iou(a, b):
        ax0, ax1, bx0, bx1 = min(a[0], a[2]), max(a[0], a[2]), min(b[0], b[2]), max(b[0], b[2])
        ay0, ay1, by0, by1 = min(a[1], a[3]), max(a[1], a[3]), min(b[1], b[3]), max(b[1], b[3])
        iw, ih = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
        area_a, area_b = (ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)
        if iw <= 0 or ih <= 0 or area_a <= 0 or area_b <= 0:
            return 0.0
        return iw * ih / (area_a + area_b - iw * ih)

    out = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            order = sorted((i for i in range(scores.shape[2]) if scores[b, c, i] > score_threshold),
                           key=lambda i: (-scores[b, c, i], i))
            kept = []
            for i in order:
                if len(kept) < max_output and all(
                        iou(boxes[b, i], boxes[b, j]) <= iou_threshold for j in kept):
                    kept.append(i)
            out += [(b, c, i) for i in kept]
    return out


def _random_boxes(gen, b, n, swap=True):
    xy = torch.rand(b, n, 2, generator=gen) * 60
    wh = torch.rand(b, n, 2, generator=gen) * 30 + 1
    boxes = torch.cat((xy, xy + wh), 2)
    if swap:  # ONNX takes either corner order; flip some boxes' corners
        flip = torch.rand(b, n, 1, generator=gen) < 0.3
        boxes = torch.where(flip, boxes[..., [2, 3, 0, 1]], boxes)
    return boxes


@pytest.mark.parametrize("max_output", [4, 1000])
def test_nms_equals_a_brute_force_greedy_reference_on_random_boxes(max_output):
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(gen, 2, 80)
    scores = torch.rand(2, 3, 80, generator=gen)
    got = non_max_suppression(boxes, scores, max_output, 0.4, 0.2).tolist()
    want = _reference_nms(boxes.double().numpy(), scores.double().numpy(), max_output, 0.4, 0.2)
    assert [tuple(r) for r in got] == want
    assert len(want) > 2 * 3 * (min(max_output, 4) - 1)  # not a trivial case


def test_nms_by_hand_iou_above_threshold_suppresses_and_empty_boxes_never_do():
    boxes = torch.tensor([[[0, 0, 10, 10],    # 0: kept
                           [1, 1, 11, 11],    # 1: IoU 81/119 with 0, suppressed
                           [20, 20, 30, 30],  # 2: kept
                           [0, 0, 10, 10],    # 3: under the score threshold
                           [5, 5, 5, 9],      # 4: no area: kept, suppresses nothing
                           [20, 20, 30, 40]]], dtype=torch.float32)  # 5: IoU exactly 0.5 with 2
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.1, 0.95, 0.6],
                            [0.1, 0.8, 0.1, 0.1, 0.1, 0.1]]])
    got = non_max_suppression(boxes, scores, 10, 0.5, 0.2).tolist()
    assert got == [[0, 0, 4], [0, 0, 0], [0, 0, 2], [0, 0, 5], [0, 1, 1]]
    assert non_max_suppression(boxes, scores, 2, 0.5, 0.2).tolist() == [[0, 0, 4], [0, 0, 0],
                                                                         [0, 1, 1]]
    assert non_max_suppression(boxes, scores, 0, 0.5, 0.2).shape == (0, 3)
    assert non_max_suppression(boxes, scores, 10, 0.4, 0.2).tolist()[3] == [0, 1, 1]  # 5 gone


def test_nms_op_exports_to_one_nonmaxsuppression_that_onnx_runtime_agrees_with(tmp_path):
    op = nms_op()

    class NMS(nn.Module):
        def forward(self, boxes, scores):
            return op(boxes, scores, 5, 0.45, 0.3)

    gen = torch.Generator().manual_seed(2)
    n = torch.export.Dim("N")
    program = torch.onnx.export(
        NMS().eval(), (_random_boxes(gen, 2, 30), torch.rand(2, 2, 30, generator=gen)), dynamo=True,
        opset_version=DEFAULT_OPSET, input_names=["boxes", "scores"], output_names=["selected"],
        dynamic_shapes={"boxes": {0: n, 1: torch.export.Dim("B")}, "scores": {0: n, 2: "B"}},
        custom_translation_table=custom_translation_table(), verbose=False)
    assert [node.op_type for node in program.model_proto.graph.node
            if node.op_type not in ("Constant",)] == ["NonMaxSuppression"]
    path = tmp_path / "nms.onnx"
    onnx.save(program.model_proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, count in ((1, 40), (3, 200)):
        boxes, scores = _random_boxes(gen, b, count), torch.rand(b, 2, count, generator=gen)
        got = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
        assert got.tolist() == op(boxes, scores, 5, 0.45, 0.3).tolist()


# ---------------------------------------------------------------------------------- decode

def _detector(channels=16, seed=0, **options):
    torch.manual_seed(seed)
    head = RFCNHead(channels, CLASSES)
    for conv in head.modules():  # spread the scores, so that TopK and NMS have work to do
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.4)
            nn.init.normal_(conv.bias, std=0.2)
    return RFCNDetect(head, **options).eval()


def _check_contract(out, n, k, threshold, size):
    boxes, scores, classes, num = out
    assert boxes.shape == (n, k, 4) and scores.shape == (n, k) and classes.shape == (n, k)
    assert num.shape == (n,)
    assert (boxes.dtype, scores.dtype, classes.dtype, num.dtype) == (
        torch.float32, torch.float32, torch.int32, torch.int32)
    assert torch.equal(num, (scores > threshold).sum(1, dtype=torch.int32))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    rows = torch.arange(k).unsqueeze(0) < num.unsqueeze(1)
    assert (boxes[~rows] == 0).all() and (scores[~rows] == 0).all() and (classes[~rows] == -1).all()
    assert ((classes[rows] >= 0) & (classes[rows] < CLASSES)).all()
    used = boxes[rows]
    assert (used[:, 0] <= used[:, 2]).all() and (used[:, 1] <= used[:, 3]).all()
    assert used.min() >= 0 and (used[:, 2] <= size[1]).all() and (used[:, 3] <= size[0]).all()


@torch.no_grad()
def test_decode_meets_the_detection_contract_and_a_batch_decodes_as_its_frames():
    det = _detector(score_threshold=0.3, max_detections=50)
    feat = torch.randn(2, 16, 8, 14, generator=torch.Generator().manual_seed(3))
    both = det(feat)
    _check_contract(both, 2, 50, 0.3, (128, 224))
    assert 0 < both[3].min() and both[3].max() < 50  # some rows used, some padding
    for i in range(2):
        alone = det(feat[i:i + 1])
        _check_contract(alone, 1, 50, 0.3, (128, 224))
        assert torch.equal(alone[2][0], both[2][i]) and torch.equal(alone[3][0], both[3][i])
        for a, b in zip(alone[:2], both[:2]):  # a batched conv rounds differently
            torch.testing.assert_close(a[0], b[i], atol=1e-4, rtol=0)


@torch.no_grad()
def test_decode_on_a_map_with_fewer_candidates_than_pre_nms_and_proposals():
    det = _detector(proposals=300, pre_nms=3000)
    _check_contract(det(torch.randn(1, 16, 2, 3)), 1, 100, 0.05, (32, 48))  # 54 anchors


def _hand_made_raw():
    """Two frames of raw maps (8×14 cells, 9 anchors, 3 classes) with two clear objects: the
    32-px square anchor at cell (3, 4), shifted right by a quarter of its width, and the 32-px
    tall (ratio 2) anchor at cell (5, 10). Frame 0: class 2 on the first (logit 6), class 1 on
    the second (4); frame 1: class 3 (3.5) and class 1 (5). Box maps: the same deltas
    everywhere."""
    h, w, a, kk = 8, 14, 9, 9
    rpn_cls = torch.full((2, a, h, w), -10.0)
    rpn_cls[:, 4, 3, 4], rpn_cls[:, 7, 5, 10] = 10.0, 8.0  # anchor 4: ratio 1, scale 2
    rpn_box = torch.zeros(2, a, 4, h, w)
    rpn_box[:, 4, 0, 3, 4] = 0.25
    ps_cls = torch.zeros(2, CLASSES + 1, kk, h, w)
    ps_cls[0, 2, :, 1:6, 2:8], ps_cls[0, 1, :, 3:8, 8:13] = 6.0, 4.0
    ps_cls[1, 3, :, 1:6, 2:8], ps_cls[1, 1, :, 3:8, 8:13] = 3.5, 5.0
    ps_box = torch.zeros(2, 8, kk, h, w)
    ps_box[:, 4:] = torch.tensor([1.0, -1.0, 0.0, 0.5]).view(1, 4, 1, 1, 1)
    return (rpn_cls, rpn_box.reshape(2, 4 * a, h, w), ps_cls.reshape(2, -1, h, w),
            ps_box.reshape(2, -1, h, w))


def _regressed(x0, y0, x1, y1):
    """A RoI moved by the hand-made box maps' deltas (1, -1, 0, 0.5) times BBOX_STDS."""
    dx, dy, dw, dh = (d * s for d, s in zip((1.0, -1.0, 0.0, 0.5), BBOX_STDS))
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2 + dx * w, (y0 + y1) / 2 + dy * h
    w, h = w * math.exp(dw), h * math.exp(dh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_a_hand_made_object_per_anchor_comes_out_with_its_box_class_and_score():
    head = RFCNHead(16, CLASSES)
    boxes, scores, classes, num = rfcn_decode(_hand_made_raw(), head.anchors, 16, proposals=2)
    first = _regressed(56 + 8, 40, 88 + 8, 72)  # centre (72, 56), 32 × 32, dx 0.25
    tall_w, tall_h = 32 / math.sqrt(2), 32 * math.sqrt(2)
    second = _regressed(168 - tall_w / 2, 88 - tall_h / 2, 168 + tall_w / 2, 88 + tall_h / 2)

    def prob(logit):
        return math.exp(logit) / (math.exp(logit) + CLASSES)  # the other three logits are 0

    assert num.tolist() == [2, 2]
    assert classes[:, :2].tolist() == [[1, 0], [0, 2]]  # 0-based: class 2 → 1, class 1 → 0 ...
    np.testing.assert_allclose(scores[:, :2], [[prob(6), prob(4)], [prob(5), prob(3.5)]],
                               rtol=1e-5)
    np.testing.assert_allclose(boxes[0, :2], [first, second], atol=1e-3)
    np.testing.assert_allclose(boxes[1, :2], [second, first], atol=1e-3)
    assert (classes[:, 2:] == -1).all() and (boxes[:, 2:] == 0).all()


def test_proposals_rank_by_objectness_logits_where_sigmoids_saturate():
    """A trained RPN's logits of 20 and 40 both have a float32 sigmoid of exactly 1.0: ranked
    by sigmoid they would tie, and TopK and NMS would order them as each runtime likes (an
    export of a trained model failed parity so). Ranked by logit, R = 1 keeps the 40."""
    rpn_cls, rpn_box, ps_cls, ps_box = _hand_made_raw()
    rpn_cls[:, 4, 3, 4], rpn_cls[:, 7, 5, 10] = 20.0, 40.0
    assert torch.sigmoid(torch.tensor([20.0, 40.0])).tolist() == [1.0, 1.0]
    head = RFCNHead(16, CLASSES)
    boxes, _, classes, num = rfcn_decode((rpn_cls, rpn_box, ps_cls, ps_box), head.anchors, 16,
                                         proposals=1)
    tall_w, tall_h = 32 / math.sqrt(2), 32 * math.sqrt(2)
    second = _regressed(168 - tall_w / 2, 88 - tall_h / 2, 168 + tall_w / 2, 88 + tall_h / 2)
    assert num.tolist() == [1, 1] and classes[:, 0].tolist() == [0, 0]
    np.testing.assert_allclose(boxes[:, 0], [second, second], atol=1e-3)


def test_options_out_of_range_and_an_odd_width_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="even number of feature channels"):
        RFCNHead(15, CLASSES)
    with pytest.raises(ValueError, match="TensorRT's TopK"):
        RFCNDetect(RFCNHead(16, CLASSES), pre_nms=5000)
    with pytest.raises(ValueError, match="proposals must be in 1..pre_nms"):
        RFCNDetect(RFCNHead(16, CLASSES), pre_nms=100, proposals=300)


# ---------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    det = _detector(score_threshold=0.3)
    dims = {0: torch.export.Dim("N"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    with torch.no_grad():
        program = torch.onnx.export(
            det, (torch.randn(2, 16, 5, 7),), dynamo=True, opset_version=18,
            input_names=["feat"], output_names=["boxes", "scores", "classes", "num"],
            dynamic_shapes={"feat": dims}, custom_translation_table=custom_translation_table(),
            verbose=False)
    path = tmp_path_factory.mktemp("rfcn") / "task.onnx"
    onnx.save(program.model_proto, path)
    return det, onnx.load(path), path


def test_task_onnx_has_standard_ops_only_and_tensorrt_sized_topks(exported):
    _, model, _ = exported
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert {"NonMaxSuppression", "TopK", "GridSample", "ScatterND"} <= ops
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert not model.functions
    assert onnx_ops.topk_ks(model) and all(0 < k <= 3840 for k in onnx_ops.topk_ks(model))
    assert onnx_ops.problems(model) == []  # all on TensorRT's ONNX parser list
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)]
    assert dims[0][1] == 16 and all(isinstance(d, str) for d in (dims[0][0], *dims[0][2:]))
    assert [d[1:] for d in dims[1:]] == [[100, 4], [100], [100], []]


@pytest.mark.parametrize("n,h,w", [(1, 4, 6), (2, 8, 14), (2, 4, 6)])
def test_onnx_runtime_matches_pytorch(exported, n, h, w):
    det, _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feat = torch.randn(n, 16, h, w, generator=torch.Generator().manual_seed(10 * h + n))
    with torch.no_grad():
        want = det(feat)
    got = session.run(None, {"feat": feat.numpy()})
    assert got[3].tolist() == want[3].tolist() and 0 < got[3].min()
    assert got[2].tolist() == want[2].tolist()
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)


def test_check_modules_takes_rfcn_as_a_detection_task():
    class Flow(nn.Module):
        def forward(self, image, key):
            n, _, height, width = image.shape
            return torch.zeros(n, 2, height // 16, width // 16), None

    mods = DFFModules(feature=nn.Conv2d(3, 32, 16, 16), flow=Flow(),
                      task=RFCNDetect(RFCNHead(32, CLASSES)), class_names=["a", "b", "c"],
                      input_size=(64, 96), kind="detection", max_detections=100)
    facts = check_modules(mods)
    assert facts.feat_channels == 32 and not facts.scale_field


def test_dff_export_exports_rfcn_with_its_parity_checked(tmp_path):
    """export_modules (dff-export's path): the NMS op goes through the exporter's table, and
    task.onnx passes the detection parity of every other export."""
    from dff.export import export_modules

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 2, 16, 16)

        def forward(self, image, key):
            return 0.1 * self.conv(torch.cat((image, key), 1)), None

    torch.manual_seed(0)
    result = export_modules(tmp_path / "engines", feature=nn.Conv2d(3, 32, 16, 16), flow=Flow(),
                            task=RFCNDetect(RFCNHead(32, CLASSES)), kind="detection",
                            class_names=["a", "b", "c"], input_size=(64, 96),
                            min_shape=(1, 64, 96), opt_shape=(1, 64, 96), max_shape=(2, 64, 96))
    assert all(r.passed for r in result.rows)
    graph = onnx.load(tmp_path / "engines" / "task.onnx")
    assert "NonMaxSuppression" in {n.op_type for n in graph.graph.node}
