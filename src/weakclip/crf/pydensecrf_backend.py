"""The ``pydensecrf`` backend: pydensecrf2 (Krähenbühl's C++ lattice), one image at a time on the CPU.

This is what the authors' release runs, in the boundary loss and in the pseudo-mask stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from weakclip.crf.params import UNARY_CLIP, VOC_CRF, CRFUnavailableError, DenseCRFParams

if TYPE_CHECKING:
    import torch

__all__ = ["check_pydensecrf_memory", "dense_crf_numpy", "dense_crf_pydensecrf", "pydensecrf_available",
           "pydensecrf_bytes"]

#: pydensecrf2's peak memory, bytes a pixel: a fixed part and a part per class. Measured (peak RSS over the
#: inputs, VOC_CRF, benchmarks/README.md "The dense CRF's memory"): 578, 842 and 1,852 bytes a pixel with 2, 5
#: and 21 classes on noise images (the worst case: the bilateral lattice has the most points), 204 and 631 on
#: a photo; these constants lie above every measurement.
CRF_BYTES_PER_PIXEL = 600
CRF_BYTES_PER_PIXEL_CLASS = 80


def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:  # pragma: no cover - exercised only where the package is missing
        raise CRFUnavailableError(
            "the full-resolution dense CRF needs pydensecrf2 (module 'pydensecrf'): pip install pydensecrf2"
        ) from exc
    return dcrf, unary_from_softmax


def pydensecrf_available() -> bool:
    """Whether pydensecrf2 can be imported."""
    try:
        _import_pydensecrf()
    except CRFUnavailableError:
        return False
    return True


def _writable_contiguous(array: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous, writable array of ``dtype`` (pydensecrf's Cython buffers reject read-only ones,
    e.g. ``np.asarray(PIL image)``); copies only when needed."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


def pydensecrf_bytes(height: int, width: int, num_classes: int) -> int:
    """An upper bound of pydensecrf2's peak memory for an image of ``height x width`` with ``num_classes``."""
    return int(height) * int(width) * (CRF_BYTES_PER_PIXEL + CRF_BYTES_PER_PIXEL_CLASS * int(num_classes))


def check_pydensecrf_memory(height: int, width: int, num_classes: int) -> None:
    """Raise :class:`~weakclip.errors.OutOfMemory` when pydensecrf2 may need more memory than this process
    can still take (:func:`weakclip.memory.available_bytes`): its C++ would throw ``std::bad_alloc``,
    which aborts the whole process (exit 134) instead of raising."""
    from weakclip import memory

    need = pydensecrf_bytes(height, width, num_classes)
    room = memory.available_bytes()
    if room is not None and need > room:
        raise memory.OutOfMemory(
            f"the dense CRF (pydensecrf2) of {width}x{height} pixels and {num_classes} classes may need "
            f"{memory.human_bytes(need)}, {memory.human_bytes(room)} is free")


def dense_crf_numpy(image, probs, params: DenseCRFParams = VOC_CRF):
    """Full-resolution dense CRF with pydensecrf2; returns marginals K x H x W (float32 ndarray).

    Args:
        image: RGB image H x W x 3, uint8 (other integer/float arrays are rounded, clipped and cast);
            read-only arrays (``np.asarray(PIL image)``) are accepted.
        probs: class probabilities K x H x W (float); clipped at 1e-5 for the unary.
        params: kernel parameters (``VOC_CRF`` / ``COCO_CRF`` for post-processing).

    Raises:
        OutOfMemory: the image is too large for the memory left (:func:`check_pydensecrf_memory`), checked
            before pydensecrf2 runs (it would abort the process).
    """
    dcrf, unary_from_softmax = _import_pydensecrf()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs {probs.shape} do not match image {image.shape} (expected K×H×W)")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    k, h, w = probs.shape
    check_pydensecrf_memory(h, w, k)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(_writable_contiguous(unary_from_softmax(probs, clip=UNARY_CLIP), np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=_writable_contiguous(image, np.uint8),
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def dense_crf_pydensecrf(probs: torch.Tensor, images: torch.Tensor, params: DenseCRFParams
                         ) -> torch.Tensor:
    """pydensecrf2 on each image of a batch in turn (B x K x h x w, B x 3 x h x w in 0..255).

    Images are rounded to uint8 as pydensecrf needs; the marginals come back fp32 on the input's device.
    """
    import torch  # here, not at the top: the CRF worker processes import this module without torch

    rgb = images.detach().float().clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    p = probs.detach().float().cpu().numpy()
    out = np.stack([dense_crf_numpy(rgb[i], p[i], params) for i in range(p.shape[0])]) if len(p) else p
    return torch.from_numpy(out).to(probs.device)
