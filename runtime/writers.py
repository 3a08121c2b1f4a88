"""Result writers: annotated video, per-frame JSON lines (labels as run-length codes), summary.

Every output is staged in a temp file beside its target and moved into place only when the run
succeeds, so a failed or interrupted run never leaves a half-written file where a good one is
expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from dff.runtime.video import (
    StagedOutput,
    VideoWriter,
    check_folder,
    fit_frame,
    import_cv2,
    temp_beside,
)

if TYPE_CHECKING:
    from typing_extensions import Self


def _voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map: bits 0,1,2 of the class id set the top bit of R,G,B, bits
    3,4,5 the next bit, and so on. Class 0 is black; all 256 ids get distinct colours."""
    ids = np.arange(n)
    palette = np.zeros((n, 3), np.int64)
    for j in range(3):  # 3 bit-planes x 3 channels cover ids up to 2**9
        for ch in range(3):
            palette[:, ch] |= ((ids >> (3 * j + ch)) & 1) << (7 - j)
    return palette.astype(np.uint8)


PALETTE = _voc_palette()  # uint8 [256,3]: colour of class id k; row 0 (background) is black


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            is_key: bool = False) -> np.ndarray:
    """Blend each non-background pixel with its class colour; background (0) stays as it is.
    With `is_key`, a small "KEY" tag is drawn in the top-left corner."""
    if labels.shape != frame.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match frame {frame.shape[:2]}")
    out = frame.copy()
    mask = labels != 0
    if mask.any():
        colours = PALETTE[labels[mask]].astype(np.float32)
        out[mask] = np.rint((1 - alpha) * frame[mask] + alpha * colours).astype(np.uint8)
    if is_key:
        _key_tag(out)
    return out


def _key_tag(image: np.ndarray) -> None:
    cv2 = import_cv2()
    scale = max(0.3, image.shape[0] / 720)
    thickness = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize("KEY", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(3 * scale))
    cv2.rectangle(image, (0, 0), (tw + 2 * pad, th + base + 2 * pad), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, "KEY", (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)


def rle_encode(labels: np.ndarray) -> dict[str, Any]:
    """Run-length code of a uint8 [H,W] label map in row-major order:
    {"size": [H, W], "order": "row-major", "runs": [[value, length], ...]}."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected an integer [H,W] label map, got {labels.dtype} {labels.shape}")
    flat = labels.ravel()
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError("label values must be within 0..255")
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], starts)) if flat.size else starts
    lengths = np.diff(np.append(starts, flat.size))
    runs = np.stack([flat[starts].astype(np.int64), lengths], axis=1)
    return {"size": [int(labels.shape[0]), int(labels.shape[1])], "order": "row-major",
            "runs": runs.tolist()}


def rle_decode(code: Mapping[str, Any]) -> np.ndarray:
    """Exact inverse of `rle_encode`: uint8 [H,W]."""
    height, width = (int(v) for v in code["size"])
    if code.get("order", "row-major") != "row-major":
        raise ValueError(f"unsupported run order {code['order']!r} (expected 'row-major')")
    runs = np.asarray(code["runs"], dtype=np.int64).reshape(-1, 2)
    if (runs[:, 1] < 0).any() or runs[:, 1].sum() != height * width:
        raise ValueError(f"run lengths sum to {runs[:, 1].sum()}, not {height}x{width}")
    if ((runs[:, 0] < 0) | (runs[:, 0] > 255)).any():
        raise ValueError("run values must be within 0..255")
    return np.repeat(runs[:, 0].astype(np.uint8), runs[:, 1]).reshape(height, width)


def frame_record(index: int, is_key: bool, labels: np.ndarray, class_names: Sequence[str],
                 times: Mapping[str, float]) -> dict[str, Any]:
    """One frame's JSON record. `times` maps stage name → milliseconds."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    classes = {(class_names[k] if k < len(class_names) else f"class_{k}"): int(n)
               for k, n in enumerate(counts) if n}
    return {"frame": int(index), "key": bool(is_key), "labels": rle_encode(labels),
            "classes": classes, "time_ms": {k: round(float(v), 3) for k, v in times.items()}}


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class JsonlWriter(StagedOutput):
    """One JSON object per line; the file appears at `path` only on success (StagedOutput)."""

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        assert self._tmp is not None
        self._file: Any = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish
        self.records = 0

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: write after close")
        self._file.write(json.dumps(record, separators=(",", ":"), default=_json_default) + "\n")
        self.records += 1

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> None:
    """Write `summary` as indented JSON, atomically (temp file beside `path`, then replace)."""
    path = Path(path)
    check_folder(path)
    tmp = temp_beside(path)
    try:
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ResultWriter:
    """The run's outputs: an annotated video and/or a JSONL file, one `write` per frame.

    Frames are written at `size` (H, W): frames are resized with `fit_frame` and labels with
    nearest neighbour when they differ; the JSONL keeps the labels as given. Both files appear
    only when the block succeeds, and neither when it fails. Not thread-safe: call it from one
    writer thread (opening and closing may happen on another).
    """

    def __init__(self, video_path: str | os.PathLike[str] | None,
                 jsonl_path: str | os.PathLike[str] | None, fps: float,
                 size: tuple[int, int] | None, class_names: Sequence[str], alpha: float = 0.5):
        if video_path is not None and size is None:
            raise ValueError("ResultWriter needs `size` to write a video")
        if (video_path is not None and jsonl_path is not None
                and Path(video_path).resolve() == Path(jsonl_path).resolve()):
            raise ValueError(f"video and JSONL outputs are the same file: {video_path}")
        self.size = size
        self.class_names = tuple(class_names)
        self.alpha = alpha
        self.frames = 0
        self.video: VideoWriter | None = None
        self.jsonl: JsonlWriter | None = None
        try:
            if video_path is not None:
                assert size is not None
                self.video = VideoWriter(video_path, fps, size)
            if jsonl_path is not None:
                self.jsonl = JsonlWriter(jsonl_path)
        except BaseException:
            self.abort()
            raise

    def _outputs(self) -> list[StagedOutput]:
        return [w for w in (self.video, self.jsonl) if w is not None]

    def write(self, index: int, frame: np.ndarray, labels: np.ndarray, is_key: bool,
              times: Mapping[str, float]) -> None:
        """Add one frame: RGB uint8 [H,W,3], labels uint8 [h,w], `times` in milliseconds."""
        if self.video is not None:
            assert self.size is not None
            shown = fit_frame(frame, self.size)
            lab = labels
            if lab.shape != self.size:
                cv2 = import_cv2()
                lab = cv2.resize(lab, self.size[::-1], interpolation=cv2.INTER_NEAREST)
            self.video.write(overlay(shown, lab, self.alpha, is_key=is_key))
        if self.jsonl is not None:
            self.jsonl.write(frame_record(index, is_key, labels, self.class_names, times))
        self.frames += 1

    def close(self) -> None:
        """Finish every output first, then move them into place (nothing moves if one fails)."""
        try:
            for out in self._outputs():
                out.finish()
            for out in self._outputs():
                out.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove both temp files; the output paths are left as they were."""
        try:
            if self.video is not None:
                self.video.abort()
        finally:
            if self.jsonl is not None:
                self.jsonl.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
