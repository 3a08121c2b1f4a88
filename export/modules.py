"""Bring your own model: the three PyTorch modules dff-export takes, and what it checks of them.

`DFFModules` holds a user's feature, flow and task modules with the metadata the graphs need
(docs/DESIGN.md §8). dff-trt's own checkpoints become one too (`from_dff`), so every export
takes the same path: `check_modules` first (shapes, eval mode), then the graph wrappers of
`dff.export.graphs`, then parity and the manifest (`dff.export.exporter.export_modules`).

The contract, for images of H×W and a stride s (h = H/s, w = W/s):

- `feature(x) -> feat [N,C,h,w]`, x float [N,3,H,W] RGB, (pixel - feature_mean) / feature_std;
- `flow(x, key_x) -> (flow [N,2,h,w], scale [N,C,h,w] or None[, quality [N,1]])`, both
  normalised with the flow's own mean and std; flow in feature cells, current frame -> key
  frame (dx, dy); scale None for a flow net without a scale field (the warp then multiplies
  by 1); the optional third, a float per frame that grows as propagation gets worse, becomes
  flow.onnx's output `quality`, what `--schedule learned` reads (docs/DESIGN.md §10). No flow
  (None, or left out of a factory's dict): RealFlowNet pretrained on real footage
  (models/realflow.py, `with_default_flow`), which dff-adapt can then fit to your video;
- `task(feat)`: segmentation: logits [N,K,h',w'] at any resolution (the graph resizes them
  bilinearly to H×W, then arg-maxes); detection: boxes [N,D,4], scores [N,D], classes [N,D]
  and num [N] (dff/tasks.py), as a tuple in that order or a dict of those names.

Means and stds are on the 0..255 pixel scale (the graphs take uint8 and normalise inside);
mean 0 and std 1 hand the module the pixels as they are. Values on [0,1] (torchvision's
convention) are taken when the caller says so, `norm_scale=1` (dff-export --norm-scale 1), and
multiplied by 255; values that can only be on [0,1] (every std below 1) are refused when the
caller does not say (`pixel_scale`), never silently taken as 0..255.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from dff import tasks
from dff.errors import DffError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # ImageNet's (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.12, 57.375)  # (0.229, 0.224, 0.225) x 255
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)  # pixels to [0, 1]
STRIDES = (8, 16, 32)
NORM_SCALES = (255, 1)  # the scale means and stds are given on: 0..255 pixels, or [0, 1]
# the DFFModules defaults, always on 0..255 whatever norm_scale says
_NORM_DEFAULTS = {"feature_mean": IMAGENET_MEAN, "feature_std": IMAGENET_STD,
                  "flow_mean": UNIT_MEAN, "flow_std": UNIT_STD}


class ModuleError(DffError):
    """A module or factory that does not meet the DFF contract."""


@dataclass
class DFFModules:
    """What `export_modules` exports: three modules and the metadata of their graphs."""

    feature: nn.Module
    flow: nn.Module | None  # None: RealFlowNet pretrained on real footage (`with_default_flow`)
    task: nn.Module
    class_names: Sequence[str]
    input_size: tuple[int, int]
    kind: str = tasks.SEGMENTATION
    stride: int = 16
    feature_mean: Sequence[float] = IMAGENET_MEAN
    feature_std: Sequence[float] = IMAGENET_STD
    flow_mean: Sequence[float] = UNIT_MEAN
    flow_std: Sequence[float] = UNIT_STD
    key_interval: int = 10
    max_detections: int = tasks.MAX_DETECTIONS  # detection: D, the task's rows per frame
    score_threshold: float = tasks.SCORE_THRESHOLD  # detection: rows at most this are padding
    source: dict[str, Any] = field(default_factory=dict)  # where they came from (the manifest)
    # the scale the means and stds are on: 255 (0..255 pixels) or 1 ([0,1], times 255 on
    # export); None: not said, and then stds all below 1 are refused (pixel_scale)
    norm_scale: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def describe(module: Any) -> str:
    """`name (path/to/file.py:line)` of a module's class, for messages."""
    cls = module if inspect.isclass(module) else type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        path = inspect.getsourcefile(cls)
        line = inspect.getsourcelines(cls)[1]
    except (TypeError, OSError):
        return name
    return f"{name} ({_short(path)}:{line})" if path else name


