"""engines/manifest.json (DESIGN.md §3): what dff-export wrote and what the runtime may trust.

Written by `dff.export.exporter`, read by the runtime through `load_manifest`, which refuses a
manifest or graph file that does not match with one message naming the file, the field and
how to rebuild. This module needs neither torch nor onnx (the runtime imports it).

Layout (version 2; docs/DESIGN.md §2)::

    format "dff-trt-manifest", version 2,
    task {kind, outputs, and for detection max_detections, score_threshold}
        (dff.tasks.task_entry; `outputs` are task.onnx's outputs in order), class_names,
    num_classes,
    normalisation {mean, std (the feature graph's), flow {mean, std}, input}, stride,
    feat_channels, key_interval,
    profile {layout "NxHxW", min, opt, max}, dims {N, H, W, h, w: meaning},
    graphs {feature|flow_key|flow|warp|task: {file, sha256, bytes, inputs, outputs,
        custom_ops}}
        (each tensor {name, dtype, shape}; a dynamic axis is a string: N, H, W, h, w, hk, wk;
        feature may hold `int8` {file, sha256, ...}: dff-build --int8's Q/DQ graph;
        feature and task always, flow where the export has a learned flow, warp (key_feat,
        flow -> feat) where it can take a flow computed outside the graphs; flow_key
        (key_image -> key_code, and `grid` {shrink, cell}: hk = ceil(floor(H / shrink) / cell),
        wk likewise) where the learned flow caches its key frame's encoder: flow.onnx then
        takes key_code in place of key_image),
    flow {sources: some of "learned" (flow.onnx) and "dis" (OpenCV DIS on the host, warped by
        warp.onnx), default: the one dff-run takes, and optionally dis {preset, scale}: the DIS
        settings chosen for this model} (optional: a manifest without it has the learned flow
        alone),
    plugin {op, domain, version, graph, function},
    deploy (optional; dff-tune --write) {kind: one of DEPLOY_KINDS, k, schedule, flow, size
        [H, W], and what it was measured at}: the configuration dff-run takes by default,
    engines {} (filled by the TensorRT builder: name -> {file, sha256, ...}),
    export {checkpoint, checkpoint_sha256 (a dff-train checkpoint's export only),
            modules {feature, flow, task (class and file:line), factory or api, scale_field,
            weights_sha256}, tool, tool_version, torch, onnx, onnxruntime,
            opset, simplified, parity {backend, tolerance, tolerance_rule, min_equal, passed,
            cases, frames, worst; detection: detection_rule}}

Version 1 had `task` as a string; it is refused with the re-export command, as any other
version is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dff.errors import DffError
from dff.tasks import TaskError, check_task_entry

FORMAT = "dff-trt-manifest"
VERSION = 2
FILENAME = "manifest.json"
# the learned-flow export's graphs (dff-build, Triton); flow_key only where flow.onnx takes a
# key_code (`keyed`)
GRAPHS = ("feature", "flow_key", "flow", "task")
REQUIRED_GRAPHS = ("feature", "task")
OPTIONAL_GRAPHS = ("flow_key", "flow", "warp")
# where a flow comes from (DESIGN.md §3): flow.onnx, or OpenCV DIS on the host + warp.onnx
LEARNED, DIS = "learned", "dis"
FLOW_SOURCES = (LEARNED, DIS)
FLOW_GRAPH = {LEARNED: "flow", DIS: "warp"}

# field path -> expected JSON type(s); checked in this order by load_manifest
_REQUIRED: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("task", dict), ("class_names", list), ("normalisation", dict), ("normalisation.mean", list),
    ("normalisation.std", list), ("stride", int), ("feat_channels", int),
    ("key_interval", int), ("profile", dict), ("profile.min", list), ("profile.opt", list),
    ("profile.max", list), ("graphs", dict),
    *((f"graphs.{g}.{k}", t) for g in REQUIRED_GRAPHS
      for k, t in (("file", str), ("sha256", str), ("inputs", list), ("outputs", list))),
    ("plugin", dict), ("engines", dict), ("export", dict),
)


class ManifestError(DffError):
    """A missing, damaged or mismatched manifest, or a file it lists."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rebuild(directory: Path) -> str:
    return f"re-export with `dff-export MODEL.pth -o {directory}`"


