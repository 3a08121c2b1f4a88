"""A small generic flow net for real footage (issue 23; DESIGN.md §20).

The shipped FlowNet-S (models/flownet.py) learnt its flow on synthetic shapes and does not
transfer to real video. RealFlowNet is pretrained without labels on real frames
(models/pretrain_flow.py: real frames moved along known affine and layered motions, and OpenCV
DIS on real frame pairs as pseudo ground truth) and is cheap enough for a CPU. Version 4, a
three-level pyramid:

- a shared (siamese) encoder of stride-2 3x3 convs down to 1/32; the 1/8, 1/16 and 1/32 maps
  end in a linear conv (the features correlated);
- at each level (`Level`) a cost volume: the current frame's features against the key frame's
  shifted by every (dx, dy) in ±radius cells, both scaled to unit RMS per cell first (`unit`:
  version 4; faint texture, as on a bare floor, then matches as surely as strong texture),
  written as slices of the zero-padded key map (constant bounds, counted from its end), a
  product and a channel mean (standard ONNX: Pad, Slice, Concat, Mul, ReduceMean); the level's
  flow is the flow from the level above,
  plus the cost volume's soft-argmax (the expected displacement under a softmax over the
  (2r+1)^2 candidates), plus a residual from three small convs on the cost volume, the
  features and that flow;
- 1/32 searches ±RADIUS cells (±96 px); 1/16 and 1/8 first warp the key frame's features along
  the flow from above, upsampled ×2 (GridSample, models/warp.py), and search ±LOCAL cells
  around it (±32 and ±16 px): each cell's flow comes from its own match, and the decoders
  correct it rather than make it;
- the output at the stride's grid: the 1/8 flow (in pixels; 1/16 of the image at input
  scale 0.5) resized bilinearly up or average-pooled down to 1/stride, then turned into
  feature cells (current → key, (dx, dy): FlowWarp's convention, models/warp.py);
- DFF's scale head: a 1x1 conv from the last decoder's features, weight 0 and frozen bias 1,
  so scale starts at exactly 1 (pretraining leaves it there), resized to the grid likewise;
  in eval mode a head still at that start is written as the constant 1 (`scale_is_one`: the
  same values without the conv and the resize).

`input_scale` (1, 0.5, 0.25) shrinks both images before the net, by 2x2 averages (`halve`):
cheaper (about half the flow graph's time at 288x352), and the motions it sees are smaller,
but on small frames the coarsest cost volume is then a few cells and the flow coarser
(`auto_input_scale` picks 0.5 from 512 px up; dff-adapt --input-scale chooses).
The weights carry a `version` buffer; load_realflow refuses those of another version.

Input: both images normalised as (pixels − FLOW_MEAN) / FLOW_STD on the 0..255 scale (i.e.
pixels/255 − 0.5), [N,3,H,W] with H, W multiples of the stride. The exported graph has only
ops TensorRT's ONNX parser imports (GridSample among them, as in warp.onnx).

`load_realflow(stride, channels)` builds the net and loads the shipped weights
(models/weights/realflow.pth: everything but the scale head, which depends on `channels`), or
other weights (a file, or a state dict such as a dff-adapt checkpoint's net).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from dff.models.warp import flow_warp
from torch import nn

FLOW_MEAN = (127.5, 127.5, 127.5)  # 0..255 scale: pixels/255 − 0.5
FLOW_STD = (255.0, 255.0, 255.0)
STRIDES = (4, 8, 16, 32)
INPUT_SCALES = (1.0, 0.5, 0.25)  # the images average-pooled by 1, 2 or 4 before the net
AUTO_HALF = 512  # auto_input_scale: 0.5 from this shorter side on (below it, the coarse cost
# volumes of a half-size image are a few cells, mostly padding, and the flow degrades)
RADIUS = 3  # the coarsest cost volume's search, in 1/32 cells (±96 px)
LOCAL = 2  # each finer level's search around the flow from above, in its cells (±32 px at
# 1/16, ±16 px at 1/8)
WIDTHS = (8, 16, 24, 32, 48)  # encoder: 1/2, 1/4, 1/8, 1/16, 1/32
DECODER = 32
EPS = 1e-4  # unit(): a cell of RMS 0.01 (typical cells: 0.1 to 0.8) is not scaled up
VERSION = 4  # a persistent buffer: weights of an earlier version do not load
WEIGHTS = Path(__file__).resolve().parent / "weights" / "realflow.pth"


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1, inplace=True))


def _match(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop an upsampled map to `ref`'s size (stride-2 convs round up)."""
    return x[:, :, : ref.shape[2], : ref.shape[3]]


