"""Video decode and encode with OpenCV: RGB uint8 HWC frames in, RGB frames out.

Readers fail early (missing file, not a video, no frames) with one line that names the file and
the fix; a read failure mid-stream ends the stream and sets ``truncated``. Writers go through a
temp file beside the target and only move it into place when the block succeeds.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dff.errors import DffError
from dff.files import new_file_mode

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_FPS = 25.0
# Container (by extension) → fourcc. cv2's bundled FFmpeg has no H.264 encoder (avc1 fails to
# open), so .mp4/.mov/.mkv get MPEG-4 Part 2 ('mp4v') and .avi gets Motion JPEG.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


class VideoError(DffError):
    """A video that cannot be read or written, or whose size the engines cannot take."""


def import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise VideoError("video input/output needs OpenCV: pip install opencv-python-headless"
                         ) from None
    return cv2


class VideoReader:
    """Frames of one video file, decoded once, in order, as RGB uint8 [H,W,3].

    `open_video` reads the first frame up front so that a file OpenCV cannot decode fails
    there, not in the middle of a run. `frame_count` is the container's count (None when it
    does not say); `truncated` turns True when decoding stops before that count.
    """

    def __init__(self, path: str | os.PathLike[str]):
        cv2 = import_cv2()
        self.path = Path(path)
        if self.path.is_dir():
            raise VideoError(f"{self.path}: is a folder, not a video file; pass the video's path")
        if not self.path.is_file():
            raise VideoError(f"{self.path}: no such file; check the path")
        if self.path.stat().st_size == 0:
            raise VideoError(f"{self.path}: the file is empty (0 bytes); re-copy or re-export it")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise VideoError(f"{self.path}: not a video OpenCV can open (corrupt, or a codec its "
                             f"FFmpeg lacks); re-encode it, e.g. ffmpeg -i IN -c:v mpeg4 OUT.mp4")
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        ok, bgr = cap.read()
        if not ok or bgr is None:
            cap.release()
            if count == 0:
                raise VideoError(f"{self.path}: the video has no frames; export it again")
            raise VideoError(f"{self.path}: cannot decode the first frame (corrupt, or a codec "
                             f"OpenCV's FFmpeg lacks); re-encode it, e.g. "
                             f"ffmpeg -i IN -c:v mpeg4 OUT.mp4")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS
        self.frame_count: int | None = int(count) if math.isfinite(count) and count > 0 else None
        self.height, self.width = bgr.shape[:2]
        self.frames_read = 0
        self.truncated = False
        self._cap: Any = cap
        self._first: np.ndarray | None = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        self._started = False

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError(f"{self.path} was already iterated; open it again to re-read")
        self._started = True
        return self._frames()

    def _frames(self) -> Iterator[np.ndarray]:
        cv2 = import_cv2()
        frame, self._first = self._first, None
        while frame is not None:
            self.frames_read += 1
            yield frame
            ok, bgr = self._cap.read() if self._cap is not None else (False, None)
            frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok and bgr is not None else None
        if self.frame_count is not None and self.frames_read < self.frame_count:
            self.truncated = True
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(path: str | os.PathLike[str]) -> VideoReader:
    """Open a video for reading; raises VideoError naming the file and the fix."""
    return VideoReader(path)


def parse_size(text: str) -> tuple[int, int]:
    """'256x448' → (256, 448), as --resize takes it (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise VideoError(f"--resize {text!r}: expected HEIGHTxWIDTH, e.g. 256x448")
    return int(m[1]), int(m[2])


def fit_frame(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize a frame to (H, W): area averaging when shrinking, bilinear when growing."""
    if size is None or tuple(frame.shape[:2]) == tuple(size):
        return frame
    cv2 = import_cv2()
    height, width = size
    shrink = height <= frame.shape[0] and width <= frame.shape[1]
    return cv2.resize(frame, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def check_size(height: int, width: int, profile_min: Sequence[int], profile_max: Sequence[int],
               stride: int = 16, what: str = "the video") -> None:
    """Refuse a frame size the engines' profile ([N,H,W] min/max) cannot take."""
    (lo_h, lo_w), (hi_h, hi_w) = profile_min[1:3], profile_max[1:3]

    def up(v: int) -> int:
        return -(-v // stride) * stride

    if height < lo_h or width < lo_w:
        problem = f"is below the profile's minimum {lo_h}x{lo_w}"
        shape = f"{profile_min[0]}x{min(lo_h, up(height))}x{min(lo_w, up(width))}"
        reexport = f" or re-export with --min-shape {shape}"
    elif height > hi_h or width > hi_w:
        problem = f"is above the profile's maximum {hi_h}x{hi_w}"
        shape = f"{profile_max[0]}x{max(hi_h, up(height))}x{max(hi_w, up(width))}"
        reexport = f" or re-export with --max-shape {shape}"
    elif height % stride or width % stride:
        problem, reexport = f"is not a multiple of {stride}", ""
    else:
        return
    sh, sw = _suggest_size(height, width, (lo_h, lo_w), (hi_h, hi_w), stride)
    raise VideoError(f"{what} is {height}x{width}, which {problem}; the engines take heights "
                     f"{lo_h}..{hi_h} and widths {lo_w}..{hi_w} in multiples of {stride}: pass "
                     f"--resize {sh}x{sw} (a multiple of {stride} within the profile){reexport}")


def _suggest_size(height: int, width: int, lo: tuple[int, int], hi: tuple[int, int],
                  stride: int) -> tuple[int, int]:
    """The valid size nearest to (height, width) at about the same aspect ratio."""
    scale = min(1.0, hi[0] / height, hi[1] / width)
    scale = max(scale, lo[0] / height, lo[1] / width)
    out = []
    for v, a, b in ((height, lo[0], hi[0]), (width, lo[1], hi[1])):
        first, last = -(-a // stride) * stride, b // stride * stride
        out.append(min(max(round(v * scale / stride) * stride, first), last))
    return out[0], out[1]


def check_folder(path: Path) -> None:
    """Refuse an output path whose folder does not exist (we do not create folders silently)."""
    folder = path.parent
    if not folder.is_dir():
        raise VideoError(f"{path}: the folder {folder} does not exist; create it first")


def temp_beside(path: Path) -> Path:
    """A fresh temp file in `path`'s folder, ending in the same extension (cv2 picks the
    container from it), so the final os.replace is a rename on one file system."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(name, new_file_mode())  # the output's final mode, not mkstemp's private 0600
    return Path(name)


class StagedOutput:
    """An output file written under a temp name beside `path` and moved onto `path` only on
    success: leaving a `with` block normally (or `close()`) commits; an exception (or `abort()`)
    removes the temp file and leaves `path` as it was. Subclasses write to `self._tmp` and
    release their handle in `finish()`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        check_folder(self.path)
        self._tmp: Path | None = temp_beside(self.path)

    def finish(self) -> None:
        """Flush and release the handle, leaving the result in the temp file."""

    def commit(self) -> None:
        """Finish, then move the temp file onto `path`."""
        self.finish()
        if self._tmp is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None

    def close(self) -> None:
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far."""
        try:
            self.finish()
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(StagedOutput):
    """Write RGB uint8 [H,W,3] frames to a video (.mp4/.mov/.mkv: mp4v, .avi: MJPG); the file
    appears at `path` only when the `with` block succeeds (see StagedOutput)."""

    def __init__(self, path: str | os.PathLike[str], fps: float, size: tuple[int, int]):
        cv2 = import_cv2()
        path = Path(path)
        self.fps = float(fps)
        self.size = (int(size[0]), int(size[1]))
        ext = path.suffix.lower()
        if ext not in FOURCC:
            raise VideoError(f"{path}: cannot write '{ext or 'no extension'}' videos; "
                             f"use .mp4 (mp4v) or .avi (MJPG)")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise VideoError(f"{path}: frame rate {fps} is not positive; pass e.g. --fps 25")
        height, width = self.size
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            # FFmpeg's 4:2:0 encoders would silently crop an odd size to even.
            raise VideoError(f"{path}: cannot encode {height}x{width} (the encoders need even, "
                             f"positive sizes); pass --resize with an even HxW")
        self.fourcc = FOURCC[ext]
        self.frames_written = 0
        self._writer: Any = None
        super().__init__(path)
        try:
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*self.fourcc),
                                           self.fps, (width, height))
            if not self._writer.isOpened():
                raise VideoError(f"{path}: OpenCV cannot open a '{self.fourcc}' writer for {ext} "
                                 f"files (its FFmpeg lacks that encoder or container); write "
                                 f".avi (MJPG) instead")
        except BaseException:
            self.abort()
            raise

    def write(self, frame: np.ndarray) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.path}: write after close")
        if frame.shape != (*self.size, 3) or frame.dtype != np.uint8:
            # cv2 silently drops frames of the wrong size; that is a bug in the caller.
            raise ValueError(f"{self.path}: expected uint8 frames of shape {(*self.size, 3)}, "
                             f"got {frame.dtype} {frame.shape}")
        cv2 = import_cv2()
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def write_synthetic_clip(path: str | os.PathLike[str], seed: int, num_frames: int, height: int,
                         width: int, fps: float = DEFAULT_FPS) -> Any:
    """Render a synthetic benchmark clip (dff.data.synthetic) and write it as a video; returns
    the Clip, whose `labels` are the ground truth for the frames in the file."""
    from dff.data.synthetic import make_clip

    clip = make_clip(seed, num_frames, height, width)
    with VideoWriter(path, fps, (height, width)) as out:
        for frame in clip.frames:
            out.write(frame)
    return clip
