"""The architecture config stored in every checkpoint (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dff.data.synthetic import CLASS_NAMES, DETECTION_CLASS_NAMES

from dff.tasks import DETECTION, MAX_DETECTIONS, SCORE_THRESHOLD


@dataclass
class DFFConfig:
    task: str = "segmentation"
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    trunk_depth: int = 101           # ResNet depth: 18, 34, 50 or 101
    trunk_width: int = 64            # channels of the stem; stages use 1×, 2×, 4×, 8× this
    feat_channels: int = 1024        # C: width of feat_conv_3x3, hence of the warped features
    feat_dilation: int = 6
    flow_width: float = 0.5          # FlowNet-S width: 1 = released code, 0.5 = FlowNet Half
    head_channels: int = 256         # segmentation: 0 = the paper's 1×1 score head (ScoreHead)
    head_subcell: int = 4            # logits per cell side before bilinear upsampling (1 = DeepLab)
    head_upsample: int = 1           # detection: 2 doubles the head's map (output stride 8)
    head: str = "centernet"          # detection: "centernet" (models/detection.py) or "rfcn"
    max_detections: int = MAX_DETECTIONS      # detection: K, the fixed rows of task.onnx
    score_threshold: float = SCORE_THRESHOLD  # detection: rows at or below are padding
    stride: int = 16
    mean: list[float] = field(default_factory=lambda: [123.15, 115.90, 103.06])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    key_interval: int = 10
    input_size: list[int] = field(default_factory=lambda: [128, 224])   # H, W used in training
    quality_channels: int = 0        # the flow net's quality head (models/quality.py); 0 = none

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return asdict(self)

    def for_task(self, task: str) -> DFFConfig:
        """This architecture for `task`, with the benchmark's class names for it (detection
        has no background class)."""
        names = DETECTION_CLASS_NAMES if task == DETECTION else CLASS_NAMES
        return DFFConfig.from_dict({**self.to_dict(), "task": task, "class_names": list(names)})

    @classmethod
    def from_dict(cls, d: dict) -> DFFConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**d)


# Configurations by name. "small" is the shipped demo model: it trains on a CPU.
PRESETS = {
    "small": DFFConfig(trunk_depth=18, trunk_width=56, feat_channels=96, feat_dilation=2,
                       flow_width=0.125, head_channels=48, head_subcell=1,
                       std=[58.4, 57.1, 57.4]),
    "resnet101": DFFConfig(),
    # for tests and smoke runs: builds and trains in milliseconds, learns nothing useful
    "tiny": DFFConfig(trunk_depth=18, trunk_width=8, feat_channels=16, feat_dilation=2,
                      flow_width=0.0625, head_channels=8, input_size=[64, 96]),
}
