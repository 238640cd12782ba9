"""The job a pseudo-mask CRF worker process runs for one image with the release's ``pydensecrf`` backend.

numpy, PIL and pydensecrf2 only: no torch op runs in it, so it is safe in a worker forked after the
model ran on several torch threads (:mod:`weakclip.worker_pool`), and the module (and what it imports)
loads without torch where a worker is spawned. The same function runs inline with ``crf_workers: 0``, so the
masks are the same with and without workers.
"""

from __future__ import annotations

import time

import numpy as np

from weakclip.crf.params import DenseCRFParams
from weakclip.crf.pydensecrf_backend import dense_crf_numpy
from weakclip.data.io import write_label_png

__all__ = ["pydensecrf_job"]


def pydensecrf_job(image: np.ndarray, probs: np.ndarray, keys: np.ndarray, params: DenseCRFParams,
                   out_png: str) -> tuple[np.ndarray, float]:
    """pydensecrf2 over the kept classes' ``probs`` (K x H x W) of ``image`` (H x W x 3 uint8), the
    argmax (first class on ties) mapped to the class ids ``keys`` and written to ``out_png`` ->
    (mask, seconds)."""
    start = time.perf_counter()
    q = dense_crf_numpy(image, probs, params)
    mask = np.asarray(keys, dtype=np.uint8)[q.argmax(axis=0)]
    write_label_png(out_png, mask)
    return mask, time.perf_counter() - start
