"""Triton Python-backend model: one exported DFF graph (feature, flow or task) on ONNX
Runtime's CPU provider, for a Triton that has only the Python backend.

dff-serve repo copies this file to `<stage>/1/model.py` beside the graph, which the config's
parameter `graph` names. Requests of equal shapes are run as one batch; each request gets its
rows of the outputs it asked for, or an error response of its own. `cpu_session` is also the
`dff` model's session under `--stages inline` (serve/dff_model.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from dff.serve.triton_tensors import array, tensor


def cpu_session(path: str | Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on the graph at `path`: `threads` intra-op threads (0: ORT's
    choice), one inter-op thread, no spin-waiting between runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _error(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    """One ONNX Runtime session; `execute` answers every request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.session = cpu_session(Path(__file__).resolve().parent / params["graph"],
                                   int(params.get("threads", "0")))
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list] = {}  # equal shapes and dtypes: one session run
        for i, request in enumerate(requests):
            feeds = {}
            for name in self.inputs:
                given = pb_utils.get_input_tensor_by_name(request, name)
                if given is None:
                    break
                feeds[name] = array(given)
            if len(feeds) != len(self.inputs):
                responses[i] = _error(f"{self.name}: inputs {self.inputs} expected")
                continue
            wanted = list(request.requested_output_names()) or self.outputs
            key = tuple((n, a.shape[1:], a.dtype.str) for n, a in feeds.items())
            groups.setdefault(key, []).append((i, feeds, wanted))
        for items in groups.values():
            names = [n for n in self.outputs if any(n in w for _, _, w in items)]
            batch = (items[0][1] if len(items) == 1 else  # the BLS sends one request a batch
                     {n: np.concatenate([f[n] for _, f, _ in items]) for n in self.inputs})
            try:
                values = dict(zip(names, self.session.run(names, batch)))
            except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error types
                for i, _, _ in items:
                    responses[i] = _error(f"{self.name}: {str(e).strip()[:500]}")
                continue
            row = 0
            for i, feeds, wanted in items:
                n = len(feeds[self.inputs[0]])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    tensor(name, values[name][row:row + n])
                    for name in names if name in wanted])
                row += n
        return responses

    def finalize(self) -> None:
        self.session = None
