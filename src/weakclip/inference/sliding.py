"""Sliding-window and multi-scale + flip test-time inference, as the release (mmseg 0.19) runs it.

* :func:`slide_inference`: windows of ``crop`` px every ``stride`` px (the last row/column of windows
  is shifted back to end at the border, mmseg's rule, so every pixel is covered); each window's
  logits are resized to the window and averaged over the windows covering a pixel
  (``average="logits"``, the release), or turned into probabilities first and then averaged
  (``average="probs"``, a ``-plus`` switch).
* :func:`multiscale_inference`: for each ratio ``r`` the image is resized keeping its aspect ratio to
  fit ``base_scale * r`` (mmseg's ``MultiScaleFlipAug(img_scale=(2048, 512), img_ratios=...)``),
  normalised, run through :func:`slide_inference` (and again flipped, when ``flip``), and the
  probabilities, resized to the original size, are added IN PLACE into one K x H x W accumulator:
  only one scale is alive at a time, so memory is bounded by the largest scale, not by their number.

As the release (``average="logits"``, ``size_divisor=1``): the window logits are averaged, resized to
the original image (bilinear) and softmaxed once per pass; windows go to the model at any size. The
``-plus`` alternative (``average="probs"``) softmaxes each window first, so every intermediate is a
distribution and the result is exactly a mean of distributions, and ``size_divisor=32`` pads windows
bottom/right with zeros (the mean colour after normalisation) to a multiple of the decoder's stride-32
level, cropping the padding off the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, rescale_size

__all__ = [
    "AVERAGE_MODES",
    "RELEASE_SCALES",
    "multiscale_inference",
    "scaled_size",
    "slide_inference",
    "window_grid",
]

#: The release's test-time ratios of the base scale (2048, 512).
RELEASE_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# Smallest window side the model takes (the stride-32 pyramid level needs one cell).
_MIN_SIDE = 32

#: What a window contributes to the average: its logits (the release) or its softmax.
AVERAGE_MODES: tuple[str, ...] = ("logits", "probs")


def window_grid(height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
                ) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` covering an ``height x width`` image (mmseg's slide rule).

    A side shorter than the crop gives one window of the side's length.
    """
    ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    sh, sw = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop and stride must be positive, got crop {crop} and stride {stride}")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * sh + ch, height)
            x2 = min(c * sw + cw, width)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def _model_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return out["logits"] if isinstance(out, dict) else out


