"""Pretrain RealFlowNet (models/realflow.py) on real frames without labels (issue 23).

Frames: bikes.mp4 and vtest.avi from dff.data.real (never the held-out clip,
carphone_pristine.mp4). vtest's last 20 % of frames is held out for the progress bar's EPE.
Each training sample is a random crop (192x320) of a current/key pair with a known flow
(current → key, px):

- (a) ``affine``: a real frame and the same frame moved by a random affine motion (translation
  up to ±56 px, scale ±8 %, rotation ±4°, shear ±3 %; each amplitude its maximum times u³, u
  uniform in −1..1, so mostly small as between video frames, or for ``--large-share`` of the
  samples times u): exact flow, real texture; ``--layered-share`` of these samples are
  ``layered`` instead: the frame resampled along an affine background with 1 to 4 regions in
  front, each moving on its own (motion edges inside the frame, as between depths);
- (b) ``dis``: two real frames 1 to 10 apart with OpenCV DIS (medium preset) flow as pseudo
  ground truth; for half of them the key crop is also offset by up to ±32 px, which adds that
  offset to the flow.

Both images get a small random gain, offset and noise; with ``--low-contrast`` a share of the
samples have both images' contrast scaled down to as little as LOW_CONTRAST (faint texture).
``--half-share`` of the batches are shrunk 2x, images and flow, as the net sees frames at
input scale 0.5; ``--dis-share`` sets the share of DIS samples (0.5). Loss: the end-point error (px)
against the target averaged over each cell, at 1/8 (the net's shared output resolution) plus
half that at 1/16 and a quarter at 1/32 (the pyramid's coarser levels). AdamW, cosine
learning rate over the time budget.

The run checkpoints itself to ``OUT.ckpt`` every minute and resumes from it when started
again with the same --out (the budget counts the time already spent); at the end it writes
the trunk's weights (no scale head: load_realflow builds it) to OUT.

    python -m dff.models.pretrain_flow --out v3.pth --minutes 75 \
        --lr 2e-3 --large-share 0.5 --layered-share 0.6      # 1: from scratch (version 3's net)
    python -m dff.models.pretrain_flow --out v4.pth --init v3.pth --minutes 45 --lr 5e-4 \
        --large-share 0.5 --layered-share 0.6 --dis-share 0.25 --low-contrast 0.3 \
        --half-share 0.3                                      # 2: version 4
    python -m dff.models.pretrain_flow --out models/weights/realflow.pth --init v4.pth \
        --minutes 35 --threads 2 --seed 3 --lr 5e-4 --large-share 0.5 --layered-share 0.6 \
        --dis-share 0.25 --low-contrast 0.3 --half-share 0.3  # 3: the shipped weights

Stages 1 and 2 ran at one thread, beside other work; at two threads their steps take about 50
and 31 minutes, so the three take about 116 of the 2 hours on 2 cores (docs/MEASUREMENTS.md,
"Version 4, a third stage at two threads"). Stage 1 ran version 3's net (commit a4378e0),
which lacks version 4's unit-RMS scaling; today's code runs version 4's.

``--init`` starts from other weights (a weights file or a checkpoint; the tensors whose name and
shape fit, whatever their version): how versions 2 and 4 were made, in stages
(docs/MEASUREMENTS.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dff.models.realflow import RealFlowNet, halve, trunk_state

SOURCES = ("bikes.mp4", "vtest.avi")
HELD_OUT_FRACTION = 0.2  # vtest's last 20 % of frames: the held-out EPE
CROP = (192, 320)
MAX_SHIFT = 56.0
DIS_OFFSET = 32
MAX_GAP = 10
LOW_CONTRAST = 0.2  # to_batch's low_contrast: the least contrast kept


def read_frames(name: str, every: int = 1) -> list[np.ndarray]:
    """Every `every`-th frame of a real clip as RGB uint8 (never the held-out clip)."""
    import cv2
    from dff.data import real

    if name == real.HELD_OUT:
        raise ValueError(f"pretrain_flow: {name} is held out; it is never trained on")
    cap = cv2.VideoCapture(str(real.path(name)))
    frames, i = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        i += 1
    cap.release()
    return frames


@dataclass
class Clip:
    frames: list[np.ndarray]
    step: int  # source frames between consecutive stored frames


def load_clips() -> tuple[list[Clip], list[Clip]]:
    """(train, held-out): bikes whole, vtest's first 80 % (every 2nd frame) for training,
    its last 20 % (every 2nd frame) held out."""
    bikes = read_frames("bikes.mp4")
    vtest = read_frames("vtest.avi", every=2)
    cut = int(len(vtest) * (1 - HELD_OUT_FRACTION))
    return [Clip(bikes, 1), Clip(vtest[:cut], 2)], [Clip(vtest[cut:], 2)]


def dis_pairs(clips: list[Clip], count: int, rng: np.random.Generator):
    """`count` (current, key, flow current → key float16 [H,W,2] px) from DIS medium on frame
    pairs 1 to MAX_GAP source frames apart."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    out = []
    for _ in range(count):
        clip = clips[rng.integers(len(clips))]
        gap = int(rng.integers(1, MAX_GAP // clip.step + 1))
        i = int(rng.integers(len(clip.frames) - gap))
        a, b = clip.frames[i], clip.frames[i + gap]
        if rng.random() < 0.5:
            a, b = b, a
        flow = dis.calc(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY),
                        None)
        out.append((a, b, flow.astype(np.float16)))
    return out


def random_affine(rng: np.random.Generator, large_share: float = 0.0):
    """A random affine motion (A [2,2], t [2] px): scale ±8 %, rotation ±4°, shear ±3 %,
    translation ±MAX_SHIFT. Mostly small motions, as between video frames, up to the cost
    volume's reach: each amplitude is its maximum times u**3 (u uniform in -1..1),
    P(|t| < 4 px) ≈ 0.4; `large_share` of the draws use u itself (large as often as small)."""
    power = 1 if rng.random() < large_share else 3

    def amp(most: float, size: int | None = None):
        return most * rng.uniform(-1, 1, size) ** power

    s = math.exp(amp(0.08))
    r = math.radians(amp(4.0))
    sh = amp(0.03, 2)
    a = s * np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]]) \
        @ np.array([[1, sh[0]], [sh[1], 1]])
    return a, amp(MAX_SHIFT, 2)


