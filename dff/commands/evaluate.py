"""dff-eval: accuracy and speed of a DFF checkpoint on the synthetic evaluation split, or an
export's agreement with per-frame inference on real video (--video).

The evaluation is dff.models.evaluate's (--split motion: dff.models.motion_eval's; --video:
dff.models.agreement's); here the arguments, the table, the JSON and the plot. torch is
imported for the synthetic splits only: --video on an ONNX Runtime export runs without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dff.commands.common import BACKENDS, add_flow_args, choose_backend, guarded, size_arg
from dff.data.synthetic import EVAL_FRAMES
from dff.errors import DffError
from dff.export.manifest import load_manifest
from dff.runtime.backends import PRECISIONS
from dff.tasks import DEMOS, DETECTION, RFCN, SEGMENTATION

DEFAULT_INTERVALS = (1, 2, 5, 10, 20)  # dff.models.evaluate's (which imports torch)
VIDEO_INTERVALS = (5, 10)


def _metric(res: dict) -> tuple[str, str]:
    """(JSON field, label) of the headline accuracy: mIoU, or AP@0.5 for detection."""
    return ("map50", "AP@0.5") if res.get("task") == DETECTION else ("miou", "mIoU")


def format_table(res: dict) -> str:
    if res.get("task") == DETECTION:
        return _detection_table(res)
    base = res["per_frame"]["miou"]
    rows = [f"{'mode':<12}{'mIoU':>8}{'Δ pts':>8}{'fps':>9}",
            f"{'per-frame':<12}{base:>8.4f}{0:>8.2f}{res['per_frame']['fps']:>9.1f}"]
    for k, v in res["dff"].items():
        rows.append(f"{'dff k=' + k:<12}{v['miou']:>8.4f}{100 * (v['miou'] - base):>8.2f}{v['fps']:>9.1f}")
    for k, v in res["copy"].items():
        if k != "1":
            rows.append(f"{'copy k=' + k:<12}{v['miou']:>8.4f}{100 * (v['miou'] - base):>8.2f}"
                        f"{v.get('fps', float('nan')):>9.1f}")
    rows.append(f"flow EPE: {res['flow_epe']:.3f} px ({res['flow_epe_cells']:.4f} cells) "
                f"over {res['frames']} frames of {res['clips']} clips")
    return "\n".join(rows)


def _detection_table(res: dict) -> str:
    base50, base = res["per_frame"]["map50"], res["per_frame"]["map"]

    def row(name: str, v: dict) -> str:
        return (f"{name:<12}{v['map50']:>8.4f}{100 * (v['map50'] - base50):>8.2f}"
                f"{v['map']:>8.4f}{100 * (v['map'] - base):>8.2f}{v['fps']:>9.1f}")

    rows = [f"{'mode':<12}{'AP@0.5':>8}{'Δ pts':>8}{'AP':>8}{'Δ pts':>8}{'fps':>9}",
            row("per-frame", res["per_frame"])]
    rows += [row("dff k=" + k, v) for k, v in res["dff"].items()]
    rows += [row("copy k=" + k, v) for k, v in res["copy"].items() if k != "1"]
    rows.append("AP: COCO 101-point (pycocotools), mean over classes; AP = AP@[.5:.95]")
    rows.append(f"flow EPE: {res['flow_epe']:.3f} px ({res['flow_epe_cells']:.4f} cells) "
                f"over {res['frames']} frames of {res['clips']} clips")
    return "\n".join(rows)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _metric(res)
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(res["dff"])
    ax.plot([res["dff"][k]["fps"] for k in ks], [res["dff"][k][key] for k in ks], "o-",
            label="DFF (warped features)")
    ck = [k for k in res["copy"] if k != "1"]
    ax.plot([res["copy"][k]["fps"] for k in ck], [res["copy"][k][key] for k in ck], "s--",
            label="copy key features")
    for k in ks:
        ax.annotate(f"k={k}", (res["dff"][k]["fps"], res["dff"][k][key]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([res["per_frame"]["fps"]], [res["per_frame"][key]], "k*", ms=12, label="per-frame")
    ax.set_xlabel("frames per second (PyTorch, batch 1)")
    ax.set_ylabel(label)
    ax.set_title(("DFF detection" if key == "map50" else "DFF") + " on the synthetic evaluation split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_json(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path: Path):  # -> DFF
    """dff.models.checkpoint's load_checkpoint, imported when called (it needs torch)."""
    from dff.models.checkpoint import load_checkpoint as load

    return load(path)


