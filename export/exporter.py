"""Checkpoint or modules -> feature.onnx, flow.onnx, task.onnx and manifest.json, all or nothing.

Every file is written into a temporary folder beside the output folder; only after all three
graphs pass onnx's checker and the parity check are they moved into place (one os.replace per
file, the manifest last), so a failed export leaves the output folder as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from dff.export import graphs as graphs_mod
from dff.export import manifest as manifest_mod
from dff.export import modules as modules_mod
from dff.export import parity as parity_mod
from dff.export.profile import Profile, Shape, make_profile
from dff.models.checkpoint import demo_checkpoint_path, file_sha256, load_checkpoint
from dff.plugins import onnx_op

import dff
from dff import tasks
from dff.errors import DffError

Log = Callable[[str], None]

_DOCS = {
    "feature": "N_feat on a key frame: uint8 image -> features (cast and normalisation inside)",
    "flow": "N_flow plus the warp on a non-key frame: flow and scale from (image, key_image), "
            "then feat = dff::FlowWarp(key_feat, flow, scale) in the same graph",
    "flow_key": "N_flow's key-frame part, once per key frame: uint8 key image -> key_code (its "
                "encoder map), which flow.onnx takes in place of key_image",
    "flow/keyed": "N_flow plus the warp on a non-key frame: flow and scale from (image, "
                  "key_code), then feat = dff::FlowWarp(key_feat, flow, scale) in the same graph",
    "warp": "the warp alone, for a flow computed on the host (--flow dis, scale 1): "
            "feat = GridSample(key_feat, cell centres + flow), standard ONNX, no plugin",
    "task": "N_task: features -> labels (arg-max, uint8) and optionally probs (softmax), "
            "at image size",
    "task/detection": "N_task: features -> boxes, scores, classes, num (CenterNet decode: "
                      "3x3 peak test, TopK(K), gathers; rows after num are padding)",
}
_DIMS = {"N": "batch", "H": "image height, a multiple of the stride",
         "W": "image width, a multiple of the stride", "h": "H / stride (feature grid height)",
         "w": "W / stride (feature grid width)",
         "hk": "key_code's grid height: ceil(floor(H / shrink) / cell), graphs.flow_key.grid",
         "wk": "key_code's grid width: ceil(floor(W / shrink) / cell), graphs.flow_key.grid"}


@dataclass
class ExportResult:
    directory: Path
    files: dict[str, Path]  # file name -> final path, manifest.json included
    manifest: dict
    rows: list[parity_mod.Row]


def require_onnxsim() -> None:
    if importlib.util.find_spec("onnxsim") is None:
        raise DffError("--simplify needs onnxsim, which is not installed; "
                       "`pip install onnxsim` or drop --simplify")


def _simplify(proto: onnx.ModelProto, spec: graphs_mod.GraphSpec) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise graphs_mod.ExportError(f"{spec.file}: onnxsim's result failed its own check; "
                                     "export without --simplify")
    graphs_mod.check_graph(simplified, spec)
    return simplified


def demo_checkpoint(task: str = tasks.SEGMENTATION) -> Path:
    """The shipped weights of the demo `task` (a task, or "rfcn"), or a DffError saying
    they are missing (demo_checkpoint_path refuses an unknown name)."""
    path = Path(demo_checkpoint_path(task))
    if path.is_file():
        return path
    if task != tasks.SEGMENTATION:
        raise DffError(f"--demo {task}: the shipped {task} weights {path} are missing from "
                       "this install; pass a detection MODEL.pth written by dff-train")
    raise DffError(f"the shipped demo model {path} is missing (this install has no demo "
                   "weights); pass MODEL.pth written by dff-train")


def export_model(checkpoint: str | os.PathLike[str] | None = None,
                 out_dir: str | os.PathLike[str] = "engines", *,
                 min_shape: Shape | None = None, opt_shape: Shape | None = None,
                 max_shape: Shape | None = None, simplify: bool = False, probs: bool = False,
                 tolerance: float = parity_mod.TOLERANCE, verbose: bool = False,
                 log: Log | None = None, demo: str = tasks.SEGMENTATION,
                 flow: str = manifest_mod.LEARNED,
                 dis: dict[str, Any] | None = None) -> ExportResult:
    """Export `checkpoint` (None: the shipped demo model for the task `demo`) into `out_dir`:
    its modules (`modules.from_dff`) through `export_dff_modules`, so a dff-trt checkpoint
    and a user's own modules take one path. Raises a DffError and then writes nothing."""
    ckpt = Path(checkpoint) if checkpoint is not None else demo_checkpoint(demo)
    if simplify:
        require_onnxsim()
    model = load_checkpoint(ckpt)
    mods = modules_mod.from_dff(model, source={"checkpoint": ckpt})
    facts = modules_mod.exportable(model)[1]
    return export_dff_modules(mods, out_dir, min_shape=min_shape, opt_shape=opt_shape,
                              max_shape=max_shape, simplify=simplify, probs=probs,
                              tolerance=tolerance, verbose=verbose, log=log, facts=facts,
                              flow=flow, dis=dis)


