"""dff-trt: Deep Feature Flow from PyTorch to ONNX to TensorRT.

The subpackages live in the repository's top-level folders (see pyproject.toml):
``dff.models`` (models/), ``dff.data`` (data/), ``dff.export`` (export/),
``dff.engines`` (engines/), ``dff.runtime`` (runtime/), ``dff.plugins`` (plugins/).
"""

from dff.errors import DffError

__version__ = "0.3.0"
__all__ = ["DffError", "__version__"]
