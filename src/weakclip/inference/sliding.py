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

from collections import deque
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from weakclip.data.resampling import rescale_size
from weakclip.inference.batching import WindowRunner

__all__ = [
    "AVERAGE_MODES",
    "RELEASE_SCALES",
    "RESIZE_MODES",
    "multiscale_inference",
    "multiscale_inference_batch",
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
#: How :func:`multiscale_inference` resizes the image per scale: OpenCV on the host (the release) or torch.
RESIZE_MODES: tuple[str, ...] = ("opencv", "torch")


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


def _padded_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """The size a window goes to the model at: a multiple of ``divisor``, at least 32 a side.

    A window under 32 px a side would leave the stride-32 pyramid level empty (the release crashes
    there); such tiny windows are zero-padded to 32 and the padding cropped off again.
    """
    if divisor > 1:
        height, width = height + (-height) % divisor, width + (-width) % divisor
    return max(height, _MIN_SIDE), max(width, _MIN_SIDE)


class _Pass:
    """One view of one image (a scale, flipped or not): its windows and their running sums."""

    __slots__ = ("image", "windows", "on_done", "sums", "count", "left")

    def __init__(self, image: torch.Tensor, windows: list[tuple[int, int, int, int]], on_done) -> None:
        self.image = image  # 1 x 3 x h x w, normalised, on the device
        self.windows = windows
        self.on_done = on_done  # called with the window average, 1 x K x h x w
        self.sums: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.left = len(windows)


def _run_passes(passes: Sequence[_Pass], runner: WindowRunner, num_classes: int, size_divisor: int,
                average: str) -> None:
    """Run the windows of every pass through ``runner`` and hand each pass its window average.

    Windows of one padded size go to the model together, whichever pass (scale, flip, image) they come
    from; a batch always starts at the oldest window still waiting, so passes finish, and free their
    sums, in about the order they were given. Within a pass the windows are added in grid order, so one
    window at a time (the release) adds exactly as a plain loop over the grid does.
    """
    queues: dict[tuple[int, int], deque] = {}
    order = 0
    for p in passes:
        for win in p.windows:
            key = _padded_size(win[1] - win[0], win[3] - win[2], size_divisor)
            queues.setdefault(key, deque()).append((order, p, win))
            order += 1
    if not queues:
        return
    device = passes[0].image.device
    runner.resolve(device, max(queues, key=lambda k: k[0] * k[1]))  # sized for the largest window
    while queues:
        key = min(queues, key=lambda k: queues[k][0][0])
        queue = queues[key]
        taken = [queue.popleft() for _ in range(min(runner.limit, len(queue)))]  # lowered after an OOM
        if not queue:
            del queues[key]
        crops = []
        for _, p, (y1, y2, x1, x2) in taken:
            crop = p.image[:, :, y1:y2, x1:x2]
            ph, pw = key[0] - (y2 - y1), key[1] - (x2 - x1)
            crops.append(F.pad(crop, (0, pw, 0, ph)) if (ph or pw) else crop)
        logits = runner(torch.cat(crops))
        for j, (_, p, (y1, y2, x1, x2)) in enumerate(taken):
            if p.sums is None:
                h, w = p.image.shape[-2:]
                p.sums = torch.zeros(1, num_classes, h, w, device=device, dtype=torch.float32)
                p.count = torch.zeros(1, 1, h, w, device=device, dtype=torch.float32)
            part = logits[j:j + 1, :, :y2 - y1, :x2 - x1]
            p.sums[:, :, y1:y2, x1:x2] += part.softmax(dim=1) if average == "probs" else part
            p.count[:, :, y1:y2, x1:x2] += 1
            p.left -= 1
            if p.left == 0:
                result = p.sums.div_(p.count)
                p.sums = p.count = p.image = None
                p.on_done(result)


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
        window_batch: windows per forward pass, from any of the ``B`` images (0: as many as the free
            memory allows, :class:`~weakclip.inference.batching.WindowRunner`).
        size_divisor: windows are zero-padded (bottom/right) to a multiple of it before the model (1: none,
            the release).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast on CUDA.
    """
    if image.dim() != 4 or image.shape[0] < 1 or image.shape[1] != 3:
        raise ValueError(f"slide_inference takes images B x 3 x H x W, got {tuple(image.shape)}")
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    windows = window_grid(image.shape[-2], image.shape[-1], crop, stride)
    runner = WindowRunner(model, num_classes, window_batch=window_batch, autocast_dtype=autocast_dtype)
    results: list[torch.Tensor | None] = [None] * image.shape[0]

    def keep(b: int):
        return lambda out: results.__setitem__(b, out)

    _run_passes([_Pass(image[b:b + 1], windows, keep(b)) for b in range(image.shape[0])], runner,
                num_classes, size_divisor, average)
    return torch.cat(results)


def scaled_size(height: int, width: int, ratio: float, base_scale: Sequence[int] = (2048, 512)
                ) -> tuple[int, int]:
    """``(h, w)`` of an image at ``ratio`` of ``base_scale``, aspect kept (mmseg's keep-ratio resize)."""
    target = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
    return rescale_size(height, width, target)


def _host_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous ``H x W x 3`` uint8 array on the host (for OpenCV) of a numpy or torch image."""
    if isinstance(image, torch.Tensor):
        t = image if image.shape[-1] == 3 else image.permute(1, 2, 0)
        image = t.detach().to("cpu").round().clamp(0, 255).to(torch.uint8).numpy()
    return np.ascontiguousarray(image, dtype=np.uint8)


def _image_hw(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of an ``H x W x 3`` array or a ``3 x H x W`` / ``H x W x 3`` tensor."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        return int(image.shape[0]), int(image.shape[1])
    shape = image.shape[1:] if image.dim() == 3 and image.shape[0] == 3 else image.shape[:2]
    return int(shape[0]), int(shape[1])


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
                         size_divisor: int = 1, resize: str = "opencv") -> torch.Tensor:
    """Test-time-augmented class probabilities ``K x H x W`` (float32, on ``device``) of a uint8 image.

    Args:
        image: ``H x W x 3`` uint8 RGB (0-255).
        scales: ratios of ``base_scale``; each resize keeps the aspect ratio (:func:`scaled_size`).
        flip: also run each scale horizontally flipped (flipped back before averaging).
        crop, stride: sliding window (pixels at the scaled resolution).
        mean, std: normalisation (0-255 scale, RGB), as the model was trained with.
        num_classes: K; default ``model.num_classes``.
        device: where the model runs; default the device of its first parameter.
        window_batch: windows per forward pass, from any scale and flip whose windows have the same size
            (1: one at a time, the release; 0: as many as the free memory allows).
        average, size_divisor: see :func:`slide_inference`.
        resize: ``"opencv"`` (the release's mmseg ``Resize``: ``cv2.resize(img, (w, h), INTER_LINEAR)`` of
            the uint8 image on the CPU, OpenCV's fixed-point arithmetic) or ``"torch"`` (bilinear on
            ``device``, half-pixel centres, rounded to 8 bits: no copy to the CPU, up to 1 grey level apart).

    Each scale's image is resized as ``resize`` says and normalised. With ``average="logits"`` (the release)
    each pass's window-averaged logits are resized back to ``H x W`` (bilinear) and softmaxed; with
    ``"probs"`` the window-averaged probabilities are resized back. Each pass's probabilities (flipped back
    for the flipped pass) are added into the one accumulator, then divided by the number of passes. The result
    sums to 1 over the classes at every pixel.
    """
    return multiscale_inference_batch(model, [image], scales, flip, crop, stride, mean, std, base_scale,
                                      num_classes=num_classes, device=device, window_batch=window_batch,
                                      autocast_dtype=autocast_dtype, average=average,
                                      size_divisor=size_divisor, resize=resize)[0]


@torch.inference_mode()
def multiscale_inference_batch(model: nn.Module, images: Sequence[np.ndarray],
                               scales: Sequence[float] = RELEASE_SCALES, flip: bool = True, crop: int = 512,
                               stride: int = 341, mean: Sequence[float] = IMAGENET_MEAN,
                               std: Sequence[float] = IMAGENET_STD, base_scale: Sequence[int] = (2048, 512),
                               *, num_classes: int | None = None, device: str | torch.device | None = None,
                               window_batch: int | WindowRunner = 1,
                               autocast_dtype: torch.dtype | None = None, average: str = "logits",
                               size_divisor: int = 1, resize: str = "opencv",
                               out_sizes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """:func:`multiscale_inference` of several images at once: the windows of all their scales and flips
    share forward passes (windows of one size go together), so a GPU gets full batches even from small
    scales and small images. Returns one ``K x H_i x W_i`` tensor per image, each the same (to float
    rounding) as :func:`multiscale_inference` of that image alone.

    ``out_sizes``: the ``(h, w)`` of each image's probabilities (default: the image's size): each pass's
    result is resized to it instead of the image's size, so a very large photo's probabilities are held at a
    bounded size (:class:`weakclip.segmenters.RefinementSegmenter`, ``max_side``); what the network sees does
    not change (each scale is resized from the full image).

    ``window_batch`` may also be a :class:`~weakclip.inference.batching.WindowRunner` to keep its batch
    size (chosen by free memory, or lowered after an out-of-memory error) from one call to the next.
    """
    if not scales:
        raise ValueError("multiscale_inference needs at least one scale")
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    k = int(num_classes if num_classes is not None else model.num_classes)
    if isinstance(window_batch, WindowRunner):
        runner = window_batch
    else:
        runner = WindowRunner(model, k, window_batch=window_batch, autocast_dtype=autocast_dtype)
    mean_t = torch.tensor([float(m) for m in mean], device=device).view(1, 3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], device=device).view(1, 3, 1, 1)
    accs: list[torch.Tensor] = []
    passes: list[_Pass] = []

    def finish(i: int, size: tuple[int, int], flipped: bool):
        def done(out: torch.Tensor) -> None:
            if tuple(out.shape[-2:]) != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            if average == "logits":
                out = out.softmax(dim=1)
            accs[i].add_((out.flip(-1) if flipped else out)[0])
        return done

    if out_sizes is not None and len(out_sizes) != len(images):
        raise ValueError(f"out_sizes has {len(out_sizes)} sizes for {len(images)} images")
    for i, image in enumerate(images):
        h, w = _image_hw(image)
        size = (h, w) if out_sizes is None else (int(out_sizes[i][0]), int(out_sizes[i][1]))
        accs.append(torch.zeros(k, *size, device=device, dtype=torch.float32))
        src = None  # the full image as float on the device: made only when a scale needs it
        for ratio in scales:
            sh, sw = scaled_size(h, w, float(ratio), base_scale)
            if resize == "opencv" and (sh, sw) != (h, w):
                resized = cv2.resize(_host_uint8(image), (sw, sh), interpolation=cv2.INTER_LINEAR)
                scaled = _to_device_image(resized, device)
            else:
                if src is None:
                    src = _to_device_image(image, device)
                scaled = src
                if (sh, sw) != (h, w):
                    scaled = F.interpolate(src, size=(sh, sw), mode="bilinear", align_corners=False)
                    scaled = scaled.round_().clamp_(0, 255)
            scaled = (scaled - mean_t) / std_t
            windows = window_grid(sh, sw, crop, stride)
            passes.append(_Pass(scaled, windows, finish(i, size, False)))
            if flip:
                passes.append(_Pass(scaled.flip(-1), windows, finish(i, size, True)))
        del src
    _run_passes(passes, runner, k, size_divisor, average)
    n_passes = len(scales) * (2 if flip else 1)
    return [acc.div_(n_passes) for acc in accs]
