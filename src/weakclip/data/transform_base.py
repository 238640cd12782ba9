"""What every joint image/mask transform shares: the sample, the transform base, the randomness rule.

A *sample* is a dict with ``"id"``, ``"image"`` (``HxWx3`` uint8 RGB numpy array), ``"labels"`` and optionally
the label maps of :data:`MASK_KEYS`; a transform is a callable ``sample -> sample`` (:class:`_Transform`,
chained by :class:`Compose`). Random transforms draw from the Generator :func:`_resolve_rng` picks (the
call's, the constructor's, else one seeded from numpy's global state, which :func:`worker_init_fn` seeds in
DataLoader workers). Plus the shape checks and small helpers the transforms share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from weakclip.errors import DataError

Sample = dict[str, Any]

#: Keys of the ``HxW`` label maps that geometric transforms move together with the image.
MASK_KEYS: tuple[str, ...] = ("seed", "gt")


# --------------------------------------------------------------------------------------------------
# randomness


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy's global state (and ``random``) from torch's seed.

    Inside a worker ``torch.initial_seed()`` is the DataLoader's base seed (drawn from its
    ``generator``) plus the worker id, so each worker gets its own stream and a seeded
    ``torch.Generator`` makes the whole data loading reproducible.
    """
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _resolve_rng(call_rng: np.random.Generator | None, own_rng: np.random.Generator | None):
    if call_rng is not None:
        return call_rng
    if own_rng is not None:
        return own_rng
    # A new Generator per call, seeded from numpy's global (per-worker seeded) state.
    return np.random.default_rng(np.random.randint(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------------
# helpers


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {size!r}")
    return int(size[0]), int(size[1])


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` on a contiguous, writable array (read-only inputs, e.g. from PIL, are copied)."""
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def _mask_keys(sample: Sample) -> list[str]:
    return [k for k in MASK_KEYS if sample.get(k) is not None]


def _check_sample(sample: Sample) -> tuple[int, int]:
    """Shape checks shared by the geometric transforms; returns the image's ``(H, W)``."""
    img = sample.get("image")
    sid = sample.get("id", "?")
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise DataError(f"sample {sid}: 'image' must be an HxWx3 numpy array, got shape {shape}")
    h, w = img.shape[:2]
    for k in _mask_keys(sample):
        m = sample[k]
        if not isinstance(m, np.ndarray) or m.shape != (h, w):
            raise DataError(
                f"sample {sid}: '{k}' has shape {getattr(m, 'shape', None)}, the image is {h}x{w}"
            )
    return h, w


# --------------------------------------------------------------------------------------------------
# the transform base


class Compose:
    """Apply transforms in order; a ``rng`` (given here or to the call) is forwarded to each one."""

    def __init__(self, transforms: Sequence[Callable], rng: np.random.Generator | None = None):
        self.transforms = list(transforms)
        self.rng = rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else self.rng
        for t in self.transforms:
            sample = t(sample, rng=rng) if isinstance(t, _Transform) else t(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class _Transform:
    """Base: ``__call__(sample, rng=None)``; deterministic transforms ignore ``rng``."""

    rng: np.random.Generator | None = None

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "rng")
        return f"{type(self).__name__}({args})"
