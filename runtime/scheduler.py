"""Key-frame schedulers: which frames run N_feat (key) and which propagate by flow.

Both share one shape, which the pipeline drives per frame:

- `decide(t, frame) -> bool` before any compute: True = key frame. `t` counts from 0 at the
  start of each video (the pipeline calls `reset()` first), `frame` is HWC uint8 RGB.
- `accept(flow, quality=None) -> bool` after the flow of a non-key frame (only called when
  `needs_flow`): False = the propagation is not trusted and the frame is redone as a key
  frame. `quality` is flow.onnx's output of that name, the learned schedule's input.
- `stats()`: frames, key_frames and why each key frame was one.
"""

from __future__ import annotations

import math

import numpy as np

from dff.errors import DffError

MEAN_FLOW_PX = 4.8  # adaptive: mean flow, in image pixels, that calls for a key frame
REASONS = ("start", "interval", "scene_cut", "flow", "outside", "max_interval", "quality",
           "budget")
SCHEDULES = ("fixed", "per-frame", "adaptive", "learned")


class KeyBudget:
    """Turns "at most `budget` of the frames are key frames" into decisions, online.

    A bank of key frames: a video's first frame is a key frame for free, frame t adds the
    whole key frames budget × t has passed since frame t − 1 (one every 1/budget frames) to
    the bank, which holds at most `reserve`, and a key frame costs 1. So a
    video of T frames never gets more than 1 + budget × (T − 1) key frames (fixed k = 1/budget
    has as many), and a quiet stretch saves up to `reserve` key frames for what comes after it
    (a cut, a burst of motion); when the bank is full a key frame is made anyway (reason
    "budget": its credit would be lost). A schedule's test compares a score with `threshold`,
    which the budget moves so that key frames come at the budget's rate: × e^rate at each key
    frame, × e^(−rate × budget) at every frame, so the longer since the last key frame, the
    lower the bar.

    `streams` > 1 makes one budget for that many streams' schedulers (one KeyBudget passed to
    each): the bank and its reserve (`reserve` × streams) are theirs together, the threshold
    moves `streams` times slower a frame, and a scheduler's reset (a new video) leaves it as
    it is. Key frames then go where the scores are highest across the streams, so a still
    camera's unused share pays for a busy one's: the total stays within the budget, a single
    stream's share does not.
    """

    def __init__(self, budget: float, threshold: float = 1.0, reserve: float = 2.0,
                 rate: float = 0.3, streams: int = 1):
        if not 0 < budget <= 1:
            raise DffError(f"--key-budget {budget!r}: need a fraction of the frames in (0, 1], "
                           "e.g. 0.1 for one key frame in ten")
        if not threshold > 0 or not reserve >= 1 or not rate >= 0 or streams < 1:
            raise DffError(f"key budget: threshold {threshold!r} must be > 0, reserve "
                           f"{reserve!r} ≥ 1, rate {rate!r} ≥ 0 and streams {streams!r} ≥ 1")
        self.budget, self.initial, self.reserve, self.rate = budget, threshold, reserve, rate
        self.streams = int(streams)
        self.reset()

    def __repr__(self) -> str:
        shared = f", streams={self.streams}" if self.streams > 1 else ""
        return (f"KeyBudget({self.budget:g}, threshold={self.initial:g}, "
                f"reserve={self.reserve:g}, rate={self.rate:g}{shared})")

    def reset(self) -> None:
        self.bank, self.threshold = 0.0, self.initial

    def restart(self) -> None:
        """A scheduler starts a new video: a budget of its own starts over, a shared one goes
        on."""
        if self.streams == 1:
            self.reset()

    def tick(self, t: int) -> bool:
        """Frame `t` of a video (0: its first, which earns nothing): credit it, lower the bar;
        True when the bank is full (the frame should be a key frame). Credit comes in whole
        key frames, one each time budget × t passes a whole number, so that streams sharing
        a bank earn together no more than each would alone (fixed k = 1/budget's count)."""
        if t > 0:
            earned = math.floor(self.budget * t + 1e-9) - math.floor(self.budget * (t - 1) + 1e-9)
            self.bank = min(self.bank + earned, self.reserve * self.streams)
            self.threshold *= math.exp(-self.rate * self.budget / self.streams)
        return self.bank >= self.reserve * self.streams - 1e-9

    def can_spend(self) -> bool:
        return self.bank >= 1 - 1e-9

    def wants(self, score: float) -> bool:
        """Whether a frame of this score is to be a key frame: above the bar and paid for."""
        return score > self.threshold and self.can_spend()

    def spend(self, first: bool = False) -> None:
        """A key frame (`first`: a video's first frame, free, and moving no threshold)."""
        if not first:
            self.bank -= 1
            self.threshold *= math.exp(self.rate / self.streams)


