"""A small generic flow net for real footage (issue 23; DESIGN.md §20).

The shipped FlowNet-S (models/flownet.py) learnt its flow on synthetic shapes and does not
transfer to real video. RealFlowNet is pretrained without labels on real frames
(models/pretrain_flow.py: real frames moved by known affine motions, and OpenCV DIS on real
frame pairs as pseudo ground truth) and is cheap enough for a CPU:

- a shared (siamese) encoder, four stride-2 3x3 convs (1/2 … 1/16) and one more at 1/16;
- a cost volume at 1/16: the current frame's features against the key frame's shifted by
  every (dx, dy) in ±RADIUS cells (±64 px), written as slices of the zero-padded key map, a
  product and a channel mean (standard ONNX: Pad, Slice, Concat, Mul, ReduceMean);
- a coarse flow at 1/16: the cost volume's soft-argmax (the expected displacement under a
  softmax over the (2R+1)^2 candidates) plus a residual from a small conv decoder;
- a refinement at 1/8: the key frame's 1/8 features warped along the upsampled coarse flow
  (GridSample, models/warp.py), a local cost volume of the current frame's 1/8 features
  against them over ±LOCAL cells (±24 px), and with the upsampled flow, the decoder features
  and the current frame's own 1/8 features → a residual flow (precision and motion edges);
- the output at the stride's grid: the net's 1/8 flow (in pixels; 1/16 of the image at input
  scale 0.5) resized bilinearly up or average-pooled down to 1/stride, then turned into
  feature cells (current → key, (dx, dy): FlowWarp's convention, models/warp.py);
- DFF's scale head: a 1x1 conv from the refinement's features, weight 0 and frozen bias 1, so
  scale starts at exactly 1 (pretraining leaves it there), resized to the grid likewise.

`input_scale` (1, 0.5, 0.25) average-pools both images before the net: cheaper, and the
motions it sees are smaller, but on small frames the 1/16 cost volume is then a few cells
(`auto_input_scale` picks 0.5 from 512 px up).

Input: both images normalised as (pixels − FLOW_MEAN) / FLOW_STD on the 0..255 scale (i.e.
pixels/255 − 0.5), [N,3,H,W] with H, W multiples of the stride. The exported graph has only
ops TensorRT's ONNX parser imports (GridSample among them, as in warp.onnx).

`load_realflow(stride, channels)` builds the net and loads the shipped weights
(models/weights/realflow.pth: everything but the scale head, which depends on `channels`), or
other weights (a file, or a state dict such as a dff-adapt checkpoint's net).
"""

from __future__ import annotations

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
AUTO_HALF = 512  # auto_input_scale: 0.5 from this shorter side on (below it, the 1/16 cost
# volume of a half-size image is a few cells, mostly padding, and the flow degrades)
RADIUS = 4  # the cost volume's search, in 1/16 cells (±64 px)
LOCAL = 3  # the refinement's search around the coarse flow, in 1/8 cells (±24 px)
WIDTHS = (8, 16, 24, 32, 32)  # encoder: 1/2, 1/4, 1/8, 1/16, 1/16
DECODER = 48
REFINE = 32
WEIGHTS = Path(__file__).resolve().parent / "weights" / "realflow.pth"


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1, inplace=True))


