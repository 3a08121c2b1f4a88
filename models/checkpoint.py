"""Checkpoint save/load (DESIGN.md §3): a dict of ``config`` and ``state_dict`` (plus
``format``, ``version`` and free-form ``meta``), always loaded with weights_only=True.

Weights are stored as float32, float16, or int8: the latter (version 2) keeps each large
weight as int8 with a float32 scale per output channel in ``quantized`` (symmetric, max/127)
and the rest as float16; loading dequantizes, so the model always runs in float32 and is
exactly the model that evaluation measured."""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from dff.models.config import DFFConfig
from dff.models.dff import DFF

from dff.errors import CheckpointError
from dff.tasks import DEMOS, DETECTION, RFCN, SEGMENTATION, check_kind

FORMAT = "dff-trt-checkpoint"
VERSION = 1  # float weights
VERSION_QUANTIZED = 2  # adds ``quantized``: {state_dict key: per-channel scale}
WEIGHTS_DTYPES = ("float32", "float16", "int8")
_MIN_QUANTIZED = 1024  # smaller tensors (biases, BatchNorm) stay float16
DEMO_NAME = "dff_small_synthetic.pth"
DEMO_NAMES = {SEGMENTATION: DEMO_NAME, DETECTION: "dff_small_detection.pth",
              RFCN: "dff_small_rfcn.pth"}  # one per name of dff.tasks.DEMOS


def demo_checkpoint_path(demo: str = SEGMENTATION) -> Path:
    """The shipped weights of the demo `demo` (a task, or "rfcn"); segmentation's is the
    default every command falls back to."""
    if demo not in DEMO_NAMES:
        raise CheckpointError(f"demo {demo!r} is not shipped; the demos are "
                              f"{', '.join(DEMOS)}")
    return Path(str(resources.files("dff.models") / "weights" / DEMO_NAMES[demo]))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per slice along dim 0): symmetric, scale = max|w| / 127."""
    peak = weight.abs().reshape(weight.shape[0], -1).amax(1).clamp_min(1e-12)
    scale = (peak / 127).float()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.round(weight.float() / scale.view(shape)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().view((-1,) + (1,) * (q.dim() - 1))


def save_checkpoint(path: str | os.PathLike, model: DFF, meta: dict | None = None,
                    weights: str = "float32") -> None:
    """Write atomically: a temp file in the same folder, then rename. ``weights`` is how the
    floating-point weights are stored: float32, float16, or int8 (module docstring); loading
    always gives float32. The shipped demo uses int8 to stay under 10 MB."""
    if weights not in WEIGHTS_DTYPES:
        raise ValueError(f"weights must be one of {WEIGHTS_DTYPES}, got {weights!r}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    quantized = {}
    if weights != "float32":
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            if weights == "int8" and v.dim() >= 2 and v.numel() >= _MIN_QUANTIZED:
                state[k], quantized[k] = quantize(v)
            else:
                state[k] = v.half()
    blob = {"format": FORMAT, "version": VERSION_QUANTIZED if quantized else VERSION,
            "config": model.config.to_dict(), "state_dict": state, "meta": meta or {}}
    if quantized:
        blob["quantized"] = quantized
    atomic_torch_save(blob, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load the raw dict, checking it is ours. Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass a .pth written by "
                              "dff-train, or omit it to use the shipped demo model")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        why = f"torch.load: {type(e).__name__}" + (f": {first[:100]}" if first else "")
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({why}); "
                              "pass a .pth written by dff-train") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a PyTorch file but not a dff-trt checkpoint (no "
                              f"format={FORMAT!r}); save models with dff.models.save_checkpoint")
    if blob.get("version") not in (VERSION, VERSION_QUANTIZED):
        raise CheckpointError(f"{path}: checkpoint version {blob.get('version')!r}, this tool "
                              f"reads versions {VERSION} and {VERSION_QUANTIZED}; re-save it "
                              "with this version's dff-train")
    for key in ("config", "state_dict"):
        if not isinstance(blob.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} dict; it is damaged")
    check_kind(blob["config"].get("task", SEGMENTATION), f"{path}: field 'config.task'",
               "this version reads segmentation and detection checkpoints; retrain it with "
               "dff-train --task")
    if blob["version"] == VERSION_QUANTIZED:
        blob["state_dict"] = _dequantized(path, blob)
    return blob


def _dequantized(path: Path, blob: dict) -> dict:
    """The state_dict with every quantized entry back in float32."""
    quantized, state = blob.get("quantized"), dict(blob["state_dict"])
    if not isinstance(quantized, dict):
        raise CheckpointError(f"{path}: version {VERSION_QUANTIZED} checkpoint without its "
                              "'quantized' scales; it is damaged")
    for key, scale in quantized.items():
        q = state.get(key)
        if (not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() < 1
                or not isinstance(scale, torch.Tensor) or scale.shape != (q.shape[0],)):
            raise CheckpointError(f"{path}: quantized weight {key!r} does not match its scale; "
                                  "the file is damaged or was edited")
        state[key] = dequantize(q, scale)
    return state


def load_checkpoint(path: str | os.PathLike | None = None) -> DFF:
    """Build the model from its config and load the weights; ``None`` = the shipped demo."""
    path = Path(path) if path is not None else demo_checkpoint_path()
    blob = read_checkpoint(path)
    try:
        config = DFFConfig.from_dict(blob["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({e}); it was written by another version") from e
    model = DFF(config)
    try:
        missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not match the config ({first[:160]}); the "
                              "file is damaged or was edited") from e
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); the file is damaged "
                              "or was edited")
    model.eval()
    return model


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
