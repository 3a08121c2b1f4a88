"""runtime/step.py, the one DFF step, on a recording backend of numpy one-liners: what each
backend call gets (batching by frame size up to max_batch, one upload a frame), the
accept-or-redo decision, and the checks every runner shares."""

import numpy as np
import pytest
from dff.runtime.backends import Backend, FlowOutputs
from dff.runtime.scheduler import Adaptive, FixedInterval
from dff.runtime.step import Frame, Step, StreamState, check_frame, check_same_size

from dff.errors import DffError


class Recording(Backend):
    """Features are the image's mean over channels at stride 16; `flows` maps a frame's first
    pixel value to the flow the flow stage returns (zero otherwise). Records every call."""

    name, stride, profile = "recording", 16, None
    task_spec = {"kind": "segmentation", "outputs": ["labels"]}  # noqa: RUF012

    def __init__(self, flows=None):
        self.flows, self.calls = flows or {}, []

    def upload(self, image):
        self.calls.append(("upload", image.shape))
        return image.copy()

    def feature(self, image):
        self.calls.append(("feature", image.shape))
        return image[:, :, ::16, ::16].mean(1, keepdims=True)

    def flow(self, image, key_image, key_feat):
        self.calls.append(("flow", image.shape))
        n, _, h, w = key_feat.shape
        flow = np.stack([self.flows.get(int(image[i, 0, 0, 0]), np.zeros((2, h, w), np.float32))
                         for i in range(n)])
        return FlowOutputs(flow, None, key_feat + 1)

    def task(self, feat):
        self.calls.append(("task", feat.shape))
        return {"labels": np.full((len(feat), 2, 2), feat[:, 0, 0, 0], np.float32)}


def frame(value, h=32, w=32):
    f = np.full((h, w, 3), 100, np.uint8)
    f[0, 0, 0] = value
    return f


def test_frames_are_batched_by_size_within_max_batch_and_uploaded_once():
    backend = Recording()
    step = Step(backend, max_batch=2)
    streams = [StreamState(FixedInterval(2), f"s{i}", i) for i in range(4)]
    sizes = [(32, 32), (32, 48), (32, 32), (32, 32)]
    for t in range(2):  # a key step, then a non-key step
        frames = [Frame(s, t, frame(t, *size)) for s, size in zip(streams, sizes)]
        backend.calls.clear()
        step(frames)
        assert [f.is_key for f in frames] == [t == 0] * 4
        stage = "feature" if t == 0 else "flow"
        shapes = [shape for op, shape in backend.calls if op == stage]
        assert shapes == [(2, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 48)]  # size, then batch
        assert [shape[0] for op, shape in backend.calls if op == "upload"] == [2, 1, 1]
        assert [shape[0] for op, shape in backend.calls if op == "task"] == [2, 1, 1]
        # each frame got its own row of its chunk's task outputs
        assert [f.outputs()["labels"].shape for f in frames] == [(2, 2)] * 4
    assert step.calls["flow"].frames == 4 and step.calls["feature"].frames == 4
    assert all(s.frames == 2 and s.key_frames == 1 for s in streams)


def test_a_rejected_flow_redoes_the_frame_as_a_key_frame_without_a_second_upload():
    big = np.full((2, 2, 2), 50.0, np.float32)  # far above the adaptive schedule's limit
    backend = Recording(flows={1: big})
    step = Step(backend)
    stream = StreamState(Adaptive(scene_cut=np.inf, max_interval=100))
    stream.scheduler.reset()
    keys = []
    for t in range(3):
        f = Frame(stream, t, frame(t))
        step([f])
        keys.append(f.is_key)
    assert keys == [True, True, False]  # frame 1's flow was refused: redone
    ops = [op for op, _ in backend.calls]
    assert ops.count("upload") == 3 and ops.count("feature") == 2 and ops.count("flow") == 2
    assert stream.scheduler.stats()["reasons"]["flow"] == 1


def test_the_shared_checks_name_the_frame_and_the_fix():
    with pytest.raises(DffError, match=r"^frame 3: 40x32 is not a multiple of the stride 16"):
        check_frame(np.zeros((32, 40, 3), np.uint8), 16, None, 3)
    with pytest.raises(DffError, match=r"^frame 80x64, but it started at 96x64; every frame of "
                                       r"a video must have one size \(new sequence\)$"):
        check_same_size((64, 80, 3), (64, 96, 3), fix=" (new sequence)")
    stream = StreamState(FixedInterval(2), "cam2", 1)
    step = Step(Recording())
    step([Frame(stream, 0, frame(0))])
    with pytest.raises(DffError, match=r"^cam2: frame 1: 48x32, but it started at 32x32"):
        step([Frame(stream, 1, frame(1, 32, 48))])
