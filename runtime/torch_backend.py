"""The `torch-cpu` and `torch-cuda` backends: the PyTorch reference, straight from a checkpoint.

DFF.features, DFF.flow + the reference warp and DFF.task, decoded to the task contract's outputs
by DFF.outputs (dff/tasks.py); handles are torch tensors. torch is imported when a backend
opens, so the runtime imports without it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from dff.export.manifest import load_manifest, sha256_file
from dff.runtime.backends import Backend, BackendError, FlowOutputs, import_torch

from dff import tasks


def torch_checkpoint(engine_dir: str | os.PathLike[str] | None,
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
    if path is None and "modules" in manifest["export"]:
        made = manifest["export"]["modules"]
        raise BackendError(f"{Path(engine_dir) / 'manifest.json'}: exported from your own "
                           f"modules ({made.get('factory') or made.get('api')}), not a "
                           "dff-train checkpoint, which the torch backend runs; use --backend "
                           "onnxruntime (or tensorrt), or pass --checkpoint MODEL.pth")
    if not isinstance(path, str) or not Path(path).is_file():
        raise BackendError(f"{where} is {path!r}, not a file here; pass --checkpoint "
                           "MODEL.pth for the torch backend")
    want = manifest["export"].get("checkpoint_sha256")
    if want is not None and sha256_file(path) != want:
        raise BackendError(f"{where}: {path} changed after export (sha256 differs from "
                           "'export.checkpoint_sha256'); pass --checkpoint MODEL.pth explicitly "
                           "or re-export")
    return Path(path)


def open_torch(engine_dir: str | os.PathLike[str] | None,
               checkpoint: str | os.PathLike[str] | None, **options: Any) -> TorchBackend:
    """The loader: the checkpoint (`torch_checkpoint`) loaded, and a TorchBackend on it."""
    import_torch()
    from dff.models.checkpoint import load_checkpoint

    return TorchBackend(load_checkpoint(torch_checkpoint(engine_dir, checkpoint)), **options)


class TorchBackend(Backend):
    """DFF.features, DFF.flow + flow_warp and DFF.task of a DFF model (models/dff.py) on torch
    tensors (the handles); `task` returns the contract's outputs of the model's task (`probs`
    is export-only). `quality`: `flow` runs the model's quality head too (default: when it has
    one, as flow.onnx does)."""

    def __init__(self, model: Any, *, cuda: bool = False, device: int = 0, threads: int = 0,
                 quality: bool | None = None):
        torch = import_torch()
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
        self.model = model.to(self.device).eval()
        cfg = self.model.config
        self.stride = cfg.stride
        self.profile: dict | None = None  # any size the model takes
        has_head = self.model.quality_head is not None
        self.has_quality = has_head if quality is None else quality and has_head
        self.flow_sources = ("learned", "dis")
        self.task_spec = tasks.task_entry(cfg.task, max_detections=cfg.max_detections,
                                          score_threshold=cfg.score_threshold)

    def _float(self, image: Any) -> Any:
        return self.upload(image).float()

    def feature(self, image: np.ndarray) -> Any:
        with self._torch.inference_mode():
            return self.model.features(self._float(image))

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs:
        with self._torch.inference_mode():
            pair = (self._float(image), self._float(key_image))
            if not self.has_quality:
                (flow, scale), quality = self.model.flow(*pair), None
            else:
                flow, scale, quality = self.model.flow_quality(*pair)
            return FlowOutputs(flow, scale, self._warp(self.upload(key_feat), flow, scale),
                               quality)

    def warp(self, key_feat: Any, flow: Any) -> Any:
        """The reference warp of key_feat along a host flow (cells), scale 1."""
        with self._torch.inference_mode():
            return self._warp(self.upload(key_feat), self.upload(flow))

    def task(self, feat: Any) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            outputs = self.model.outputs(self.model.task(self.upload(feat)))
        return {name: outputs[name].cpu().numpy() for name in self.task_spec["outputs"]}

    def upload(self, image: Any) -> Any:
        if isinstance(image, self._torch.Tensor):
            return image.to(self.device)
        return self._torch.from_numpy(np.ascontiguousarray(image)).to(self.device)

    def split(self, handle: Any) -> list[Any]:
        """A batch [N,...] as N tensors [1,...]: views of its rows, on its device."""
        return list(self.upload(handle).split(1))

    def stack(self, handles: list[Any]) -> Any:
        """Tensors [n_i,...] concatenated along the batch on the device (one: as it is)."""
        if len(handles) == 1:
            return handles[0]
        return self._torch.cat([self.upload(h) for h in handles])

    def to_host(self, handle: Any) -> np.ndarray:
        if isinstance(handle, self._torch.Tensor):
            return handle.detach().cpu().numpy()
        return np.asarray(handle)

    def device_timer(self) -> Any:
        """CUDA events on torch's current stream (torch-cuda only)."""
        return _EventTimer(self._torch) if self.device.type == "cuda" else None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.model = None


class _EventTimer:
    """dff-profile's device timer on torch-cuda: CUDA events around the work."""

    def __init__(self, torch: Any):
        self.torch = torch

    def span(self, work: Any) -> tuple[Any, float, float]:
        begin = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        result = work()
        enqueue = time.perf_counter() - start
        end.record()
        end.synchronize()
        return result, enqueue, begin.elapsed_time(end) / 1000

    def close(self) -> None:
        pass