class _Counter:
    """Frames and key frames with their reasons, for `stats()`."""

    needs_flow = False  # reads the flow (`accept` is called)
    needs_quality = False  # reads flow.onnx's `quality` output (the learned schedule)

    def reset(self) -> None:
        self.frames = 0
        self.reasons = dict.fromkeys(REASONS, 0)

    def key(self, reason: str) -> None:
        self.reasons[reason] += 1

    def stats(self) -> dict:
        return {"frames": self.frames, "key_frames": sum(self.reasons.values()),
                "reasons": dict(self.reasons)}


class FixedInterval(_Counter):
    """A key frame every `k` frames from the start of the video (k=1: every frame, the
    per-frame baseline); the original DFF's schedule."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DffError(f"--key-interval {k!r}: need an integer ≥ 1 (1 = every frame)")
        self.k = int(k)
        self.reset()

    def __repr__(self) -> str:
        return f"FixedInterval({self.k})"

    def decide(self, t: int, frame: np.ndarray | None = None) -> bool:
        self.frames += 1
        if t % self.k:
            return False
        self.key("start" if t == 0 else "interval")
        return True

    def accept(self, flow: np.ndarray, quality: np.ndarray | None = None) -> bool:
        return True


def grey_thumbnail(frame: np.ndarray, size: int = 32) -> np.ndarray:
    """Grey levels (0..255, float) of `frame` averaged over square blocks so that the longer
    side has about `size` blocks: cheap (about 20 ms at 1080p), and blind to texture detail."""
    h, w = frame.shape[:2]
    b = max(1, max(h, w) // size)
    hh, ww = h // b * b, w // b * b
    sums = frame[:hh, :ww].reshape(hh // b, b, ww // b, b, 3).sum(axis=(1, 3), dtype=np.uint32)
    return sums @ np.array([0.299, 0.587, 0.114]) / (b * b)


def flow_stats(flow: np.ndarray) -> tuple[float, float]:
    """(mean magnitude in cells, fraction of cells sampling outside the map) of a flow
    [2,h,w] or [1,2,h,w]. Cell (x, y) samples the key features at (x + fx, y + fy); the map
    covers [-0.5, w - 0.5] × [-0.5, h - 0.5] (cell centres at integers), so beyond it more
    than half of the bilinear weight falls on the zero padding."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim == 4:
        flow = flow[0]
    _, h, w = flow.shape
    fx, fy = flow[0], flow[1]
    mean = float(np.sqrt(fx * fx + fy * fy).mean())
    x = np.arange(w, dtype=np.float32)[None, :] + fx
    y = np.arange(h, dtype=np.float32)[:, None] + fy
    outside = (x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)
    return mean, float(outside.mean())


