"""What each training iteration reads: the global batch order (:class:`GlobalBatchSampler`, the same
for any number of processes) and each sample's augmentation seeded by its place in that order
(:class:`SeededTransformDataset`), so the batches do not depend on processes or data loader workers.
See :mod:`weakclip.engine.loop` for the whole rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from weakclip.errors import WeakclipError

__all__ = ["GlobalBatchSampler", "SeededTransformDataset", "mix_seed"]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class GlobalBatchSampler:
    """Yields, per iteration, this process's slice of the global batch as ``(it, slot, index)`` triples.

    ``slot`` is the position in the GLOBAL batch (0..B-1), ``index`` the dataset index. Infinite; starts at
    ``start_iter``. See the module docstring for the order.
    """

    def __init__(self, n_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0) -> None:
        if n_items <= 0:
            raise WeakclipError("the training set is empty")
        if global_batch % world_size:
            raise WeakclipError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        self.n_items = int(n_items)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iter = int(start_iter)
        self._perm_epoch = -1
        self._perm: list[int] = []

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3D))
            self._perm = torch.randperm(self.n_items, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, it: int) -> list[int]:
        """Dataset indices of the whole global batch of iteration ``it``."""
        out = []
        for pos in range(it * self.global_batch, (it + 1) * self.global_batch):
            epoch, offset = divmod(pos, self.n_items)
            out.append(self.permutation(epoch)[offset])
        return out

    def local_batch(self, it: int) -> list[tuple[int, int, int]]:
        per = self.global_batch // self.world_size
        indices = self.global_indices(it)
        slots = range(self.rank * per, (self.rank + 1) * per)
        return [(it, j, indices[j]) for j in slots]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        it = self.start_iter
        while True:
            yield self.local_batch(it)
            it += 1


class SeededTransformDataset(Dataset):
    """``dataset[index]`` passed through ``transform(sample, rng=default_rng([seed, it, slot]))``."""

    def __init__(self, dataset: Dataset, transform, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        it, slot, index = key
        sample = self.dataset[index]
        sample.pop("gt", None)
        return self.transform(sample, rng=np.random.default_rng([self.seed, int(it), int(slot)]))