def export_modules(out_dir: str | os.PathLike[str], *, feature: torch.nn.Module,
                   flow: torch.nn.Module | None = None, task: torch.nn.Module,
                   kind: str = tasks.SEGMENTATION, class_names: Sequence[str],
                   input_size: tuple[int, int], stride: int = 16,
                   feature_mean: Sequence[float] = modules_mod.IMAGENET_MEAN,
                   feature_std: Sequence[float] = modules_mod.IMAGENET_STD,
                   flow_mean: Sequence[float] = modules_mod.UNIT_MEAN,
                   flow_std: Sequence[float] = modules_mod.UNIT_STD, key_interval: int = 10,
                   min_shape: Shape | None = None, opt_shape: Shape | None = None,
                   max_shape: Shape | None = None, norm_scale: int | None = None,
                   **export_options: Any) -> ExportResult:
    """Export your own feature, flow and task modules (the contract: dff.export.modules) as
    dff-export does a checkpoint: three graphs, checks, parity and manifest.json. `flow`
    None: RealFlowNet, pretrained on real footage (modules.with_default_flow). Means and
    stds are on the 0..255 pixel scale, or on [0,1] with `norm_scale=1` (then times 255 into
    the manifest); stds all below 1 without `norm_scale` are refused (modules.pixel_scale).
    `export_options`: simplify, probs, tolerance, verbose, log, max_detections and
    score_threshold (detection)."""
    extra = {k: export_options.pop(k) for k in ("max_detections", "score_threshold")
             if k in export_options}
    mods = modules_mod.DFFModules(
        feature=feature, flow=flow, task=task, class_names=tuple(class_names),
        input_size=tuple(input_size), kind=kind, stride=stride, feature_mean=tuple(feature_mean),
        feature_std=tuple(feature_std), flow_mean=tuple(flow_mean), flow_std=tuple(flow_std),
        key_interval=key_interval, source={"api": "dff.export.export_modules"},
        norm_scale=norm_scale, **extra)
    return export_dff_modules(mods, out_dir, min_shape=min_shape, opt_shape=opt_shape,
                              max_shape=max_shape, **export_options)


