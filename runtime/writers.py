"""Result writers: annotated video, per-frame JSON lines, summary (docs/DESIGN.md §6).

Segmentation blends class colours over the frame and records labels as run-length codes with
pixel counts per class; detection draws each box in its class's colour with the class name and
score, and records `detections`, a list of {box, score, class, name}. A raw task (dff-export
--onnx without a decode: the model's own outputs) has nothing to draw: its outputs go, frame by
frame, into one .npz per video (`NpzWriter`), entries `<frame:06d>/<output>` and
`<frame:06d>/is_key`; the JSONL records hold the frame, whether it was a key frame and times.

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

from dff.tasks import DETECTION, RAW, SEGMENTATION

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


def class_colour(k: int) -> tuple[int, int, int]:
    """Detection class k's RGB colour: the palette's k + 1, the colour segmentation gives the
    same object (segmentation's class 0 is the background, detection has none)."""
    return tuple(int(c) for c in PALETTE[(k + 1) % len(PALETTE)])  # type: ignore[return-value]


def class_name(class_names: Sequence[str], k: int) -> str:
    return class_names[k] if 0 <= k < len(class_names) else f"class_{k}"


def draw_detections(frame: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                    classes: np.ndarray, class_names: Sequence[str], is_key: bool = False,
                    scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """A copy of `frame` with each box (x0,y0,x1,y1 pixels, times `scale` (sy, sx)) drawn in
    its class's colour and labelled "name score" on a filled tab; the "KEY" tag with `is_key`."""
    cv2 = import_cv2()
    out = np.ascontiguousarray(frame.copy())
    h, w = out.shape[:2]
    font, size = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, h / 720)
    thick = max(2, round(h / 240))
    sy, sx = scale
    for box, score, k in zip(boxes, scores, classes):
        x0, x1 = (round(float(v) * sx) for v in (box[0], box[2]))
        y0, y1 = (round(float(v) * sy) for v in (box[1], box[3]))
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = min(max(x1 - 1, x0), w - 1), min(max(y1 - 1, y0), h - 1)  # x1, y1 exclusive
        colour = class_colour(int(k))
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick)
        text = f"{class_name(class_names, int(k))} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, font, size, 1)
        top = y0 - th - base - 2 if y0 - th - base - 2 >= 0 else y0  # above the box, else inside
        left = max(0, min(x0, w - tw - 2))  # moved left rather than cut at the right edge
        cv2.rectangle(out, (left, top), (left + tw + 2, top + th + base + 2), colour, cv2.FILLED)
        ink = (0, 0, 0) if sum(colour) > 384 else (255, 255, 255)
        cv2.putText(out, text, (left + 1, top + th + 1), font, size, ink, 1, cv2.LINE_AA)
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


def detection_record(index: int, is_key: bool, boxes: np.ndarray, scores: np.ndarray,
                     classes: np.ndarray, class_names: Sequence[str],
                     times: Mapping[str, float]) -> dict[str, Any]:
    """One frame's JSON record for detection: `detections` [{box [x0,y0,x1,y1] px to 0.01,
    score to 1e-4, class, name}] in score order, detections per class, times in ms."""
    detections = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                   "class": int(k), "name": class_name(class_names, int(k))}
                  for box, score, k in zip(boxes, scores, classes)]
    counts: dict[str, int] = {}
    for k in classes:
        name = class_name(class_names, int(k))
        counts[name] = counts.get(name, 0) + 1
    return {"frame": int(index), "key": bool(is_key), "detections": detections,
            "classes": counts, "time_ms": {k: round(float(v), 3) for k, v in times.items()}}


