"""A video as sequences of a Triton server's `dff` model over gRPC (DESIGN.md §9), for
`dff-run VIDEO --server HOST:PORT` (dff/commands/run.py).

What the client needs of the model (task kind, class names, stride, profile, schedule) comes
from the served model's config, the parameters `dff-serve repo` writes. A video is one sequence
(a random 63-bit id, or the caller's): START on its first frame, END on its last, and every
request carries the gRPC header `dff-stream: <id>` for a consistent-hashing proxy in front.
A frame is sent until it has an answer, so every frame comes back once, in order:

- the server does not know the sequence (it restarted, or the stream was idle past its
  timeout), or the connection dropped mid-sequence (what the server holds is unknown): that
  frame starts a new sequence, as a key frame, and one line says so;
- the server is unreachable: retried with backoff for `timeout` seconds, then RemoteError.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from dff.runtime.loop import FrameResult
from dff.runtime.step import frame_outputs

from dff import tasks
from dff.errors import DffError

HEADER = "dff-stream"  # gRPC metadata key (lower case) a proxy hashes on
TIMEOUT_S = 30.0  # default --server-timeout
# a sequence the server holds no state for: Triton's sequence batcher says so in its own words
# (all there is to go by), the dff model (serve/dff_model.py) with this code in its message
TRITON_NO_START = "must specify the START flag"
SEQUENCE_GONE = "[dff:sequence-gone]"
_MAX_MESSAGE = 2**31 - 1
_CHANNEL = [("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            # reconnect soon after a server restart (gRPC's own backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
Warn = Callable[[str], None]


class RemoteError(DffError):
    """The server cannot be reached, lacks the model, or refused a frame."""


def grpc_module() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as e:
        raise RemoteError(f"--server needs tritonclient[grpc] ({e}); "
                          "pip install 'dff-trt[serve]'") from None
    return grpcclient


def parse_address(text: str) -> str:
    """HOST:PORT as given (IPv6 in brackets), or RemoteError."""
    match = _ADDRESS.match(text.strip())
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise RemoteError(f"--server {text!r}: expected HOST:PORT with a port 1..65535, e.g. "
                          "127.0.0.1:8001 (Triton's gRPC port)")
    return text.strip()


def new_sequence_id() -> int:
    return secrets.randbits(63) or 1


# --- the served model ------------------------------------------------------------------------

@dataclass
class ServedModel:
    """What dff-run needs of the served `dff` model, read from its config."""

    name: str
    kind: str
    class_names: list[str]
    outputs: list[str]  # the task's outputs (is_key aside)
    stride: int
    profile: dict
    schedule: str
    key_interval: int

    @classmethod
    def from_config(cls, config: dict, where: str) -> ServedModel:
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        outputs = [o["name"] for o in config.get("output", [])]
        wanted = ("schedule", "key_interval", "stride", "profile")
        if "is_key" not in outputs or any(k not in params for k in wanted):
            raise RemoteError(f"{where} is not a DFF model (no is_key output or schedule "
                              "parameters); name the model `dff-serve repo` wrote with "
                              "--server-model")
        if "task" not in params or "class_names" not in params:
            raise RemoteError(f"{where}: its config has no 'task'/'class_names' parameters (a "
                              "repository older than dff-run --server); rewrite it with "
                              "`dff-serve repo ENGINE_DIR REPO_DIR --force`")
        kind = tasks.check_kind(params["task"], f"{where}: parameter 'task'",
                                "rewrite the repository with dff-serve repo --force")
        return cls(config["name"], kind, list(json.loads(params["class_names"])),
                   [n for n in outputs if n != "is_key"], int(params["stride"]),
                   json.loads(params["profile"]), params["schedule"],
                   int(params["key_interval"]))


def response_outputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One frame's task outputs, as a local run's FrameResult holds them, from the arrays of a
    batch-1 response (`num` arrives as [1,1]): detection rows cut to `num`."""
    batched = {n: a.reshape(1) if n == "num" else a for n, a in arrays.items()}
    return frame_outputs(batched, 0)


def _one_line(error: Any) -> str:
    """An InferenceServerException's message on one line."""
    return " ".join(str(error.message() or error).split())


def sequence_gone(message: str) -> bool:
    """Whether the server refused a frame because it has no state for its sequence."""
    return SEQUENCE_GONE in message or TRITON_NO_START in message


# --- one video's stream -----------------------------------------------------------------------

