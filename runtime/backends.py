"""Backends: the three DFF stages (DESIGN.md §1) behind one small interface.

A backend runs `feature`, `flow` (the warp inside) and `task` on uint8 NCHW images. What it
returns from `feature`, `flow` and `upload` is an opaque handle that stays where the backend
computes (device memory on CUDA), so a key frame's image and features cross PCIe once; only
`task`'s outputs (and `to_host` on request) come back to the host: a dict of host arrays, the
manifest's `task.outputs` with the batch dimension (docs/DESIGN.md §6).

- `onnxruntime-cpu` / `onnxruntime-cuda`: the exported graphs of an engine folder, in
  `runtime/ort_backend.py`;
- `torch-cpu` / `torch-cuda`: the reference, straight from the checkpoint, in
  `runtime/torch_backend.py`;
- `tensorrt`: the engines dff-build made, in `runtime/trt_backend.py`.

This module holds the protocol and what every backend shares; runtime/loaders.py opens one.
It imports with numpy alone.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from dff import tasks
from dff.errors import DffError

KINDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda", "torch-cpu")
ALIASES = {"onnxruntime": "onnxruntime-cpu", "ort": "onnxruntime-cpu", "torch": "torch-cpu"}
# what --precision each backend runs: TensorRT's engine sets (dff-build); ONNX Runtime the
# exported fp32 graphs, or with int8 the Q/DQ feature graph of dff-build --int8
PRECISIONS = {"tensorrt": ("fp16", "fp32", "int8"), "onnxruntime": ("fp32", "int8"),
              "torch": ("fp32",)}

# tensor names fixed by DESIGN.md §3; the task graph's outputs are the manifest's (task_spec)
INPUTS = {"feature": ["image"], "flow": ["image", "key_image", "key_feat"],
          "flow_key": ["key_image"], "warp": ["key_feat", "flow"], "task": ["feat"]}
OUTPUTS = {"feature": ["feat"], "flow": ["flow", "scale", "feat"], "flow_key": ["key_code"],
           "warp": ["feat"]}
# flow.onnx's inputs where the export caches its key frame (flow_key.onnx: manifest.keyed)
KEYED_FLOW_INPUTS = ["image", "key_code", "key_feat"]
# outputs read where the graph has them: flow.onnx's `quality` (the learned schedule's input)
OPTIONAL_OUTPUTS = {"flow": ["quality"]}


class FlowOutputs(tuple):
    """What `Backend.flow` returns: the handles flow, scale and feat (it unpacks as that
    triple), and `quality`: the handle of flow.onnx's optional output of that name [N,1] (a
    model with a quality head, docs/DESIGN.md §10), None where the graph has none."""

    quality: Any

    def __new__(cls, flow: Any, scale: Any,  # noqa: PYI034 (typing.Self needs Python 3.11)
                feat: Any, quality: Any = None) -> FlowOutputs:
        out = super().__new__(cls, (flow, scale, feat))
        out.quality = quality
        return out


class BackendError(DffError):
    """A backend that cannot be opened here: unknown name, missing library or device."""


def task_spec(manifest: dict, where: str = "manifest.json") -> dict[str, Any]:
    """The manifest's task as an object {kind, outputs, and for detection max_detections,
    score_threshold}: the format-2 `task` object as it is, or a format-1 string with its outputs
    read from the task graph's recorded outputs. An unknown kind is a TaskError naming `where`."""
    entry = manifest.get("task")
    fix = "re-export the model with this version's dff-export"
    if isinstance(entry, dict):
        tasks.check_kind(entry.get("kind"), f"{where}: field 'task.kind'", fix, tasks.ALL_KINDS)
        return entry
    kind = tasks.check_kind(entry, f"{where}: field 'task'", fix)
    specs = manifest["graphs"]["task"]["outputs"]
    spec = tasks.task_entry(kind, probs=any(o.get("name") == "probs" for o in specs))
    if kind == tasks.DETECTION:  # K as exported: the second axis of `scores`
        k = next((o["shape"][1] for o in specs if o.get("name") == "scores"), None)
        spec["max_detections"] = k if isinstance(k, int) else tasks.MAX_DETECTIONS
    return spec


def host_quality(backend: Backend, out: Any, schedulers: list) -> np.ndarray | None:
    """`out`'s quality (what `backend.flow` returned) on the host, [N,1], when one of
    `schedulers` reads it (the learned schedule) and the flow graph has it; else None, and
    nothing is copied."""
    quality = out.quality if isinstance(out, FlowOutputs) else None
    if quality is None or not any(s.needs_quality for s in schedulers):
        return None
    return backend.to_host(quality)


def check_quality(backend: Backend, schedulers: list, where: str) -> None:
    """Refuse, before any frame, a learned schedule among `schedulers` on a backend whose
    flow has no quality (`where`: the engine folder or checkpoint named in the message)."""
    if any(s.needs_quality for s in schedulers) and not backend.has_quality:
        raise BackendError(f"--schedule learned: {where} has no quality head (flow.onnx has no "
                           "`quality` output); add one with `python -m dff.models.quality "
                           "MODEL.pth -o MODEL_quality.pth` and export that, or pick "
                           "--schedule adaptive")


def graph_outputs(manifest: dict, graph: str) -> list[str]:
    """The outputs the runtime reads from `graph`: OUTPUTS and the OPTIONAL_OUTPUTS the
    manifest records, or the manifest's task.outputs."""
    if graph == "task":
        return list(task_spec(manifest)["outputs"])
    specs = manifest.get("graphs", {}).get(graph, {}).get("outputs", [])
    recorded = {o.get("name") for o in specs if isinstance(o, dict)}
    return OUTPUTS[graph] + [n for n in OPTIONAL_OUTPUTS.get(graph, []) if n in recorded]


