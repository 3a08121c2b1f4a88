"""The stereo pair's EPE along a dff-adapt run (issue 23: "the adapted flow is still a flow").

Runs dff-adapt's library (models/adapt.adapt) on a temporary copy of an export, so the export
itself is left as it is, and at every held-out evaluation (the start's included) scores the net
on flow_accuracy.py's stereo pair: at the input scale it trains at and, below 1, at 1 (the same
weights on the whole images). Beside them, the held-out scores that choose the net written (the
feature error, the DIS and known-motion EPE in cells; below input scale 1, the known-motion EPE
at 1 too), and DIS ultrafast's stereo EPE on the whole images and as ``--flow dis`` runs it by
default (half size): the references of the issue's bar of at most 2x.

    pip install scikit-image                      # benchmark-only (pyproject's `bench` extra)
    python benchmarks/adapt_stereo.py ENGINE_DIR --video bikes.mp4 vtest.avi --iters 2000 \\
        --input-scale 0.5 [--eval-every 250] [--lr 1e-4] [--stages distil] \\
        [--full-motion-weight 3] [--threads 2]

About 0.2 s an iteration for CenterFace at 288x352 and input scale 0.5 on 2 cores (0.15 with
--full-motion-weight 0), plus 2 s an evaluation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dff.models.adapt import AdaptOptions, adapt

from dff.errors import DffError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_accuracy as fa  # a sibling script, not a package


class StereoScore:
    """A flow net's or DIS's EPE (px, the cells with every pixel valid) on the stereo pair, as
    flow_accuracy.py scores its rows (the net at stride 16)."""

    def __init__(self) -> None:
        left, right, gt, valid = fa.stereo_pair()
        self.target, count = fa.cell_mean(gt, valid)
        self.mask = count == fa.STRIDE * fa.STRIDE
        self.pair = (left, right)

    def net(self, state: dict[str, torch.Tensor], input_scale: float) -> float:
        from dff.models.realflow import load_realflow

        net = load_realflow(fa.STRIDE, 1, state, input_scale=input_scale).eval()
        return fa.epe(fa.realflow_px(net, *self.pair), self.target, self.mask)

    def dis(self, scale: float) -> float:
        from dff.runtime.flows import DisFlow

        flow = fa.scaled_dis_px(DisFlow("ultrafast", scale), *self.pair)
        return fa.epe(fa.cell_mean(flow)[0], self.target, self.mask)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="a folder written by dff-export")
    p.add_argument("--video", nargs="+", required=True, metavar="FILE_OR_FOLDER",
                   help="the footage, as dff-adapt --video takes it")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--input-scale", type=float, choices=(1.0, 0.5, 0.25), default=None)
    p.add_argument("--lr", type=float, default=None, help="dff-adapt's --lr (default: its own)")
    p.add_argument("--stages", default="dis,distil", help="dff-adapt's --stages")
    p.add_argument("--motion-weight", type=float, default=AdaptOptions.motion_weight)
    p.add_argument("--dis-weight", type=float, default=AdaptOptions.dis_weight)
    p.add_argument("--full-motion-weight", type=float, default=AdaptOptions.full_motion_weight)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's and ONNX Runtime's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    score = StereoScore()
    print(f"stereo pair, DIS ultrafast: {score.dis(1.0):.2f} px on the whole images, "
          f"{score.dis(0.5):.2f} px at half size (--flow dis's default)")
    rows: list[dict[str, Any]] = []

    def watch(iteration: int, net: torch.nn.Module, scores: dict[str, Any]) -> None:
        state = net.state_dict()  # scored now, into a net of its own
        scale = float(getattr(net, "input_scale", 1.0))
        row = {"iteration": iteration, "feat": scores["feat"], "dis_epe": scores["dis_epe"],
               "motion_epe": scores.get("motion_epe", float("nan")),
               "motion_full": scores.get("motion_epe_full", float("nan")),
               "stereo": score.net(state, scale),
               "stereo_x1": score.net(state, 1.0) if scale != 1.0 else None}
        rows.append(row)
        x1 = "" if row["stereo_x1"] is None else \
            f" {row['motion_full']:>13.3f} {row['stereo_x1']:>9.2f}"
        print(f"{iteration:>9} {row['feat']:>9.4f} {row['dis_epe']:>8.3f} "
              f"{row['motion_epe']:>10.3f} {row['stereo']:>9.2f}{x1}", flush=True)

    print(f"\n{'iteration':>9} {'held feat':>9} {'DIS EPE':>8} {'motion EPE':>10} "
          f"{'stereo px':>9} {'motion at x1':>13} {'stereo x1':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = shutil.copytree(args.engine_dir, Path(tmp) / "engines")
        options = AdaptOptions(iters=args.iters, eval_every=args.eval_every,
                               save_every=args.iters, input_scale=args.input_scale, lr=args.lr,
                               threads=args.threads, stages=tuple(args.stages.split(",")),
                               motion_weight=args.motion_weight, dis_weight=args.dis_weight,
                               full_motion_weight=args.full_motion_weight)
        try:
            record = adapt(copy, args.video, options, watch=watch)
        except DffError as e:  # a bad video or export: dff-adapt's one line
            raise SystemExit(f"adapt_stereo: {e}") from None
    chosen = (record.get("chosen") or {}).get("iteration")
    row = next((r for r in rows if r["iteration"] == chosen), None)
    if row is None:
        print(f"\nthe held-out rule chose iteration {chosen}, not one scored here")
        return
    stereo = np.array([r["stereo"] for r in rows])
    print(f"\nthe held-out rule chose iteration {chosen}: stereo EPE {row['stereo']:.2f} px"
          + ("" if row["stereo_x1"] is None else f", {row['stereo_x1']:.2f} px at x1")
          + f" (over the run: {stereo.min():.2f} to {stereo.max():.2f} px; input scale "
          f"{record['input_scale']:g}, lr {record['lr']:g}, stages {','.join(record['stages'])}, "
          f"{record['iterations']} iterations)")


if __name__ == "__main__":
    main()
