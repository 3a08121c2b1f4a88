"""`dff-build`: dff-export's ONNX graphs -> one TensorRT engine per graph for this GPU."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dff.commands.common import size_arg
from dff.engines.compat import GRAPHS
from dff.engines.naming import PRECISIONS
from dff.engines.quantize import DEFAULT_FRAMES
from dff.errors import DffError
from dff.export.profile import format_shape

EPILOG = """\
engines (beside the ONNX graphs, named for the GPU and TensorRT version that built them):
  feature.<gpu>.trt<version>.<precision>.plan   (and flow..., task...)
  timing.<gpu>.trt<version>.cache                 TensorRT's timing cache: loaded when present,
                                                  saved after each engine (faster rebuilds)
Each engine gets an entry in manifest.json's `engines` (file, sha256, bytes, graph, precision,
gpu, compute_capability, tensorrt, onnx_sha256, profile, ...); the manifest is rewritten
atomically. The optimization profile is the manifest's: image/key_image [N,3,H,W] min/opt/max,
feat/key_feat [N,C,H/s,W/s], s the manifest's stride; key_code [N,Ck,hk,wk] from
graphs.flow_key.grid (an export whose learned flow caches its key frame). The dff::FlowWarp plugin is registered before parsing.
An engine runs only on the GPU model and TensorRT version that built it; the runtime refuses
others with the command to rebuild.

int8 (--int8): feature.onnx is calibrated on frames of --calib-video with ONNX Runtime's
quantizer (symmetric int8 Q/DQ on every convolution's input, weights per output channel) into
feature.int8.onnx, recorded in the manifest with how far its features are from the float
graph's (Q/DQ simulated in float: the same figure on every CPU); TensorRT then builds that graph
in int8 and flow and task in fp16. Calibration runs without TensorRT, and dff-run --precision
int8 runs the int8 graph on ONNX Runtime, whose x86 int8 kernels lose accuracy on CPUs without
VNNI: dff-run measures them and says so, and --reduce-range calibrates for such CPUs.

examples:
  dff-export runs/model.pth -o engines/     # the ONNX graphs (any machine)
  dff-build engines/ --fp16                  # the engines (a machine with TensorRT and a GPU)
  dff-build engines/ --int8 --calib-video clip.mp4 --calib-frames 64
  dff-build engines/ --fp32 --workspace 4096 --graphs feature,task
  dff-build --inspect engines/feature.h100-80gb-hbm3.trt10.13.0.35.fp16.plan
"""


def _graphs_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in GRAPHS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of "
                                         f"{','.join(GRAPHS)}")
    return names


def _positive(what: str, example: str = "32") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive {what}, e.g. "
                                             f"{example}")
        return value
    return parse


def add_build_args(p: argparse.ArgumentParser | Any) -> None:
    """--fp16/--fp32/--int8, --workspace and int8 calibration's --calib-video, --calib-frames,
    --resize, on `p` (a parser or an argument group): shared by dff-build and dff-export."""
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="allow fp16 kernels (the default)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="fp32 kernels only")
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8",
                           help="the feature graph in int8 (explicit Q/DQ quantization, "
                                "calibrated with --calib-video), flow and task in fp16")
    p.add_argument("--workspace", type=_positive("size in MiB", "4096"), metavar="MiB",
                   help="limit TensorRT's workspace memory pool (default: TensorRT's, the "
                        "GPU's memory)")
    p.add_argument("--calib-video", metavar="VIDEO",
                   help="--int8: calibrate feature.onnx on frames of this video into "
                        "feature.int8.onnx (needs onnxruntime, not TensorRT; required the "
                        "first time, later --int8 builds reuse the calibrated graph)")
    p.add_argument("--calib-frames", type=_positive("number of frames"), default=DEFAULT_FRAMES,
                   metavar="N", help=f"--int8: frames to calibrate on, spread over the video "
                                     f"(default: {DEFAULT_FRAMES})")
    p.add_argument("--resize", type=size_arg, metavar="HxW",
                   help="--int8: resize calibration frames as dff-run --resize would "
                        "(default: the video's size, which must fit the manifest's profile)")
    p.add_argument("--reduce-range", action="store_true",
                   help="--int8 --calib-video: weights in 7 bits, for ONNX Runtime's int8 "
                        "kernels on x86 CPUs without VNNI (whose 8-bit products saturate); "
                        "less accurate elsewhere, and TensorRT does not need it")


def check_build_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Calibration options only with --int8 (argparse's error, exit 2)."""
    if (args.calib_video is not None or args.resize is not None) and args.precision != "int8":
        parser.error("--calib-video and --resize calibrate an int8 build: add --int8")
    if args.reduce_range and args.calib_video is None:
        parser.error("--reduce-range is a calibration option: add --int8 --calib-video VIDEO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-build", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build TensorRT engines from dff-export's ONNX graphs and manifest.json.")
    p.add_argument("directory", nargs="?", metavar="ENGINES_DIR",
                   help="dff-export's output folder (with manifest.json)")
    add_build_args(p)
    p.add_argument("--graphs", type=_graphs_arg, default=None, metavar="LIST",
                   help="build only these graphs (default: every graph the export has, of "
                        "feature,flow,warp,task)")
    p.add_argument("--inspect", metavar="PLAN",
                   help="print an engine's tensors and layers instead of building")
    p.add_argument("--json", action="store_true",
                   help="print the manifest entries (or --inspect's report) as JSON")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="TensorRT's verbose log and full tracebacks")
    return p


def _summary(result: Any) -> str:
    lines = [f"built {result.directory}/ for {result.gpu} (compute "
             + f"{result.compute_capability}), TensorRT {result.tensorrt}, {result.precision}:"]
    for entry in result.engines.values():
        lines.append(f"  {entry['file']:<56} {entry['bytes'] / 2**20:8.1f} MiB "
                     f"{entry['build_seconds']:7.1f} s")
    lines.append(f"timing cache: {result.timing_cache}")
    return "\n".join(lines)


def _inspect_summary(report: dict[str, Any]) -> str:
    lines = [f"{report['file']}: {report['num_layers']} layers"]
    for t in report["tensors"]:
        extra = ""
        if "profile" in t:
            extra = "  profile " + " / ".join(format_shape(t["profile"][k])
                                               for k in ("min", "opt", "max"))
        lines.append(f"  {t['mode'].lower():<6} {t['name']:<10} {t['dtype']:<6} "
                     f"{t['shape']}{extra}")
    return "\n".join(lines)


def run_build(directory: str | Path, precision: str = PRECISIONS[0],
              workspace_mib: int | None = None, graphs: tuple[str, ...] | None = None,
              verbose: bool = False, as_json: bool = False, prog: str = "dff-build",
              calib_video: str | None = None, calib_frames: int = DEFAULT_FRAMES,
              resize: tuple[int, int] | None = None, reduce_range: bool = False) -> int:
    """Calibrate (with `calib_video`), build and print the summary; 1 with one line on stderr
    for a DffError (TensorRT missing included: a calibrated graph is kept)."""
    from dff.engines import builder, quantize

    log = None if as_json else (lambda line: print(line, flush=True))
    try:
        if calib_video is not None:
            quantize.quantize_feature(directory, calib_video, frames=calib_frames,
                                      resize=resize, reduce_range=reduce_range, log=log)
        result = builder.build_engines(
            directory, precision=precision, workspace_mib=workspace_mib, graphs=graphs,
            verbose=verbose, log=log)
    except DffError as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.engines, indent=2) if as_json else _summary(result))
    return 0


