"""Backends: the three DFF stages (DESIGN.md §1) behind one small interface.

A backend runs `feature`, `flow` (the warp inside) and `task` on uint8 NCHW images. What it
returns from `feature`, `flow` and `upload` is an opaque handle that stays where the backend
computes (device memory on CUDA), so a key frame's image and features cross PCIe once; only
`task`'s labels (and `to_host` on request) come back to the host.

- `onnxruntime-cpu` / `onnxruntime-cuda`: the exported graphs of an engine folder;
- `torch-cpu` / `torch-cuda`: the reference, straight from the checkpoint;
- `tensorrt`: the engines dff-build made, in `runtime/trt_backend.py`.

torch and onnxruntime are imported where used, so this module imports with numpy alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from dff.export.manifest import GRAPHS, graph_path, load_manifest, sha256_file
from dff.runtime import buffers
from dff.runtime.buffers import DeviceArray, Memory

from dff.errors import DffError

KINDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda", "torch-cpu")
ALIASES = {"onnxruntime": "onnxruntime-cpu", "ort": "onnxruntime-cpu", "torch": "torch-cpu"}
# what --precision each backend runs: TensorRT's engine sets (dff-build); ONNX Runtime the
# exported fp32 graphs, or with int8 the Q/DQ feature graph of dff-build --int8
PRECISIONS = {"tensorrt": ("fp16", "fp32", "int8"), "onnxruntime": ("fp32", "int8"),
              "torch": ("fp32",)}

# tensor names fixed by DESIGN.md §3
_INPUTS = {"feature": ["image"], "flow": ["image", "key_image", "key_feat"], "task": ["feat"]}
_OUTPUTS = {"feature": ["feat"], "flow": ["flow", "scale", "feat"], "task": ["labels"]}


class BackendError(DffError):
    """A backend that cannot be opened here: unknown name, missing library or device."""


class Backend(Protocol):
    """`image`/`key_image`: uint8 [N,3,H,W], a host array or what `upload` returned;
    `key_feat`/`feat`: handles from `feature` or `flow`. Only `task` returns host data."""

    name: str          # e.g. "onnxruntime-cpu"
    # optional `overlaps_uploads: bool`: upload() is asynchronous, so the Pipeline uploads the
    # next frame before it waits for this one's labels
    stride: int        # feature stride: image H and W must be multiples of it
    profile: dict | None  # the manifest's profile {min, opt, max: [N,H,W]}, None = any size

    def feature(self, image: np.ndarray) -> Any: ...
    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> tuple[Any, Any, Any]: ...
    def task(self, feat: Any) -> np.ndarray: ...
    def upload(self, image: np.ndarray) -> Any: ...
    def to_host(self, handle: Any) -> np.ndarray: ...
    def synchronize(self) -> None: ...
    def close(self) -> None: ...


# --- what is here ---------------------------------------------------------------------------

def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not importable ({e}); `pip install onnxruntime` "
                           "(or onnxruntime-gpu for CUDA), or pick --backend torch") from None
    return onnxruntime


def _torch() -> Any:
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
    return "CUDAExecutionProvider" in _ort().get_available_providers()


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
        if _torch().cuda.is_available():
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
    _ort()  # neither runtime: say so
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
        return TorchBackend(_torch_checkpoint(engine_dir, checkpoint),
                            cuda=kind == "torch-cuda", device=device, threads=threads)
    if engine_dir is None:
        raise BackendError(f"--backend {kind} needs an engine folder (-e DIR written by "
                           "dff-export)")
    return OrtBackend(engine_dir, cuda=kind == "onnxruntime-cuda", device=device,
                      threads=threads, int8=precision == "int8")


# --- ONNX Runtime ---------------------------------------------------------------------------

class OrtBackend:
    """The exported graphs on ONNX Runtime. On the CPU, plain `run` with numpy arrays. On CUDA
    (or with `io_binding=True` on the CPU, over HostMemory, which tests that path here),
    IOBinding on the buffer layer (runtime/buffers.py): frames staged through a pinned ring,
    every input and output bound by pointer to device buffers the backend owns (outputs from
    pools: allocated once per shape, reused only when no handle to them is left, so the key
    frame's features survive later calls), ONNX Runtime running on the ring's compute stream;
    only `labels` comes back, by D2H into pinned memory. Handles are DeviceArrays on CUDA and
    OrtValues over the same memory on the CPU. `int8` runs dff-build --int8's feature graph."""

    def __init__(self, engine_dir: str | os.PathLike[str], *, cuda: bool = False,
                 device: int = 0, threads: int = 0, io_binding: bool | None = None,
                 memory: Memory | None = None, int8: bool = False):
        ort = _ort()
        self._ort = ort
        self.manifest = load_manifest(engine_dir)
        self.stride = int(self.manifest["stride"])
        self.profile = self.manifest["profile"]
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.precision = "int8" if int8 else "fp32"
        self.device_type = "cuda" if cuda else "cpu"
        self.device_id = device
        self.io_binding = cuda if io_binding is None else io_binding
        self.sessions: dict[str, Any] = {}
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(
                f"--backend onnxruntime-cuda: this onnxruntime {ort.__version__} has no "
                "CUDAExecutionProvider; `pip install onnxruntime-gpu` (built for your "
                "CUDA) or use --backend onnxruntime-cpu")
        self.memory: Memory | None = None
        self.overlaps_uploads = self.io_binding  # uploads go through the pinned ring
        if self.io_binding:
            self.memory = memory or (buffers.CudaMemory(device) if cuda
                                     else buffers.HostMemory())
            if self.memory.device_type != self.device_type:
                raise ValueError(f"{self.name} binds {self.device_type} memory, got "
                                 f"{type(self.memory).__name__}")
            self._ring = buffers.PinnedRing(self.memory)
            self._pools: dict[tuple[str, str], buffers.BufferPool] = {}
            self._labels = buffers.DeviceBuffer(self.memory)
            self._views: weakref.WeakKeyDictionary[Any, DeviceArray] = \
                weakref.WeakKeyDictionary()  # OrtValue handle -> the memory it views
        try:
            self._open_sessions(engine_dir, cuda, threads)
        except BaseException:
            self.close()
            raise

    def _open_sessions(self, engine_dir: str | os.PathLike[str], cuda: bool,
                       threads: int) -> None:
        ort = self._ort
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda:
            cuda_options = {"device_id": str(self.device_id)}
            if self.memory is not None:  # ONNX Runtime runs on the ring's compute stream
                handle = self.memory.stream_handle(self._ring.compute)
                cuda_options |= {"has_user_compute_stream": "1",
                                 "user_compute_stream": str(handle)}
            providers.insert(0, ("CUDAExecutionProvider", cuda_options))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(0, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # three sessions take turns: a finished one's spinning threads would steal the
        # cores of the next (measured: per-frame fps 87 -> 131 on 2 cores without spinning)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for graph in _INPUTS:
            path = graph_path(engine_dir, self.manifest, graph)
            if graph == "feature" and self.precision == "int8":
                from dff.engines.quantize import int8_graph

                path = int8_graph(engine_dir, self.manifest)
            try:
                session = ort.InferenceSession(os.fspath(path), options, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise BackendError(f"{path}: onnxruntime cannot load it ({first[:200]}); "
                                   f"re-export with `dff-export MODEL.pth -o {engine_dir}`") from e
            if cuda and session.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendError(f"{path}: onnxruntime fell back to {session.get_providers()} "
                                   "(the CUDA provider failed to load: CUDA/cuDNN libraries "
                                   "missing or mismatched); fix the install or use "
                                   "--backend onnxruntime-cpu")
            _check_names(path, graph, [i.name for i in session.get_inputs()],
                         [o.name for o in session.get_outputs()])
            self.sessions[graph] = session

    def _run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        """The graph's outputs (_OUTPUTS order): host arrays, or, with IOBinding, DeviceArrays
        over the backend's buffers."""
        if self.memory is None:
            host = {k: self.to_host(v) for k, v in feeds.items()}
            return self.sessions[graph].run(_OUTPUTS[graph], host)
        self.memory.activate()
        where = (self.memory.device_type, self.memory.device_id)
        binding = self.sessions[graph].io_binding()
        inputs = {}
        for spec in self.manifest["graphs"][graph]["inputs"]:
            inputs[spec["name"]] = x = self._device(feeds[spec["name"]], spec["dtype"])
            binding.bind_input(spec["name"], *where, x.dtype, list(x.shape), x.ptr)
        outputs = []
        for name, (shape, dtype) in output_shapes(self.manifest, graph, inputs).items():
            if name == "labels":  # copied to the host at once: one buffer is enough
                y = self._labels.ensure(shape, dtype).view()
            else:
                pool = self._pools.setdefault((graph, name), buffers.BufferPool(self.memory))
                y = pool.take(shape, dtype)
            binding.bind_output(name, *where, y.dtype, list(y.shape), y.ptr)
            outputs.append(y)
        self.sessions[graph].run_with_iobinding(binding)
        return outputs

    def _device(self, value: Any, dtype: str) -> DeviceArray:
        """An input as device memory: a handle of ours as it is, a host array staged."""
        if isinstance(value, DeviceArray):
            return value
        if isinstance(value, self._ort.OrtValue):
            if value in self._views:
                return self._views[value]
            value = value.numpy()  # someone else's OrtValue: through the host, like an array
        return self._ring.stage(np.ascontiguousarray(value, dtype=dtype))[1]

    def _handle(self, x: DeviceArray) -> Any:
        if self.device_type == "cuda":
            return x
        host = buffers.host_view(x.ptr, x.shape, x.dtype)  # HostMemory: device memory is host
        value = self._ort.OrtValue.ortvalue_from_numpy(host)
        self._views[value] = x  # keeps the buffer taken while the handle lives
        return value

    def feature(self, image: np.ndarray) -> Any:
        feat = self._run("feature", {"image": image})[0]
        return feat if self.memory is None else self._handle(feat)

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> tuple[Any, Any, Any]:
        out = self._run("flow", {"image": image, "key_image": key_image, "key_feat": key_feat})
        if self.memory is not None:
            out = [self._handle(x) for x in out]
        return out[0], out[1], out[2]

    def task(self, feat: Any) -> np.ndarray:
        labels = self._run("task", {"feat": feat})[0]
        return labels if self.memory is None else self._ring.to_host(labels)

    def upload(self, image: Any) -> Any:
        """Keep an array resident where the graphs run: with IOBinding staged into device
        memory (a handle), else the (contiguous) array itself."""
        if isinstance(image, (DeviceArray, self._ort.OrtValue)):
            return image
        image = np.ascontiguousarray(image)
        if self.memory is None:
            return image
        self.memory.activate()
        return self._handle(self._ring.stage(image)[1])

    def to_host(self, handle: Any) -> np.ndarray:
        if isinstance(handle, DeviceArray):
            return self._ring.to_host(handle)
        return handle.numpy() if isinstance(handle, self._ort.OrtValue) else np.asarray(handle)

    @property
    def compute_stream(self) -> Any:
        """The stream the graphs run on (IOBinding only, else None): dff-profile brackets
        a stage with CUDA events on it."""
        return self._ring.compute if self.memory is not None else None

    def synchronize(self) -> None:
        """Wait for the streams. run_with_iobinding returns after the provider's stream is
        synchronised (ONNX Runtime's default), so only uploads can still be in flight."""
        if self.memory is not None:
            self._ring.synchronize()

    def close(self) -> None:
        """Sessions first (ONNX Runtime may hold the compute stream), then the buffers;
        handles given out are invalid after it. Idempotent."""
        self.sessions.clear()
        if self.memory is not None:
            for owned in (*self._pools.values(), self._labels, self._ring):
                owned.close()
            self._pools = {}


def output_shapes(manifest: dict, graph: str,
                  inputs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{output: (shape, dtype)} of `graph` (the DESIGN.md §3 outputs only, not e.g. `probs`)
    for inputs of these shapes, from the manifest's symbolic shapes (N, H, W, h, w)."""
    stride = int(manifest["stride"])
    first = inputs["image"].shape if "image" in inputs else inputs["feat"].shape
    n, hh, ww = first[0], first[2], first[3]
    if "image" not in inputs:
        hh, ww = hh * stride, ww * stride
    sizes = {"N": n, "H": hh, "W": ww, "h": hh // stride, "w": ww // stride}
    specs = {o["name"]: o for o in manifest["graphs"][graph]["outputs"]}
    return {name: (tuple(sizes[d] if isinstance(d, str) else int(d)
                         for d in specs[name]["shape"]), specs[name]["dtype"])
            for name in _OUTPUTS[graph]}


def _check_names(path: Path, graph: str, inputs: list[str], outputs: list[str]) -> None:
    if inputs != _INPUTS[graph] or not set(_OUTPUTS[graph]) <= set(outputs):
        raise BackendError(f"{path}: inputs {inputs} and outputs {outputs}, expected inputs "
                           f"{_INPUTS[graph]} and outputs {_OUTPUTS[graph]} (DESIGN.md §3); "
                           "re-export it with this version's dff-export")


# --- PyTorch (the reference) ----------------------------------------------------------------

def _torch_checkpoint(engine_dir: str | os.PathLike[str] | None,
                      checkpoint: str | os.PathLike[str] | None) -> Path:
    """An explicit checkpoint, else the one the engines were exported from (checked by hash,
    so the reference is the model the engines hold)."""
    if checkpoint is not None:
        return Path(checkpoint)
    if engine_dir is None:
        raise BackendError("--backend torch needs --checkpoint MODEL.pth or an engine folder "
                           "whose manifest names its checkpoint")
    manifest = load_manifest(engine_dir, verify_hashes=False)
    where = f"{Path(engine_dir) / 'manifest.json'}: field 'export.checkpoint'"
    path = manifest["export"].get("checkpoint")
    if not isinstance(path, str) or not Path(path).is_file():
        raise BackendError(f"{where} is {path!r}, not a file here; pass --checkpoint "
                           "MODEL.pth for the torch backend")
    want = manifest["export"].get("checkpoint_sha256")
    if want is not None and sha256_file(path) != want:
        raise BackendError(f"{where}: {path} changed after export (sha256 differs from "
                           "'export.checkpoint_sha256'); pass --checkpoint MODEL.pth explicitly "
                           "or re-export")
    return Path(path)


class TorchBackend:
    """DFF.features, DFF.flow + flow_warp and DFF.task on torch tensors (the handles)."""

    def __init__(self, checkpoint: str | os.PathLike[str], *, cuda: bool = False,
                 device: int = 0, threads: int = 0):
        torch = _torch()
        from dff.models.checkpoint import load_checkpoint
        from dff.models.warp import flow_warp

        if cuda and not torch.cuda.is_available():
            raise BackendError("--backend torch-cuda: torch.cuda.is_available() is False here "
                               f"(torch {torch.__version__}); use --backend torch-cpu")
        if threads > 0:
            torch.set_num_threads(threads)
        self._torch, self._warp = torch, flow_warp
        self.device = torch.device(f"cuda:{device}" if cuda else "cpu")
        self.name = "torch-cuda" if cuda else "torch-cpu"
        self.precision = "fp32"
        self.model = load_checkpoint(checkpoint).to(self.device).eval()
        self.stride = self.model.config.stride
        self.profile: dict | None = None  # any size the model takes

    def _float(self, image: Any) -> Any:
        return self.upload(image).float()

    def feature(self, image: np.ndarray) -> Any:
        with self._torch.inference_mode():
            return self.model.features(self._float(image))

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> tuple[Any, Any, Any]:
        with self._torch.inference_mode():
            flow, scale = self.model.flow(self._float(image), self._float(key_image))
            return flow, scale, self._warp(self.upload(key_feat), flow, scale)

    def task(self, feat: Any) -> np.ndarray:
        with self._torch.inference_mode():
            labels = self.model.task(self.upload(feat)).argmax(1).to(self._torch.uint8)
        return labels.cpu().numpy()

    def upload(self, image: Any) -> Any:
        if isinstance(image, self._torch.Tensor):
            return image.to(self.device)
        return self._torch.from_numpy(np.ascontiguousarray(image)).to(self.device)

    def to_host(self, handle: Any) -> np.ndarray:
        if isinstance(handle, self._torch.Tensor):
            return handle.detach().cpu().numpy()
        return np.asarray(handle)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.model = None
