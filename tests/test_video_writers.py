"""Video decode/encode and result writers: round trips, refusals, and nothing partial on failure."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("cv2", reason="video I/O needs opencv-python-headless")

from dff.data.synthetic import CLASS_NAMES, make_clip
from dff.runtime.video import (
    VideoError,
    VideoWriter,
    check_size,
    fit_frame,
    open_video,
    parse_size,
    write_synthetic_clip,
)
from dff.runtime.writers import (
    PALETTE,
    JsonlWriter,
    ResultWriter,
    frame_record,
    overlay,
    rle_decode,
    rle_encode,
    write_summary,
)

H, W, T = 64, 96, 12


@pytest.fixture(scope="module")
def clip():
    return make_clip(7, T, H, W)


class Boom(Exception):
    pass


# --- reading and writing videos -------------------------------------------------------------

@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_video_round_trip_keeps_count_size_fps_and_pixels(tmp_path, ext):
    path = tmp_path / f"clip{ext}"
    clip = write_synthetic_clip(path, seed=3, num_frames=T, height=H, width=W, fps=12.5)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    with open_video(path) as video:
        assert (video.height, video.width) == (H, W)
        assert video.frame_count == T
        assert video.fps == pytest.approx(12.5, rel=1e-3)
        frames = np.stack(list(video))
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    assert not video.truncated and video.frames_read == T
    error = np.abs(frames.astype(np.int16) - clip.frames).mean()
    assert error < 12, f"mean abs error {error:.2f} (lossy codec, but RGB order must survive)"


def test_reader_is_a_single_pass(tmp_path):
    path = tmp_path / "clip.avi"
    write_synthetic_clip(path, seed=1, num_frames=3, height=H, width=W)
    video = open_video(path)
    assert len(list(video)) == 3
    with pytest.raises(RuntimeError, match="already iterated"):
        iter(video)


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "folder"])
def test_open_video_refuses_non_videos_naming_the_file(tmp_path, kind):
    path = tmp_path / "input.mp4"
    if kind == "text":
        path.write_text("this is not a video\n" * 10)
    elif kind == "empty":
        path.touch()
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(VideoError, match="input.mp4") as info:
        open_video(path)
    assert "\n" not in str(info.value)


def test_open_video_refuses_a_video_without_frames(tmp_path):
    path = tmp_path / "nothing.avi"
    with VideoWriter(path, 25, (H, W)):
        pass
    with pytest.raises(VideoError, match="nothing.avi"):
        open_video(path)


def test_cut_off_video_ends_early_and_is_marked_truncated(tmp_path):
    path = tmp_path / "full.avi"
    noise = np.random.default_rng(0).integers(0, 256, (20, H, W, 3), dtype=np.uint8)
    with VideoWriter(path, 25, (H, W)) as out:
        for frame in noise:
            out.write(frame)
    cut = tmp_path / "cut.avi"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with open_video(cut) as video:
        n = sum(1 for _ in video)
    assert 0 < n < 20 and video.frames_read == n
    assert video.truncated


def test_video_writer_leaves_target_untouched_when_the_block_raises(tmp_path, clip):
    old = tmp_path / "old.mp4"
    old.write_bytes(b"previous result")
    new = tmp_path / "new.mp4"
    for path in (old, new):
        with pytest.raises(Boom), VideoWriter(path, 25, (H, W)) as out:
            out.write(clip.frames[0])
            raise Boom
    assert old.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["old.mp4"]


@pytest.mark.parametrize("name, size, match", [
    ("missing/out.mp4", (H, W), "does not exist"),
    ("out.gif", (H, W), "cannot write '.gif'"),
    ("out.mp4", (65, 96), "even"),
])
def test_video_writer_refuses_bad_targets(tmp_path, name, size, match):
    with pytest.raises(VideoError, match=match):
        VideoWriter(tmp_path / name, 25, size)
    assert os.listdir(tmp_path) == []


def test_video_writer_rejects_frames_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="expected uint8"), \
            VideoWriter(tmp_path / "out.mp4", 25, (H, W)) as out:
        out.write(np.zeros((H, W + 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []


# --- sizes ----------------------------------------------------------------------------------

PROFILE_MIN, PROFILE_MAX = [1, 64, 64], [4, 256, 448]


def test_check_size_accepts_multiples_of_16_within_the_profile():
    check_size(64, 96, PROFILE_MIN, PROFILE_MAX)
    check_size(256, 448, PROFILE_MIN, PROFILE_MAX)


@pytest.mark.parametrize("height, width, match", [
    (64, 100, "not a multiple of 16"),
    (480, 640, "above the profile's maximum 256x448.*--max-shape 4x480x640"),
    (48, 96, "below the profile's minimum 64x64.*--min-shape 1x48x64"),
])
def test_check_size_says_the_size_the_range_and_the_fix(height, width, match):
    with pytest.raises(VideoError, match=match) as info:
        check_size(height, width, PROFILE_MIN, PROFILE_MAX)
    message = str(info.value)
    assert f"{height}x{width}" in message and "64..256" in message and "64..448" in message
    resize = message.split("--resize ")[1].split()[0]
    check_size(*parse_size(resize), PROFILE_MIN, PROFILE_MAX)  # the suggestion itself is valid


def test_fit_frame_resizes_only_when_asked(clip):
    frame = clip.frames[0]
    assert fit_frame(frame, None) is frame
    assert fit_frame(frame, (H, W)) is frame
    assert fit_frame(frame, (32, 48)).shape == (32, 48, 3)
    assert fit_frame(frame, (128, 160)).shape == (128, 160, 3)


# --- run-length codes -----------------------------------------------------------------------

def _label_maps(clip):
    rng = np.random.default_rng(0)
    yield "random", rng.integers(0, 5, (H, W), dtype=np.uint8)
    yield "full range", rng.integers(0, 256, (7, 5), dtype=np.uint8)
    yield "real", clip.labels[T // 2]
    yield "one value", np.full((H, W), 3, np.uint8)
    yield "single pixel", np.array([[4]], np.uint8)
    yield "one row", np.array([[0, 0, 1, 1, 1, 0]], np.uint8)


def test_rle_round_trip_is_exact(clip):
    for name, labels in _label_maps(clip):
        code = json.loads(json.dumps(rle_encode(labels)))
        assert code["size"] == list(labels.shape) and code["order"] == "row-major", name
        runs = np.array(code["runs"])
        assert runs[:, 1].sum() == labels.size and (runs[:, 1] > 0).all(), name
        assert (runs[1:, 0] != runs[:-1, 0]).all(), name  # maximal runs
        decoded = rle_decode(code)
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, labels), name
    assert rle_encode(np.full((H, W), 3, np.uint8))["runs"] == [[3, H * W]]


def test_rle_decode_refuses_lengths_that_do_not_fill_the_map():
    with pytest.raises(ValueError, match="sum to 5"):
        rle_decode({"size": [2, 3], "order": "row-major", "runs": [[1, 5]]})


# --- JSON outputs ---------------------------------------------------------------------------

def test_jsonl_has_one_parseable_record_per_frame(tmp_path, clip):
    path = tmp_path / "frames.jsonl"
    with JsonlWriter(path) as out:
        for i, labels in enumerate(clip.labels):
            out.write(frame_record(i, i % 5 == 0, labels, CLASS_NAMES,
                                   {"feature": 1.23456789, "task": np.float32(0.5)}))
    lines = path.read_text().splitlines()
    assert len(lines) == T and os.listdir(tmp_path) == ["frames.jsonl"]
    for i, line in enumerate(lines):
        record = json.loads(line)
        assert record["frame"] == i and record["key"] == (i % 5 == 0)
        assert record["time_ms"] == {"feature": 1.235, "task": 0.5}
        assert np.array_equal(rle_decode(record["labels"]), clip.labels[i])
        counts = np.bincount(clip.labels[i].ravel(), minlength=len(CLASS_NAMES))
        assert record["classes"] == {n: int(c) for n, c in zip(CLASS_NAMES, counts) if c}


def test_write_summary_is_atomic_json(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, {"fps": np.float64(31.5), "frames": np.int64(12)})
    assert json.loads(path.read_text()) == {"fps": 31.5, "frames": 12}
    with pytest.raises(TypeError):
        write_summary(path, {"bad": object()})
    assert os.listdir(tmp_path) == ["summary.json"]
    assert json.loads(path.read_text())["frames"] == 12


def test_result_writer_writes_video_and_jsonl_on_success(tmp_path, clip):
    video, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    with ResultWriter(video, jsonl, 25, (H, W), CLASS_NAMES) as out:
        for i, (frame, labels) in enumerate(zip(clip.frames, clip.labels)):
            out.write(i, frame, labels, i == 0, {"total": 2.0})
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.mp4"]
    with open_video(video) as reader:
        assert reader.frame_count == T and reader.size == (H, W)
    assert len(jsonl.read_text().splitlines()) == T


def test_result_writer_scales_labels_to_the_video_size(tmp_path, clip):
    video, jsonl = tmp_path / "big.avi", tmp_path / "big.jsonl"
    with ResultWriter(video, jsonl, 25, (2 * H, 2 * W), CLASS_NAMES) as out:
        out.write(0, clip.frames[0], clip.labels[0], False, {})
    with open_video(video) as reader:
        assert reader.size == (2 * H, 2 * W)
    record = json.loads(jsonl.read_text())
    assert np.array_equal(rle_decode(record["labels"]), clip.labels[0])  # JSONL keeps model size


def test_result_writer_leaves_nothing_when_the_block_raises(tmp_path, clip):
    video, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    with pytest.raises(Boom), ResultWriter(video, jsonl, 25, (H, W), CLASS_NAMES) as out:
        out.write(0, clip.frames[0], clip.labels[0], True, {"total": 1.0})
        raise Boom
    assert os.listdir(tmp_path) == []


def test_result_writer_refuses_a_missing_folder_without_leaving_temp_files(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        ResultWriter(tmp_path / "out.mp4", tmp_path / "nope" / "out.jsonl", 25, (H, W),
                     CLASS_NAMES)
    assert os.listdir(tmp_path) == []


# --- overlay --------------------------------------------------------------------------------

def test_palette_is_black_for_background_and_distinct_for_32_classes():
    assert PALETTE.dtype == np.uint8 and PALETTE.shape[1] == 3 and len(PALETTE) >= 32
    assert (PALETTE[0] == 0).all()
    assert len({tuple(c) for c in PALETTE[:32]}) == 32


def test_overlay_colours_objects_and_leaves_background_alone(clip):
    frame, labels = clip.frames[0], clip.labels[0]
    out = overlay(frame, labels, alpha=0.5)
    background, objects = labels == 0, labels != 0
    assert background.any() and objects.any()
    assert np.array_equal(out[background], frame[background])
    changed = (out[objects] != frame[objects]).any(axis=-1)
    assert changed.mean() > 0.95
    assert np.array_equal(frame, clip.frames[0])  # input not modified


def test_overlay_marks_key_frames_in_the_corner(clip):
    frame, labels = clip.frames[0], np.zeros((H, W), np.uint8)
    plain, key = overlay(frame, labels), overlay(frame, labels, is_key=True)
    assert np.array_equal(plain, frame)
    assert (key[:8, :8] != frame[:8, :8]).any()
    assert np.array_equal(key[H // 2:, W // 2:], frame[H // 2:, W // 2:])
