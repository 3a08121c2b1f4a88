"""The `dff::FlowWarp` op wherever ONNX is concerned (DESIGN.md §3, §4).

One node, domain "dff" version 1: inputs feat [N,C,h,w], flow [N,2,h,w], scale [N,C,h,w];
output out [N,C,h,w]; one attribute, `plugin_namespace` = "dff", which is how TensorRT's ONNX
parser finds our plugin: it takes a node that has a model-local function as a plugin only when
the node names the plugin's namespace (the plugin itself gets no attributes). Three pieces make
it exportable and runnable:

- an `onnx.defs.OpSchema`, so onnxscript (and the checker) accept the node;
- a torch custom op `dff::flow_warp` with an onnxscript translation that emits the bare node;
- a FunctionProto body of standard ONNX (GridSample), appended to the model after export, so
  ONNX Runtime and `onnx.reference` run the node while TensorRT may swap in its plugin.

torch and onnxscript are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import onnx
from onnx import helper

DOMAIN = "dff"
OP_TYPE = "FlowWarp"
OP_VERSION = 1
# torch 2.13's dynamo exporter emits opset 20 by default; the body needs GridSample (>= 16).
DEFAULT_OPSET = 20
MIN_OPSET = 16

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
# TensorRT's parser reads the plugin namespace from this node attribute (default ""), not
# from the node's domain, and only with it prefers the plugin over the function body
PLUGIN_NAMESPACE_ATTR = "plugin_namespace"


def register_schema() -> None:
    """Register the FlowWarp schema with onnx for this process; a second call does nothing."""
    if onnx.defs.has(OP_TYPE, OP_VERSION, DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Warp feat along flow (cells, align_corners sampling, zeros outside), times scale.",
        inputs=[param("feat", "T", "key-frame features [N,C,h,w]"),
                param("flow", "T", "flow [N,2,h,w] in feature cells, current -> key"),
                param("scale", "T", "scale field [N,C,h,w]")],
        outputs=[param("out", "T", "warped features [N,C,h,w]")],
        type_constraints=[("T", _FLOAT_TYPES, "floating-point tensors")],
        attributes=[onnx.defs.OpSchema.Attribute(
            PLUGIN_NAMESPACE_ATTR, onnx.defs.OpSchema.AttrType.STRING,
            "TensorRT: namespace of the plugin that implements this node", required=False)],
    )
    schema.set_type_and_shape_inference_function(_infer_out_like_feat)
    onnx.defs.register_schema(schema)


def _infer_out_like_feat(ctx: Any) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _const_int(name: str, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_int=value)


def _const_ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_ints=values)


def _const_float(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_float=value)


def function_proto(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """The FlowWarp body in standard ONNX `opset`: a grid from Shape(flow), GridSample, x scale.

    Shapes come from the flow at run time, so N, h and w stay dynamic; the element type follows
    the inputs (constants are CastLike'd to flow).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"FlowWarp's body needs GridSample: opset >= {MIN_OPSET}, got {opset}")
    node = helper.make_node
    nodes = [
        _const_int("i0", 0), _const_int("i1", 1), _const_int("i2", 2), _const_int("i3", 3),
        _const_ints("l0", [0]), _const_ints("l1", [1]), _const_ints("l2", [2]),
        _const_float("f1", 1.0), _const_float("f2", 2.0),
        node("CastLike", ["f1", "flow"], ["one"]),
        node("CastLike", ["f2", "flow"], ["two"]),
        # h and w as int64 scalars from the flow's shape [N,2,h,w].
        node("Shape", ["flow"], ["shape"]),
        node("Gather", ["shape", "i2"], ["h"], axis=0),
        node("Gather", ["shape", "i3"], ["w"], axis=0),
        # Cell-centre coordinates: xs [w] and ys [h,1], both broadcast against [N,1,h,w].
        node("Range", ["i0", "w", "i1"], ["xs_i"]),
        node("Range", ["i0", "h", "i1"], ["ys_i"]),
        node("CastLike", ["xs_i", "flow"], ["xs"]),
        node("CastLike", ["ys_i", "flow"], ["ys_f"]),
        node("Unsqueeze", ["ys_f", "l1"], ["ys"]),
        # align_corners=0 grid: g = (2·x + 1) / size − 1 unnormalises to exactly x, the cell
        # centre, for every size (1 included), matching dff.models.warp.
        node("CastLike", ["w", "flow"], ["w_f"]),
        node("CastLike", ["h", "flow"], ["h_f"]),
        # The arithmetic runs on the flow's x and y planes [N,1,h,w] before the transpose to
        # GridSample's [N,h,w,2]: there each broadcast has whole rows to work on. On
        # [N,h,w,1] every one had a last axis of 1, which ONNX Runtime's CPU broadcasting
        # walks an element at a time: the grid took longer than GridSample (DESIGN.md §3).
        node("Slice", ["flow", "l0", "l1", "l1"], ["fx"]),
        node("Slice", ["flow", "l1", "l2", "l1"], ["fy"]),
        node("Add", ["fx", "xs"], ["px"]),
        node("Add", ["fy", "ys"], ["py"]),
        node("Mul", ["px", "two"], ["px2"]),
        node("Mul", ["py", "two"], ["py2"]),
        node("Add", ["px2", "one"], ["px21"]),
        node("Add", ["py2", "one"], ["py21"]),
        node("Div", ["px21", "w_f"], ["px_s"]),
        node("Div", ["py21", "h_f"], ["py_s"]),
        node("Sub", ["px_s", "one"], ["gx"]),
        node("Sub", ["py_s", "one"], ["gy"]),
        node("Concat", ["gx", "gy"], ["grid_nchw"], axis=1),
        node("Transpose", ["grid_nchw"], ["grid"], perm=[0, 2, 3, 1]),
        node("GridSample", ["feat", "grid"], ["warped"], align_corners=0,
             mode="linear" if opset >= 20 else "bilinear", padding_mode="zeros"),
        node("Mul", ["warped", "scale"], ["out"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["feat", "flow", "scale"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[PLUGIN_NAMESPACE_ATTR],  # declared so runtimes accept it; the body ignores it
        doc_string="FlowWarp via GridSample(align_corners=0, zeros) times scale.",
    )


WARP_FILE = "warp.onnx"


def warp_graph(channels: int | str = "C", opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """warp.onnx: the warp alone, for a flow computed outside the graphs (a classical flow on
    the host, scale 1; DESIGN.md §3). Inputs key_feat float [N,C,h,w] (C = `channels`, the
    export's feature channels) and flow float [N,2,h,w]
    (cells, current -> key); output feat [N,C,h,w]. It is FlowWarp's body without the scale
    product: standard ONNX (GridSample), so ONNX Runtime and TensorRT run it as they find it,
    with no plugin and no pass over a scale of ones."""
    body = function_proto(opset)
    rename = {"feat": "key_feat", "warped": "feat"}
    nodes = []
    for n in body.node:
        if n.op_type == "Mul" and list(n.output) == ["out"]:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.input[:] = [rename.get(x, x) for x in n.input]
        copy.output[:] = [rename.get(x, x) for x in n.output]
        nodes.append(copy)
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "dff_warp",
        [helper.make_tensor_value_info("key_feat", f32, ["N", channels, "h", "w"]),
         helper.make_tensor_value_info("flow", f32, ["N", 2, "h", "w"])],
        [helper.make_tensor_value_info("feat", f32, ["N", channels, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dff-trt")
    model.ir_version = min(model.ir_version, 10)  # what ONNX Runtime and TensorRT's parser read
    onnx.checker.check_model(model)
    return model


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append FlowWarp's FunctionProto and the dff opset import to an exported model (in place),
    and mark each FlowWarp node with `plugin_namespace` "dff" for TensorRT's parser.

    The body uses the model's own default-domain opset, as the checker requires.
    """
    for node in model.graph.node:
        if (node.domain, node.op_type) == (DOMAIN, OP_TYPE):
            kept_attrs = [a for a in node.attribute if a.name != PLUGIN_NAMESPACE_ATTR]
            del node.attribute[:]
            node.attribute.extend(kept_attrs + [helper.make_attribute(PLUGIN_NAMESPACE_ATTR,
                                                                      DOMAIN)])
    opsets = {o.domain: o for o in model.opset_import}
    default = opsets.get("") or opsets.get("ai.onnx")
    if default is None:
        raise ValueError("model imports no default ONNX opset")
    if DOMAIN in opsets:
        if opsets[DOMAIN].version != OP_VERSION:
            raise ValueError(f"model imports {DOMAIN} v{opsets[DOMAIN].version}, "
                             f"FlowWarp is v{OP_VERSION}")
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    kept = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept + [function_proto(default.version)])
    return model


@functools.cache
def torch_op() -> Callable[..., Any]:
    """The torch custom op `torch.ops.dff.flow_warp(feat, flow, scale)`, defined on first call.

    Eager it runs `dff.models.warp.flow_warp`; to the exporter it is one opaque node.
    """
    import torch
    from dff.models import warp

    # An explicit schema: under `from __future__ import annotations` torch cannot resolve the
    # string annotations of a function defined where torch is only a local name.
    @torch.library.custom_op("dff::flow_warp", mutates_args=(),
                             schema="(Tensor feat, Tensor flow, Tensor scale) -> Tensor")
    def flow_warp(feat: torch.Tensor, flow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return warp.flow_warp(feat, flow, scale)

    @flow_warp.register_fake
    def _(feat: torch.Tensor, flow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(feat)

    return torch.ops.dff.flow_warp.default


def custom_translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """`torch.onnx.export(custom_translation_table=...)` entry mapping the op to a bare node."""
    import onnxscript

    register_schema()
    dff = onnxscript.values.Opset(DOMAIN, OP_VERSION)

    def flow_warp_to_onnx(feat: Any, flow: Any, scale: Any) -> Any:
        # A bare node: an onnxscript *function* here gets inlined by the exporter (DESIGN.md §4).
        return dff.FlowWarp(feat, flow, scale)

    return {torch_op(): flow_warp_to_onnx}


def export_warp_model(path: str | os.PathLike[str] | None = None, *, channels: int = 4,
                      dynamic_channels: bool = True,
                      opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export a one-node FlowWarp graph (feat, flow, scale -> out) with dynamic N, h, w.

    C is dynamic unless `dynamic_channels` is False, then fixed to `channels`. The function
    body is attached; the model is saved to `path` when given and returned.
    """
    import torch

    op = torch_op()

    class Warp(torch.nn.Module):
        def forward(self, feat: torch.Tensor, flow: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
            return op(feat, flow, scale)

    # Example sizes above 1 and all distinct, so that no dimension is specialised.
    n, h, w = 2, 5, 7
    args = (torch.randn(n, channels, h, w), torch.randn(n, 2, h, w),
            torch.randn(n, channels, h, w))
    n_dim, h_dim, w_dim = (torch.export.Dim(name) for name in ("N", "h", "w"))
    c_dim = torch.export.Dim("C") if dynamic_channels else torch.export.Dim.STATIC
    dynamic_shapes = {"feat": {0: n_dim, 1: c_dim, 2: h_dim, 3: w_dim},
                      "flow": {0: n_dim, 2: h_dim, 3: w_dim},
                      "scale": {0: n_dim, 1: c_dim, 2: h_dim, 3: w_dim}}
    with warnings.catch_warnings():
        # Benign: one Dim shared by several inputs makes the renamer say it skips duplicates.
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            Warp().eval(), args, dynamo=True, opset_version=opset,
            input_names=["feat", "flow", "scale"], output_names=["out"],
            dynamic_shapes=dynamic_shapes, custom_translation_table=custom_translation_table(),
            verbose=False,
        )
    model = attach_function(program.model_proto)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model
