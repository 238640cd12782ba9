"""The training augmentation of the authors' DeepLab-v1 retraining (``tools/datasets/BaseDataset.py``
``__weak_augment__`` and ``transform.py``), in its order:

1. HSV jitter (:func:`hsv_jitter`): the uint8 RGB image is converted to OpenCV's 8-bit HSV (H in 0..179,
   S and V in 0..255), one integer shift per channel is drawn uniformly from ``[-r, r]`` (10, 10, 10), the
   hue wraps modulo 180, saturation and value are clipped to 0..255, and the result is converted back to
   uint8 RGB.
   The conversions follow OpenCV's 8-bit ``COLOR_RGB2HSV`` / ``COLOR_HSV2RGB`` arithmetic (fixed-point
   division tables forward, float sector formula backward); without OpenCV to compare against, equality to
   the last grey level is not claimed.
2. Horizontal flip with probability 0.5 (image and mask).
3. Random scale ``r ~ U(0.5, 1.5)`` of the whole image: bicubic for the image (like ``cv2.INTER_CUBIC``,
   rounded and clipped to uint8), nearest for the mask (input pixel ``floor(i / r)``, as
   ``cv2.INTER_NEAREST``), output size ``round(r * size)``.
4. ImageNet normalisation (``(x / 255 - mean) / std``).
5. Random crop 448 x 448: where the image is larger the window is placed at random; where it is smaller the
   image is placed at a random offset inside the crop, the rest of the image being 0 (the mean colour, after
   normalisation) and of the mask 255 (ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.transforms import MASK_KEYS, _Transform

__all__ = ["ReleaseAugment", "hsv_jitter", "hsv_to_rgb_u8", "resize_bicubic_u8", "rgb_to_hsv_u8"]

_SHIFT = 12  # OpenCV's hsv_shift


def _div_table(numerator: int) -> np.ndarray:
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(i > 0, np.rint((numerator << _SHIFT) / np.maximum(i, 1)), 0)
    return table.astype(np.int64)


_SDIV = _div_table(255)
_HDIV = np.where(np.arange(256) > 0, np.rint((180 << _SHIFT) / (6.0 * np.maximum(np.arange(256), 1))), 0
                 ).astype(np.int64)


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit RGB -> HSV: H = hue / 2 (0..179), S, V in 0..255. ``rgb``: ``HxWx3`` uint8."""
    c = rgb.astype(np.int64)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    diff = v - vmin
    half = 1 << (_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# OpenCV's sector table: which of (v, p, q, t) goes to (b, g, r) in each 60-degree sector
_SECTOR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit HSV (H 0..179) -> RGB uint8."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    frac = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector = np.where(bad, 0, sector)
    frac = np.where(bad, np.float32(0), frac).astype(np.float32)
    tab = np.stack([v, v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))], axis=-1)
    idx = _SECTOR[sector]  # H x W x 3 (b, g, r)
    bgr = np.take_along_axis(tab, idx, axis=-1)
    grey = s == 0
    bgr = np.where(grey[..., None], v[..., None], bgr)
    rgb = bgr[..., ::-1] * np.float32(255.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hsv_jitter(image: np.ndarray, dh: int, ds: int, dv: int) -> np.ndarray:
    """Shift hue (mod 180), saturation and value (clipped) of a uint8 RGB image by integer amounts."""
    hsv = rgb_to_hsv_u8(image).astype(np.int64)
    hsv[..., 0] = (hsv[..., 0] + int(dh)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(ds), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + int(dv), 0, 255)
    return hsv_to_rgb_u8(hsv.astype(np.uint8))


def resize_bicubic_u8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize (a = -0.75, half-pixel centres, no antialiasing, as ``cv2.INTER_CUBIC``); uint8 in and
    out (rounded, clipped)."""
    if image.shape[:2] == tuple(size):
        return image.copy()
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=size, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _nearest(mask: np.ndarray, size: tuple[int, int], r: float) -> np.ndarray:
    """``cv2.INTER_NEAREST`` with scale ``r``: output pixel i takes input ``floor(i / r)`` (clipped)."""
    ys = np.minimum(np.floor(np.arange(size[0]) / r).astype(np.int64), mask.shape[0] - 1)
    xs = np.minimum(np.floor(np.arange(size[1]) / r).astype(np.int64), mask.shape[1] - 1)
    return np.ascontiguousarray(mask[ys[:, None], xs[None, :]])


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
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

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
        h, w = img.shape[:2]
        size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5)))
        img = resize_bicubic_u8(np.ascontiguousarray(img), size)
        masks = {k: _nearest(m, size, r) for k, m in masks.items()}
        x = (img.astype(np.float32) - self.mean) / self.std
        c = self.crop_size
        h, w = size
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
