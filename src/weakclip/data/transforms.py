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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import IGNORE_INDEX
from weakclip.errors import DataError

Sample = dict[str, Any]

#: Keys of the ``HxW`` label maps that geometric transforms move together with the image.
MASK_KEYS: tuple[str, ...] = ("seed", "gt")

# Normalisation constants in the 0-255 scale, RGB order.
CLIP_MEAN: tuple[float, float, float] = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD: tuple[float, float, float] = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------
# randomness


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy's global state (and ``random``) from torch's seed.

    Inside a worker ``torch.initial_seed()`` is the DataLoader's base seed (drawn from its
    ``generator``) plus the worker id, so each worker gets its own stream and a seeded
    ``torch.Generator`` makes the whole data loading reproducible.
    """
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _resolve_rng(call_rng: np.random.Generator | None, own_rng: np.random.Generator | None):
    if call_rng is not None:
        return call_rng
    if own_rng is not None:
        return own_rng
    # A new Generator per call, seeded from numpy's global (per-worker seeded) state.
    return np.random.default_rng(np.random.randint(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------------
# helpers


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {size!r}")
    return int(size[0]), int(size[1])


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` on a contiguous, writable array (read-only inputs, e.g. from PIL, are copied)."""
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def _mask_keys(sample: Sample) -> list[str]:
    return [k for k in MASK_KEYS if sample.get(k) is not None]


def _check_sample(sample: Sample) -> tuple[int, int]:
    """Shape checks shared by the geometric transforms; returns the image's ``(H, W)``."""
    img = sample.get("image")
    sid = sample.get("id", "?")
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise DataError(f"sample {sid}: 'image' must be an HxWx3 numpy array, got shape {shape}")
    h, w = img.shape[:2]
    for k in _mask_keys(sample):
        m = sample[k]
        if not isinstance(m, np.ndarray) or m.shape != (h, w):
            raise DataError(
                f"sample {sid}: '{k}' has shape {getattr(m, 'shape', None)}, the image is {h}x{w}"
            )
    return h, w


