"""DFF: N_feat on key frames, N_flow + warp on the others, N_task on every frame."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from dff.models.config import DFFConfig
from dff.models.flownet import FlowNetS, QualityHead
from dff.models.heads import build_head
from dff.models.trunk import ResNetTrunk
from dff.models.warp import flow_warp
from torch import nn


class DFF(nn.Module):
    """Images enter as float [N,3,H,W] RGB in 0..255 (uint8 values), H and W multiples of
    the stride; normalisation happens inside, as it will in the exported graphs."""

    def __init__(self, config: DFFConfig):
        super().__init__()
        self.config = config
        self.trunk = ResNetTrunk(config.trunk_depth, config.trunk_width, config.feat_channels,
                                 config.feat_dilation)
        self.flownet = FlowNetS(config.feat_channels, config.flow_width)
        self.head = build_head(config.task, config.feat_channels, config.num_classes,
                               config.head_channels, config.stride, config.head_subcell,
                               config.head_upsample, config.head)
        self.quality_head = None
        if config.quality_channels:
            self.quality_head = QualityHead(self.flownet.cat_channels, config.quality_channels)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(config.std).view(1, 3, 1, 1),
                             persistent=False)

    # the three stages of DESIGN.md §1
    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk((image - self.mean) * self.inv_std)

    def flow(self, image: torch.Tensor, key_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flownet(image, key_image, self.mean)

    def flow_quality(self, image: torch.Tensor,
                     key_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flow, scale and the quality head's prediction [N,1] of the propagated features'
        relative error (dff.models.quality); needs a model with a quality head."""
        if self.quality_head is None:
            raise ValueError("this model has no quality head (config.quality_channels = 0)")
        flow, scale, cat = self.flownet(image, key_image, self.mean, features=True)
        return flow, scale, self.quality_head(cat, flow)

    def task(self, feat: torch.Tensor) -> Any:
        """The head's raw outputs: logits [N,K,H,W] (segmentation), (heat, size, offset)
        (CenterNet) or (rpn_cls, rpn_box, ps_cls, ps_box) (R-FCN); `outputs` turns them into
        the task contract's tensors."""
        return self.head(feat)

    def outputs(self, raw: Any) -> dict[str, torch.Tensor]:
        """The task contract's outputs (dff/tasks.py) from `task`'s raw outputs: `labels`
        (segmentation), or boxes, scores, classes, num (detection). task.onnx computes this."""
        cfg = self.config
        if cfg.task == "detection" and cfg.head == "rfcn":
            from dff.models.rfcn import rfcn_decode

            boxes, scores, classes, num = rfcn_decode(
                raw, self.head.anchors, self.head.stride, k=self.head.k,
                max_detections=cfg.max_detections, score_threshold=cfg.score_threshold)
            return {"boxes": boxes, "scores": scores, "classes": classes, "num": num}
        if cfg.task == "detection":
            from dff.models.detection import decode

            boxes, scores, classes, num = decode(*raw, stride=self.head.out_stride,
                                                 max_detections=cfg.max_detections,
                                                 score_threshold=cfg.score_threshold)
            return {"boxes": boxes, "scores": scores, "classes": classes, "num": num}
        return {"labels": raw.argmax(1).to(torch.uint8)}

    # the two paths
    def forward_key(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(image)
        return feat, self.task(feat)

    def propagate(self, image: torch.Tensor, key_image: torch.Tensor,
                  key_feat: torch.Tensor) -> torch.Tensor:
        """Warped features for ``image`` from the key frame's features."""
        flow, scale = self.flow(image, key_image)
        return flow_warp(key_feat, flow, scale)

    def forward(self, image: torch.Tensor, key_image: torch.Tensor) -> torch.Tensor:
        """Training forward (the paper's): features on the key frame, propagated to the
        current frame, task output on the current frame only."""
        return self.task(self.propagate(image, key_image, self.features(key_image)))

    @torch.no_grad()
    def video(self, frames: Iterable[torch.Tensor], is_key: Iterable[bool],
              copy_features: bool = False) -> Iterator[Any]:
        """Run a clip frame by frame ([1,3,H,W] each) under a key-frame schedule; yields the
        head's raw outputs (`outputs` decodes them).
        ``copy_features`` is the naive baseline: non-key frames reuse the key features as is."""
        key_feat = key_image = None
        for frame, key in zip(frames, is_key):
            if key or key_feat is None:
                key_feat, logits = self.forward_key(frame)
                key_image = frame
            elif copy_features:
                logits = self.task(key_feat)
            else:
                logits = self.task(self.propagate(frame, key_image, key_feat))
            yield logits


def fixed_schedule(num_frames: int, interval: int) -> list[bool]:
    """Key frame every ``interval`` frames, starting with the first."""
    if interval < 1:
        raise ValueError(f"key interval must be ≥ 1, got {interval}")
    return [t % interval == 0 for t in range(num_frames)]