def _short(path: str | None) -> str:
    if not path:
        return "?"
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def load_factory(spec: str, args: Mapping[str, Any] | None = None) -> DFFModules:
    """`package.module:factory` imported and called with `args`; what it returns (DFFModules
    or a dict of its fields) checked into DFFModules. Errors name the factory's file and line."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModuleError(f"--module {spec!r}: give package.module:factory, e.g. "
                          "mymodels.dff:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own package
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:
        raise ModuleError(f"--module {spec}: importing {module_name} failed "
                          f"({type(e).__name__}: {e}); check the name and PYTHONPATH") from e
    factory = getattr(mod, attr, None)
    where = f"{spec} ({_short(getattr(mod, '__file__', None))})"
    if not callable(factory):
        raise ModuleError(f"--module {where}: has no callable {attr!r}")
    where = _where(factory, spec)
    try:
        made = factory(**dict(args or {}))
    except TypeError as e:
        raise ModuleError(f"{where}: calling it with {dict(args or {})} failed ({e}); "
                          "pass its arguments with --module-arg NAME=VALUE") from e
    except DffError:
        raise
    except Exception as e:
        raise ModuleError(f"{where}: raised {type(e).__name__}: {e}") from e
    return as_modules(made, where)


def _where(factory: Callable, spec: str) -> str:
    try:
        path = inspect.getsourcefile(factory)
        line = inspect.getsourcelines(factory)[1]
    except (TypeError, OSError):
        return f"factory {spec}"
    return f"factory {spec} ({_short(path)}:{line})"


def as_modules(made: Any, where: str) -> DFFModules:
    """A factory's result as DFFModules: one already, or a dict of its fields."""
    if isinstance(made, DFFModules):
        mods = made
    elif isinstance(made, Mapping):
        names = {f.name for f in fields(DFFModules)}
        unknown = sorted(set(made) - names)
        if unknown:
            raise ModuleError(f"{where}: returned unknown fields {unknown}; the fields are "
                              f"{sorted(names)}")
        missing = [n for n in ("feature", "task", "class_names", "input_size")
                   if n not in made]
        if missing:
            raise ModuleError(f"{where}: returned no {', '.join(missing)}; return "
                              "dff.export.DFFModules(...) or a dict with those fields")
        mods = DFFModules(**{"flow": None, **made})
    else:
        raise ModuleError(f"{where}: returned {type(made).__name__}; return "
                          "dff.export.DFFModules(feature=..., flow=..., task=..., ...) or a dict "
                          "of its fields")
    mods.source.setdefault("factory", where)
    return mods


def _norm_fix() -> str:
    return ("say which scale they are on: norm_scale=1 (dff-export --norm-scale 1) for values "
            "on [0,1], torchvision's convention (e.g. std 0.229, 0.224, 0.225; multiplied by 255 "
            "into the manifest), or norm_scale=255 (--norm-scale 255) for values on 0..255 "
            "pixels, mmdet's convention and the manifest's (e.g. std 58.395, 57.12, 57.375)")


