"""Joint image/mask transforms for training and testing (numpy, torch, and OpenCV for resizing as mmcv does).

A *sample* is a dict with ``"id"`` (str), ``"image"`` (``HxWx3`` uint8 RGB numpy array), ``"labels"``
(float32 multi-hot of length K, background at index 0) and optionally the label maps ``"seed"`` and
``"gt"`` (``HxW`` uint8, 255 = ignore / unsure). Every transform is a callable ``sample -> sample``
that returns a new dict and applies the same geometry to the image and to every mask key present
(:data:`MASK_KEYS`); photometric transforms touch the image only.

The training pipeline follows the release (mmsegmentation 0.19) step by step: random resize of
scale (2048, 512) with ratio 0.5-2.0 keeping the aspect ratio, random 512 crop in which no class
covers 75% or more, horizontal flip with probability 0.5, photometric distortion, normalisation,
bottom/right padding to 512 (masks padded with 255), then conversion to tensors.

Randomness. Every random transform draws from a ``numpy.random.Generator``, chosen in this order:
the ``rng`` given to the call (``Compose`` forwards its own), the ``rng`` given to the constructor,
else a fresh Generator seeded from numpy's *global* state at each call. DataLoader workers must
therefore seed numpy's global state: pass :func:`worker_init_fn` to the DataLoader, and seeding the
DataLoader's ``torch.Generator`` then makes data loading reproducible. In the main process
(``num_workers=0``) seed numpy yourself (``np.random.seed``) for the same effect.

The pieces live in modules of their own: the sample helpers, :class:`Compose` and the randomness rule in
:mod:`weakclip.data.transform_base`, resizing in :mod:`weakclip.data.resampling`, the statistics and
:class:`Normalize` in :mod:`weakclip.data.normalization`, :class:`Resize`, :class:`Pad` and
:class:`ToTensor` in :mod:`weakclip.data.fixed_transforms`, the random augmentations in
:mod:`weakclip.data.augmentations`. This module builds the two pipelines and re-exports every piece.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from weakclip.data.augmentations import PhotometricDistortion, RandomCrop, RandomFlip, RandomResize
from weakclip.data.augmentations import hsv_to_rgb as hsv_to_rgb
from weakclip.data.augmentations import rgb_to_hsv as rgb_to_hsv
from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.fixed_transforms import Pad, Resize, ToTensor
from weakclip.data.normalization import CLIP_MEAN as CLIP_MEAN
from weakclip.data.normalization import CLIP_STD as CLIP_STD
from weakclip.data.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize
from weakclip.data.resampling import _resize_sample as _resize_sample
from weakclip.data.resampling import rescale_size as rescale_size
from weakclip.data.resampling import resize_image as resize_image
from weakclip.data.resampling import resize_mask as resize_mask
from weakclip.data.transform_base import MASK_KEYS as MASK_KEYS
from weakclip.data.transform_base import Compose
from weakclip.data.transform_base import Sample as Sample
from weakclip.data.transform_base import _check_sample as _check_sample
from weakclip.data.transform_base import _mask_keys as _mask_keys
from weakclip.data.transform_base import _pair as _pair
from weakclip.data.transform_base import _resolve_rng as _resolve_rng
from weakclip.data.transform_base import _to_torch as _to_torch
from weakclip.data.transform_base import _Transform as _Transform
from weakclip.data.transform_base import worker_init_fn as worker_init_fn

# --------------------------------------------------------------------------------------------------
# pipelines


def train_transforms(crop_size: int | Sequence[int] = 512, scale: Sequence[int] = (2048, 512),
                     ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                     flip_prob: float = 0.5, photometric: bool = True,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     rng: np.random.Generator | None = None) -> Compose:
    """The release's training pipeline: random resize, cat-max-ratio crop, flip, photometric
    distortion, normalise, pad to ``crop_size`` (masks with 255), to tensors."""
    ts: list[Callable] = [
        RandomResize(scale, ratio_range),
        RandomCrop(crop_size, cat_max_ratio=cat_max_ratio),
        RandomFlip(flip_prob),
    ]
    if photometric:
        ts.append(PhotometricDistortion())
    ts += [Normalize(mean, std), Pad(crop_size, pad_value=0, seg_pad_value=IGNORE_INDEX), ToTensor()]
    return Compose(ts, rng=rng)


def test_transforms(scale: Sequence[int] = (2048, 512), mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, resize_masks: bool = False) -> Compose:
    """Test pipeline: keep-ratio resize to ``scale``, normalise, to tensors; no crop, no padding.

    Masks stay at the original resolution by default (metrics are computed there); the original
    ``(H, W)`` is kept in ``"ori_shape"``.
    """
    return Compose([Resize(scale, keep_ratio=True, resize_masks=resize_masks), Normalize(mean, std),
                    ToTensor()])


# A factory, not a test: keep pytest from collecting it when a test module imports it by name.
test_transforms.__test__ = False  # type: ignore[attr-defined]