def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """Output ``(new_h, new_w)`` of a keep-ratio resize to ``scale`` (mmcv ``imrescale`` rule).

    The scale factor is the largest for which the long edge fits ``max(scale)`` and the short
    edge fits ``min(scale)``; sizes are rounded to the nearest integer (at least 1).
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=INTER_LINEAR)`` to ``(h, w)``, as mmcv's ``imresize`` (the
    release's ``Resize``): OpenCV's own arithmetic (fixed-point weights on uint8).

    uint8 in -> uint8 out; float in -> float32 out.
    """
    h, w = size
    if img.shape[:2] == (h, w):
        return img.copy()
    src = np.ascontiguousarray(img if img.dtype == np.uint8 else img.astype(np.float32, copy=False))
    return np.ascontiguousarray(cv2.resize(src, (int(w), int(h)), interpolation=cv2.INTER_LINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(mask, (w, h), interpolation=INTER_NEAREST)``, as mmcv's
    ``imresize(interpolation='nearest')`` of a label map: output pixel ``i`` takes input
    ``floor(i * in / out)`` (no new labels)."""
    h, w = size
    m = np.asarray(mask)
    if m.dtype in (np.uint8, np.uint16, np.int16, np.int32, np.float32):
        return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(m), (int(w), int(h)),
                                               interpolation=cv2.INTER_NEAREST))
    out = cv2.resize(np.ascontiguousarray(m.astype(np.int32)), (int(w), int(h)),
                     interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(out.astype(m.dtype))


def _resize_sample(sample: Sample, size: tuple[int, int], masks: bool = True) -> Sample:
    out = dict(sample)
    out["image"] = resize_image(sample["image"], size)
    if masks:
        for k in _mask_keys(sample):
            out[k] = resize_mask(sample[k], size)
    return out


# --------------------------------------------------------------------------------------------------
# transforms


class Compose:
    """Apply transforms in order; a ``rng`` (given here or to the call) is forwarded to each one."""

    def __init__(self, transforms: Sequence[Callable], rng: np.random.Generator | None = None):
        self.transforms = list(transforms)
        self.rng = rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else self.rng
        for t in self.transforms:
            sample = t(sample, rng=rng) if isinstance(t, _Transform) else t(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class _Transform:
    """Base: ``__call__(sample, rng=None)``; deterministic transforms ignore ``rng``."""

    rng: np.random.Generator | None = None

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "rng")
        return f"{type(self).__name__}({args})"


class Resize(_Transform):
    """Deterministic resize.

    ``keep_ratio=True`` (the default): rescale keeping the aspect ratio so that the long edge is at
    most ``max(scale)`` and the short edge at most ``min(scale)`` (see :func:`rescale_size`).
    ``keep_ratio=False``: resize to exactly ``scale`` given as ``(w, h)`` (mmcv's convention).
    Bilinear for the image, nearest for the masks. ``resize_masks=False`` leaves the masks at the
    input resolution (test time: evaluation happens at the original size). The input's ``(H, W)``
    is recorded as ``"ori_shape"`` unless already present.
    """

    def __init__(self, scale: Sequence[int] = (2048, 512), keep_ratio: bool = True,
                 resize_masks: bool = True):
        self.scale = _pair(scale, "scale")
        self.keep_ratio = keep_ratio
        self.resize_masks = resize_masks

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.keep_ratio:
            return rescale_size(h, w, self.scale)
        return self.scale[1], self.scale[0]

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        h, w = _check_sample(sample)
        out = _resize_sample(sample, self.target_size(h, w), masks=self.resize_masks)
        out.setdefault("ori_shape", (h, w))
        return out


class RandomResize(_Transform):
    """Random keep-ratio resize: ``r ~ U(ratio_range)``, target ``(scale[0] * r, scale[1] * r)``.

    As mmseg's ``Resize(img_scale=scale, ratio_range=..., keep_ratio=True)``: the long edge ends at
    most ``int(max(scale) * r)``, the short edge at most ``int(min(scale) * r)``, aspect kept.
    """

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 rng: np.random.Generator | None = None):
        self.scale = _pair(scale, "scale")
        lo, hi = float(ratio_range[0]), float(ratio_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = (lo, hi)
        self.rng = rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        g = _resolve_rng(rng, self.rng)
        h, w = _check_sample(sample)
        r = g.uniform(*self.ratio_range)
        target = (int(self.scale[0] * r), int(self.scale[1] * r))
        return _resize_sample(sample, rescale_size(h, w, target))


class RandomCrop(_Transform):
    """Random crop of ``size`` (``int`` or ``(h, w)``); a smaller image gives a smaller crop.

    With ``cat_max_ratio < 1`` a crop is redrawn (up to ``max_tries`` times after the first draw, as
    mmseg) while it does not hold at least two classes with none covering ``cat_max_ratio`` or more
    of its non-ignored pixels; judged on ``"seed"`` when present, else ``"gt"``. Retries are skipped
    when the whole map has fewer than two classes (no crop could pass). If every draw fails, the
    draw with the smallest largest-class share is kept (mmseg keeps its last draw: same intent,
    never worse).
    """

    def __init__(self, size: int | Sequence[int] = 512, cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, max_tries: int = 10,
                 rng: np.random.Generator | None = None):
        self.size = _pair(size, "size")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = max(0, int(max_tries))
        self.rng = rng

    def _largest_share(self, seg: np.ndarray) -> float:
        """Largest class share of the non-ignored pixels; 1.0 when fewer than two classes."""
        counts = np.bincount(seg.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) < 2:
            return 1.0
        return float(counts.max() / counts.sum())

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        g = _resolve_rng(rng, self.rng)
        h, w = _check_sample(sample)
        ch, cw = min(self.size[0], h), min(self.size[1], w)

        def draw() -> tuple[int, int]:
            return int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))

        y, x = draw()
        key = "seed" if sample.get("seed") is not None else ("gt" if sample.get("gt") is not None else None)
        if key is not None and self.cat_max_ratio < 1.0 and (ch, cw) != (h, w):
            seg = sample[key]
            if self._largest_share(seg) < 1.0:  # at least two classes in the whole map
                best, best_share = (y, x), self._largest_share(seg[y:y + ch, x:x + cw])
                tries = 0
                while best_share >= self.cat_max_ratio and tries < self.max_tries:
                    y, x = draw()
                    tries += 1
                    share = self._largest_share(seg[y:y + ch, x:x + cw])
                    if share < best_share:
                        best, best_share = (y, x), share
                y, x = best

        out = dict(sample)
        out["image"] = np.ascontiguousarray(sample["image"][y:y + ch, x:x + cw])
        for k in _mask_keys(sample):
            out[k] = np.ascontiguousarray(sample[k][y:y + ch, x:x + cw])
        return out


class RandomFlip(_Transform):
    """Horizontal flip of the image and the masks with probability ``prob``."""

    def __init__(self, prob: float = 0.5, rng: np.random.Generator | None = None):
        self.prob = float(prob)
        self.rng = rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        g = _resolve_rng(rng, self.rng)
        _check_sample(sample)
        if g.random() >= self.prob:
            return dict(sample)
        out = dict(sample)
        out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
        for k in _mask_keys(sample):
            out[k] = np.ascontiguousarray(sample[k][:, ::-1])
        return out


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Vectorised RGB -> HSV on floats in [0, 1]; hue in [0, 1) (a full turn is 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, maxc], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


class PhotometricDistortion(_Transform):
    """mmseg-style photometric distortion of the image only (masks untouched), uint8 in and out.

    Each op is applied with probability 0.5, in this order: brightness (add ``U(-delta, delta)``);
    contrast (multiply by ``U(contrast_range)``) first or last, by a fair coin; saturation
    (multiply S by ``U(saturation_range)``) and hue (shift H by an integer in
    ``[-hue_delta, hue_delta]`` in OpenCV's uint8 units, i.e. 2 degrees each) in HSV. Values are
    clipped to [0, 255] after every op; the work is done in float32 and rounded once at the end.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18,
                 rng: np.random.Generator | None = None):
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        self.rng = rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        g = _resolve_rng(rng, self.rng)
        img = sample["image"]
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            raise DataError(f"sample {sample.get('id', '?')}: 'image' must be an HxWx3 numpy array")
        x = img.astype(np.float32)

        if g.integers(2):
            x = np.clip(x + g.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = bool(g.integers(2))
        if contrast_first and g.integers(2):
            x = np.clip(x * g.uniform(*self.contrast_range), 0, 255)
        do_sat, do_hue = bool(g.integers(2)), bool(g.integers(2))
        if do_sat or do_hue:
            hsv = rgb_to_hsv(x / 255.0)
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * g.uniform(*self.saturation_range), 0, 1)
            if do_hue:
                shift = int(g.integers(-self.hue_delta, self.hue_delta + 1))
                hsv[..., 0] = (hsv[..., 0] + shift / 180.0) % 1.0
            x = np.clip(hsv_to_rgb(hsv) * 255.0, 0, 255)
        if not contrast_first and g.integers(2):
            x = np.clip(x * g.uniform(*self.contrast_range), 0, 255)

        out = dict(sample)
        out["image"] = np.rint(x).astype(np.uint8) if img.dtype == np.uint8 else x
        return out


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


class Pad(_Transform):
    """Pad bottom/right to at least ``size`` (``int`` or ``(h, w)``); larger sides are left alone.

    The image is padded with ``pad_value`` and the masks with ``seg_pad_value`` (255 = ignore, so
    padded pixels carry no loss). In the pipeline Pad runs after :class:`Normalize`, as in the
    release, so ``pad_value=0`` means the *mean colour* (zero in normalised space), not black.
    Works on numpy ``HxWxC`` images and on torch ``CxHxW`` tensors.
    """

    def __init__(self, size: int | Sequence[int] = 512, pad_value: float = 0,
                 seg_pad_value: int = IGNORE_INDEX):
        self.size = _pair(size, "size")
        self.pad_value = pad_value
        self.seg_pad_value = int(seg_pad_value)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        img = sample["image"]
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
            if ph or pw:
                out["image"] = F.pad(img, (0, pw, 0, ph), value=float(self.pad_value))
        else:
            h, w = img.shape[:2]
            ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
            if ph or pw:
                widths = ((0, ph), (0, pw)) + ((0, 0),) * (img.ndim - 2)
                out["image"] = np.pad(img, widths, constant_values=self.pad_value)
        if ph or pw:
            for k in _mask_keys(sample):
                m = sample[k]
                if isinstance(m, torch.Tensor):
                    out[k] = F.pad(m, (0, pw, 0, ph), value=self.seg_pad_value)
                else:
                    out[k] = np.pad(m, ((0, ph), (0, pw)), constant_values=self.seg_pad_value)
        return out


class ToTensor(_Transform):
    """numpy -> torch: image ``HxWx3`` -> float32 ``3xHxW``; masks -> int64 ``HxW``; labels -> float32.

    The image is not rescaled (values stay as they are: normalised floats, or 0-255).
    """

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        img = sample["image"]
        if not isinstance(img, torch.Tensor):
            img = _to_torch(np.asarray(img).transpose(2, 0, 1))
        out["image"] = img.float()
        for k in _mask_keys(sample):
            m = sample[k]
            out[k] = (m if isinstance(m, torch.Tensor) else _to_torch(np.asarray(m))).long()
        if sample.get("labels") is not None:
            out["labels"] = torch.tensor(np.asarray(sample["labels"], dtype=np.float32))
        return out


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
