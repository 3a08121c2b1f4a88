"""Triton Python-backend BLS model `dff`: Deep Feature Flow per stream (DESIGN.md §9).

This model keeps only what is Triton's: it parses the requests, keeps one stream state
(runtime/step.py's StreamState) per sequence, keyed by its correlation id, and answers every
request, a bad one with an error response of its own. The frames of a batch are stepped by the
runtime's one DFF step (runtime/step.py) over the stage calls (serve/bls_backend.py: BLS
requests to the stage models, or with the config's parameter `inline_graphs`, `--stages
inline`, this process's own ONNX Runtime CPU sessions). A stream's state is made on START,
freed on END, and swept once idle for the sequence batcher's max_sequence_idle_microseconds.
A refused frame's error says whether its sequence is gone (runtime/remote.py reads `code`:
SEQUENCE_GONE starts a new sequence); keep the codes.

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
from dff.runtime.remote import SEQUENCE_GONE
from dff.runtime.scheduler import make_scheduler
from dff.runtime.step import Frame, Step, StreamState, check_frame, check_same_size
from dff.serve.bls_backend import StageBackend
from dff.serve.triton_tensors import array, tensor

from dff.errors import DffError


class FrameError(DffError):
    """This request cannot be run; its error response says why."""


def _error(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class _Request:
    """One request's frame: the response's slot, its sequence and the step's Frame (whose
    pixels are an HWC view of the request's tensor, valid in `execute`)."""

    __slots__ = ("corrid", "end", "frame", "index")

    def __init__(self, index: int, corrid: int, frame: Frame, end: bool):
        self.index, self.corrid, self.frame, self.end = index, corrid, frame, end


