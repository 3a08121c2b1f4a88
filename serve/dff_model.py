"""Triton Python-backend BLS model `dff`: Deep Feature Flow per stream (DESIGN.md §7).

Each sequence (a video stream, keyed by its correlation id) owns a scheduler
(dff.runtime.scheduler) and its key frame's image and features, here in the model instance.
Per batch the requests are split into key and non-key frames: one `flow` call for the non-key
frames, then one `feature` call for the key frames (those the adaptive schedule redoes after
their flow included), then one `task` call for all, as runtime.Pipeline does frame by frame.
A call is a BLS request to the stage model, or, when the config's parameter `inline_graphs`
names the graphs (`--stages inline`), a run of this process's own ONNX Runtime CPU session.
A stream's state is made on START, freed on END, and swept once idle for the sequence
batcher's max_sequence_idle_microseconds. A bad request gets an error response of its own;
one saying "has no state here" or "its state is dropped" makes dff-run --server start a new
sequence (runtime/remote.py SEQUENCE_GONE): keep those words.

dff-serve repo copies this file to `dff/1/model.py`; the config's parameters give the
schedule, the stride and profile of the export, the stages' batch limit, and the stage models'
names or the inline graphs' files (beside this one) and ONNX Runtime threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from dff.runtime.scheduler import make_scheduler
from dff.serve.triton_tensors import array, tensor


class FrameError(Exception):
    """This request cannot be run; its error response says why."""


def _error(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class _Stream:
    """One sequence: its scheduler, frame count, key frame, frame size and last use."""

    def __init__(self, scheduler, now: float):
        self.scheduler = scheduler
        self.scheduler.reset()
        self.t = 0
        self.key_image: np.ndarray | None = None  # [3,H,W] uint8
        self.key_feat: np.ndarray | None = None   # [C,h,w] float32
        self.shape: tuple[int, ...] | None = None  # (H, W)
        self.seen = now


class _Frame:
    __slots__ = ("corrid", "end", "image", "index", "stream")

    def __init__(self, index: int, corrid: int, stream: _Stream, image: np.ndarray, end: bool):
        self.index, self.corrid, self.stream, self.end = index, corrid, stream, end
        self.image = image  # HWC uint8, a view of the request's tensor (valid in `execute`)


def _nchw(frames: list[_Frame]) -> np.ndarray:
    """The frames as one owned [N,3,H,W] batch: one copy per frame, straight from the
    requests' HWC tensors (a transposed copy each and then a stack took about 3x as long)."""
    h, w, c = frames[0].image.shape
    images = np.empty((len(frames), c, h, w), dtype=frames[0].image.dtype)
    for j, f in enumerate(frames):
        images[j] = f.image.transpose(2, 0, 1)
    return images


def _rows(batch: np.ndarray, rows: list[int]) -> np.ndarray:
    """batch[rows], without a copy when that is the whole batch in order."""
    return batch if len(rows) == len(batch) else batch[rows]


