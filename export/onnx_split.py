"""dff-export --onnx: a per-frame ONNX model split at a tensor into feature.onnx and task.onnx.

docs/DESIGN.md §19. The user's model takes a float image [N,3,H,W] and gives its outputs; the
tensor named by --feature-output (the "features", [N,C,h,w], h = H/stride) becomes the cut:

- feature.onnx: `image` uint8 [N,3,H,W] RGB 0..255 -> `feat` float32 [N,C,h,w]: our
  preprocessing (cast; channel flip for a BGR model; (x - mean) / std, as x - mean times 1/std)
  prepended to the model's graph from its input up to the tensor;
- task.onnx: `feat` -> the model's outputs unchanged, names and all (the "raw" task), or,
  with a decode (a torch module mapping those outputs to dff/tasks.py's contract), the
  segmentation or detection outputs: the decode exported with torch.onnx and merged after;
- warp.onnx (plugins/onnx_op.warp_graph), and a manifest whose flow source is the classical
  DIS flow on the host (`flow {sources: [dis], default: dis}`): such an export has no learned
  flow.

Models from old exporters are taken as they come: weights also listed as graph inputs are
dropped from the inputs, and an input declared with a fixed size is made dynamic (N, H, W)
when ONNX Runtime runs the graph at two sizes. The stride is read from the shapes (H / h at
both sizes, a whole number, the same at both).

Refused with one line, before anything is written: a tensor that is not a cut (an output
reaches the input by a path that bypasses it), an unknown tensor name (with the closest
names), a stride that is not a whole number, spatial sizes the graph fixes. The cut is
checked first. Parity: feature then task on ONNX Runtime against the whole model on ONNX
Runtime, with the same normalisation (so it cannot catch a wrong mean, std or channel order:
those are the user's to say), and for a decode its ONNX against the torch decode on the whole
model's outputs. Written all or nothing, as dff.export.exporter does.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from dff.export import manifest as manifest_mod
from dff.export import parity as parity_mod
from dff.export.modules import ModuleError, pixel_scale
from dff.export.profile import Profile, Shape, format_shape, make_profile
from dff.plugins import onnx_op
from onnx import TensorProto, helper, numpy_helper

import dff
from dff import tasks
from dff.errors import DffError

Log = Callable[[str], None]

DEFAULT_INPUT_SIZE = (256, 256)  # the opt H x W when the model declares no usable size
MIN_DECLARED = 64  # a declared side below this is an old exporter's placeholder, not a size
LAYOUTS = ("NCHW", "NHWC")
PIXEL_MEAN, PIXEL_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # raw pixels 0..255
FEATURE, TASK = "feature.onnx", "task.onnx"
_PRE = "dff_pre_"  # prefix of the preprocessing nodes and constants feature.onnx gets
_DOCS = {
    "feature": "N_feat: uint8 RGB image -> the model's graph up to the cut tensor (cast, channel "
               "flip for a BGR model and (x - mean) / std inside, prepended to it)",
    "task": "N_task: the model's graph from the cut tensor to its outputs",
    "task/decode": "N_task: the model's graph from the cut tensor to its outputs, then the "
                   "user's decode (torch.onnx) to the task contract's outputs",
}
_DIMS = {"N": "batch", "H": "image height, a multiple of the stride",
         "W": "image width, a multiple of the stride", "h": "H / stride (feature grid height)",
         "w": "W / stride (feature grid width)"}


class SplitError(DffError):
    """A model, tensor or option dff-export --onnx cannot split as asked."""


@dataclass
class SplitResult:
    directory: Path
    files: dict[str, Path]
    manifest: dict
    rows: list[parity_mod.Row]


# ------------------------------------------------------------------------------ the model

def load_model(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, int]:
    """The model, with weights that old exporters also list as graph inputs dropped from the
    inputs; and how many were dropped."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"--onnx {path}: no such file")
    try:
        model = onnx.load(os.fspath(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SplitError(f"--onnx {path}: not an ONNX model ({first})") from e
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {
        t.values.name for t in graph.sparse_initializer}
    keep = [v for v in graph.input if v.name not in weights]
    dropped = len(graph.input) - len(keep)
    if dropped:
        del graph.input[:]
        graph.input.extend(keep)
    return model, dropped


def _image_input(model: onnx.ModelProto, path: Any) -> onnx.ValueInfoProto:
    inputs = list(model.graph.input)
    if len(inputs) != 1:
        raise SplitError(f"--onnx {path}: the model takes {len(inputs)} inputs "
                         f"({', '.join(v.name for v in inputs)}); --onnx takes a model with one "
                         "image input [N,3,H,W]")
    return inputs[0]


def _value_names(graph: onnx.GraphProto) -> list[str]:
    return [v.name for v in graph.input] + [o for n in graph.node for o in n.output if o]


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, with the outer values its subgraphs (If, Loop, Scan) read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                  list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
            for sub in g.node:
                names += _node_inputs(sub)
    return names


def check_tensor(model: onnx.ModelProto, tensor: str, path: Any) -> None:
    """`tensor` is a value some node of the model computes; else the closest names."""
    graph = model.graph
    produced = {o for n in graph.node for o in n.output if o}
    if tensor in produced:
        if tensor in {o.name for o in graph.output}:
            raise SplitError(f"--feature-output {tensor}: is an output of the model, so no task "
                             "is left after it; pick a tensor before the outputs")
        return
    if tensor in {v.name for v in graph.input}:
        raise SplitError(f"--feature-output {tensor}: is the model's input; pick a tensor the "
                         "model computes from it (the features its heads read)")
    if tensor in {t.name for t in graph.initializer}:
        raise SplitError(f"--feature-output {tensor}: is a weight of the model, not a tensor it "
                         "computes; pick the features its heads read")
    names = list(dict.fromkeys(_value_names(graph)))
    close = difflib.get_close_matches(tensor, names, n=6, cutoff=0.5)
    hint = (f"the closest names: {', '.join(close)}" if close else
            "no name is close; list them with `python -c \"import onnx; print([o for n in "
            f"onnx.load('{path}').graph.node for o in n.output])\"`")
    raise SplitError(f"--feature-output {tensor}: no tensor of that name in {path}; {hint}")


def check_cut(model: onnx.ModelProto, tensor: str, path: Any) -> None:
    """Every path from the input to every output passes through `tensor` (graph reachability);
    else one line naming the output and the node where the bypass joins."""
    graph = model.graph
    source = _image_input(model, path).name
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in _node_inputs(n):
            consumers.setdefault(i, []).append(n)
    down, stack = {tensor}, [tensor]  # the values computed from the tensor
    while stack:
        for node in consumers.get(stack.pop(), []):
            for o in node.output:
                if o and o not in down:
                    down.add(o)
                    stack.append(o)
    if not _reaches(tensor, source, producer, None):
        raise SplitError(f"--feature-output {tensor}: does not depend on the input {source!r}; "
                         "pick the features the model computes from the image")
    for out in (o.name for o in graph.output):
        route = _reaches(out, source, producer, tensor)
        if route is None:
            continue
        join = next((k for k, v in enumerate(route) if v in down), None)
        if join is None:
            raise SplitError(f"--feature-output {tensor}: not a cut: output {out!r} is computed "
                             f"from the input {source!r} without {tensor!r} at all, so task.onnx "
                             "could not compute it from the features; pick a tensor every path "
                             "from the input to the outputs passes through")
        node = producer[route[join]]
        raise SplitError(f"--feature-output {tensor}: not a cut: output {out!r} also reads the "
                         f"input {source!r} by a path that bypasses {tensor!r} (node "
                         f"{node.name or node.op_type!r} ({node.op_type}) reads "
                         f"{route[join - 1]!r}, which does not come from {tensor!r}), so "
                         "task.onnx could not compute it from the features alone; pick a tensor "
                         "every path from the input to the outputs passes through")


def _reaches(start: str, target: str, producer: Mapping[str, onnx.NodeProto],
             stop: str | None) -> list[str] | None:
    """The values from `target` to `start` along one path back through the producers that
    does not pass `stop`, or None."""
    parent: dict[str, str] = {}
    seen, stack = {start}, [start]
    while stack:
        v = stack.pop()
        if v == target:
            route = [v]
            while route[-1] != start:
                route.append(parent[route[-1]])
            return route
        if v == stop or v not in producer:
            continue
        for i in _node_inputs(producer[v]):
            if i not in seen:
                seen.add(i)
                parent[i] = v
                stack.append(i)
    return None


# ------------------------------------------------------------------------ shapes and probes

def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.shape.dim]


def _set_shape(value: onnx.ValueInfoProto, dims: Sequence[int | str | None]) -> None:
    shape = value.type.tensor_type.shape
    shape.Clear()
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d


def declared_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The input's declared H x W when both are fixed and at least MIN_DECLARED."""
    dims = _dims(model.graph.input[0])
    if len(dims) == 4 and all(isinstance(d, int) and d >= MIN_DECLARED for d in dims[2:]):
        return int(dims[2]), int(dims[3])  # type: ignore[arg-type]
    return None


def make_dynamic(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy with the input's N, H, W free, the outputs' sizes cleared, no stale value_info,
    and `tensor` an output too (the probes and parity read it)."""
    m = copy.deepcopy(model)
    graph = m.graph
    image = graph.input[0]
    dims = _dims(image)
    _set_shape(image, ["N", dims[1] if len(dims) == 4 else 3, "H", "W"])
    for out in graph.output:
        _set_shape(out, [None] * len(_dims(out)))
    del graph.value_info[:]
    elem = _elem_type(model, tensor)
    graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
    return m


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an old model inference rejects: assume float
        return TensorProto.FLOAT
    for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if v.name == name and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    return TensorProto.FLOAT


def _session(model: onnx.ModelProto, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _run(session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:240]


@dataclass(frozen=True)
class Probe:
    """What ONNX Runtime says of the dynamic model: the stride, C, whether batch and spatial
    sizes are free, and each output's shape at the probe sizes (to name its axes)."""

    stride: int
    channels: int
    batch_free: bool
    shapes: dict[str, list[tuple[int, ...]]]  # output -> shapes at A (N=1), B (N=1), A (N=2)
    sizes: tuple[tuple[int, int], tuple[int, int]]


def probe(dynamic: onnx.ModelProto, tensor: str, size: tuple[int, int], fixed_hw: bool,
          pre: Preprocess, path: Any) -> Probe:
    """Run the dynamic model at H x W, at 2H x 2W (unless the profile fixes H and W) and at
    batch 2; read the stride from the tensor's shape at each size."""
    source = dynamic.graph.input[0].name
    try:
        session = _session(dynamic)
    except Exception as e:
        raise SplitError(f"--onnx {path}: ONNX Runtime cannot load the model with a dynamic "
                         f"input N x 3 x H x W ({_first_line(e)})") from e
    rng = np.random.default_rng(0)
    big = (2 * size[0], 2 * size[1])

    def at(n: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
        image = rng.integers(0, 256, (n, 3, *hw), dtype=np.uint8)
        return _run(session, {source: pre.numpy(image)})

    try:
        a = at(1, size)
    except Exception as e:
        raise SplitError(f"--onnx {path}: the model fails on a 1x3x{size[0]}x{size[1]} input "
                         f"({_first_line(e)}); give --input-size HxW a size it takes") from e
    runs = [a]
    if not fixed_hw:
        try:
            runs.append(at(1, big))
        except Exception as e:
            raise SplitError(
                f"--onnx {path}: the graph fixes its spatial size: it runs at 1x3x{size[0]}x"
                f"{size[1]} but not at 1x3x{big[0]}x{big[1]} ({_first_line(e)}), so it cannot "
                "be made dynamic (a Reshape to a fixed shape, say); DFF needs H and W free: "
                "export the model again with dynamic height and width") from e
        if any(runs[1][k].shape[1:] == a[k].shape[1:] and a[k].ndim >= 3
               for k in a if k == tensor):
            raise SplitError(f"--onnx {path}: the graph fixes its spatial size: {tensor} is "
                             f"{list(a[tensor].shape)} at both {size[0]}x{size[1]} and "
                             f"{big[0]}x{big[1]}; DFF needs H and W free")
    try:
        two = at(2, size)
        batch_free = all(v.ndim > 0 and v.shape[0] == 2 for v in two.values())
    except Exception:  # noqa: BLE001 - any failure at batch 2: batch fixed at 1
        two, batch_free = {}, False
    strides = []
    for run, hw in zip(runs, (size, big)):
        feat = run[tensor]
        if feat.ndim != 4 or feat.dtype != np.float32:
            raise SplitError(f"--feature-output {tensor}: is {feat.dtype} {list(feat.shape)}, "
                             "expected float32 [N,C,h,w] (NCHW features)")
        h, w = feat.shape[2:]
        for side, cells, axis in ((hw[0], h, "H"), (hw[1], w, "W")):
            if cells == 0 or side % cells:
                ratio = side / cells if cells else float("inf")
                raise SplitError(f"--feature-output {tensor}: the stride is not a whole number: "
                                 f"a 1x3x{hw[0]}x{hw[1]} input gives {tensor} {list(feat.shape)}"
                                 f", {axis} {side} / {cells} = {ratio:.3f}; DFF moves features "
                                 "by whole cells of the stride, so cut at a tensor whose grid "
                                 "divides the image (or give --input-size a size it divides)")
        sh, sw = hw[0] // h, hw[1] // w
        if sh != sw:
            raise SplitError(f"--feature-output {tensor}: the stride differs between height "
                             f"({sh}) and width ({sw}) at {hw[0]}x{hw[1]}; DFF needs one stride")
        strides.append(sh)
    if len(set(strides)) != 1:
        raise SplitError(f"--feature-output {tensor}: the stride is not a whole number: H / h "
                         f"is {strides[0]} at {size[0]}x{size[1]} but {strides[1]} at "
                         f"{big[0]}x{big[1]}")
    shapes = {k: [r[k].shape for r in runs] + ([two[k].shape] if k in two else [])
              for k in a}
    return Probe(strides[0], int(a[tensor].shape[1]), batch_free, shapes, (size, big))


def _axis_names(shapes: list[tuple[int, ...]], probe_: Probe, batch_free: bool) -> list:
    """Name each axis of an output from its sizes at the probes: N, H, W, h, w, or a size."""
    a = shapes[0]
    (big_h, big_w), s = probe_.sizes[0], probe_.stride
    names: list[int | str] = []
    for i, v in enumerate(a):
        grows = len(shapes) > 1 and shapes[1][i] != v
        if i == 0 and batch_free and len(shapes) > 2 and shapes[-1][0] == 2 * v:
            names.append("N")
        elif not grows:
            names.append(int(v))
        else:
            last = i == len(a) - 1
            order = (("w", big_w // s), ("h", big_h // s), ("W", big_w), ("H", big_h)) if last \
                else (("h", big_h // s), ("w", big_w // s), ("H", big_h), ("W", big_w))
            names.append(next((n for n, size in order if size == v), f"d{i}"))
    return names


# ------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """uint8 RGB pixels -> the model's input: channel flip (BGR), then (x - mean) * (1/std),
    mean and std in the model's channel order on 0..255."""

    mean: tuple[float, float, float] = PIXEL_MEAN
    std: tuple[float, float, float] = PIXEL_STD
    bgr: bool = False

    @property
    def identity(self) -> bool:
        return self.mean == PIXEL_MEAN and self.std == PIXEL_STD

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        inv = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32).reshape(1, 3, 1, 1)
        return mean, inv

    def numpy(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        if self.bgr:
            x = np.ascontiguousarray(x[:, ::-1])
        if self.identity:
            return x
        mean, inv = self.arrays()
        return (x - mean) * inv

    def nodes(self, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Nodes from `image` (uint8) to `out` (float), and their constants."""
        nodes, inits, x = [], [], "image"
        steps = [("Cast", _PRE + "float")]
        if self.bgr:
            steps.append(("Gather", _PRE + "bgr"))
        if not self.identity:
            steps += [("Sub", _PRE + "centred"), ("Mul", _PRE + "scaled")]
        steps[-1] = (steps[-1][0], out)
        mean, inv = self.arrays()
        for op, y in steps:
            if op == "Cast":
                nodes.append(helper.make_node("Cast", [x], [y], name=_PRE + "cast",
                                              to=TensorProto.FLOAT))
            elif op == "Gather":
                inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64),
                                                     _PRE + "flip"))
                nodes.append(helper.make_node("Gather", [x, _PRE + "flip"], [y],
                                              name=_PRE + "rgb_to_bgr", axis=1))
            elif op == "Sub":
                inits.append(numpy_helper.from_array(mean, _PRE + "mean"))
                nodes.append(helper.make_node("Sub", [x, _PRE + "mean"], [y], name=_PRE + "sub"))
            else:
                inits.append(numpy_helper.from_array(inv, _PRE + "inv_std"))
                nodes.append(helper.make_node("Mul", [x, _PRE + "inv_std"], [y],
                                              name=_PRE + "mul"))
            x = y
        return nodes, inits

    def rgb(self) -> tuple[list[float], list[float]]:
        """Mean and std in the image's RGB order (the manifest's)."""
        order = [2, 1, 0] if self.bgr else [0, 1, 2]
        return [self.mean[i] for i in order], [self.std[i] for i in order]


# ---------------------------------------------------------------------------- the graphs

def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in values:
            if v.name == old:
                v.name = new


def _free(graph: onnx.GraphProto, name: str, keep: str) -> None:
    """Rename a value called `name` (other than `keep`) out of the way."""
    if name == keep or name not in set(_value_names(graph)) | {t.name for t in graph.initializer}:
        return
    if name in {o.name for o in graph.output}:
        raise SplitError(f"the model has an output named {name!r}, a name the contract "
                         "reserves; rename it in the model")
    _rename(graph, name, f"{name}__model")


def extract(dynamic: onnx.ModelProto, tensor: str, outputs: list[str], probe_: Probe,
            pre: Preprocess) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """feature.onnx and task.onnx (raw) from the dynamic model, and their I/O specs."""
    m = copy.deepcopy(dynamic)
    source = m.graph.input[0].name
    n = "N" if probe_.batch_free else 1
    feat_dims = [n, probe_.channels, "h", "w"]
    del m.graph.output[-1]  # the probe's extra output, the tensor
    m.graph.value_info.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT,
                                                            feat_dims))
    out_dims = {o: _axis_names(probe_.shapes[o], probe_, probe_.batch_free) for o in outputs}
    for o in m.graph.output:
        _set_shape(o, out_dims[o.name])
    _set_shape(m.graph.input[0], [n, 3, "H", "W"])
    extractor = onnx.utils.Extractor(m)
    feature = extractor.extract_model([source], [tensor])
    task = extractor.extract_model([tensor], outputs)
    for model in (feature, task):
        model.producer_name, model.producer_version = "dff-trt", dff.__version__
        del model.graph.value_info[:]
    # feature: image -> preprocessing -> the model's input ... -> feat
    g = feature.graph
    for reserved in ("image", "feat"):
        _free(g, reserved, tensor if reserved == "feat" else "")
    _rename(g, tensor, "feat")
    nodes, inits = pre.nodes(source)
    old = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *old])
    g.initializer.extend(inits)
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("image", TensorProto.UINT8, [n, 3, "H", "W"]))
    g.name = "dff_feature"
    # task: feat -> the model's outputs
    t = task.graph
    _free(t, "feat", tensor)
    _rename(t, tensor, "feat")
    t.name = "dff_task"
    specs = {"feature": ([_spec("image", "uint8", [n, 3, "H", "W"])],
                         [_spec("feat", "float32", feat_dims)]),
             "task": ([_spec("feat", "float32", feat_dims)],
                      [_spec(o.name, _np_type(o.type.tensor_type.elem_type), out_dims[o.name])
                       for o in t.output])}
    for model in (feature, task):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise SplitError(f"the split graph fails onnx.checker ({_first_line(e)})") from e
    return feature, task, specs


def _spec(name: str, dtype: str, shape: Sequence) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _np_type(elem: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    except Exception:  # noqa: BLE001 - a type numpy lacks
        return "float32"


# --------------------------------------------------------------------------------- decode

def load_decode(spec: str, args: Mapping[str, Any] | None = None,
                score_threshold: float | None = None) -> Any:
    """`FILE.py:FUNC` or `package.module:func` called with `args` (and score_threshold when
    it takes one and `args` does not give it): a torch module or function mapping the model's
    outputs to the task contract's."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SplitError(f"--decode {spec!r}: give FILE.py:FUNC or package.module:func")
    try:
        if target.endswith(".py") or os.sep in target:
            file = Path(target)
            if not file.is_file():
                raise SplitError(f"--decode {spec}: {file} is not a file")
            loader = importlib.util.spec_from_file_location(f"dff_decode_{file.stem}", file)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except SplitError:
        raise
    except Exception as e:
        raise SplitError(f"--decode {spec}: importing it failed ({type(e).__name__}: "
                         f"{_first_line(e)})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SplitError(f"--decode {spec}: has no callable {attr!r}")
    kwargs = dict(args or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if score_threshold is not None and "score_threshold" in params \
            and "score_threshold" not in kwargs:
        kwargs["score_threshold"] = score_threshold
    try:
        made = factory(**kwargs)
    except Exception as e:
        raise SplitError(f"--decode {spec}: calling it with {kwargs} raised "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    if not callable(made):
        raise SplitError(f"--decode {spec}: returned {type(made).__name__}; return a torch "
                         "nn.Module (or function) of the model's outputs")
    return made


def _decode_module(decode: Any, kind: str) -> Any:
    import torch
    from dff.export.modules import detection_outputs

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decode = decode if isinstance(decode, torch.nn.Module) else None
            self.fn = decode

        def forward(self, *heads: Any) -> Any:
            raw = self.fn(*heads)
            if kind == tasks.DETECTION:
                boxes, scores, classes, num = detection_outputs(raw, "--decode")
                return (boxes.float(), scores.float(), classes.to(torch.int32),
                        num.to(torch.int32))
            labels = raw["labels"] if isinstance(raw, Mapping) else raw
            if isinstance(labels, (tuple, list)):
                labels = labels[0]
            return (labels.to(torch.uint8),)

    return Decode().eval()


def export_decode(module: Any, heads: Mapping[str, np.ndarray], names: list[str],
                  dims: Mapping[str, list], kind: str, path: Path, verbose: bool) -> onnx.ModelProto:
    """The decode as ONNX (torch.onnx dynamo, opset 20), inputs named after the model's outputs
    with the prefix `decode_in/`; dynamic where the model's output axes are."""
    import torch
    from dff.export.graphs import OPSET, quiet

    args = tuple(torch.from_numpy(np.ascontiguousarray(heads[n])) for n in names)
    shapes = {}
    for i, n in enumerate(names):
        shapes[f"h{i}"] = {a: torch.export.Dim.DYNAMIC for a, d in enumerate(dims[n])
                           if isinstance(d, str)}
    outputs = [o.name for o in tasks.OUTPUTS[kind]]

    # a forward with one named argument per output, h0, h1, ... (dynamic_shapes names them)
    sig = ", ".join(f"h{i}" for i in range(len(names)))
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {sig}):\n    return self.inner({sig})\n", ns)  # noqa: S102 - named args for dynamic_shapes
    Wrap = type("DecodeInputs", (torch.nn.Module,), {"forward": ns["forward"]})
    try:
        with quiet(not verbose), torch.no_grad():
            program = torch.onnx.export(
                _wrapped(Wrap, module), args, dynamo=True, opset_version=OPSET,
                input_names=[f"decode_in/{n}" for n in names], output_names=outputs,
                dynamic_shapes=shapes, verbose=verbose)
    except Exception as e:
        raise SplitError(f"--decode: torch.onnx.export failed on the decode "
                         f"({_first_line(e)}); rewrite it with ops ONNX has, or rerun with "
                         "--verbose") from e
    proto = program.model_proto
    onnx.save(proto, os.fspath(path))
    return proto


def _wrapped(cls: Any, module: Any) -> Any:
    wrapper = cls()
    wrapper.inner = module
    return wrapper.eval()


def merge_decode(task: onnx.ModelProto, decode: onnx.ModelProto, names: list[str],
                 specs: dict, kind: str, k: int | None) -> onnx.ModelProto:
    """task.onnx then the decode, one graph: the task graph converted to the decode's opset
    where it is older (onnx.version_converter), then onnx.compose.merge_models."""
    from onnx import compose, version_converter

    want = next(o.version for o in decode.opset_import if o.domain in ("", "ai.onnx"))
    have = next((o.version for o in task.opset_import if o.domain in ("", "ai.onnx")), want)
    if have != want:
        try:
            task = version_converter.convert_version(task, want)
        except Exception as e:
            raise SplitError(f"--decode: the model's opset {have} could not be converted to "
                             f"the decode's {want} to merge them ({_first_line(e)})") from e
    task.ir_version = decode.ir_version
    merged = compose.merge_models(task, decode, io_map=[(n, f"decode_in/{n}") for n in names],
                                  outputs=[o.name for o in decode.graph.output])
    n = specs["task"][0][0]["shape"][0]
    sizes = {"N": n, "K": k, "H": "H", "W": "W"}
    out_specs = [_spec(o.name, o.dtype, [sizes.get(d, d) if isinstance(d, str) else d
                                         for d in o.shape]) for o in tasks.OUTPUTS[kind]]
    for value, spec in zip(merged.graph.output, out_specs):
        _set_shape(value, spec["shape"])
    merged.graph.name = "dff_task"
    onnx.checker.check_model(merged)
    specs["task"] = (specs["task"][0], out_specs)
    return merged


# --------------------------------------------------------------------------------- parity

def check_parity(whole: onnx.ModelProto, paths: Mapping[str, Path], tensor: str,
                 outputs: list[str], pre: Preprocess, cases: list[parity_mod.Case],
                 tolerance: float, decode: Any = None, kind: str = tasks.RAW,
                 raw_task: Path | None = None, decode_path: Path | None = None,
                 frames: int = 100) -> list[parity_mod.Row]:
    """feature then task against the whole model (ORT both); with a decode, task.onnx on the
    whole model's features against the torch decode of the whole model's outputs, and the
    decode's ONNX against torch on `frames` sets of random heads (uniform in [0, 1], each
    output's shape: a model's outputs on plain frames may hold nothing above the threshold)."""
    run = parity_mod.onnxruntime_runner()
    session = _session(whole)
    source = whole.graph.input[0].name
    rows = []
    for case in cases:
        ref = _run(session, {source: pre.numpy(case.image)})
        feat = run("feature", os.fspath(paths["feature"]), {"image": case.image})["feat"]
        rows.append(parity_mod.compare("feature", "feat", case.name, ref[tensor], feat,
                                       tolerance))
        got = run("task", os.fspath(raw_task or paths["task"]), {"feat": feat})
        rows += [parity_mod.compare("task", o, case.name, ref[o], got.get(o), tolerance)
                 for o in outputs]
        if decode is None:
            continue
        import torch

        with torch.no_grad():
            want = decode(*(torch.from_numpy(ref[o]) for o in outputs))
        names = [o.name for o in tasks.OUTPUTS[kind]]
        want_np = {n: v.numpy() for n, v in zip(names, want)}
        got = run("task", os.fspath(paths["task"]), {"feat": ref[tensor]})
        if kind == tasks.DETECTION:
            row = parity_mod.compare_detections(case.name, want_np, got, tolerance)
            rows.append(parity_mod.Row("task+decode", row.output, row.case, row.metric,
                                       row.value, row.tolerance, row.passed, row.peak,
                                       row.detail))
        else:
            rows += [parity_mod.compare("task+decode", n, case.name, want_np[n], got.get(n),
                                        tolerance) for n in names]
    if decode is not None and decode_path is not None:
        rows += _random_heads(decode, decode_path, ref, outputs, kind, tolerance, frames)
    return rows


def _random_heads(decode: Any, path: Path, ref: Mapping[str, np.ndarray], outputs: list[str],
                  kind: str, tolerance: float, frames: int) -> list[parity_mod.Row]:
    import torch

    rng = np.random.default_rng(0)
    names = [o.name for o in tasks.OUTPUTS[kind]]
    heads = {o: rng.uniform(0, 1, (frames, *ref[o].shape[1:])).astype(ref[o].dtype)
             for o in outputs}
    with torch.no_grad():
        want = {n: v.numpy() for n, v in zip(names, decode(*(torch.from_numpy(heads[o])
                                                              for o in outputs)))}
    got = parity_mod.onnxruntime_runner()("decode", os.fspath(path),
                                          {f"decode_in/{o}": heads[o] for o in outputs})
    case = f"random heads {frames}x{'x'.join(map(str, ref[outputs[0]].shape[2:]))}"
    if kind == tasks.DETECTION:
        r = parity_mod.compare_detections(case, want, got, tolerance)
        return [parity_mod.Row("decode", r.output, r.case, r.metric, r.value, r.tolerance,
                               r.passed, r.peak, r.detail)]
    return [parity_mod.compare("decode", n, case, want[n], got.get(n), tolerance)
            for n in names]


def parity_cases(shape: Shape) -> list[parity_mod.Case]:
    """Random frames and real-looking ones (a synthetic clip), as dff-export's other exports."""
    return parity_mod.default_cases(shape)


# --------------------------------------------------------------------------------- export

def _numbers(name: str, values: Sequence[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    v = tuple(float(x) for x in values)
    if len(v) != 3:
        raise SplitError(f"--{name} {list(values)}: give three numbers, one per channel")
    return v


def split_onnx(model_path: str | os.PathLike[str], feature_output: str,
               out_dir: str | os.PathLike[str] = "engines", *, bgr: bool = False,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               norm_scale: int | None = None, layout: str = "NCHW",
               input_size: tuple[int, int] | None = None, min_shape: Shape | None = None,
               opt_shape: Shape | None = None, max_shape: Shape | None = None,
               task: str = tasks.RAW, decode: str | None = None,
               decode_args: Mapping[str, Any] | None = None,
               class_names: Sequence[str] = (), score_threshold: float | None = None,
               key_interval: int = 10, tolerance: float = parity_mod.TOLERANCE,
               verbose: bool = False, log: Log | None = None,
               dis: Mapping[str, Any] | None = None) -> SplitResult:
    """Split `model_path` at `feature_output` into `out_dir` (see the module docstring).

    mean/std: three values each in the model's channel order (B, G, R with `bgr`), on 0..255
    (norm_scale 255, the default) or on [0,1] (norm_scale 1); defaults mean 0, std 1: raw
    pixels. `input_size` H x W: the opt shape (default: the model's declared size when fixed
    and at least 64, else DEFAULT_INPUT_SIZE). Raises a DffError and then writes nothing."""
    log = log or (lambda _: None)
    started = time.perf_counter()
    model, dropped = load_model(model_path)
    check_tensor(model, feature_output, model_path)
    check_cut(model, feature_output, model_path)  # first, whatever the other options
    if layout.upper() not in LAYOUTS:
        raise SplitError(f"--layout {layout}: give NCHW")
    if layout.upper() == "NHWC":
        raise SplitError("--layout NHWC: not supported; dff-export --onnx takes NCHW models "
                         "(image [N,3,H,W], features [N,C,h,w]); convert the model to NCHW "
                         "first (e.g. tf2onnx --inputs-as-nchw)")
    if task not in tasks.ALL_KINDS:
        raise SplitError(f"--task {task}: give one of {', '.join(tasks.ALL_KINDS)}")
    if task != tasks.RAW and decode is None:
        raise SplitError(f"--task {task}: needs --decode FILE.py:FUNC, a torch module mapping "
                         f"the model's outputs to the {task} contract (dff/tasks.py)")
    if task == tasks.RAW and decode is not None:
        raise SplitError("--decode: give --task segmentation or detection with it")
    if task == tasks.DETECTION and not class_names:
        raise SplitError("--task detection: give --class-names (one per class the decode "
                         "outputs)")
    try:
        values = pixel_scale({"mean": _numbers("mean", mean) or PIXEL_MEAN,
                              "std": _numbers("std", std) or PIXEL_STD}, norm_scale,
                             {"mean": PIXEL_MEAN, "std": PIXEL_STD})
    except ModuleError as e:
        raise SplitError(str(e)) from None
    if not all(v > 0 for v in values["std"]):
        raise SplitError(f"--std {list(values['std'])}: every std must be positive")
    pre = Preprocess(values["mean"], values["std"], bgr)
    image = _image_input(model, model_path)
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise SplitError(f"--onnx {model_path}: input {image.name!r} is "
                         f"{_np_type(image.type.tensor_type.elem_type)}; --onnx takes a model "
                         "with a float32 image input (it casts and normalises the uint8 frames)")
    dims = _dims(image)
    if len(dims) != 4 or (isinstance(dims[1], int) and dims[1] not in (0, 3)):
        raise SplitError(f"--onnx {model_path}: input {image.name!r} is {dims}, expected an "
                         "NCHW image [N,3,H,W]" + (" (an NHWC model? --layout NHWC is not "
                                                   "supported)" if dims[-1:] == [3] else ""))
    if dropped:
        log(f"note: {dropped} weights were also listed as graph inputs (an old exporter's "
            "habit); dropped from the inputs")
    # the opt size
    if opt_shape is not None and input_size is not None and tuple(opt_shape[1:]) != \
            tuple(input_size):
        raise SplitError(f"--input-size {input_size[0]}x{input_size[1]} and --opt-shape "
                         f"{format_shape(opt_shape)} disagree; give one")
    size = tuple(opt_shape[1:]) if opt_shape else (tuple(input_size) if input_size else None)
    size = size or declared_size(model) or DEFAULT_INPUT_SIZE
    fixed_hw = all(s is not None and s[1:] == size for s in (min_shape, max_shape))
    dynamic = make_dynamic(model, feature_output)
    outputs = [o.name for o in model.graph.output]
    log(f"probing {Path(model_path).name} on ONNX Runtime at 1x{size[0]}x{size[1]}"
        + ("" if fixed_hw else f", 1x{2 * size[0]}x{2 * size[1]}") + " and batch 2 ...")
    p = probe(dynamic, feature_output, size, fixed_hw, pre, model_path)  # type: ignore[arg-type]
    log(f"  {feature_output}: C={p.channels}, stride {p.stride}, batch "
        f"{'free' if p.batch_free else 'fixed at 1'}")
    if not p.batch_free:
        for name, shape in (("min", min_shape), ("opt", opt_shape), ("max", max_shape)):
            if shape is not None and shape[0] != 1:
                raise SplitError(f"--{name}-shape {format_shape(shape)}: the graph runs batch 1 "
                                 "only (it failed or kept batch 1 at batch 2); give N = 1")
    profile = make_profile(list(size), p.stride, min_shape, opt_shape or (1, *size), max_shape)
    if not p.batch_free:
        profile = Profile((1, *profile.min[1:]), (1, *profile.opt[1:]), (1, *profile.max[1:]),
                          p.stride)
    feature, task_graph, specs = extract(dynamic, feature_output, outputs, p, pre)
    decoder = None
    if decode is not None:
        made = load_decode(decode, decode_args, score_threshold)
        if score_threshold is None:  # the decode's own, where it says
            own = getattr(made, "score_threshold", None)
            score_threshold = float(own) if isinstance(own, (int, float)) else None
        decoder = _decode_module(made, task)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SplitError(f"{out}: exists and is not a folder; pick another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dff-export-", dir=out.parent))
    try:
        paths = {"feature": tmp / FEATURE, "task": tmp / TASK}
        onnx.save(feature, os.fspath(paths["feature"]))
        raw_task = None
        k = None
        if decoder is not None:
            raw_task = tmp / "task_raw.onnx"
            onnx.save(task_graph, os.fspath(raw_task))
            example = parity_mod.clip_case((2 if p.batch_free else 1, *profile.opt[1:]),
                                           seed=1).image  # batch 2: no size-1 specialising
            heads = _run(_session(dynamic), {dynamic.graph.input[0].name: pre.numpy(example)})
            out_dims = {s["name"]: s["shape"] for s in specs["task"][1]}
            log("exporting the decode (torch.onnx) and merging it after task.onnx ...")
            proto = export_decode(decoder, heads, outputs, out_dims, task, tmp / "decode.onnx",
                                  verbose)
            if task == tasks.DETECTION:
                k = int(next(_dims(o) for o in proto.graph.output if o.name == "boxes")[1] or 0)
                if not k:
                    import torch

                    with torch.no_grad():
                        k = int(decoder(*(torch.from_numpy(heads[o]) for o in outputs))[0]
                                .shape[1])
            task_graph = merge_decode(task_graph, proto, outputs, specs, task, k)
        onnx.save(task_graph, os.fspath(paths["task"]))
        shape = (2 if p.batch_free and profile.max[0] >= 2 else 1, *profile.opt[1:])
        log(f"parity: feature.onnx then task.onnx against the whole model, both on ONNX Runtime "
            f"CPU, random and clip frames at {format_shape(shape)} ...")
        cases = parity_cases(shape)
        rows = check_parity(dynamic, paths, feature_output, outputs, pre, cases, tolerance,
                            decoder, task, raw_task,
                            tmp / "decode.onnx" if decoder is not None else None)
        log(parity_mod.format_table(rows))
        parity_mod.require_pass(rows)
        onnx.save(onnx_op.warp_graph(p.channels, onnx_op.DEFAULT_OPSET),
                  os.fspath(tmp / onnx_op.WARP_FILE))
        manifest = build_manifest(
            model_path, feature_output, tmp, specs, profile, p, pre, rows, tolerance, task,
            list(class_names), k, score_threshold, key_interval, decode, decode_args,
            {c.name: len(c.image) for c in cases}, dropped, model, dis)
        manifest_mod.write_manifest(tmp / manifest_mod.FILENAME, manifest)
        names = [FEATURE, TASK, onnx_op.WARP_FILE, manifest_mod.FILENAME]
        out.mkdir(parents=True, exist_ok=True)
        for name in names:  # the manifest last
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"split and checked in {time.perf_counter() - started:.1f} s")
    return SplitResult(out, {name: out / name for name in names}, manifest, rows)


def build_manifest(model_path: Any, tensor: str, directory: Path, specs: dict,
                   profile: Profile, p: Probe, pre: Preprocess, rows: list[parity_mod.Row],
                   tolerance: float, kind: str, class_names: list[str], k: int | None,
                   score_threshold: float | None, key_interval: int, decode: str | None,
                   decode_args: Mapping[str, Any] | None, frames: dict[str, int],
                   dropped: int, model: onnx.ModelProto,
                   dis: Mapping[str, Any] | None = None) -> dict:
    import onnxruntime
    from dff.export.exporter import warp_entry

    outputs = [s["name"] for s in specs["task"][1]]
    if kind == tasks.RAW:
        task = tasks.task_entry(tasks.RAW, outputs=outputs)
    else:
        task = tasks.task_entry(kind, max_detections=k or tasks.MAX_DETECTIONS,
                                score_threshold=tasks.SCORE_THRESHOLD if score_threshold is None
                                else score_threshold)
    graphs = {}
    for name, file in (("feature", FEATURE), ("task", TASK)):
        path = directory / file
        doc = _DOCS["task/decode" if name == "task" and decode else name]
        graphs[name] = {"file": file, "sha256": manifest_mod.sha256_file(path),
                        "bytes": path.stat().st_size, "doc": doc,
                        "inputs": specs[name][0], "outputs": specs[name][1], "custom_ops": []}
    graphs["warp"] = warp_entry(directory, p.channels)
    worst: dict[str, float] = {}
    for r in rows:
        key = f"{r.graph}/{r.output}"
        share = r.metric in ("equal", "frames")
        worst[key] = (min if share else max)(worst.get(key, r.value), r.value)
    parity: dict = {"backend": "onnxruntime CPUExecutionProvider",
                    "reference": "the whole model on ONNX Runtime, same normalisation"
                                 + ("; the decode: torch on the whole model's outputs"
                                    if decode else ""),
                    "tolerance": tolerance, "tolerance_rule": parity_mod.TOLERANCE_RULE,
                    "min_equal": parity_mod.MIN_EQUAL, "passed": all(r.passed for r in rows),
                    "cases": sorted({r.case for r in rows}), "frames": frames, "worst": worst}
    if kind == tasks.DETECTION:
        parity["detection_rule"] = parity_mod.DETECTION_RULE
    mean, std = pre.rgb()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    dims_used = {d for g in graphs.values() for t in (*g["inputs"], *g["outputs"])
                 for d in t["shape"] if isinstance(d, str)}
    return {
        "format": manifest_mod.FORMAT,
        "version": manifest_mod.VERSION,
        "task": task,
        "class_names": class_names,
        "num_classes": len(class_names),
        "normalisation": {"mean": mean, "std": std,
                          "flow": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
                          "model_channels": "BGR" if pre.bgr else "RGB",
                          "input": "uint8 RGB NCHW in 0..255; feature.onnx casts to float"
                                   + (", flips the channels to BGR" if pre.bgr else "")
                                   + " and computes (x - mean) / std inside (mean, std: in RGB "
                                   "order here, on 0..255); no learned flow (flow: unused)"},
        "stride": p.stride,
        "feat_channels": p.channels,
        "key_interval": key_interval,
        "profile": profile.to_dict(),
        "dims": {k_: v for k_, v in _DIMS.items() if k_ in dims_used},
        "graphs": graphs,
        "plugin": {"op": onnx_op.OP_TYPE, "domain": onnx_op.DOMAIN,
                   "version": onnx_op.OP_VERSION, "graph": None,
                   "inputs": ["feat", "flow", "scale"], "outputs": ["out"],
                   "function": "unused: this export has no flow.onnx; warp.onnx is standard "
                               "ONNX"},
        "flow": {"sources": [manifest_mod.DIS], "default": manifest_mod.DIS,
                 **({"dis": dict(dis)} if dis else {})},  # DIS settings chosen for this model
        "engines": {},
        "export": {
            "onnx": {"file": str(Path(model_path).resolve()),
                     "sha256": manifest_mod.sha256_file(model_path),
                     "feature_output": tensor, "opset": opset,
                     "weights_dropped_from_inputs": dropped,
                     "decode": decode, "decode_args": dict(decode_args or {})},
            "tool": "dff-export --onnx", "tool_version": dff.__version__,
            "onnx_version": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "simplified": False, "parity": parity,
        },
    }