def pixel_scale(values: Mapping[str, Sequence[float]], norm_scale: int | None,
                defaults: Mapping[str, Sequence[float]] | None = None) -> dict[str, tuple]:
    """Means and stds (name -> three values) on the 0..255 pixel scale the graphs use.

    `norm_scale` 255: as given; 1: given on [0,1], so times 255 (each value must then be at
    most 1); None (not said): as given, but a std whose every value is below 1 can only be on
    [0,1] and is refused, one line naming both conventions and the argument. Values equal to
    their entry in `defaults` are the library's own, on 0..255 already, and stay as they are.
    Raises ModuleError."""
    defaults = defaults or {}
    if norm_scale is not None and (isinstance(norm_scale, bool) or norm_scale not in NORM_SCALES):
        raise ModuleError(f"norm_scale {norm_scale!r}: give 255 (means and stds on 0..255 "
                          "pixels) or 1 (on [0,1])")
    out = {}
    for name, value in values.items():
        value = tuple(float(v) for v in value)
        if name in defaults and value == tuple(float(v) for v in defaults[name]):
            out[name] = value
            continue
        if norm_scale is None and name.endswith("std") and value and all(v < 1 for v in value):
            raise ModuleError(f"{name} {list(value)}: every std is below 1, so it can only be on "
                              "the [0,1] scale, but dff-trt's graphs take 0..255 pixels; "
                              + _norm_fix())
        if norm_scale == 1:
            if any(v > 1 for v in value):
                raise ModuleError(f"{name} {list(value)}: norm_scale=1 (--norm-scale 1) says "
                                  "the values are on [0,1], but one is above 1; drop it, or "
                                  "pass norm_scale=255 (--norm-scale 255) for 0..255 values")
            value = tuple(v * 255.0 for v in value)
        out[name] = value
    return out


def apply_norm_scale(mods: DFFModules, norm_scale: int | None = None) -> DFFModules:
    """`mods` with its means and stds on 0..255 (`pixel_scale`) and norm_scale 255; the scale
    from `norm_scale` (dff-export --norm-scale) or else the modules' own `norm_scale`."""
    from dataclasses import replace

    if norm_scale is not None and mods.norm_scale is not None and norm_scale != mods.norm_scale:
        raise ModuleError(f"--norm-scale {norm_scale}, but the modules say norm_scale="
                          f"{mods.norm_scale}; give one")
    scale = norm_scale if norm_scale is not None else mods.norm_scale
    values: dict[str, Any] = pixel_scale({n: getattr(mods, n) for n in _NORM_DEFAULTS}, scale,
                                         _NORM_DEFAULTS)
    return replace(mods, norm_scale=255, **values)


def with_default_flow(mods: DFFModules) -> DFFModules:
    """`mods` with a flow net: as given, or where it is None RealFlowNet (models/realflow.py,
    pretrained on real footage) for the stride, the feature's channels (one probe run) and
    the input size (`auto_input_scale`), with its own normalisation."""
    if mods.flow is not None or not isinstance(mods.feature, nn.Module):
        return mods  # (check_metadata names a feature that is not a module)
    from dff.models.realflow import VERSION, auto_input_scale, load_realflow

    h, w = (int(v) for v in mods.input_size)
    with torch.no_grad():
        feat = _call(mods.feature, "feature", (normalise(_example(mods, (h, w), 1, 0),
                                                         mods.feature_mean, mods.feature_std),))
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        raise ModuleError(f"feature {describe(mods.feature)}: gave {_shape(feat)}; expected "
                          "float32 [N, C, h, w]")
    scale = auto_input_scale(h, w)
    net = load_realflow(mods.stride, int(feat.shape[1]), input_scale=scale).eval()
    return replace(mods, flow=net, flow_mean=net.flow_mean, flow_std=net.flow_std,
                   source={**mods.source, "flow": f"dff.models.realflow.load_realflow (version "
                           f"{VERSION}, pretrained on real footage; input scale {scale:g})"})


