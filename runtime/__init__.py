"""dff.runtime: exported DFF graphs on video (DESIGN.md §1).

The small public API, loaded on first use so that `import dff.runtime` needs numpy alone:
`open_backend`, `pick_auto`, `available_backends` (loaders), `make_scheduler` (scheduler),
`Pipeline` and `StreamPipeline` (loop: one stream, many streams batched), `open_video` (video),
`ResultWriter` (writers). The commands (`dff-run`, `dff-profile`) are in dff/commands/.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {"open_backend": "loaders", "pick_auto": "loaders", "available_backends": "loaders",
        "make_scheduler": "scheduler", "Pipeline": "loop", "StreamPipeline": "loop",
        "open_video": "video", "ResultWriter": "writers"}
__all__ = ["Pipeline", "ResultWriter", "StreamPipeline", "available_backends", "make_scheduler",
           "open_backend", "open_video", "pick_auto"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"dff.runtime.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
