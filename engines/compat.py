"""Which engines in a manifest this machine may load, and the refusal when none fits.

A serialized TensorRT engine runs only on the GPU model and TensorRT version that built it.
`check_engine_compatible` refuses a mismatched engine with the `dff-build` command that fixes
it; `select_engines` picks one engine per graph (feature, flow_key, flow, task), all of one precision,
for the runtime's TensorRT backend. Plain Python: no TensorRT needed.
"""

from __future__ import annotations

import os
from typing import Any

from dff.errors import DffError

from .naming import PRECISIONS, build_command, format_cc, gpu_slug

# every graph an export may have (manifest.py); flow_key goes with flow (the learned flow)
GRAPHS = ("feature", "flow_key", "flow", "warp", "task")
FLOW_GRAPHS = ("flow", "warp")  # one of them at least: the learned flow, the host flow's warp
# fields every engines entry carries (dff.export.manifest checks `file` and `sha256`)
ENTRY_FIELDS = ("file", "sha256", "bytes", "graph", "precision", "gpu", "compute_capability",
                "tensorrt")


class EngineError(DffError):
    """An engine that is missing, or was built for another GPU or TensorRT version."""


def _dir(directory: str | os.PathLike[str]) -> str:
    return os.fspath(directory).rstrip("/") or "."


def _field(entry: dict[str, Any], key: str, directory: str) -> Any:
    if key not in entry:
        name = entry.get("file", "?")
        raise EngineError(f"{directory}/manifest.json: engine entry for {name} has no field "
                          f"'{key}'; rebuild with `{build_command(directory, entry.get('precision'))}`")
    return entry[key]


def check_engine_compatible(manifest_entry: dict[str, Any], gpu_name: str,
                            cc: str | tuple[int, int], trt_version: str, *,
                            directory: str | os.PathLike[str] = "engines") -> None:
    """Raise EngineError unless the engine was built on this GPU model (name and compute
    capability) with this exact TensorRT version; the message names the engine file, both
    machines and the rebuild command."""
    d = _dir(directory)
    built_gpu = str(_field(manifest_entry, "gpu", d))
    built_cc = str(_field(manifest_entry, "compute_capability", d))
    built_trt = str(_field(manifest_entry, "tensorrt", d))
    precision = manifest_entry.get("precision")
    same_gpu = gpu_slug(built_gpu) == gpu_slug(gpu_name) and built_cc == format_cc(cc)
    if same_gpu and built_trt == trt_version.strip():
        return
    raise EngineError(
        f"{d}/{manifest_entry.get('file', '?')} was built for {built_gpu} (compute {built_cc}) "
        f"with TensorRT {built_trt}; this machine has {gpu_name} (compute {format_cc(cc)}), "
        f"TensorRT {trt_version}: rebuild with `{build_command(d, precision)}`")


def _compatible(entry: dict[str, Any], gpu_name: str, cc: str | tuple[int, int],
                trt_version: str, directory: str) -> bool:
    try:
        check_engine_compatible(entry, gpu_name, cc, trt_version, directory=directory)
    except EngineError:
        return False
    return True


def select_engines(manifest: dict[str, Any], gpu_name: str, cc: str | tuple[int, int],
                   trt_version: str, precision: str | None = None, *,
                   directory: str | os.PathLike[str] = "engines") -> dict[str, dict[str, Any]]:
    """One engines entry per graph usable on this machine: feature, task, and those of flow
    (the learned flow) and warp (a host flow's warp) that the manifest has and that were built,
    one of the two at least.

    All share one precision: `precision` when given, else the first of PRECISIONS
    (fp16, fp32, int8) that every graph has. Raises EngineError naming the engine and the
    dff-build command when an engine is missing, built elsewhere, or built from an older ONNX
    graph (for an int8 set's feature engine: from another calibrated graph).
    """
    d = _dir(directory)
    if precision is not None and precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    cmd = build_command(d, precision)
    entries: dict[str, Any] = manifest.get("engines") or {}
    if not entries:
        raise EngineError(f"{d}/manifest.json lists no TensorRT engines; build them with `{cmd}`")
    by_graph: dict[str, list[dict[str, Any]]] = {g: [] for g in GRAPHS
                                                 if g in manifest.get("graphs", {})}
    for entry in entries.values():
        if isinstance(entry, dict) and entry.get("graph") in by_graph:
            by_graph[entry["graph"]].append(entry)
    built = [g for g in FLOW_GRAPHS if by_graph.get(g)]  # a flow graph not built is left out
    for g in FLOW_GRAPHS:
        if g in by_graph and built and g not in built:
            del by_graph[g]
    if "flow" not in by_graph:  # the learned flow left out: its key graph with it
        by_graph.pop("flow_key", None)
    usable: dict[str, list[dict[str, Any]]] = {}
    for graph, found in by_graph.items():
        if not found:
            raise EngineError(f"{d}/manifest.json has no engine for the {graph} graph; "
                              f"build them with `{cmd}`")
        usable[graph] = [e for e in found if _compatible(e, gpu_name, cc, trt_version, d)]
        if not usable[graph]:
            # refuse with the engine closest to what was asked for: the requested precision
            found.sort(key=lambda e: e.get("precision") != precision)
            check_engine_compatible(found[0], gpu_name, cc, trt_version, directory=d)
    for p in (precision,) if precision else PRECISIONS:
        chosen = {g: next((e for e in usable[g] if e.get("precision") == p), None)
                  for g in usable}
        if all(chosen.values()):
            result = {g: e for g, e in chosen.items() if e is not None}
            _check_fresh(manifest, result, d)
            return result
    have = "; ".join(f"{g}: {', '.join(sorted({str(e.get('precision')) for e in usable[g]}))}"
                     for g in usable)
    want = precision or " or ".join(PRECISIONS)
    raise EngineError(f"{d}/: no complete set of {want} engines for {gpu_name} with TensorRT "
                      f"{trt_version} (built here: {have}); rebuild with `{cmd}`")


def _check_fresh(manifest: dict[str, Any], chosen: dict[str, dict[str, Any]],
                 directory: str) -> None:
    """Refuse an engine built from another version of its ONNX graph than the manifest's."""
    for graph, entry in chosen.items():
        built_from = entry.get("onnx_sha256")
        info = manifest.get("graphs", {}).get(graph, {})
        current = info.get("sha256")
        int8 = info.get("int8")  # an int8 set's feature engine comes from its Q/DQ graph
        if isinstance(int8, dict) and entry.get("onnx_file") == int8.get("file"):
            current = int8.get("sha256")
        if built_from and current and built_from != current:
            raise EngineError(f"{directory}/{entry.get('file')} was built from another "
                              f"{graph}.onnx than the one in {directory}/manifest.json; rebuild "
                              f"with `{build_command(directory, entry.get('precision'))}`")
