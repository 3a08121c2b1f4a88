"""Feature trunks N_feat: ResNet v1 with the last stage dilated (output stride 16) plus the
extra 3×3 conv that sets the feature width C (``feat_conv_3x3`` in the original DFF)."""

from __future__ import annotations

from torch import nn

# blocks per stage and block type for each depth
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        # ResNet v1 (as the original's resnet_v1_101): the stride sits on the first 1×1 conv.
        self.conv1 = nn.Conv2d(cin, width, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetTrunk(nn.Module):
    """ResNet-{18,34,50,101}, res5 dilated 2 (stride 16), then feat_conv: 3×3, dilation
    ``feat_dilation``, ``feat_channels`` outputs, ReLU. Input: normalised float [N,3,H,W];
    output [N,C,ceil(H/16),ceil(W/16)]."""

    def __init__(self, depth: int = 101, width: int = 64, feat_channels: int = 1024,
                 feat_dilation: int = 6):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth {depth} not in {sorted(RESNET_LAYOUTS)}")
        kind, blocks = RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], width
        # (width multiplier, stride, dilation) per stage: res5 keeps stride 1 and dilates 2.
        for i, (mult, stride, dilation) in enumerate(((1, 1, 1), (2, 2, 1), (4, 2, 1), (8, 1, 2))):
            layers = []
            for j in range(blocks[i]):
                layers.append(block(cin, width * mult, stride if j == 0 else 1, dilation))
                cin = width * mult * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.feat_conv = nn.Sequential(
            nn.Conv2d(cin, feat_channels, 3, 1, padding=feat_dilation, dilation=feat_dilation),
            nn.ReLU(inplace=True),
        )
        self.out_channels = feat_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.feat_conv(self.stages(self.stem(x)))
