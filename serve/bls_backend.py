"""The Triton `dff` model's stage calls as a Backend (runtime/backends.py), for runtime/step.py.

Each of feature, flow and task is a BLS request to its stage model or, under `--stages inline`
(DESIGN.md §9), a run of an ONNX Runtime CPU session in the model's own process; either in
slices of the stages' batch limit. Handles are host arrays. A failed call is a StageError,
which the model turns into an error response for the frames of that call. Runs inside
Triton's Python stub (triton_python_backend_utils).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from dff.runtime.backends import Backend, FlowOutputs
from dff.serve.triton_tensors import array, tensor

from dff.errors import DffError


class StageError(DffError):
    """A stage call failed; the message names the stage and says why."""


class StageBackend(Backend):
    """feature, flow and task as calls of the stage models `models` ({graph: model name}), or
    of `sessions` ({graph: ONNX Runtime session}) where given. `flow_outputs`: what flow
    returns besides `feat` (flow for a schedule that reads it, quality for the learned one)."""

    name = "triton-stages"

    def __init__(self, *, models: dict[str, str], sessions: dict[str, Any], batch: int,
                 stride: int, profile: dict, task_outputs: list[str], flow_outputs: list[str]):
        self.models, self.sessions, self.batch = models, sessions, batch
        self.stride, self.profile = stride, profile
        self.task_spec = {"outputs": task_outputs}
        self.flow_outputs = [*flow_outputs, "feat"]

    def feature(self, image: np.ndarray) -> np.ndarray:
        return self._call("feature", {"image": image}, ["feat"])["feat"]

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs:
        out = self._call("flow", {"image": image, "key_image": key_image,
                                  "key_feat": key_feat}, self.flow_outputs)
        return FlowOutputs(out.get("flow"), None, out["feat"], out.get("quality"))

    def task(self, feat: Any) -> dict[str, np.ndarray]:
        return self._call("task", {"feat": feat}, self.task_spec["outputs"])

    def _call(self, stage: str, inputs: dict[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
        """`stage` on the whole batch, in slices of the stages' max batch."""
        n = len(next(iter(inputs.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        model, session = self.models[stage], self.sessions.get(stage)
        for lo in range(0, n, self.batch):
            rows = min(self.batch, n - lo)
            feeds = {k: v if rows == n else v[lo:lo + rows] for k, v in inputs.items()}
            if session is not None:
                try:
                    values = session.run(outputs, feeds)  # owned arrays
                except Exception as e:  # ONNX Runtime's own error types
                    raise StageError(f"graph {stage!r} failed: {str(e).strip()[:500]}") from e
            else:
                response = pb_utils.InferenceRequest(
                    model_name=model, requested_output_names=outputs,
                    inputs=[tensor(k, v) for k, v in feeds.items()]).exec()
                if response.has_error():
                    raise StageError(f"model {model!r} failed: {response.error().message()}")
                values = []
                for name in outputs:  # owned copies: the views die with the response
                    value = array(pb_utils.get_output_tensor_by_name(response, name))
                    values.append(value.reshape(rows, *value.shape[1:]).copy())
            for name, value in zip(outputs, values):
                parts[name].append(value)
        return {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    def close(self) -> None:
        self.sessions.clear()