def _end(i: int, k: int) -> int | None:
    """The end of the i-th of k shifted windows over a map padded by k - 1, counted from the
    map's end: a constant, so the exported Slice needs no arithmetic on the map's size."""
    return i - (k - 1) or None


def cost_volume(cur: torch.Tensor, key: torch.Tensor, radius: int) -> torch.Tensor:
    """[N,(2r+1)^2,h,w]: mean over channels of cur(p) · key(p + d) for every d = (dx, dy) in
    ±radius (dy outer, dx inner), zero outside the key map."""
    h, w = cur.shape[2], cur.shape[3]
    k = 2 * radius + 1
    padded = F.pad(key, (radius, radius, radius, radius))
    # the shifts in two passes, dx then dy: 2k Slices and two Concats where one Slice per
    # shift took k^2 (99 Slice nodes in all three levels); the same values, dy outer, dx inner
    cols = torch.cat([padded[..., dx: _end(dx, k)] for dx in range(k)], 1)  # [N,k*C,h+2r,w]
    shifted = torch.cat([cols[:, :, dy: _end(dy, k)] for dy in range(k)], 1)  # [N,k*k*C,h,w]
    # then one product and mean: a product per shift runs about 10 % faster on ONNX Runtime
    # CPU but has 1.8x the nodes and takes 1.8x as long to export
    n, c = cur.shape[0], cur.shape[1]
    return (shifted.view(n, k * k, c, h, w) * cur.unsqueeze(1)).mean(2)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Each cell's feature vector scaled to unit RMS over the channels (EPS keeps a featureless
    cell's small): the cost volume then measures how alike two cells are, not how much
    contrast they have."""
    return x * torch.rsqrt((x * x).mean(1, keepdim=True) + EPS)


def softmax1(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, written out: ONNX Runtime's Softmax on a non-last axis transposes
    around it and took 1.4x as long on the 1/8 level's cost volume (one thread)."""
    e = torch.exp(x - x.amax(1, keepdim=True))
    return e / e.sum(1, keepdim=True)


class Level(nn.Module):
    """One level of the pyramid: the current frame's features against the key frame's (warped
    along the flow from the level above, if any) over ±radius cells; the flow is that flow plus
    the cost volume's soft-argmax (the expected displacement under a softmax over the
    candidates) plus a small decoder's residual. Flows in this level's cells."""

    def __init__(self, feat: int, radius: int, width: int = DECODER):
        super().__init__()
        n = (2 * radius + 1) ** 2
        self.radius = radius
        self.temperature = nn.Parameter(torch.tensor(10.0))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        self.register_buffer("dx", offsets.repeat(2 * radius + 1).view(1, n, 1, 1),
                             persistent=False)
        self.register_buffer("dy", offsets.repeat_interleave(2 * radius + 1).view(1, n, 1, 1),
                             persistent=False)
        self.dec1 = _conv(n + feat + 2, width, k=1)
        self.dec2 = _conv(width, width)
        self.dec3 = _conv(width, width)
        self.out = nn.Conv2d(width, 2, 3, 1, 1)

    def forward(self, cur: torch.Tensor, key: torch.Tensor, flow: torch.Tensor | None):
        if flow is not None:
            key = flow_warp(key, flow)
        corr = cost_volume(unit(cur), unit(key), self.radius)
        prob = softmax1(corr * self.temperature)
        base = torch.cat(((prob * self.dx).sum(1, keepdim=True),
                          (prob * self.dy).sum(1, keepdim=True)), 1)
        if flow is not None:
            base = base + flow
        hid = self.dec3(self.dec2(self.dec1(torch.cat((corr, cur, base), 1))))
        return base + self.out(hid), hid


def halve(x: torch.Tensor) -> torch.Tensor:
    """The 2x2 average of an image of even size, as a bilinear resize to half size (the same
    values: each output samples the middle of its 2x2 block); ONNX Runtime's Resize took 0.12
    ms where its AveragePool took 0.42 (3x288x352, one thread)."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


def _up(flow: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A flow in cells of one level → the next finer level's cells and grid."""
    return _match(F.interpolate(flow * 2.0, scale_factor=2.0, mode="bilinear",
                                align_corners=False), like)