def read_detections(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A detection record's `detections` as arrays: boxes f32 [n,4], scores f32 [n],
    classes i32 [n] (the inverse of `detection_record`, to its rounding)."""
    rows = record["detections"]
    return {"boxes": np.array([d["box"] for d in rows], np.float32).reshape(-1, 4),
            "scores": np.array([d["score"] for d in rows], np.float32),
            "classes": np.array([d["class"] for d in rows], np.int32)}


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


class NpzWriter(StagedOutput):
    """A raw task's outputs, one .npz per video written frame by frame (a zip of .npy entries,
    so no frame waits in memory): `np.load(path)["000012/537"]` is output 537 of frame 12
    ([1, ...] as the graph gave it for that frame), `"000012/is_key"` a bool. Appears at
    `path` only on success (StagedOutput)."""

    def __init__(self, path: str | os.PathLike[str]):
        import zipfile

        super().__init__(path)
        assert self._tmp is not None
        self._zip: Any = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.frames = 0

    def write(self, index: int, outputs: Mapping[str, np.ndarray], is_key: bool) -> None:
        if self._zip is None:
            raise RuntimeError(f"{self.path}: write after close")
        entries = {**{str(k): np.asarray(v) for k, v in outputs.items()},
                   "is_key": np.asarray(bool(is_key))}
        for name, array in entries.items():
            with self._zip.open(f"{index:06d}/{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        self.frames += 1

    def finish(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


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
    """The run's outputs: an annotated video and/or a JSONL file, one `write` per frame, and
    the counts per class the run summary reports (`class_counts`).

    Frames are written at `size` (H, W): frames are resized with `fit_frame`, labels with
    nearest neighbour and boxes scaled when they differ; the JSONL keeps the model's size.
    `task` (segmentation or detection) picks the drawing and the records; detection draws and
    counts the boxes scoring at least `min_score`, and its JSONL keeps every detection. Both
    files appear only when the block succeeds, and neither when it fails. Not thread-safe:
    call it from one writer thread (opening and closing may happen on another).
    """

    def __init__(self, video_path: str | os.PathLike[str] | None,
                 jsonl_path: str | os.PathLike[str] | None, fps: float,
                 size: tuple[int, int] | None, class_names: Sequence[str], alpha: float = 0.5,
                 *, task: str = SEGMENTATION, min_score: float = 0.0):
        if video_path is not None and size is None:
            raise ValueError("ResultWriter needs `size` to write a video")
        if (video_path is not None and jsonl_path is not None
                and Path(video_path).resolve() == Path(jsonl_path).resolve()):
            raise ValueError(f"video and JSONL outputs are the same file: {video_path}")
        if task not in (SEGMENTATION, DETECTION, RAW):
            raise ValueError(f"unknown task {task!r}")
        self.size = size
        self.class_names = tuple(class_names)
        self.alpha, self.task, self.min_score = alpha, task, min_score
        self.frames = 0
        self._counts = np.zeros(max(len(self.class_names), 1), np.int64)
        self.video: VideoWriter | None = None
        self.npz: NpzWriter | None = None  # a raw task's outputs, in place of the video
        self.jsonl: JsonlWriter | None = None
        try:
            if video_path is not None and task == RAW:  # the outputs themselves, no drawing
                self.npz = NpzWriter(video_path)
            elif video_path is not None:
                assert size is not None
                self.video = VideoWriter(video_path, fps, size)
            if jsonl_path is not None:
                self.jsonl = JsonlWriter(jsonl_path)
        except BaseException:
            self.abort()
            raise

    def _outputs(self) -> list[StagedOutput]:
        return [w for w in (self.video, self.npz, self.jsonl) if w is not None]

    def write(self, index: int, frame: np.ndarray, outputs: Mapping[str, np.ndarray],
              is_key: bool, times: Mapping[str, float]) -> None:
        """Add one frame: RGB uint8 [H,W,3], its task outputs (a FrameResult's: `labels` uint8
        [h,w], or `boxes`, `scores`, `classes` cut to the frame's detections), times in ms."""
        if self.task == DETECTION:
            self._write_detections(index, frame, outputs, is_key, times)
        elif self.task == RAW:
            if self.npz is not None:
                self.npz.write(index, outputs, is_key)
            if self.jsonl is not None:
                self.jsonl.write({"frame": index, "key": bool(is_key),
                                  "times_ms": {k: round(float(v), 3) for k, v in times.items()},
                                  "outputs": {k: list(np.shape(v)) for k, v in outputs.items()}})
        else:
            self._write_labels(index, frame, outputs["labels"], is_key, times)
        self.frames += 1

    def _count(self, ids: np.ndarray) -> None:
        counts = np.bincount(ids.ravel().astype(np.int64), minlength=len(self._counts))
        if len(counts) > len(self._counts):
            self._counts = np.pad(self._counts, (0, len(counts) - len(self._counts)))
        self._counts += counts

    def _write_labels(self, index: int, frame: np.ndarray, labels: np.ndarray, is_key: bool,
                      times: Mapping[str, float]) -> None:
        self._count(labels)
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

    def _write_detections(self, index: int, frame: np.ndarray,
                          outputs: Mapping[str, np.ndarray], is_key: bool,
                          times: Mapping[str, float]) -> None:
        boxes, scores, classes = (np.asarray(outputs[n]) for n in ("boxes", "scores", "classes"))
        shown = scores >= self.min_score
        self._count(classes[shown & (classes >= 0)])
        if self.video is not None:
            assert self.size is not None
            scale = (self.size[0] / frame.shape[0], self.size[1] / frame.shape[1])
            self.video.write(draw_detections(fit_frame(frame, self.size), boxes[shown],
                                             scores[shown], classes[shown], self.class_names,
                                             is_key=is_key, scale=scale))
        if self.jsonl is not None:
            self.jsonl.write(detection_record(index, is_key, boxes, scores, classes,
                                              self.class_names, times))

    def class_counts(self) -> dict[str, int]:
        """Per class name, over the frames written: pixels (segmentation), or detections
        scoring at least `min_score` (detection)."""
        return {class_name(self.class_names, k): int(n) for k, n in enumerate(self._counts)
                if n or k < len(self.class_names)}

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
        """Remove the temp files; the output paths are left as they were."""
        try:
            for out in (self.video, self.npz):
                if out is not None:
                    out.abort()
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
