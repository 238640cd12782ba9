"""Batching sample dicts for a DataLoader (:func:`collate_samples`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from weakclip.data.id_lists import listing
from weakclip.data.sample import Sample
from weakclip.errors import DataError

__all__ = ["collate_samples"]


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if value.dtype.kind not in "biufc":
        return None
    arr = np.ascontiguousarray(value)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _collate_values(values: list[Any]) -> Any:
    if all(isinstance(v, (np.ndarray, torch.Tensor)) for v in values):
        tensors = [_as_tensor(v) for v in values]
        if any(t is None for t in tensors):
            return list(values)
        first = tensors[0]
        if all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
            return torch.stack(tensors)
        return tensors
    if all(isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)) for v in values):
        return torch.as_tensor(values)
    return list(values)


def collate_samples(batch: Sequence[Sample]) -> dict[str, Any]:
    """Batch sample dicts for a DataLoader.

    Arrays and tensors of one shape and dtype are stacked into a tensor (numpy arrays become tensors);
    of different shapes they come back as a list of tensors; numbers become a tensor; anything else
    (ids, strings) a list. A key must be in every sample or in none (DataError otherwise).
    """
    if not batch:
        return {}
    keys: list[str] = []
    for sample in batch:
        for k in sample:
            if k not in keys:
                keys.append(k)
    out: dict[str, Any] = {}
    for k in keys:
        have = [s for s in batch if k in s]
        if len(have) != len(batch):
            lacking = [str(s.get("id", "?")) for s in batch if k not in s]
            raise DataError(
                f"cannot batch samples: key {k!r} is in {len(have)} of {len(batch)} samples "
                f"(missing for ids {listing(lacking)})"
            )
        out[k] = _collate_values([s[k] for s in batch])
    return out
