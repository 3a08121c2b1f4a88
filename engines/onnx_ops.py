"""ONNX graphs against TensorRT's ONNX parser (docs/DESIGN.md §7): the operators a graph uses,
its model-local functions' bodies included, checked against `tensorrt_onnx_ops.json` (the
operators TensorRT 10's parser imports natively, with its source and version) and the
restrictions that matter to us (TopK's K a constant <= 3840, sorted; Resize's modes;
NonMaxSuppression's 3-D boxes and scores, at most 5000 boxes an image).
Needs onnx, not TensorRT.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
DEFAULT_DOMAINS = ("", "ai.onnx")


def load_ops(path: str | Path = OPS_FILE) -> dict[str, Any]:
    """The operator list: {tensorrt, source, operators, restrictions, plugins, ...}."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _nodes(nodes: Any) -> Iterator[Any]:
    """Every node, and every node of the subgraphs in its attributes (If, Loop, Scan)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(graph.node)


def all_nodes(model: onnx.ModelProto) -> Iterator[Any]:
    """The nodes of the main graph, then those of every model-local function's body."""
    yield from _nodes(model.graph.node)
    for function in model.functions:
        yield from _nodes(function.node)


def op_name(node: Any) -> str:
    """'Conv' for the default domain, 'dff::FlowWarp' for another."""
    domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
    return f"{domain}::{node.op_type}" if domain else str(node.op_type)


def graph_ops(model: onnx.ModelProto) -> set[str]:
    """Every operator `model` uses (`op_name`), function bodies included."""
    return {op_name(n) for n in all_nodes(model)}


def _constants(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Integer values of the initializers and Constant nodes, by tensor name."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    values = {}
    for name, tensor in tensors.items():
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind in "iu":
            values[name] = [int(v) for v in array.ravel()]
    return values


def topk_ks(model: onnx.ModelProto) -> list[int | None]:
    """K of every TopK node of the main graph; None where K is not a constant."""
    constants = _constants(model)
    ks: list[int | None] = []
    for node in model.graph.node:
        if node.op_type == "TopK":
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            ks.append(k[0] if k is not None and len(k) == 1 else None)
    return ks


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Inferred shapes by tensor name (a dim None where it is symbolic); a tensor whose rank
    cannot be inferred is absent."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model).graph
    out = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            out[value.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in t.shape.dim]
    return out


def nms_problems(model: onnx.ModelProto, ops: dict[str, Any]) -> list[str]:
    """NonMaxSuppression nodes whose boxes or scores are not 3-D (or of a rank shape
    inference cannot tell), or that hold more boxes an image than TensorRT's INMSLayer."""
    nodes = [n for n in model.graph.node if n.op_type == "NonMaxSuppression"]
    if not nodes:
        return []
    rule = ops["restrictions"]["NonMaxSuppression"]
    rank, max_boxes = int(rule["rank"]), int(rule["max_boxes"])
    shapes = _shapes(model)
    found = []
    for node in nodes:
        for which, name in zip(("boxes", "scores"), node.input[:2]):
            dims = shapes.get(name)
            if dims is None or len(dims) != rank:
                got = "of a rank shape inference cannot tell" if dims is None else f"{len(dims)}-D"
                found.append(f"NonMaxSuppression {node.name or node.output[0]}: {which} "
                             f"{name!r} is {got}; TensorRT takes {rank}-D boxes and scores")
            elif which == "boxes" and dims[1] is not None and dims[1] > max_boxes:
                found.append(f"NonMaxSuppression {node.name or node.output[0]}: {dims[1]} "
                             f"boxes an image; TensorRT takes at most {max_boxes}")
    return found


def problems(model: onnx.ModelProto, ops: dict[str, Any] | None = None) -> list[str]:
    """What would stop TensorRT's parser, one line each: operators not on its list, nodes of
    another domain that are no listed plugin or lack their function, TopK with K not a
    constant, above the limit or unsorted, Resize with a mode it does not take,
    NonMaxSuppression on inputs that are not 3-D or on too many boxes."""
    ops = ops or load_ops()
    known, plugins = set(ops["operators"]), set(ops.get("plugins", {}))
    functions = {f"{f.domain}::{f.name}" for f in model.functions}
    found = []
    for name in sorted(graph_ops(model)):
        if "::" not in name and name not in known:
            found.append(f"{name}: not imported by TensorRT {ops['tensorrt']}'s ONNX parser")
        elif "::" in name and (name not in plugins or name not in functions):
            found.append(f"{name}: a custom op that is not a listed plugin with its function")
    k_max = ops["restrictions"]["TopK"]["k_max"]
    for k in topk_ks(model):
        if k is None or k > k_max:
            found.append(f"TopK: K {k if k is not None else 'is not a constant'}; TensorRT "
                         f"takes a constant K <= {k_max}")
    resize = ops["restrictions"]["Resize"]
    for node in all_nodes(model):
        if node.op_type == "TopK" and _attr(node, "sorted", 1) != 1:
            found.append("TopK: sorted=0; TensorRT takes sorted=1 only")
        if node.op_type == "Resize":
            mode = _attr(node, "mode", "nearest")
            ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in resize["modes"] or ctm not in resize["coordinate_transformation_modes"]:
                found.append(f"Resize: mode {mode!r}, coordinate_transformation_mode {ctm!r} "
                             "not supported by TensorRT's parser")
    return found + nms_problems(model, ops)
