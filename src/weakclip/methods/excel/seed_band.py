"""The ignore band that turns ExCEL's training-free masks into seeds for WeakCLIP's refinement.

This combination (ExCEL's training-free masks as the seeds of WeakCLIP's refinement) is in no paper: an
option, unmeasured. Seeds mark unsure pixels with 255, as the CLIP-ES seeds do. The band is ExCEL's own rule
for its online labels with an ignore band (the release's ``lam_to_label(..., ignore_mid=True)`` with
``high_thre`` 0.7 and ``low_thre`` 0.25, :func:`~weakclip.methods.excel.labels.lam_to_label`), applied to the
training-free maps of an image:

1. ``maps``: the image's labelled classes' attention-refined maps, each min-max normalised and resized to the
   image (the maps ExCEL's background step and PAR start from;
   :func:`~weakclip.methods.excel.training_free.training_free_maps`); ``v`` their maximum at each pixel;
2. the band's label: the class of that maximum where ``v > high``, background where ``v <= low``, 255 in
   between (lam_to_label's order: ``<= high`` is unsure, then ``<= low`` background);
3. the seed: the training-free mask's label (after PAR) where the band's label agrees with it, 255 where the
   band is unsure or disagrees with the mask. So every labelled seed pixel is the training-free mask's.

An image without any foreground label gets an all-background seed (the labels say there is no object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from weakclip.data.classes import IGNORE_INDEX
from weakclip.errors import DataError, WeakclipError

__all__ = ["SeedBand", "apply_seed_band", "band_labels"]


@dataclass(frozen=True)
class SeedBand:
    """``high`` / ``low``: the release's ``high_thre`` / ``low_thre`` (0.7, 0.25). Unsure pixels are 255, as
    in every seed folder."""

    high: float = 0.7
    low: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= float(self.low) <= float(self.high) <= 1:
            raise WeakclipError(f"the seed band needs 0 <= low <= high <= 1, got low {self.low}, "
                                f"high {self.high}")

    @classmethod
    def of_config(cls, cfg, *, high: float | None = None, low: float | None = None) -> SeedBand:
        """The band of an :class:`~weakclip.methods.excel.config.ExcelConfig` (its ``labels`` section's
        ``high_thre`` and ``low_thre``: the release's 0.7 and 0.25 in both presets), ``high`` / ``low``
        replacing those when given."""
        lb = cfg.labels
        return cls(high=float(lb.high_thre if high is None else high),
                   low=float(lb.low_thre if low is None else low))


def band_labels(maps: torch.Tensor, classes: Sequence[int] | torch.Tensor, band: SeedBand) -> np.ndarray:
    """Step 2 of the module docstring: ``maps`` C x H x W (the labelled classes', normalised), ``classes``
    their foreground indices (class id ``index + 1``) -> H x W uint8 of class ids, 0 and 255,
    computed by :func:`~weakclip.methods.excel.labels.lam_to_label` with every map's class present."""
    from weakclip.methods.excel.labels import lam_to_label

    maps = torch.as_tensor(maps, dtype=torch.float32)
    ids = torch.as_tensor(classes, dtype=torch.int64).reshape(-1) + 1
    if maps.dim() != 3 or maps.shape[0] != ids.numel() or ids.numel() == 0:
        raise DataError(f"the seed band takes C x H x W maps of the C labelled classes, got maps of shape "
                        f"{tuple(maps.shape)} for {ids.numel()} classes")
    present = torch.ones(1, ids.numel(), dtype=maps.dtype)
    _, labels = lam_to_label(maps[None], present, high_thre=band.high, low_thre=band.low, ignore_mid=True,
                             ignore_index=IGNORE_INDEX)
    lookup = torch.zeros(256, dtype=torch.int64)
    lookup[1:ids.numel() + 1] = ids
    lookup[IGNORE_INDEX] = IGNORE_INDEX
    return lookup[labels[0]].to(torch.uint8).numpy()


def apply_seed_band(mask: np.ndarray, maps: torch.Tensor, classes: Sequence[int] | torch.Tensor,
                    band: SeedBand) -> np.ndarray:
    """The seed of one image (module docstring): the training-free ``mask`` (H x W class ids) where
    :func:`band_labels` agrees with it, 255 elsewhere."""
    mask = np.asarray(mask)
    labels = band_labels(maps, classes, band)
    if labels.shape != mask.shape:
        raise DataError(f"the class maps are {labels.shape[1]}x{labels.shape[0]}, the mask "
                        f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
    return np.where(labels == mask, mask, IGNORE_INDEX).astype(np.uint8)
