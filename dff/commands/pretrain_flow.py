"""`python -m dff.models.pretrain_flow`: pretrain the generic real-footage flow net
(dff.models.pretrain_flow.pretrain; its docstring has the commands that made the shipped
weights)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dff.commands.common import guarded
from dff.models import pretrain_flow

PROG = "python -m dff.models.pretrain_flow"


def main(argv: list[str] | None = None) -> int:
    """Exit 0; 1 with one line for missing clips or an unwritable --out; 130 on Ctrl-C."""
    p = argparse.ArgumentParser(prog=PROG,
                                description=(pretrain_flow.__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default="models/weights/realflow.pth", help="the weights written")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="wall-time budget in all, counting a resumed run's time")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch threads (1: steadier on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="weights to start from (the tensors that fit)")
    p.add_argument("--large-share", type=float, default=0.0,
                   help="share of the affine samples with uniform (not mostly small) motion")
    p.add_argument("--layered-share", type=float, default=0.0,
                   help="share of the synthetic samples that are layered (several motions)")
    p.add_argument("--dis-share", type=float, default=0.5,
                   help="share of the samples that are DIS pairs (pseudo ground truth)")
    p.add_argument("--low-contrast", type=float, default=0.0,
                   help="share of the samples with their contrast scaled down (faint texture)")
    p.add_argument("--half-share", type=float, default=0.0,
                   help="share of the batches shrunk 2x (as at input scale 0.5)")
    args = p.parse_args(argv)

    def body() -> int:
        result = pretrain_flow.pretrain(
            args.out, args.minutes, batch_size=args.batch, lr=args.lr, threads=args.threads,
            seed=args.seed, init=args.init, large_share=args.large_share,
            layered_share=args.layered_share, dis_share=args.dis_share,
            low_contrast=args.low_contrast, half_share=args.half_share)
        print(f"{result['steps']} steps in {result['minutes']:.1f} min; held-out EPE (stride "
              f"16) {result['held_out_epe']:.2f} px, layered {result['layered_epe']:.2f} px; "
              f"wrote {args.out}")
        return 0

    def left() -> str:  # the last minute's checkpoint stays, to resume from
        ckpt = Path(f"{args.out}.ckpt")
        then = (f"the same command resumes from {ckpt}" if ckpt.is_file() else
                "no checkpoint yet (the first is saved after a minute)")
        return f"{args.out} not written; {then}"

    return guarded(PROG, False, body, left)


if __name__ == "__main__":
    sys.exit(main())
