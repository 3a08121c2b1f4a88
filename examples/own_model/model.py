"""A DFF model written the way a user would, unrelated to dff-trt's presets.

- `MobileTrunk`: a small MobileNetV2-style trunk (inverted residual blocks, depthwise 3×3
  convs, BatchNorm, ReLU6) at output stride 8, on ImageNet-normalised RGB;
- `TinyFlow`: a small flow net on the frame pair in [0, 1], flow in feature cells from the
  current frame to the key frame, and no scale field (it returns `(flow, None)`);
- `SegHead`: logits at the stride-8 grid; the exported graph resizes them to the image.

`build(checkpoint=None)` is the factory `dff-export --module examples.own_model.model:build`
calls: it returns `DFFModules`, the three modules with what their graphs need to know.
"""

from __future__ import annotations

import os

import torch
from torch import nn

STRIDE = 8
INPUT_SIZE = (96, 160)  # H, W: multiples of the stride
FEAT_CHANNELS = 32
# the pixel scale the modules expect, as (pixel - mean) / std with pixels in 0..255
FEATURE_MEAN = (123.675, 116.28, 103.53)  # ImageNet's mean and std, times 255
FEATURE_STD = (58.395, 57.12, 57.375)
FLOW_MEAN = (0.0, 0.0, 0.0)  # the flow net takes the pixels in [0, 1]
FLOW_STD = (255.0, 255.0, 255.0)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 linear projection (+ input)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1)] if expand != 1 else []
        layers += [conv_bn(mid, mid, 3, stride, groups=mid), conv_bn(mid, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileTrunk(nn.Module):
    """N_feat: x [N,3,H,W] normalised -> feat [N,C,H/8,W/8]."""

    def __init__(self, channels: int = FEAT_CHANNELS):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(3, 16, stride=2),                # /2
            InvertedResidual(16, 16, 1, expand=1),
            InvertedResidual(16, 24, 2, expand=4),   # /4
            InvertedResidual(24, 24, 1, expand=4),
            InvertedResidual(24, 32, 2, expand=4),   # /8
            InvertedResidual(32, 32, 1, expand=4),
            InvertedResidual(32, 32, 1, expand=4),
            conv_bn(32, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyFlow(nn.Module):
    """N_flow: (x, key_x) [N,3,H,W] in [0, 1] -> (flow [N,2,H/8,W/8] in feature cells,
    current -> key, (dx, dy); None: no scale field)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(6, w, 3, 2, 1), nn.LeakyReLU(0.1, inplace=True),          # /2
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.1, inplace=True),      # /4
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.1, inplace=True),  # /8
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(2 * w, 2, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor, key_x: torch.Tensor) -> tuple[torch.Tensor, None]:
        # centred so that a flat pair starts near zero flow
        return self.body(torch.cat((x, key_x), 1) - 0.5), None


class SegHead(nn.Module):
    """N_task: feat [N,C,h,w] -> logits [N,K,h,w], still on the stride-8 grid."""

    def __init__(self, channels: int = FEAT_CHANNELS, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, 3),
                                  nn.Conv2d(channels, num_classes, 1))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.body(feat)


def make_modules(num_classes: int = 5) -> tuple[MobileTrunk, TinyFlow, SegHead]:
    return MobileTrunk(), TinyFlow(), SegHead(num_classes=num_classes)


def build(checkpoint: str | os.PathLike[str] | None = None):
    """The factory for dff-export: the three modules (trained weights from `checkpoint`,
    as `run.py` saves them: {"feature", "flow", "task"} state dicts) as `DFFModules`."""
    from dff.data.synthetic import CLASS_NAMES
    from dff.export import DFFModules

    feature, flow, task = make_modules(len(CLASS_NAMES))
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for name, module in (("feature", feature), ("flow", flow), ("task", task)):
            module.load_state_dict(state[name])
    return DFFModules(feature=feature.eval(), flow=flow.eval(), task=task.eval(),
                      class_names=CLASS_NAMES, input_size=INPUT_SIZE, kind="segmentation",
                      stride=STRIDE, feature_mean=FEATURE_MEAN, feature_std=FEATURE_STD,
                      flow_mean=FLOW_MEAN, flow_std=FLOW_STD, key_interval=5,
                      source={"checkpoint": str(checkpoint) if checkpoint else None})