class TritonPythonModel:
    """Per-sequence stream states; each batch of requests stepped by runtime/step.py."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.schedule, self.key_interval = p["schedule"], int(p["key_interval"])
        self.thresholds = json.loads(p.get("thresholds", "{}"))
        self.key_budget = json.loads(p.get("key_budget", "null"))
        self.stride, self.profile = int(p["stride"]), json.loads(p["profile"])
        sessions = {}  # inline: graph -> ONNX Runtime session, run here instead of BLS
        if "inline_graphs" in p:
            from dff.serve.stage_model import cpu_session

            here = Path(__file__).resolve().parent
            sessions = {g: cpu_session(here / f, int(p.get("threads", "1")))
                        for g, f in json.loads(p["inline_graphs"]).items()}
        self.outputs = [o["name"] for o in config["output"] if o["name"] != "is_key"]
        self.scalars = {o["name"] for o in config["output"]  # per-frame scalars: `num`
                        if o.get("reshape") is not None and not o["reshape"].get("shape")}
        scheduler = self._scheduler()
        flow_outputs = (["flow"] if scheduler.needs_flow else []) + (
            ["quality"] if scheduler.needs_quality else [])
        keyed = "flow_key_model" in p or "flow_key" in sessions  # key_code cached per stream
        self.backend = StageBackend(
            models={g: p.get(f"{g}_model", g) for g in ("feature", "flow_key", "flow", "task")},
            sessions=sessions, stride=self.stride, profile=self.profile,
            task_outputs=self.outputs, flow_outputs=flow_outputs, keyed=keyed)
        self.step = Step(self.backend, max_batch=int(p["stage_max_batch"]))
        idle_us = config.get("sequence_batching", {}).get("max_sequence_idle_microseconds")
        self.idle_s = int(idle_us or 1_000_000) / 1e6  # Triton's default: 1 s
        self.streams: dict[int, StreamState] = {}
        self.seen: dict[int, float] = {}  # a sequence's last use

    def _scheduler(self):
        return make_scheduler(self.schedule, self.key_interval, self.stride,
                              key_budget=self.key_budget, **self.thresholds)

    # --- requests ---------------------------------------------------------------------------

    def execute(self, requests: list) -> list:
        now = time.monotonic()
        self._sweep(now)
        responses: list = [None] * len(requests)
        rounds: list[list[_Request]] = []  # a sequence appears at most once per round, in order
        depth: dict[int, int] = {}
        for i, request in enumerate(requests):
            try:
                req = self._parse(i, request)
            except FrameError as e:
                responses[i] = _error(f"{self.name}: {e}")
                continue
            d = depth[req.corrid] = depth.get(req.corrid, -1) + 1
            if d == len(rounds):
                rounds.append([])
            rounds[d].append(req)
        for reqs in rounds:
            by_size: dict[tuple[int, ...], list[_Request]] = {}
            for req in reqs:
                by_size.setdefault(req.frame.frame.shape, []).append(req)
            for group in by_size.values():
                self._run(group, responses, now)
        return responses

    def _parse(self, index: int, request) -> _Request:
        corrid = request.correlation_id()
        start, end = (bool(self._flag(request, n)) for n in ("START", "END"))
        image = array(pb_utils.get_input_tensor_by_name(request, "image"))
        try:
            if image.ndim != 4 or image.shape[0] != 1 or image.shape[3] != 3:
                raise FrameError(f"image {list(image.shape)}, expected one frame [1,H,W,3] "
                                 "(uint8 RGB) per request")
            stream = (StreamState(self._scheduler(), f"sequence {corrid}") if start
                      else self.streams.get(corrid))
            if stream is None:
                raise FrameError(f"has no state here (ended, idle longer than {self.idle_s:g} s,"
                                 " or the server restarted); send its next frame with "
                                 f"sequence_start=True {SEQUENCE_GONE}")
            if stream.shape is None:
                check_frame(image[0], self.stride, self.profile)
            else:
                check_same_size(image[0].shape, stream.shape,
                                fix=" (start a new sequence for the new size)")
            stream.shape = image[0].shape
        except DffError as e:
            if start or end:  # a failed first or last frame leaves no state behind
                self.streams.pop(corrid, None)
            gone = isinstance(e, FrameError) and SEQUENCE_GONE in str(e)
            raise FrameError(f"sequence {corrid}{' ' if gone else ': '}{e}") from None
        if start:  # a new sequence replaces an old one of the same id
            stream.scheduler.reset()
            self.streams[corrid] = stream
        return _Request(index, corrid, Frame(stream, stream.next, image[0]), end)

    @staticmethod
    def _flag(request, name: str) -> int:
        given = pb_utils.get_input_tensor_by_name(request, name)
        return int(array(given).reshape(-1)[0]) if given is not None else 0

    def _run(self, reqs: list[_Request], responses: list, now: float) -> None:
        """One step of equal-size frames, of different sequences; each gets its response."""
        try:
            self.step([r.frame for r in reqs])
        except DffError as e:  # a StageError, mostly
            for r in reqs:  # their schedules saw the frame: those streams start over
                if self.streams.get(r.corrid) is r.frame.stream:
                    del self.streams[r.corrid]
                responses[r.index] = _error(f"{self.name}: sequence {r.corrid}: {e}; its state "
                                            "is dropped, start it again with sequence_start "
                                            f"{SEQUENCE_GONE}")
            return
        for r in reqs:
            f = r.frame
            tensors = [tensor(n, f.task_out[n][f.row:f.row + 1].reshape(1) if n in self.scalars
                              else f.task_out[n][f.row:f.row + 1]) for n in self.outputs]
            tensors.append(tensor("is_key", np.array([[f.is_key]], dtype=bool)))
            responses[r.index] = pb_utils.InferenceResponse(output_tensors=tensors)
            f.stream.next += 1
            self.seen[r.corrid] = now
            if r.end and self.streams.get(r.corrid) is f.stream:
                del self.streams[r.corrid]

    def _sweep(self, now: float) -> None:
        """Forget streams idle longer than the sequence batcher's idle timeout (Triton has
        released their slots and refuses their next frame without START)."""
        for corrid in list(self.streams):
            seen = self.seen.get(corrid, now)
            if now - seen > self.idle_s:
                del self.streams[corrid]
                pb_utils.Logger.log_info(f"{self.name}: sequence {corrid} idle for "
                                         f"{now - seen:.1f} s, its state freed")
        self.seen = {c: t for c, t in self.seen.items() if c in self.streams}

    def finalize(self) -> None:
        self.streams.clear()
        self.backend.close()
