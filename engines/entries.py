"""The manifest's `engines` entries: make one per built engine, write files atomically.

An entry (key: the engine's file name without '.plan') records what the runtime checks before
loading it: file, sha256, bytes, graph, precision, gpu, compute_capability, tensorrt (version),
onnx_sha256 (the graph it was built from), plus how it was built, and for an engine with the
FlowWarp plugin ptx_isa (the PTX ISA of the kernel it embeds). `dff.export.manifest` checks
`file` and `sha256`, `dff.runtime.trt_backend` the ptx_isa, `dff.engines.compat` the rest.
Plain Python.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dff.files import new_file_mode

from . import naming
from .profile import Shape

MANIFEST = "manifest.json"  # as dff.export.manifest.FILENAME


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`, so a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would make engines private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as dff-export writes it (indented UTF-8 JSON, final newline)."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def engine_entry(*, graph: str, plan: bytes, gpu_name: str, cc: str | tuple[int, int],
                 trt_version: str, precision: str, onnx_sha256: str,
                 shapes: dict[str, tuple[Shape, Shape, Shape]], workspace_mib: int | None,
                 timing_cache: str, seconds: float,
                 extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(manifest key, entry) for one serialized engine `plan`."""
    name = naming.engine_name(graph, gpu_name, trt_version, precision)
    entry: dict[str, Any] = {
        "file": name + naming.ENGINE_SUFFIX,
        "sha256": hashlib.sha256(plan).hexdigest(),
        "bytes": len(plan),
        "graph": graph,
        "precision": precision,
        "gpu": gpu_name,
        "compute_capability": naming.format_cc(cc),
        "tensorrt": trt_version,
        "onnx_sha256": onnx_sha256,
        "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                    for n, s in shapes.items()},
        "workspace_mib": workspace_mib,
        "timing_cache": timing_cache,
        "build_seconds": round(seconds, 2),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": "dff-build",
    }
    entry.update(extra or {})
    return name, entry


def prune_engines(directory: str | os.PathLike[str]) -> list[str]:
    """Drop `engines` entries whose file is missing or no longer matches its sha256 (a build
    cut short between writing an engine and recording it), so that the manifest loads again;
    return the dropped keys. A manifest that is not JSON is left for load_manifest to report."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    engines = manifest.get("engines") if isinstance(manifest, dict) else None
    if not isinstance(engines, dict):
        return []
    dropped = []
    for key, entry in engines.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        target = Path(directory) / file if isinstance(file, str) and file else None
        if target is None or not target.is_file() or _sha256(target) != entry.get("sha256"):
            dropped.append(key)
    if dropped:
        manifest["engines"] = {k: v for k, v in engines.items() if k not in dropped}
        write_atomic(path, manifest_bytes(manifest))
    return dropped


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_engines(directory: str | os.PathLike[str], manifest: dict[str, Any],
                   entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add `entries` to `manifest["engines"]` (replacing any entry for the same file) and write
    `directory/manifest.json` atomically; return the updated manifest."""
    files = {e["file"] for e in entries.values()}
    kept = {k: v for k, v in manifest.get("engines", {}).items()
            if not (isinstance(v, dict) and v.get("file") in files)}
    updated = {**manifest, "engines": {**kept, **entries}}
    write_atomic(Path(directory) / MANIFEST, manifest_bytes(updated))
    return updated
