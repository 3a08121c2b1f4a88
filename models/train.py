"""dff-train: the three training stages of DFF on the synthetic benchmark.

1. flow: pretrain N_flow on frame pairs with exact flow (end-point error on the feature grid);
2. seg:  train N_feat + N_task per frame (pixel cross-entropy), or `det` with --task detection
         (CenterNet's focal loss on centre heatmaps, L1 on size and offset; dff.models.detection;
         with --head rfcn R-FCN's RPN and RoI losses, dff.models.rfcn_loss);
3. dff:  train everything end to end: the key frame is 0..9 frames before the current one,
         its features are warped to the current frame, loss on the current frame only.

``--init CHECKPOINT`` starts the trunk and the flow net from a trained checkpoint of the same
architecture (e.g. the shipped segmentation model; then ``--iters-flow 0`` skips stage 1).

State is saved every ``--save-every`` iterations to OUT/state.pt (atomically), and
``--resume`` continues from it; sampling is seeded per (stage, iteration) so a resumed run
draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dff.data.synthetic import CLASS_NAMES, make_clip, train_seeds
from dff.models.checkpoint import (
    WEIGHTS_DTYPES,
    atomic_torch_save,
    file_sha256,
    read_checkpoint,
    save_checkpoint,
)
from dff.models.config import PRESETS, DFFConfig
from dff.models.detection import detection_loss, detection_targets, flip_boxes
from dff.models.dff import DFF
from dff.models.rfcn_loss import rfcn_loss

from dff.errors import DffError
from dff.tasks import DETECTION, KINDS

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


def build_config(args) -> DFFConfig:
    config = DFFConfig.from_dict(PRESETS[args.config].to_dict()).for_task(args.task)
    config.input_size = [args.height, args.width]
    config.key_interval = args.key_interval
    for name in ("head_subcell", "head_channels", "head_upsample", "head"):
        if getattr(args, name):
            setattr(config, name, getattr(args, name))
    return config


def run(args) -> Path:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = build_config(args)
    model = DFF(config).to(device)
    stages = stages_for(config.task)
    init_meta = init_from(model, args.init, head=args.init_head) if args.init else {}
    iters = {"flow": args.iters_flow, "seg": args.iters_seg, "det": args.iters_det,
             "dff": args.iters_dff}
    lrs = {"flow": args.lr_flow, "seg": args.lr, "det": args.lr, "dff": args.lr_dff}
    stage_idx, start_it, log = 0, 0, []
    state_path = out / "state.pt"
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        stage_idx, start_it, log = state["stage"], state["iteration"], state["log"]
        print(f"resumed {state_path}: stage {stages[stage_idx]}, iteration {start_it}")
    data = TrainData(args.clips, args.frames, (args.height, args.width), args.seed,
                     len(CLASS_NAMES), progress=not args.quiet)
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
                   total=total, disable=args.quiet)
        running: dict[str, float] = {}
        for it in bar:
            rng = np.random.default_rng([args.seed, si, it])
            pairs = data.sample_pairs(rng, args.batch, args.max_key_offset)
            if stage in ("seg", "det"):  # per-frame training: current frame only
                pairs = [(c, t, t) for c, t, _ in pairs]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lrs[stage], it, total)
            flip = bool(rng.integers(2))
            gen = None  # R-FCN's anchor and RoI samples; only its runs draw the seed, so
            if model.config.head == "rfcn":  # every other run draws what it always did
                gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            stats = train_step(model, data, stage, pairs, device, args.flow_loss, flip=flip,
                               size_weight=args.size_weight, generator=gen)
            opt.zero_grad(set_to_none=True)
            stats["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            for k, v in stats.items():
                v = float(v.item() if torch.is_tensor(v) else v)
                running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if (it + 1) % args.save_every == 0 or it + 1 == total:
                log.append({"stage": stage, "iteration": it + 1, **running,
                            "elapsed_s": round(time.time() - t0, 1)})
                nxt = (si, it + 1) if it + 1 < total else (si + 1, 0)
                atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "stage": nxt[0], "iteration": nxt[1], "log": log},
                                  state_path)
    model.eval()
    argv = sys.argv[1:] if getattr(args, "argv", None) is None else args.argv
    meta = {"command": shlex.join(["dff-train", *argv]), "seed": args.seed,
            "iterations": iters, "clips": args.clips, "frames": args.frames,
            "max_key_offset": args.max_key_offset,
            "train_seconds": round(time.time() - t0, 1), "log": json.dumps(log), **init_meta}
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
    args.argv = argv  # for the checkpoint's meta; None = sys.argv
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
        run(args)
    except DffError as e:
        if args.verbose:
            raise
        print(f"dff-train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
