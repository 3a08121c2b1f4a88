"""What dff-run and dff-profile share: the backend arguments (--demo among them), the engine
folder and its manifest, opening the backend, and a user error as one line (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from dff.commands.demo import DEMO_TASKS, demo_engines, ensure_demo_engines
from dff.errors import DffError
from dff.export.manifest import FLOW_SOURCES, load_manifest
from dff.export.profile import Shape, parse_shape
from dff.runtime.backends import ALIASES, KINDS, PRECISIONS, Backend
from dff.runtime.flows import DEFAULT_PRESET, DEFAULT_SCALE, PRESETS, DisFlow, pick_flow
from dff.runtime.loaders import open_backend, pick_auto
from dff.runtime.video import parse_size
from dff.tasks import SEGMENTATION

BACKENDS = ("auto", *ALIASES, *KINDS)
Log = Callable[[str], None]


def size_arg(text: str) -> tuple[int, int]:
    """argparse `type=` for --resize HxW (a bad string exits 2)."""
    try:
        return parse_size(text)
    except DffError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shape_arg(text: str) -> Shape:
    """argparse `type=` for NxHxW shapes (--min-shape, --shape; a bad string exits 2)."""
    try:
        return parse_shape(text)
    except DffError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def budget_arg(text: str) -> float:
    """--key-budget: a fraction of the frames in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]: give the fraction of the "
                                         "frames that may be key frames, e.g. 0.1")
    return value


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--engine-dir, --backend, --checkpoint, --device, --threads, --demo, --precision,
    --useCudaGraph, --verbose: shared by dff-run and dff-profile."""
    p.add_argument("-e", "--engine-dir", metavar="DIR",
                   help="folder written by dff-export (with --demo: default ./dff-demo/engines, "
                        "otherwise ./dff-demo/NAME/engines)")
    p.add_argument("-b", "--backend", default="auto", choices=BACKENDS, metavar="NAME",
                   help=f"one of {', '.join(BACKENDS)} (default: auto)")
    p.add_argument("--checkpoint", metavar="MODEL.pth",
                   help="torch backends: the checkpoint to run (default: the one the manifest "
                        "was exported from)")
    p.add_argument("--device", type=int_at_least(0), default=0, metavar="N",
                   help="CUDA device index for GPU backends (default: 0)")
    p.add_argument("--threads", type=int_at_least(0), default=0, metavar="N",
                   help="CPU threads per stage (default: 0 = the library's choice)")
    p.add_argument("--demo", nargs="?", const=SEGMENTATION, choices=DEMO_TASKS, metavar="NAME",
                   help="export a shipped demo model (segmentation, the default; detection, "
                        "CenterNet head; rfcn, R-FCN head) into --engine-dir (cached) and use it")
    p.add_argument("--precision", choices=PRECISIONS["tensorrt"],
                   help="tensorrt: the engine set to load (default: fp16 if built, else fp32, "
                        "else int8); onnxruntime: fp32 (the default) or int8, the feature graph "
                        "of dff-build --int8; torch: fp32 only")
    p.add_argument("--useCudaGraph", action="store_true",
                   help="tensorrt backend: replay flow + task of non-key frames as one CUDA "
                        "graph (dff-profile's flow stage then includes the task); refused by "
                        "other backends")
    p.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")


def add_flow_args(p: argparse.ArgumentParser) -> None:
    """--flow, --dis-preset, --dis-scale: where non-key frames' flow comes from
    (runtime/flows.py), shared by dff-run, dff-profile and dff-eval."""
    p.add_argument("--flow", choices=FLOW_SOURCES, default=None,
                   help="learned: the export's flow graph; dis: OpenCV's DIS optical flow on "
                        "the host, warped by the export's warp graph (default: the export's "
                        "manifest 'flow.default')")
    p.add_argument("--dis-preset", choices=PRESETS, default=None,
                   help="--flow dis: DIS's preset (default: the export's manifest 'flow.dis', "
                        f"else {DEFAULT_PRESET})")
    p.add_argument("--dis-scale", type=float, default=None, metavar="F",
                   help="--flow dis: DIS works on the frame at this fraction of each side "
                        f"(default: the export's manifest 'flow.dis', else {DEFAULT_SCALE})")


def choose_flow(args: argparse.Namespace, manifest: dict | None, where: str,
                backend: Backend | None = None) -> DisFlow | None:
    """The flow source of --flow (else the manifest's default): None for the learned flow
    graph, a DisFlow for DIS; refused (FlowError) where the export or backend lacks it."""
    return pick_flow(args.flow, manifest, where,
                     backend.flow_sources if backend is not None else None,
                     args.dis_preset, args.dis_scale)


def check_backend_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.checkpoint and not ALIASES.get(args.backend, args.backend).startswith("torch"):
        parser.error("--checkpoint applies to the torch backends only (--backend torch)")


def resolve_engines(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    log: Log) -> tuple[Path, dict]:
    """The engine folder (exporting the demo model into it for --demo) and its manifest.
    Hashes are checked when the backend opens the graphs."""
    if args.demo:
        engine_dir = Path(args.engine_dir) if args.engine_dir else demo_engines(args.demo)
        ensure_demo_engines(engine_dir, log=log, task=args.demo)
    elif args.engine_dir is None:
        parser.error("--engine-dir DIR (written by dff-export) is required, or --demo")
    else:
        engine_dir = Path(args.engine_dir)
    return engine_dir, load_manifest(engine_dir, verify_hashes=False)


def choose_backend(args: argparse.Namespace, engine_dir: Path,
                   log: Log) -> tuple[Backend, str | None]:
    """Open --backend; for `auto`, log which one pick_auto took and why (one line); for ONNX
    Runtime int8, how its kernels here compare with the graph's own error (one line)."""
    kind, reason = ALIASES.get(args.backend, args.backend), None
    if kind == "auto":
        kind, reason = pick_auto(engine_dir)
        log(reason)
    backend = open_backend(kind, engine_dir, device=args.device, checkpoint=args.checkpoint,
                           threads=args.threads, cuda_graph=args.useCudaGraph,
                           precision=args.precision)
    check = backend.int8_check  # ONNX Runtime int8: its kernels, measured
    if check is not None:
        from dff.engines.quantize import describe_kernel_check

        line = describe_kernel_check(check, engine_dir)
        if check.get("ok", True):
            log(line)
        else:  # a worse model than the graph: said even with --quiet
            print(line, file=sys.stderr, flush=True)
    return backend, reason


def report_error(prog: str, error: BaseException, verbose: bool) -> int:
    """The one line a user error gets (a traceback before it with --verbose); exit code 1."""
    if verbose:
        traceback.print_exception(error)
    message = " ".join(str(error).split("\n")) or type(error).__name__
    print(f"{prog}: {message}", file=sys.stderr)
    return 1


def guarded(prog: str, verbose: bool, body: Callable[[], int],
            left: Callable[[], str] | None = None) -> int:
    """Run a command's body: DffError and OSError (missing files, full disks) become one
    line and exit 1, Ctrl-C exit 130 with what it left (`left()`; by default "no outputs
    written": a resumable training says where its checkpoint is); other exceptions are bugs
    and keep their traceback."""
    try:
        return body()
    except (DffError, OSError) as e:
        return report_error(prog, e, verbose)
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: interrupted (Ctrl-C); {left() if left else 'no outputs written'}",
              file=sys.stderr)
        return 130


def backend_label(report: dict) -> str:
    """'onnxruntime-cpu (int8)': a report's backend and, when it has one, its precision."""
    precision = report.get("precision")
    return report["backend"] + (f" ({precision})" if precision else "")


def schedule_label(summary: dict) -> str:
    """'adaptive, key interval 10, key budget 0.1': a run summary's schedule (and its flow
    source where it is not the learned flow graph)."""
    flow = summary.get("flow") or {}
    return (summary["schedule_name"]
            + (f", key interval {summary['key_interval']}" if summary["key_interval"] else "")
            + (f", key budget {summary['key_budget']:g}" if summary.get("key_budget") else "")
            + (f", flow dis ({flow['preset']}, scale {flow['scale']:g})"
               if flow.get("source") == "dis" else "")
            + (f", {summary['propagate']} between key frames"
               if summary.get("propagate") not in (None, "dff") else ""))
