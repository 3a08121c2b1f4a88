"""Key-frame schedulers: which frames run N_feat (key) and which propagate by flow.

Both share one shape, which the pipeline drives per frame:

- `decide(t, frame) -> bool` before any compute: True = key frame. `t` counts from 0 at the
  start of each video (the pipeline calls `reset()` first), `frame` is HWC uint8 RGB.
- `accept(flow) -> bool` after the flow of a non-key frame (only called when `needs_flow`):
  False = the propagation is not trusted and the frame is redone as a key frame.
- `stats()`: frames, key_frames and why each key frame was one.
"""

from __future__ import annotations

import math

import numpy as np

from dff.errors import DffError

MEAN_FLOW_PX = 4.8  # adaptive: mean flow, in image pixels, that calls for a key frame
REASONS = ("start", "interval", "scene_cut", "flow", "outside", "max_interval")
SCHEDULES = ("fixed", "per-frame", "adaptive")


class _Counter:
    """Frames and key frames with their reasons, for `stats()`."""

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

    needs_flow = False

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

    def accept(self, flow: np.ndarray) -> bool:
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
    """

    needs_flow = True

    def __init__(self, max_mean_flow: float | None = None, max_outside: float = 0.1,
                 scene_cut: float = 17.0, max_interval: int = 10, stride: int = 16):
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
        self.reset()

    def __repr__(self) -> str:
        return (f"Adaptive(max_mean_flow={self.max_mean_flow}, max_outside={self.max_outside}, "
                f"scene_cut={self.scene_cut}, max_interval={self.max_interval})")

    def reset(self) -> None:
        super().reset()
        self._key_t: int | None = None
        self._key_thumb: np.ndarray | None = None
        self._t = 0
        self._thumb: np.ndarray | None = None
        self.last: dict[str, float] = {}  # the tests' values for the latest frame

    def _mark_key(self, reason: str) -> None:
        self.key(reason)
        self._key_t, self._key_thumb = self._t, self._thumb

    def decide(self, t: int, frame: np.ndarray | None = None) -> bool:
        self.frames += 1
        self._t = t
        on = frame is not None and math.isfinite(self.scene_cut)
        self._thumb = grey_thumbnail(frame) if on and frame is not None else None
        self.last = {}
        if self._key_t is None:
            self._mark_key("start")
            return True
        if t - self._key_t >= self.max_interval:
            self._mark_key("max_interval")
            return True
        if self._thumb is not None and self._key_thumb is not None:
            if self._thumb.shape != self._key_thumb.shape:
                diff = math.inf
            else:
                diff = float(np.abs(self._thumb - self._key_thumb).mean())
            self.last["scene_diff"] = diff
            if diff > self.scene_cut:
                self._mark_key("scene_cut")
                return True
        return False

    def accept(self, flow: np.ndarray) -> bool:
        mean, outside = flow_stats(flow)
        self.last.update(mean_flow=mean, outside=outside)
        if mean > self.max_mean_flow:
            self._mark_key("flow")
            return False
        if outside > self.max_outside:
            self._mark_key("outside")
            return False
        return True


Scheduler = FixedInterval | Adaptive


def make_scheduler(schedule: str, key_interval: int = 10, stride: int = 16,
                   **thresholds: float) -> Scheduler:
    """"fixed" (every `key_interval` frames), "per-frame" (every frame) or "adaptive"
    (`Adaptive(**thresholds)` on the model's feature grid of `stride`; its `max_interval`
    defaults to `key_interval`)."""
    if schedule == "fixed":
        scheduler: Scheduler = FixedInterval(key_interval)
    elif schedule == "per-frame":
        scheduler = FixedInterval(1)
    elif schedule == "adaptive":
        thresholds.setdefault("max_interval", key_interval)
        scheduler = Adaptive(**thresholds, stride=stride)  # type: ignore[arg-type]
    else:
        raise DffError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if thresholds and schedule != "adaptive":
        raise DffError(f"--schedule {schedule}: thresholds {sorted(thresholds)} apply only "
                       "to --schedule adaptive")
    return scheduler