def _demo_name(demo: str) -> str:
    """The shipped checkpoint's file name of a demo (for the help), without needing torch."""
    try:
        from dff.models.checkpoint import DEMO_NAMES
    except ImportError:  # no torch: the synthetic splits cannot run anyway
        return f"the {demo} demo"
    return DEMO_NAMES[demo]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dff-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help=f"default: the shipped demo "
                   f"({_demo_name(SEGMENTATION)})")
    p.add_argument("--demo", nargs="?", const=SEGMENTATION, choices=DEMOS, metavar="NAME",
                   help="evaluate a shipped demo model: segmentation (the default, the same "
                        f"as giving no checkpoint), detection ({_demo_name(DETECTION)}"
                        f", CenterNet head) or rfcn ({_demo_name(RFCN)}, R-FCN head)")
    p.add_argument("--split", choices=("eval", "motion"), default="eval",
                   help="eval: the fixed 20-clip split; motion: by motion category, with the "
                        "key-frame schedules at --key-budget (dff.models.motion_eval)")
    p.add_argument("--key-budget", type=float, default=0.1,
                   help="--split motion: the fraction of key frames every schedule gets "
                        "(default 0.1: fixed k=10)")
    p.add_argument("--intervals", help="key intervals (default: 1,2,5,10,20; with --split "
                   "motion 5,10,20; with --video 5,10, each at least 2)")
    p.add_argument("--clips", type=int, default=0, help="first N clips of the split (0 = all "
                   "20; with --split motion, per category, 0 = 8)")
    p.add_argument("--frames", type=int, default=EVAL_FRAMES, help="frames per clip")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write accuracy vs speed as a PNG here")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true")
    add_flow_args(p)
    real = p.add_argument_group(
        "real video (--video)", "an export's agreement with its own per-frame inference on "
        "real footage, per mode (dff: the learned flow graph, dff-dis: DIS + the warp graph, "
        "copy: the key frame's features) and key interval (dff.models.agreement)")
    real.add_argument("--video", nargs="+", metavar="FILE",
                      help="evaluate the export of --engine-dir on these videos")
    real.add_argument("-e", "--engine-dir", metavar="DIR", help="--video: the folder dff-export "
                      "wrote (required with --video)")
    real.add_argument("--resize", type=size_arg, metavar="HxW",
                      help="--video: resize every frame to HxW (multiples of the manifest's "
                           "stride, within its profile)")
    real.add_argument("--max-frames", type=int, metavar="N",
                      help="--video: the first N frames of each video")
    real.add_argument("--modes", help="--video: comma-separated among dff, dff-dis, copy "
                      "(default: every one the export has)")
    real.add_argument("-b", "--backend", default="auto", choices=BACKENDS, metavar="NAME",
                      help=f"--video: one of {', '.join(BACKENDS)} (default: auto)")
    real.add_argument("--device", type=int, default=0, metavar="N",
                      help="--video: CUDA device index for GPU backends (default: 0)")
    real.add_argument("--precision", choices=PRECISIONS["tensorrt"],
                      help="--video: the backend's precision (dff-run's --precision)")
    return p


