"""The motion-stratified split: the synthetic benchmark's scenes played at other speeds, with
scene cuts and sudden motion bursts, to measure what key-frame schedules do when things move.

The scenes are make_clip's; only their times change (make_clip's `times`): a clip whose
frames are d scene-time units apart shows every motion (camera pan and zoom, objects'
travel, turn and growth) d times as fast. Slow clips run steadily; medium and fast ones swing
to and fro (`_swinging`), so that their objects stay in view for the whole clip. Categories, by the clip's mean true motion: the
exact flow's magnitude between consecutive frames, averaged over the pixels where it is
valid (Clip.flow), in image pixels per frame at 128×224:

- ``slow``: under 1 px a frame (the existing evaluation split: 0.5-0.9);
- ``medium``: 1 to 3 px a frame;
- ``fast``: 3 px a frame or more (up to about 10);
- ``cuts``: two scenes joined at a random frame (a hard cut), medium motion in all;
- ``bursts``: a slow scene with one or two sudden bursts of 4-8 frames at 6-10× its speed
  (a whip pan).

In the spirit of FGFA's motion-IoU categories, but on the exact flow. Seeds: the evaluation
split draws from MOTION_SEEDS, the tuning split (for thresholds and budgets, never the
evaluation) from TUNING_SEEDS; both are disjoint from the training seeds and from
synthetic.EVAL_SEEDS, whose split stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from dff.data.synthetic import EVAL_FRAMES, Clip, make_clip

SLOW_BELOW_PX, FAST_FROM_PX = 1.0, 3.0  # mean true flow, px a frame: the category edges
CATEGORIES = ("slow", "medium", "fast", "cuts", "bursts")
MOTION_SEEDS = 20_000_000  # evaluation: category i's candidates from MOTION_SEEDS + i * 10_000
TUNING_SEEDS = 30_000_000  # tuning: the same from here
EVAL_CLIPS, TUNING_CLIPS = 8, 4  # per category
# scene-time units per frame drawn per category (the measured flow then decides slow/medium/
# fast; a draw outside its category is skipped): wide enough that few are skipped
_SPEEDS = {"slow": (0.8, 1.6), "medium": (3.0, 8.0), "fast": (8.0, 20.0),
           "cuts": (3.0, 8.0), "bursts": (0.8, 1.4)}
_SWING = (26.0, 58.0), 100.0  # swing period (frames), largest excursion (time units)
_BURST_SPEEDUP, _BURST_FRAMES = (6.0, 10.0), (4, 8)
_MAX_TRIES = 50  # candidates per clip before giving up (a bug, not bad luck: see the test)


@dataclass
class JoinedClip(Clip):
    """Two scenes cut together: frames [0, cut) of `first`, [cut, T) of `second` (both
    rendered over the same T frames). No flow exists across the cut."""

    cut: int = 0
    first: Clip | None = field(default=None, repr=False)
    second: Clip | None = field(default=None, repr=False)

    def flow(self, current: int, key: int) -> tuple[np.ndarray, np.ndarray]:
        if (current < self.cut) != (key < self.cut):
            raise ValueError(f"frames {current} and {key} lie on two sides of the scene cut at "
                             f"frame {self.cut}: no flow between them")
        part = self.first if current < self.cut else self.second
        assert part is not None
        return part.flow(current, key)


@dataclass
class MotionClip:
    """One clip of the split: its category, seed, the clip, its mean true motion (px a
    frame), the frames where a new scene starts (cuts) and where a burst runs."""

    category: str
    seed: int
    clip: Clip
    mean_flow_px: float
    cuts: tuple[int, ...] = ()
    bursts: tuple[tuple[int, int], ...] = ()  # [start, end) frames


def mean_flow_px(clip: Clip) -> float:
    """The mean magnitude of the exact flow between consecutive frames, over the pixels
    where it is valid, in image pixels a frame (pairs across a cut are left out)."""
    total, count = 0.0, 0
    cut = clip.cut if isinstance(clip, JoinedClip) else -1
    for t in range(1, len(clip.frames)):
        if t == cut:
            continue
        flow, valid = clip.flow(t, t - 1)
        total += float(np.hypot(flow[0], flow[1])[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def category_of(flow_px: float) -> str:
    """slow, medium or fast for a mean true motion in px a frame."""
    if flow_px < SLOW_BELOW_PX:
        return "slow"
    return "medium" if flow_px < FAST_FROM_PX else "fast"


def _steady(speed: float, n: int) -> np.ndarray:
    """Times of n frames `speed` apart, centred on make_clip's mid-clip (where its objects
    are in view)."""
    mid = EVAL_FRAMES / 2
    return mid + speed * (np.arange(n, dtype=np.float64) - (n - 1) / 2)


def _swinging(rng: np.random.Generator, speed: float, n: int) -> np.ndarray:
    """Times that swing back and forth around mid-clip at `speed` units a frame on average
    (a sinusoid of random phase and a period of 26-58 frames, shorter where the swing would
    pass 100 units): the whole scene moves to and fro, so fast motion stays in view over a
    long clip, as a hand-held camera's would."""
    (shortest, longest), reach = _SWING
    omega = 2 * np.pi / rng.uniform(shortest, longest)
    omega = max(omega, speed * np.pi / (2 * reach))
    amplitude = speed * np.pi / (2 * omega)  # mean |d time / d frame| = 2 A omega / pi
    return EVAL_FRAMES / 2 + amplitude * np.sin(omega * np.arange(n) + rng.uniform(0, 2 * np.pi))


