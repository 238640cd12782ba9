"""Validation of a retrained segmenter: multi-scale + flip inference, optional dense CRF, confusion-matrix
mIoU.

Each image is evaluated at its full resolution: for every scale ``s`` the normalised image is resized to ``s``
times its size, the logits are resized back and turned into probabilities; with ``flip`` the mirrored image is
added too; the softmax maps are averaged (or, ``fuse="logits"``, the logits, then one softmax: the authors'
DeepLab-v1 test, which also upsamples with ``align_corners=True``). ``resize="opencv"`` is the authors' test
exactly: the release's ``ImageNorm`` then ``Multiscale`` (``cv2.resize(fx=s, fy=s, INTER_CUBIC)`` of the
float32 normalised image, OpenCV choosing the size and the grid), on the CPU with OpenCV itself; ``"bicubic"``
/ ``"bilinear"`` resample with torch on the model's device by the rounded size ratio (faster on a GPU; sizes
and values differ from OpenCV's, a named departure). With a CRF the averaged probabilities are
refined by :func:`weakclip.crf.dense_crf_numpy` (pydensecrf2) on the original RGB image. The argmax is scored
against the ground truth (255 ignored) with :class:`weakclip.metrics.ConfusionMatrix`; under torchrun every
process takes every ``world_size``-th image and the matrices are summed across processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.distributed import DistInfo
from weakclip.metrics import ConfusionMatrix, SegScores

__all__ = ["MS_SCALES", "RELEASE_SCALES", "RESIZE_MODES", "crf_present", "evaluate_segmenter",
           "predict_probs", "predict_probs_batch", "write_eval"]

#: The usual multi-scale test set (DeepLab / the release's inference scales).
MS_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
#: The authors' DeepLab-v1 test scales (``tools/test.py --test_multiscale``).
RELEASE_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
#: How :func:`predict_probs` rescales the normalised image per scale.
RESIZE_MODES: tuple[str, ...] = ("opencv", "bicubic", "bilinear")


def _scaled_inputs(image: np.ndarray, mean: Sequence[float], std: Sequence[float], scales: Sequence[float],
                   resize: str, device: torch.device):
    """The ``1 x 3 x h x w`` normalised input on ``device`` for each scale, in order."""
    if resize == "opencv":
        from weakclip.retrain.augment import release_normalize, release_rescale

        normed = release_normalize(image, mean, std)
        for scale in scales:
            xs = release_rescale(normed, scale)
            yield torch.from_numpy(np.ascontiguousarray(xs.transpose(2, 0, 1)))[None].to(device)
        return
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = (x - m) / s
    h, w = x.shape[-2:]
    for scale in scales:
        size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        yield x if size == (h, w) else F.interpolate(x, size=size, mode=resize, align_corners=False)


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float],
                  scales: Sequence[float] = (1.0,), flip: bool = False,
                  device: torch.device | str = "cpu", *, fuse: str = "probs", resize: str = "bilinear",
                  align_corners: bool = False) -> torch.Tensor:
    """Class probabilities K x H x W (CPU float32) of one ``H x W x 3`` uint8 image over ``scales`` (and their
    mirror images with ``flip``).

    ``fuse="probs"``: the mean of the softmax maps; ``"logits"``: the softmax of the mean logits (the authors'
    DeepLab-v1 test). ``resize``: how the normalised image is rescaled: ``"opencv"`` (the authors' test:
    :func:`weakclip.retrain.augment.release_normalize`, then ``cv2.resize(fx=s, fy=s, INTER_CUBIC)``), or
    torch's ``"bilinear"`` / ``"bicubic"`` to ``round(s * size)``; ``align_corners``: of the bilinear
    upsampling of the logits back to the image size (True in the authors' test).
    """
    if fuse not in ("probs", "logits"):
        raise ValueError(f"fuse must be probs or logits, got {fuse!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    device = torch.device(device)
    h, w = image.shape[:2]
    total = None
    n = 0
    for xs in _scaled_inputs(image, mean, std, scales, resize, device):
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = model(batch).float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
        part = logits.sum(dim=0) if fuse == "logits" else logits.softmax(dim=1).sum(dim=0)
        total = part if total is None else total + part
        n += logits.shape[0]
    mean_map = total / n
    return (mean_map.softmax(dim=0) if fuse == "logits" else mean_map).cpu()


@torch.no_grad()
def predict_probs_batch(model: nn.Module, images: Sequence[np.ndarray], mean: Sequence[float],
                        std: Sequence[float], scales: Sequence[float] = (1.0,), flip: bool = False,
                        device: torch.device | str = "cpu", *, fuse: str = "probs", resize: str = "bilinear",
                        align_corners: bool = False) -> list[torch.Tensor]:
    """:func:`predict_probs` of several images of ONE size at once: per scale, every image and (with ``flip``)
    every mirror image go through the model in one batch. The same as one image at a time up to float
    rounding (BatchNorm is in eval mode); one image is exactly :func:`predict_probs`."""
    images = list(images)
    if len(images) == 1:
        return [predict_probs(model, images[0], mean, std, scales, flip, device, fuse=fuse, resize=resize,
                              align_corners=align_corners)]
    if not images:
        return []
    if fuse not in ("probs", "logits"):
        raise ValueError(f"fuse must be probs or logits, got {fuse!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("predict_probs_batch takes images of one size; group them first")
    device = torch.device(device)
    n = len(images)
    streams = [_scaled_inputs(im, mean, std, scales, resize, device) for im in images]
    total = None
    for _ in scales:
        xs = torch.cat([next(stream) for stream in streams])
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = model(batch).float()
        # n x passes x K x h x w (passes: the image and, with flip, its mirror flipped back)
        logits = torch.stack([logits[:n], logits[n:].flip(-1)], dim=1) if flip else logits[:, None]
        passes = logits.shape[1]
        logits = F.interpolate(logits.flatten(0, 1), size=(h, w), mode="bilinear",
                               align_corners=align_corners)
        logits = logits.view(n, passes, *logits.shape[1:])
        part = logits.sum(dim=1) if fuse == "logits" else logits.softmax(dim=2).sum(dim=1)
        total = part if total is None else total + part
    count = len(scales) * (2 if flip else 1)
    mean_maps = total / count
    out = mean_maps.softmax(dim=1) if fuse == "logits" else mean_maps
    return list(out.cpu())


def crf_present(image: np.ndarray, probs: np.ndarray, params) -> np.ndarray:
    """The authors' CRF (``tools/make_crf.py``): only the classes of the argmax take part; their probabilities
    are renormalised (the softmax of their logits), refined by the dense CRF, and the label map returned."""
    from weakclip.crf import dense_crf_numpy

    keys = np.unique(probs.argmax(axis=0))
    if len(keys) == 1:
        return np.full(probs.shape[1:], keys[0], dtype=keys.dtype)
    sub = probs[keys]
    sub = sub / np.maximum(sub.sum(axis=0, keepdims=True), 1e-20)
    refined = dense_crf_numpy(image, np.ascontiguousarray(sub, dtype=np.float32), params)
    return keys[refined.argmax(axis=0)]


def evaluate_segmenter(model: nn.Module, dataset, *, mean: Sequence[float], std: Sequence[float],
                       scales: Sequence[float] = (1.0,), flip: bool = False, crf=None,
                       info: DistInfo | None = None, progress: bool = True, max_images: int | None = None,
                       pred_dir: str | Path | None = None, fuse: str = "probs", resize: str = "bilinear",
                       align_corners: bool = False,
                       crf_classes: str = "all") -> tuple[SegScores, dict[str, Any]]:
    """mIoU of ``model`` on ``dataset`` (which must have ground truth); ``crf``: a
    :class:`weakclip.crf.DenseCRFParams` or None, over all classes or (``crf_classes="present"``) only those
    of the argmax (:func:`crf_present`). ``fuse`` / ``resize`` / ``align_corners``: see :func:`predict_probs`.
    Returns the merged scores and a record of the settings. ``pred_dir``: also write each prediction as a
    palette PNG there."""
    from tqdm import tqdm

    from weakclip.data.io import write_label_png
    from weakclip.errors import DataError

    if not getattr(dataset, "has_gt", False):
        raise DataError(f"the validation set {dataset!r} has no ground-truth masks to evaluate against")
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    device = info.device if info is not None else next(model.parameters()).device
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    indices = list(range(rank, n, world))
    cm = ConfusionMatrix(dataset.classes)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(indices, desc="evaluate", disable=not progress or rank != 0, dynamic_ncols=True)
        for i in bar:
            sample = dataset[i]
            probs = predict_probs(model, sample["image"], mean, std, scales, flip, device, fuse=fuse,
                                  resize=resize, align_corners=align_corners)
            if crf is not None and crf_classes == "present":
                pred = crf_present(sample["image"], probs.numpy(), crf)
            elif crf is not None:
                from weakclip.crf import dense_crf_numpy

                pred = dense_crf_numpy(sample["image"], probs.numpy(), crf).argmax(axis=0)
            else:
                pred = probs.argmax(dim=0).numpy()
            pred = pred.astype(np.uint8)
            cm.update(pred, sample["gt"], name=str(sample["id"]))
            if pred_dir is not None:
                write_label_png(Path(pred_dir) / f"{sample['id']}.png", pred)
    finally:
        model.train(was_training)
    cm.all_reduce()
    record = {"images": n, "scales": [float(s) for s in scales], "flip": bool(flip),
              "crf": None if crf is None else dataclasses.asdict(crf), "fuse": fuse, "resize": resize,
              "align_corners": bool(align_corners), "crf_classes": crf_classes}
    return cm.scores(), record


def write_eval(path: str | Path, scores: SegScores, record: dict[str, Any]) -> Path:
    """Write the scores (percent) and the record as JSON, atomically."""
    from weakclip.data.io import write_json_atomic

    return write_json_atomic(path, {**scores.to_dict(), **record})
