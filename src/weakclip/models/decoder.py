"""Text-guided decoder: an FPN neck and a Semantic-FPN head.

``FPNNeck``: per level a 1x1 lateral conv (in -> 256), a top-down pathway (the coarser level is
nearest-upsampled to the finer level's size and added), then a 3x3 output conv per level; 4 in, 4 out.

``SemanticFPNHead`` (Kirillov et al., "Panoptic Feature Pyramid Networks"): the level at stride
``2**(i+2)`` (i = 0..3) goes through ``max(1, i)`` stages of conv3x3-BN-ReLU, each followed (for i > 0)
by a 2x bilinear upsampling, which brings every level to stride 4; the levels are summed, then dropout
(channel-wise, ``nn.Dropout2d``, as mmsegmentation's heads) and a 1x1 conv to the K classes.

Initialisation (``init``): "release" is what the release's modules get from their constructors (mmcv's
``ConvModule`` runs ``kaiming_init`` when built; the release never calls ``init_weights``): every conv of
the neck and of the head's stages Kaiming-normal (fan_out, relu) with zero bias, the classifier PyTorch's
default. "mmseg" applies the init mmsegmentation declares in ``init_cfg``: neck convs Xavier-uniform, the
classifier normal (std 0.01) with zero bias (head stages Kaiming-normal as before).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from weakclip.errors import WeakclipError

__all__ = ["INIT_SCHEMES", "FPNNeck", "SemanticFPNHead"]

INIT_SCHEMES = ("release", "mmseg")


def _check_init(init: str) -> None:
    if init not in INIT_SCHEMES:
        raise WeakclipError(f"init must be one of {INIT_SCHEMES}, got {init!r}")


class FPNNeck(nn.Module):
    """Feature pyramid network neck: ``len(in_channels)`` inputs (fine to coarse) -> as many outputs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, *, init: str = "release") -> None:
        super().__init__()
        _check_init(init)
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in self.in_channels])
        self.output_convs = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels]
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if init == "release":
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_channels):
            raise WeakclipError(f"FPN neck expects {len(self.in_channels)} levels, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.output_convs, laterals)]


def _conv_bn_relu(in_ch: int, out_ch: int, batch_norm: type[nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), batch_norm(out_ch), nn.ReLU(inplace=True)]


class SemanticFPNHead(nn.Module):
    """Semantic-FPN head: levels at strides ``feature_strides`` (4, 8, 16, 32) -> K logits at stride 4."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        dropout: float = 0.1,
        *,
        batch_norm: type[nn.Module] = nn.BatchNorm2d,
        init: str = "release",
    ) -> None:
        super().__init__()
        _check_init(init)
        strides = tuple(int(s) for s in feature_strides)
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise WeakclipError(f"feature strides must double from level to level, got {strides}")
        self.feature_strides = strides
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            stages = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for k in range(stages):
                layers += _conv_bn_relu(in_channels if k == 0 else channels, channels, batch_norm)
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.classifier:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if init == "mmseg":  # "release": the classifier keeps PyTorch's default init
            nn.init.normal_(self.classifier.weight, std=0.01)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.scale_heads):
            raise WeakclipError(
                f"Semantic-FPN head expects {len(self.scale_heads)} levels, got {len(features)}"
            )
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:]):
            y = head(x)
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes: 2x upsampling overshoots or falls short by one
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.classifier(self.dropout(out))
