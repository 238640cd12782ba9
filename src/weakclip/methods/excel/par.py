"""Pixel-adaptive refinement (PAR): score maps propagated over an image's colour affinities.

ExCEL refines its online pseudo labels with the PAR of ToCo / AFA, as the release's ``utils/PAR.py``
(``PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])`` in scripts/train_voc.py and train_coco.py):

* the image is resized (bilinear, ``align_corners=True``) to the score maps' size;
* every pixel has 8 neighbours per dilation ``d`` (the 3 x 3 ring at distance ``d``, edges replicated);
* colour affinity: ``-(|I_n - I_p| / (std_n(I_n) + 1e-8) / 0.3) ** 2``, averaged over the colour channels,
  softmax over the neighbours; ``std_n`` is the unbiased standard deviation over the neighbours;
* position affinity: the same with the neighbours' distances (``d``, ``d * sqrt(2)`` on the diagonals),
  softmax over the neighbours, weighted 0.01 and added;
* ``num_iter`` times: each map becomes the affinity-weighted sum of its neighbours' values.

The neighbours are gathered as the release gathers them, by a convolution with one-hot 3 x 3 kernels: on a
GPU whose cuDNN convolutions run in TF32 (PyTorch's default for convolutions) that rounds what is gathered,
and
the same call here rounds the same way. Runs on the inputs' device and in their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAR", "RELEASE_DILATIONS", "RELEASE_NUM_ITER", "neighbour_kernel", "neighbour_distances"]

#: scripts/train_voc.py / train_coco.py: ``PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])``
RELEASE_DILATIONS = (1, 2, 4, 8, 12, 24)
RELEASE_NUM_ITER = 20
#: the release's temperatures: colour (``w1``) and the weight of the position term (``w2``)
COLOUR_TEMPERATURE = 0.3
POSITION_WEIGHT = 0.01

# The 8 neighbours of the 3 x 3 ring, in the release's order (row-major, centre skipped).
_RING = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


def neighbour_kernel() -> torch.Tensor:
    """[8, 1, 3, 3] one-hot kernels, one per ring neighbour (the release's ``get_kernel``)."""
    kernel = torch.zeros(len(_RING), 1, 3, 3)
    for k, (r, c) in enumerate(_RING):
        kernel[k, 0, r, c] = 1.0
    return kernel


def neighbour_distances(dilations: Sequence[int]) -> torch.Tensor:
    """[1, 1, 8 * len(dilations), 1, 1]: each neighbour's distance, ``d`` or ``d * sqrt(2)`` (diagonals)."""
    ring = torch.ones(1, 1, len(_RING), 1, 1)
    for k, (r, c) in enumerate(_RING):
        if r != 1 and c != 1:
            ring[0, 0, k, 0, 0] = math.sqrt(2)  # float32 of sqrt(2), as the release's np.sqrt(2) stored
    return torch.cat([ring * d for d in dilations], dim=2)


class PAR(nn.Module):
    """``PAR(dilations, num_iter)(images [B, 3, h, w], maps [B, C, H, W]) -> refined maps [B, C, H, W]``.

    No trained weights; its buffers are not saved in state dicts."""

    def __init__(self, dilations: Sequence[int] = RELEASE_DILATIONS,
                 num_iter: int = RELEASE_NUM_ITER) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = int(num_iter)
        self.register_buffer("kernel", neighbour_kernel(), persistent=False)
        self.register_buffer("distances", neighbour_distances(self.dilations), persistent=False)

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 8 * len(dilations), H, W]: each pixel's ring neighbours per dilation."""
        b, c, h, w = x.shape
        kernel = self.kernel.to(device=x.device, dtype=x.dtype)
        out = []
        for d in self.dilations:
            padded = F.pad(x, [d, d, d, d], mode="replicate")
            padded = padded.reshape(b * c, 1, padded.shape[-2], padded.shape[-1])
            out.append(F.conv2d(padded, kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    def affinity(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (already at the maps' size) -> [B, 1, K, H, W] propagation weights."""
        b, _, h, w = images.shape
        near = self.neighbours(images)
        centre = images.unsqueeze(2).expand_as(near)
        colour = -((near - centre).abs() / (near.std(dim=2, keepdim=True) + 1e-8) / COLOUR_TEMPERATURE) ** 2
        colour = colour.mean(dim=1, keepdim=True)
        dist = self.distances.to(device=images.device, dtype=images.dtype).expand(b, 1, -1, h, w)
        position = -(dist / (dist.std(dim=2, keepdim=True) + 1e-8) / COLOUR_TEMPERATURE) ** 2
        return F.softmax(colour, dim=2) + POSITION_WEIGHT * F.softmax(position, dim=2)

    def forward(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(images, size=maps.shape[-2:], mode="bilinear", align_corners=True)
        weights = self.affinity(images)
        for _ in range(self.num_iter):
            maps = (self.neighbours(maps) * weights).sum(dim=2)
        return maps
