"""The three training stages of DFF on the synthetic benchmark.

1. flow: pretrain N_flow on frame pairs with exact flow (end-point error on the feature grid);
2. seg:  train N_feat + N_task per frame (pixel cross-entropy), or `det` with --task detection
         (CenterNet's focal loss on centre heatmaps, L1 on size and offset; dff.models.detection;
         with --head rfcn R-FCN's RPN and RoI losses, dff.models.rfcn_loss);
3. dff:  train everything end to end: the key frame is 0..9 frames before the current one,
         its features are warped to the current frame, loss on the current frame only.

`init_from` starts the trunk and the flow net (and, for fine-tuning, the head) from a trained
checkpoint of the same architecture. `train` saves its state every `save_every` iterations
(atomically) and can resume from it; sampling is seeded per (stage, iteration) so a resumed
run draws the same batches as an uninterrupted one. The command: dff.commands.train.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dff.data.synthetic import CLASS_NAMES, make_clip, train_seeds
from dff.models.checkpoint import atomic_torch_save, file_sha256, read_checkpoint
from dff.models.config import DFFConfig
from dff.models.detection import detection_loss, detection_targets, flip_boxes
from dff.models.dff import DFF
from dff.models.rfcn_loss import rfcn_loss

from dff.errors import DffError
from dff.tasks import DETECTION

STAGES = ("flow", "seg", "dff")
DETECTION_STAGES = ("flow", "det", "dff")
MAX_KEY_OFFSET = 9  # the paper samples the key frame up to 9 frames before the current one
# what --init must share with the model being trained: the trunk and the flow net
INIT_FIELDS = ("trunk_depth", "trunk_width", "feat_channels", "feat_dilation", "flow_width",
               "stride", "mean", "std")
# what --init-head must share as well: the task head
HEAD_FIELDS = ("task", "class_names", "head", "head_channels", "head_upsample", "head_subcell")


def stages_for(task: str) -> tuple[str, str, str]:
    return DETECTION_STAGES if task == DETECTION else STAGES


class TrainData:
    """Training clips rendered once into memory (uint8), plus their exact flows on demand."""

    def __init__(self, num_clips: int, num_frames: int, size: tuple[int, int], seed: int,
                 num_classes: int, progress: bool = True):
        from tqdm import tqdm

        seeds = train_seeds(num_clips, start=seed * 100_000)
        self.clips = [make_clip(s, num_frames, *size)
                      for s in tqdm(seeds, desc="render clips", disable=not progress)]
        self.num_frames = num_frames
        # Objects cover ~11 % of pixels: weight classes by 1/sqrt(frequency) (mean 1) so the
        # small ones count in the loss as they do in mIoU.
        counts = sum(np.bincount(c.labels.ravel(), minlength=num_classes) for c in self.clips)
        w = 1.0 / np.sqrt(np.maximum(counts, 1) / counts.sum())
        self.class_weights = torch.tensor(w / w.mean(), dtype=torch.float32)

    def sample_pairs(self, rng: np.random.Generator, batch: int,
                     max_offset: int = MAX_KEY_OFFSET) -> list[tuple[int, int, int]]:
        """(clip, current, key) with key = current - randint(0..max_offset), clamped to the
        clip."""
        out = []
        for _ in range(batch):
            c = int(rng.integers(len(self.clips)))
            t = int(rng.integers(self.num_frames))
            out.append((c, t, max(0, t - int(rng.integers(max_offset + 1)))))
        return out

    def images(self, pairs, which: int) -> torch.Tensor:
        """Float [B,3,H,W] 0..255 of the current (which=1) or key (which=2) frames."""
        arr = np.stack([self.clips[p[0]].frames[p[which]] for p in pairs])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float()

    def labels(self, pairs) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.clips[c].labels[t] for c, t, _ in pairs])).long()

    def boxes(self, pairs, flip: bool) -> tuple[list, list, list]:
        """The current frames' boxes (mirrored if `flip`), detection classes (label - 1) and
        ignore flags, one array per pair."""
        width = self.clips[0].frames.shape[2]
        frames = [(self.clips[c], t) for c, t, _ in pairs]
        boxes = [clip.boxes[t] for clip, t in frames]
        if flip:
            boxes = [flip_boxes(b, width) for b in boxes]
        return (boxes, [clip.box_classes[t] - 1 for clip, t in frames],
                [clip.box_ignore[t] for clip, t in frames])

    def cell_flows(self, pairs, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """True flow on the feature grid in cells [B,2,h,w] and a valid mask [B,h,w]: the mean
        pixel flow over each cell's valid pixels / stride; a cell is valid if ≥ 1/4 of it is."""
        flows, masks = [], []
        for c, t, k in pairs:
            flow, valid = self.clips[c].flow(t, k)
            _, h, w = flow.shape
            blocks = (h // stride, stride, w // stride, stride)
            v = valid.reshape(blocks).astype(np.float32).sum((1, 3))
            f = (flow * valid).reshape((2,) + blocks).sum((2, 4)) / np.maximum(v, 1)
            flows.append(f / stride)
            masks.append(v >= stride * stride / 4)
        return torch.from_numpy(np.stack(flows)), torch.from_numpy(np.stack(masks))


def hflip(pairs_tensors: list[torch.Tensor], flow: torch.Tensor | None = None):
    """Mirror images/labels (last dim) and negate the flow's x component."""
    out = [t.flip(-1) for t in pairs_tensors]
    if flow is not None:
        flow = flow.flip(-1)
        flow = torch.stack((-flow[:, 0], flow[:, 1]), 1)
    return out, flow


def epe(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    err = (pred - target).norm(dim=1)
    return (err * mask).sum() / mask.sum().clamp(min=1)


def cosine_lr(base: float, it: int, total: int, warmup: int = 50) -> float:
    if it < warmup:
        return base * (it + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def parameters_for(model: DFF, stage: str):
    if stage == "flow":
        return [p for p in model.flownet.parameters() if p.requires_grad]
    if stage in ("seg", "det"):
        return list(model.trunk.parameters()) + list(model.head.parameters())
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: DFF, data: TrainData, stage: str, pairs, device, flow_loss: float,
               flip: bool, size_weight: float = 0.1,
               generator: torch.Generator | None = None) -> dict:
    """One batch's loss and its terms. `generator` draws R-FCN's anchor and RoI samples (a
    fixed seed when None)."""
    cur, key = data.images(pairs, 1), data.images(pairs, 2)
    stats = {}
    if stage == "flow":
        flow_t, mask = data.cell_flows(pairs, model.config.stride)
        if flip:
            (cur, key, mask), flow_t = hflip([cur, key, mask], flow_t)
        flow, _ = model.flow(cur.to(device), key.to(device))
        loss = epe(flow, flow_t.to(device), mask.to(device))
        stats["epe_cells"] = loss.item()
        return {"loss": loss, **stats}
    detect = model.config.task == DETECTION
    labels = None if detect else data.labels(pairs)
    if flip:
        cur, key = hflip([cur, key])[0]
        labels = None if detect else labels.flip(-1)
    if stage in ("seg", "det"):
        raw = model.task(model.features(cur.to(device)))
    else:
        key_feat = model.features(key.to(device))
        flow, scale = model.flow(cur.to(device), key.to(device))
        from dff.models.warp import flow_warp

        raw = model.task(flow_warp(key_feat, flow, scale))
    if detect and model.config.head == "rfcn":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        terms = rfcn_loss(raw, *data.boxes(pairs, flip), model.head,
                          (cur.shape[2], cur.shape[3]), gen)
        loss = terms.pop("loss")
        stats |= {k: v.item() for k, v in terms.items()}
    elif detect:
        stride = model.head.out_stride
        targets = detection_targets(*data.boxes(pairs, flip), model.config.num_classes,
                                    (cur.shape[2] // stride, cur.shape[3] // stride), stride)
        terms = detection_loss(raw, targets, size_weight=size_weight)
        loss = terms.pop("loss")
        stats |= {k: v.item() for k, v in terms.items()}
    else:
        loss = F.cross_entropy(raw, labels.to(device), weight=data.class_weights.to(device))
        stats["ce"] = loss.item()
    if stage == "dff" and flow_loss > 0:
        flow_t, mask = data.cell_flows(pairs, model.config.stride)
        if flip:
            (mask,), flow_t = hflip([mask], flow_t)
        f_loss = epe(flow, flow_t.to(device), mask.to(device))
        stats["epe_cells"] = f_loss.item()
        loss = loss + flow_loss * f_loss
    return {"loss": loss, **stats}


def init_from(model: DFF, path: str, head: bool = False) -> dict:
    """Copy the trunk and flow net of checkpoint `path` into `model`, and with `head` its task
    head too (fine-tuning a trained model); its config must match on INIT_FIELDS, and with
    `head` on HEAD_FIELDS as well. Returns what the meta records about it."""
    blob = read_checkpoint(path)
    for name in INIT_FIELDS + (HEAD_FIELDS if head else ()):
        theirs, ours = blob["config"].get(name), getattr(model.config, name)
        if theirs != ours:
            fix = ("--init-head needs a checkpoint of the same task and head (same --task, "
                   "--head and --head-* options)" if name in HEAD_FIELDS else
                   "--init needs a checkpoint of the same architecture (same --config)")
            raise DffError(f"{path}: field 'config.{name}' is {theirs!r}, but the model being "
                           f"trained has {ours!r}; {fix}")
    prefixes = ("trunk.", "flownet.") + (("head.",) if head else ())
    parts = {k: v for k, v in blob["state_dict"].items() if k.startswith(prefixes)}
    missing = [k for k in model.state_dict() if k.startswith(prefixes) and k not in parts]
    if missing:
        raise DffError(f"{path}: no weights for {missing[:2]}; --init needs a dff-train "
                       "checkpoint of the same architecture")
    model.load_state_dict(parts, strict=False)
    return {"init": str(path), "init_sha256": file_sha256(path),
            "init_task": blob["config"].get("task"), "init_head": head}


def train(config: DFFConfig, state_path: str | Path, *, iters: dict[str, int],
          lrs: dict[str, float], seed: int = 0, clips: int = 96, frames: int = 40,
          batch: int = 8, max_key_offset: int = MAX_KEY_OFFSET, flow_loss: float = 0.0,
          size_weight: float = 0.1, save_every: int = 100, init: str | None = None,
          init_head: bool = False, resume: bool = False, device: str = "auto",
          progress: bool = True) -> tuple[DFF, dict]:
    """Train a DFF of `config` through its three stages (`iters` and `lrs` per stage), saving
    the state to `state_path` every `save_every` iterations (`resume` continues from it).
    Returns the model and what its checkpoint's meta records about the run."""
    from tqdm import tqdm

    state_path = Path(state_path)
    device = torch.device(device if device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = DFF(config).to(device)
    stages = stages_for(config.task)
    init_meta = init_from(model, init, head=init_head) if init else {}
    stage_idx, start_it, log = 0, 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        stage_idx, start_it, log = state["stage"], state["iteration"], state["log"]
        print(f"resumed {state_path}: stage {stages[stage_idx]}, iteration {start_it}")
    data = TrainData(clips, frames, tuple(config.input_size), seed, len(CLASS_NAMES),
                     progress=progress)
    t0 = time.time()
    for si in range(stage_idx, len(stages)):
        stage = stages[si]
        total = iters[stage]
        params = parameters_for(model, stage)
        opt = torch.optim.AdamW(params, lr=lrs[stage], weight_decay=1e-4)
        if si == stage_idx and start_it and "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        first = start_it if si == stage_idx else 0
        model.train()
        if stage == "dff":  # as the original: BN statistics frozen while training end to end
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        bar = tqdm(range(first, total), desc=f"stage {si + 1}/3 {stage}", initial=first,
                   total=total, disable=not progress)
        running: dict[str, float] = {}
        for it in bar:
            rng = np.random.default_rng([seed, si, it])
            pairs = data.sample_pairs(rng, batch, max_key_offset)
            if stage in ("seg", "det"):  # per-frame training: current frame only
                pairs = [(c, t, t) for c, t, _ in pairs]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lrs[stage], it, total)
            flip = bool(rng.integers(2))
            gen = None  # R-FCN's anchor and RoI samples; only its runs draw the seed, so
            if model.config.head == "rfcn":  # every other run draws what it always did
                gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            stats = train_step(model, data, stage, pairs, device, flow_loss, flip=flip,
                               size_weight=size_weight, generator=gen)
            opt.zero_grad(set_to_none=True)
            stats["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            for k, v in stats.items():
                v = float(v.item() if torch.is_tensor(v) else v)
                running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if (it + 1) % save_every == 0 or it + 1 == total:
                log.append({"stage": stage, "iteration": it + 1, **running,
                            "elapsed_s": round(time.time() - t0, 1)})
                nxt = (si, it + 1) if it + 1 < total else (si + 1, 0)
                atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "stage": nxt[0], "iteration": nxt[1], "log": log},
                                  state_path)
    model.eval()
    return model, {"seed": seed, "iterations": iters, "clips": clips, "frames": frames,
                   "max_key_offset": max_key_offset,
                   "train_seconds": round(time.time() - t0, 1), "log": json.dumps(log),
                   **init_meta}
