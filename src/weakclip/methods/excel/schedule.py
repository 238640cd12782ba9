"""ExCEL's optimiser: AdamW with the release's poly schedule after a linear warm-up (utils/optimizer.py
``PolyWarmupAdamW``, built by engine/optimizer_engine.py ``build_optimizer``).

The learning rate of a group whose initial rate is ``lr0``, at the optimiser's step ``s`` (0-based: the
release's ``global_step``, which equals the training loop's ``n_iter`` since it steps once an iteration):

* ``s < warmup_iters``: ``lr0 * (1 - (1 - s / warmup_iters) * (1 - warmup_ratio))``, a line from
  ``lr0 * warmup_ratio`` (release quirk: the first step runs at ``1e-4 * 1e-6 = 1e-10`` for the CLIP-side
  groups and ``1e-9`` for the decoder's, the only groups with parameters) to ``lr0``;
* ``warmup_iters <= s < max_iters``: ``lr0 * (1 - s / max_iters) ** power`` (not shifted by the warm-up: the
  rate drops from ``lr0`` to ``lr0 * (1 - warmup_iters / max_iters)`` at the end of the warm-up);
* ``s >= max_iters`` (and past the warm-up): unchanged, i.e. the rate of the last step that set it.

Groups (the release's ``build_optimizer`` over ``ExCEL_model.get_param_groups``): four, initial rates
``lr, lr, lr * 10, lr * 10``, all with the same weight decay; only the last holds parameters (the decoder and
the fusion head); the first three are empty and kept so that optimiser states line up with the release's.
AdamW with ``betas=(0.9, 0.999)``, ``eps=1e-8``, weight decay ``1e-2``, PyTorch's defaults otherwise.

:class:`ExcelAdamW` is that optimiser; its step counter ``iteration`` is plain state, saved in its
``state_dict()`` (key ``"iteration"``) and restored by ``load_state_dict``, so a resumed run continues with
the rates of an uninterrupted one. :func:`group_learning_rates` gives the rates without an optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "COCO_SCHEDULE",
    "ExcelAdamW",
    "PolyWarmup",
    "RELEASE_BETAS",
    "RELEASE_EPS",
    "RELEASE_LR_MULTIPLIERS",
    "RELEASE_WEIGHT_DECAY",
    "VOC_SCHEDULE",
    "build_optimizer",
    "group_learning_rates",
    "release_param_groups",
]

#: engine/optimizer_engine.py: groups "backbone; backbone_norm; cls_head; seg_head" at lr, lr, lr*10, lr*10
RELEASE_LR_MULTIPLIERS = (1.0, 1.0, 10.0, 10.0)
RELEASE_BETAS = (0.9, 0.999)
RELEASE_EPS = 1e-8
RELEASE_WEIGHT_DECAY = 1e-2


@dataclass(frozen=True)
class PolyWarmup:
    """The schedule's numbers (scripts/train_voc.py defaults; ``COCO_SCHEDULE`` for train_coco.py)."""

    lr: float = 1e-4
    warmup_iters: int = 50
    max_iters: int = 30000
    warmup_ratio: float = 1e-6
    power: float = 1.0

    def multiplier(self, iteration: int) -> float | None:
        """The factor on a group's initial rate at 0-based step ``iteration``; None where the release leaves
        the rate as it was (past both the warm-up and ``max_iters``)."""
        if iteration < self.warmup_iters:
            return 1 - (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
        if iteration < self.max_iters:
            return (1 - iteration / self.max_iters) ** self.power
        return None

    def group_lr(self, initial_lr: float, iteration: int) -> float:
        """The rate of a group whose initial rate is ``initial_lr`` at step ``iteration``."""
        mult = self.multiplier(iteration)
        if mult is None:
            last = max(self.warmup_iters, self.max_iters) - 1
            return initial_lr if last < 0 else self.group_lr(initial_lr, last)
        return initial_lr * mult


VOC_SCHEDULE = PolyWarmup()
COCO_SCHEDULE = PolyWarmup(warmup_iters=200, max_iters=100000)


def initial_rates(schedule: PolyWarmup, multipliers: Sequence[float] = RELEASE_LR_MULTIPLIERS) -> list[float]:
    """Each group's initial rate, ``lr * multiplier`` (the release's ``args.lr * 10``)."""
    return [schedule.lr * m for m in multipliers]


def group_learning_rates(schedule: PolyWarmup, iteration: int,
                         multipliers: Sequence[float] = RELEASE_LR_MULTIPLIERS) -> list[float]:
    """Every group's rate at step ``iteration`` (the rates the optimiser's step of that iteration uses)."""
    return [schedule.group_lr(lr0, iteration) for lr0 in initial_rates(schedule, multipliers)]


def release_param_groups(trained: Iterable[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The release's four groups for ExCEL's trained parameters: three empty, the last holding them all (its
    ``get_param_groups`` puts the decoder's, then the fusion head's parameters in group 3)."""
    return [[], [], [], list(trained)]


class ExcelAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step()`` first sets every group's rate from the schedule at
    ``self.iteration``, then steps and counts (the release's ``PolyWarmupAdamW.step``)."""

    def __init__(self, param_groups: Sequence[Iterable[torch.nn.Parameter]],
                 schedule: PolyWarmup = VOC_SCHEDULE,
                 multipliers: Sequence[float] = RELEASE_LR_MULTIPLIERS,
                 weight_decay: float = RELEASE_WEIGHT_DECAY, betas: tuple[float, float] = RELEASE_BETAS,
                 eps: float = RELEASE_EPS) -> None:
        if len(param_groups) != len(multipliers):
            raise ValueError(f"{len(param_groups)} parameter groups but {len(multipliers)} rate multipliers")
        groups = [{"params": list(params), "lr": lr0, "weight_decay": weight_decay, "initial_lr": lr0}
                  for params, lr0 in zip(param_groups, initial_rates(schedule, multipliers))]
        super().__init__(groups, lr=schedule.lr, betas=betas, weight_decay=weight_decay, eps=eps)
        self.schedule = schedule
        self.iteration = 0

    def apply_schedule(self) -> None:
        """Set each group's rate for the coming step (past ``max_iters``: the last step's, as the release)."""
        for group in self.param_groups:
            group["lr"] = self.schedule.group_lr(group["initial_lr"], self.iteration)

    def step(self, closure=None):  # type: ignore[override]
        self.apply_schedule()
        loss = super().step(closure)
        self.iteration += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["iteration"] = self.iteration
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        iteration = int(state.pop("iteration", 0))
        super().load_state_dict(state)
        self.iteration = iteration


def build_optimizer(trained: Iterable[torch.nn.Parameter], schedule: PolyWarmup = VOC_SCHEDULE,
                    weight_decay: float = RELEASE_WEIGHT_DECAY, betas: tuple[float, float] = RELEASE_BETAS,
                    eps: float = RELEASE_EPS) -> ExcelAdamW:
    """The release's optimiser over ExCEL's trained parameters (:func:`release_param_groups`)."""
    return ExcelAdamW(release_param_groups(trained), schedule, RELEASE_LR_MULTIPLIERS, weight_decay, betas,
                      eps)
