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

This module says which backends exist here and opens one; the backends are imported when
opened, and torch and onnxruntime where used, so it imports with numpy alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Protocol

import numpy as np
from dff.export.manifest import GRAPHS, load_manifest

from dff import tasks
from dff.errors import DffError

KINDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda", "torch-cpu")
ALIASES = {"onnxruntime": "onnxruntime-cpu", "ort": "onnxruntime-cpu", "torch": "torch-cpu"}
# what --precision each backend runs: TensorRT's engine sets (dff-build); ONNX Runtime the
# exported fp32 graphs, or with int8 the Q/DQ feature graph of dff-build --int8
PRECISIONS = {"tensorrt": ("fp16", "fp32", "int8"), "onnxruntime": ("fp32", "int8"),
              "torch": ("fp32",)}

# tensor names fixed by DESIGN.md §3; the task graph's outputs are the manifest's (task_spec)
INPUTS = {"feature": ["image"], "flow": ["image", "key_image", "key_feat"], "task": ["feat"]}
OUTPUTS = {"feature": ["feat"], "flow": ["flow", "scale", "feat"]}
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
        tasks.check_kind(entry.get("kind"), f"{where}: field 'task.kind'", fix)
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
    quality = getattr(out, "quality", None)
    if quality is None or not any(getattr(s, "needs_quality", False) for s in schedulers):
        return None
    return backend.to_host(quality)


def check_quality(backend: Backend, schedulers: list, where: str) -> None:
    """Refuse, before any frame, a learned schedule among `schedulers` on a backend whose
    flow has no quality (`where`: the engine folder or checkpoint named in the message)."""
    if any(getattr(s, "needs_quality", False) for s in schedulers) \
            and not getattr(backend, "has_quality", True):
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
    """Refuse a graph or engine whose inputs are not exactly INPUTS[graph] (in any order) or
    whose outputs lack one of `want` (default OUTPUTS[graph]; for the task graph pass the
    manifest's, `graph_outputs`); `fix` ends the message."""
    if want is None:
        if graph not in OUTPUTS:
            raise TypeError(f"check_names({graph!r}): pass `want`, the manifest's task outputs")
        want = OUTPUTS[graph]
    if sorted(inputs) != sorted(INPUTS[graph]) or not set(want) <= set(outputs):
        raise BackendError(f"{path}: inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                           f"expected inputs {INPUTS[graph]} and outputs {want} "
                           f"(DESIGN.md §3, manifest.json 'task.outputs'); {fix}")


class Backend(Protocol):
    """`image`/`key_image`: uint8 [N,3,H,W], a host array or what `upload` returned;
    `key_feat`/`feat`: handles from `feature` or `flow`. Only `task` returns host data: its
    outputs by name (task_spec's `outputs`), each with the batch dimension."""

    name: str          # e.g. "onnxruntime-cpu"
    # optional `overlaps_uploads: bool`: upload() is asynchronous, so the Pipeline uploads the
    # next frame before it waits for this one's labels
    stride: int        # feature stride: image H and W must be multiples of it
    profile: dict | None  # the manifest's profile {min, opt, max: [N,H,W]}, None = any size
    task_spec: dict    # {kind, outputs, ...}: what `task` returns (task_spec above)
    has_quality: bool  # `flow` gives a `quality` (FlowOutputs): --schedule learned can run

    def feature(self, image: np.ndarray) -> Any: ...
    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs: ...
    def task(self, feat: Any) -> dict[str, np.ndarray]: ...
    def upload(self, image: np.ndarray) -> Any: ...
    def to_host(self, handle: Any) -> np.ndarray: ...
    # along the batch axis, staying where the backend computes (runtime/streams.py): a batch
    # handle [N,...] as N handles [1,...], and handles [n_i,...] as one (one as it is)
    def split(self, handle: Any) -> list[Any]: ...
    def stack(self, handles: list[Any]) -> Any: ...
    def synchronize(self) -> None: ...
    def close(self) -> None: ...


# --- what is here ---------------------------------------------------------------------------

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


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): `tensorrt` importable (an empty namespace package, as tensorrt-stubs
    installed in place leaves, DESIGN.md §4, does not count) and cuda-python, which the
    TensorRT backend's buffers (runtime/buffers.py) need, importable too."""
    from dff.plugins.find_tensorrt import find_tensorrt

    trt, version = find_tensorrt()
    if trt is None:
        return False, version
    try:
        spec = importlib.util.find_spec("cuda.bindings.runtime")
    except ImportError:  # no `cuda` package at all
        spec = None
    if spec is None:
        return False, f"{version} is importable but cuda-python is not (pip install dff-trt[gpu])"
    return True, version


def _ort_has_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    return "CUDAExecutionProvider" in import_ort().get_available_providers()