def export_dff_modules(mods: modules_mod.DFFModules, out_dir: str | os.PathLike[str] = "engines",
                       *, min_shape: Shape | None = None, opt_shape: Shape | None = None,
                       max_shape: Shape | None = None, simplify: bool = False,
                       probs: bool = False, tolerance: float = parity_mod.TOLERANCE,
                       verbose: bool = False, log: Log | None = None,
                       facts: modules_mod.Facts | None = None,
                       norm_scale: int | None = None,
                       flow: str = manifest_mod.LEARNED,
                       dis: dict[str, Any] | None = None) -> ExportResult:
    """Export `mods` into `out_dir`; see the module docstring. Means and stds go onto 0..255
    first (`modules.apply_norm_scale`: `norm_scale`, else the modules' own). The modules go to eval mode
    (with a note when one was training) and are checked against the contract first
    (`modules.check_modules`); unset profile shapes default from `mods.input_size`. Raises a
    DffError (modules, profile, export, parity) and then writes nothing. `flow`: the flow
    source the manifest names as the default (`flow.default`; both are exported); `dis`: DIS
    settings {preset, scale} to record for this model (`flow.dis`)."""
    log = log or (lambda _: None)
    if flow not in manifest_mod.FLOW_SOURCES:
        raise DffError(f"--flow {flow!r}: choose one of {', '.join(manifest_mod.FLOW_SOURCES)}")
    if simplify:
        require_onnxsim()
    mods = modules_mod.with_default_flow(modules_mod.apply_norm_scale(mods, norm_scale))
    modules_mod.check_metadata(mods)
    modules_mod.eval_mode(mods, log)
    profile = make_profile(list(mods.input_size), mods.stride, min_shape, opt_shape, max_shape)
    facts = facts or modules_mod.check_modules(mods, tuple(profile.opt[1:]))
    specs = graphs_mod.graph_specs(mods, profile, probs=probs, facts=facts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DffError(f"{out}: exists and is not a folder; pick another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dff-export-", dir=out.parent))
    detection = mods.kind == tasks.DETECTION
    try:
        for spec in specs.values():
            start = time.perf_counter()
            log(f"exporting {spec.file} ...")
            proto = graphs_mod.export_graph(mods, spec, profile, tmp / spec.file, verbose,
                                            facts=facts)
            # flow.onnx stays as exported: its FlowWarp node and function body are the contract
            if simplify and spec.name != "flow":
                proto = _simplify(proto, spec)
                onnx.save(proto, os.fspath(tmp / spec.file))
            log(f"  {spec.file}: {len(proto.graph.node)} nodes, "
                f"{human_size(tmp / spec.file)}, {time.perf_counter() - start:.1f} s")
        shape = profile.opt
        log(f"parity vs PyTorch on ONNX Runtime CPU, random and clip frames at "
            f"{'x'.join(map(str, shape))}"
            + (f" (+ {parity_mod.DETECTION_FRAMES} feature maps for task.onnx)"
               if detection else "") + " ...")
        paths = {name: tmp / spec.file for name, spec in specs.items()}
        cases = parity_mod.default_cases(shape)
        rows = parity_mod.check_parity(mods, paths, cases, tolerance, facts=facts)
        if detection:  # many frames, so that 99.9 % of them means something
            cases.append(parity_mod.feature_case(mods, shape))
            batch = 100 if profile.dynamic("N") else profile.min[0]
            rows.append(parity_mod.check_task_frames(mods, paths["task"], cases[-1],
                                                     tolerance, batch=batch, facts=facts))
        log(parity_mod.format_table(rows))
        parity_mod.require_pass(rows)
        onnx.save(onnx_op.warp_graph(facts.feat_channels, graphs_mod.OPSET),
                  os.fspath(tmp / onnx_op.WARP_FILE))
        manifest = build_manifest(mods, facts, profile, specs, tmp, rows, tolerance,
                                  simplify, {c.name: len(c.image) for c in cases}, flow, dis)
        manifest_mod.write_manifest(tmp / manifest_mod.FILENAME, manifest)
        names = [spec.file for spec in specs.values()] + [onnx_op.WARP_FILE,
                                                          manifest_mod.FILENAME]
        out.mkdir(parents=True, exist_ok=True)
        for name in names:  # the manifest last: it vouches for the graphs before it
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, {name: out / name for name in names}, manifest, rows)


