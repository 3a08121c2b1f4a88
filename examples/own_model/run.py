"""Train, export and run a user's own DFF model (model.py) end to end, then check the runtime.

    python examples/own_model/run.py --out own-model-demo/

1. trains the three modules of model.py briefly on the synthetic benchmark: the flow net on
   exact flow, trunk + head per frame, then all three through the warp (DFF);
2. exports them with `dff.export.export_modules` (stride 8, no scale field);
3. writes a synthetic clip as .mp4 and runs `dff-run` on it at k=1 and k=5 (ONNX Runtime);
4. runs the PyTorch modules on the same decoded frames with the same key frames and warp,
   and compares the labels with dff-run's JSON Lines. Exits 1 below 99.9 % equal pixels.

Everything is seeded, so two runs train the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `examples.own_model` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dff.data.synthetic import CLASS_NAMES, EVAL_SEEDS, make_clip, train_seeds
from dff.models.warp import flow_warp

from examples.own_model.model import (
    FEATURE_MEAN,
    FEATURE_STD,
    FLOW_MEAN,
    FLOW_STD,
    INPUT_SIZE,
    STRIDE,
    build,
    make_modules,
)

KEY_INTERVALS = (1, 5)
MIN_AGREEMENT = 0.999  # fraction of pixels where dff-run's labels equal PyTorch's
CLIP_FRAMES = 30
MAX_KEY_OFFSET = 4  # training: the key frame is 1..4 frames before the current one


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Float [N,3,H,W] pixels in 0..255 -> (pixel - mean) / std, as the exported graphs do."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] RGB -> float [N,3,H,W] in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


class Data:
    """Training clips in memory; batches of (current, key) frames, labels and cell flows."""

    def __init__(self, num_clips: int, num_frames: int):
        self.clips = [make_clip(s, num_frames, *INPUT_SIZE) for s in train_seeds(num_clips)]
        counts = sum(np.bincount(c.labels.ravel(), minlength=len(CLASS_NAMES))
                     for c in self.clips)
        w = 1.0 / np.sqrt(np.maximum(counts, 1) / counts.sum())  # small classes count more
        self.class_weights = torch.tensor(w / w.mean(), dtype=torch.float32)
        self.num_frames = num_frames

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        picks = []
        for _ in range(size):
            c, t = int(rng.integers(len(self.clips))), int(rng.integers(self.num_frames))
            picks.append((self.clips[c], t, max(0, t - int(rng.integers(1, MAX_KEY_OFFSET + 1)))))
        flows, masks = zip(*(self._cell_flow(clip, t, k) for clip, t, k in picks))
        return {"image": to_tensor(np.stack([c.frames[t] for c, t, _ in picks])),
                "key": to_tensor(np.stack([c.frames[k] for c, _, k in picks])),
                "labels": torch.from_numpy(np.stack([c.labels[t] for c, t, _ in picks])).long(),
                "flow": torch.from_numpy(np.stack(flows)), "mask": torch.from_numpy(np.stack(masks))}

    @staticmethod
    def _cell_flow(clip, t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact flow current -> key averaged over each stride-8 cell, in cells; valid mask."""
        flow, valid = clip.flow(t, k)
        h, w = INPUT_SIZE
        blocks = (h // STRIDE, STRIDE, w // STRIDE, STRIDE)
        v = valid.reshape(blocks).astype(np.float32).sum((1, 3))
        f = (flow * valid).reshape((2,) + blocks).sum((2, 4)) / np.maximum(v, 1)
        return (f / STRIDE).astype(np.float32), v >= STRIDE * STRIDE / 4


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, weight=weights)


