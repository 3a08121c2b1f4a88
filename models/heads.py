"""N_task heads. Each takes the (possibly warped) features [N,C,h,w] and returns its raw
outputs; ``build_head`` picks one from the config's ``task`` and ``head`` (the detection heads
live in ``dff.models.detection``, CenterNet, and ``dff.models.rfcn``, R-FCN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """DeepLab-style: ASPP (1×1, dilated 3×3, image pooling) → 1×1 projection → classifier.
    The classifier predicts a 4×4 sub-cell block of logits per cell (pixel shuffle), then
    bilinear ×4 reaches the input size, so boundaries are finer than the stride-16 grid."""

    task = "segmentation"

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, rate: int = 2,
                 stride: int = 16, subcell: int = 4):
        super().__init__()
        if stride % subcell:
            raise ValueError(f"stride {stride} must be a multiple of subcell {subcell}")
        self.num_classes = num_classes
        self.stride = stride
        self.subcell = subcell

        def block(k: int, dilation: int = 1) -> nn.Sequential:
            pad = dilation * (k // 2)
            return nn.Sequential(nn.Conv2d(in_channels, channels, k, 1, pad, dilation, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.branch1 = block(1)
        self.branch3 = block(3, rate)
        self.pool = block(1)
        self.project = nn.Sequential(nn.Conv2d(3 * channels, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes * subcell * subcell, 1)
        self.shuffle = nn.PixelShuffle(subcell)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat [N,C,h,w] → logits [N,K,h·stride,w·stride]."""
        pooled = self.pool(feat.mean((2, 3), keepdim=True)).expand(-1, -1, feat.shape[2], feat.shape[3])
        x = self.project(torch.cat((self.branch1(feat), self.branch3(feat), pooled), 1))
        x = self.shuffle(self.classifier(x))
        return F.interpolate(x, scale_factor=self.stride // self.subcell, mode="bilinear",
                             align_corners=False)


class ScoreHead(nn.Module):
    """The paper's segmentation N_task (DeepLab v1, as the DeepLab code DFF builds on has it):
    one 1×1 convolution to the class score maps on the stride-16 grid, then bilinear
    upsampling to the input size. No hidden layer: `head_channels` 0 picks it."""

    task = "segmentation"

    def __init__(self, in_channels: int, num_classes: int, stride: int = 16):
        super().__init__()
        self.num_classes, self.stride = num_classes, stride
        self.score = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat [N,C,h,w] → logits [N,K,h·stride,w·stride]."""
        return F.interpolate(self.score(feat), scale_factor=self.stride, mode="bilinear",
                             align_corners=False)


DETECTION_HEADS = ("centernet", "rfcn")


def build_head(task: str, in_channels: int, num_classes: int, channels: int, stride: int,
               subcell: int = 4, upsample: int = 1, head: str = "centernet") -> nn.Module:
    """`channels` 0: segmentation's ScoreHead (the paper's); CenterNet needs channels ≥ 1.
    `head` "rfcn" is the original DFF's R-FCN (1×1 convs on the features: no channels, no
    upsample)."""
    if head not in DETECTION_HEADS:
        raise ValueError(f"unknown head {head!r}: expected one of {', '.join(DETECTION_HEADS)}")
    if head == "rfcn" and task != "detection":
        raise ValueError(f"head 'rfcn' is a detection head, but the task is {task!r}; use "
                         "--task detection")
    if task == "segmentation":
        if channels == 0:
            return ScoreHead(in_channels, num_classes, stride)
        return SegmentationHead(in_channels, num_classes, channels, stride=stride, subcell=subcell)
    if task == "detection" and head == "rfcn":
        from dff.models.rfcn import RFCNHead

        return RFCNHead(in_channels, num_classes, stride=stride)
    if task == "detection":
        from dff.models.detection import DetectionHead

        if channels < 1:
            raise ValueError(f"head_channels {channels}: the detection head needs at least 1")

        return DetectionHead(in_channels, num_classes, channels, stride=stride, upsample=upsample)
    raise ValueError(f"unknown task {task!r}: expected 'segmentation' or 'detection'")