def weights_sha256(mods: modules_mod.DFFModules) -> str:
    """One sha256 over the three modules' state dicts (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for graph in ("feature", "flow", "task"):
        for name, tensor in getattr(mods, graph).state_dict().items():
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{graph}.{name}:{t.dtype}:{list(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_manifest(mods: modules_mod.DFFModules, facts: modules_mod.Facts, profile: Profile,
                   specs: dict[str, graphs_mod.GraphSpec], directory: Path,
                   rows: list[parity_mod.Row], tolerance: float, simplified: bool,
                   frames: dict[str, int] | None = None, flow: str = manifest_mod.LEARNED,
                   dis: dict[str, Any] | None = None) -> dict:
    """The manifest (export/manifest.py's layout) for the graphs in `directory`; `frames`:
    the parity cases' frame counts; `flow`, `dis`: the default flow source and the DIS
    settings recorded for this model (`flow.default`, `flow.dis`)."""
    import onnxruntime

    outputs = [t.name for t in specs["task"].outputs]
    task = tasks.task_entry(mods.kind, max_detections=mods.max_detections,
                            score_threshold=mods.score_threshold, probs="probs" in outputs)
    detection = mods.kind == tasks.DETECTION
    graphs = {}
    keyed = "flow_key" in specs
    for name, spec in specs.items():
        doc = ("task/detection" if detection and name == "task"
               else "flow/keyed" if keyed and name == "flow" else name)
        graphs[name] = graph_entry(directory, spec, _DOCS[doc], mods.flow)
    graphs["warp"] = warp_entry(directory, facts.feat_channels)
    worst: dict[str, float] = {}
    for r in rows:
        key = f"{r.graph}/{r.output}"
        share = r.metric in ("equal", "frames")  # a fraction: the worst is the smallest
        worst[key] = (min if share else max)(worst.get(key, r.value), r.value)
    parity: dict = {"backend": "onnxruntime CPUExecutionProvider", "tolerance": tolerance,
                    "tolerance_rule": parity_mod.TOLERANCE_RULE,
                    "min_equal": parity_mod.MIN_EQUAL, "passed": all(r.passed for r in rows),
                    "cases": sorted({r.case for r in rows}), "frames": frames or {},
                    "worst": worst}
    if detection:
        parity["detection_rule"] = parity_mod.DETECTION_RULE
    checkpoint = mods.source.get("checkpoint")
    made: dict[str, Any] = {}
    if checkpoint is not None:
        made = {"checkpoint": str(Path(checkpoint).resolve()),
                "checkpoint_sha256": file_sha256(checkpoint)}
    made["modules"] = {
        **{g: modules_mod.describe(getattr(mods, g)) for g in ("feature", "flow", "task")},
        **{k: v for k, v in mods.source.items() if k != "checkpoint"},
        "scale_field": facts.scale_field, "weights_sha256": weights_sha256(mods)}
    return {
        "format": manifest_mod.FORMAT,
        "version": manifest_mod.VERSION,
        "task": task,
        "class_names": list(mods.class_names),
        "num_classes": mods.num_classes,
        "normalisation": {"mean": list(mods.feature_mean), "std": list(mods.feature_std),
                          "flow": {"mean": list(mods.flow_mean), "std": list(mods.flow_std)},
                          "input": "uint8 RGB NCHW in 0..255; each graph casts to float and "
                                   "computes (x - mean) / std inside (mean, std: the feature "
                                   "graph's; flow: the flow graph's)"},
        "stride": mods.stride,
        "feat_channels": facts.feat_channels,
        "key_interval": mods.key_interval,
        "profile": profile.to_dict(),
        "dims": {k: v for k, v in _DIMS.items()
                 if any(k in t.shape for s in specs.values() for t in (*s.inputs, *s.outputs))},
        "graphs": graphs,
        "plugin": {"op": onnx_op.OP_TYPE, "domain": onnx_op.DOMAIN,
                   "version": onnx_op.OP_VERSION, "graph": "flow",
                   "inputs": ["feat", "flow", "scale"], "outputs": ["out"],
                   "function": "model-local FunctionProto (GridSample body) attached, so ONNX "
                               "Runtime runs it; TensorRT may use its registered plugin"},
        "flow": {"sources": [manifest_mod.LEARNED, manifest_mod.DIS], "default": flow,
                 **({"dis": dict(dis)} if dis else {})},
        "engines": {},
        "export": {
            **made,
            "tool": "dff-export", "tool_version": dff.__version__,
            "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": graphs_mod.OPSET,
            "simplified": simplified, "parity": parity,
        },
    }


def graph_entry(directory: Path, spec: graphs_mod.GraphSpec, doc: str,
                flow_net: torch.nn.Module | None = None) -> dict:
    """graphs.<name> of the manifest for `spec`'s file in `directory`: file, sha256, bytes,
    doc, tensors, custom ops (FlowWarp in flow.onnx), and for flow_key the code's grid (of
    `flow_net`, graphs.key_cache)."""
    path = directory / spec.file
    entry = {"file": spec.file, "sha256": manifest_mod.sha256_file(path),
             "bytes": path.stat().st_size, "doc": doc,
             "inputs": [t.to_dict() for t in spec.inputs],
             "outputs": [t.to_dict() for t in spec.outputs],
             "custom_ops": [f"{onnx_op.DOMAIN}::{onnx_op.OP_TYPE}"] if spec.name == "flow"
             else []}
    if spec.name == "flow_key":
        cache = graphs_mod.key_cache(flow_net) or {}
        entry["grid"] = {k: cache[k] for k in ("shrink", "cell")}
    return entry


def warp_entry(directory: Path, channels: int) -> dict:
    """graphs.warp of the manifest: warp.onnx in `directory` (onnx_op.warp_graph)."""
    path = directory / onnx_op.WARP_FILE
    f32, c = "float32", channels
    return {"file": onnx_op.WARP_FILE, "sha256": manifest_mod.sha256_file(path),
            "bytes": path.stat().st_size, "doc": _DOCS["warp"],
            "inputs": [{"name": "key_feat", "dtype": f32, "shape": ["N", c, "h", "w"]},
                       {"name": "flow", "dtype": f32, "shape": ["N", 2, "h", "w"]}],
            "outputs": [{"name": "feat", "dtype": f32, "shape": ["N", c, "h", "w"]}],
            "custom_ops": []}


def human_size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