def _burst_times(rng: np.random.Generator, speed: float,
                 n: int) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Frame steps of `speed`, with one or two bursts of _BURST_FRAMES frames at
    _BURST_SPEEDUP times it, apart from each other and from the first frames."""
    steps = np.full(n, speed)
    bursts: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(1, 3))):
        length = int(rng.integers(_BURST_FRAMES[0], _BURST_FRAMES[1] + 1))
        for _ in range(20):
            start = int(rng.integers(6, n - length))
            if all(start >= e + 6 or start + length + 6 <= s for s, e in bursts):
                break
        else:
            continue
        steps[start:start + length] *= rng.uniform(*_BURST_SPEEDUP)
        bursts.append((start, start + length))
    times = np.concatenate([[0.0], np.cumsum(steps[1:])])
    return EVAL_FRAMES / 2 + times - times[n // 2], tuple(sorted(bursts))


def _candidate(category: str, seed: int, frames: int, height: int,
               width: int) -> MotionClip | None:
    """The clip of `seed` for `category`, or None where its measured motion falls outside."""
    rng = np.random.default_rng([seed, 1])  # the speeds' own stream: make_clip keeps its own
    speed = rng.uniform(*_SPEEDS[category])
    if category == "cuts":
        cut = int(rng.integers(frames // 3, 2 * frames // 3 + 1))
        other = rng.uniform(*_SPEEDS[category])
        first = make_clip(seed, frames, height, width, _swinging(rng, speed, frames))
        second = make_clip(seed + 5_000, frames, height, width, _swinging(rng, other, frames))
        joined = JoinedClip(
            frames=np.concatenate([first.frames[:cut], second.frames[cut:]]),
            labels=np.concatenate([first.labels[:cut], second.labels[cut:]]),
            instances=np.concatenate([first.instances[:cut], second.instances[cut:]]),
            **{name: getattr(first, name)[:cut] + getattr(second, name)[cut:]
               for name in ("boxes", "box_classes", "box_pixels", "box_visible",
                            "box_ignore")},
            gains=np.concatenate([first.gains[:cut], second.gains[cut:]]),
            poses=first.poses, shapes=first.shapes, cut=cut, first=first, second=second)
        flow = mean_flow_px(joined)
        ok = category_of(flow) == "medium"
        return MotionClip(category, seed, joined, flow, cuts=(cut,)) if ok else None
    if category == "bursts":
        times, bursts = _burst_times(rng, speed, frames)
        clip = make_clip(seed, frames, height, width, times)
        return MotionClip(category, seed, clip, mean_flow_px(clip), bursts=bursts)
    times = _steady(speed, frames) if category == "slow" else _swinging(rng, speed, frames)
    clip = make_clip(seed, frames, height, width, times)
    flow = mean_flow_px(clip)
    return MotionClip(category, seed, clip, flow) if category_of(flow) == category else None


def category_clips(category: str, first_seed: int, count: int, frames: int = EVAL_FRAMES,
                   height: int = 128, width: int = 224) -> Iterator[MotionClip]:
    """`count` clips of `category`: the first seeds from `first_seed` on whose motion falls
    in it."""
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r}: choose from {', '.join(CATEGORIES)}")
    seed = first_seed
    for _ in range(count):
        for _ in range(_MAX_TRIES):
            made = _candidate(category, seed, frames, height, width)
            seed += 1
            if made is not None:
                yield made
                break
        else:
            raise RuntimeError(f"no {category} clip in {_MAX_TRIES} seeds before {seed}")


def motion_split(split: str = "eval", categories: tuple[str, ...] = CATEGORIES,
                 clips: int | None = None, frames: int = EVAL_FRAMES, height: int = 128,
                 width: int = 224) -> Iterator[MotionClip]:
    """The clips of `split` ("eval" or "tuning"), category by category: `clips` per category
    (default EVAL_CLIPS or TUNING_CLIPS), each the first seeds in the category's range whose
    motion falls in it. The same arguments give the same clips on every machine."""
    if split not in ("eval", "tuning"):
        raise ValueError(f"split {split!r}: choose eval or tuning")
    base = MOTION_SEEDS if split == "eval" else TUNING_SEEDS
    count = clips or (EVAL_CLIPS if split == "eval" else TUNING_CLIPS)
    for category in categories:
        first = base + CATEGORIES.index(category) * 10_000 if category in CATEGORIES else 0
        yield from category_clips(category, first, count, frames, height, width)
