"""Learning-rate schedules: the refinement's (the release's linear warm-up, then cosine annealing to
``min_lr``; :class:`WarmupCosineSchedule`) and retraining's DeepLab "poly" (:class:`PolySchedule`).

It follows mmcv's ``CosineAnnealingLrUpdaterHook`` with ``warmup="linear"``, ``by_epoch=False``, which
the release used (``warmup_iters=1500, warmup_ratio=1e-6, min_lr=1e-6``):

* the regular learning rate is a cosine from ``base_lr`` at iteration 0 to ``min_lr`` at ``total_iters``::

      regular(it) = min_lr + (base_lr - min_lr) * (1 + cos(pi * it / total_iters)) / 2

* during the first ``warmup_iters`` iterations it is scaled by a factor rising linearly from
  ``warmup_ratio`` (at it = 0) to 1 (at it = warmup_iters)::

      lr(it) = regular(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))

``it`` is the 0-based index of the iteration about to run. The scheduler keeps no state but the
iteration, so resuming at iteration ``n`` gives exactly the learning rates of an uninterrupted run.

Parameter groups with an ``lr_mult`` follow mmcv's optimizer constructor and hook: the multiplier scales
the group's *base* rate, ``min_lr`` stays absolute (see :meth:`WarmupCosineSchedule.apply`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PolySchedule", "WarmupCosineSchedule", "lr_at", "poly_lr"]


def lr_at(it: int, *, base_lr: float, total_iters: int, warmup_iters: int = 0, warmup_ratio: float = 1.0,
          min_lr: float = 0.0) -> float:
    """The learning rate of 0-based iteration ``it`` (pure function; see the module docstring)."""
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    progress = min(max(it, 0), total_iters) / total_iters
    regular = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_iters > 0 and it < warmup_iters:
        k = (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
        return regular * (1.0 - k)
    return regular


def poly_lr(it: int, *, base_lr: float, total_iters: int, power: float = 0.9, min_lr: float = 0.0,
            warmup_iters: int = 0, warmup_ratio: float = 1.0) -> float:
    """DeepLab's poly rate ``min_lr + (base_lr - min_lr) * (1 - it / total_iters) ** power`` of 0-based
    ``it``, scaled during the first ``warmup_iters`` by a factor rising linearly from ``warmup_ratio`` to
    1 (the retraining schedule)."""
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    progress = min(max(it, 0), total_iters) / total_iters
    lr = min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
    if warmup_iters > 0 and it < warmup_iters:
        lr *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return lr


class _IterationSchedule:
    """Sets ``lr`` of every parameter group of ``self.optimizer`` from ``self.lr_at(iteration)``; a group may
    carry ``"lr_mult"`` (default 1) to scale its rate. State = the iteration. Call :meth:`set_iteration`
    before the optimizer step of iteration ``it`` (or :meth:`step` to advance by one)."""

    optimizer: torch.optim.Optimizer
    iteration: int

    def lr_at(self, it: int) -> float:
        raise NotImplementedError

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.iteration)

    def apply(self) -> float:
        """Write the current iteration's rate into the optimizer; returns it."""
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def set_iteration(self, it: int) -> float:
        self.iteration = int(it)
        return self.apply()

    def step(self) -> float:
        """Advance to the next iteration and apply its rate."""
        return self.set_iteration(self.iteration + 1)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.set_iteration(int(state["iteration"]))


@dataclass
class WarmupCosineSchedule(_IterationSchedule):
    """The refinement's schedule: :func:`lr_at` (warm-up, then cosine decay)."""

    optimizer: torch.optim.Optimizer
    base_lr: float
    total_iters: int
    warmup_iters: int = 0
    warmup_ratio: float = 1.0
    min_lr: float = 0.0
    iteration: int = 0

    def lr_at(self, it: int, lr_mult: float = 1.0) -> float:
        return lr_at(it, base_lr=self.base_lr * lr_mult, total_iters=self.total_iters,
                     warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio, min_lr=self.min_lr)

    def apply(self) -> float:
        """mmcv's per-group rule: a group's ``lr_mult`` scales its BASE rate (mmcv's ``initial_lr``), while
        ``min_lr`` is absolute and the same for every group. So a group with ``lr_mult=0`` (the release's
        image tower, adapter and text tower) is not still: its cosine runs from 0 up to ``min_lr``
        (``min_lr * (1 - cos(pi * it / total)) / 2``, times the warm-up factor). Returns the base rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.iteration, group.get("lr_mult", 1.0))
        return self.current_lr


@dataclass
class PolySchedule(_IterationSchedule):
    """Retraining's schedule: :func:`poly_lr`."""

    optimizer: torch.optim.Optimizer
    base_lr: float
    total_iters: int
    power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1.0
    iteration: int = 0

    def lr_at(self, it: int) -> float:
        return poly_lr(it, base_lr=self.base_lr, total_iters=self.total_iters, power=self.power,
                       min_lr=self.min_lr, warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio)
