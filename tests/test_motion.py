"""Issue 13's parts: the motion-stratified split, the key-frame budget, the learned schedule
and its quality head, and dff-eval --split motion on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dff.data.motion import (
    CATEGORIES,
    FAST_FROM_PX,
    MOTION_SEEDS,
    SLOW_BELOW_PX,
    TUNING_SEEDS,
    JoinedClip,
    category_of,
    mean_flow_px,
    motion_split,
)
from dff.data.synthetic import EVAL_SEEDS, make_clip, train_seeds
from dff.models.config import PRESETS
from dff.models.dff import DFF
from dff.models.flownet import QualityHead, outside_distance
from dff.models.quality import relative_error
from dff.runtime.scheduler import KeyBudget, Learned, make_scheduler

from dff.errors import DffError

H, W = 64, 96


@pytest.fixture(scope="module")
def split():
    return list(motion_split("eval", clips=1, frames=30, height=H, width=W))


def test_motion_split_has_each_category_with_its_motion(split):
    assert [m.category for m in split] == list(CATEGORIES)
    by = {m.category: m for m in split}
    for name in ("slow", "medium", "fast"):
        assert category_of(by[name].mean_flow_px) == name
        assert by[name].mean_flow_px == pytest.approx(mean_flow_px(by[name].clip))
    assert by["slow"].mean_flow_px < SLOW_BELOW_PX <= by["medium"].mean_flow_px < FAST_FROM_PX
    assert by["fast"].mean_flow_px >= FAST_FROM_PX
    for m in split:
        assert m.clip.frames.shape == (30, H, W, 3) and len(m.clip.boxes) == 30


def test_a_cut_joins_two_scenes_and_has_no_flow_across_it(split):
    m = next(m for m in split if m.category == "cuts")
    clip, (cut,) = m.clip, m.cuts
    assert isinstance(clip, JoinedClip) and 0 < cut < 30
    assert np.array_equal(clip.frames[:cut], clip.first.frames[:cut])
    assert np.array_equal(clip.frames[cut:], clip.second.frames[cut:])
    with pytest.raises(ValueError, match="scene cut"):
        clip.flow(cut, cut - 1)
    flow, valid = clip.flow(cut + 1, cut)
    assert flow.shape == (2, H, W) and valid.any()


def test_a_burst_moves_faster_than_the_rest_of_its_clip(split):
    m = next(m for m in split if m.category == "bursts")
    assert m.bursts
    inside = {t for s, e in m.bursts for t in range(s + 1, e)}

    def motion(t):
        flow, valid = m.clip.flow(t, t - 1)
        return float(np.hypot(*flow)[valid].mean())

    fast = np.mean([motion(t) for t in sorted(inside)])
    calm = np.mean([motion(t) for t in range(1, 30) if t not in inside
                    and all(abs(t - s) > 1 and abs(t - e) > 1 for s, e in m.bursts)])
    assert fast > 4 * calm


def test_the_split_is_deterministic_and_its_seeds_are_apart():
    a = next(motion_split("tuning", categories=("medium",), clips=1, frames=12, height=H, width=W))
    b = next(motion_split("tuning", categories=("medium",), clips=1, frames=12, height=H, width=W))
    assert a.seed == b.seed >= TUNING_SEEDS and np.array_equal(a.clip.frames, b.clip.frames)
    assert MOTION_SEEDS > EVAL_SEEDS[-1] and TUNING_SEEDS > MOTION_SEEDS + 10_000 * len(CATEGORIES)
    with pytest.raises(ValueError):
        train_seeds(1, MOTION_SEEDS)
    with pytest.raises(ValueError, match="category"):
        next(motion_split("eval", categories=("sideways",)))


def test_make_clip_times_default_to_frame_numbers():
    t = np.arange(5, dtype=np.float64)
    assert np.array_equal(make_clip(3, 5, H, W).frames, make_clip(3, 5, H, W, t).frames)
    with pytest.raises(ValueError, match="times"):
        make_clip(3, 5, H, W, t[:4])


# --- the budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("scores", ["always", "never", "random"])
def test_a_key_budget_never_spends_more_than_its_fraction(scores):
    rng = np.random.default_rng(0)
    for frames in (1, 9, 10, 11, 60, 137):
        s = make_scheduler("learned", key_budget=0.1)
        keys = 0
        for t in range(frames):
            key = s.decide(t, None)
            if not key:
                q = {"always": 9.0, "never": 0.0, "random": rng.exponential(0.3)}[scores]
                key = not s.accept(np.zeros((2, 2, 2)), np.array([[q]]))
            keys += key
        assert keys <= 1 + 0.1 * (frames - 1) + 1e-9
        assert s.stats()["key_frames"] == keys
        if scores == "always":  # every frame wants one: as many as fixed k=10
            assert keys == len(range(0, frames, 10))


def test_the_budget_moves_its_threshold_and_saves_credit_in_quiet_stretches():
    b = KeyBudget(0.1, threshold=1.0, reserve=2.0, rate=0.3)
    assert b.tick(0) is False and not b.can_spend()
    b.spend(first=True)  # a video's first frame: free
    assert b.threshold == 1.0 and b.bank == 0
    for t in range(1, 10):
        b.tick(t)
    assert not b.can_spend()  # credit comes in whole key frames: the first at t = 10
    b.tick(10)
    assert b.can_spend() and b.threshold == pytest.approx(np.exp(-0.3))
    b.spend()
    assert b.threshold == pytest.approx(1.0)
    full = [b.tick(t) for t in range(11, 31)]
    assert full[-1] is True and b.bank == 2  # the reserve caps it
    b.restart()  # a budget of its own starts over with a new video
    assert b.bank == 0 and b.threshold == 1.0
    with pytest.raises(DffError, match="key-budget"):
        KeyBudget(0)


def test_one_budget_shared_by_streams_pays_a_busy_stream_from_a_still_ones_share():
    shared = KeyBudget(0.1, threshold=0.2, streams=2)
    busy, still = Learned(shared), Learned(shared)
    busy.reset()
    still.reset()  # a shared budget goes on through a stream's reset
    frames, keys = 60, {"busy": 0, "still": 0}
    for t in range(frames):
        for name, s, q in (("busy", busy, 9.0), ("still", still, 0.0)):
            key = s.decide(t, None) or not s.accept(np.zeros((2, 2, 2)), np.array([[q]]))
            keys[name] += key
    own_share = 1 + 0.1 * (frames - 1)
    assert keys["busy"] + keys["still"] <= 2 * own_share + 1e-9
    assert keys["busy"] > own_share  # more than a budget of its own would have allowed
    assert "streams=2" in repr(shared)


def test_learned_schedule_needs_quality_and_a_budget_needs_a_content_schedule():
    s = Learned(KeyBudget(0.5, threshold=0.2))
    assert s.decide(0) is True and s.decide(1) is False
    with pytest.raises(DffError, match="quality"):
        s.accept(np.zeros((2, 2, 2)))
    s.decide(2)
    assert s.accept(np.zeros((2, 2, 2)), np.array([[0.9]])) is False  # redone as a key frame
    assert s.stats()["reasons"]["quality"] == 1
    with pytest.raises(DffError, match="key-budget"):
        make_scheduler("fixed", 10, key_budget=0.1)
    a = make_scheduler("adaptive", 10, key_budget=0.2, threshold=0.5)
    assert a.budget.budget == 0.2 and a.budget.initial == 0.5


# --- the quality head ------------------------------------------------------------------------

def test_outside_distance_measures_cells_sampled_beyond_the_map():
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 0, 0, 0] = -2.0  # x = -2: 1.5 cells left of the map's edge at -0.5
    flow[0, 1, 2, 3] = 1.0   # y = 3 on a 3-row map: 0.5 below its edge at 2.5
    d = outside_distance(flow)[0, 0]
    assert d[0, 0] == pytest.approx(1.5) and d[2, 3] == pytest.approx(0.5)
    assert float(d.sum()) == pytest.approx(2.0)


def test_relative_error_is_zero_for_exact_features_and_one_for_zeros():
    true = torch.randn(2, 8, 3, 5)
    assert float(relative_error(true, true)[1].abs().max()) == 0
    assert relative_error(torch.zeros_like(true), true)[1].numpy() == pytest.approx([1, 1])


def test_a_model_with_a_quality_head_predicts_one_value_per_frame():
    cfg = PRESETS["tiny"]
    cfg = type(cfg).from_dict({**cfg.to_dict(), "quality_channels": 4})
    model = DFF(cfg).eval()
    assert isinstance(model.quality_head, QualityHead)
    images = torch.rand(3, 3, 64, 96) * 255
    flow, scale, quality = model.flow_quality(images, images.flip(0))
    ref_flow, ref_scale = model.flow(images, images.flip(0))
    assert torch.equal(flow, ref_flow) and torch.equal(scale, ref_scale)
    assert quality.shape == (3, 1) and bool((quality >= 0).all())
    with pytest.raises(ValueError, match="no quality head"):
        DFF(PRESETS["tiny"]).flow_quality(images, images)


# --- dff-eval --split motion -----------------------------------------------------------------

def test_motion_eval_reports_every_category_and_schedule(tmp_path):
    from dff.models.motion_eval import evaluate_motion, format_motion

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = DFF(type(cfg).from_dict({**cfg.to_dict(), "quality_channels": 4})).eval()
    res = evaluate_motion(model, 0.1, (5, 10), clips=1,
                          thresholds={"stream": {"adaptive": 1.0, "learned": 0.2},
                                      "pooled": {"adaptive": 1.0, "learned": 0.2}},
                          progress=False)
    assert set(res["categories"]) == set(CATEGORIES)
    assert set(res["categories"]["fast"]) >= {"per_frame", "dff", "copy", "mean_flow_px"}
    assert set(res["categories"]["cuts"]["dff"]) == {"5", "10"}
    assert set(res["schedules"]) == {"fixed", "adaptive", "learned"}
    frames = res["frames"]
    assert frames == 5 * 60
    for name, r in res["schedules"].items():
        assert 0 <= r["miou"] <= 1 and set(r["by_category"]) == set(CATEGORIES)
        assert r["key_fraction"] <= 0.1 + 1e-9, name  # each clip: at most 6 of 60
    assert res["schedules"]["fixed"]["key_fraction"] == pytest.approx(0.1)
    assert set(res["schedules_pooled"]) == {"fixed", "adaptive", "learned"}
    for name, r in res["schedules_pooled"].items():  # shared: the total within the budget
        assert r["key_fraction"] <= 0.1 + 1e-9, name
    assert res["categories"]["slow"]["dff"]["10"]["key_fraction"] == pytest.approx(0.1)
    json.dumps(res)
    text = format_motion(res)
    assert "a budget per stream" in text and "one budget shared by all the clips" in text