class RemoteStream:
    """One video as sequences of the served model: `infer` sends one frame and returns its
    outputs, starting a new sequence where the server lost the old one (`restarts`)."""

    def __init__(self, address: str, model: str = "dff", *, sequence_id: int | None = None,
                 timeout: float = TIMEOUT_S, warn: Warn | None = None):
        if sequence_id is not None and not 1 <= sequence_id < 2**63:  # gRPC's int64_param
            raise RemoteError(f"--sequence-id {sequence_id}: need 1 .. 2^63-1")
        if not timeout >= 0:
            raise RemoteError(f"--server-timeout {timeout}: need seconds ≥ 0")
        self.grpc = grpc_module()
        self.url, self.model_name, self.timeout = parse_address(address), model, timeout
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.sequence_id = sequence_id or new_sequence_id()
        self.sequence_ids = [self.sequence_id]
        self.restarts: list[dict[str, Any]] = []
        self.model: ServedModel | None = None
        self._sent = 0  # frames of the current sequence answered
        self.client = self.grpc.InferenceServerClient(self.url, channel_args=_CHANNEL)

    def _retrying(self, call: Callable[[], Any], what: str,
                  lost: Callable[[str], None] = lambda message: None) -> Any:
        """`call()`, retried with backoff while the server is unreachable (`lost(message)`
        at each failure), for `timeout` s; then RemoteError."""
        deadline, pause = time.monotonic() + self.timeout, 0.1
        while True:
            try:
                return call()
            except self.grpc.InferenceServerException as e:
                if "UNAVAILABLE" not in str(e.status() or ""):  # refused, reset, stopping
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteError(
                        f"{self.url}: server not reachable for {self.timeout:g} s ({what}; "
                        f"last: {_one_line(e)}); is Triton running there (dff-serve start), "
                        "on its gRPC port? (--server-timeout S waits longer)") from None
                lost(_one_line(e))
                time.sleep(min(pause, left))
                pause = min(2 * pause, 1.0)

    def connect(self) -> ServedModel:
        """The served model's config (waiting for the server as `_retrying` does)."""
        where = f"model {self.model_name!r} on {self.url}"
        try:
            reply = self._retrying(lambda: self.client.get_model_config(self.model_name,
                                                                        as_json=True),
                                   "asking for the model")
        except self.grpc.InferenceServerException as e:
            try:
                index = self.client.get_model_repository_index(as_json=True)
                names = sorted(m["name"] for m in index.get("models", [])
                               if m.get("state") == "READY")
            except self.grpc.InferenceServerException:
                names = []
            raise RemoteError(f"{where}: {_one_line(e)} (the server has "
                              f"{', '.join(names) or 'no ready model'}); pick one with "
                              "--server-model") from None
        self.model = ServedModel.from_config(reply["config"], where)
        return self.model

    def _send(self, frame: np.ndarray, start: bool, end: bool) -> tuple[dict, bool]:
        g, names = self.grpc, self.model.outputs  # type: ignore[union-attr]
        image = g.InferInput("image", [1, *frame.shape], "UINT8")
        image.set_data_from_numpy(np.ascontiguousarray(frame)[None])
        reply = self.client.infer(
            self.model_name, [image],
            outputs=[g.InferRequestedOutput(n) for n in (*names, "is_key")],
            sequence_id=self.sequence_id, sequence_start=start, sequence_end=end,
            headers={HEADER: str(self.sequence_id)})
        outputs = response_outputs({n: reply.as_numpy(n) for n in names})
        return outputs, bool(reply.as_numpy("is_key").reshape(-1)[0])

    def _new_sequence(self) -> None:
        self.sequence_id = new_sequence_id()
        self.sequence_ids.append(self.sequence_id)

    def infer(self, index: int, frame: np.ndarray, last: bool) -> tuple[dict, bool]:
        """Frame `index` (HWC uint8 RGB; `last`: END) -> (its task outputs, is_key)."""
        if self.model is None:
            self.connect()
        start, why = self._sent == 0, ""

        def lost(message: str) -> None:
            nonlocal start, why
            if not start:  # what the server holds of this sequence is unknown now
                why, start = f"lost the server ({message})", True
                self._new_sequence()

        def send() -> tuple[dict, bool]:
            return self._send(frame, start, last)

        while True:
            try:
                outputs, is_key = self._retrying(send, f"frame {index}", lost)
                break
            except self.grpc.InferenceServerException as e:
                if start or not sequence_gone(_one_line(e)):  # at most one new sequence
                    raise RemoteError(f"{self.url}: model {self.model_name!r} refused frame "
                                      f"{index} (sequence {self.sequence_id}): "
                                      f"{_one_line(e)}") from None
                why, start = (f"the server has no state for sequence {self.sequence_id} (it "
                              "restarted, or the stream was idle past its timeout)"), True
                self._new_sequence()
        if why:
            self.restarts.append({"frame": index, "reason": why,
                                  "sequence_id": self.sequence_id})
            self.warn(f"dff-run: frame {index}: {why}; new sequence {self.sequence_id} "
                      "from this frame, a key frame")
        self._sent = 0 if last else self._sent + 1
        return outputs, is_key

    def close(self) -> None:
        self.client.close()


def stream_frames(stream: RemoteStream, frames: Iterable[np.ndarray],
                  sink: Callable[[FrameResult], None]) -> dict[str, Any]:
    """Every frame through `stream`, in order, each FrameResult to `sink` (times: `request`
    and `decode`, in s); returns the run's counts and times."""
    it = iter(frames)

    def pull() -> tuple[np.ndarray | None, float]:
        tick = time.perf_counter()
        return next(it, None), time.perf_counter() - tick

    start = time.perf_counter()
    count = keys = 0
    total = longest = 0.0
    nxt, decode = pull()
    while nxt is not None:
        frame, frame_decode = nxt, decode
        nxt, decode = pull()  # one ahead: the last frame carries END
        sent = time.perf_counter()
        outputs, is_key = stream.infer(count, frame, last=nxt is None)
        took = time.perf_counter() - sent
        sink(FrameResult(count, frame, outputs, is_key,
                         {"request": took, "decode": frame_decode}))
        count, keys, total, longest = count + 1, keys + is_key, total + took, max(longest, took)
    wall = time.perf_counter() - start
    return {"frames": count, "key_frames": keys, "wall_s": wall,
            "fps": count / wall if wall > 0 else 0.0,
            "request_ms": {"mean": 1000 * total / count if count else 0.0,
                           "max": 1000 * longest},
            "sequence_ids": list(stream.sequence_ids), "restarts": list(stream.restarts)}