def _match(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop an upsampled map to `ref`'s size (stride-2 convs round up)."""
    return x[:, :, : ref.shape[2], : ref.shape[3]]


def cost_volume(cur: torch.Tensor, key: torch.Tensor, radius: int) -> torch.Tensor:
    """[N,(2r+1)^2,h,w]: mean over channels of cur(p) · key(p + d) for every d = (dx, dy) in
    ±radius (dy outer, dx inner), zero outside the key map."""
    h, w = cur.shape[2], cur.shape[3]
    padded = F.pad(key, (radius, radius, radius, radius))
    shifted = [padded[:, :, dy: dy + h, dx: dx + w]
               for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    # one Concat and a reshape, then one product and mean: a product per shift runs about 10 %
    # faster on ONNX Runtime CPU but has 1.8x the nodes and takes 1.8x as long to export
    n, c = cur.shape[0], cur.shape[1]
    stacked = torch.cat(shifted, 1).view(n, len(shifted), c, h, w)
    return (stacked * cur.unsqueeze(1)).mean(2)


class RealFlowNet(nn.Module):
    """forward(x, key_x) on normalised images → (flow [N,2,H/stride,W/stride] in cells,
    scale [N,channels,H/stride,W/stride])."""

    flow_mean = FLOW_MEAN
    flow_std = FLOW_STD

    def __init__(self, stride: int = 16, channels: int = 1, radius: int = RADIUS,
                 input_scale: float = 1.0):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"RealFlowNet: stride {stride}; choose one of {STRIDES}")
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"RealFlowNet: input scale {input_scale}; choose one of "
                             f"{INPUT_SCALES}")
        self.stride, self.channels, self.radius = stride, channels, radius
        self.input_scale = float(input_scale)
        c = WIDTHS
        self.enc1 = _conv(3, c[0], 2)
        self.enc2 = _conv(c[0], c[1], 2)
        self.enc3 = _conv(c[1], c[2], 2)
        self.enc4 = _conv(c[2], c[3], 2)
        self.enc5 = nn.Conv2d(c[3], c[4], 3, 1, 1)  # linear: the features correlated
        n = (2 * radius + 1) ** 2
        self.temperature = nn.Parameter(torch.tensor(10.0))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        self.register_buffer("dx", offsets.repeat(2 * radius + 1).view(1, n, 1, 1),
                             persistent=False)
        self.register_buffer("dy", offsets.repeat_interleave(2 * radius + 1).view(1, n, 1, 1),
                             persistent=False)
        self.dec1 = _conv(n + c[4] + 2, DECODER, k=1)
        self.dec2 = _conv(DECODER, DECODER)
        self.dec3 = _conv(DECODER, 32)
        self.coarse = nn.Conv2d(32, 2, 3, 1, 1)
        self.ref1 = _conv(c[2] + 32 + 2 + (2 * LOCAL + 1) ** 2, REFINE, k=1)
        self.ref2 = _conv(REFINE, REFINE)
        self.ref3 = nn.Sequential(nn.Conv2d(REFINE, REFINE, 3, 1, 2, dilation=2),
                                  nn.LeakyReLU(0.1, inplace=True))
        self.fine = nn.Conv2d(REFINE, 2, 3, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        for head in (self.coarse, self.fine):  # residuals start small
            nn.init.normal_(head.weight, std=1e-3)
        self.predict_scale = nn.Conv2d(REFINE, channels, 1)
        nn.init.zeros_(self.predict_scale.weight)
        nn.init.ones_(self.predict_scale.bias)
        self.predict_scale.bias.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features at 1/8 and 1/16."""
        x8 = self.enc3(self.enc2(self.enc1(x)))
        return x8, self.enc5(self.enc4(x8))

    def pyramid(self, x: torch.Tensor, key_x: torch.Tensor):
        """The flow at 1/16 and at 1/8, in pixels, and the refinement's features at 1/8."""
        n = x.shape[0]
        f8, f16 = self.encode(torch.cat((x, key_x), 0))  # one pass for both frames
        cur8, key8, cur16, key16 = f8[:n], f8[n:], f16[:n], f16[n:]
        corr = cost_volume(cur16, key16, self.radius)
        prob = torch.softmax(corr * self.temperature, 1)
        base = torch.cat(((prob * self.dx).sum(1, keepdim=True),
                          (prob * self.dy).sum(1, keepdim=True)), 1)  # 1/16 cells
        hid = self.dec3(self.dec2(self.dec1(torch.cat((corr, cur16, base), 1))))
        flow16 = (base + self.coarse(hid)) * 16.0  # px
        up = _match(F.interpolate(torch.cat((flow16 * (1.0 / 16.0), hid), 1), scale_factor=2.0,
                                  mode="bilinear", align_corners=False), cur8)
        warped = flow_warp(key8, up[:, :2] * 2.0)  # 1/16 cells -> 1/8 cells
        local = cost_volume(cur8, warped, LOCAL)
        r = self.ref3(self.ref2(self.ref1(torch.cat((cur8, up, local), 1))))
        flow8 = (up[:, :2] + self.fine(r)) * 16.0  # px
        return flow16, flow8, r

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

    def forward(self, x: torch.Tensor, key_x: torch.Tensor):
        small, small_key = x, key_x
        if self.input_scale != 1:
            k = round(1 / self.input_scale)
            small, small_key = F.avg_pool2d(x, k, k), F.avg_pool2d(key_x, k, k)
        _, flow8, r = self.pyramid(small, small_key)
        flow = self.to_grid(flow8, x) * (1.0 / (self.stride * self.input_scale))
        # the 1x1 head before the resampling (both linear, so the same map, at fewer cells)
        return flow, self.to_grid(self.predict_scale(r), x)


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
    if missing or unexpected:
        raise ValueError(f"load_realflow: {weights or WEIGHTS} does not fit RealFlowNet "
                         f"(missing {missing}, unexpected {unexpected})")
    return net
