"""dff.export: a DFF checkpoint, or your own PyTorch modules -> feature.onnx, flow.onnx,
task.onnx and manifest.json.

`export_model` (a dff-train checkpoint) and `export_modules` (your own feature, flow and task
modules; the contract is in dff.export.modules, with `DFFModules`) are the API, `dff-export`
(dff.commands.export) the command; `load_manifest` (dff.export.manifest) is what the runtime reads,
and imports without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DFFModules", "export_dff_modules", "export_model", "export_modules", "load_manifest"]

_FROM = {"export_model": "exporter", "export_modules": "exporter",
         "export_dff_modules": "exporter", "DFFModules": "modules", "load_manifest": "manifest"}


def __getattr__(name: str) -> Any:
    # lazy, so `import dff.export.manifest` (the runtime) does not pull in torch
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"dff.export.{_FROM[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