class Adaptive(_Counter):
    """Key frames where propagation would be poor, in three tests:

    1. before any compute, a scene cut: the mean absolute difference of the frame's grey
       thumbnail (`grey_thumbnail`) and the key frame's above `scene_cut` grey levels;
    2. after the flow of a non-key frame: its mean magnitude above `max_mean_flow` cells
       (default: MEAN_FLOW_PX pixels at the model's `stride`), or
       more than `max_outside` of the cells sampling outside the key map (new content came
       into view). Such a frame is redone as a key frame: the flow's cost is spent, the
       accuracy kept;
    3. `max_interval` frames after the last key frame at the latest (drift the flow net
       cannot see accumulates).

    Defaults, for the synthetic benchmark (typical motion 1-2 px a frame, stride 16):
    `max_mean_flow` 0.3 cells (4.8 px; 0.6 cells at stride 8, 0.15 at stride 32: the test is
    on image motion, whatever the grid), so steady motion gets a key every 3-5 frames and
    a still scene runs to `max_interval`; `max_outside` 0.1 is about one border column of a
    224-px-wide frame's 14-cell map swept out of view; `scene_cut` 17 sits between the
    largest difference within a clip over 9 frames (16.3) and the smallest between two
    clips (17.9) on 12 synthetic clips; `max_interval` 10 is the paper's fixed interval.
    Pass `scene_cut=math.inf` to switch the test (and its thumbnails) off.

    With `key_budget` (a KeyBudget), the budget decides instead of `max_interval`: the flow
    tests become one score, max(mean flow / max_mean_flow, outside / max_outside), against
    the budget's moving threshold, and every key frame (a scene cut's too) needs credit.
    """

    needs_flow = True

    def __init__(self, max_mean_flow: float | None = None, max_outside: float = 0.1,
                 scene_cut: float = 17.0, max_interval: int = 10, stride: int = 16,
                 key_budget: KeyBudget | None = None):
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise DffError(f"adaptive schedule: stride {stride!r} must be an integer ≥ 1")
        if max_mean_flow is None:
            max_mean_flow = MEAN_FLOW_PX / int(stride)
        for name, value in (("max_mean_flow", max_mean_flow), ("max_outside", max_outside),
                            ("scene_cut", scene_cut)):
            if not value >= 0:  # also rejects NaN
                raise DffError(f"adaptive schedule: {name} {value!r} must be ≥ 0")
        if isinstance(max_interval, bool) or not isinstance(max_interval, (int, np.integer)) \
                or max_interval < 1:
            raise DffError(f"adaptive schedule: max_interval {max_interval!r} must be an "
                           "integer ≥ 1")
        self.max_mean_flow, self.max_outside = max_mean_flow, max_outside
        self.scene_cut, self.max_interval = scene_cut, int(max_interval)
        self.budget = key_budget
        self.reset()

    def __repr__(self) -> str:
        limit = f"key_budget={self.budget!r}" if self.budget else f"max_interval={self.max_interval}"
        return (f"Adaptive(max_mean_flow={self.max_mean_flow}, max_outside={self.max_outside}, "
                f"scene_cut={self.scene_cut}, {limit})")

    def reset(self) -> None:
        super().reset()
        if self.budget:
            self.budget.restart()
        self._key_t: int | None = None
        self._key_thumb: np.ndarray | None = None
        self._t = 0
        self._thumb: np.ndarray | None = None
        self.last: dict[str, float] = {}  # the tests' values for the latest frame

    def _mark_key(self, reason: str) -> None:
        self.key(reason)
        self._key_t, self._key_thumb = self._t, self._thumb
        if self.budget:
            self.budget.spend(first=reason == "start")

    def decide(self, t: int, frame: np.ndarray | None = None) -> bool:
        self.frames += 1
        self._t = t
        on = frame is not None and math.isfinite(self.scene_cut)
        self._thumb = grey_thumbnail(frame) if on and frame is not None else None
        self.last = {}
        full = self.budget.tick(t) if self.budget else False
        if self._key_t is None:
            self._mark_key("start")
            return True
        if full:
            self._mark_key("budget")
            return True
        if not self.budget and t - self._key_t >= self.max_interval:
            self._mark_key("max_interval")
            return True
        if self._thumb is not None and self._key_thumb is not None:
            if self._thumb.shape != self._key_thumb.shape:
                diff = math.inf
            else:
                diff = float(np.abs(self._thumb - self._key_thumb).mean())
            self.last["scene_diff"] = diff
            if diff > self.scene_cut and (not self.budget or self.budget.can_spend()):
                self._mark_key("scene_cut")
                return True
        return False

    def accept(self, flow: np.ndarray, quality: np.ndarray | None = None) -> bool:
        mean, outside = flow_stats(flow)
        self.last.update(mean_flow=mean, outside=outside)
        if self.budget:
            moving = mean / max(self.max_mean_flow, 1e-12)
            score = max(moving, outside / max(self.max_outside, 1e-12))
            self.last["score"] = score
            if not self.budget.wants(score):
                return True
            self._mark_key("flow" if moving >= score else "outside")
            return False
        if mean > self.max_mean_flow:
            self._mark_key("flow")
            return False
        if outside > self.max_outside:
            self._mark_key("outside")
            return False
        return True


