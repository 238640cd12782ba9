"""Pyramid adapter: ViT patch tokens from four blocks -> a 4-level feature pyramid (strides 4, 8, 16, 32).

The ViT emits every level at stride ``patch`` (16 for ViT-B/16). Each level is first normalised with a
single-group GroupNorm (a LayerNorm over channels and positions), then resampled:

* level 1 (stride 4):  GroupNorm(1) -> ConvTranspose(2, s2) -> BatchNorm -> GELU -> ConvTranspose(2, s2)
* level 2 (stride 8):  GroupNorm(1) -> ConvTranspose(2, s2)
* level 3 (stride 16): GroupNorm(1)
* level 4 (stride 32): GroupNorm(1) -> MaxPool(2)

Channels stay at the ViT width (768 for ViT-B/16) on every level.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from weakclip.errors import WeakclipError

__all__ = ["PyramidAdapter"]


class PyramidAdapter(nn.Module):
    """Turns 4 same-resolution ViT feature maps (B x C x h x w) into levels at 4x, 2x, 1x and 1/2x size.

    ``batch_norm`` picks the normalisation class of level 1 (``nn.BatchNorm2d``; ``nn.SyncBatchNorm`` for
    multi-GPU training with synchronised statistics).
    """

    num_levels = 4

    def __init__(self, channels: int, *, batch_norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.channels = channels
        c = channels
        self.levels = nn.ModuleList(
            [
                nn.Sequential(
                    nn.GroupNorm(1, c),
                    nn.ConvTranspose2d(c, c, kernel_size=2, stride=2),
                    batch_norm(c),
                    nn.GELU(),
                    nn.ConvTranspose2d(c, c, kernel_size=2, stride=2),
                ),
                nn.Sequential(nn.GroupNorm(1, c), nn.ConvTranspose2d(c, c, kernel_size=2, stride=2)),
                nn.Sequential(nn.GroupNorm(1, c)),
                nn.Sequential(nn.GroupNorm(1, c), nn.MaxPool2d(kernel_size=2, stride=2)),
            ]
        )

    # Output stride of each level relative to the input grid (x4, x2, x1, x1/2).
    scale_factors = (4.0, 2.0, 1.0, 0.5)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_levels:
            raise WeakclipError(f"PyramidAdapter expects {self.num_levels} feature maps, got {len(features)}")
        outs = []
        for level, x in zip(self.levels, features):
            if x.ndim != 4 or x.shape[1] != self.channels:
                raise WeakclipError(
                    f"PyramidAdapter expects B x {self.channels} x h x w features, got {tuple(x.shape)}"
                )
            outs.append(level(x))
        return outs
