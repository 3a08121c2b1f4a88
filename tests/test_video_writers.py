"""Video decode/encode and result writers (segmentation and detection): round trips through
real encoded videos, refusals, and nothing partial on failure."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("cv2", reason="video I/O needs opencv-python-headless")

from dff.data.synthetic import CLASS_NAMES, DETECTION_CLASS_NAMES, make_clip
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
    class_colour,
    detection_record,
    draw_detections,
    frame_record,
    overlay,
    read_detections,
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
            out.write(i, frame, {"labels": labels}, i == 0, {"total": 2.0})
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.mp4"]
    with open_video(video) as reader:
        assert reader.frame_count == T and reader.size == (H, W)
    assert len(jsonl.read_text().splitlines()) == T


def test_result_writer_scales_labels_to_the_video_size(tmp_path, clip):
    video, jsonl = tmp_path / "big.avi", tmp_path / "big.jsonl"
    with ResultWriter(video, jsonl, 25, (2 * H, 2 * W), CLASS_NAMES) as out:
        out.write(0, clip.frames[0], {"labels": clip.labels[0]}, False, {})
    with open_video(video) as reader:
        assert reader.size == (2 * H, 2 * W)
    record = json.loads(jsonl.read_text())
    assert np.array_equal(rle_decode(record["labels"]), clip.labels[0])  # JSONL keeps model size


def test_result_writer_leaves_nothing_when_the_block_raises(tmp_path, clip):
    video, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    with pytest.raises(Boom), ResultWriter(video, jsonl, 25, (H, W), CLASS_NAMES) as out:
        out.write(0, clip.frames[0], {"labels": clip.labels[0]}, True, {"total": 1.0})
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


def test_result_writer_counts_pixels_per_class(tmp_path, clip):
    with ResultWriter(None, tmp_path / "x.jsonl", 25, None, CLASS_NAMES) as out:
        for i in range(3):
            out.write(i, clip.frames[i], {"labels": clip.labels[i]}, i == 0, {})
    counts = np.bincount(clip.labels[:3].ravel(), minlength=len(CLASS_NAMES))
    assert out.class_counts() == {n: int(c) for n, c in zip(CLASS_NAMES, counts)}


# --- detection ------------------------------------------------------------------------------

DH, DW = 192, 256  # big enough for 2-pixel box lines that survive the codec's chroma
BOXES = np.array([[40, 60, 120, 150], [150, 30, 230, 100], [10, 10, 20, 20]], np.float32)
SCORES = np.float32([0.9, 0.5, 0.1])
CLASSES = np.int32([0, 3, 1])


def _detections(n=3):
    return {"boxes": BOXES[:n], "scores": SCORES[:n], "classes": CLASSES[:n],
            "num": np.int32(n)}


def _edge(image, box, scale=1):
    """Mean colour of a box's left edge (2 px wide), off its corners."""
    x0, y0, _, y1 = (int(v * scale) for v in box)
    return image[y0 + 5:y1 - 5, x0:x0 + 2].reshape(-1, 3).astype(float).mean(0)


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_detection_video_draws_each_box_in_its_class_colour(tmp_path, ext):
    frame = np.full((DH, DW, 3), 60, np.uint8)
    path = tmp_path / f"det{ext}"
    with ResultWriter(path, None, 25, (DH, DW), DETECTION_CLASS_NAMES, task="detection",
                      min_score=0.3) as out:
        for i in range(3):
            out.write(i, frame, _detections(), i == 0, {})
    with open_video(path) as video:
        decoded = [f.astype(int) for f in video]
    assert len(decoded) == 3
    for box, k in zip(BOXES[:2], CLASSES[:2]):
        np.testing.assert_allclose(_edge(decoded[1], box), class_colour(int(k)), atol=12)
        x0, y0, x1, y1 = box.astype(int)
        inside = decoded[1][y0 + 10:y1 - 10, x0 + 10:x1 - 10]
        assert np.abs(inside - 60).mean() < 4, "the box's inside is left as it was"
        tab = decoded[1][y0 - 8:y0 - 2, x0 + 2:x0 + 30]  # the "name score" tab above the box
        assert np.abs(tab - np.array(class_colour(int(k)))).mean() < np.abs(tab - 60).mean()
    x0, y0, x1, y1 = BOXES[2].astype(int)  # scores 0.1 < --min-score: not drawn
    assert np.abs(decoded[1][y0:y1, x0:x1] - 60).mean() < 4
    assert np.abs(decoded[0][:8, :8] - 60).mean() > 20, "the key frame's KEY tag"
    assert np.abs(decoded[1][:8, :8] - 60).mean() < 4
    assert out.class_counts() == {"disc": 3, "box": 0, "triangle": 0, "cross": 3}


def test_detection_boxes_follow_the_frame_when_the_video_is_larger(tmp_path):
    small = np.full((DH // 2, DW // 2, 3), 60, np.uint8)
    path = tmp_path / "big.avi"
    with ResultWriter(path, None, 25, (DH, DW), DETECTION_CLASS_NAMES, task="detection") as out:
        out.write(0, small, _detections(1) | {"boxes": BOXES[:1] / 2}, False, {})
    with open_video(path) as video:
        (decoded,) = list(video)
    np.testing.assert_allclose(_edge(decoded, BOXES[0]), class_colour(0), atol=12)


def test_draw_detections_keeps_labels_inside_the_image_and_the_input_unchanged():
    frame = np.full((64, 96, 3), 60, np.uint8)
    boxes = np.float32([[80, 0, 96, 30]])  # at the top right: the tab goes inside, moved left
    out = draw_detections(frame, boxes, np.float32([0.75]), np.int32([2]), DETECTION_CLASS_NAMES)
    assert (frame == 60).all()
    assert (out[:12, 40:80] == class_colour(2)).all(axis=-1).any(), "the tab reaches left"


def test_detection_jsonl_records_every_detection_and_reads_back(tmp_path):
    path = tmp_path / "det.jsonl"
    with ResultWriter(None, path, 25, None, DETECTION_CLASS_NAMES, task="detection",
                      min_score=0.3) as out:
        out.write(0, np.zeros((DH, DW, 3), np.uint8), _detections(), True, {"task": 1.23456})
        out.write(1, np.zeros((DH, DW, 3), np.uint8), _detections(0), False, {})
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["frame"] == 0 and first["key"] and first["time_ms"] == {"task": 1.235}
    assert first["detections"][1] == {"box": [150.0, 30.0, 230.0, 100.0], "score": 0.5,
                                      "class": 3, "name": "cross"}
    assert first["classes"] == {"disc": 1, "cross": 1, "box": 1}  # all rows, --min-score aside
    assert "labels" not in first
    back = read_detections(first)
    np.testing.assert_array_equal(back["boxes"], BOXES)
    np.testing.assert_allclose(back["scores"], SCORES, atol=1e-4)
    assert back["classes"].dtype == np.int32 and back["classes"].tolist() == CLASSES.tolist()
    assert second["detections"] == [] and read_detections(second)["boxes"].shape == (0, 4)
    assert out.class_counts() == {"disc": 1, "box": 0, "triangle": 0, "cross": 1}


def test_detection_record_names_classes_beyond_the_list():
    record = detection_record(3, False, BOXES[:1], SCORES[:1], np.int32([7]), ["disc"], {})
    assert record["detections"][0]["name"] == "class_7" and record["classes"] == {"class_7": 1}
