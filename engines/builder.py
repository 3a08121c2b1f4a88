"""ONNX graphs -> TensorRT engines: the one module of dff.engines that touches TensorRT.

`build_engines(directory)` reads dff-export's manifest, registers the dff::FlowWarp plugin,
parses each graph with TensorRT's ONNX parser, builds one engine per graph at one precision with
the manifest's optimization profile and a timing cache kept beside the engines (loaded when
present, saved after each engine), then records the engines in the manifest (with `ptx_isa`,
the PTX ISA of the FlowWarp kernel an engine embeds, for the runtime's driver). An int8 set takes
the feature graph that `quantize.quantize_feature` calibrated (Q/DQ: explicit quantization).

TensorRT (and cuda-python or torch, for the GPU's name) are imported inside the functions that
use them, so this module imports anywhere; `require_tensorrt` says in one sentence when the
real thing is missing (the type stubs alone make `import tensorrt` succeed, empty).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dff.errors import DffError

from . import entries, naming, quantize
from .compat import GRAPHS
from .profile import Shape, format_shapes, profile_shapes

if TYPE_CHECKING:
    import tensorrt as trt

Log = Callable[[str], None]

NOT_INSTALLED = ("TensorRT is not installed ({reason}); build engines on a machine with an "
                 "NVIDIA GPU and TensorRT 10.10 or later (pip install \"tensorrt>=10.10,<11\"), "
                 "then `{command}`")


class TensorRTMissing(DffError):
    """`import tensorrt` fails, or finds only type stubs."""


class EngineBuildError(DffError):
    """TensorRT could not parse a graph or build its engine."""


def require_tensorrt(command: str = "dff-build engines/ --fp16") -> str:
    """The installed TensorRT's version; TensorRTMissing (one sentence) when there is none."""
    from dff.plugins.find_tensorrt import find_tensorrt

    trt, why = find_tensorrt()
    if trt is None:
        raise TensorRTMissing(NOT_INSTALLED.format(reason=why, command=command))
    return str(trt.__version__)


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTMissing:
        return False
    return True


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of CUDA device `device`, via cuda-python,
    else torch.cuda. Raises DffError when neither can see a GPU."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python before 12.6
        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    raise DffError(f"no CUDA GPU {device} found (asked cuda-python and torch.cuda); TensorRT "
                   "builds engines for the GPU it runs on: pip install cuda-python, and check "
                   "nvidia-smi")


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node()}" if e.node() >= 0 else "graph"
        if e.node_name():
            where += f" '{e.node_name()}'"
        if e.node_operator():
            where += f" ({e.node_operator()})"
        lines.append(f"{where}: {e.desc()} [{e.code()}]")
    return "\n  ".join(lines) or "no details (run with --verbose for the parser's log)"


def _warp_implementation(network: trt.INetworkDefinition) -> str:
    """How the parsed network computes dff::FlowWarp: TensorRT's plugin or the ONNX function
    body (GridSample), so the manifest says which one the engine runs."""
    import tensorrt as trt

    kinds = {network.get_layer(i).type for i in range(network.num_layers)}
    if kinds & {trt.LayerType.PLUGIN_V3, trt.LayerType.PLUGIN_V2, trt.LayerType.PLUGIN}:
        return "plugin"
    if trt.LayerType.GRID_SAMPLE in kinds:
        return "onnx function (GridSample)"
    return "unknown"


def _network_flags() -> int:
    """Explicit batch is TensorRT 10's default (flag 0); prefer an ahead-of-time Python plugin
    (its kernel is embedded in the engine, which then runs without Python) when both an AOT
    and a JIT implementation are registered."""
    import tensorrt as trt

    aot = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    return 0 if aot is None else 1 << int(aot)