def check_names(path: str | os.PathLike[str], graph: str, inputs: list[str],
                outputs: list[str], fix: str, want: list[str] | None = None) -> None:
    """Refuse a graph or engine whose inputs are not exactly INPUTS[graph] (in any order; flow:
    or KEYED_FLOW_INPUTS) or
    whose outputs lack one of `want` (default OUTPUTS[graph]; for the task graph pass the
    manifest's, `graph_outputs`); `fix` ends the message."""
    if want is None:
        if graph not in OUTPUTS:
            raise TypeError(f"check_names({graph!r}): pass `want`, the manifest's task outputs")
        want = OUTPUTS[graph]
    expected = [INPUTS[graph]] + ([KEYED_FLOW_INPUTS] if graph == "flow" else [])
    if sorted(inputs) not in [sorted(e) for e in expected] or not set(want) <= set(outputs):
        raise BackendError(f"{path}: inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                           f"expected inputs {INPUTS[graph]} and outputs {want} "
                           f"(DESIGN.md §3, manifest.json 'task.outputs'); {fix}")


class Backend(Protocol):
    """`image`/`key_image`: uint8 [N,3,H,W], a host array or what `upload` returned (for
    `flow`, `key_image` is what `key` returned: the image itself, or its key_code);
    `key_feat`/`feat`: handles from `feature` or `flow`. Only `task` returns host data: its
    outputs by name (task_spec's `outputs`), each with the batch dimension. A backend subclasses
    this class: the attributes and methods with a default are optional features (the defaults
    suit a backend that computes on host arrays)."""

    name: str          # e.g. "onnxruntime-cpu"
    stride: int        # feature stride: image H and W must be multiples of it
    task_spec: dict    # {kind, outputs, ...}: what `task` returns (task_spec above)
    profile: dict | None = None  # the manifest's profile {min, opt, max: [N,H,W]}, None = any
    precision: str | None = None  # what it computes in (PRECISIONS), for the summaries
    has_quality: bool = True  # `flow` gives a `quality` (FlowOutputs): --schedule learned runs
    # upload() is asynchronous: the run loop uploads the next frame before it waits for this
    # one's outputs (runtime/step.py)
    overlaps_uploads: bool = False
    # flow + task replayed as one CUDA graph (TensorRT): its flow outputs live until the next
    # flow, so it steps one stream only
    cuda_graph: bool = False
    int8_check: dict | None = None  # int8 on ONNX Runtime: its kernels measured (quantize.py)
    # where a non-key frame's flow may come from (runtime/flows.py): "learned" runs `flow`,
    # "dis" a flow made on the host through `warp`
    flow_sources: tuple[str, ...] = ("learned",)

    def feature(self, image: np.ndarray) -> Any: ...
    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs: ...
    def task(self, feat: Any) -> dict[str, np.ndarray]: ...

    # the learned flow caches its key frame (flow_key.onnx, manifest.keyed): `key` makes the
    # key_code once per key frame, and `flow` takes it as its key_image
    keyed: bool = False

    @property
    def key_input(self) -> str:
        """flow.onnx's input for what `key` returns: key_code where `keyed`, else key_image."""
        return KEYED_FLOW_INPUTS[1] if self.keyed else INPUTS["flow"][1]

    def key(self, key_image: Any) -> Any:
        """What `flow` takes of a key frame: its key_code (flow_key.onnx) where `keyed`, else
        the key image itself."""
        return key_image

    def warp(self, key_feat: Any, flow: Any) -> Any:
        """The warp alone (warp.onnx): key_feat [N,C,h,w] along a flow [N,2,h,w] in cells,
        scale 1; a backend that lists "dis" in `flow_sources` has it."""
        raise warp_missing(self.name)

    def upload(self, image: np.ndarray) -> Any:
        return image

    def to_host(self, handle: Any) -> np.ndarray:
        return np.asarray(handle)

    def split(self, handle: Any) -> list[Any]:
        """A batch handle [N,...] as N handles [1,...], staying where the backend computes."""
        array = np.asarray(handle)
        return [array[i:i + 1] for i in range(len(array))]

    def stack(self, handles: list[Any]) -> Any:
        """Handles [n_i,...] as one along the batch axis (one: as it is)."""
        return handles[0] if len(handles) == 1 else np.concatenate([np.asarray(h)
                                                                    for h in handles])

    def device_timer(self) -> Any:
        """A DeviceTimer of spans of this backend's device work (dff-profile), None where a
        call is done when it returns (the CPU)."""
        return None

    def synchronize(self) -> None:
        """Wait for the work queued so far."""

    def close(self) -> None:
        """Let go of sessions, engines and buffers; handles given out are invalid after it."""


def warp_missing(name: str) -> BackendError:
    """The refusal of --flow dis on backend `name`, which has no warp graph."""
    return BackendError(f"the {name} backend has no warp graph, so it runs the learned flow "
                        "only; drop --flow dis")


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not importable ({e}); `pip install onnxruntime` "
                           "(or onnxruntime-gpu for CUDA), or pick --backend torch") from None
    return onnxruntime


def import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise BackendError(f"the torch backend needs PyTorch, which is not importable ({e}); "
                           "`pip install dff-trt[train]` or pick --backend onnxruntime-cpu") from None
    return torch
