"""Accuracy and speed of a DFF checkpoint on the synthetic evaluation split.

Per-frame inference, DFF at each key interval, and the naive baseline that copies the key
frame's features unchanged (flow = 0, scale = 1): mIoU over all frames of the split
(segmentation) or AP@0.5 and AP@[.5:.95] from pycocotools (detection, dff.models.metrics),
and frames per second of the PyTorch backend (batch 1, frames in order, decoding included).
Also the flow net's end-point error against the exact flow, on the pairs DFF at k=10 uses.
With a host flow (dff-eval --flow dis: a DisFlow, runtime/flows.py) the DFF modes warp with
DIS's flow instead of the flow net's (the torch backend's warp), and the EPE is DIS's.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from dff.data.synthetic import EVAL_FRAMES, EVAL_SEEDS, make_clip
from dff.models.dff import DFF
from dff.models.metrics import clip_ground_truth, confusion, detection_ap, miou
from dff.runtime.flows import DisFlow
from dff.runtime.scheduler import FixedInterval
from dff.runtime.step import Frame, Step, StreamState
from dff.runtime.torch_backend import TorchBackend

from dff.tasks import DETECTION

DEFAULT_INTERVALS = (1, 2, 5, 10, 20)


def run_streams(model: DFF, clips: list[np.ndarray], schedulers: list, *, copy: bool = False,
                rotate: bool = False, flow: DisFlow | None = None
                ) -> tuple[list[list[dict]], list[int], float]:
    """Each clip (HWC uint8 frames) a stream under its scheduler, through the runtime's one DFF
    step (runtime/step.py) on the torch backend, a frame at a time: frame t of every clip
    before frame t + 1 of any (`rotate`: the streams' order turns by one each frame, so none
    has first claim on a shared key-frame budget). `copy` is the naive baseline (non-key
    frames take the key frame's features as they are); `flow` a host flow (DisFlow, warped by
    the torch backend's warp) in place of the model's flow net. Per clip its frames' task outputs
    (step.frame_outputs: labels, or the detections in use), per clip its key frames, and the
    seconds spent."""
    learned = any(s.needs_quality for s in schedulers)
    step = Step(TorchBackend(model, quality=learned), max_batch=1, copy=copy, flow=flow)
    streams = [StreamState(s, number=i) for i, s in enumerate(schedulers)]
    outs: list[list[dict]] = [[] for _ in clips]
    for s in schedulers:
        s.reset()
    start = time.perf_counter()
    for t in range(max(len(c) for c in clips)):
        for i in range(len(clips)):
            k = (i + t) % len(clips) if rotate else i
            if t < len(clips[k]):
                frame = Frame(streams[k], t, clips[k][t])
                step([frame])
                outs[k].append(frame.outputs())
    return outs, [s.key_frames for s in streams], time.perf_counter() - start


def run_mode(model: DFF, frames: np.ndarray, interval: int | None,
             copy: bool, flow: DisFlow | None = None) -> tuple[list[dict], float]:
    """Every frame's task outputs of a clip (HWC uint8), and the seconds spent (the decode
    included). ``interval=None`` is per-frame inference (N_task(N_feat(frame)) every frame)."""
    outs, _, seconds = run_streams(model, [frames], [FixedInterval(interval or 1)], copy=copy,
                                   flow=flow)
    return outs[0], seconds


def run_clip(model: DFF, frames: np.ndarray, labels: np.ndarray, interval: int | None,
             copy: bool, conf: np.ndarray, flow: DisFlow | None = None) -> float:
    """Segment one clip; add to ``conf``; return seconds spent in the model."""
    outs, elapsed = run_mode(model, frames, interval, copy, flow)
    for i, out in enumerate(outs):
        conf += confusion(out["labels"].astype(np.int64), labels[i], conf.shape[0])
    return elapsed


def detect_clip(model: DFF, frames: np.ndarray, interval: int | None,
                copy: bool, flow: DisFlow | None = None) -> tuple[list[dict], float]:
    """Detections of one clip, one {boxes, scores, classes, num} per frame (the rows in use),
    and the seconds spent in the model and its decoding."""
    return run_mode(model, frames, interval, copy, flow)


def cell_flow(clip, t: int, key: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact flow from frame t to frame `key` on the feature grid, in cells [2,h,w] (the
    mean pixel flow over each cell's valid pixels / stride), and each cell's count of valid
    pixels [h,w]."""
    flow_px, valid = clip.flow(t, key)
    _, h, w = flow_px.shape
    blocks = (h // stride, stride, w // stride, stride)
    v = valid.reshape(blocks).sum((1, 3))
    return (flow_px * valid).reshape((2,) + blocks).sum((2, 4)) / np.maximum(v, 1) / stride, v


def flow_epe(model: DFF, clip, frames: torch.Tensor, interval: int = 10,
             flow: DisFlow | None = None) -> tuple[float, int]:
    """Sum of per-cell end-point errors (in cells) over valid cells, and their count, for the
    pairs (current, key) of a fixed schedule at ``interval``: of the model's flow net, or of
    `flow` (DIS) where given."""
    stride = model.config.stride
    h, w = clip.frames.shape[1:3]
    grey = [flow.prepare(f) for f in clip.frames] if flow is not None else []
    total, count = 0.0, 0
    for t in range(len(frames)):
        key = t - t % interval
        if key == t:
            continue
        target, v = cell_flow(clip, t, key, stride)
        if flow is not None:
            pred = flow.flow(grey[t], grey[key], (h // stride, w // stride))
        else:
            with torch.no_grad():
                pred = model.flow(frames[t:t + 1], frames[key:key + 1])[0][0].numpy()
        err = np.linalg.norm(pred - target, axis=0)
        mask = v >= stride * stride / 4
        total += float(err[mask].sum())
        count += int(mask.sum())
    return total, count


def evaluate(model: DFF, intervals=DEFAULT_INTERVALS, num_clips: int | None = None,
             num_frames: int = EVAL_FRAMES, progress: bool = True,
             flow: DisFlow | None = None) -> dict:
    """The table of dff-eval (module docstring); `flow` (DisFlow) runs the DFF modes, and the
    EPE, with DIS in place of the model's flow net."""
    from tqdm import tqdm

    h, w = model.config.input_size
    k = model.config.num_classes
    detect = model.config.task == DETECTION
    seeds = EVAL_SEEDS[:num_clips] if num_clips else EVAL_SEEDS
    modes = [("per_frame", None, False)]
    modes += [("dff", i, False) for i in intervals] + [("copy", i, True) for i in intervals if i > 1]
    confs = {m: np.zeros((k, k), np.int64) for m in modes}
    found: dict = {m: [] for m in modes}  # detection: (ground truth, detections) per frame
    times = {m: 0.0 for m in modes}
    epe_sum, epe_n, nframes = 0.0, 0, 0
    run_mode(model, make_clip(seeds[0], 2, h, w).frames, 2, False, flow)  # untimed: the
    # first call pays one-time costs (allocator, kernel choice) that would land on per-frame
    for seed in tqdm(seeds, desc="evaluate", disable=not progress):
        clip = make_clip(seed, num_frames, h, w)
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
        nframes += len(frames)
        for mode in modes:
            dis = flow if mode[0] == "dff" and (mode[1] or 1) > 1 else None
            if detect:
                dets, seconds = detect_clip(model, clip.frames, mode[1], mode[2], dis)
                found[mode] += zip(clip_ground_truth(clip), dets)
                times[mode] += seconds
            else:
                times[mode] += run_clip(model, clip.frames, clip.labels, mode[1], mode[2],
                                        confs[mode], dis)
        s, n = flow_epe(model, clip, frames, flow=flow)
        epe_sum, epe_n = epe_sum + s, epe_n + n

    aps = {m: detection_ap(found[m], model.config.class_names, model.config.max_detections)
           for m in modes} if detect else {}

    def entry(mode):
        fps = round(nframes / times[mode], 2)
        if detect:
            return {"map50": aps[mode]["map50"], "map": aps[mode]["map"], "fps": fps}
        return {"miou": round(miou(confs[mode]), 5), "fps": fps}

    per_frame = entry(modes[0])
    stride = model.config.stride
    epe_cells = epe_sum / max(epe_n, 1)
    res = {
        "per_frame": per_frame,
        "dff": {str(m[1]): entry(m) for m in modes if m[0] == "dff"},
        # at k=1 every frame is a key frame: copying and warping are the same run
        "copy": {str(i): entry(("dff", 1, False) if i == 1 else ("copy", i, True))
                 for i in intervals},
        "flow_epe": round(epe_cells * stride, 4),        # input pixels, on the feature grid
        "flow_epe_cells": round(epe_cells, 5),
        "frames": nframes, "clips": len(seeds),
    }
    if detect:
        return {"task": DETECTION, **res, "class_ap_per_frame": aps[modes[0]]["per_class"],
                "detections_per_frame": aps[modes[0]]["detections"]}
    return {**res, "class_iou_per_frame": [round(x, 4) for x in _class_iou(confs[modes[0]])]}


def _class_iou(conf: np.ndarray) -> list[float]:
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    return list(np.where(union > 0, inter / np.maximum(union, 1), np.nan))