def check_metadata(mods: DFFModules) -> None:
    """The metadata alone: task kind, class names, input size a multiple of the stride, means
    and stds of three channels, positive stds."""
    tasks.check_kind(mods.kind, "kind", f"pass kind={tasks.SEGMENTATION!r} or "
                                         f"{tasks.DETECTION!r}")
    for name in ("feature", "flow", "task"):
        if not isinstance(getattr(mods, name), nn.Module):
            raise ModuleError(f"{name}: {type(getattr(mods, name)).__name__} is not a "
                              "torch.nn.Module; wrap the callable in one")
    names = list(mods.class_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ModuleError(f"class_names {names!r}: give one non-empty string per class")
    if mods.kind == tasks.SEGMENTATION and len(names) > 256:
        raise ModuleError(f"{len(names)} classes do not fit the uint8 `labels` output (at "
                          "most 256)")
    if mods.stride not in STRIDES:
        raise ModuleError(f"stride {mods.stride!r}: expected one of "
                          f"{', '.join(map(str, STRIDES))}")
    size = tuple(mods.input_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 and v % mods.stride == 0
                                 for v in size):
        raise ModuleError(f"input_size {mods.input_size!r}: give (H, W), both multiples of the "
                          f"stride {mods.stride}")
    for name in ("feature_mean", "feature_std", "flow_mean", "flow_std"):
        value = list(getattr(mods, name))
        if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise ModuleError(f"{name} {value!r}: give three numbers (R, G, B) on the 0..255 "
                              "pixel scale")
        if name.endswith("std") and not all(v > 0 for v in value):
            raise ModuleError(f"{name} {value!r}: every std must be positive")
    if isinstance(mods.key_interval, bool) or not isinstance(mods.key_interval, int) \
            or mods.key_interval < 1:
        raise ModuleError(f"key_interval {mods.key_interval!r}: give an integer >= 1")
    if mods.kind == tasks.DETECTION and not 1 <= mods.max_detections <= tasks.TOPK_LIMIT:
        raise ModuleError(f"max_detections {mods.max_detections!r}: give 1 to "
                          f"{tasks.TOPK_LIMIT} (TensorRT's TopK limit)")


def eval_mode(mods: DFFModules, log: Callable[[str], None]) -> list[str]:
    """Put the three modules in eval mode; say which were training and why it matters."""
    changed = []
    for name in ("feature", "flow", "task"):
        module = getattr(mods, name)
        training = sorted({type(m).__name__ for m in module.modules() if m.training
                           and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout,
                                              nn.modules.dropout._DropoutNd))})
        if any(m.training for m in module.modules()):
            module.eval()
            changed.append(name)
            what = f" (its {', '.join(training)} would use batch statistics or drop units)" \
                if training else ""
            log(f"note: {name} {describe(module)} was in training mode{what}; exported in "
                "eval mode")
    return changed


