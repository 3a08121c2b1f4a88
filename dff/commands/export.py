"""`dff-export`: a DFF checkpoint, or your own modules (`--module package.module:factory`) ->
feature.onnx, flow.onnx, task.onnx and manifest.json; or a per-frame ONNX model split at a
tensor (`--onnx MODEL.onnx --feature-output TENSOR`, export/onnx_split.py) -> feature.onnx,
task.onnx, warp.onnx and manifest.json (flow: DIS on the host)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dff.commands.build import add_build_args, build_after_export, check_build_args
from dff.commands.common import guarded, shape_arg
from dff.export.profile import format_shape
from dff.runtime.flows import DEFAULT_PRESET, DEFAULT_SCALE, PRESETS
from dff.tasks import DEMOS, SEGMENTATION

EPILOG = """\
graphs (DESIGN.md §3; H, W multiples of the stride s (16 for dff-train's models), h = H/s, w = W/s):
  feature.onnx  image uint8 [N,3,H,W] -> feat [N,C,h,w]
  flow.onnx     image, key_image uint8 [N,3,H,W], key_feat [N,C,h,w]
                -> flow [N,2,h,w], scale [N,C,h,w], feat [N,C,h,w]
                (feat = dff::FlowWarp(key_feat, flow, scale): the warp is the one custom
                node, inside the graph that uses it, with its ONNX function body attached)
  flow_key.onnx key_image uint8 [N,3,H,W] -> key_code [N,Ck,hk,wk], once per key frame
                (RealFlowNet, the default flow net: flow.onnx then takes key_code in
                place of key_image)
  task.onnx     segmentation: feat [N,C,h,w] -> labels uint8 [N,H,W]
                (+ probs [N,K,H,W] with --probs)
                detection: feat -> boxes [N,K,4] (x0,y0,x1,y1 in pixels), scores [N,K],
                classes int32 [N,K], num int32 [N]; K = the model's max_detections

profile defaults, from the checkpoint's training size (or the factory's input_size) HxW:
  --min-shape 1 x min(64,H) x min(64,W)   --opt-shape 1xHxW   --max-shape 4 x 2H x 2W

Every graph is checked (onnx.checker, full) and compared with PyTorch on ONNX Runtime CPU
(random and synthetic-clip frames at the opt shape; float outputs: max abs error <=
tolerance x max(1, peak |output|); labels >= 99.9% equal; detections: >= 99.9% of frames
with num and, row by row up to num, classes equal and boxes and scores within the tolerance,
on those frames and on 1000 feature maps made from clip frames). Files are written to a
temporary folder and moved into place only when everything passed.

examples:
  dff-export                               # the shipped demo model into engines/
  dff-export --demo detection -o det/      # the shipped detection demo model
  dff-export runs/model.pth -o engines/ --opt-shape 1x256x448 --max-shape 2x512x896
  dff-export runs/model.pth -o engines/ --int8 --calib-video clip.mp4   # + int8 (dff-build)
  dff-export --module mymodels.dff:build --module-arg checkpoint=runs/mine.pt -o engines/
      # your own modules: build(**args) returns dff.export.DFFModules (README: "Deploy your
      # own model")
  dff-export --onnx centerface.onnx --feature-output 535 --bgr -o cf/
      # a per-frame ONNX model split at tensor 535 (raw task: its own outputs, per frame)
  dff-export --onnx centerface.onnx --feature-output 535 --bgr --task detection \
      --decode examples/real_footage/centerface_decode.py:make_decode --class-names face

--onnx (docs/DESIGN.md §19): feature.onnx is image uint8 RGB [N,3,H,W] -> the model's graph
up to TENSOR, with the cast, the channel flip (--bgr) and (x - mean) / std put in front;
task.onnx is TENSOR (as feat) -> the model's outputs, names unchanged (--task raw; dff-run
writes them per frame to .npz), or, with --decode, the segmentation or detection contract.
No learned flow: the flow is DIS on the host, warped by warp.onnx. Defaults: mean 0, std 1
on 0..255 (raw pixels), RGB, NCHW (NHWC is refused), --input-size the model's declared size
when fixed and at least 64 a side, else 256x256. The stride is read from the shapes.
Parity compares the split against the whole model with the same normalisation, so it cannot
catch a wrong --mean/--std/--bgr: those are yours to say.
Means and stds are on 0..255 unless --norm-scale 1 says [0,1] (then multiplied by 255);
stds all below 1 without --norm-scale are refused (also for --module).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-export", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a DFF checkpoint to three ONNX graphs plus manifest.json.")
    p.add_argument("checkpoint", nargs="?", metavar="MODEL.pth",
                   help="checkpoint written by dff-train (default: the shipped demo model)")
    p.add_argument("--demo", nargs="?", const=SEGMENTATION, choices=DEMOS, metavar="NAME",
                   help="export a shipped demo model: segmentation (the default; "
                        "dff_small_synthetic.pth, the same as giving no MODEL.pth), detection "
                        "(dff_small_detection.pth, CenterNet head) or rfcn "
                        "(dff_small_rfcn.pth, the paper's R-FCN head)")
    p.add_argument("--module", metavar="PACKAGE.MODULE:FACTORY",
                   help="export your own modules: FACTORY(**module args) returns "
                        "dff.export.DFFModules(feature=..., flow=..., task=..., ...) or a dict of "
                        "its fields (the contract: dff.export.modules)")
    p.add_argument("--module-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="an argument for the --module factory (repeatable); VALUE is a Python "
                        "literal (1, 0.5, 'x', [1, 2], None), else a string")
    p.add_argument("--flow", choices=("learned", "dis"),
                   help="the flow source dff-run takes by default (the manifest's "
                        "flow.default): learned, the flow graph (the default for a checkpoint "
                        "or --module), or dis, OpenCV's DIS on the host + warp.onnx (the only "
                        "one an --onnx export has)")
    p.add_argument("--dis-preset", choices=PRESETS,
                   help="record DIS's preset for this model in the manifest ('flow.dis'; "
                        f"dff-run's default with --flow dis; else {DEFAULT_PRESET})")
    p.add_argument("--dis-scale", type=float, metavar="F",
                   help="record the fraction of each side DIS works at for this model "
                        f"('flow.dis'; else {DEFAULT_SCALE})")
    p.add_argument("--norm-scale", type=int, choices=(255, 1), metavar="{255,1}",
                   help="the scale --mean/--std (or the --module's means and stds) are on: 255 "
                        "(0..255 pixels, the manifest's) or 1 ([0,1], torchvision's; multiplied "
                        "by 255); stds all below 1 are refused unless you say")
    onnx_group = p.add_argument_group("a per-frame ONNX model, split at a tensor (--onnx)")
    onnx_group.add_argument("--onnx", metavar="MODEL.onnx",
                            help="split this ONNX model (input a float image [N,3,H,W]) at "
                                 "--feature-output into feature.onnx and task.onnx")
    onnx_group.add_argument("--feature-output", metavar="TENSOR",
                            help="--onnx: the tensor the heads read, [N,C,h,w] (the cut)")
    onnx_group.add_argument("--bgr", action="store_true",
                            help="--onnx: the model takes BGR (feature.onnx flips the channels)")
    onnx_group.add_argument("--mean", type=float, nargs=3, metavar="M",
                            help="--onnx: per-channel mean in the model's channel order "
                                 "(default 0 0 0)")
    onnx_group.add_argument("--std", type=float, nargs=3, metavar="S",
                            help="--onnx: per-channel std in the model's channel order "
                                 "(default 1 1 1)")
    onnx_group.add_argument("--layout", default="NCHW", type=str.upper, choices=("NCHW", "NHWC"),
                            help="--onnx: the model's layout; NCHW only (NHWC is refused)")
    onnx_group.add_argument("--input-size", type=size_arg, metavar="HxW",
                            help="--onnx: the opt shape's H x W (default: the model's declared "
                                 "size when fixed and >= 64 a side, else 256x256)")
    onnx_group.add_argument("--task", choices=("raw", "segmentation", "detection"),
                            default="raw",
                            help="--onnx: raw (default: the model's outputs, unchanged) or "
                                 "segmentation/detection in the contract, with --decode")
    onnx_group.add_argument("--decode", metavar="FILE.py:FUNC",
                            help="--onnx: FUNC(**decode args) returns a torch module mapping the "
                                 "model's outputs (in its order) to the task's contract")
    onnx_group.add_argument("--decode-arg", action="append", default=[], metavar="NAME=VALUE",
                            help="an argument for the --decode factory (repeatable)")
    onnx_group.add_argument("--class-names", nargs="+", metavar="NAME",
                            help="--onnx: class names (detection: one per class; commas also "
                                 "separate)")
    onnx_group.add_argument("--score-threshold", type=float, metavar="T",
                            help="--onnx detection: rows at most T are padding (default: the "
                                 "decode's score_threshold, passed to it, else 0.05)")
    p.add_argument("-o", "--output", default="engines", metavar="DIR",
                   help="output folder (default: engines/); existing files are replaced")
    for name in ("min", "opt", "max"):
        p.add_argument(f"--{name}-shape", type=shape_arg, metavar="NxHxW",
                       help=f"{name} input shape of the dynamic profile, e.g. 1x128x224")
    p.add_argument("--tolerance", type=float, default=1e-4, metavar="TOL",
                   help="parity: max abs error allowed in float outputs, times the output's "
                        "peak |value| when that exceeds 1 (default: 1e-4)")
    p.add_argument("--probs", action="store_true",
                   help="segmentation: task.onnx also outputs the class probabilities (softmax "
                        "at image size; off by default: it costs more than the rest of the head)")
    p.add_argument("--simplify", action="store_true",
                   help="run onnxsim on feature.onnx and task.onnx (needs onnxsim installed)")
    engines = p.add_argument_group("TensorRT engines, after the export (dff-build; skipped with "
                                   "one line when TensorRT is not installed)")
    engines.add_argument("--build", action="store_true",
                         help="also build the engines (--fp16, --fp32 or --int8 imply it)")
    add_build_args(engines)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the exporter's log and full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.demo, args.checkpoint, args.module, args.onnx))) > 1:
        parser.error("give one of MODEL.pth, --demo, --module and --onnx")
    if args.module_arg and not args.module:
        parser.error("--module-arg goes with --module")
    check_onnx_args(parser, args)
    if args.onnx and args.flow == "learned":
        parser.error("--flow learned: an --onnx export has no learned flow graph, only dis "
                     "(OpenCV's DIS on the host); drop --flow")
    try:
        module_args = parse_module_args(args.module_arg)
        decode_args = parse_module_args(args.decode_arg, "--decode-arg")
    except ValueError as e:
        parser.error(str(e))
    args.decode_args = decode_args
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance}")
    check_build_args(parser, args)
    return guarded("dff-export", args.verbose, lambda: _export(args, module_args))


