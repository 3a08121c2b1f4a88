"""NumPy arrays to Triton Python-backend tensors, for the models of a repository (run inside
Triton's Python stub, where `triton_python_backend_utils` exists).

Triton 2.51's stub was built for NumPy 1: under NumPy 2, `pb_utils.Tensor(name, array)` makes
a tensor of 0 bytes and `Tensor.as_numpy()` returns wrong values (checked with uint8 frames).
DLPack, both ways, carries the data intact, so the models use `tensor` and `array` only.
"""

from __future__ import annotations

import sys

import numpy as np
import triton_python_backend_utils as pb_utils

_CAPSULE = "PyCapsule_GetPointer called with incorrect name"
_default_hook = sys.unraisablehook


def tensor(name: str, array: np.ndarray) -> pb_utils.Tensor:
    """A Tensor holding `array` (made C-contiguous), through DLPack."""
    array = np.ascontiguousarray(array)
    if array.size == 0:  # DLPack refuses empty arrays; no item size is needed for them
        return pb_utils.Tensor(name, array)
    return pb_utils.Tensor.from_dlpack(name, array)


def array(given: pb_utils.Tensor) -> np.ndarray:
    """The NumPy view of a request's or response's tensor (valid while that one lives)."""
    return np.from_dlpack(given)


def _quiet_capsule_hook(unraisable) -> None:
    """The stub renames each DLPack capsule it takes, so NumPy's capsule destructor looks for
    its own name in vain and reports a ValueError that changes nothing: drop that one."""
    if unraisable.exc_type is ValueError and _CAPSULE in str(unraisable.exc_value):
        return
    _default_hook(unraisable)


sys.unraisablehook = _quiet_capsule_hook