def affine_sample(frame: np.ndarray, rng: np.random.Generator, crop=CROP,
                  large_share: float = 0.0):
    """(current, key, flow [H,W,2] px): a crop of `frame` and the frame moved by a random
    affine motion about the crop's centre, with the exact flow current → key. `large_share`
    of the samples draw their amplitudes uniformly (large motions as often as small)."""
    import cv2

    h, w = crop
    fh, fw = frame.shape[:2]
    y0, x0 = int(rng.integers(fh - h + 1)), int(rng.integers(fw - w + 1))
    a, t = random_affine(rng, large_share)
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    # key(q) = frame(o + c + A^-1 (q - c - t)): warpAffine with WARP_INVERSE_MAP
    ai = np.linalg.inv(a)
    m = np.hstack([ai, (np.array([x0, y0]) + c - ai @ (c + t))[:, None]]).astype(np.float64)
    key = cv2.warpAffine(frame, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    current = frame[y0:y0 + h, x0:x0 + w]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    px, py = xs - c[0], ys - c[1]
    flow = np.stack([a[0, 0] * px + a[0, 1] * py + c[0] + t[0] - xs,
                     a[1, 0] * px + a[1, 1] * py + c[1] + t[1] - ys], -1)
    return current, key, flow.astype(np.float32)


def _blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random region of a h x w crop (bool): an ellipse or a star-shaped polygon about a
    random centre, its radius 10 to 50 % of the crop's shorter side."""
    import cv2

    mask = np.zeros((h, w), np.uint8)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    radius = rng.uniform(0.1, 0.5) * min(h, w)
    if rng.random() < 0.5:
        axes = (int(radius), int(radius * rng.uniform(0.3, 1.0)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    else:
        n = int(rng.integers(5, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def layered_sample(frame: np.ndarray, rng: np.random.Generator, crop=CROP,
                   large_share: float = 0.0):
    """(current, key, flow [H,W,2] px): a crop of `frame` (the key) and a current frame that
    samples it along a random piecewise-smooth flow: an affine background, 1 to 4 regions each
    with its own affine motion in front of it, and for half the samples a smooth non-rigid
    term. Exact flow (current(p) = key(p + flow(p)), resampled with cv2.remap) and real
    texture, with motion edges inside the frame as between objects at different depths. The key
    is itself resampled at a random sub-pixel shift, so both images are equally smooth."""
    import cv2

    h, w = crop
    fh, fw = frame.shape[:2]
    y0, x0 = int(rng.integers(fh - h + 1)), int(rng.integers(fw - w + 1))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)

    def motion(centre: np.ndarray) -> np.ndarray:
        a, t = random_affine(rng, large_share)
        px, py = xs - centre[0], ys - centre[1]
        return np.stack([(a[0, 0] - 1) * px + a[0, 1] * py + t[0],
                         a[1, 0] * px + (a[1, 1] - 1) * py + t[1]], -1).astype(np.float32)

    flow = motion(np.array([(w - 1) / 2, (h - 1) / 2]))
    if rng.random() < 0.5:  # smooth non-rigid motion: coarse noise, bicubically upsampled
        coarse = rng.normal(0, rng.uniform(1, 8), (3, 5, 2)).astype(np.float32)
        flow = flow + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(1, 5))):
        mask = _blob(h, w, rng)
        if mask.any():
            centre = np.array([xs[mask].mean(), ys[mask].mean()])
            flow[mask] = motion(centre)[mask]
    shift = rng.uniform(-0.5, 0.5, 2).astype(np.float32)
    key = cv2.remap(frame, xs + (x0 + shift[0]), ys + (y0 + shift[1]), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT)
    current = cv2.remap(frame, xs + x0 + flow[..., 0], ys + y0 + flow[..., 1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT)
    return current, key, (flow - shift).astype(np.float32)


def synthetic_sample(frame: np.ndarray, rng: np.random.Generator, large_share: float,
                     layered_share: float):
    """A layered sample (`layered_share` of them) or one affine motion."""
    if rng.random() < layered_share:
        return layered_sample(frame, rng, large_share=large_share)
    return affine_sample(frame, rng, large_share=large_share)


def dis_sample(pair, rng: np.random.Generator, crop=CROP):
    """(current, key, flow px) from a DIS pair: a crop, and the key's crop offset by up to
    ±DIS_OFFSET px (the flow then minus the offset)."""
    a, b, flow = pair
    h, w = crop
    fh, fw = a.shape[:2]
    y0, x0 = int(rng.integers(fh - h + 1)), int(rng.integers(fw - w + 1))
    reach = DIS_OFFSET if rng.random() < 0.5 else 0  # half the pairs as they are
    dy = int(np.clip(rng.integers(-reach, reach + 1), -y0, fh - h - y0))
    dx = int(np.clip(rng.integers(-reach, reach + 1), -x0, fw - w - x0))
    f = flow[y0:y0 + h, x0:x0 + w].astype(np.float32) - np.array([dx, dy], np.float32)
    return a[y0:y0 + h, x0:x0 + w], b[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w], f


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] 0..255 → RealFlowNet's input (pixels/255 − 0.5)."""
    return rgb * (1.0 / 255.0) - 0.5


def to_batch(samples, rng: np.random.Generator | None = None, low_contrast: float = 0.0):
    """(current, key) normalised [N,3,H,W] and the flow [N,2,H,W] px, with a random gain,
    offset and noise per image where `rng` is given; and, for `low_contrast` of the samples,
    both images' contrast about their mean scaled by LOW_CONTRAST..1 (faint texture, as on a
    bare floor or wall)."""
    def tensor(i: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[i] for s in samples])).permute(0, 3, 1, 2) \
            .float().contiguous()

    cur, key, flow = tensor(0), tensor(1), tensor(2)
    if rng is not None:
        n = len(samples)
        if low_contrast:
            low = rng.random((n, 1, 1, 1)) < low_contrast
            c = torch.from_numpy(np.where(low, rng.uniform(LOW_CONTRAST, 1.0, (n, 1, 1, 1)),
                                          1.0)).float()
            m = cur.mean((1, 2, 3), keepdim=True)
            cur, key = (cur - m) * c + m, (key - m) * c + m
        jitter = []
        for img in (cur, key):
            gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
            off = torch.from_numpy(rng.uniform(-15, 15, (n, 1, 1, 1))).float()
            noise = torch.randn(img.shape) * float(rng.uniform(0, 3))
            jitter.append((img * gain + off + noise).clamp_(0, 255))
        cur, key = jitter
    return normalise(cur), normalise(key), flow


