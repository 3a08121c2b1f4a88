"""dff-train: the three training stages of DFF on the synthetic benchmark.

The stages (flow, seg or det, dff) are dff.models.train's.

``--init CHECKPOINT`` starts the trunk and the flow net from a trained checkpoint of the same
architecture (e.g. the shipped segmentation model; then ``--iters-flow 0`` skips stage 1).

State is saved every ``--save-every`` iterations to OUT/state.pt, and ``--resume`` continues
from it, drawing the batches an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from dff.errors import DffError
from dff.models.checkpoint import WEIGHTS_DTYPES, save_checkpoint
from dff.models.config import PRESETS, DFFConfig
from dff.models.train import MAX_KEY_OFFSET, train
from dff.tasks import DETECTION, KINDS


def build_config(args: argparse.Namespace) -> DFFConfig:
    config = DFFConfig.from_dict(PRESETS[args.config].to_dict()).for_task(args.task)
    config.input_size = [args.height, args.width]
    config.key_interval = args.key_interval
    for name in ("head_subcell", "head_channels", "head_upsample", "head"):
        if getattr(args, name):
            setattr(config, name, getattr(args, name))
    return config


def run(args: argparse.Namespace, argv: list[str] | None) -> Path:
    """Train, then write OUT/model.pth (and --save); `argv` (None: sys.argv) goes into the
    checkpoint's meta as the command."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = train(
        build_config(args), out / "state.pt",
        iters={"flow": args.iters_flow, "seg": args.iters_seg, "det": args.iters_det,
               "dff": args.iters_dff},
        lrs={"flow": args.lr_flow, "seg": args.lr, "det": args.lr, "dff": args.lr_dff},
        seed=args.seed, clips=args.clips, frames=args.frames, batch=args.batch,
        max_key_offset=args.max_key_offset, flow_loss=args.flow_loss,
        size_weight=args.size_weight, save_every=args.save_every, init=args.init,
        init_head=args.init_head, resume=args.resume, device=args.device,
        progress=not args.quiet)
    argv = sys.argv[1:] if argv is None else argv
    meta = {"command": shlex.join(["dff-train", *argv]), **meta}
    save_checkpoint(out / "model.pth", model, meta=meta)
    if args.save:
        save_checkpoint(args.save, model, meta=meta, weights=args.weights_dtype)
    print(f"wrote {out / 'model.pth'}" + (f" and {args.save}" if args.save else ""))
    return out / "model.pth"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dff-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="small")
    p.add_argument("--task", choices=KINDS, default="segmentation")
    p.add_argument("--init", help="start the trunk and flow net from this checkpoint (same "
                                  "architecture, any task); --iters-flow 0 then skips stage 1")
    p.add_argument("--init-head", action="store_true",
                   help="with --init: copy the task head too, to fine-tune a trained model "
                        "(same task and head settings); --iters-flow 0 --iters-det 0 then "
                        "trains end to end only")
    p.add_argument("--out", default="runs/small", help="folder for state.pt and model.pth")
    p.add_argument("--save", help="also write the final checkpoint here")
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32",
                   help="storage of --save's weights: float16 halves the file, int8 (per-channel "
                        "scales, the rest float16) quarters it; loading gives float32")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=96, help="training clips to render")
    p.add_argument("--frames", type=int, default=40, help="frames per training clip")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters-flow", type=int, default=4000)
    p.add_argument("--iters-seg", type=int, default=3000)
    p.add_argument("--iters-det", type=int, default=3000, help="stage 2 of --task detection")
    p.add_argument("--iters-dff", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-flow", type=float, default=3e-3)
    p.add_argument("--lr-dff", type=float, default=5e-4)
    p.add_argument("--flow-loss", type=float, default=0.0,
                   help="weight of an end-point-error term in stage 3 (the paper uses none)")
    p.add_argument("--key-interval", type=int, default=10, help="default stored in the config")
    p.add_argument("--max-key-offset", type=int, metavar="D",
                   help="flow and dff stages: the key frame is 0..D frames before the current "
                        f"one (default {MAX_KEY_OFFSET}, the paper's; larger trains the warp "
                        "on larger motion)")
    p.add_argument("--head-subcell", type=int, default=0,
                   help="override the preset's head_subcell (1 = DeepLab's stride-16 logits)")
    p.add_argument("--head-channels", type=int, default=0, help="override the preset's head width")
    p.add_argument("--head-upsample", type=int, default=0, choices=(0, 1, 2),
                   help="detection: 2 doubles the head's map (output stride 8)")
    p.add_argument("--head", choices=("centernet", "rfcn"),
                   help="detection: the head; centernet (default, dff.models.detection) or rfcn "
                        "(the original DFF's R-FCN, dff.models.rfcn)")
    p.add_argument("--size-weight", type=float, default=0.1,
                   help="detection: weight of the L1 size loss (CenterNet's 0.1)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) % 16:
            print(f"dff-train: --{name} {getattr(args, name)} must be a multiple of 16 (the "
                  "feature stride)", file=sys.stderr)
            return 2
    if args.init_head and not args.init:
        print("dff-train: --init-head copies the head of the --init checkpoint; add --init "
              "MODEL.pth", file=sys.stderr)
        return 2
    if args.head == "rfcn" and args.task != DETECTION:
        print("dff-train: --head rfcn is a detection head; add --task detection", file=sys.stderr)
        return 2
    if args.max_key_offset is None:  # the paper's 9, clamped to the clip as always
        args.max_key_offset = MAX_KEY_OFFSET
    elif not 0 <= args.max_key_offset < args.frames:
        print(f"dff-train: --max-key-offset {args.max_key_offset} must be 0 to --frames - 1 "
              f"({args.frames - 1}): the key frame is in the same training clip",
              file=sys.stderr)
        return 2
    try:
        run(args, argv)
    except DffError as e:
        if args.verbose:
            raise
        print(f"dff-train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