class RealFlowNet(nn.Module):
    """forward(x, key_x) on normalised images → (flow [N,2,H/stride,W/stride] in cells,
    scale [N,channels,H/stride,W/stride])."""

    flow_mean = FLOW_MEAN
    flow_std = FLOW_STD

    def __init__(self, stride: int = 16, channels: int = 1, input_scale: float = 1.0):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"RealFlowNet: stride {stride}; choose one of {STRIDES}")
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"RealFlowNet: input scale {input_scale}; choose one of "
                             f"{INPUT_SCALES}")
        self.stride, self.channels = stride, channels
        self.input_scale = float(input_scale)
        c = WIDTHS
        self.enc1 = _conv(3, c[0], 2)
        self.enc2 = _conv(c[0], c[1], 2)
        self.enc3 = nn.Sequential(_conv(c[1], c[2], 2), nn.Conv2d(c[2], c[2], 3, 1, 1))
        self.enc4 = nn.Sequential(nn.LeakyReLU(0.1), _conv(c[2], c[3], 2),
                                  nn.Conv2d(c[3], c[3], 3, 1, 1))
        self.enc5 = nn.Sequential(nn.LeakyReLU(0.1), _conv(c[3], c[4], 2),
                                  nn.Conv2d(c[4], c[4], 3, 1, 1))
        self.level32 = Level(c[4], RADIUS)
        self.level16 = Level(c[3], LOCAL)
        self.level8 = Level(c[2], LOCAL)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        for level in (self.level32, self.level16, self.level8):  # residuals start small
            nn.init.normal_(level.out.weight, std=1e-3)
        self.register_buffer("version", torch.tensor(VERSION))  # saved with the weights
        self.predict_scale = nn.Conv2d(DECODER, channels, 1)
        nn.init.zeros_(self.predict_scale.weight)
        nn.init.ones_(self.predict_scale.bias)
        self.predict_scale.bias.requires_grad_(False)
        self._scale_one = True  # the head is at its start: scale_is_one
        self.register_load_state_dict_post_hook(self._read_head)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features at 1/8, 1/16 and 1/32 (linear: the features correlated)."""
        return self._coarser(self._encode8(x))

    def _encode8(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder to 1/8 (what a key frame's key_code holds)."""
        return self.enc3(self.enc2(self.enc1(x)))

    def _coarser(self, x8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A 1/8 map and the encoder's 1/16 and 1/32 maps from it."""
        x16 = self.enc4(x8)
        return x8, x16, self.enc5(x16)

    def pyramid(self, x: torch.Tensor, key_x: torch.Tensor):
        """The flow at 1/32, 1/16 and 1/8, in pixels, and the last decoder's features."""
        n = x.shape[0]
        f8, f16, f32 = self.encode(torch.cat((x, key_x), 0))  # one pass for both frames
        return self._levels((f8[:n], f16[:n], f32[:n]), (f8[n:], f16[n:], f32[n:]))

    def _levels(self, cur: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, ...]):
        """pyramid's levels on both frames' features at 1/8, 1/16 and 1/32."""
        flow32, _ = self.level32(cur[2], key[2], None)
        flow16, _ = self.level16(cur[1], key[1], _up(flow32, cur[1]))
        flow8, hid = self.level8(cur[0], key[0], _up(flow16, cur[0]))
        return (flow32 * 32.0, flow16 * 16.0, flow8 * 8.0), hid

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(round(math.log2(1 / self.input_scale))):
            x = halve(x)
        return x

    # the key frame's cache (DESIGN.md §3, flow_key.onnx): the key frame's 1/8 encoder map,
    # made once per key frame; a non-key frame then encodes itself alone
    key_channels = WIDTHS[2]

    def key_grid(self) -> dict[str, int]:
        """How key_code's grid follows from the image's H (and W): ceil(floor(H / shrink) /
        cell) (each halving floors, each stride-2 conv rounds up)."""
        return {"shrink": round(1 / self.input_scale), "cell": 8}

    def encode_key(self, key_x: torch.Tensor) -> torch.Tensor:
        """key_code [N,key_channels,hk,wk]: the key frame's encoder map at 1/8 of the net's
        input (normalised key image in, as forward takes it)."""
        return self._encode8(self._shrink(key_x))

    def forward_code(self, x: torch.Tensor, key_code: torch.Tensor):
        """forward(x, key_x) with the key frame given as encode_key(key_x): the same flow and
        scale (within float rounding; the encoder runs on one frame instead of two)."""
        cur = self.encode(self._shrink(x))
        # key_code has the 1/8 map's size; taken to it by a same-size (so exact) nearest
        # resize, which lets the export give key_code its own dims (hk, wk: not a linear
        # function of H)
        k8 = F.interpolate(key_code, size=cur[0].shape[2:], mode="nearest")
        flows, hid = self._levels(cur, self._coarser(k8))
        return self._output(flows, hid, x)

    def to_grid(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A 1/8 map of the net's input onto the stride's grid of `like` (the full-size
        image): the net's 1/8 is 1/(8 / input_scale) of the image, upsampled (bilinear) or
        average-pooled to 1/stride."""
        ratio = self.stride * self.input_scale / 8.0
        if ratio > 1:
            k = round(ratio)
            return F.avg_pool2d(x, k, k)
        if ratio < 1:
            x = F.interpolate(x, scale_factor=round(1 / ratio), mode="bilinear",
                              align_corners=False)
        return x[:, :, : like.shape[2] // self.stride, : like.shape[3] // self.stride]

    def train(self, mode: bool = True) -> RealFlowNet:
        super().train(mode)
        self._read_head()
        return self

    def _read_head(self, *_: object) -> None:
        head = self.predict_scale
        self._scale_one = bool(head.weight.eq(0).all()) and bool(head.bias.eq(1).all())

    def scale_is_one(self) -> bool:
        """In eval mode, whether the scale head is at its start (weight 0, bias 1), so that the
        scale field is exactly 1 (dff-adapt leaves it there unless --train-scale). Read from the
        weights on every eager call; an export traces without their values and takes what the
        last eval(), load_state_dict or eager call read (export_graph calls eval() just before
        it)."""
        if self.training:
            return False
        if not torch.compiler.is_exporting():
            self._read_head()
        return self._scale_one

    def forward(self, x: torch.Tensor, key_x: torch.Tensor):
        flows, hid = self.pyramid(self._shrink(x), self._shrink(key_x))
        return self._output(flows, hid, x)

    def _output(self, flows: tuple[torch.Tensor, ...], hid: torch.Tensor, x: torch.Tensor):
        """(flow, scale) on the stride's grid of the image `x` from pyramid's outputs."""
        flow = self.to_grid(flows[-1], x) * (1.0 / (self.stride * self.input_scale))
        if self.scale_is_one():
            # the same ones without the 1x1 conv and the resize to the grid (about 0.1 ms of
            # the flow graph at 288x352 and input scale 0.5, one thread)
            n, _, h, w = flow.shape
            return flow, flow.new_ones(()).expand(n, self.channels, h, w).contiguous()
        # the 1x1 head before the resampling (both linear, so the same map, at fewer cells)
        return flow, self.to_grid(self.predict_scale(hid), x)


def auto_input_scale(height: int, width: int) -> float:
    """The input scale for frames of this size: 0.5 from AUTO_HALF on the shorter side (as
    DIS runs at --dis-scale 0.5), else 1."""
    return 0.5 if min(height, width) >= AUTO_HALF else 1.0


def trunk_state(net: RealFlowNet) -> dict[str, torch.Tensor]:
    """The weights that do not depend on `channels`: all but the scale head."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("predict_scale.")}


def load_realflow(stride: int = 16, channels: int = 1,
                  weights: str | os.PathLike[str] | dict[str, torch.Tensor] | None = None,
                  input_scale: float = 1.0) -> RealFlowNet:
    """A RealFlowNet for `stride` with a scale head of `channels` (starting at 1) and the
    pretrained weights (default: the shipped models/weights/realflow.pth; or a file, or a
    state dict, whose scale head is left out), run on the images shrunk by `input_scale`."""
    net = RealFlowNet(stride, channels, input_scale=input_scale)
    if isinstance(weights, dict):
        state, weights = weights, "the weights given"
    else:
        state = torch.load(weights or WEIGHTS, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    missing, unexpected = net.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("predict_scale.")}, strict=False)
    missing = [k for k in missing if not k.startswith("predict_scale.")]
    if "version" in missing or int(net.version) != VERSION:
        found = "none (3 or earlier)" if "version" in missing else int(net.version)
        raise ValueError(f"load_realflow: {weights or WEIGHTS} holds RealFlowNet weights of "
                         f"version {found}, not {VERSION} (the cost volume changed); train "
                         "them again with this version")
    if missing or unexpected:
        raise ValueError(f"load_realflow: {weights or WEIGHTS} does not fit RealFlowNet "
                         f"(missing {missing}, unexpected {unexpected})")
    return net
