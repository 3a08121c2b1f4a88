"""dff-eval: accuracy and speed of a DFF checkpoint on the synthetic evaluation split.

The evaluation is dff.models.evaluate's (--split motion: dff.models.motion_eval's); here the
arguments, the table, the JSON and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dff.data.synthetic import EVAL_FRAMES
from dff.errors import DffError
from dff.models.checkpoint import demo_checkpoint_path, load_checkpoint
from dff.models.evaluate import DEFAULT_INTERVALS, evaluate
from dff.models.motion_eval import evaluate_motion, format_motion
from dff.tasks import DEMOS, DETECTION, RFCN, SEGMENTATION


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dff-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help=f"default: the shipped demo "
                   f"({demo_checkpoint_path().name})")
    p.add_argument("--demo", nargs="?", const=SEGMENTATION, choices=DEMOS, metavar="NAME",
                   help="evaluate a shipped demo model: segmentation (the default, the same "
                        f"as giving no checkpoint), detection ({demo_checkpoint_path(DETECTION).name}"
                        f", CenterNet head) or rfcn ({demo_checkpoint_path(RFCN).name}, R-FCN head)")
    p.add_argument("--split", choices=("eval", "motion"), default="eval",
                   help="eval: the fixed 20-clip split; motion: by motion category, with the "
                        "key-frame schedules at --key-budget (dff.models.motion_eval)")
    p.add_argument("--key-budget", type=float, default=0.1,
                   help="--split motion: the fraction of key frames every schedule gets "
                        "(default 0.1: fixed k=10)")
    p.add_argument("--intervals", help="key intervals (default: 1,2,5,10,20; with --split "
                   "motion 5,10,20)")
    p.add_argument("--clips", type=int, default=0, help="first N clips of the split (0 = all "
                   "20; with --split motion, per category, 0 = 8)")
    p.add_argument("--frames", type=int, default=EVAL_FRAMES, help="frames per clip")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write accuracy vs speed as a PNG here")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.demo and args.checkpoint:
        p.error("give a checkpoint or --demo, not both")
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint_path(
        args.demo or SEGMENTATION)
    try:
        default = (5, 10, 20) if args.split == "motion" else DEFAULT_INTERVALS
        intervals = tuple(int(x) for x in args.intervals.split(",")) if args.intervals \
            else default
        if any(i < 1 for i in intervals):
            raise ValueError
    except ValueError:
        print(f"dff-eval: --intervals {args.intervals!r}: give positive integers like 1,2,5,10",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split == "motion" and (args.plot or args.frames != EVAL_FRAMES):
        p.error("--split motion: --plot and --frames apply to --split eval only")
    if not 0 < args.key_budget <= 1:
        p.error(f"--key-budget {args.key_budget}: give a fraction in (0, 1], e.g. 0.1")
    try:
        model = load_checkpoint(checkpoint)
        if args.split == "motion":
            res = evaluate_motion(model, args.key_budget, intervals, args.clips or None,
                                  progress=not args.quiet)
            res["checkpoint"] = str(checkpoint)
            print(format_motion(res))
            if args.json:
                write_json(res, args.json)
                print(f"wrote {args.json}")
            return 0
        res = evaluate(model, intervals, args.clips or None, args.frames, not args.quiet)
    except DffError as e:
        if args.verbose:
            raise
        print(f"dff-eval: {e}", file=sys.stderr)
        return 1
    res["checkpoint"] = str(checkpoint)
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
