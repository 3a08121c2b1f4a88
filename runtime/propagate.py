"""Outputs carried between key frames (issue 24; DESIGN.md §21): what practitioners run instead
of DFF. Key frames run per-frame inference (feature and task); every other frame takes its
outputs from its key frame's outputs, with no flow graph, warp or task:

- `warp-output` (segmentation, `LabelWarp`): the key frame's labels warped along OpenCV DIS's
  flow from the current frame to the key frame, nearest neighbour (cv2.remap; a pixel whose
  flow points outside the frame takes the nearest border pixel). DIS runs at the export's
  settings (runtime/flows.py), on the grey frames DisFlow prepares.
- `track` (detection, `BoxTracker`): the key frame's detections above the export's
  `task.score_threshold` go to a Kalman-filter tracker (norfair, BSD-3-Clause; its boxes are
  two corner points matched by IoU, `_iou_distance`), told that detections come every k
  frames (`period`); on the frames between, its predicted boxes are the outputs, each with the
  class and score of the detection it last matched. A track not matched at a key frame lives
  until the next one at most. (SORT and ByteTrack trackers return nothing on frames without
  detections, so they cannot carry boxes between key frames; DESIGN.md §8.)

`Step(propagate=...)` (runtime/step.py) calls `key` with each key frame's outputs and `carry`
for each other frame; the state of each stream lives in its StreamState's `carried`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dff.runtime.flows import DisFlow

from dff.errors import DffError
from dff.tasks import DETECTION, SEGMENTATION

WARP_OUTPUT, TRACK = "warp-output", "track"
PROPAGATIONS = {WARP_OUTPUT: SEGMENTATION, TRACK: DETECTION}  # kind -> the task it serves
TRACK_MAX_DISTANCE = 0.7  # norfair's IoU distance (1 - IoU) below which a box matches a track


class Propagator:
    """Carries a stream's key-frame outputs to its other frames; one per Step."""

    kind = ""

    def key(self, stream: Any, frame: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Take a key frame (HWC uint8 RGB) and its task outputs (one frame's, no batch axis)."""
        raise NotImplementedError

    def carry(self, stream: Any, frame: np.ndarray) -> dict[str, np.ndarray]:
        """A non-key frame's outputs (one frame's, no batch axis)."""
        raise NotImplementedError


class LabelWarp(Propagator):
    """Segmentation: the key frame's labels warped along DIS's flow (module docstring)."""

    kind = WARP_OUTPUT

    def __init__(self, dis: DisFlow):
        import cv2

        self.dis, self._cv2 = dis, cv2
        self._grid: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def key(self, stream: Any, frame: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        stream.carried = (np.ascontiguousarray(outputs["labels"]), self.dis.prepare(frame))

    def carry(self, stream: Any, frame: np.ndarray) -> dict[str, np.ndarray]:
        labels, key_grey = stream.carried
        h, w = labels.shape
        flow = self.dis.pixels(self.dis.prepare(frame), key_grey, (h, w))
        if (h, w) not in self._grid:
            self._grid[(h, w)] = (np.arange(w, dtype=np.float32)[None, :].repeat(h, 0),
                                  np.arange(h, dtype=np.float32)[:, None].repeat(w, 1))
        gx, gy = self._grid[(h, w)]
        cv2 = self._cv2
        warped = cv2.remap(labels, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_REPLICATE)
        return {"labels": warped}


class BoxTracker(Propagator):
    """Detection: boxes carried by norfair's Kalman-filter tracker (module docstring), for key
    frames every `k` frames and detections above `score_threshold`."""

    kind = TRACK

    def __init__(self, k: int, score_threshold: float):
        try:
            import norfair
        except ImportError as e:
            raise DffError(f"the track candidate needs norfair, which is not importable ({e}); "
                           "`pip install 'norfair>=2.1,<2.3'` (pyproject's `tune` extra)") from None
        self._norfair, self.k, self.score_threshold = norfair, int(k), float(score_threshold)

    def _tracker(self) -> Any:
        # hit_counter_max k + 1: a matched track lives through the k - 1 frames to the next key
        # frame and no further unless matched again; initialization_delay 0: a new detection is
        # a track at once
        return self._norfair.Tracker(distance_function=_iou_distance,
                                     distance_threshold=TRACK_MAX_DISTANCE,
                                     hit_counter_max=self.k + 1, initialization_delay=0)

    def key(self, stream: Any, frame: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        if stream.carried is None:
            stream.carried = self._tracker()
        boxes = np.asarray(outputs["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(outputs["scores"], np.float64).reshape(-1)
        classes = np.asarray(outputs["classes"]).reshape(-1)
        # a box of no area cannot be matched by IoU: not tracked
        keep = ((scores > self.score_threshold) & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1]))
        dets = [self._norfair.Detection(points=b.reshape(2, 2), scores=np.array([s, s]),
                                        label=int(c), data=float(s))
                for b, s, c in zip(boxes[keep], scores[keep], classes[keep])]
        stream.carried.update(detections=dets, period=self.k)

    def carry(self, stream: Any, frame: np.ndarray) -> dict[str, np.ndarray]:
        tracks = [t for t in stream.carried.update() if t.last_detection is not None]
        tracks.sort(key=lambda t: -t.last_detection.data)
        n = len(tracks)
        boxes = np.zeros((n, 4), np.float32)
        for i, t in enumerate(tracks):
            (x0, y0), (x1, y1) = t.estimate
            boxes[i] = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        return {"boxes": boxes,
                "scores": np.array([t.last_detection.data for t in tracks], np.float32),
                "classes": np.array([t.last_detection.label for t in tracks], np.int32),
                "num": np.array(n, np.int32)}


def _iou_distance(detection: Any, track: Any) -> float:
    """1 - IoU of a detection's box and a track's predicted one (corners in either order)."""
    a, b = np.asarray(detection.points, np.float64), np.asarray(track.estimate, np.float64)
    a0, a1, b0, b1 = a.min(0), a.max(0), b.min(0), b.max(0)
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None))
    union = np.prod(a1 - a0) + np.prod(b1 - b0) - inter
    return 1.0 - float(inter / union) if union > 0 else 1.0


def make_propagator(kind: str, task_kind: str, k: int, dis: DisFlow | None,
                    score_threshold: float = 0.0) -> Propagator:
    """The propagator of `kind` (WARP_OUTPUT, TRACK) for a model of `task_kind`; DffError for a
    kind the task has not (labels are warped, boxes tracked)."""
    if kind not in PROPAGATIONS:
        raise DffError(f"--propagate {kind!r}: choose among dff, copy, "
                       f"{', '.join(PROPAGATIONS)}")
    if PROPAGATIONS[kind] != task_kind:
        raise DffError(f"--propagate {kind} carries {PROPAGATIONS[kind]} outputs, but this model's "
                       f"task is {task_kind}; pick "
                       + (f"--propagate {WARP_OUTPUT}" if task_kind == SEGMENTATION else
                          f"--propagate {TRACK}" if task_kind == DETECTION else
                          "--propagate dff or copy"))
    if kind == WARP_OUTPUT:
        if dis is None:
            raise DffError("--propagate warp-output warps labels along DIS's flow; it needs "
                           "OpenCV DIS settings")
        return LabelWarp(dis)
    return BoxTracker(k, score_threshold)
