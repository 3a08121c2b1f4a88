"""dff-adapt ENGINE_DIR --video FILE_OR_FOLDER [...]: train a flow net for an existing export on
your own unlabelled video and write it into the export as its learned flow (flow.onnx;
dff.models.adapt, docs/DESIGN.md §20)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dff.commands.common import guarded, int_at_least


def _number(text: str, ok, says: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value} {says}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "is outside [0, 1)")


def _positive(text: str) -> float:
    return _number(text, lambda v: v > 0, "is not above 0")


def _non_negative(text: str) -> float:
    return _number(text, lambda v: v >= 0, "is below 0")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dff-adapt",
        description="Train a flow net (flow and scale field) for an export on your own "
                    "unlabelled video, the export's feature graph as the teacher, and write it "
                    "into the export as its learned flow (flow.onnx, and flow_key.onnx for a net "
                    "that caches its key frame; the previous ones are kept as flow.prev.onnx "
                    "and flow_key.prev.onnx).")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="a folder written by dff-export")
    p.add_argument("--video", nargs="+", required=True, metavar="FILE_OR_FOLDER",
                   help="videos to train on (folders: the videos in them)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=_positive, metavar="M",
                        help="train for M minutes of wall-clock time")
    budget.add_argument("--iters", type=int_at_least(1), metavar="N",
                        help="train N iterations (more, with --resume)")
    p.add_argument("--k-max", type=int_at_least(1), default=10, metavar="K",
                   help="key frame offsets 1..K (default: 10)")
    p.add_argument("--held-out", type=_fraction, default=0.2, metavar="F",
                   help="footage watched, not trained on: whole clips from the end, or the last "
                        "F of a single clip (default: 0.2; 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from ENGINE_DIR/adapt/checkpoint.pt")
    p.add_argument("--stages", default="dis,distil",
                   help="dis (fit OpenCV DIS's flow), distil (match the teacher's features), or "
                        "both in that order (default: dis,distil)")
    p.add_argument("--default", choices=("learned", "keep"), default="keep",
                   help="make the learned flow the export's default flow source (default: keep "
                        "the export's)")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="pairs per step (default 4)")
    p.add_argument("--lr", type=_positive, default=None,
                   help="Adam's learning rate (default: 1e-3 from scratch, 1e-4 from a trained "
                        "init)")
    p.add_argument("--max-frames", type=int_at_least(2), default=600, metavar="N",
                   help="frames read from each video (default: 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int_at_least(1), default=50, metavar="N",
                   help="score the held-out footage every N iterations (default: 50); the net "
                        "written is the one that scored best there")
    p.add_argument("--input-scale", type=float, choices=(1.0, 0.5, 0.25), default=None,
                   metavar="F", help="the flow net sees the frames shrunk by F: 1, 0.5 or 0.25 "
                   "(default: 0.5 where the export's size is at least 512 on its shorter side, "
                   "else 1; smaller is cheaper)")
    p.add_argument("--train-scale", action="store_true",
                   help="train the scale field in the distil stage (default: it stays 1; "
                        "matching features alone shrinks it, which can cost a detector its "
                        "scores)")
    p.add_argument("--dis-weight", type=_non_negative, default=0.1, metavar="W",
                   help="weight of the end-point error against DIS in the distil stage, which "
                        "keeps the net's output a flow (default 0.1; 0: features alone)")
    p.add_argument("--motion-weight", type=_non_negative, default=0.5, metavar="W",
                   help="weight of the end-point error on the training frames moved along "
                        "known random motions, in every stage: keeps the net a flow for "
                        "motions your footage lacks (default 0.5; 0: off)")
    p.add_argument("--full-motion-weight", type=_non_negative, default=3.0, metavar="W",
                   help="below --input-scale 1: weight of the same error with the net on the "
                        "whole frames, which keeps the weights a flow at full size; trained on "
                        "shrunk frames alone they lose it (default 3; 0: off)")
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="CPU threads (default: 0 = the library's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)

    def body() -> int:
        import torch

        from dff.models.adapt import AdaptOptions, adapt

        if args.threads:
            torch.set_num_threads(args.threads)
        log = (lambda _: None) if args.quiet else (lambda s: print(s, flush=True))
        options = AdaptOptions(
            iters=args.iters, minutes=args.minutes, k_max=args.k_max, held_out=args.held_out,
            stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
            batch=args.batch, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
            max_frames=args.max_frames, resume=args.resume,
            default_learned=args.default == "learned", threads=args.threads,
            input_scale=args.input_scale, train_scale=args.train_scale,
            dis_weight=args.dis_weight, motion_weight=args.motion_weight,
            full_motion_weight=args.full_motion_weight)

        def progress(it, total):
            if args.quiet:
                return it
            from tqdm import tqdm

            return tqdm(it, total=total, desc="dff-adapt", unit="it", file=sys.stderr,
                        dynamic_ncols=True)

        record = adapt(args.engine_dir, args.video, options, log=log, progress=progress)
        if not args.quiet:
            print(f"dff-adapt: {record['iterations']} iterations; run it with "
                  f"`dff-run VIDEO -e {args.engine_dir} --flow learned`")
        return 0

    started = time.time()

    def left() -> str:  # the checkpoint saved every save_every iterations stays
        from dff.models.adapt import ADAPT_DIR, CHECKPOINT

        ckpt = Path(args.engine_dir) / ADAPT_DIR / CHECKPOINT
        saved = ckpt.is_file() and ckpt.stat().st_mtime >= started
        then = f"--resume continues from {ckpt}" if saved else "this run saved no checkpoint yet"
        return f"{args.engine_dir}'s flow.onnx and manifest unchanged; {then}"

    return guarded("dff-adapt", args.verbose, body, left)


if __name__ == "__main__":
    sys.exit(main())
