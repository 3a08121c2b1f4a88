"""Where a non-key frame's flow comes from (DESIGN.md §20): the export's learned flow graph
(flow.onnx: flow, scale and the warp in one graph), or a classical optical flow computed on the
host, OpenCV's DIS, warped by the export's warp.onnx with scale 1.

`DisFlow` turns two frames into a flow in feature cells, current -> key: DIS on grey frames at
a fraction of the frame's size (`scale`), then averaged over each feature cell (a box filter:
cv2.resize with INTER_AREA) and divided by the cell size. Each frame's grey image is made once
(`prepare`), so a key frame's serves every frame that warps from it. Step (runtime/step.py)
calls it in its one flow call. OpenCV is imported when a DisFlow is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dff.export.manifest import (
    DIS,
    FLOW_SOURCES,
    LEARNED,
    default_flow,
    dis_settings,
    flow_sources,
)

from dff.errors import DffError

PRESETS = ("ultrafast", "fast", "medium")
DEFAULT_PRESET = "ultrafast"
# DIS works on the frame at this fraction of each side (chosen on vtest.avi and bikes.mp4,
# docs/MEASUREMENTS.md; never on the held-out clip)
DEFAULT_SCALE = 0.5


class FlowError(DffError):
    """A flow source this export or backend does not have, or bad DIS settings."""


class DisFlow:
    """OpenCV DIS optical flow on the host. `preset`: one of PRESETS; `scale`: the fraction of
    each side DIS works at (0 < scale <= 1). Not thread-safe: one per Step."""

    name = DIS
    has_quality = False

    def __init__(self, preset: str = DEFAULT_PRESET, scale: float = DEFAULT_SCALE):
        if preset not in PRESETS:
            raise FlowError(f"--dis-preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if not 0 < scale <= 1:
            raise FlowError(f"--dis-scale {scale}: expected a fraction of the frame's side in "
                            "(0, 1], e.g. 0.5")
        try:
            import cv2
        except ImportError as e:
            raise FlowError(f"--flow dis needs OpenCV, which is not importable ({e}); "
                            "`pip install opencv-python-headless`") from None
        self._cv2 = cv2
        self.preset, self.scale = preset, float(scale)
        code = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset]
        self._dis = cv2.DISOpticalFlow_create(code)

    def settings(self) -> dict[str, Any]:
        return {"source": DIS, "preset": self.preset, "scale": self.scale}

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 RGB frame as the grey image DIS works on (at `scale`)."""
        cv2 = self._cv2
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if self.scale == 1:
            return grey
        h, w = grey.shape
        size = (max(8, round(w * self.scale)), max(8, round(h * self.scale)))
        return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)

    def flow(self, current: np.ndarray, key: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
        """[2,h,w] float32: the flow from `current` to `key` (prepared frames) in feature
        cells, averaged over each cell of the (h, w) = `cells` grid (the frame's size over the
        stride)."""
        cv2 = self._cv2
        h, w = cells
        dense = self._dis.calc(current, key, None)  # [h', w', 2] px at DIS's size
        gh, gw = current.shape
        cell = cv2.resize(dense, (w, h), interpolation=cv2.INTER_AREA)
        # DIS px -> frame px (x w * stride / gw) -> cells (/ stride)
        out = np.empty((2, h, w), np.float32)
        out[0] = cell[..., 0] * (w / gw)
        out[1] = cell[..., 1] * (h / gh)
        return out

    def pixels(self, current: np.ndarray, key: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """[H,W,2] float32: the flow from `current` to `key` (prepared frames) in pixels of a
        frame of `size` (H, W), one vector per pixel (DIS's field resized bilinearly)."""
        cv2 = self._cv2
        h, w = size
        dense = self._dis.calc(current, key, None)
        gh, gw = current.shape
        out = cv2.resize(dense, (w, h), interpolation=cv2.INTER_LINEAR)
        out[..., 0] *= w / gw
        out[..., 1] *= h / gh
        return out

    def batch(self, current: list[np.ndarray], key: list[np.ndarray],
              cells: tuple[int, int]) -> np.ndarray:
        """[N,2,h,w] float32: `flow` of each pair."""
        return np.stack([self.flow(c, k, cells) for c, k in zip(current, key)])


def dis_flow(manifest: dict | None, preset: str | None = None,
             scale: float | None = None) -> DisFlow:
    """A DisFlow with `preset` and `scale` where given, else the export's recorded settings
    (manifest `flow.dis`), else DEFAULT_PRESET and DEFAULT_SCALE."""
    recorded = dis_settings(manifest) if manifest is not None else {}
    return DisFlow(preset or recorded.get("preset", DEFAULT_PRESET),
                   scale if scale is not None else recorded.get("scale", DEFAULT_SCALE))


def pick_flow(requested: str | None, manifest: dict | None, where: str,
              backend_sources: tuple[str, ...] | None = None,
              preset: str | None = None, scale: float | None = None) -> DisFlow | None:
    """The flow source a command runs: `requested` (--flow), else the export's default
    (`manifest` None: the learned flow, as a checkpoint has). None means the learned flow graph;
    a DisFlow the host flow (`dis_flow`'s settings). Refuses, naming `where` and the fix, a
    source the export or the backend (`backend_sources`) lacks."""
    have = flow_sources(manifest) if manifest is not None else [LEARNED]
    source = requested or (default_flow(manifest) if manifest is not None else LEARNED)
    if source not in FLOW_SOURCES:
        raise FlowError(f"--flow {source!r}: choose one of {', '.join(FLOW_SOURCES)}")
    if source not in have:
        if source == LEARNED:
            fix = ("this export has no learned flow graph (flow.onnx); run it with --flow dis, "
                   "or export a model with a flow net")
        else:
            fix = ("its manifest lists no warp graph (warp.onnx), so it predates --flow dis; "
                   "re-export it with this version's dff-export")
        raise FlowError(f"--flow {source}: {where} has flow sources {', '.join(have)}; {fix}")
    if backend_sources is not None and source not in backend_sources:
        raise FlowError(f"--flow {source}: this backend runs flow sources "
                        f"{', '.join(backend_sources)}; pick --backend onnxruntime-cpu")
    return dis_flow(manifest, preset, scale) if source == DIS else None
