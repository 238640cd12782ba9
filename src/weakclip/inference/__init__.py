"""Inference with a trained refinement model: sliding window, multi-scale + flip, pseudo masks, predictions.

Submodules (imported on use, so ``import weakclip.inference`` stays light):

* :mod:`~weakclip.inference.sliding`: ``slide_inference``, ``multiscale_inference``, ``RELEASE_SCALES``
* :mod:`~weakclip.inference.pseudo_masks`: ``generate_pseudo_masks`` (resumable, sharded, CRF pool)
* :mod:`~weakclip.inference.predict`: ``overlay_image``, ``parse_labels`` (for ``weakclip predict``)
* :mod:`~weakclip.inference.loading`: ``load_trained_model`` (checkpoint + CLIP weights -> model)
* :mod:`~weakclip.inference.jobs`: book-keeping of resumable per-image jobs
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "slide_inference": "sliding",
    "multiscale_inference": "sliding",
    "RELEASE_SCALES": "sliding",
    "generate_pseudo_masks": "pseudo_masks",
    "overlay_image": "predict",
    "load_trained_model": "loading",
    "JobLedger": "jobs",
    "write_npz_atomic": "jobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weakclip.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"weakclip.inference.{module}"), name)
