"""Training the flow network's quality head (dff.models.flownet.QualityHead): the learned
key-frame schedule's input (issue 13).

For a frame and its key frame the head predicts how far the features DFF propagates are from
the frame's own features: the relative squared error

    quality = mean over cells of |warp(N_feat(key)) − N_feat(frame)|² / mean over cells of
              |N_feat(frame)|²

(0 = perfect propagation; a scene cut gives about 1 or more). It reads what the flow network
already computed (the pooled last concat its flow and scale come from, and the flow itself,
with how far each cell samples outside the key map), predicts the error per cell and averages
it, so it costs one 3×3 and one 1×1 convolution on the stride-16 grid. Trained after the rest
of DFF, which stays frozen, on clips of every motion category of dff.data.motion drawn from
training seeds; exported as flow.onnx's extra output `quality` [N,1].

    python -m dff.models.quality MODEL.pth -o MODEL_quality.pth   # adds the head
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch
from dff.models.dff import DFF
from dff.models.flownet import QualityHead

from dff.errors import DffError

# training clips: seeds inside the training range (synthetic.train_seeds), far above those
# dff-train draws, in every category of the motion split
TRAIN_SEEDS = 9_000_000
LAGS = (1, 2, 3, 5, 7, 10, 14, 20, 27)  # frames between key and current in training pairs


def relative_error(warped: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell [N,h,w] and per frame [N] relative squared error of `warped` against `true`."""
    norm = (true ** 2).sum(1).mean(dim=(1, 2)).clamp_min(1e-12)  # [N]
    cells = ((warped - true) ** 2).sum(1) / norm.view(-1, 1, 1)
    return cells, cells.mean(dim=(1, 2))


@torch.no_grad()
def pair_data(model, clips, lags=LAGS, every: int = 2, progress: bool = True) -> dict:
    """For each clip, frame t (every `every`-th) and key t − lag: the flow net's features and
    flow, and the true per-cell relative error of DFF's propagation (`relative_error`)."""
    from dff.models.warp import flow_warp
    from tqdm import tqdm

    cats, flows, cells, errors = [], [], [], []
    for clip in tqdm(list(clips), desc="quality pairs", disable=not progress):
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
        feats = torch.cat([model.features(frames[i:i + 8]) for i in range(0, len(frames), 8)])
        pairs = [(t, t - lag) for t in range(0, len(frames), every) for lag in lags if t >= lag]
        for lo in range(0, len(pairs), 64):
            cur = [p[0] for p in pairs[lo:lo + 64]]
            key = [p[1] for p in pairs[lo:lo + 64]]
            flow, scale, cat = model.flownet(frames[cur], frames[key], model.mean, features=True)
            cell, err = relative_error(flow_warp(feats[key], flow, scale), feats[cur])
            cats.append(cat)
            flows.append(flow)
            cells.append(cell)
            errors.append(err)
    return {"cat": torch.cat(cats), "flow": torch.cat(flows), "cells": torch.cat(cells),
            "error": torch.cat(errors)}


def training_clips(per_category: int, height: int, width: int):
    """`per_category` clips of each motion category from training seeds (dff.data.motion's
    generator; never its evaluation or tuning seeds)."""
    from dff.data.motion import CATEGORIES, category_clips

    for i, category in enumerate(CATEGORIES):
        for m in category_clips(category, TRAIN_SEEDS + i * 10_000, per_category,
                                height=height, width=width):
            yield m.clip


def fit(head: QualityHead, data: dict, iters: int = 1500, lr: float = 3e-3,
        seed: int = 0, progress: bool = True) -> dict:
    """Train `head` on pair_data: per-cell L1 on the error map plus the log of the frame's
    mean (what the schedule compares); returns the last losses."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    n = len(data["error"])
    log_target = torch.log(data["error"] + 1e-3)
    stats: dict = {}
    for it in tqdm(range(iters), desc="quality head", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * it / iters))
        idx = torch.randint(0, n, (256,), generator=gen)
        cells = head.cells(data["cat"][idx], data["flow"][idx])[:, 0]
        cell_loss = (cells - data["cells"][idx]).abs().mean()
        frame_loss = ((torch.log(cells.mean(dim=(1, 2)) + 1e-3) - log_target[idx]) ** 2).mean()
        loss = cell_loss + frame_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = {"cell_l1": float(cell_loss), "frame_log_mse": float(frame_loss)}
    return stats


@torch.no_grad()
def agreement(head: QualityHead, data: dict) -> dict:
    """How well the prediction ranks the true errors: Spearman's rho over the pairs, and the
    median relative error of the prediction."""
    pred = torch.cat([head(data["cat"][i:i + 512], data["flow"][i:i + 512])[:, 0]
                      for i in range(0, len(data["error"]), 512)]).numpy()
    true = data["error"].numpy()
    rank = lambda a: np.argsort(np.argsort(a))
    rho = float(np.corrcoef(rank(pred), rank(true))[0, 1])
    return {"pairs": len(true), "spearman": round(rho, 4),
            "median_abs_rel": round(float(np.median(np.abs(pred - true) / (true + 1e-3))), 4),
            "true_median": round(float(np.median(true)), 4),
            "pred_median": round(float(np.median(pred)), 4)}


def add_quality_head(model, hidden: int = 16, per_category: int = 6, iters: int = 1500,
                     progress: bool = True) -> tuple[object, dict]:
    """A copy of `model` (a DFF) with a trained quality head, the rest unchanged, and the
    head's fit on its training pairs and on the motion split's tuning clips."""
    from dff.data.motion import motion_split

    h, w = model.config.input_size
    new = DFF(replace(model.config, quality_channels=hidden))
    missing = new.load_state_dict(model.state_dict(), strict=False).missing_keys
    if any(not k.startswith("quality_head.") for k in missing):
        raise DffError(f"copying the model's weights left {missing} unset")
    new.eval()
    torch.manual_seed(0)
    assert new.quality_head is not None
    train = pair_data(new, training_clips(per_category, h, w), progress=progress)
    new.quality_head.train()
    stats = fit(new.quality_head, train, iters=iters, progress=progress)
    new.quality_head.eval()
    tuning = pair_data(new, (m.clip for m in motion_split("tuning", height=h, width=w)),
                       progress=progress)
    return new, {"loss": stats, "train": agreement(new.quality_head, train),
                 "tuning": agreement(new.quality_head, tuning)}


if __name__ == "__main__":  # the documented `python -m dff.models.quality`
    from dff.commands.quality import main

    sys.exit(main())