class Learned(_Counter):
    """Key frames where the flow network's own `quality` output, its prediction of how far
    the propagated features are from the frame's true features (relative squared error,
    docs/DESIGN.md §10), is highest, within a key-frame budget (a KeyBudget, whose threshold is
    in `quality`'s units): the paper's "key frames chosen by the network itself". A frame
    whose prediction passes the threshold is redone as a key frame while the budget allows.
    Needs a flow graph with a `quality` output (a model trained with a quality head).
    """

    needs_flow = True
    needs_quality = True

    def __init__(self, key_budget: KeyBudget):
        self.budget = key_budget
        self.reset()

    def __repr__(self) -> str:
        return f"Learned({self.budget!r})"

    def reset(self) -> None:
        super().reset()
        self.budget.restart()
        self.last: dict[str, float] = {}

    def decide(self, t: int, frame: np.ndarray | None = None) -> bool:
        self.frames += 1
        self.last = {}
        full = self.budget.tick(t)
        if self.frames == 1:
            self.key("start")
            self.budget.spend(first=True)
            return True
        if full:
            self.key("budget")
            self.budget.spend()
            return True
        return False

    def accept(self, flow: np.ndarray, quality: np.ndarray | None = None) -> bool:
        if quality is None:
            raise DffError("--schedule learned needs the flow network's `quality` output, which "
                           "this model has none of: add a quality head with `python -m "
                           "dff.models.quality MODEL.pth -o MODEL_quality.pth`")
        score = float(np.asarray(quality, dtype=np.float64).reshape(-1)[0])
        self.last["quality"] = score
        if not self.budget.wants(score):
            return True
        self.key("quality")
        self.budget.spend()
        return False


Scheduler = FixedInterval | Adaptive | Learned


# the learned schedule's starting threshold, in `quality` units, where no tuned one is given
# (dff-eval --split motion picks one on the tuning split)
LEARNED_THRESHOLD = 0.25
BUDGET_KEYS = ("threshold", "reserve", "rate")


def make_budget(schedule: str, key_budget: float | None, key_interval: int = 10,
                streams: int = 1, thresholds: dict | None = None) -> KeyBudget | None:
    """The KeyBudget of `schedule` ("adaptive" or "learned") at `key_budget` (a fraction of
    the frames; learned without one: 1 / `key_interval`), for `streams` streams together; its
    `threshold`, `reserve` and `rate` are taken out of `thresholds` where given. None for
    adaptive without a budget."""
    thresholds = {} if thresholds is None else thresholds
    if key_budget is not None and schedule not in ("adaptive", "learned"):
        raise DffError(f"--key-budget applies to --schedule adaptive or learned, not "
                       f"{schedule} (a fixed schedule's budget is 1 / --key-interval)")
    if key_budget is None and schedule != "learned":
        return None
    opts = {k: thresholds.pop(k) for k in BUDGET_KEYS if k in thresholds}
    opts.setdefault("threshold", LEARNED_THRESHOLD if schedule == "learned" else 1.0)
    return KeyBudget(1 / key_interval if key_budget is None else key_budget, streams=streams,
                     **opts)


def make_scheduler(schedule: str, key_interval: int = 10, stride: int = 16,
                   key_budget: float | KeyBudget | None = None, **thresholds: float) -> Scheduler:
    """"fixed" (every `key_interval` frames), "per-frame" (every frame), "adaptive"
    (`Adaptive(**thresholds)` on the model's feature grid of `stride`; its `max_interval`
    defaults to `key_interval`) or "learned". `key_budget` (a fraction of the frames: adaptive
    and learned, which has 1 / `key_interval` without one; or a KeyBudget, shared) caps the key
    frames with a KeyBudget (`make_budget`)."""
    budget = key_budget if isinstance(key_budget, KeyBudget) else make_budget(
        schedule, key_budget, key_interval, thresholds=thresholds)
    if schedule == "fixed":
        scheduler: Scheduler = FixedInterval(key_interval)
    elif schedule == "per-frame":
        scheduler = FixedInterval(1)
    elif schedule == "adaptive":
        thresholds.setdefault("max_interval", key_interval)
        scheduler = Adaptive(**thresholds, stride=stride,  # type: ignore[arg-type]
                             key_budget=budget)
    elif schedule == "learned":
        assert budget is not None
        scheduler = Learned(budget)
    else:
        raise DffError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if thresholds and schedule != "adaptive":
        raise DffError(f"--schedule {schedule}: thresholds {sorted(thresholds)} apply only "
                       "to --schedule adaptive")
    return scheduler


def make_schedulers(count: int, schedule: str, key_interval: int = 10, stride: int = 16,
                    key_budget: float | None = None, **thresholds: float) -> list[Scheduler]:
    """One scheduler per stream (make_scheduler's), all holding one KeyBudget for the
    `count` streams together where the schedule has a budget (KeyBudget's `streams`): key
    frames go to the streams that need them, within `key_budget` of all their frames."""
    budget = make_budget(schedule, key_budget, key_interval, max(count, 1), thresholds) \
        if schedule in ("adaptive", "learned") else key_budget
    return [make_scheduler(schedule, key_interval, stride, budget, **dict(thresholds))
            for _ in range(count)]