@dataclass(frozen=True)
class Facts:
    """What `check_modules` learnt by running the modules once: the feature width C, whether
    the flow net has a scale field, whether segmentation logits need resizing to H×W, and
    whether the flow net outputs a `quality` too."""

    feat_channels: int
    scale_field: bool
    resize_logits: bool = False
    quality: bool = False


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _example(mods: DFFModules, size: tuple[int, int], batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, *size), generator=gen).float()


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(pixels - mean) / std, as the graphs compute it (times 1/std); identity for 0 and 1."""
    if list(mean) == [0, 0, 0] and list(std) == [1, 1, 1]:
        return pixels
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - m) * (1.0 / torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))


@torch.no_grad()
def check_modules(mods: DFFModules, size: tuple[int, int] | None = None,
                  batch: int = 2) -> Facts:
    """Run each module once on an example batch (at `size`, default input_size) and check its
    outputs against the contract; one ModuleError naming the module, the shape it gave, the
    shape expected and the fix."""
    check_metadata(mods)
    h_img, w_img = size or tuple(mods.input_size)
    s = mods.stride
    h, w = h_img // s, w_img // s
    image = _example(mods, (h_img, w_img), batch, 0)
    key = _example(mods, (h_img, w_img), batch, 1)
    given = f"for a {batch}x3x{h_img}x{w_img} image"
    feature, flow_net, task = (describe(getattr(mods, n)) for n in ("feature", "flow", "task"))

    feat = _call(mods.feature, "feature", (normalise(image, mods.feature_mean, mods.feature_std),))
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or feat.shape[0] != batch \
            or tuple(feat.shape[2:]) != (h, w) or feat.dtype != torch.float32:
        got = _shape(feat) + ("" if not isinstance(feat, torch.Tensor) or
                              feat.dtype == torch.float32 else f" {feat.dtype}")
        raise ModuleError(f"feature {feature}: gave feat {got} {given}; expected float32 "
                          f"[{batch}, C, {h}, {w}] (H/{s} x W/{s}); make its output stride {s} "
                          "or pass the stride it has (stride=...)")
    c = int(feat.shape[1])
    out = _call(mods.flow, "flow", (normalise(image, mods.flow_mean, mods.flow_std),
                                    normalise(key, mods.flow_mean, mods.flow_std)))
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ModuleError(f"flow {flow_net}: returned {_shape(out)}; expected a pair (flow "
                          "[N,2,h,w], scale [N,C,h,w] or None), or a triple with quality [N,1]")
    flow, scale = out[0], out[1]
    quality = out[2] if len(out) == 3 else None
    if quality is not None and (not isinstance(quality, torch.Tensor)
                                or tuple(quality.shape) != (batch, 1)
                                or not quality.is_floating_point()):
        raise ModuleError(f"flow {flow_net}: gave quality {_shape(quality)} {given}; expected "
                          f"float [{batch}, 1] (one value a frame, higher = propagation worse), "
                          "or return the pair (flow, scale) alone")
    if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != (batch, 2, h, w):
        channels = isinstance(flow, torch.Tensor) and flow.dim() == 4 and flow.shape[1] != 2
        why = ("2 channels, (dx, dy) in feature cells; predict two" if channels else
               f"the feature grid {h}x{w}; pool or resize it onto the stride-{s} grid (and give "
               "it in feature cells)")
        raise ModuleError(f"flow {flow_net}: gave flow {_shape(flow)} {given}; expected "
                          f"[{batch}, 2, {h}, {w}]: {why}")
    if scale is not None and (not isinstance(scale, torch.Tensor)
                              or tuple(scale.shape) != (batch, c, h, w)):
        raise ModuleError(f"flow {flow_net}: gave scale {_shape(scale)} {given}; expected "
                          f"[{batch}, {c}, {h}, {w}] (C = {c}, the feature's channels), or None "
                          "for a flow net without a scale field")
    raw = _call(mods.task, "task", (feat,))
    resize = False
    if mods.kind == tasks.SEGMENTATION:
        k = mods.num_classes
        if not isinstance(raw, torch.Tensor) or raw.dim() != 4 or raw.shape[0] != batch \
                or raw.shape[1] != k or not raw.is_floating_point():
            raise ModuleError(f"task {task}: gave {_shape(raw)} for feat {list(feat.shape)}; "
                              f"expected logits [{batch}, {k}, h', w'] ({k} class names), at any "
                              "resolution; return the logits before arg-max")
        resize = tuple(raw.shape[2:]) != (h_img, w_img)
    else:
        detection_outputs(raw, task, batch, f"for feat {list(feat.shape)}")
    return Facts(c, scale is not None, resize, quality is not None)


def detection_outputs(raw: Any, where: str, batch: int | None = None,
                      given: str = "") -> tuple[torch.Tensor, ...]:
    """A detection task's (boxes, scores, classes, num), from a tuple or a dict, checked."""
    names = tasks.output_names(tasks.DETECTION)
    if isinstance(raw, Mapping):
        if set(raw) < set(names) or any(n not in raw for n in names):
            raise ModuleError(f"task {where}: returned a dict of {sorted(raw)} {given}; expected "
                              f"{names} (dff/tasks.py)")
        raw = tuple(raw[n] for n in names)
    if not isinstance(raw, (tuple, list)) or len(raw) != 4 \
            or not all(isinstance(t, torch.Tensor) for t in raw):
        got = (f"a {type(raw).__name__} of {len(raw)}" if isinstance(raw, (tuple, list))
               else _shape(raw))
        raise ModuleError(f"task {where}: returned {got} {given}; a detection task "
                          f"returns {names}: boxes [N,D,4], scores [N,D], classes [N,D], num [N]")
    boxes, scores, classes, num = raw
    if batch is not None:
        n, d = batch, (boxes.shape[1] if boxes.dim() == 3 else "D")
        want = {"boxes": (n, d, 4), "scores": (n, d), "classes": (n, d), "num": (n,)}
        for name, t in zip(names, raw):
            if tuple(t.shape) != want[name]:
                raise ModuleError(f"task {where}: gave {name} {_shape(t)} {given}; expected "
                                  f"{list(want[name])} (boxes [N,D,4], scores and classes "
                                  "[N,D], num [N])")
        if classes.is_floating_point() or num.is_floating_point():
            raise ModuleError(f"task {where}: classes and num are {classes.dtype} and "
                              f"{num.dtype}; return integer tensors")
    return boxes, scores, classes, num


