"""The Triton `dff` model's stage calls as a Backend (runtime/backends.py), for runtime/step.py.

Each of feature, flow_key (where the export has it), flow and task is a BLS request to its
stage model or, under `--stages inline`
(DESIGN.md §9), a run of an ONNX Runtime CPU session in the model's own process. Handles are
host arrays. A failed call is a StageError,
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

    def __init__(self, *, models: dict[str, str], sessions: dict[str, Any], stride: int,
                 profile: dict, task_outputs: list[str], flow_outputs: list[str],
                 keyed: bool = False):
        self.models, self.sessions = models, sessions
        self.stride, self.profile = stride, profile
        self.task_spec = {"outputs": task_outputs}
        self.flow_outputs = [*flow_outputs, "feat"]
        self.keyed = keyed  # flow_key makes the key_code that flow takes (DESIGN.md §3)

    def feature(self, image: np.ndarray) -> np.ndarray:
        return self._call("feature", {"image": image}, ["feat"])["feat"]

    def key(self, key_image: Any) -> Any:
        if not self.keyed:
            return key_image
        return self._call("flow_key", {"key_image": key_image}, ["key_code"])["key_code"]

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs:
        out = self._call("flow", {"image": image, self.key_input: key_image,
                                  "key_feat": key_feat}, self.flow_outputs)
        return FlowOutputs(out.get("flow"), None, out["feat"], out.get("quality"))

    def task(self, feat: Any) -> dict[str, np.ndarray]:
        return self._call("task", {"feat": feat}, self.task_spec["outputs"])

    def _call(self, stage: str, inputs: dict[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
        """`stage` on the batch (the step keeps it within the stages' batch limit)."""
        session = self.sessions.get(stage)
        if session is not None:
            try:
                return dict(zip(outputs, session.run(outputs, inputs)))  # owned arrays
            except Exception as e:  # ONNX Runtime's own error types
                raise StageError(f"graph {stage!r} failed: {str(e).strip()[:500]}") from e
        model = self.models[stage]
        response = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[tensor(k, v) for k, v in inputs.items()]).exec()
        if response.has_error():
            raise StageError(f"model {model!r} failed: {response.error().message()}")
        # owned copies: the views die with the response
        return {name: array(pb_utils.get_output_tensor_by_name(response, name)).copy()
                for name in outputs}

    def close(self) -> None:
        self.sessions.clear()