def _intervals(text: str | None, default: tuple[int, ...], least: int = 1) -> tuple[int, ...]:
    """--intervals as integers, each at least `least`; DffError naming the fix."""
    try:
        intervals = tuple(int(x) for x in text.split(",")) if text else default
    except ValueError:
        intervals = ()
    if not intervals or any(i < least for i in intervals):
        if least > 1:
            raise DffError(f"--intervals {text!r}: with --video every k must be at least {least} "
                           "(k=1 is per-frame inference, the reference itself), e.g. 5,10")
        raise DffError(f"--intervals {text!r}: give positive integers like 1,2,5,10")
    return intervals


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.video:
        return run_video(args, p, argv)
    for flag, given in (("--engine-dir", args.engine_dir), ("--resize", args.resize),
                        ("--max-frames", args.max_frames), ("--modes", args.modes)):
        if given is not None:
            p.error(f"{flag} applies with --video only")
    if args.demo and args.checkpoint:
        p.error("give a checkpoint or --demo, not both")
    try:
        intervals = _intervals(args.intervals, (5, 10, 20) if args.split == "motion"
                               else DEFAULT_INTERVALS)
    except DffError as e:
        print(f"dff-eval: {e}", file=sys.stderr)
        return 2
    if args.split == "motion" and (args.plot or args.frames != EVAL_FRAMES):
        p.error("--split motion: --plot and --frames apply to --split eval only")
    if not 0 < args.key_budget <= 1:
        p.error(f"--key-budget {args.key_budget}: give a fraction in (0, 1], e.g. 0.1")
    import torch

    from dff.models.checkpoint import demo_checkpoint_path
    from dff.models.evaluate import evaluate
    from dff.models.motion_eval import evaluate_motion, format_motion

    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint_path(
        args.demo or SEGMENTATION)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        flow = _synthetic_flow(args)
        model = load_checkpoint(checkpoint)
        if args.split == "motion":
            res = evaluate_motion(model, args.key_budget, intervals, args.clips or None,
                                  progress=not args.quiet, flow=flow)
        else:
            res = evaluate(model, intervals, args.clips or None, args.frames, not args.quiet,
                           flow=flow)
    except DffError as e:
        if args.verbose:
            raise
        print(f"dff-eval: {e}", file=sys.stderr)
        return 1
    res["checkpoint"] = str(checkpoint)
    res["flow"] = _flow_record(flow)
    print(format_motion(res) if args.split == "motion" else format_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _synthetic_flow(args: argparse.Namespace):  # -> DisFlow | None
    """The synthetic splits' flow source: the checkpoint's flow net (None), or with --flow dis
    OpenCV DIS warped by the torch backend's warp."""
    from dff.runtime.flows import dis_flow

    return dis_flow(None, args.dis_preset, args.dis_scale) if args.flow == "dis" else None


def _flow_record(flow) -> dict:
    return flow.settings() if flow is not None else {"source": "learned"}


def run_video(args: argparse.Namespace, p: argparse.ArgumentParser,
              argv: list[str] | None) -> int:
    """dff-eval --video: dff.models.agreement on an engine folder."""
    if args.engine_dir is None:
        p.error("--video needs --engine-dir DIR (a folder dff-export wrote)")
    for flag, given in (("a checkpoint", args.checkpoint), ("--demo", args.demo),
                        ("--plot", args.plot), ("--flow", args.flow)):
        if given:
            fix = (" (the modes dff and dff-dis are the flow sources; pick them with --modes)"
                   if flag == "--flow" else "")
            p.error(f"--video evaluates the export of --engine-dir: {flag} does not apply{fix}")
    for flag, given, default in (("--split", args.split, "eval"), ("--clips", args.clips, 0),
                                 ("--frames", args.frames, EVAL_FRAMES),
                                 ("--key-budget", args.key_budget, 0.1)):
        if given != default:
            p.error(f"{flag} applies to the synthetic splits, not --video")
    if args.max_frames is not None and args.max_frames < 1:
        p.error(f"--max-frames {args.max_frames}: give at least 1")
    command = shlex.join(["dff-eval", *(sys.argv[1:] if argv is None else argv)])
    say = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))

    def body() -> int:
        from dff.models.agreement import evaluate_agreement, format_agreement

        intervals = _intervals(args.intervals, VIDEO_INTERVALS, least=2)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
        engine_dir = Path(args.engine_dir)
        manifest = load_manifest(engine_dir, verify_hashes=False)
        args.checkpoint, args.useCudaGraph = None, False  # choose_backend's other arguments
        backend, reason = choose_backend(args, engine_dir, say)
        try:
            res = evaluate_agreement(backend, manifest, args.video, intervals,
                                     size=args.resize, max_frames=args.max_frames,
                                     modes=modes, dis_preset=args.dis_preset,
                                     dis_scale=args.dis_scale, progress=not args.quiet,
                                     where=str(engine_dir))
            kind, precision = backend.name, backend.precision
        finally:
            backend.close()
        res = {"command": command, "engine_dir": str(engine_dir), "backend": kind,
               "backend_reason": reason, "precision": precision, **res}
        print(format_agreement(res))
        for clip in res["clips"].values():
            if clip["truncated"]:
                print(f"dff-eval: warning: {clip['path']}: decoding stopped before the "
                      "container's frame count (truncated or damaged); scored the frames "
                      "decoded", file=sys.stderr)
        if args.json:
            write_json(res, args.json)
            print(f"wrote {args.json}")
        return 0

    return guarded("dff-eval", args.verbose, body)


if __name__ == "__main__":
    sys.exit(main())