def epe(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((pred - target).norm(dim=1) * mask).sum() / mask.sum().clamp(min=1)


def train(out: Path, iters: tuple[int, int, int], batch: int) -> Path:
    """Three short stages (flow, per-frame segmentation, DFF); saves and returns the weights."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = Data(num_clips=12, num_frames=30)
    feature, flow, task = make_modules(len(CLASS_NAMES))
    stages = (("flow", [flow], iters[0], 2e-3), ("seg", [feature, task], iters[1], 3e-3),
              ("dff", [feature, flow, task], iters[2], 1e-3))
    for stage, modules, steps, lr in stages:
        params = [p for m in modules for p in m.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        for m in (feature, flow, task):
            m.train(m in modules)
        start, log = time.perf_counter(), []
        for it in range(steps):
            b = data.batch(rng, batch)
            x, key = normalise(b["image"], FEATURE_MEAN, FEATURE_STD), b["key"]
            if stage == "seg":
                loss = seg_loss(task(feature(x)), b["labels"], data.class_weights)
            else:
                pred, scale = flow(normalise(b["image"], FLOW_MEAN, FLOW_STD),
                                   normalise(key, FLOW_MEAN, FLOW_STD))
                loss = epe(pred, b["flow"], b["mask"])
                if stage == "dff":  # the paper's training: loss on the current frame only
                    key_feat = feature(normalise(key, FEATURE_MEAN, FEATURE_STD))
                    loss = seg_loss(task(flow_warp(key_feat, pred, scale)), b["labels"],
                                    data.class_weights) + 0.5 * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append(loss.item())
        print(f"train {stage}: {steps} iterations, loss {np.mean(log[:10]):.3f} -> "
              f"{np.mean(log[-10:]):.3f}, {time.perf_counter() - start:.1f} s", flush=True)
    path = out / "own_model.pth"
    torch.save({"feature": feature.state_dict(), "flow": flow.state_dict(),
                "task": task.state_dict()}, path)
    return path


@torch.no_grad()
def torch_labels(mods, frames: list[np.ndarray], k: int) -> np.ndarray:
    """uint8 [T,H,W]: the PyTorch modules under dff-run's fixed schedule (key frame when
    t % k == 0), warping the last key frame's features along flow(frame, key frame)."""
    out, key_feat, key_image = [], None, None
    for t, frame in enumerate(frames):
        image = to_tensor(frame[None])
        if t % k == 0:
            key_feat = mods.feature(normalise(image, mods.feature_mean, mods.feature_std))
            key_image, feat = image, key_feat
        else:
            pred, scale = mods.flow(normalise(image, mods.flow_mean, mods.flow_std),
                                    normalise(key_image, mods.flow_mean, mods.flow_std))
            feat = flow_warp(key_feat, pred, scale)
        logits = F.interpolate(mods.task(feat), size=frame.shape[:2], mode="bilinear",
                               align_corners=False)
        out.append(logits.argmax(1)[0].to(torch.uint8).numpy())
    return np.stack(out)


def read_jsonl_labels(path: Path) -> np.ndarray:
    from dff.runtime.writers import rle_decode

    records = [json.loads(line) for line in path.read_text().splitlines()]
    return np.stack([rle_decode(r["labels"]) for r in sorted(records, key=lambda r: r["frame"])])


def miou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    ious = []
    for c in range(num_classes):
        union = np.sum((pred == c) | (truth == c))
        if union:
            ious.append(np.sum((pred == c) & (truth == c)) / union)
    return float(np.mean(ious))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("own-model-demo"),
                   help="folder for the weights, the export, the clip and the JSON Lines "
                        "(default ./own-model-demo/)")
    p.add_argument("--iters", type=int, nargs=3, default=(60, 150, 60),
                   metavar=("FLOW", "SEG", "DFF"), help="training iterations per stage")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    from dff.export import export_modules
    from dff.runtime.video import open_video, write_synthetic_clip

    from dff.commands import run as dff_run

    checkpoint = train(args.out, tuple(args.iters), args.batch)
    mods = build(checkpoint)
    engines = args.out / "engines"
    result = export_modules(
        engines, feature=mods.feature, flow=mods.flow, task=mods.task, kind="segmentation",
        class_names=CLASS_NAMES, input_size=INPUT_SIZE, stride=STRIDE,
        feature_mean=FEATURE_MEAN, feature_std=FEATURE_STD, flow_mean=FLOW_MEAN,
        flow_std=FLOW_STD, key_interval=5, log=print)
    print(f"exported {', '.join(sorted(result.files))} to {result.directory} "
          f"(stride {result.manifest['stride']})")

    video = args.out / "clip.mp4"
    clip = write_synthetic_clip(video, seed=EVAL_SEEDS[0], num_frames=CLIP_FRAMES,
                                height=INPUT_SIZE[0], width=INPUT_SIZE[1])
    with open_video(video) as reader:  # the decoded frames, as dff-run sees them
        frames = list(reader)
    failed = False
    for k in KEY_INTERVALS:
        jsonl = args.out / f"labels.k{k}.jsonl"
        argv_run = [str(video), "--engine-dir", str(engines), "--backend", "onnxruntime",
                    "--key-interval", str(k), "--json", str(jsonl), "--quiet"]
        print("dff-run " + " ".join(argv_run), flush=True)
        if dff_run.main(argv_run) != 0:
            print(f"dff-run failed at k={k}")
            return 1
        runtime = read_jsonl_labels(jsonl)
        reference = torch_labels(mods, frames, k)
        if runtime.shape != reference.shape:
            print(f"k={k}: dff-run gave labels {runtime.shape}, PyTorch {reference.shape}")
            return 1
        agree = float(np.mean(runtime == reference))
        objects = float(np.mean(reference != 0))
        print(f"k={k}: agreement {100 * agree:.3f} % of pixels (dff-run vs PyTorch); "
              f"mIoU vs ground truth {miou(runtime, clip.labels, len(CLASS_NAMES)):.3f}; "
              f"{100 * objects:.1f} % of pixels not background")
        failed |= agree < MIN_AGREEMENT or objects == 0
    print(f"done in {time.perf_counter() - started:.1f} s")
    if failed:
        print(f"FAILED: agreement below {100 * MIN_AGREEMENT:.1f} % or only background")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