def build_after_export(directory: str | Path, args: argparse.Namespace) -> int:
    """dff-export's --build (add_build_args' options in `args`): engines now when TensorRT is
    installed, else one line and 0 (the ONNX graphs, and with --int8 --calib-video the
    calibrated graph, are written either way)."""
    from dff.engines import quantize
    from dff.engines.builder import tensorrt_available

    precision = args.precision or PRECISIONS[0]
    if not tensorrt_available():
        wrote = "the ONNX graphs"
        if precision == "int8" and args.calib_video is not None:
            try:
                quantize.quantize_feature(directory, args.calib_video, frames=args.calib_frames,
                                          resize=args.resize, reduce_range=args.reduce_range,
                                          log=lambda line: print(line, flush=True))
            except DffError as e:
                if args.verbose:
                    traceback.print_exc()
                print(f"dff-export: {e}", file=sys.stderr)
                return 1
            wrote += " and feature.int8.onnx"
        elif precision == "int8":  # the new export has no calibrated graph yet
            precision += " --calib-video VIDEO.mp4"
        print(f"TensorRT is not installed: wrote {wrote} only; build engines later with "
              f"dff-build {directory} --{precision} on a machine with TensorRT")
        return 0
    return run_build(directory, precision, args.workspace, verbose=args.verbose,
                     prog="dff-export", calib_video=args.calib_video,
                     calib_frames=args.calib_frames, resize=args.resize,
                     reduce_range=args.reduce_range)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inspect and args.directory:
        parser.error("give ENGINES_DIR to build or --inspect PLAN, not both")
    if not args.inspect and not args.directory:
        parser.error("ENGINES_DIR is required (dff-export's output folder, e.g. engines/)")
    if args.inspect:
        from dff.engines import builder

        try:
            report = builder.inspect_engine(args.inspect)
        except DffError as e:
            if args.verbose:
                traceback.print_exc()
            print(f"dff-build: {e}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=2) if args.json else _inspect_summary(report))
        return 0
    check_build_args(parser, args)
    return run_build(args.directory, args.precision or PRECISIONS[0], args.workspace,
                     args.graphs, args.verbose, args.json, calib_video=args.calib_video,
                     calib_frames=args.calib_frames, resize=args.resize,
                     reduce_range=args.reduce_range)


if __name__ == "__main__":
    sys.exit(main())
