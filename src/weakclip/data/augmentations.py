"""The random training augmentations (mmseg 0.19's): :class:`RandomResize`, :class:`RandomCrop` (class-ratio
bound), :class:`RandomFlip` and :class:`PhotometricDistortion` with its RGB/HSV conversions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.resampling import _resize_sample, rescale_size
from weakclip.data.transform_base import Sample, _check_sample, _mask_keys, _pair, _resolve_rng, _Transform
from weakclip.errors import DataError


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