def build_engine(builder: trt.Builder, logger: trt.ILogger, onnx_path: Path,
                 shapes: dict[str, tuple[Shape, Shape, Shape]], precision: str,
                 workspace_mib: int | None, cache: trt.ITimingCache | None, log: Log, *,
                 has_warp: bool = False) -> tuple[bytes, trt.ITimingCache, dict[str, Any]]:
    """Parse `onnx_path` and build one serialized engine with `precision`'s kernels (int8: a
    Q/DQ graph, int8 where its Q/DQ nodes sit, fp16 elsewhere): (plan, timing cache, entry
    extras; with `has_warp`, extras["flow_warp"] says whether the plugin or the function body
    ran)."""
    import tensorrt as trt

    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  "
                               f"{_parser_errors(parser)}")
    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):  # weak typing: TensorRT may pick fp16 kernels (TRT 10)
        if not getattr(builder, "platform_has_fast_fp16", True):
            log(f"  warning: this GPU has no fast fp16; building {onnx_path.name} in fp16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":  # explicit quantization: the graph's Q/DQ nodes carry the scales
        config.set_flag(trt.BuilderFlag.INT8)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for inspect_engine
    if cache is None:
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log("  warning: the timing cache does not match this GPU or TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        if name not in names:
            raise EngineBuildError(f"{onnx_path}: the manifest lists input '{name}', the graph "
                                   f"has {names}; re-export with dff-export")
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build a {precision} engine "
                               "(its log above says why; --verbose shows all of it)")
    extras: dict[str, Any] = {}
    if has_warp:
        extras["flow_warp"] = _warp_implementation(network)
        if extras["flow_warp"] != "plugin":
            log(f"  warning: {onnx_path.name}: TensorRT runs FlowWarp as its "
                f"{extras['flow_warp']}, not the dff::FlowWarp plugin (slower); a graph from "
                "an older dff-export lacks the node's plugin_namespace: re-export it")
    return bytes(plan), config.get_timing_cache(), extras


def _load_cache(builder: trt.Builder, path: Path, log: Log) -> trt.ITimingCache | None:
    if not path.is_file():
        return None
    config = builder.create_builder_config()
    try:
        cache = config.create_timing_cache(path.read_bytes())
    except (RuntimeError, TypeError, ValueError):  # a damaged file
        cache = None
    if cache is None:
        log(f"warning: {path} is not a TensorRT timing cache; starting a new one")
        return None
    log(f"timing cache: {path} (loaded)")
    return cache


@dataclass
class BuildResult:
    directory: Path
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    engines: dict[str, dict[str, Any]]  # manifest key -> entry
    timing_cache: Path
    manifest: dict[str, Any]


def build_engines(directory: str | Path = "engines", *, precision: str = "fp16",
                  workspace_mib: int | None = None, graphs: Sequence[str] | None = None,
                  verbose: bool = False, log: Log | None = None) -> BuildResult:
    """Build one engine per graph in `directory` (dff-export's output) for this GPU and record
    them in its manifest. Raises TensorRTMissing, ManifestError or EngineBuildError."""
    log = log or (lambda _: None)
    d = Path(directory)
    if precision not in naming.PRECISIONS:
        raise DffError(f"precision {precision!r}: expected one of {', '.join(naming.PRECISIONS)}")
    if workspace_mib is not None and workspace_mib <= 0:
        raise DffError(f"--workspace {workspace_mib}: need a positive size in MiB")
    unknown = [g for g in graphs or () if g not in GRAPHS]
    if unknown:
        raise DffError(f"unknown graph {unknown[0]!r}: expected some of {', '.join(GRAPHS)}")
    from dff.export.manifest import load_manifest

    if precision == "int8":  # no calibrated graph (or a stale one): say so before anything
        quantize.int8_graph(d, load_manifest(d, verify_hashes=False))
    version = require_tensorrt(naming.build_command(str(d), precision))

    import tensorrt as trt

    if precision != "fp32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(
            f"TensorRT {version} builds strongly typed networks only (no BuilderFlag.FP16, as "
            f"from TensorRT 11): build with --fp32, or use TensorRT 10 for --{precision} (fp16 "
            "engines on TensorRT 11 need fp16 ONNX graphs, e.g. from ModelOpt AutoCast)")

    for key in entries.prune_engines(d):
        log(f"dropped the manifest's entry for {key}: its engine file is missing or changed")
    manifest = load_manifest(d)  # checks the ONNX files (and engines) against their sha256
    graphs = [g for g in GRAPHS if g in manifest["graphs"]] if graphs is None else list(graphs)
    gpu, cc = device_info()
    isa = None  # the PTX ISA of the FlowWarp kernel that plugin engines embed
    if any(manifest["graphs"][g].get("custom_ops") for g in graphs):
        from dff.plugins.trt_plugin import ptx_isa, register_plugin

        register_plugin()  # before parsing: the parser prefers a registered plugin
        isa = ptx_isa()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = d / naming.timing_cache_filename(gpu, version)
    cache = _load_cache(builder, cache_path, log)

    built: dict[str, dict[str, Any]] = {}
    for graph in graphs:
        info = manifest["graphs"][graph]
        source, source_sha256, kernels = d / info["file"], info["sha256"], precision
        if precision == "int8":  # the set: feature from its Q/DQ graph, flow and task fp16
            kernels = "int8" if graph == quantize.GRAPH else "fp16"
            if graph == quantize.GRAPH:
                source, source_sha256 = quantize.int8_graph(d, manifest), info["int8"]["sha256"]
                if info["int8"].get("reduce_range"):
                    log(f"  note: {source.name} has 7-bit weights (--reduce-range, for ONNX "
                        "Runtime on CPUs without VNNI); TensorRT's int8 kernels use all 8 bits: "
                        f"for TensorRT, calibrate again without it "
                        f"(`{quantize.calibration_command(d)}`)")
        shapes = profile_shapes(manifest, graph)
        filename = naming.engine_filename(graph, gpu, version, precision)
        log(f"building {d}/{filename} from {source.name} ({kernels}; "
            f"{format_shapes(shapes)}) ...")
        start = time.perf_counter()
        plan, cache, extras = build_engine(builder, logger, source, shapes,
                                           kernels, workspace_mib, cache, log,
                                           has_warp=bool(info.get("custom_ops")))
        seconds = time.perf_counter() - start
        if extras.get("flow_warp") == "plugin":  # the runtime checks its driver loads this PTX
            extras["ptx_isa"] = isa
        name, entry = entries.engine_entry(
            graph=graph, plan=plan, gpu_name=gpu, cc=cc, trt_version=version,
            precision=precision, onnx_sha256=source_sha256, shapes=shapes,
            workspace_mib=workspace_mib, timing_cache=cache_path.name, seconds=seconds,
            extra={"onnx_file": source.name, "kernels": kernels, **extras})
        # each engine is recorded as soon as it is written: an interrupted build keeps the
        # engines before it, and prune_engines heals the one it was writing
        entries.write_atomic(d / entry["file"], plan)
        manifest = entries.record_engines(d, manifest, {name: entry})
        entries.write_atomic(cache_path, bytes(cache.serialize()))
        built[name] = entry
        log(f"  {entry['file']}: {entry['bytes'] / 2**20:.1f} MiB, {seconds:.1f} s"
            + (f", FlowWarp: {extras['flow_warp']}" if "flow_warp" in extras else ""))
    return BuildResult(d, gpu, cc, version, precision, built, cache_path, manifest)


def _dims(dims: trt.Dims) -> list[int]:
    return [dims[i] for i in range(len(dims))]


def inspect_engine(path: str | Path) -> dict[str, Any]:
    """An engine's I/O tensors (name, mode, dtype, shape, profile 0's min/opt/max) and its
    layers as TensorRT's engine inspector reports them (JSON; detailed for dff-build's
    engines, which are built with ProfilingVerbosity.DETAILED). dff-build's engines embed the
    FlowWarp kernel (AOT plugin), so the plugin is not registered here."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DffError(f"{path}: no such engine file; build engines with `dff-build DIR --fp16`")
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"{path}: TensorRT could not load this engine (built for another "
                               "GPU or TensorRT version?); rebuild it with dff-build")
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        item: dict[str, Any] = {"name": name, "mode": mode.name,
                                "dtype": engine.get_tensor_dtype(name).name,
                                "shape": _dims(engine.get_tensor_shape(name))}
        if mode == trt.TensorIOMode.INPUT and -1 in item["shape"]:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            item["profile"] = {"min": _dims(lo), "opt": _dims(opt), "max": _dims(hi)}
        tensors.append(item)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"file": str(path), "tensors": tensors, "layers": info.get("Layers", []),
            "num_layers": engine.num_layers}
