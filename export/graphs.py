"""The three DFF graphs of DESIGN.md §3 as small nn.Module wrappers, and their ONNX export.

- feature: image uint8 [N,3,H,W] -> feat [N,C,h,w]
- flow:    image, key_image uint8 [N,3,H,W], key_feat [N,C,h,w]
           -> flow [N,2,h,w], scale [N,C,h,w], feat [N,C,h,w] = FlowWarp(key_feat, flow, scale),
           and quality [N,1] for a flow net that predicts it (the learned schedule's input)
- flow_key (a flow net that caches its key frame: `key_cache`): key_image uint8 [N,3,H,W]
           -> key_code float32 [N,Ck,hk,wk], once per key frame; flow then takes key_code in
           place of key_image
- task:    feat [N,C,h,w] -> the task contract's outputs (dff/tasks.py, docs/DESIGN.md §2):
           segmentation labels uint8 [N,H,W] (arg-max; with --probs also probs [N,K,H,W]),
           detection boxes [N,K,4], scores [N,K], classes int32 [N,K], num int32 [N]

h = H/stride, w = W/stride. Images cross into the graphs as uint8; the cast and the
normalisation are inside. The warp is the one custom node `dff::FlowWarp` and lives in the flow
graph, the graph that needs it, with its GridSample function body attached (plugins/onnx_op), so
ONNX Runtime runs it as is and TensorRT can swap in its plugin.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from dff.export.manifest import key_side
from dff.export.modules import DFFModules, Facts, describe, detection_outputs, exportable
from dff.export.profile import Profile
from dff.models.dff import DFF
from dff.plugins import onnx_op
from torch import nn

from dff import tasks
from dff.errors import DffError

OPSET = onnx_op.DEFAULT_OPSET

Dim = int | str  # a fixed size, or the name of a dynamic axis


class ExportError(DffError):
    """torch.onnx.export failed, or its graph does not have the contract's shapes."""


_ANY = Facts(0, True)  # feature and flow graphs need no facts: a stand-in skips check_modules


