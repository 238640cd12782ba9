"""The training augmentation of the authors' DeepLab-v1 retraining (``tools/datasets/BaseDataset.py``
``__weak_augment__`` and ``transform.py``), in its order, with the same OpenCV calls:

1. HSV jitter (:func:`hsv_jitter`, the release's ``RandomHSV``): ``cv2.cvtColor(RGB2HSV)`` of the uint8 image
   (H in 0..179), one integer shift per channel drawn uniformly from ``[-r, r]`` (10, 10, 10), the hue wrapped
   modulo 180, saturation and value clipped to 0..255, then ``cv2.cvtColor(HSV2RGB)``.
2. Horizontal flip with probability 0.5 (image and mask).
3. Random scale ``r ~ U(0.5, 1.5)`` of the whole image (the release's ``RandomScale``):
   ``cv2.resize(fx=r, fy=r)``, ``INTER_CUBIC`` for the uint8 image (OpenCV rounds and saturates),
   ``INTER_NEAREST`` for the mask; OpenCV decides the output size (``round(r * size)``) and the sampling grid
   (scale ``1 / r``).
4. Normalisation as the release's ``ImageNorm``: ``(x / 255 - mean) / std`` per channel in float32
   (:func:`release_normalize`).
5. Random crop 448 x 448: where the image is larger the window is placed at random; where it is smaller the
   image is placed at a random offset inside the crop, the rest of the image being 0 (the mean colour, after
   normalisation) and of the mask 255 (ignored).

The random draws come from a NumPy generator (the release uses Python's ``random``): the same distributions,
not the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.transform_base import MASK_KEYS, _Transform

__all__ = ["ReleaseAugment", "hsv_jitter", "release_normalize", "release_rescale"]


def hsv_jitter(image: np.ndarray, dh: int, ds: int, dv: int) -> np.ndarray:
    """The release's ``RandomHSV`` for given shifts: hue (mod 180), saturation and value (clipped) of a
    uint8 RGB image, through OpenCV's 8-bit HSV."""
    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(dh)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(ds), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + int(dv), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def release_rescale(array: np.ndarray, rate: float, interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """``cv2.resize(array, None, fx=rate, fy=rate, interpolation=...)``, the release's ``RandomScale`` and
    ``Multiscale``: OpenCV picks the output size and the sampling grid from ``rate``."""
    return cv2.resize(np.ascontiguousarray(array), None, fx=float(rate), fy=float(rate),
                      interpolation=interpolation)


def release_normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The release's ``ImageNorm``: ``(x / 255 - m) / s`` per channel in float32, with ``m``, ``s`` its 0..1
    statistics (``mean`` and ``std`` are given on the 0..255 scale and divided by 255 here)."""
    x = np.asarray(image).astype(np.float32)
    for c in range(3):
        x[..., c] = (x[..., c] / 255 - float(mean[c]) / 255) / (float(std[c]) / 255)
    return x


def _rescale_mask(mask: np.ndarray, rate: float) -> np.ndarray:
    """``cv2.INTER_NEAREST`` of a label mask (uint8 as the release's PNG arrays; wider labels go through
    int32)."""
    m = np.asarray(mask)
    if m.dtype != np.uint8:
        m = m.astype(np.uint8) if m.size == 0 or (m.min() >= 0 and m.max() <= 255) else m.astype(np.int32)
    return release_rescale(m, rate, cv2.INTER_NEAREST)


def _offsets(g: np.random.Generator, size: int, crop: int) -> tuple[int, int]:
    """(start in the image, start in the crop) along one axis: a random window of a larger image, or a random
    placement of a smaller one (``random.randrange(space + 1)`` in the release)."""
    if size > crop:
        return int(g.integers(0, size - crop + 1)), 0
    return 0, int(g.integers(0, crop - size + 1))


class ReleaseAugment(_Transform):
    """HSV jitter, flip, random scale, normalisation, random crop (module docstring); ends with tensors
    (image float32 ``3xHxW``, masks int64)."""

    def __init__(self, crop_size: int = 448, scale_range: tuple[float, float] = (0.5, 1.5),
                 hsv: tuple[int, int, int] = (10, 10, 10), flip_prob: float = 0.5,
                 mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375)) -> None:
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hsv = tuple(int(v) for v in hsv)
        self.flip_prob = float(flip_prob)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        g = rng if rng is not None else np.random.default_rng()
        out = dict(sample)
        keys = [k for k in MASK_KEYS if sample.get(k) is not None]
        img = np.asarray(sample["image"], dtype=np.uint8)
        if any(self.hsv):
            dh, ds, dv = (int(g.integers(-r, r + 1)) for r in self.hsv)
            img = hsv_jitter(img, dh, ds, dv)
        masks = {k: np.asarray(sample[k]) for k in keys}
        if g.random() < self.flip_prob:
            img = img[:, ::-1]
            masks = {k: m[:, ::-1] for k, m in masks.items()}
        r = g.uniform(*self.scale_range)
        img = release_rescale(img, r)
        masks = {k: _rescale_mask(m, r) for k, m in masks.items()}
        x = release_normalize(img, self.mean, self.std)
        c = self.crop_size
        h, w = img.shape[:2]
        top_in, top_out = _offsets(g, h, c)
        left_in, left_out = _offsets(g, w, c)
        ch, cw = min(h, c), min(w, c)
        crop = np.zeros((c, c, 3), np.float32)
        crop[top_out:top_out + ch, left_out:left_out + cw] = x[top_in:top_in + ch, left_in:left_in + cw]
        out["image"] = torch.from_numpy(crop.transpose(2, 0, 1).copy())
        for k, m in masks.items():
            mc = np.full((c, c), IGNORE_INDEX, np.int64)
            mc[top_out:top_out + ch, left_out:left_out + cw] = m[top_in:top_in + ch, left_in:left_in + cw]
            out[k] = torch.from_numpy(mc)
        return out