def _pad_to(x: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x


@torch.inference_mode()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int = 512,
                    stride: int = 341, *, window_batch: int = 1, size_divisor: int = 1,
                    autocast_dtype: torch.dtype | None = None, average: str = "logits") -> torch.Tensor:
    """Window-averaged logits (``average="logits"``, the release) or softmax probabilities
    (``average="probs"``), ``B x K x H x W`` float32, of normalised images ``B x 3 x H x W`` of one size
    (e.g. an image and its flip).

    Args:
        model: returns ``{"logits": N x K x h x w}`` (any h, w; resized bilinearly to the window) or
            the logits tensor itself.
        image: normalised images on the model's device.
        window_batch: windows run through the model together (all windows have one size); the same window
            of the ``B`` images always goes together, so a forward pass takes
            ``B * max(1, window_batch // B)`` windows.
        size_divisor: windows are zero-padded (bottom/right) to a multiple of it before the model (1: none,
            the release).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast on CUDA.
    """
    if image.dim() != 4 or image.shape[0] < 1 or image.shape[1] != 3:
        raise ValueError(f"slide_inference takes images B x 3 x H x W, got {tuple(image.shape)}")
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    n, _, h, w = image.shape
    windows = window_grid(h, w, crop, stride)
    probs = torch.zeros(n, num_classes, h, w, device=image.device, dtype=torch.float32)
    count = torch.zeros(1, 1, h, w, device=image.device, dtype=torch.float32)
    amp = (torch.autocast(device_type=image.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    step = max(1, int(window_batch) // n)
    for start in range(0, len(windows), step):
        group = windows[start:start + step]
        wh, ww = group[0][1] - group[0][0], group[0][3] - group[0][2]
        batch = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])  # window-major
        batch = _pad_to(batch, size_divisor) if size_divisor > 1 else batch
        # A window under 32 px a side would leave the stride-32 pyramid level empty (the release crashes
        # there); such tiny windows are zero-padded to 32 and the padding cropped off again.
        short_h, short_w = max(0, _MIN_SIDE - batch.shape[-2]), max(0, _MIN_SIDE - batch.shape[-1])
        if short_h or short_w:
            batch = F.pad(batch, (0, short_w, 0, short_h))
        with amp:
            logits = _model_logits(model, batch)
        if logits.shape[1] != num_classes:
            raise ValueError(f"the model gives {logits.shape[1]} classes, expected {num_classes}")
        logits = F.interpolate(logits.float(), size=batch.shape[-2:], mode="bilinear", align_corners=False)
        p = logits[:, :, :wh, :ww]
        if average == "probs":
            p = p.softmax(dim=1)
        for j, (y1, y2, x1, x2) in enumerate(group):
            probs[:, :, y1:y2, x1:x2] += p[j * n:(j + 1) * n]
            count[:, :, y1:y2, x1:x2] += 1
    return probs.div_(count)


def scaled_size(height: int, width: int, ratio: float, base_scale: Sequence[int] = (2048, 512)
                ) -> tuple[int, int]:
    """``(h, w)`` of an image at ``ratio`` of ``base_scale``, aspect kept (mmseg's keep-ratio resize)."""
    target = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
    return rescale_size(height, width, target)


def _to_device_image(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    else:
        t = image if image.dim() == 3 and image.shape[0] == 3 else image.permute(2, 0, 1)
    return t.to(device=device, dtype=torch.float32).unsqueeze(0)


@torch.inference_mode()
def multiscale_inference(model: nn.Module, image: np.ndarray, scales: Sequence[float] = RELEASE_SCALES,
                         flip: bool = True, crop: int = 512, stride: int = 341,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         base_scale: Sequence[int] = (2048, 512), *, num_classes: int | None = None,
                         device: str | torch.device | None = None, window_batch: int = 1,
                         autocast_dtype: torch.dtype | None = None, average: str = "logits",
                         size_divisor: int = 1) -> torch.Tensor:
    """Test-time-augmented class probabilities ``K x H x W`` (float32, on ``device``) of a uint8 image.

    Args:
        image: ``H x W x 3`` uint8 RGB (0-255).
        scales: ratios of ``base_scale``; each resize keeps the aspect ratio (:func:`scaled_size`).
        flip: also run each scale horizontally flipped (flipped back before averaging).
        crop, stride: sliding window (pixels at the scaled resolution).
        mean, std: normalisation (0-255 scale, RGB), as the model was trained with.
        num_classes: K; default ``model.num_classes``.
        device: where the model runs; default the device of its first parameter.
        average, size_divisor: see :func:`slide_inference`.

    Each scale's image is resized bilinearly (half-pixel centres, no antialiasing, rounded to 8 bits
    like the release's cv2 pipeline) and normalised. With ``average="logits"`` (the release) each pass's
    window-averaged logits are resized back to ``H x W`` (bilinear) and softmaxed; with ``"probs"`` the
    window-averaged probabilities are resized back. Each pass's probabilities (flipped back for the
    flipped pass) are added into the one accumulator, then divided by the number of passes. The result
    sums to 1 over the classes at every pixel.
    """
    if not scales:
        raise ValueError("multiscale_inference needs at least one scale")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    k = int(num_classes if num_classes is not None else model.num_classes)
    src = _to_device_image(image, device)
    h, w = src.shape[-2:]
    mean_t = torch.tensor([float(m) for m in mean], device=device).view(1, 3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], device=device).view(1, 3, 1, 1)
    acc = torch.zeros(k, h, w, device=device, dtype=torch.float32)
    passes = 0
    for ratio in scales:
        sh, sw = scaled_size(h, w, float(ratio), base_scale)
        if (sh, sw) == (h, w):
            scaled = src
        else:
            scaled = F.interpolate(src, size=(sh, sw), mode="bilinear", align_corners=False)
            scaled = scaled.round_().clamp_(0, 255)
        scaled = (scaled - mean_t) / std_t
        # With window batches, an image and its flip share them (same window sizes); one window at a time
        # (the release) runs the passes one after the other.
        views = [scaled, scaled.flip(-1)] if flip else [scaled]
        together = len(views) > 1 and window_batch >= len(views)
        outs = []
        for batch in ([torch.cat(views)] if together else views):
            outs.extend(slide_inference(model, batch, k, crop, stride, window_batch=window_batch,
                                        autocast_dtype=autocast_dtype, average=average,
                                        size_divisor=size_divisor).split(1))
        del views
        for flipped, out in zip((False, True), outs):
            if (sh, sw) != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            if average == "logits":
                out = out.softmax(dim=1)
            acc.add_((out.flip(-1) if flipped else out)[0])
            passes += 1
        del outs, scaled
    return acc.div_(passes)