class TritonPythonModel:
    """The per-stream state and the three stage calls per batch."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.schedule, self.key_interval = p["schedule"], int(p["key_interval"])
        self.thresholds = json.loads(p.get("thresholds", "{}"))
        self.key_budget = json.loads(p.get("key_budget", "null"))
        self.stride, self.profile = int(p["stride"]), json.loads(p["profile"])
        self.batch = int(p["stage_max_batch"])
        self.models = {g: p.get(f"{g}_model", g) for g in ("feature", "flow", "task")}
        self.sessions = {}  # inline: graph -> ONNX Runtime session, run here instead of BLS
        if "inline_graphs" in p:
            from dff.serve.stage_model import cpu_session

            here = Path(__file__).resolve().parent
            self.sessions = {g: cpu_session(here / f, int(p.get("threads", "1")))
                             for g, f in json.loads(p["inline_graphs"]).items()}
        self.outputs = [o["name"] for o in config["output"] if o["name"] != "is_key"]
        self.scalars = {o["name"] for o in config["output"]  # per-frame scalars: `num`
                        if o.get("reshape") is not None and not o["reshape"].get("shape")}
        scheduler = self._scheduler()
        self.needs_flow = scheduler.needs_flow
        self.needs_quality = getattr(scheduler, "needs_quality", False)
        idle_us = config.get("sequence_batching", {}).get("max_sequence_idle_microseconds")
        self.idle_s = int(idle_us or 1_000_000) / 1e6  # Triton's default: 1 s
        self.streams: dict[int, _Stream] = {}

    def _scheduler(self):
        return make_scheduler(self.schedule, self.key_interval, self.stride,
                              key_budget=self.key_budget, **self.thresholds)

    # --- requests ---------------------------------------------------------------------------

    def execute(self, requests: list) -> list:
        now = time.monotonic()
        self._sweep(now)
        responses: list = [None] * len(requests)
        rounds: list[list[_Frame]] = []  # a sequence appears at most once per round, in order
        depth: dict[int, int] = {}
        for i, request in enumerate(requests):
            try:
                frame = self._parse(i, request, now)
            except FrameError as e:
                responses[i] = _error(f"{self.name}: {e}")
                continue
            d = depth[frame.corrid] = depth.get(frame.corrid, -1) + 1
            if d == len(rounds):
                rounds.append([])
            rounds[d].append(frame)
        for frames in rounds:
            by_size: dict[tuple[int, ...], list[_Frame]] = {}
            for frame in frames:
                by_size.setdefault(frame.image.shape, []).append(frame)
            for group in by_size.values():
                self._run(group, responses, now)
        return responses

    def _parse(self, index: int, request, now: float) -> _Frame:
        corrid = request.correlation_id()
        start, end = (bool(self._flag(request, n)) for n in ("START", "END"))
        image = array(pb_utils.get_input_tensor_by_name(request, "image"))
        try:
            if image.ndim != 4 or image.shape[0] != 1 or image.shape[3] != 3:
                raise FrameError(f"sequence {corrid}: image {list(image.shape)}, expected one "
                                 "frame [1,H,W,3] (uint8 RGB) per request")
            frame = image[0]
            self._check_size(corrid, frame.shape[0], frame.shape[1])
            stream = _Stream(self._scheduler(), now) if start else self.streams.get(corrid)
            if stream is None:
                raise FrameError(f"sequence {corrid} has no state here (ended, idle longer than "
                                 f"{self.idle_s:g} s, or the server restarted); send its next "
                                 "frame with sequence_start=True")
            if stream.shape is not None and frame.shape[:2] != stream.shape:
                h, w = stream.shape
                raise FrameError(f"sequence {corrid}: frame {frame.shape[1]}x{frame.shape[0]}, "
                                 f"but it started at {w}x{h}; every frame of a stream must "
                                 "have one size (start a new sequence for the new size)")
        except FrameError:
            if start or end:  # a failed first or last frame leaves no state behind
                self.streams.pop(corrid, None)
            raise
        stream.shape = frame.shape[:2]
        if start:  # a new sequence replaces an old one of the same id
            self.streams[corrid] = stream
        return _Frame(index, corrid, stream, frame, end)

    @staticmethod
    def _flag(request, name: str) -> int:
        given = pb_utils.get_input_tensor_by_name(request, name)
        return int(array(given).reshape(-1)[0]) if given is not None else 0

    def _check_size(self, corrid: int, h: int, w: int) -> None:
        s, lo, hi = self.stride, self.profile["min"], self.profile["max"]
        if h % s or w % s:
            raise FrameError(f"sequence {corrid}: frame {w}x{h} is not a multiple of the "
                             f"stride {s} in both sides; resize or crop it (e.g. to "
                             f"{w // s * s or s}x{h // s * s or s})")
        if not (lo[1] <= h <= hi[1] and lo[2] <= w <= hi[2]):
            raise FrameError(f"sequence {corrid}: frame {w}x{h} is outside the export's profile "
                             f"{lo[2]}x{lo[1]} .. {hi[2]}x{hi[1]} (WxH); resize it into it")

    # --- one group of equal-size frames -----------------------------------------------------

    def _run(self, frames: list[_Frame], responses: list, now: float) -> None:
        try:
            outputs, is_key = self._step(frames)
        except FrameError as e:
            for f in frames:  # their schedules saw the frame: those streams start over
                if self.streams.get(f.corrid) is f.stream:
                    del self.streams[f.corrid]
                responses[f.index] = _error(f"{self.name}: sequence {f.corrid}: {e}; its state "
                                            "is dropped, start it again with sequence_start")
            return
        for j, f in enumerate(frames):
            tensors = [tensor(n, outputs[n][j:j + 1].reshape(1) if n in self.scalars
                              else outputs[n][j:j + 1]) for n in self.outputs]
            tensors.append(tensor("is_key", np.array([[is_key[j]]], dtype=bool)))
            responses[f.index] = pb_utils.InferenceResponse(output_tensors=tensors)
            f.stream.t += 1
            f.stream.seen = now
            if f.end and self.streams.get(f.corrid) is f.stream:
                del self.streams[f.corrid]

    def _step(self, frames: list[_Frame]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """Schedule, flow for the non-key frames, feature for the key frames, task for all."""
        is_key = [f.stream.scheduler.decide(f.stream.t, f.image) for f in frames]
        for f, key in zip(frames, is_key):
            if not key and f.stream.key_feat is None:
                raise FrameError(f"{f.stream.scheduler!r} made no key frame at the start")
        images = _nchw(frames)
        rest = [j for j, key in enumerate(is_key) if not key]
        flow_feat = None
        if rest:
            wanted = ["flow", "feat"] if self.needs_flow else ["feat"]
            wanted += ["quality"] if self.needs_quality else []
            out = self._call("flow", {
                "image": _rows(images, rest),
                "key_image": np.stack([frames[j].stream.key_image for j in rest]),
                "key_feat": np.stack([frames[j].stream.key_feat for j in rest])}, wanted)
            flow_feat = out["feat"]
            if self.needs_flow:
                for k, j in enumerate(rest):
                    quality = out["quality"][k:k + 1] if self.needs_quality else None
                    if not frames[j].stream.scheduler.accept(out["flow"][k:k + 1], quality):
                        is_key[j] = True  # propagation not trusted: redone as a key frame
        keys = [j for j, key in enumerate(is_key) if key]
        if not keys:  # every frame's features came from the flow call, in order
            feats = flow_feat
        else:
            key_feat = self._call("feature", {"image": _rows(images, keys)}, ["feat"])["feat"]
            for k, j in enumerate(keys):
                frames[j].stream.key_feat = key_feat[k].copy()
                frames[j].stream.key_image = images[j].copy()
            if len(keys) == len(frames):
                feats = key_feat
            else:
                feats = np.empty((len(frames), *key_feat.shape[1:]), dtype=key_feat.dtype)
                feats[keys] = key_feat
                kept = [k for k, j in enumerate(rest) if not is_key[j]]
                feats[[rest[k] for k in kept]] = _rows(flow_feat, kept)
        outputs = self._call("task", {"feat": feats}, self.outputs)
        return outputs, is_key

    def _call(self, stage: str, inputs: dict[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
        """`stage` on the whole batch (in slices of the stage's max batch): its inline session,
        else a BLS request to its model."""
        n = len(next(iter(inputs.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        model, session = self.models[stage], self.sessions.get(stage)
        for lo in range(0, n, self.batch):
            rows = min(self.batch, n - lo)
            feeds = {k: v if rows == n else v[lo:lo + rows] for k, v in inputs.items()}
            if session is not None:
                try:
                    values = session.run(outputs, feeds)
                except Exception as e:  # ONNX Runtime's own error types
                    raise FrameError(f"graph {stage!r} failed: {str(e).strip()[:500]}") from e
                for name, value in zip(outputs, values):  # owned arrays already
                    parts[name].append(value)
                continue
            request = pb_utils.InferenceRequest(
                model_name=model, requested_output_names=outputs,
                inputs=[tensor(k, v) for k, v in feeds.items()])
            response = request.exec()
            if response.has_error():
                raise FrameError(f"model {model!r} failed: {response.error().message()}")
            for name in outputs:  # owned copies: the views die with the response
                value = array(pb_utils.get_output_tensor_by_name(response, name))
                parts[name].append(value.reshape(rows, *value.shape[1:]).copy())
        return {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    def _sweep(self, now: float) -> None:
        """Forget streams idle longer than the sequence batcher's idle timeout (Triton has
        released their slots and refuses their next frame without START)."""
        for corrid, stream in list(self.streams.items()):
            if now - stream.seen > self.idle_s:
                del self.streams[corrid]
                pb_utils.Logger.log_info(f"{self.name}: sequence {corrid} idle for "
                                         f"{now - stream.seen:.1f} s, its state freed")

    def finalize(self) -> None:
        self.streams.clear()
        self.sessions.clear()