def available_backends() -> list[str]:
    """The backend kinds that can run on this machine (an engine folder may still lack
    what one needs, e.g. TensorRT engines). Imports torch if it is installed."""
    kinds = []
    if tensorrt_status()[0]:
        kinds.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        if _ort_has_cuda():
            kinds.append("onnxruntime-cuda")
        kinds.append("onnxruntime-cpu")
    if importlib.util.find_spec("torch") is not None:
        if import_torch().cuda.is_available():
            kinds.append("torch-cuda")
        kinds.append("torch-cpu")
    return kinds


def pick_auto(engine_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """(kind, reason): TensorRT if usable and the manifest lists engines for all three
    graphs, else ONNX Runtime on CUDA if its provider is there, else ONNX Runtime on the CPU.
    The reason is the sentence a command prints."""
    manifest = load_manifest(engine_dir, verify_hashes=False)
    trt_ok, trt_why = tensorrt_status()
    built = {e.get("graph") for e in manifest["engines"].values()}
    missing = [g for g in GRAPHS if g not in built]
    if trt_ok and not missing:
        return "tensorrt", f"picked tensorrt: {trt_why}, engines for {', '.join(GRAPHS)}"
    if not trt_ok:
        why = [f"no TensorRT ({trt_why})"]
    else:
        why = [f"{trt_why} but manifest.json lists no engine for {', '.join(missing)}"]
    if _ort_has_cuda():
        return "onnxruntime-cuda", f"picked onnxruntime-cuda: {why[0]}"
    import_ort()  # neither runtime: say so
    why.append("no CUDA execution provider")
    return "onnxruntime-cpu", f"picked onnxruntime-cpu: {', '.join(why)}"


def check_precision(kind: str, precision: str | None) -> None:
    """Refuse a precision backend `kind` does not run (one line naming what it runs)."""
    runs = PRECISIONS["onnxruntime" if kind.startswith("onnxruntime") else
                      "torch" if kind.startswith("torch") else kind]
    if precision is not None and precision not in runs:
        raise BackendError(f"--precision {precision}: the {kind} backend runs "
                           f"{' or '.join(runs)}; drop --precision or use --backend tensorrt")


def open_backend(kind: str, engine_dir: str | os.PathLike[str] | None, *, device: int = 0,
                 checkpoint: str | os.PathLike[str] | None = None, threads: int = 0,
                 cuda_graph: bool = False, precision: str | None = None) -> Backend:
    """Open backend `kind` ("auto" picks one with `pick_auto`) on the graphs of `engine_dir`
    (the torch backend: on `checkpoint`, else the manifest's `export.checkpoint`).
    `threads` > 0 caps the CPU threads of one stage; 0 leaves the library's default.
    `cuda_graph` replays the non-key path as a CUDA graph (TensorRT only). `precision`
    (PRECISIONS) picks TensorRT's engine set, or ONNX Runtime's int8 feature graph."""
    kind = ALIASES.get(kind, kind)
    if kind == "auto":
        if engine_dir is None:
            raise BackendError("--backend auto needs an engine folder (-e DIR written by "
                               "dff-export)")
        kind = pick_auto(engine_dir)[0]
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; choose one of auto, {', '.join(KINDS)}")
    if cuda_graph and kind != "tensorrt":
        raise BackendError(f"CUDA graph capture is done by the tensorrt backend only, not "
                           f"{kind}; drop --useCudaGraph or use --backend tensorrt")
    check_precision(kind, precision)
    if kind == "tensorrt":
        usable, why = tensorrt_status()
        if not usable:
            raise BackendError(f"--backend tensorrt: not available here ({why}); install "
                               "TensorRT 10.10 or later and cuda-python on a machine with an "
                               "NVIDIA GPU, or use --backend onnxruntime-cuda or onnxruntime-cpu")
        if engine_dir is None:
            raise BackendError("--backend tensorrt needs an engine folder (-e DIR, with engines "
                               "from dff-build)")
        from dff.runtime.trt_backend import TrtBackend

        return TrtBackend(engine_dir, device=device, cuda_graph=cuda_graph, precision=precision)
    if kind.startswith("torch"):
        from dff.runtime.torch_backend import TorchBackend, torch_checkpoint

        return TorchBackend(torch_checkpoint(engine_dir, checkpoint),
                            cuda=kind == "torch-cuda", device=device, threads=threads)
    if engine_dir is None:
        raise BackendError(f"--backend {kind} needs an engine folder (-e DIR written by "
                           "dff-export)")
    from dff.runtime.ort_backend import OrtBackend

    return OrtBackend(engine_dir, cuda=kind == "onnxruntime-cuda", device=device,
                      threads=threads, int8=precision == "int8")
