"""The task contract (docs/DESIGN.md §2): what task.onnx outputs, per task, in plain Python.

Every stage reads the outputs from here and from the manifest's `task` entry (`kind`,
`outputs`, and for detection `max_detections` and `score_threshold`); none assumes `labels`.
Shapes name their axes as the manifest does: N (batch), H and W (image), K (max_detections),
C (classes); an int is a fixed size. Needs nothing beyond the standard library, so the
runtime, the exporter and the trainer share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dff.errors import DffError

SEGMENTATION, DETECTION = "segmentation", "detection"
KINDS = (SEGMENTATION, DETECTION)  # the kinds a dff-trt model or a user's modules have
# "raw": dff-export --onnx's task graph passes a model's own outputs through, names and all;
# its outputs are whatever the model gives (the manifest's task.outputs lists them)
RAW = "raw"
ALL_KINDS = (*KINDS, RAW)  # what a manifest's task.kind may be
# --demo NAME: a task's shipped model, or "rfcn", the detection model with the paper's R-FCN head
RFCN = "rfcn"
DEMOS = (*KINDS, RFCN)
MAX_DETECTIONS = 100  # K: detection's fixed number of output rows
TOPK_LIMIT = 3840  # TensorRT's TopK takes K <= 3840 (DESIGN.md §4)
SCORE_THRESHOLD = 0.05  # detection rows scoring at most this are padding


@dataclass(frozen=True)
class Output:
    name: str
    dtype: str  # numpy spelling
    shape: tuple[int | str, ...]
    doc: str


OUTPUTS: dict[str, tuple[Output, ...]] = {
    SEGMENTATION: (
        Output("labels", "uint8", ("N", "H", "W"), "class id per pixel (arg-max at image size)"),
    ),
    DETECTION: (
        Output("boxes", "float32", ("N", "K", 4), "x0, y0, x1, y1 in input pixels; 0 in padding"),
        Output("scores", "float32", ("N", "K"), "descending; 0 in padding rows"),
        Output("classes", "int32", ("N", "K"), "class index into class_names; -1 in padding"),
        Output("num", "int32", ("N",), "rows in use (scores above score_threshold)"),
    ),
    RAW: (),  # the model's own: task_entry(RAW, outputs=[...])
}
OPTIONAL = {SEGMENTATION: ("probs",), DETECTION: (), RAW: ()}  # dff-export --probs: softmax [N,C,H,W]


class TaskError(DffError):
    """A task that is unknown, or outputs that do not match their task."""


def check_kind(kind: Any, where: str, fix: str, kinds: tuple[str, ...] = KINDS) -> str:
    """`kind` if it is one of `kinds` (a model's: segmentation, detection; a manifest's: those
    and raw), else TaskError naming `where` (a file and field) and `fix`."""
    if kind not in kinds:
        raise TaskError(f"{where} is {kind!r}, expected one of {', '.join(kinds)}; {fix}")
    return str(kind)


def output_names(kind: str) -> list[str]:
    return [o.name for o in OUTPUTS[kind]]


def task_entry(kind: str, *, max_detections: int = MAX_DETECTIONS,
               score_threshold: float = SCORE_THRESHOLD, probs: bool = False,
               outputs: list[str] | None = None) -> dict[str, Any]:
    """The manifest's `task` object for a graph set of `kind`; `outputs`: a raw task's, the
    model's own output names in order."""
    if kind == RAW:
        if not outputs or not all(isinstance(o, str) and o for o in outputs):
            raise TaskError(f"a raw task needs its outputs' names, got {outputs!r}")
        return {"kind": RAW, "outputs": list(outputs)}
    entry: dict[str, Any] = {"kind": kind,
                             "outputs": output_names(kind) + (["probs"] if probs else [])}
    if kind == DETECTION:
        if not 1 <= max_detections <= TOPK_LIMIT:
            raise TaskError(f"max_detections {max_detections}: need 1..{TOPK_LIMIT} (TensorRT's "
                            "TopK limit)")
        entry |= {"max_detections": int(max_detections),
                  "score_threshold": float(score_threshold)}
    return entry


def check_task_entry(entry: Any, graph_outputs: list[str], where: str, fix: str) -> dict:
    """The manifest's `task` object, checked against the task graph's output names: kind known,
    `outputs` the contract's (plus optional ones), the graph's outputs exactly those."""
    if not isinstance(entry, dict):
        raise TaskError(f"{where}: field 'task' is {type(entry).__name__}, expected an object "
                        f"{{kind, outputs, ...}}; {fix}")
    kind = check_kind(entry.get("kind"), f"{where}: field 'task.kind'", fix, ALL_KINDS)
    outputs = entry.get("outputs")
    if kind == RAW:  # the model's own outputs, whatever they are
        if (not isinstance(outputs, list) or not outputs
                or not all(isinstance(o, str) and o for o in outputs)):
            raise TaskError(f"{where}: field 'task.outputs' is {outputs!r}, but a raw task lists "
                            f"its outputs' names; {fix}")
        if graph_outputs != outputs:
            raise TaskError(f"{where}: task.onnx outputs {graph_outputs}, but field "
                            f"'task.outputs' says {outputs}; {fix}")
        return entry
    want = output_names(kind)
    extra = [o for o in outputs or [] if o not in want]
    if (not isinstance(outputs, list) or outputs[:len(want)] != want
            or any(o not in OPTIONAL[kind] for o in extra)):
        raise TaskError(f"{where}: field 'task.outputs' is {outputs!r}, but a {kind} task outputs "
                        f"{want}{f' then optionally {list(OPTIONAL[kind])}' if OPTIONAL[kind] else ''}; "
                        f"{fix}")
    if graph_outputs != outputs:
        raise TaskError(f"{where}: task.onnx outputs {graph_outputs}, but field 'task.outputs' "
                        f"says {outputs}; {fix}")
    if kind == DETECTION:
        k = entry.get("max_detections")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= TOPK_LIMIT:
            raise TaskError(f"{where}: field 'task.max_detections' is {k!r}, expected an integer "
                            f"in 1..{TOPK_LIMIT}; {fix}")
        if not isinstance(entry.get("score_threshold"), (int, float)):
            raise TaskError(f"{where}: field 'task.score_threshold' is missing; {fix}")
    return entry
