"""Resizing as mmcv does (OpenCV's arithmetic): the keep-ratio size rule, images (bilinear), label maps
(nearest), and a whole sample (the image and its label maps together)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from weakclip.data.transform_base import Sample, _mask_keys


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
