"""CLIP-ES's two rules from CAMs to masks (its ``eval_cam.py`` and ``eval_cam_with_crf.py``).

Both start from the CAMs as CLIP-ES stores them (float16, K x H x W, the labelled classes only) and
prepend a background score ``(1 - max_k cam_k) ** t`` (computed in float16, as numpy does on the
loaded float16 arrays):

* :func:`argmax_mask`: argmax over background + classes, no ignore band (CLIP-ES's "CAMs" row,
  70.8% mIoU on VOC train with ViT-B/16; its eval script tries ``t`` = 1 and 2 and keeps the better
  on the ground truth, its CRF script uses 1).
* :func:`crf_mask`: those scores (not renormalised) as the "probabilities" of a dense CRF with
  Gaussian ``sxy=1, compat=3`` and bilateral ``sxy=67, srgb=3, compat=4``, 10 iterations, then the
  argmax, and 255 where the CRF's marginal is under 0.95 (its "+CRF" pseudo masks). Its CRF image is
  the BGR image minus the mean ``(104.008, 116.669, 122.675)`` cast straight to uint8, so negative
  values wrap around (``fix_wrap`` passes the BGR image itself instead).

The dense CRF is pydensecrf2 (module ``pydensecrf``), called as CLIP-ES calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weakclip.crf import CRFUnavailableError, DenseCRFParams
from weakclip.data.classes import IGNORE_INDEX

__all__ = [
    "CLIP_ES_CRF",
    "MEAN_BGR",
    "argmax_mask",
    "background_scores",
    "crf_image",
    "crf_labels",
    "crf_mask",
]

#: CLIP-ES's CRF (``DenseCRF(iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4)``).
CLIP_ES_CRF = DenseCRFParams(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                             bilateral_compat=4.0, iterations=10)
#: The BGR mean CLIP-ES subtracts from the CRF image.
MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)


def _check(cams: np.ndarray, keys: Sequence[int]) -> np.ndarray:
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != len(keys):
        raise ValueError(f"cams must be len(keys) x H x W, got {cams.shape} for {len(keys)} keys")
    return cams.astype(np.float16)


def background_scores(cams: np.ndarray, keys: Sequence[int], power: float = 1.0) -> np.ndarray:
    """(1 + K) x H x W float16: ``(1 - max cams) ** power`` on top of the CAMs (rounded to float16,
    as CLIP-ES reads them from its files)."""
    cams = _check(cams, keys)
    if len(keys) == 0:
        return np.ones((1, *cams.shape[1:]), np.float16)
    bg = np.power(np.float16(1) - cams.max(axis=0, keepdims=True), np.float16(power))
    return np.concatenate([bg, cams], axis=0)


def _label_lut(keys: Sequence[int]) -> np.ndarray:
    return np.asarray([0, *keys], dtype=np.uint8)


def argmax_mask(cams: np.ndarray, keys: Sequence[int], power: float = 1.0) -> np.ndarray:
    """CLIP-ES's CAM mask: argmax over ``(1 - max)^power`` and the CAMs (ties go to the first: the
    background, then the lower CAM index); H x W uint8 of class ids, no 255."""
    scores = background_scores(cams, keys, power)
    return _label_lut(keys)[np.argmax(scores, axis=0)]


def crf_image(image: np.ndarray, fix_wrap: bool = False) -> np.ndarray:
    """The H x W x 3 uint8 image CLIP-ES gives its CRF, from an RGB uint8 image: BGR order (as
    ``cv2.imread`` gives it; the order matters a little, the lattice is not symmetric in its features).

    CLIP-ES subtracts :data:`MEAN_BGR` from the float32 image and casts to uint8, which truncates
    towards zero and wraps negative values modulo 256 (what numpy's cast does on x86; we write that
    rule out, as C leaves it undefined). ``fix_wrap``: the BGR image itself, without the mean.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.shape} {image.dtype}")
    bgr = image[..., ::-1]
    if fix_wrap:
        return np.ascontiguousarray(bgr)
    shifted = bgr.astype(np.float32) - np.asarray(MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8))


def crf_labels(image: np.ndarray, cams: np.ndarray, keys: Sequence[int], *, power: float = 1.0,
               fix_wrap: bool = False, params: DenseCRFParams = CLIP_ES_CRF) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-ES's CRF step without the confidence cut: (H x W uint8 class ids, H x W float32 marginal
    of the chosen label)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:  # pragma: no cover - pydensecrf2 is a dependency
        raise CRFUnavailableError("CLIP-ES's CRF masks need pydensecrf2 (module 'pydensecrf')") from exc
    probs = background_scores(cams, keys, power)
    c, h, w = probs.shape
    if c == 1:  # no labelled class: background everywhere, certain
        return np.zeros((h, w), np.uint8), np.ones((h, w), np.float32)
    rgb = crf_image(image, fix_wrap)
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"image {rgb.shape[:2]} and CAMs {(h, w)} differ in size")
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))  # float16 log, as CLIP-ES
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                             compat=params.bilateral_compat)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(c, h, w)
    return _label_lut(keys)[np.argmax(q, axis=0)], q.max(axis=0)


def crf_mask(image: np.ndarray, cams: np.ndarray, keys: Sequence[int], *, power: float = 1.0,
             confidence: float = 0.95, fix_wrap: bool = False,
             params: DenseCRFParams = CLIP_ES_CRF) -> np.ndarray:
    """CLIP-ES's CRF pseudo mask: :func:`crf_labels`, 255 where the marginal is under ``confidence``."""
    label, conf = crf_labels(image, cams, keys, power=power, fix_wrap=fix_wrap, params=params)
    label[conf < confidence] = IGNORE_INDEX
    return label