def _call(module: nn.Module, name: str, args: tuple) -> Any:
    try:
        return module(*args)
    except Exception as e:
        shapes = ", ".join(_shape(a) for a in args)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModuleError(f"{name} {describe(module)}: failed on input {shapes} "
                          f"({type(e).__name__}: {first}); it must take the contract's "
                          "inputs (dff.export.modules)") from e


# ------------------------------------------------------------------ dff-trt's own checkpoints

class _DFFFlow(nn.Module):
    """FlowNet-S as DFF.flow runs it: pixels 0..255, the mean subtracted inside; with a quality
    head (models/quality.py) its prediction too, as DFF.flow_quality."""

    def __init__(self, flownet: nn.Module, mean: torch.Tensor,
                 quality_head: nn.Module | None = None):
        super().__init__()
        self.flownet, self.quality_head = flownet, quality_head
        self.register_buffer("mean", mean.clone(), persistent=False)

    def forward(self, image: torch.Tensor, key_image: torch.Tensor):
        if self.quality_head is None:
            return self.flownet(image, key_image, self.mean)
        flow, scale, cat = self.flownet(image, key_image, self.mean, features=True)
        return flow, scale, self.quality_head(cat, flow)


class _DFFDetect(nn.Module):
    """The detection head and its decode (DFF.outputs) as one task module: CenterNet's, or
    R-FCN's (its NMS op exports through graphs.py's translation table)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.head
        self.config = model.config

    def forward(self, feat: torch.Tensor):
        from dff.models.detection import decode

        cfg = self.config
        if cfg.head == "rfcn":
            from dff.models.rfcn import rfcn_decode

            return rfcn_decode(self.head(feat), self.head.anchors, self.head.stride,
                               k=self.head.k, max_detections=cfg.max_detections,
                               score_threshold=cfg.score_threshold)
        return decode(*self.head(feat), stride=self.head.out_stride,
                      max_detections=cfg.max_detections, score_threshold=cfg.score_threshold)


def from_dff(model: Any, source: dict[str, Any] | None = None) -> DFFModules:
    """A dff-trt `DFF` as DFFModules: the trunk with the config's normalisation, FlowNet-S on
    raw pixels (mean 0, std 1: it subtracts its mean itself, so the graph's arithmetic is the
    model's), and the head (with its decode for detection)."""
    cfg = model.config
    task = model.head if cfg.task == tasks.SEGMENTATION else _DFFDetect(model)
    flow = _DFFFlow(model.flownet, model.mean, model.quality_head)
    for wrapper in (flow, task):  # a wrapper is in the mode of the model it wraps
        wrapper.training = model.training
    return DFFModules(
        feature=model.trunk, flow=flow, task=task,
        class_names=tuple(cfg.class_names), input_size=tuple(cfg.input_size), kind=cfg.task,
        stride=cfg.stride, feature_mean=tuple(cfg.mean), feature_std=tuple(cfg.std),
        flow_mean=(0.0, 0.0, 0.0), flow_std=(1.0, 1.0, 1.0), key_interval=cfg.key_interval,
        max_detections=cfg.max_detections, score_threshold=cfg.score_threshold,
        source=dict(source or {}))


def as_exportable(model: Any) -> DFFModules:
    """DFFModules as they are; a dff-trt DFF through `from_dff`."""
    return model if isinstance(model, DFFModules) else from_dff(model)


def exportable(model: Any, facts: Facts | None = None) -> tuple[DFFModules, Facts]:
    """DFFModules and their Facts: given, known from a DFF's config, or `check_modules`."""
    if isinstance(model, DFFModules):
        return model, facts or check_modules(model)
    mods = from_dff(model)
    return mods, facts or Facts(model.config.feat_channels, True, False,
                                model.quality_head is not None)
