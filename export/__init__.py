"""dff.export: a DFF checkpoint -> feature.onnx, flow.onnx, task.onnx and manifest.json.

`export_model` (dff.export.exporter) is the API, `dff-export` (dff.export.cli) the command;
`load_manifest` (dff.export.manifest) is what the runtime reads, and imports without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "load_manifest"]


def __getattr__(name: str) -> Any:
    # lazy, so `import dff.export.manifest` (the runtime) does not pull in torch
    if name == "export_model":
        from dff.export.exporter import export_model
        return export_model
    if name == "load_manifest":
        from dff.export.manifest import load_manifest
        return load_manifest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
