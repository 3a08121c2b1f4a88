"""dff.engines: dff-export's ONNX graphs -> TensorRT engines, and which engine a machine may load.

`dff.engines.builder.build_engines` (the `dff-build` command) needs TensorRT and a GPU; the
rest is plain Python: `select_engines` and `check_engine_compatible` (compat) are what the
runtime's TensorRT backend uses, `engine_filename` (naming) how engines are named.
"""

from .compat import EngineError, check_engine_compatible, select_engines
from .naming import engine_filename, gpu_slug

__all__ = ["EngineError", "check_engine_compatible", "engine_filename", "gpu_slug",
           "select_engines"]