def epe_cells(pred: torch.Tensor, flow: torch.Tensor, cell: int) -> torch.Tensor:
    """Mean EPE (px) of `pred` [N,2,h,w] px against the dense `flow` averaged over cells."""
    target = F.avg_pool2d(flow, cell, cell)
    return torch.linalg.vector_norm(pred - target, dim=1).mean()


def held_out_set(clips: list[Clip], n: int = 16, seed: int = 1234, layered: bool = False):
    """A fixed batch from the held-out frames: half affine, half DIS pairs; or with `layered`,
    n layered samples (half of them with uniform amplitudes)."""
    rng = np.random.default_rng(seed)
    frames = [f for c in clips for f in c.frames]
    if layered:
        return to_batch([layered_sample(frames[int(rng.integers(len(frames)))], rng,
                                        large_share=0.5) for _ in range(n)])
    samples = [affine_sample(frames[int(rng.integers(len(frames)))], rng) for _ in range(n // 2)]
    samples += [dis_sample(p, rng) for p in dis_pairs(clips, n - n // 2, rng)]
    return to_batch(samples)


@torch.no_grad()
def held_out_epe(net: RealFlowNet, batch) -> float:
    """EPE (px) at stride 16 on the held-out batch."""
    was = net.training
    net.eval()
    cur, key, flow = batch
    flows, _ = net.pyramid(cur, key)
    out = float(epe_cells(F.avg_pool2d(flows[-1], 2, 2), flow, 16))
    net.train(was)
    return out


def pretrain(out: str | os.PathLike[str], minutes: float, batch_size: int = 8,
             lr: float = 2e-3, pool: int = 120, refresh: int = 200, seed: int = 0,
             threads: int = 1, progress: bool = True,
             init: str | os.PathLike[str] | None = None, large_share: float = 0.0,
             layered_share: float = 0.0, dis_share: float = 0.5, low_contrast: float = 0.0,
             half_share: float = 0.0) -> dict:
    """Train for `minutes` of wall time in all (resuming from OUT.ckpt), write the trunk's
    weights to `out`; returns {'steps', 'minutes', 'held_out_epe', 'layered_epe'}. `init`:
    weights to start from (each tensor whose name and shape match; the others keep their
    initialisation). `layered_share`: the share of the synthetic (not DIS) samples that are
    layered (layered_sample) rather than one affine motion. `dis_share`: the share of samples
    that are DIS pairs. `low_contrast`: the share of samples with faint texture (to_batch).
    `half_share`: the share of batches average-pooled 2x, images and flow (the net's input at
    input scale 0.5)."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train, held = load_clips()
    val, val_layered = held_out_set(held), held_out_set(held, layered=True)
    net = RealFlowNet(16, 1)
    if init is not None and not ckpt.exists():
        own = net.state_dict()
        start_from = torch.load(init, map_location="cpu", weights_only=False)
        start_from = start_from.get("model", start_from)  # a weights file or a checkpoint
        net.load_state_dict({k: v for k, v in start_from.items()
                             if k in own and own[k].shape == v.shape}, strict=False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr,
                            weight_decay=1e-4)
    step, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
        rng = np.random.default_rng(seed + step)
    budget = minutes * 60.0
    pairs = dis_pairs(train, pool, rng)
    frames = [f for c in train for f in c.frames]
    start, last_save = time.monotonic() - spent, time.monotonic()
    epe, layered = held_out_epe(net, val), held_out_epe(net, val_layered)
    with tqdm(total=round(budget), initial=round(spent), unit="s", dynamic_ncols=True,
              disable=not progress) as bar:  # closed on Ctrl-C too
        loss_avg = None
        net.train()
        while (elapsed := time.monotonic() - start) < budget:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
            samples = [synthetic_sample(frames[int(rng.integers(len(frames)))], rng, large_share,
                                        layered_share)
                       if rng.random() < 1.0 - dis_share
                       else dis_sample(pairs[int(rng.integers(len(pairs)))], rng)
                       for _ in range(batch_size)]
            cur, key, flow = to_batch(samples, rng, low_contrast)
            if half_share and rng.random() < half_share:  # as the net sees at input scale 0.5
                cur, key, flow = halve(cur), halve(key), halve(flow) * 0.5
            (flow32, flow16, flow8), _ = net.pyramid(cur, key)
            loss = epe_cells(flow8, flow, 8) + 0.5 * epe_cells(flow16, flow, 16) \
                + 0.25 * epe_cells(flow32, flow, 32)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            step += 1
            value = loss.item()
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            if step % refresh == 0:  # new DIS pairs now and then: more real motion seen
                pairs[int(rng.integers(len(pairs)))] = dis_pairs(train, 1, rng)[0]
            if step % 100 == 0:
                epe, layered = held_out_epe(net, val), held_out_epe(net, val_layered)
            bar.set_postfix(step=step, loss=f"{loss_avg:.2f}", held_out_epe=f"{epe:.2f}",
                            layered=f"{layered:.2f}")
            bar.update(round(time.monotonic() - start) - bar.n)
            if time.monotonic() - last_save > 60:
                _save_ckpt(ckpt, net, opt, step, time.monotonic() - start)
                last_save = time.monotonic()
    spent = time.monotonic() - start
    _save_ckpt(ckpt, net, opt, step, spent)
    epe, layered = held_out_epe(net, val), held_out_epe(net, val_layered)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.contiguous() for k, v in trunk_state(net).items()}, tmp)
    os.replace(tmp, out)
    return {"steps": step, "minutes": spent / 60, "held_out_epe": epe, "layered_epe": layered}


def _save_ckpt(path: Path, net, opt, step: int, seconds: float) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step,
                "seconds": seconds}, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":  # the documented `python -m dff.models.pretrain_flow`
    import sys

    from dff.commands.pretrain_flow import main

    sys.exit(main())
