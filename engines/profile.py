"""TensorRT optimization-profile shapes for one graph, from the manifest (DESIGN.md §3).

The manifest's `profile` gives min/opt/max image shapes N×H×W; each graph input lists its shape
with dynamic axes named N, H, W (image) or h, w (feature grid, H/stride × W/stride). So
`image`/`key_image` [N,3,H,W] and `feat`/`key_feat` [N,C,h,w] get their three shapes by
substitution; `key_code` [N,Ck,hk,wk] (flow_key.onnx's, where the learned flow caches its key
frame) takes hk, wk from graphs.flow_key.grid at each image size. Plain Python: no TensorRT
needed.
"""

from __future__ import annotations

from typing import Any

from dff.export.manifest import key_side, valid_grid

from dff.errors import DffError

Shape = tuple[int, ...]
KINDS = ("min", "opt", "max")


class ProfileShapeError(DffError):
    """A manifest whose profile or input shapes cannot give TensorRT a profile."""


def _sizes(manifest: dict[str, Any], kind: str) -> dict[str, int]:
    profile = manifest["profile"]
    stride = int(manifest["stride"])
    shape = profile.get(kind)
    if not isinstance(shape, list) or len(shape) != 3 or not all(
            isinstance(v, int) and v > 0 for v in shape):
        raise ProfileShapeError(f"manifest field 'profile.{kind}' is {shape!r}, expected "
                                f"[N, H, W]; re-export with dff-export")
    n, h, w = shape
    if h % stride or w % stride:
        raise ProfileShapeError(f"manifest field 'profile.{kind}' {shape}: H and W must be "
                                f"multiples of the stride {stride}; re-export with dff-export")
    sizes = {"N": n, "H": h, "W": w, "h": h // stride, "w": w // stride}
    if "flow_key" in manifest.get("graphs", {}):
        grid = manifest["graphs"]["flow_key"].get("grid")
        if not valid_grid(grid):
            raise ProfileShapeError(f"manifest field 'graphs.flow_key.grid' is {grid!r}, "
                                    "expected {shrink, cell}; re-export with dff-export")
        sizes["hk"], sizes["wk"] = key_side(h, grid), key_side(w, grid)
    return sizes


def profile_shapes(manifest: dict[str, Any], graph: str) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min, opt, max)} for every input of `graph` with a dynamic axis.

    Inputs whose shape is all fixed sizes are left out: TensorRT needs no profile for them.
    """
    sizes = {kind: _sizes(manifest, kind) for kind in KINDS}
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for tensor in manifest["graphs"][graph]["inputs"]:
        dims = tensor["shape"]
        if all(isinstance(d, int) for d in dims):
            continue
        unknown = [d for d in dims if isinstance(d, str) and d not in sizes["min"]]
        if unknown:
            raise ProfileShapeError(f"manifest field 'graphs.{graph}.inputs' {tensor['name']}: "
                                    f"unknown axis {unknown[0]!r} in {dims} (expected N, H, W, "
                                    f"h, w, hk, wk or a size); re-export with dff-export")
        min_s, opt_s, max_s = (tuple(sizes[k][d] if isinstance(d, str) else int(d)
                                     for d in dims) for k in KINDS)
        shapes[tensor["name"]] = (min_s, opt_s, max_s)
    return shapes


def format_shapes(shapes: dict[str, tuple[Shape, Shape, Shape]]) -> str:
    """'image 1x3x64x64 / 1x3x64x96 / 4x3x128x192, ...' for logs."""
    def fmt(s: Shape) -> str:
        return "x".join(map(str, s))
    return ", ".join(f"{name} {' / '.join(fmt(s) for s in trio)}"
                     for name, trio in shapes.items())
