"""N_flow: FlowNet-S on the half-resolution frame pair, with the flow and scale heads of DFF.

Layout and constants follow the original DFF (DESIGN.md §4): input = [current, key] / 255
(6 channels, mean-subtracted as the original's data layer does) average-pooled 2×2; the
FlowNet-S encoder and deconv/refine decoder; the last concat is average-pooled once more
so the outputs land on the stride-16 feature grid; flow = conv × 2.5 in feature cells
(current → key); scale = sibling 1×1 conv with C outputs, weight 0 and frozen bias 1, so
training starts from scale = 1. QualityHead, optional, predicts from the pooled last concat and
the flow how far the warped features will be from the frame's own (trained by
dff.models.quality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# FlowNet-S encoder widths at width = 1 (as the released code): conv1 … conv6_1.
FULL_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512, 1024, 1024)
# FlowNet predicts flow/20 in its input's pixels; the feature grid is 1/8 of that input.
FLOW_SCALE = 20.0 / 8.0


def _conv(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1, inplace=True))


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.1, inplace=True))


def _avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, stride 2, written as a depthwise convolution: the same numbers,
    but ONNX Runtime runs it in half the time of AveragePool. Pooling comes before the
    normalisation (affine, so it commutes) to normalise a quarter of the pixels."""
    weight = x.new_full((x.shape[1], 1, 2, 2), 0.25)
    return F.conv2d(x, weight, stride=2, groups=x.shape[1])


def _match(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop an upsampled map to its skip connection's size (stride-2 convs round up)."""
    return x[:, :, : ref.shape[2], : ref.shape[3]]


class FlowNetS(nn.Module):
    """FlowNet-S with DFF's heads. ``width`` scales every layer: 1 = released code,
    0.5 = the paper's "FlowNet Half"; smaller widths make CPU-sized models."""

    def __init__(self, feat_channels: int, width: float = 0.5):
        super().__init__()
        c = [max(4, round(w * width)) for w in FULL_WIDTHS]
        self.conv1 = _conv(6, c[0], 7, 2)
        self.conv2 = _conv(c[0], c[1], 5, 2)
        self.conv3 = _conv(c[1], c[2], 5, 2)
        self.conv3_1 = _conv(c[2], c[3], 3, 1)
        self.conv4 = _conv(c[3], c[4], 3, 2)
        self.conv4_1 = _conv(c[4], c[5], 3, 1)
        self.conv5 = _conv(c[5], c[6], 3, 2)
        self.conv5_1 = _conv(c[6], c[7], 3, 1)
        self.conv6 = _conv(c[7], c[8], 3, 2)
        self.conv6_1 = _conv(c[8], c[9], 3, 1)
        # decoder: predict flow, upsample features and flow, concat with the skip, repeat
        d5, d4, d3, d2 = c[6], c[4] // 2, c[2] // 2, c[1] // 2
        self.predict6 = nn.Conv2d(c[9], 2, 3, 1, 1)
        self.deconv5 = _deconv(c[9], d5)
        self.up6 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        cat5 = c[7] + d5 + 2
        self.predict5 = nn.Conv2d(cat5, 2, 3, 1, 1)
        self.deconv4 = _deconv(cat5, d4)
        self.up5 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        cat4 = c[5] + d4 + 2
        self.predict4 = nn.Conv2d(cat4, 2, 3, 1, 1)
        self.deconv3 = _deconv(cat4, d3)
        self.up4 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        cat3 = c[3] + d3 + 2
        self.predict3 = nn.Conv2d(cat3, 2, 3, 1, 1)
        self.deconv2 = _deconv(cat3, d2)
        self.up3 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        cat2 = c[1] + d2 + 2
        self.cat_channels = cat2  # the pooled last concat's, which a quality head reads
        # DFF's heads on the pooled last concat
        self.predict_flow = nn.Conv2d(cat2, 2, 3, 1, 1)
        self.predict_scale = nn.Conv2d(cat2, feat_channels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # FlowNet's init: He for leaky ReLU, so the signal survives ten encoder layers
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.predict_scale.weight)
        nn.init.ones_(self.predict_scale.bias)
        self.predict_scale.bias.requires_grad_(False)

    def forward(self, image: torch.Tensor, key_image: torch.Tensor,
                mean: torch.Tensor | None = None, features: bool = False):
        """image, key_image: float [N,3,H,W] on the 0..255 scale, `mean` [1,3,1,1] (or None)
        subtracted from both → flow [N,2,H/16,W/16] (cells), scale [N,C,H/16,W/16], and with
        `features` also the pooled last concat [N,cat_channels,H/16,W/16] they come from."""
        x = _avg_pool2(torch.cat((image, key_image), 1))
        if mean is not None:
            x = x - mean.repeat(1, 2, 1, 1)
        x = x * (1.0 / 255.0)
        x2 = self.conv2(self.conv1(x))
        x3 = self.conv3_1(self.conv3(x2))
        x4 = self.conv4_1(self.conv4(x3))
        x5 = self.conv5_1(self.conv5(x4))
        x6 = self.conv6_1(self.conv6(x5))
        cat = x6
        for predict, deconv, up, skip in (
            (self.predict6, self.deconv5, self.up6, x5),
            (self.predict5, self.deconv4, self.up5, x4),
            (self.predict4, self.deconv3, self.up4, x3),
            (self.predict3, self.deconv2, self.up3, x2),
        ):
            flow = predict(cat)
            cat = torch.cat((skip, _match(deconv(cat), skip), _match(up(flow), skip)), 1)
        cat = F.avg_pool2d(cat, 2, ceil_mode=True)
        if features:
            return self.predict_flow(cat) * FLOW_SCALE, self.predict_scale(cat), cat
        return self.predict_flow(cat) * FLOW_SCALE, self.predict_scale(cat)


def outside_distance(flow: torch.Tensor) -> torch.Tensor:
    """[N,1,h,w]: how far, in cells, each cell's sampling point (x + fx, y + fy) lies outside
    the key map's extent [-0.5, w - 0.5] × [-0.5, h - 0.5] (0 inside)."""
    h, w = flow.shape[2], flow.shape[3]
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, 1, -1)
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, 1, -1, 1)
    x = xs + flow[:, :1]
    y = ys + flow[:, 1:2]
    return (F.relu(-0.5 - x) + F.relu(x - (w - 0.5)) + F.relu(-0.5 - y)
            + F.relu(y - (h - 0.5)))


class QualityHead(nn.Module):
    """Per-cell predicted error from the flow net's last features and its flow; mean → [N,1]."""

    def __init__(self, cat_channels: int, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(cat_channels + 4, hidden, 3, 1, 1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def cells(self, cat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        magnitude = torch.sqrt(flow[:, :1] ** 2 + flow[:, 1:2] ** 2)
        x = torch.cat((cat, flow, magnitude, outside_distance(flow)), 1)
        return F.softplus(self.out(F.leaky_relu(self.conv(x), 0.1)))

    def forward(self, cat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return self.cells(cat, flow).mean(dim=(2, 3)).view(-1, 1)
