"""Checkpoint -> feature.onnx, flow.onnx, task.onnx and manifest.json, all or nothing.

Every file is written into a temporary folder beside the output folder; only after all three
graphs pass onnx's checker and the parity check are they moved into place (one os.replace per
file, the manifest last), so a failed export leaves the output folder as it was.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from dff.export import graphs as graphs_mod
from dff.export import manifest as manifest_mod
from dff.export import parity as parity_mod
from dff.export.profile import Profile, Shape, make_profile
from dff.models.checkpoint import demo_checkpoint_path, file_sha256, load_checkpoint
from dff.models.dff import DFF
from dff.plugins import onnx_op

import dff
from dff import tasks
from dff.errors import DffError

Log = Callable[[str], None]

_DOCS = {
    "feature": "N_feat on a key frame: uint8 image -> features (cast and normalisation inside)",
    "flow": "N_flow plus the warp on a non-key frame: flow and scale from (image, key_image), "
            "then feat = dff::FlowWarp(key_feat, flow, scale) in the same graph",
    "task": "N_task: features -> labels (arg-max, uint8) and optionally probs (softmax), "
            "at image size",
    "task/detection": "N_task: features -> boxes, scores, classes, num (CenterNet decode: "
                      "3x3 peak test, TopK(K), gathers; rows after num are padding)",
}
DETECTION_WEIGHTS = "dff_small_detection.pth"  # until models.checkpoint names it per task
_DIMS = {"N": "batch", "H": "image height, a multiple of the stride",
         "W": "image width, a multiple of the stride", "h": "H / stride (feature grid height)",
         "w": "W / stride (feature grid width)"}


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
    """The shipped demo weights for `task`, or a DffError saying they are missing."""
    tasks.check_kind(task, "--demo", "pass segmentation or detection")
    if "task" in inspect.signature(demo_checkpoint_path).parameters:
        path = Path(demo_checkpoint_path(task=task))
    else:  # models.checkpoint before its per-task demo weights
        path = Path(demo_checkpoint_path())
        if task == tasks.DETECTION:
            path = path.with_name(DETECTION_WEIGHTS)
    if path.is_file():
        return path
    if task == tasks.DETECTION:
        raise DffError(f"--demo detection: the shipped detection weights {path} are missing "
                       "from this install; pass a detection MODEL.pth written by dff-train")
    raise DffError(f"the shipped demo model {path} is missing (this install has no demo "
                   "weights); pass MODEL.pth written by dff-train")


def export_model(checkpoint: str | os.PathLike[str] | None = None,
                 out_dir: str | os.PathLike[str] = "engines", *,
                 min_shape: Shape | None = None, opt_shape: Shape | None = None,
                 max_shape: Shape | None = None, simplify: bool = False, probs: bool = False,
                 tolerance: float = parity_mod.TOLERANCE, verbose: bool = False,
                 log: Log | None = None, demo: str = tasks.SEGMENTATION) -> ExportResult:
    """Export `checkpoint` (None: the shipped demo model for the task `demo`) into `out_dir`;
    see the module docstring.

    Unset profile shapes default from the checkpoint's input_size (`default_profile`). Raises
    a DffError (checkpoint, profile, export, parity) and then writes nothing.
    """
    log = log or (lambda _: None)
    if simplify:
        require_onnxsim()
    ckpt = Path(checkpoint) if checkpoint is not None else demo_checkpoint(demo)
    model = load_checkpoint(ckpt)
    cfg = model.config
    profile = make_profile(cfg.input_size, cfg.stride, min_shape, opt_shape, max_shape)
    specs = graphs_mod.graph_specs(model, profile, probs=probs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DffError(f"{out}: exists and is not a folder; pick another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dff-export-", dir=out.parent))
    try:
        for spec in specs.values():
            start = time.perf_counter()
            log(f"exporting {spec.file} ...")
            proto = graphs_mod.export_graph(model, spec, profile, tmp / spec.file, verbose)
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
               if cfg.task == tasks.DETECTION else "") + " ...")
        paths = {name: tmp / spec.file for name, spec in specs.items()}
        cases = parity_mod.default_cases(shape)
        rows = parity_mod.check_parity(model, paths, cases, tolerance)
        if cfg.task == tasks.DETECTION:  # many frames, so that 99.9 % of them means something
            cases.append(parity_mod.feature_case(model, shape))
            batch = 100 if profile.dynamic("N") else profile.min[0]
            rows.append(parity_mod.check_task_frames(model, paths["task"], cases[-1],
                                                     tolerance, batch=batch))
        log(parity_mod.format_table(rows))
        parity_mod.require_pass(rows)
        manifest = build_manifest(model, profile, specs, tmp, ckpt, rows, tolerance,
                                  simplify, {c.name: len(c.image) for c in cases})
        manifest_mod.write_manifest(tmp / manifest_mod.FILENAME, manifest)
        names = [spec.file for spec in specs.values()] + [manifest_mod.FILENAME]
        out.mkdir(parents=True, exist_ok=True)
        for name in names:  # the manifest last: it vouches for the graphs before it
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, {name: out / name for name in names}, manifest, rows)


def build_manifest(model: DFF, profile: Profile, specs: dict[str, graphs_mod.GraphSpec],
                   directory: Path, checkpoint: Path, rows: list[parity_mod.Row],
                   tolerance: float, simplified: bool,
                   frames: dict[str, int] | None = None) -> dict:
    """The manifest (export/manifest.py's layout) for the graphs in `directory`; `frames`:
    the parity cases' frame counts."""
    import onnxruntime

    cfg = model.config
    outputs = [t.name for t in specs["task"].outputs]
    task = tasks.task_entry(cfg.task, max_detections=cfg.max_detections,
                            score_threshold=cfg.score_threshold, probs="probs" in outputs)
    detection = cfg.task == tasks.DETECTION
    warp = f"{onnx_op.DOMAIN}::{onnx_op.OP_TYPE}"
    graphs = {}
    for name, spec in specs.items():
        path = directory / spec.file
        graphs[name] = {
            "file": spec.file, "sha256": manifest_mod.sha256_file(path),
            "bytes": path.stat().st_size,
            "doc": _DOCS["task/detection" if detection and name == "task" else name],
            "inputs": [t.to_dict() for t in spec.inputs],
            "outputs": [t.to_dict() for t in spec.outputs],
            "custom_ops": [warp] if name == "flow" else [],
        }
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
    return {
        "format": manifest_mod.FORMAT,
        "version": manifest_mod.VERSION,
        "task": task,
        "class_names": list(cfg.class_names),
        "num_classes": cfg.num_classes,
        "normalisation": {"mean": list(cfg.mean), "std": list(cfg.std),
                          "input": "uint8 RGB NCHW in 0..255; each graph casts to float and "
                                   "computes (x - mean) / std inside"},
        "stride": cfg.stride,
        "feat_channels": cfg.feat_channels,
        "key_interval": cfg.key_interval,
        "profile": profile.to_dict(),
        "dims": {k: v for k, v in _DIMS.items()
                 if any(k in t.shape for s in specs.values() for t in (*s.inputs, *s.outputs))},
        "graphs": graphs,
        "plugin": {"op": onnx_op.OP_TYPE, "domain": onnx_op.DOMAIN,
                   "version": onnx_op.OP_VERSION, "graph": "flow",
                   "inputs": ["feat", "flow", "scale"], "outputs": ["out"],
                   "function": "model-local FunctionProto (GridSample body) attached, so ONNX "
                               "Runtime runs it; TensorRT may use its registered plugin"},
        "engines": {},
        "export": {
            "checkpoint": str(checkpoint.resolve()),
            "checkpoint_sha256": file_sha256(checkpoint),
            "tool": "dff-export", "tool_version": dff.__version__,
            "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": graphs_mod.OPSET,
            "simplified": simplified, "parity": parity,
        },
    }


def human_size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
