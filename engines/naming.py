"""File names of TensorRT engines and timing caches: one per graph, GPU, TensorRT version, precision.

A serialized engine runs only on the GPU model and TensorRT version that built it, so both are
in its name and several machines can keep their engines side by side in one folder::

    feature.h100-80gb-hbm3.trt10.13.0.35.fp16.plan
    timing.h100-80gb-hbm3.trt10.13.0.35.cache

Plain Python: no TensorRT needed.
"""

from __future__ import annotations

import re

# preference order when a manifest holds several sets; an int8 set (dff-build --int8) runs the
# feature graph in int8 and flow and task in fp16
PRECISIONS = ("fp16", "fp32", "int8")
ENGINE_SUFFIX = ".plan"
CACHE_SUFFIX = ".cache"


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090': lower case, the vendor dropped,
    anything but letters and digits folded into single dashes."""
    words = re.sub(r"[^a-z0-9]+", " ", gpu_name.lower()).split()
    if words and words[0] == "nvidia" and len(words) > 1:
        words = words[1:]
    if not words:
        raise ValueError(f"GPU name {gpu_name!r} has no letters or digits")
    return "-".join(words)


def trt_tag(trt_version: str) -> str:
    """'10.13.0.35' -> 'trt10.13.0.35' (engines are tied to the exact version)."""
    version = trt_version.strip()
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ValueError(f"TensorRT version {trt_version!r} is not a version string")
    return f"trt{version}"


def engine_name(graph: str, gpu_name: str, trt_version: str, precision: str) -> str:
    """The manifest key of an engine: its file name without '.plan'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return f"{graph}.{gpu_slug(gpu_name)}.{trt_tag(trt_version)}.{precision}"


def engine_filename(graph: str, gpu_name: str, trt_version: str, precision: str) -> str:
    """feature.<gpu-slug>.trt<version>.<precision>.plan"""
    return engine_name(graph, gpu_name, trt_version, precision) + ENGINE_SUFFIX


def timing_cache_filename(gpu_name: str, trt_version: str) -> str:
    """timing.<gpu-slug>.trt<version>.cache: shared by all graphs and precisions on one GPU."""
    return f"timing.{gpu_slug(gpu_name)}.{trt_tag(trt_version)}{CACHE_SUFFIX}"


def format_cc(cc: str | tuple[int, int] | list[int]) -> str:
    """Compute capability as the manifest stores it: (8, 6), [8, 6] or '8.6' -> '8.6'."""
    if isinstance(cc, str):
        parts = cc.strip().split(".")
    else:
        parts = [str(v) for v in cc]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"compute capability {cc!r}: expected MAJOR.MINOR such as 8.6")
    return f"{int(parts[0])}.{int(parts[1])}"


def build_command(directory: str, precision: str | None) -> str:
    """The dff-build line that rebuilds `directory`'s engines at `precision`."""
    directory = directory.rstrip("/") + "/"
    return f"dff-build {directory} --{precision or PRECISIONS[0]}"
