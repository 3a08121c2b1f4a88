"""Detection: CenterNet targets and loss on hand-made boxes, and AP with pycocotools."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from dff.data.synthetic import make_clip
from dff.models.detection import (
    decode,
    detection_loss,
    detection_targets,
    flip_boxes,
    focal_loss,
)
from dff.models.metrics import bootstrap_ap, clip_ground_truth, detection_ap

NO = np.zeros(0, bool)


def _targets(boxes, classes, ignore=None, size=(8, 14), stride=16, k=4):
    ignore = [False] * len(boxes) if ignore is None else ignore
    return detection_targets([np.array(boxes, np.float32)], [np.array(classes)],
                             [np.array(ignore)], k, size, stride)


def test_a_box_puts_a_unit_gaussian_peak_size_and_offset_at_its_centre_cell():
    t = _targets([[10, 20, 50, 44]], [2])  # centre (30, 32) px = (1.875, 2.0) cells
    assert t["heat"].shape == (1, 4, 8, 14) and t["size"].shape == (1, 2, 8, 14)
    heat = t["heat"][0, 2]
    assert heat[2, 1] == 1 and (t["heat"] == 1).sum() == 1 and t["heat"][0, [0, 1, 3]].max() == 0
    sx, sy = 2.5 / 6, 1.5 / 6  # sigma: a sixth of the size in cells, per axis
    assert heat[2, 2] == pytest.approx(np.exp(-1 / (2 * sx * sx)), rel=1e-5)
    assert heat[3, 1] == pytest.approx(np.exp(-1 / (2 * sy * sy)), rel=1e-5)
    assert t["centre"][0, 0].nonzero().tolist() == [[2, 1]]
    assert t["size"][0, :, 2, 1].tolist() == [2.5, 1.5]
    assert t["offset"][0, :, 2, 1].tolist() == [0.875, 0.0]
    assert t["size"].abs().sum() == 4 and t["weight"].min() == 1


def test_targets_on_the_stride_8_map_of_head_upsample_2():
    t = _targets([[10, 20, 50, 44]], [0], size=(16, 28), stride=8)
    assert t["centre"][0, 0].nonzero().tolist() == [[4, 3]]  # (30, 32) px = (3.75, 4.0) cells
    assert t["size"][0, :, 4, 3].tolist() == [5.0, 3.0]
    assert t["offset"][0, :, 4, 3].tolist() == [0.75, 0.0]


def test_an_ignore_region_gets_no_centre_and_masks_its_class_inside_its_box():
    t = _targets([[16, 16, 64, 40], [120, 60, 180, 110]], [1, 1], ignore=[True, False])
    assert t["centre"].sum() == 1 and t["centre"][0, 0, 5, 9] == 1
    weight = t["weight"][0]
    assert weight[1, 1:3, 1:4].eq(0).all() and weight[1].eq(0).sum() == 6  # cells 1..2 × 1..3
    assert weight[[0, 2, 3]].eq(1).all()  # other classes' losses are not masked
    assert t["heat"][0, 1, 1:3, 1:4].max() < 1e-3


def test_targets_and_decode_agree_on_boxes():
    boxes = np.array([[10, 20, 50, 44], [100, 30, 180, 100], [150, 60, 200, 120]], np.float32)
    t = detection_targets([boxes], [np.array([2, 0, 3])], [np.zeros(3, bool)], 4, (8, 14), 16)
    logits = torch.logit(t["heat"].clamp(1e-6, 1 - 1e-6))
    out, scores, classes, num = decode(logits, t["size"], t["offset"], stride=16)
    assert num.item() == 3 and scores[0, :3].min() > 0.999
    order = classes[0, :3].argsort()  # equal scores: rows come in TopK's order
    assert classes[0, order].tolist() == [0, 2, 3]
    np.testing.assert_allclose(out[0, order].numpy(), boxes[[1, 0, 2]], atol=1e-4)


def test_flip_boxes_mirrors_x_and_keeps_y():
    flipped = flip_boxes(np.array([[10, 20, 50, 44]], np.float32), 224)
    assert flipped.tolist() == [[174, 20, 214, 44]]


def test_focal_loss_is_low_for_the_target_and_ignores_masked_cells():
    t = _targets([[10, 20, 50, 44]], [2])
    good = torch.where(t["heat"] >= 1, 8.0, -8.0)
    bad = torch.zeros_like(good)
    assert focal_loss(good, t["heat"], t["weight"]) < 1e-2 < focal_loss(bad, t["heat"], t["weight"])
    # one positive: the loss there is -(1-p)^2 log p, normalised by one centre
    only_centre = torch.zeros_like(t["heat"])
    only_centre[0, 2, 2, 1] = 1
    logits = torch.full_like(good, -30.0)
    logits[0, 2, 2, 1] = 0.0  # p = 0.5
    assert focal_loss(logits, t["heat"], only_centre).item() == pytest.approx(0.25 * np.log(2))
    masked = _targets([[10, 20, 50, 44], [120, 60, 180, 110]], [2, 1], ignore=[False, True])
    hot = good.clone()
    hot[0, 1, 4:7, 7:12] = 8.0  # confident detections inside the ignore region
    assert focal_loss(hot, masked["heat"], masked["weight"]) == pytest.approx(
        focal_loss(good, masked["heat"], masked["weight"]).item())
    unmasked = torch.ones_like(masked["weight"])
    assert focal_loss(hot, masked["heat"], unmasked) > 10


def test_detection_loss_weights_size_and_offset_at_centres_only():
    t = _targets([[10, 20, 50, 44], [120, 60, 180, 110]], [2, 1])
    logits = torch.where(t["heat"] >= 1, 8.0, -8.0)
    size, offset = t["size"] + 1.0, t["offset"].clone()  # size off by 1 cell everywhere
    offset[:, 0] += 0.5  # x offset off by 0.5 everywhere
    terms = detection_loss((logits, size, offset), t, size_weight=0.1)
    assert terms["size"].item() == pytest.approx(2.0)  # |1| + |1| per object
    assert terms["offset"].item() == pytest.approx(0.5)
    assert terms["loss"].item() == pytest.approx(terms["heat"].item() + 0.2 + 0.5, rel=1e-5)


# ---------------------------------------------------------------- AP (pycocotools)

def _gt(boxes, classes, ignore=None):
    ignore = [False] * len(boxes) if ignore is None else ignore
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "classes": np.array(classes, int),
            "ignore": np.array(ignore, bool)}


def _det(boxes, scores, classes):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
            "classes": np.array(classes, int)}


NAMES = ["disc", "box"]
A, B = [10, 10, 60, 50], [100, 40, 150, 100]


def test_a_perfect_detector_scores_1():
    frames = [(_gt([A, B], [0, 1]), _det([A, B], [0.9, 0.8], [0, 1])),
              (_gt([B], [0]), _det([B], [0.7], [0]))]
    res = detection_ap(frames, NAMES)
    assert res["map50"] == res["map"] == 1.0
    assert res["per_class"] == {"disc": {"ap50": 1.0, "ap": 1.0}, "box": {"ap50": 1.0, "ap": 1.0}}
    assert res["frames"] == 2 and res["detections"] == 3


def test_a_missed_box_halves_recall():
    frames = [(_gt([A], [0]), _det([A], [0.9], [0])), (_gt([B], [0]), _det([], [], []))]
    res = detection_ap(frames, NAMES)
    # precision 1 up to recall 0.5, then nothing: 51 of COCO's 101 recall points
    assert res["map50"] == pytest.approx(51 / 101, abs=1e-5)
    assert res["per_class"]["box"] == {"ap50": None, "ap": None}  # no ground truth: not averaged


def test_a_box_at_iou_072_counts_at_05_and_for_half_the_thresholds():
    frames = [(_gt([[0, 0, 100, 100]], [1]), _det([[0, 0, 100, 72]], [0.9], [1]))]
    res = detection_ap(frames, NAMES)
    assert res["map50"] == 1.0 and res["map"] == pytest.approx(0.5)  # IoU 0.5..0.7 of 0.5..0.95


def test_a_detection_on_an_ignore_region_neither_helps_nor_hurts():
    hidden = [200, 10, 220, 30]
    base = (_gt([A], [0]), _det([A], [0.5], [0]))
    with_ignore = (_gt([A, hidden], [0, 0], [False, True]),
                   _det([A, hidden], [0.5, 0.9], [0, 0]))
    missed_ignore = (_gt([A, hidden], [0, 0], [False, True]), _det([A], [0.5], [0]))
    assert detection_ap([base], NAMES)["map50"] == 1.0
    assert detection_ap([with_ignore], NAMES)["map50"] == 1.0
    assert detection_ap([missed_ignore], NAMES)["map50"] == 1.0
    # without the ignore region the same detection is a false positive ranked first
    no_region = (_gt([A], [0]), _det([A, hidden], [0.5, 0.9], [0, 0]))
    assert detection_ap([no_region], NAMES)["map50"] == pytest.approx(0.5, abs=0.01)


def test_wrong_class_and_no_detections_score_zero():
    assert detection_ap([(_gt([A], [0]), _det([A], [0.9], [1]))], NAMES)["map50"] == 0.0
    assert detection_ap([(_gt([A], [0]), _det([], [], []))], NAMES)["map"] == 0.0


def test_clip_ground_truth_uses_detection_classes_and_the_ignore_flags():
    clip = make_clip(3, num_frames=4)
    gts = clip_ground_truth(clip)
    assert len(gts) == 4
    for t, gt in enumerate(gts):
        np.testing.assert_array_equal(gt["boxes"], clip.boxes[t])
        np.testing.assert_array_equal(gt["classes"], clip.box_classes[t] - 1)
        np.testing.assert_array_equal(gt["ignore"], clip.box_ignore[t])
    frames = [(gt, {"boxes": gt["boxes"], "scores": np.ones(len(gt["classes"])),
                    "classes": gt["classes"]}) for gt in gts]
    assert detection_ap(frames, ["disc", "box", "triangle", "cross"])["map"] == 1.0


def _clips_of_two_frames(found):
    """Four clips of two frames, object A in each; `found[c]` says whether clip c's second
    frame has its detection."""
    frames, groups = [], []
    for c, hit in enumerate(found):
        frames.append((_gt([A], [0]), _det([A], [0.9], [0])))
        frames.append((_gt([A], [0]), _det([A] if hit else [], [0.8] if hit else [],
                                           [0] if hit else [])))
        groups += [c, c]
    return frames, groups


def test_bootstrap_of_a_run_against_itself_is_zero_everywhere():
    frames, groups = _clips_of_two_frames([True, False, True, True])
    res = bootstrap_ap({"a": frames, "b": frames}, groups, [("a", "b")], NAMES, samples=20)
    assert res["a-b"]["map50"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_higher": 0.0}


def test_bootstrap_of_a_run_better_on_every_clip_is_higher_in_every_draw():
    better, groups = _clips_of_two_frames([True] * 4)
    worse, _ = _clips_of_two_frames([False] * 4)
    res = bootstrap_ap({"good": better, "bad": worse}, groups, [("good", "bad")], NAMES,
                       samples=30)["good-bad"]["map50"]
    full = detection_ap(better, NAMES)["map50"] - detection_ap(worse, NAMES)["map50"]
    assert res["diff"] == pytest.approx(full) and full > 0.4
    # every clip misses half its objects in `bad`, so every draw has the same difference
    assert res["low"] == pytest.approx(full) and res["high"] == pytest.approx(full)
    assert res["p_higher"] == 1.0


def test_bootstrap_draws_whole_clips_and_repeats_with_its_seed():
    a, groups = _clips_of_two_frames([True, True, False, False])
    b, _ = _clips_of_two_frames([False, False, True, True])
    runs, pairs = {"a": a, "b": b}, [("a", "b")]
    first = bootstrap_ap(runs, groups, pairs, NAMES, samples=40, seed=3)["a-b"]["map50"]
    assert first == bootstrap_ap(runs, groups, pairs, NAMES, samples=40, seed=3)["a-b"]["map50"]
    # a and b tie on all clips; a draw favours whichever drew more of its good clips
    assert first["diff"] == 0.0 and first["low"] < 0 < first["high"]
    assert 0 < first["p_higher"] < 1


def test_bootstrap_refuses_runs_of_other_lengths():
    frames, groups = _clips_of_two_frames([True, True])
    with pytest.raises(ValueError, match="run 'b': 2 frames, 4 groups"):
        bootstrap_ap({"a": frames, "b": frames[:2]}, groups, [("a", "b")], NAMES)


def test_metrics_import_without_torch():
    code = "import sys, dff.models.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
