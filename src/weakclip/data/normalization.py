"""Normalisation: the mean/std statistics (ImageNet's, the release's; CLIP's, the ``-plus`` choice) and the
:class:`Normalize` transform."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weakclip.data.transform_base import Sample, _Transform

# Normalisation constants in the 0-255 scale, RGB order.
CLIP_MEAN: tuple[float, float, float] = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD: tuple[float, float, float] = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


class Normalize(_Transform):
    """``(image - mean) / std`` per RGB channel (0-255 scale) -> float32 ``HxWx3`` numpy array.

    The default is ImageNet's mean/std, as the release; CLIP's own (:data:`CLIP_MEAN`,
    :data:`CLIP_STD`, the statistics the towers were trained with) is the ``-plus`` choice.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std positive")

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        img = np.asarray(sample["image"], dtype=np.float32)
        out["image"] = (img - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return out
