"""Fully connected CRF (Krähenbühl & Koltun) for the boundary loss and the pseudo-mask stage.

One entry point, :func:`dense_crf`, over three backends that share one parameter set
(:class:`DenseCRFParams`) and one model (Potts, symmetric normalisation, Gaussian + bilateral
kernels, unary ``-log(clip(p, 1e-5))``, ``Q0 = softmax(-U)``):

* ``"exact"`` (:func:`dense_crf_torch`): exact N x N kernels in PyTorch; O((h w)^2), the reference.
* ``"lattice"`` (:func:`dense_crf_lattice`): permutohedral-lattice kernels in PyTorch, batched, on
  the tensors' device; O(h w), the same approximation as pydensecrf2.
* ``"pydensecrf"`` (:func:`dense_crf_pydensecrf` / :func:`dense_crf_numpy`): pydensecrf2, one image
  at a time on the CPU; what the authors' release runs.

``backend="auto"`` (:func:`choose_backend`) picks by device and size, from measurements
(``benchmarks/suite.py --cpu``, benchmarks/README.md).

The package imports its submodules on first use (``from weakclip.crf import dense_crf`` works as ever),
so :mod:`~weakclip.crf.params` and the pydensecrf2 backend's :func:`dense_crf_numpy` load without torch:
the pseudo-mask stage's CRF worker processes need nothing more (:mod:`weakclip.inference.crf_worker`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "dispatch",
    "choose_backend": "dispatch",
    "dense_crf": "dispatch",
    "dense_crf_torch": "exact",
    "PermutohedralLattice": "lattice",
    "dense_crf_lattice": "lattice",
    "COCO_CRF": "params",
    "TRAIN_CRF": "params",
    "UNARY_CLIP": "params",
    "VOC_CRF": "params",
    "CRFUnavailableError": "params",
    "DenseCRFParams": "params",
    "dense_crf_numpy": "pydensecrf_backend",
    "dense_crf_pydensecrf": "pydensecrf_backend",
    "pydensecrf_available": "pydensecrf_backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weakclip.crf' has no attribute {name!r}")
    return getattr(importlib.import_module(f"weakclip.crf.{module}"), name)
