"""Checkpoint save/load (DESIGN.md §3): a dict of ``config`` and ``state_dict`` (plus
``format``, ``version`` and free-form ``meta``), always loaded with weights_only=True."""

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

FORMAT = "dff-trt-checkpoint"
VERSION = 1
DEMO_NAME = "dff_small_synthetic.pth"


def demo_checkpoint_path() -> Path:
    """The shipped demo weights, the default every command falls back to."""
    return Path(str(resources.files("dff.models") / "weights" / DEMO_NAME))


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


def save_checkpoint(path: str | os.PathLike, model: DFF, meta: dict | None = None,
                    half: bool = False) -> None:
    """Write atomically: a temp file in the same folder, then rename. ``half`` stores the
    floating-point weights as float16 (loading casts them back to the model's float32); the
    shipped demo uses it to stay under 10 MB."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    blob = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
            "state_dict": state, "meta": meta or {}}
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
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {blob.get('version')!r}, this tool "
                              f"reads version {VERSION}; re-save it with this version's dff-train")
    for key in ("config", "state_dict"):
        if not isinstance(blob.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} dict; it is damaged")
    return blob


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
