"""Opening a backend (DESIGN.md §1): which backends can run here, which one `auto` picks for an
engine folder, and `open_backend`, the one loader the commands call. A backend's module is
imported when it opens, and torch and onnxruntime where used, so this imports with numpy alone.
Opening (sessions, engines) is done here and in each backend's constructor; running is the
Backend protocol's (runtime/backends.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from dff.export.manifest import FLOW_GRAPH, default_flow, load_manifest
from dff.runtime.backends import (
    ALIASES,
    KINDS,
    PRECISIONS,
    Backend,
    BackendError,
    import_ort,
    import_torch,
)


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
    """(kind, reason): TensorRT if usable and the manifest lists engines for the feature, task
    and default flow source's graphs, else ONNX Runtime on CUDA if its provider is there, else ONNX Runtime on the CPU.
    The reason is the sentence a command prints."""
    manifest = load_manifest(engine_dir, verify_hashes=False)
    trt_ok, trt_why = tensorrt_status()
    built = {e.get("graph") for e in manifest["engines"].values()}
    needed = ["feature", FLOW_GRAPH[default_flow(manifest)], "task"]
    missing = [g for g in needed if g not in built]
    if trt_ok and not missing:
        return "tensorrt", f"picked tensorrt: {trt_why}, engines for {', '.join(needed)}"
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
        from dff.runtime.torch_backend import open_torch

        return open_torch(engine_dir, checkpoint, cuda=kind == "torch-cuda", device=device,
                          threads=threads)
    if engine_dir is None:
        raise BackendError(f"--backend {kind} needs an engine folder (-e DIR written by "
                           "dff-export)")
    from dff.runtime.ort_backend import OrtBackend

    return OrtBackend(engine_dir, cuda=kind == "onnxruntime-cuda", device=device,
                      threads=threads, int8=precision == "int8")
