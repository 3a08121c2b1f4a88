"""Is TensorRT here? The one check that dff-build, the TensorRT backend and `--backend auto` share.

`import tensorrt` can succeed without TensorRT: tensorrt-stubs installed in place leaves an
empty namespace package (DESIGN.md §4), so the module must also have TensorRT's classes. The
callers turn the reason into their own one-sentence error with their own fix.
"""

from __future__ import annotations

import importlib
from typing import Any


def find_tensorrt() -> tuple[Any, str]:
    """(the tensorrt module, "TensorRT <version>"), or (None, why it is not usable here)."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError, RuntimeError) as e:  # OSError: the bindings without
        return None, f"import tensorrt: {e}"           # libnvinfer; RuntimeError: a broken one
    if not hasattr(trt, "Runtime"):
        where = ", ".join(getattr(trt, "__path__", [])) or str(getattr(trt, "__file__", "?"))
        return None, (f"`import tensorrt` found only an empty package at {where}, such as "
                      "tensorrt-stubs not yet renamed by scripts/install_tensorrt_stubs.sh")
    return trt, f"TensorRT {getattr(trt, '__version__', '?')}"
