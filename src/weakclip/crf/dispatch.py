"""The one entry point of the dense CRF, :func:`dense_crf`, and the ``auto`` backend rule
(:func:`choose_backend`); re-exported by :mod:`weakclip.crf`."""

from __future__ import annotations

import torch

from weakclip.crf.exact import dense_crf_torch
from weakclip.crf.lattice import dense_crf_lattice
from weakclip.crf.params import TRAIN_CRF, DenseCRFParams
from weakclip.crf.pydensecrf_backend import dense_crf_pydensecrf, pydensecrf_available
from weakclip.errors import WeakclipError

__all__ = ["BACKENDS", "choose_backend", "dense_crf"]

BACKENDS = ("auto", "exact", "lattice", "pydensecrf")


def choose_backend(device: torch.device | str, height: int, width: int) -> str:
    """The backend ``dense_crf(..., backend="auto")`` runs for images of this size on this device.

    * CUDA (any accelerator): ``"lattice"``, batched on the device at every size, no CPU round trip.
    * CPU: ``"pydensecrf"`` when installed (measured faster per image than the PyTorch lattice at
      64x64 and at full resolution on CPU), otherwise ``"lattice"``.
    """
    device = torch.device(device)
    del height, width  # the measured choice does not depend on the size (kept for the API)
    if device.type != "cpu":
        return "lattice"
    return "pydensecrf" if pydensecrf_available() else "lattice"


def _check_inputs(probs: torch.Tensor, images: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(images, torch.Tensor):
        raise WeakclipError(
            f"dense_crf takes tensors, got {type(probs).__name__} and {type(images).__name__}"
        )
    if probs.dim() != 4 or images.dim() != 4:
        raise WeakclipError(
            f"dense_crf expects probs B×K×h×w and images B×3×h×w, got {tuple(probs.shape)} and "
            f"{tuple(images.shape)}"
        )
    if images.shape[1] != 3:
        raise WeakclipError(f"dense_crf expects RGB images B×3×h×w, got {images.shape[1]} channels")
    if images.shape[0] != probs.shape[0] or images.shape[2:] != probs.shape[2:]:
        raise WeakclipError(
            f"dense_crf: images {tuple(images.shape)} do not match probs {tuple(probs.shape)}"
        )
    if probs.shape[1] < 1:
        raise WeakclipError("dense_crf: probs have no classes")


def dense_crf(
    probs: torch.Tensor,
    images: torch.Tensor,
    params: DenseCRFParams = TRAIN_CRF,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense-CRF marginals B x K x h x w (fp32, on ``probs``' device, no autograd).

    Args:
        probs: class probabilities B x K x h x w, any float dtype and device.
        images: RGB images B x 3 x h x w, float in 0..255 (the ``pydensecrf`` backend rounds them to
            uint8), same size as ``probs``; moved to ``probs``' device when needed.
        params: kernel parameters and iterations (``TRAIN_CRF``, ``VOC_CRF``, ``COCO_CRF``).
        backend: ``"auto"`` (:func:`choose_backend`), ``"exact"``, ``"lattice"`` or ``"pydensecrf"``.
    """
    if backend not in BACKENDS:
        raise WeakclipError(f"unknown dense-CRF backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_inputs(probs, images)
    if backend == "auto":
        backend = choose_backend(probs.device, probs.shape[2], probs.shape[3])
    if backend == "exact":
        return dense_crf_torch(probs, images, params)
    if backend == "lattice":
        return dense_crf_lattice(probs, images, params)
    return dense_crf_pydensecrf(probs, images, params)
