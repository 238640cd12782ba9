"""ExCEL's test-time inference, as the release's ``tools/infer_seg_voc.py`` and ``tools/infer_seg_coco.py``.

What their ``_validate`` loop computes for one image (batch 1; the input is the whole uint8 image through
``normalize_img``, :func:`weakclip.methods.excel.augment.normalize_image`, no resizing by the dataset):

1. a base pass: the image resized (``F.interpolate``, bilinear, ``align_corners=False``) to a SQUARE of
   ``resize_size`` x ``resize_size`` (320; the script's help says "resize the long side", the code ignores the
   aspect ratio), batched with its left-right flip, ``model(batch)[0]`` (the segmentation logits), resized
   bilinearly to the output grid. VOC keeps the unflipped prediction only: the flipped one is computed and
   discarded (quirk; it is still computed, in the same batch). COCO averages the
   two (``(a + flip(b)) / 2``);
2. the same for every scale ``s`` of ``(0.7, 1.0, 1.2, 1.5)`` other than 1.0, at ``int(320 * s)`` square
   (224, 384, 480), always averaging with the flip. The base pass is made whatever the scale list holds;
3. the LOGITS (not probabilities) are averaged over the passes (``torch.mean`` of the stack, base first);
4. the output grid: VOC, the image's size; COCO, ``int(0.2 * h) x int(0.2 * w)`` (memory), the average then
   resized bilinearly to the ground truth's size; the label is the argmax;
5. optional dense CRF (``--crf_post``; off in VOC's script, on in COCO's): the averaged logits (COCO: resized
   bilinearly to the image first), softmax, ``utils/dcrf.py`` ``DenseCRF(iter_max=10, pos_xy_std=1, pos_w=3,
   bi_xy_std=67, bi_rgb_std=3, bi_w=4)`` on the uint8 image with pydensecrf (unary ``-log(clip(p, 1e-5))``),
   argmax. The package's pydensecrf backend (:func:`weakclip.crf.dense_crf_numpy`) makes exactly these calls;
   :data:`EXCEL_CRF` holds the parameters (those of ``weakclip.crf.COCO_CRF``).

The release evaluates with ``utils/evaluate.py`` ``scores``: a confusion matrix over pixels whose ground truth
is a class (255 left out), IoU per class, and the mean over the classes present in the ground truth
(:func:`release_miou`). The package's :class:`weakclip.metrics.ConfusionMatrix` averages over the classes
present in the ground truth OR the prediction; the two differ only when a class is predicted somewhere but
absent from every ground truth of the set (the package counts its IoU 0, the release leaves it out). On the
full VOC and COCO val sets every class is present, so the two agree there.

The release reads the test image with ``imageio.v2.imread`` (upright by EXIF with its pinned imageio 2.26.0:
read it with :data:`weakclip.methods.excel.augment.RELEASE_IMAGE_READING`); :func:`infer_image` takes the
image as read.

Images are processed one at a time, as the release does. The segmentation logits of an image do not depend
on its batch (only the affinity prediction and the second CLIP pass take batch-wide means, and neither is used
here; tests/test_excel_forward.py), so batching images would change speed, not masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.crf.params import DenseCRFParams
from weakclip.errors import WeakclipError
from weakclip.methods.excel.augment import normalize_image

__all__ = [
    "COCO_INFERENCE",
    "EXCEL_CRF",
    "TEST_SCALES",
    "TRAINING_VALIDATION",
    "VOC_INFERENCE",
    "ExcelPrediction",
    "InferenceSettings",
    "crf_labels",
    "infer_image",
    "labels_from_logits",
    "multiscale_logits",
    "release_miou",
]

#: ``--scales`` of both scripts.
TEST_SCALES: tuple[float, ...] = (0.7, 1.0, 1.2, 1.5)
#: ``crf_proc``'s ``DenseCRF`` (both scripts): pos_xy_std 1, pos_w 3, bi_xy_std 67, bi_rgb_std 3, bi_w 4,
#: 10 iterations.
EXCEL_CRF = DenseCRFParams(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                           bilateral_compat=4.0, iterations=10)

SegNet = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class InferenceSettings:
    """How an image is segmented (module docstring).

    Args:
        size: side of the square the base pass resizes to (``--resize_size``, 320).
        scales: the pass scales; the base pass is made in any case, a 1.0 here adds nothing (the release's
            loop skips it).
        flip_at_base: average the base pass with its flip (COCO's script: True). VOC's script discards the
            flipped prediction (False, the release's quirk); True there is a departure.
        flip: batch every pass with its flip (both scripts). False runs each pass on the image alone and
            averages nothing: with ``scales=(1.0,)`` that is the release's validation during training
            (``engine/validatation_engine.py``: 320 x 320, batch 1, argmax at the mask's size),
            :data:`TRAINING_VALIDATION`.
        logits_fraction: the averaging grid as a fraction of the image (VOC 1.0, COCO 0.2).
        crf: dense-CRF post-processing (VOC's script: off; COCO's: on).
        crf_params: its parameters (:data:`EXCEL_CRF`).
    """

    size: int = 320
    scales: tuple[float, ...] = TEST_SCALES
    flip_at_base: bool = False
    flip: bool = True
    logits_fraction: float = 1.0
    crf: bool = False
    crf_params: DenseCRFParams = EXCEL_CRF

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise WeakclipError(f"ExCEL test size must be a positive number of pixels, got {self.size}")
        bad = [s for s in self.scales if not float(s) > 0 or int(int(self.size) * float(s)) < 1]
        if bad:
            raise WeakclipError(f"ExCEL test scales must give sizes of at least 1 pixel, got {bad}")
        if not 0 < float(self.logits_fraction) <= 1:
            raise WeakclipError(f"ExCEL logits fraction must be in (0, 1], got {self.logits_fraction}")


#: ``tools/infer_seg_voc.py`` as its script runs it (no CRF).
VOC_INFERENCE = InferenceSettings()
#: ``tools/infer_seg_coco.py`` as its script runs it (CRF on).
COCO_INFERENCE = InferenceSettings(flip_at_base=True, logits_fraction=0.2, crf=True)
#: The segmentation score the release logs every 2,000 iterations (one 320 x 320 pass, no flip, no CRF).
TRAINING_VALIDATION = InferenceSettings(scales=(1.0,), flip=False)


def _logits(net: SegNet, batch: torch.Tensor) -> torch.Tensor:
    """The network's segmentation logits for ``batch`` (``model(batch)[0]`` when it returns a tuple)."""
    out = net(batch)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != batch.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise WeakclipError(f"the network must give B x K x h x w logits for a batch of {batch.shape[0]}, "
                            f"got {shape}")
    return out


def _flip_pass(net: SegNet, image: torch.Tensor, side: int, grid: tuple[int, int], average: bool,
               flip: bool = True) -> torch.Tensor:
    x = F.interpolate(image, size=[side, side], mode="bilinear", align_corners=False)
    if not flip:
        return F.interpolate(_logits(net, x), size=grid, mode="bilinear", align_corners=False)
    seg = _logits(net, torch.cat([x, x.flip(-1)], dim=0))
    seg = F.interpolate(seg, size=grid, mode="bilinear", align_corners=False)
    if not average:
        return seg[0].unsqueeze(0)
    return (seg[:1, ...] + seg[1:, ...].flip(-1)) / 2


def multiscale_logits(net: SegNet, image: torch.Tensor, settings: InferenceSettings = VOC_INFERENCE
                      ) -> torch.Tensor:
    """The averaged logits ``1 x K x h x w`` of one normalised image (``3 x H x W`` or ``1 x 3 x H x W``, on
    the network's device), ``h x w`` the averaging grid (``int(fraction * H) x int(fraction * W)``).

    Runs under ``torch.no_grad``; ``net`` maps a batch to logits (or a tuple whose first item they are)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise WeakclipError(f"ExCEL inference takes one RGB image, 3 x H x W or 1 x 3 x H x W, got "
                            f"{tuple(image.shape)}")
    height, width = image.shape[-2:]
    fraction = float(settings.logits_fraction)
    grid = (max(1, int(fraction * height)), max(1, int(fraction * width)))
    with torch.no_grad():
        passes = [_flip_pass(net, image, int(settings.size), grid, settings.flip_at_base, settings.flip)]
        for scale in settings.scales:
            if float(scale) != 1.0:
                side = int(int(settings.size) * float(scale))
                passes.append(_flip_pass(net, image, side, grid, True, settings.flip))
        return torch.mean(torch.stack(passes, dim=0), dim=0)


def labels_from_logits(logits: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """Argmax of the logits resized bilinearly to ``size`` (``(H, W)``, the ground truth's), int64."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.argmax(logits, dim=1)[0].cpu().numpy().astype(np.int64)


def crf_labels(rgb: np.ndarray, logits: torch.Tensor, params: DenseCRFParams = EXCEL_CRF) -> np.ndarray:
    """``crf_proc``'s ``_job``: the logits resized bilinearly to the image (when not already its size),
    softmax, pydensecrf's dense CRF on the uint8 ``H x W x 3`` image, argmax (int64 ``H x W``)."""
    from weakclip.crf.pydensecrf_backend import dense_crf_numpy

    rgb = np.asarray(rgb)
    size = (int(rgb.shape[0]), int(rgb.shape[1]))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    probs = F.softmax(logits.detach().float(), dim=1)[0].cpu().numpy()
    q = dense_crf_numpy(rgb.astype(np.uint8), probs, params)
    return np.argmax(q, axis=0).astype(np.int64)


@dataclass
class ExcelPrediction:
    """``logits``: the averaged logits ``1 x K x h x w`` (the release's saved ``msc_seg``); ``labels``: their
    argmax at the output size; ``crf``: the dense-CRF labels at the image's size (None without CRF)."""

    logits: torch.Tensor
    labels: np.ndarray
    crf: np.ndarray | None = None


def infer_image(net: SegNet, rgb: np.ndarray, settings: InferenceSettings = VOC_INFERENCE, *,
                device: torch.device | str | None = None, out_size: Sequence[int] | None = None
                ) -> ExcelPrediction:
    """Segment one ``H x W x 3`` uint8 RGB image as the release's test scripts do (module docstring).

    Args:
        net: batch of normalised images -> segmentation logits (any ExCEL network object).
        rgb: the image.
        settings: :data:`VOC_INFERENCE`, :data:`COCO_INFERENCE` or one's own.
        device: where the image goes (the network's device); default: the first parameter's of ``net`` when
            it has one, else the CPU.
        out_size: ``(H, W)`` of the labels (the ground truth's); default the image's.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise WeakclipError(f"ExCEL inference takes an H x W x 3 RGB image, got shape {rgb.shape}")
    if device is None:
        params = getattr(net, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else torch.device("cpu")
    image = torch.from_numpy(np.ascontiguousarray(normalize_image(rgb).transpose(2, 0, 1)))
    logits = multiscale_logits(net, image.to(device), settings)
    size = rgb.shape[:2] if out_size is None else out_size
    labels = labels_from_logits(logits, size)
    crf = crf_labels(rgb, logits, settings.crf_params) if settings.crf else None
    return ExcelPrediction(logits, labels, crf)


def release_miou(matrix: np.ndarray) -> float:
    """The mIoU ``utils/evaluate.py`` ``scores`` reports for a confusion matrix (rows: ground truth, columns:
    prediction, as :class:`weakclip.metrics.ConfusionMatrix` holds it): the mean IoU over the classes present
    in the ground truth."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=1)
    present = gt > 0
    if not present.any():
        return float("nan")
    union = gt + m.sum(axis=0) - tp
    return float(np.mean(tp[present] / union[present]))
