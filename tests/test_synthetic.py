"""The synthetic benchmark: deterministic clips, consistent annotations, exact flow."""

import itertools

import cv2
import numpy as np
import pytest
from dff.data import synthetic
from dff.data.synthetic import (
    CLASS_NAMES,
    EVAL_FRAMES,
    EVAL_SEEDS,
    IGNORE_MIN_PIXELS,
    IGNORE_MIN_VISIBLE,
    Clip,
    eval_split,
    is_ignore,
    make_clip,
    train_seeds,
)

H, W = 128, 224


@pytest.fixture(scope="module")
def clips() -> dict[int, Clip]:
    return {seed: make_clip(seed, num_frames=24) for seed in (0, 3, EVAL_SEEDS[1])}


def _warp_error(clip: Clip, current: int, key: int, flow: np.ndarray, valid: np.ndarray):
    """Per-pixel |current - key warped along flow| on valid pixels, gains undone."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    key_img = clip.frames[key].astype(np.float32) / np.float32(clip.gains[key])
    cur_img = clip.frames[current].astype(np.float32) / np.float32(clip.gains[current])
    warped = cv2.remap(key_img, xs + flow[0], ys + flow[1], cv2.INTER_LINEAR)
    return np.abs(warped - cur_img)[valid]


def test_same_seed_gives_identical_clip_and_other_seeds_differ():
    a, b, c = make_clip(7, num_frames=8), make_clip(7, num_frames=8), make_clip(8, num_frames=8)
    for name in ("frames", "labels", "instances", "gains"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for box_a, box_b in zip(a.boxes, b.boxes):
        np.testing.assert_array_equal(box_a, box_b)
    np.testing.assert_array_equal(a.flow(1, 6)[0], b.flow(1, 6)[0])
    assert not np.array_equal(a.frames, c.frames)


def test_shorter_clip_is_a_prefix_of_longer_one():
    short, long = make_clip(5, num_frames=4), make_clip(5, num_frames=10)
    np.testing.assert_array_equal(short.frames, long.frames[:4])
    np.testing.assert_array_equal(short.flow(0, 3)[0], long.flow(0, 3)[0])


def test_fields_have_documented_shapes_dtypes_and_ranges(clips):
    clip = clips[0]
    t = 24
    assert clip.frames.shape == (t, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.labels.shape == (t, H, W) and clip.labels.dtype == np.uint8
    assert clip.instances.shape == (t, H, W) and clip.instances.dtype == np.int16
    assert clip.gains.shape == (t,) and clip.gains.dtype == np.float64
    assert len(clip.boxes) == len(clip.box_classes) == t
    assert all(b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4 for b in clip.boxes)
    assert all(c.dtype == np.int64 and c.shape == (len(b),)
               for b, c in zip(clip.boxes, clip.box_classes))
    assert len(clip.box_pixels) == len(clip.box_visible) == len(clip.box_ignore) == t
    for b, p, v, i in zip(clip.boxes, clip.box_pixels, clip.box_visible, clip.box_ignore):
        assert p.dtype == np.int64 and v.dtype == np.float32 and i.dtype == bool
        assert p.shape == v.shape == i.shape == (len(b),)
    assert clip.labels.max() < len(CLASS_NAMES) == 5
    assert np.all((clip.gains > 0.84) & (clip.gains < 1.16))
    flow, valid = clip.flow(3, 0)
    assert flow.shape == (2, H, W) and flow.dtype == np.float32
    assert valid.shape == (H, W) and valid.dtype == bool
    small = make_clip(1, num_frames=2, height=64, width=96)
    assert small.frames.shape == (2, 64, 96, 3) and small.flow(0, 1)[0].shape == (2, 64, 96)


def test_labels_are_the_class_of_the_visible_instance(clips):
    for clip in clips.values():
        for t in range(0, 24, 5):
            inst, lab = clip.instances[t], clip.labels[t]
            assert np.all(lab[inst == 0] == 0)
            for i in np.unique(inst[inst > 0]):
                classes = np.unique(lab[inst == i])
                assert len(classes) == 1 and classes[0] >= 1


def test_boxes_are_the_tight_extent_of_each_visible_instance(clips):
    for clip in clips.values():
        for t in range(24):
            inst, boxes = clip.instances[t], clip.boxes[t]
            ids = np.unique(inst[inst > 0])
            assert len(ids) == len(boxes)
            assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= W)
            assert np.all(boxes[:, 3] <= H) and np.all(boxes[:, 2:] > boxes[:, :2])
            for box, cls, i in zip(boxes, clip.box_classes[t], ids):  # in depth order
                rows, cols = np.nonzero(inst == i)
                expected = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                np.testing.assert_array_equal(box, expected)
                assert cls == clip.labels[t][rows[0], cols[0]]


def test_every_class_appears_in_eval_split():
    seen: set[int] = set()
    for seed in EVAL_SEEDS:
        seen |= set(np.unique(make_clip(seed, num_frames=3).labels).tolist())
        if len(seen) == len(CLASS_NAMES):
            break
    assert seen == set(range(len(CLASS_NAMES)))


PAIRS = [(c, c + k) for c, k in itertools.product((2, 12), (1, 5, 9))]
PAIRS += [(key, cur) for cur, key in PAIRS]


@pytest.mark.parametrize("current, key", PAIRS)
def test_warping_key_along_true_flow_reproduces_current(clips, current, key):
    for clip in clips.values():
        flow, valid = clip.flow(current, key)
        assert valid.mean() > 0.5
        err = _warp_error(clip, current, key, flow, valid)
        # Exact flow leaves uint8 rounding plus bilinear interpolation of a smooth texture.
        assert err.mean() < 0.6 and np.percentile(err, 99) < 2.0
        for wrong in (flow + np.array([1, 0], np.float32)[:, None, None],
                      flow + np.array([0, 1], np.float32)[:, None, None],
                      flow - 1.0):
            wrong_err = _warp_error(clip, current, key, wrong, valid)
            assert wrong_err.mean() > max(1.0, 3 * err.mean())


def test_zero_flow_is_much_worse_than_true_flow(clips):
    clip = clips[0]
    flow, valid = clip.flow(10, 19)
    err = _warp_error(clip, 10, 19, flow, valid).mean()
    assert _warp_error(clip, 10, 19, np.zeros_like(flow), valid).mean() > 4 * err


def test_flow_to_same_frame_is_zero_and_valid_away_from_edges(clips):
    clip = clips[3]
    flow, valid = clip.flow(4, 4)
    inst = clip.instances[4]
    assert np.abs(flow).max() < 1e-3
    edges = np.zeros_like(valid)
    edges[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edges[1:] |= inst[1:] != inst[:-1]
    assert edges.any() and not valid[edges].any()
    far = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 5) >= 3
    # an object edge just outside the frame is invisible to `edges` but still counts
    far[:3], far[-3:], far[:, :3], far[:, -3:] = False, False, False, False
    assert far.mean() > 0.5 and valid[far].all()


def test_valid_pixels_land_on_the_same_layer_in_key(clips):
    ys, xs = np.mgrid[0:H, 0:W]
    occluded_total = disoccluded_total = 0
    for clip in clips.values():
        for current, key in PAIRS:
            flow, valid = clip.flow(current, key)
            qx = np.rint(xs + flow[0]).clip(0, W - 1).astype(int)
            qy = np.rint(ys + flow[1]).clip(0, H - 1).astype(int)
            inside = (xs + flow[0] >= 0) & (xs + flow[0] <= W - 1)
            inside &= (ys + flow[1] >= 0) & (ys + flow[1] <= H - 1)
            cur_layer = clip.instances[current]
            key_layer = clip.instances[key][qy, qx]
            assert np.all(cur_layer[valid] == key_layer[valid])
            assert not valid[~inside].any()
            # Background covered by an object in key, and objects covered by other objects.
            occluded = (cur_layer == 0) & (key_layer > 0) & inside
            occluded_total += occluded.sum()
            assert not valid[occluded].any()
            hidden = (cur_layer > 0) & (key_layer != cur_layer) & inside
            disoccluded_total += hidden.sum()
            assert not valid[hidden].any()
    assert occluded_total > 100 and disoccluded_total > 100


def test_motion_is_under_a_couple_of_pixels_per_frame(clips):
    moving, everything = [], []
    for clip in clips.values():
        for t in (0, 10, 20):
            mag = np.hypot(*clip.flow(t, t + 1)[0])
            moving.append(mag[clip.instances[t] > 0])
            everything.append(mag.max())
    # the regime DFF is built for: over a 10-frame key interval objects move a fraction of
    # their size (about 0.5 px/frame for objects 48-96 px across)
    assert 0.2 < np.median(np.concatenate(moving)) < 1.5
    assert max(everything) < 4.0


def test_eval_split_is_fixed_and_disjoint_from_training_seeds(monkeypatch):
    assert len(EVAL_SEEDS) == len(set(EVAL_SEEDS)) == 20 and EVAL_FRAMES == 60
    assert not set(EVAL_SEEDS) & set(train_seeds(1000))
    assert train_seeds(3, start=10) == [10, 11, 12]
    with pytest.raises(ValueError):
        train_seeds(5, start=EVAL_SEEDS[0] - 2)
    first = next(eval_split())
    assert first.frames.shape == (EVAL_FRAMES, H, W, 3)
    np.testing.assert_array_equal(first.frames[:3], make_clip(EVAL_SEEDS[0], 3).frames)
    calls = []
    monkeypatch.setattr(synthetic, "make_clip", lambda *args: calls.append(args) or args)
    assert len(list(eval_split())) == 20
    assert calls == [(seed, EVAL_FRAMES, H, W) for seed in EVAL_SEEDS]


def _scene(*objects: tuple[int, tuple[float, ...], float, float]) -> Clip:
    """One frame of hand-placed axis-aligned boxes (class 2, half sizes, x, y), back to front."""
    rng = np.random.default_rng(0)
    shapes = tuple(synthetic._Shape(cls, params, float(np.hypot(*params[:2])))
                   for cls, params, _, _ in objects)
    textures = [synthetic._make_texture(rng, 8, (8.0, 9.0), np.full(3, 100.0), 10.0)
                for _ in range(len(objects) + 1)]
    poses = np.array([[[1.0, 0.0, 0.0, 0.0]] + [[1.0, 0.0, x, y] for *_, x, y in objects]])
    return synthetic._render(poses, shapes, textures, np.ones(1), H, W)


def test_an_object_partly_out_of_view_keeps_the_box_of_what_is_visible():
    # a 40×40 box centred on the right edge: pixel columns 205..244, of which 205..223 are in view
    clip = _scene((2, (20.0, 20.0), 224.25, 64.25))
    np.testing.assert_array_equal(clip.boxes[0], [[205, 45, 224, 85]])
    assert clip.box_pixels[0].tolist() == [19 * 40]
    assert clip.box_visible[0][0] == pytest.approx(19 / 40)
    assert clip.box_ignore[0].tolist() == [False]


def test_objects_mostly_out_of_view_mostly_hidden_or_tiny_are_ignore_regions():
    clip = _scene((2, (20.0, 20.0), -12.25, 30.25),   # 8 of 40 columns in view: 320 px, 0.2
                  (2, (20.0, 20.0), 150.25, 64.25),   # behind the next one but for 8 columns
                  (2, (40.0, 40.0), 178.25, 64.25),   # the occluder, fully visible
                  (2, (7.0, 7.0), 60.25, 100.25))     # fully visible, 14×14 = 196 px
    boxes, pixels, visible = clip.boxes[0], clip.box_pixels[0], clip.box_visible[0]
    np.testing.assert_array_equal(boxes[0], [0, 11, 8, 51])
    np.testing.assert_array_equal(boxes[1], [131, 45, 139, 85])  # the visible strip only
    assert pixels.tolist() == [320, 320, 80 * 80, 196]
    np.testing.assert_allclose(visible, [0.2, 0.2, 1.0, 1.0])
    assert clip.box_ignore[0].tolist() == [True, True, False, True]


def test_ignore_flags_follow_the_rule_on_the_eval_split():
    seen = np.zeros(3, int)  # kept, ignored for few pixels, ignored for a small fraction
    for seed in EVAL_SEEDS[:4]:
        clip = make_clip(seed, num_frames=EVAL_FRAMES)
        for t in range(0, EVAL_FRAMES, 3):
            ids = np.unique(clip.instances[t][clip.instances[t] > 0])
            for i, p, v, ign in zip(ids, clip.box_pixels[t], clip.box_visible[t],
                                    clip.box_ignore[t]):
                assert p == (clip.instances[t] == i).sum()
                whole = synthetic._silhouette_pixels(clip.shapes[i - 1], clip.poses[t, i])
                assert v == pytest.approx(p / whole) and 0 < v <= 1
                assert ign == (p < IGNORE_MIN_PIXELS or v < IGNORE_MIN_VISIBLE)
                seen += [not ign, p < IGNORE_MIN_PIXELS, v < IGNORE_MIN_VISIBLE]
    assert seen[0] > 100 and seen[2] > 0  # both kinds occur, most boxes count
    assert is_ignore(np.array([255, 256, 256]), np.array([1.0, 0.25, 0.2499])).tolist() == \
        [True, False, True]