_ONNX_ONLY = ("feature_output", "bgr", "mean", "std", "input_size", "decode", "decode_arg",
              "class_names", "score_threshold")


def check_onnx_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--onnx's options go with --onnx, and --onnx needs --feature-output."""
    if not args.onnx:
        given = [f"--{n.replace('_', '-')}" for n in _ONNX_ONLY if getattr(args, n)]
        given += ["--layout"] * (args.layout != "NCHW") + ["--task"] * (args.task != "raw")
        if given:
            parser.error(f"{', '.join(given)}: go(es) with --onnx MODEL.onnx")
        if args.norm_scale is not None and not args.module:
            parser.error("--norm-scale goes with --onnx or --module (a dff-train checkpoint "
                         "records its own normalisation)")
        return
    if not args.feature_output:
        parser.error("--onnx needs --feature-output TENSOR, the tensor the model's heads read")
    if args.probs or args.simplify:
        parser.error("--probs and --simplify do not apply to --onnx")
    if args.class_names:
        args.class_names = [n for item in args.class_names for n in item.split(",") if n]


def size_arg(text: str) -> tuple[int, int]:
    """argparse `type=` for HxW (--input-size)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (e.g. 288x352)") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return h, w


def _export_onnx(args: argparse.Namespace) -> int:
    from dff.export.onnx_split import split_onnx

    result = split_onnx(
        args.onnx, args.feature_output, args.output, bgr=args.bgr, mean=args.mean,
        std=args.std, norm_scale=args.norm_scale, layout=args.layout,
        input_size=args.input_size, min_shape=args.min_shape, opt_shape=args.opt_shape,
        max_shape=args.max_shape, task=args.task, decode=args.decode,
        decode_args=args.decode_args, class_names=args.class_names or (),
        score_threshold=args.score_threshold, tolerance=args.tolerance, verbose=args.verbose,
        log=lambda line: print(line, flush=True), dis=dis_record(args))
    m = result.manifest
    return _written(result, args, f"{m['task']['kind']} task, stride {m['stride']}, "
                                  f"C={m['feat_channels']}, ", "; flow: DIS on the host")


def _export(args: argparse.Namespace, module_args: dict) -> int:
    # imported here so that --help and argument errors come back without loading torch
    from dff.export.exporter import export_model

    if args.onnx:
        return _export_onnx(args)
    options: dict[str, Any] = {
        "min_shape": args.min_shape, "opt_shape": args.opt_shape,
        "max_shape": args.max_shape, "simplify": args.simplify, "probs": args.probs,
        "tolerance": args.tolerance, "verbose": args.verbose,
        "log": lambda line: print(line, flush=True)}
    if args.module:
        from dff.export.exporter import export_dff_modules
        from dff.export.modules import load_factory

        result = export_dff_modules(load_factory(args.module, module_args), args.output,
                                    norm_scale=args.norm_scale, flow=args.flow or "learned",
                                    dis=dis_record(args), **options)
    else:
        result = export_model(args.checkpoint, args.output, demo=args.demo or SEGMENTATION,
                              flow=args.flow or "learned", dis=dis_record(args), **options)
    return _written(result, args)


def _written(result: Any, args: argparse.Namespace, before: str = "", after: str = "") -> int:
    """What an export wrote (its profile, files and parity), then dff-build if asked."""
    from dff.export.exporter import human_size

    p = result.manifest["profile"]
    print(f"\nwrote {result.directory}/ ({before}profile min {format_shape(p['min'])}, "
          f"opt {format_shape(p['opt'])}, max {format_shape(p['max'])}{after}):")
    for name, path in result.files.items():
        print(f"  {name:<14} {human_size(path):>10}")
    print(parity_summary(result.rows))
    if args.build or args.precision or args.workspace is not None:
        return build_after_export(result.directory, args)
    return 0


def dis_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """--dis-preset/--dis-scale as the manifest's `flow.dis` (checked: a DisFlow is made)."""
    if args.dis_preset is None and args.dis_scale is None:
        return None
    from dff.runtime.flows import dis_flow

    made = dis_flow(None, args.dis_preset, args.dis_scale)
    return {"preset": made.preset, "scale": made.scale}


def parse_module_args(items: list[str], flag: str = "--module-arg") -> dict:
    """NAME=VALUE pairs: VALUE a Python literal where it parses as one, else the string."""
    import ast

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{flag} {item!r}: give NAME=VALUE, NAME a Python identifier")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def parity_summary(rows: list) -> str:
    """One line: how many outputs passed, the float output closest to its tolerance, and the
    worst share of equal labels or matching detection frames."""
    floats = [r for r in rows if r.metric == "max|err|"]
    worst = max(floats, key=lambda r: r.value / r.tolerance)
    labels = [r.value for r in rows if r.metric == "equal"]
    frames = [r.value for r in rows if r.metric == "frames"]
    shares = []
    if labels:
        shares.append(f"labels {100 * min(labels):.2f}% equal")
    if frames:
        shares.append(f"detections {100 * min(frames):.2f}% of frames match")
    return (f"parity: pass ({len(rows)} outputs checked; closest to its tolerance: "
            f"{worst.graph}/{worst.output} {worst.value:.1e} <= {worst.tolerance:.1e}"
            f"{''.join('; ' + s for s in shares)})")


if __name__ == "__main__":
    sys.exit(main())