class _Normalise(nn.Module):
    """(x - mean) / std as x * (1/std), the arithmetic of DFF.features; nothing for 0 and 1."""

    def __init__(self, mean, std):
        super().__init__()
        self.identity = list(mean) == [0, 0, 0] and list(std) == [1, 1, 1]
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(list(std), dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels if self.identity else (pixels - self.mean) * self.inv_std


class FeatureGraph(nn.Module):
    def __init__(self, mods: DFFModules | DFF, facts: Facts | None = None):
        super().__init__()
        mods, _ = exportable(mods, facts or _ANY)
        self.feature, self.norm = mods.feature, _Normalise(mods.feature_mean, mods.feature_std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.feature(self.norm(image.float()))


def key_cache(net: object) -> dict[str, int] | None:
    """A flow net that caches its key frame (RealFlowNet: `encode_key`, `forward_code`):
    {channels, shrink, cell} of its key_code; None for one that does not (FlowNet-S)."""
    if not all(hasattr(net, a) for a in ("encode_key", "forward_code", "key_grid")):
        return None
    return {"channels": int(net.key_channels), **net.key_grid()}  # type: ignore[attr-defined]


class KeyGraph(nn.Module):
    """key_code = N_flow's key-frame part (`encode_key`) of the normalised key image."""

    def __init__(self, mods: DFFModules | DFF, facts: Facts | None = None):
        super().__init__()
        mods, _ = exportable(mods, facts or _ANY)
        self.flow, self.norm = mods.flow, _Normalise(mods.flow_mean, mods.flow_std)

    def forward(self, key_image: torch.Tensor) -> torch.Tensor:
        return self.flow.encode_key(self.norm(key_image.float()))


class FlowGraph(nn.Module):
    """flow, scale = N_flow(image, key_image), then the warp; a flow net without a scale field
    gets a scale of ones (the same FlowWarp node, so the same plugin). A flow net that outputs
    a quality too (modules.py's contract) gives it as a fourth output, `quality`. A flow net
    that caches its key frame (`key_cache`) takes key_code (KeyGraph's) in place of key_image."""

    def __init__(self, mods: DFFModules | DFF, facts: Facts | None = None):
        super().__init__()
        mods, _ = exportable(mods, facts or _ANY)
        self.flow, self.norm = mods.flow, _Normalise(mods.flow_mean, mods.flow_std)
        self.keyed = key_cache(mods.flow) is not None
        self.warp = onnx_op.torch_op()

    def forward(self, image: torch.Tensor, key: torch.Tensor,
                key_feat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.norm(image.float())
        flow, scale, *quality = (self.flow.forward_code(x, key) if self.keyed
                                 else self.flow(x, self.norm(key.float())))
        if scale is None:
            scale = torch.ones_like(key_feat)
        return (flow, scale, self.warp(key_feat, flow, scale),
                *(q.float() for q in quality))


class TaskGraph(nn.Module):
    """The task contract's outputs in its order; for segmentation with `probs` the softmax
    too: off by default, since ONNX Runtime computes every output of a graph whether asked for
    or not, and the channel softmax at image size cost more than the rest of the head (1.3 of
    1.7 ms at 128x224 on a 2-core CPU). Segmentation logits off the image size are resized
    bilinearly to it (`facts.resize_logits`) before the arg-max."""

    def __init__(self, mods: DFFModules | DFF, facts: Facts | None = None, probs: bool = False):
        super().__init__()
        mods, facts = exportable(mods, facts)
        self.task, self.kind, self.stride = mods.task, mods.kind, mods.stride
        self.resize = facts.resize_logits
        self.probs = probs

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.task(feat)
        if self.kind == tasks.DETECTION:
            boxes, scores, classes, num = detection_outputs(raw, "task")
            return (boxes.float(), scores.float(), classes.to(torch.int32), num.to(torch.int32))
        if self.resize:
            size = (feat.shape[2] * self.stride, feat.shape[3] * self.stride)
            raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        labels = raw.argmax(1).to(torch.uint8)
        return (labels, raw.softmax(1)) if self.probs else (labels,)


WRAPPERS = {"feature": FeatureGraph, "flow_key": KeyGraph, "flow": FlowGraph,
            "task": TaskGraph}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy spelling: "uint8", "float32"
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def graph_specs(model: DFFModules | DFF, profile: Profile, probs: bool = False,
                facts: Facts | None = None) -> dict[str, GraphSpec]:
    """The contract's names, dtypes and shapes; a dynamic axis is named N, H, W (image) or
    h, w (feature grid), a fixed one is its size (detection's K is max_detections). `probs`:
    a segmentation task.onnx outputs the softmax too."""
    mods, facts = exportable(model, facts)
    kind = mods.kind
    if probs and "probs" not in tasks.OPTIONAL.get(kind, ()):
        where = "config.task" if not isinstance(model, DFFModules) else "kind"
        raise ExportError(f"--probs: this model's task is {kind} ({where}), and only "
                          "segmentation has class probabilities; drop --probs")
    if kind == tasks.SEGMENTATION and mods.num_classes > 256:
        raise ExportError(f"{mods.num_classes} classes do not fit the uint8 `labels` output "
                          "(at most 256)")
    s = profile.stride
    n = "N" if profile.dynamic("N") else profile.min[0]
    big_h, h = ("H", "h") if profile.dynamic("H") else (profile.min[1], profile.min[1] // s)
    big_w, w = ("W", "w") if profile.dynamic("W") else (profile.min[2], profile.min[2] // s)
    c = facts.feat_channels
    sizes: dict[str, Dim] = {"N": n, "H": big_h, "W": big_w, "K": mods.max_detections,
                             "C": mods.num_classes}

    def t(name: str, dtype: str, *shape: Dim) -> TensorSpec:
        return TensorSpec(name, dtype, shape)

    image = t("image", "uint8", n, 3, big_h, big_w)
    feat = t("feat", "float32", n, c, h, w)
    outputs = [t(o.name, o.dtype, *(sizes[d] if isinstance(d, str) else d for d in o.shape))
               for o in tasks.OUTPUTS[kind]]
    if probs:
        outputs.append(t("probs", "float32", n, mods.num_classes, big_h, big_w))
    key_image = t("key_image", "uint8", n, 3, big_h, big_w)
    flow_outputs = (t("flow", "float32", n, 2, h, w), t("scale", "float32", n, c, h, w),
                    feat) + ((t("quality", "float32", n, 1),) if facts.quality else ())
    cache = key_cache(mods.flow)
    if cache is None:
        return {"feature": GraphSpec("feature", (image,), (feat,)),
                "flow": GraphSpec("flow", (image, key_image, t("key_feat", "float32", n, c, h,
                                                              w)), flow_outputs),
                "task": GraphSpec("task", (feat,), tuple(outputs))}
    hk, wk = (key_side(profile.min[i], cache) if not profile.dynamic(axis) else small
              for i, axis, small in ((1, "H", "hk"), (2, "W", "wk")))
    code = t("key_code", "float32", n, cache["channels"], hk, wk)
    return {"feature": GraphSpec("feature", (image,), (feat,)),
            "flow_key": GraphSpec("flow_key", (key_image,), (code,)),
            "flow": GraphSpec("flow", (image, code, t("key_feat", "float32", n, c, h, w)),
                              flow_outputs),
            "task": GraphSpec("task", (feat,), tuple(outputs))}


def _example_inputs(spec: GraphSpec, profile: Profile,
                    cache: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    s = profile.stride
    n, h, w = (profile.example(a) for a in ("N", "H", "W"))
    sizes = {"N": n, "H": h * s, "W": w * s, "h": h, "w": w}
    if cache is not None:
        sizes |= {"hk": key_side(h * s, cache), "wk": key_side(w * s, cache)}
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "uint8":
            out.append(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen))
        else:
            out.append(torch.rand(shape, generator=gen))
    return tuple(out)


def _dynamic_shapes(spec: GraphSpec, profile: Profile,
                    cache: dict[str, int] | None = None) -> tuple[dict[int, object], ...]:
    s = profile.stride
    dims: dict[str, object] = {}
    if profile.dynamic("N"):
        dims["N"] = torch.export.Dim("N", min=profile.min[0], max=profile.max[0])
    for i, (big, small) in enumerate((("H", "h"), ("W", "w")), start=1):
        if profile.dynamic(big):
            cells = torch.export.Dim(small, min=profile.min[i] // s, max=profile.max[i] // s)
            dims[small], dims[big] = cells, s * cells  # H = stride·h keeps H a multiple
            if cache is not None:  # key_code's own dims (the graph resizes it to its map)
                name = f"{small}k"
                dims[name] = torch.export.Dim(name, min=key_side(profile.min[i], cache),
                                              max=key_side(profile.max[i], cache))
    # in the inputs' order (a dict's keys would have to be the wrapper's argument names)
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)}
                 for t in spec.inputs)


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """Silence the exporter's progress lines, warnings and logs (shown with --verbose)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(model: DFFModules | DFF, spec: GraphSpec, profile: Profile,
                 path: str | os.PathLike[str], verbose: bool = False,
                 facts: Facts | None = None) -> onnx.ModelProto:
    """Export one graph to `path`: torch.onnx.export (dynamo), FlowWarp's body attached,
    dynamic axes renamed to the contract's names, then checked (`check_graph`)."""
    wrapper = WRAPPERS[spec.name](model, facts).eval()
    if spec.name == "task":
        wrapper.probs = any(t.name == "probs" for t in spec.outputs)
    cache = key_cache(exportable(model, facts or _ANY)[0].flow)
    args = _example_inputs(spec, profile, cache)
    try:
        with quiet(not verbose), torch.no_grad():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=OPSET,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=_dynamic_shapes(spec, profile, cache),
                custom_translation_table=_translations(), verbose=verbose)
    except Exception as e:  # the exporter raises many kinds; the cause is chained for --verbose
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines()
                                                or [type(e).__name__])[0])
        module = getattr(exportable(model, facts or _ANY)[0],
                         "flow" if spec.name == "flow_key" else spec.name)
        op = failing_op(e)
        raise ExportError(f"{spec.file}: torch.onnx.export failed on {spec.name} "
                          f"{describe(module)}{f' at {op}' if op else ''} ({first[:200]}); "
                          "rewrite that part with ops ONNX has, or rerun with --verbose for the "
                          "exporter's log and traceback") from e
    proto = program.model_proto
    if spec.name == "flow":
        onnx_op.attach_function(proto)
    _rename_dims(proto, spec)
    proto.doc_string = f"dff-trt {spec.name} graph (DESIGN.md §3)"
    check_graph(proto, spec)
    onnx.save(proto, os.fspath(path))
    return proto


