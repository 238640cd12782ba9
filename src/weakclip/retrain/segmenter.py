"""The wrapper every retraining network shares: logits at the input's size, backbone and head apart.

Below both model families (:mod:`weakclip.retrain.models`, torchvision's; :mod:`weakclip.retrain.deeplabv1`,
the authors' ResNet-38), so neither imports the other to get it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Segmenter"]


class Segmenter(nn.Module):
    """A segmentation network giving logits at the input's size; ``net.backbone`` is the pretrained part."""

    def __init__(self, net: nn.Module, name: str, num_classes: int, output_stride: int | None) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.num_classes = int(num_classes)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.net.backbone.parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.net.backbone.parameters()}
        return [p for p in self.net.parameters() if id(p) not in ids]

    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        """Two optimizer groups: backbone (``lr_mult`` 1) and head (``lr_mult`` = ``head_lr_mult``)."""
        return [
            {"params": list(self.backbone_parameters()), "lr_mult": 1.0, "name": "backbone"},
            {"params": self.head_parameters(), "lr_mult": float(head_lr_mult), "name": "head"},
        ]