def write_manifest(path: str | os.PathLike[str], manifest: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _field(data: dict, dotted: str) -> Any:
    value: Any = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def _check_file(directory: Path, manifest_path: Path, field: str, entry: dict,
                verify_hashes: bool, fix: str | None = None) -> None:
    fix = fix or _rebuild(directory)
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ManifestError(f"{manifest_path}: field '{field}.file' is {name!r}, expected a "
                            f"file name inside {directory}; {fix}")
    path = directory / name
    if not path.is_file():
        raise ManifestError(f"{path}: missing (listed in {manifest_path} as '{field}.file'); "
                            f"{fix}")
    want = entry.get("sha256")
    if verify_hashes and want is not None:
        got = sha256_file(path)
        if got != want:
            raise ManifestError(f"{path}: sha256 {got[:12]}… does not match '{field}.sha256' "
                                f"{str(want)[:12]}… in {manifest_path}; the file changed after "
                                f"it was written, {fix}")


def load_manifest(directory: str | os.PathLike[str], verify_hashes: bool = True) -> dict:
    """Read and check `directory/manifest.json` and the files it lists; return it as a dict.

    Graph (and engine) file names are relative to `directory`. Raises ManifestError naming
    the file, the field and the fix.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory}: no such directory; export a model into it first "
                            f"with `dff-export MODEL.pth -o {directory}`")
    path = directory / FILENAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing, so {directory} holds no dff-export output; "
                            f"{_rebuild(directory)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason}); the file is damaged, "
                            f"{_rebuild(directory)}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: "
                            f"{e.msg}); the file is damaged, {_rebuild(directory)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{path}: field 'format' is {got!r}, expected {FORMAT!r}; this is "
                            f"not a dff-trt manifest, {_rebuild(directory)}")
    if data.get("version") != VERSION:
        raise ManifestError(f"{path}: field 'version' is {data.get('version')!r}, this dff-trt "
                            f"reads version {VERSION}; {_rebuild(directory)} of this version")
    for dotted, kind in _REQUIRED:
        try:
            value = _field(data, dotted)
        except KeyError:
            raise ManifestError(f"{path}: field '{dotted}' is missing; "
                                f"{_rebuild(directory)}") from None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{path}: field '{dotted}' is {type(value).__name__}, expected "
                                f"{getattr(kind, '__name__', kind)}; {_rebuild(directory)}")
    _check_task(data, path, directory)
    _check_flow(data, path, directory)
    _check_deploy(data, path)
    for name in graphs_of(data):
        _check_file(directory, path, f"graphs.{name}", data["graphs"][name], verify_hashes)
        int8 = data["graphs"][name].get("int8")  # optional: dff-build --int8's Q/DQ graph
        if int8 is not None:
            fix = (f"calibrate again with `dff-build {directory}/ --int8 --calib-video "
                   "VIDEO.mp4`")
            if not isinstance(int8, dict):
                raise ManifestError(f"{path}: field 'graphs.{name}.int8' is not an object; {fix}")
            _check_file(directory, path, f"graphs.{name}.int8", int8, verify_hashes, fix)
            frames = int8.get("check", {}).get("frames_file")  # kept for kernel checks
            if isinstance(frames, dict):
                _check_file(directory, path, f"graphs.{name}.int8.check.frames_file", frames,
                            verify_hashes, fix)
    for name, entry in data["engines"].items():
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: field 'engines.{name}' is not an object; "
                                f"{_rebuild(directory)}")
        _check_file(directory, path, f"engines.{name}", entry, verify_hashes)
    return data


def graphs_of(manifest: dict) -> list[str]:
    """The graphs this export has, in the order feature, flow_key, flow, warp, task."""
    return [g for g in ("feature", "flow_key", "flow", "warp", "task") if g in manifest["graphs"]]


def keyed(manifest: dict) -> bool:
    """Whether the learned flow caches its key frame: flow_key.onnx makes key_code once per key
    frame, and flow.onnx takes it in place of key_image (DESIGN.md §3)."""
    return "flow_key" in manifest["graphs"]


def learned_graphs(manifest: dict) -> list[str]:
    """The graphs of the learned flow: flow_key (where `keyed`) and flow."""
    return ["flow_key", "flow"] if keyed(manifest) else ["flow"]


def stage_graphs(manifest: dict) -> list[str]:
    """The learned-flow export's graphs in their order: feature, flow_key (where `keyed`),
    flow, task (dff-build's engines, Triton's stage models)."""
    return ["feature", *learned_graphs(manifest), "task"]


def key_grid(manifest: dict, height: int, width: int) -> tuple[int, int]:
    """key_code's (hk, wk) for images of this size: ceil(floor(side / shrink) / cell), from
    graphs.flow_key.grid."""
    grid = manifest["graphs"]["flow_key"]["grid"]
    return key_side(height, grid), key_side(width, grid)


def valid_grid(grid: Any) -> bool:
    """Whether graphs.flow_key.grid is {shrink, cell} of positive integers."""
    return isinstance(grid, dict) and all(
        isinstance(grid.get(k), int) and not isinstance(grid.get(k), bool) and grid[k] > 0
        for k in ("shrink", "cell"))


def key_side(side: int, grid: dict[str, int]) -> int:
    """key_code's size along an image side of `side` pixels: ceil(floor(side / shrink) / cell)
    (each halving floors, each stride-2 conv rounds up)."""
    return -(-(side // int(grid["shrink"])) // int(grid["cell"]))


def flow_sources(manifest: dict) -> list[str]:
    """The flow sources of this export (FLOW_SOURCES order): its `flow.sources`, or, in a
    manifest written before that field, the learned flow alone."""
    entry = manifest.get("flow")
    if isinstance(entry, dict) and isinstance(entry.get("sources"), list):
        return [s for s in FLOW_SOURCES if s in entry["sources"]]
    return [LEARNED]


def default_flow(manifest: dict) -> str:
    """The flow source dff-run takes when none is asked for: `flow.default`, else the first."""
    entry = manifest.get("flow")
    default = entry.get("default") if isinstance(entry, dict) else None
    return default if isinstance(default, str) else flow_sources(manifest)[0]


def dis_settings(manifest: dict) -> dict[str, Any]:
    """The export's recorded DIS settings, `flow.dis` {preset, scale}; {} where it has none."""
    entry = manifest.get("flow")
    dis = entry.get("dis") if isinstance(entry, dict) else None
    return dict(dis) if isinstance(dis, dict) else {}


def _check_flow(data: dict, path: Path, directory: Path) -> None:
    """`flow.sources` and `flow.default` against FLOW_SOURCES and the graphs each needs."""
    entry = data.get("flow")
    if entry is not None:
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if (not isinstance(sources, list) or not sources
                or any(s not in FLOW_SOURCES for s in sources)):
            raise ManifestError(f"{path}: field 'flow.sources' is {sources!r}, expected a list "
                                f"of some of {', '.join(FLOW_SOURCES)}; {_rebuild(directory)}")
        dis = entry.get("dis", {})
        if not isinstance(dis, dict) or not set(dis) <= {"preset", "scale"}:
            raise ManifestError(f"{path}: field 'flow.dis' is {dis!r}, expected an object of "
                                f"preset and scale; {_rebuild(directory)}")
        if default_flow(data) not in sources:
            raise ManifestError(f"{path}: field 'flow.default' is {entry.get('default')!r}, "
                                f"expected one of its 'flow.sources' {sources}; "
                                f"{_rebuild(directory)}")
    for source in flow_sources(data):
        graph = FLOW_GRAPH[source]
        if not isinstance(data["graphs"].get(graph), dict):
            raise ManifestError(f"{path}: field 'graphs.{graph}' is missing, but the flow source "
                                f"{source!r} needs it; {_rebuild(directory)}")
        for key, kind in (("file", str), ("sha256", str), ("inputs", list), ("outputs", list)):
            if not isinstance(data["graphs"][graph].get(key), kind):
                raise ManifestError(f"{path}: field 'graphs.{graph}.{key}' is missing or not "
                                    f"{kind.__name__}; {_rebuild(directory)}")
    _check_key(data, path, directory)


def _check_key(data: dict, path: Path, directory: Path) -> None:
    """flow_key.onnx and flow.onnx's key_code go together, and flow_key has its grid."""
    flow = data["graphs"].get("flow")
    takes = isinstance(flow, dict) and any(isinstance(t, dict) and t.get("name") == "key_code"
                                           for t in flow.get("inputs") or [])
    if takes != keyed(data):
        has, lacks = (("flow.onnx takes key_code", "graphs.flow_key") if takes
                      else ("graphs.flow_key", "a flow.onnx that takes key_code"))
        raise ManifestError(f"{path}: {has}, but it has no {lacks}; {_rebuild(directory)}")
    if takes:
        grid = data["graphs"]["flow_key"].get("grid")
        if not valid_grid(grid):
            raise ManifestError(f"{path}: field 'graphs.flow_key.grid' is {grid!r}, expected "
                                f"{{shrink, cell}} (positive integers); {_rebuild(directory)}")


# dff-tune's candidate kinds (models/tune.py) that dff-run can deploy
DEPLOY_KINDS = ("dff", "copy", "resize", "warp-output", "track", "per-frame")
_DEPLOY_FIELDS = (("k", int), ("schedule", str), ("flow", str))


def deploy_settings(manifest: dict) -> dict[str, Any]:
    """The recorded deployment (`deploy`, dff-tune --write), or {} where there is none."""
    entry = manifest.get("deploy")
    return dict(entry) if isinstance(entry, dict) else {}


def _check_deploy(data: dict, path: Path) -> None:
    """`deploy` (dff-tune --write), where there is one: a known kind, and k, schedule, flow and
    size of the right types (each may be null)."""
    if "deploy" not in data:
        return
    entry, fix = data["deploy"], "run dff-tune --write again, or delete the field"
    if not isinstance(entry, dict) or entry.get("kind") not in DEPLOY_KINDS:
        got = entry.get("kind") if isinstance(entry, dict) else entry
        raise ManifestError(f"{path}: field 'deploy.kind' is {got!r}, expected one of "
                            f"{', '.join(DEPLOY_KINDS)}; {fix}")
    for key, kind in _DEPLOY_FIELDS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ManifestError(f"{path}: field 'deploy.{key}' is {value!r}, expected "
                                f"{kind.__name__} or null; {fix}")
    size = entry.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ManifestError(f"{path}: field 'deploy.size' is {size!r}, expected [H, W] or null; "
                            f"{fix}")
    if entry.get("flow") is not None and entry["flow"] not in flow_sources(data):
        raise ManifestError(f"{path}: field 'deploy.flow' is {entry['flow']!r}, but the export's "
                            f"flow sources are {flow_sources(data)}; {fix}")


def write_deploy(directory: str | os.PathLike[str], record: dict[str, Any] | None) -> dict:
    """Record `record` as the export's `deploy` (None: remove it), atomically (a temporary file
    renamed over manifest.json); the manifest read back and checked. Returns the old entry."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify_hashes=False)
    old = deploy_settings(manifest)
    if record is None:
        manifest.pop("deploy", None)
    else:
        manifest["deploy"] = record
    path = directory / FILENAME
    tmp = path.with_name(f".{FILENAME}.tmp")
    try:
        write_manifest(tmp, manifest)
        _check_deploy(manifest, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return old


def _check_task(data: dict, path: Path, directory: Path) -> None:
    """The `task` object against the contract and task.onnx's recorded outputs."""
    outputs = data["graphs"]["task"]["outputs"]
    names = [t.get("name") if isinstance(t, dict) else None for t in outputs]
    if not all(isinstance(n, str) for n in names):
        raise ManifestError(f"{path}: field 'graphs.task.outputs' holds an entry without a "
                            f"name; {_rebuild(directory)}")
    try:
        check_task_entry(data["task"], names, str(path), _rebuild(directory))
    except TaskError as e:
        raise ManifestError(str(e)) from None


def graph_path(directory: str | os.PathLike[str], manifest: dict, graph: str) -> Path:
    """The file of `graph` ("feature", "flow" or "task") in a loaded manifest."""
    return Path(directory) / manifest["graphs"][graph]["file"]