def _translations() -> dict:
    """The exporter's table for our custom ops: FlowWarp (plugins/onnx_op) and R-FCN's NMS
    (models/rfcn, one standard NonMaxSuppression node)."""
    from dff.models import rfcn

    return {**onnx_op.custom_translation_table(), **rfcn.custom_translation_table()}


_OP = re.compile(r"\b(?:aten|prims|torch\.ops\.\w+)[.:]{1,2}[A-Za-z_]\w*(?:\.\w+)?")


def failing_op(error: BaseException) -> str | None:
    """The first operator named in the exporter's error or its causes (aten.xxx.default)."""
    seen = 0
    while error is not None and seen < 8:
        match = _OP.search(str(error))
        if match:
            return match.group(0)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _rename_dims(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give the graph's dynamic axes the contract's names (the exporter names them `16*h` or
    `s39`) everywhere they occur; fail if the exporter fixed an axis the profile leaves free."""
    graph = proto.graph
    renames: dict[str, str] = {}
    for values, specs in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
        if [v.name for v in values] != [t.name for t in specs]:
            raise ExportError(f"{spec.file}: tensors {[v.name for v in values]}, expected "
                              f"{[t.name for t in specs]}")
        for value, t in zip(values, specs):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(t.shape):
                raise ExportError(f"{spec.file}: {t.name} has rank {len(dims)}, "
                                  f"expected {len(t.shape)}")
            for axis, (dim, want) in enumerate(zip(dims, t.shape)):
                if isinstance(want, int):
                    if dim.HasField("dim_param") or dim.dim_value != want:
                        raise ExportError(f"{spec.file}: {t.name} axis {axis} is "
                                          f"{dim.dim_param or dim.dim_value}, expected {want}")
                elif not dim.HasField("dim_param"):
                    raise ExportError(f"{spec.file}: {t.name} axis {axis} ({want}) was fixed to "
                                      f"{dim.dim_value} by the exporter; the model specialises "
                                      "this size")
                elif renames.setdefault(dim.dim_param, want) != want:
                    raise ExportError(f"{spec.file}: axis {dim.dim_param!r} is both "
                                      f"{renames[dim.dim_param]} and {want}")
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def count_flow_warp(proto: onnx.ModelProto) -> int:
    return sum((n.op_type, n.domain) == (onnx_op.OP_TYPE, onnx_op.DOMAIN)
               for n in proto.graph.node)


def check_graph(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """onnx's full check, plus the warp's place: one FlowWarp node with its function in the
    flow graph, none anywhere else."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = (str(e).strip().splitlines() or ["?"])[0]
        raise ExportError(f"{spec.file}: onnx.checker rejects the exported model "
                          f"({first[:200]})") from e
    warps = count_flow_warp(proto)
    functions = [(f.domain, f.name) for f in proto.functions]
    want = 1 if spec.name == "flow" else 0
    if warps != want or functions != [(onnx_op.DOMAIN, onnx_op.OP_TYPE)] * want:
        raise ExportError(f"{spec.file}: {warps} FlowWarp node(s) and functions {functions}, "
                          f"expected {want} node(s) with the function attached")
