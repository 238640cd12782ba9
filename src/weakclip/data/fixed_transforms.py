"""The deterministic transforms of both pipelines besides normalisation: keep-ratio or exact
:class:`Resize`, bottom/right :class:`Pad`, numpy-to-torch :class:`ToTensor`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.resampling import _resize_sample, rescale_size
from weakclip.data.transform_base import Sample, _check_sample, _mask_keys, _pair, _to_torch, _Transform


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
