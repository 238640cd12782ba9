"""A generic, exactly resumable (DDP) training loop over a step function, built on the training engine.

:func:`run_training` is the engine's loop (``weakclip.engine.trainer.train``) with the model, optimiser,
schedule and loss left to the caller: it reuses the engine's deterministic data order
(:class:`~weakclip.engine.trainer.GlobalBatchSampler`: the global batch of iteration ``it`` and the
augmentation of each of its slots are pure functions of ``(seed, it, slot)``), its per-iteration reseeding of
torch's RNG (:func:`~weakclip.engine.trainer.mix_seed`), its atomic checkpoints with a ``latest`` pointer
and the last N kept (:mod:`weakclip.engine.checkpoint`, RNG states of every rank included) and the process
group of :mod:`weakclip.distributed`. It writes ``log.csv`` (one row every ``log_every`` iterations, rows past
the checkpoint dropped on resume) and shows a tqdm bar on the main process.

:class:`PolySchedule` is the DeepLab "poly" learning-rate policy with the engine schedule's interface
(``set_iteration``, ``lr_mult`` per parameter group, state = the iteration).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from weakclip.distributed import DistInfo
from weakclip.engine.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    trainable_state_dict,
)
from weakclip.errors import WeakclipError

__all__ = ["PolySchedule", "poly_lr", "run_training"]


def poly_lr(it: int, *, base_lr: float, total_iters: int, power: float = 0.9, min_lr: float = 0.0,
            warmup_iters: int = 0, warmup_ratio: float = 1.0) -> float:
    """DeepLab's poly rate ``min_lr + (base_lr - min_lr) * (1 - it / total_iters) ** power`` of 0-based
    ``it``, scaled during the first ``warmup_iters`` by a factor rising linearly from ``warmup_ratio`` to
    1."""
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    progress = min(max(it, 0), total_iters) / total_iters
    lr = min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
    if warmup_iters > 0 and it < warmup_iters:
        lr *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return lr


@dataclass
class PolySchedule:
    """Sets ``lr = poly_lr(it) * group["lr_mult"]`` on every parameter group; state = the iteration."""

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

    def set_iteration(self, it: int) -> float:
        self.iteration = int(it)
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.set_iteration(int(state["iteration"]))


# ====================================================================== helpers
class _Log:
    def __init__(self, info: DistInfo, quiet: bool = False) -> None:
        self.info = info
        self.quiet = quiet
        self.bar = None

    def __call__(self, msg: str) -> None:
        if not self.info.is_main or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def _gather_rng(info: DistInfo) -> list[dict]:
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def _mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values)
        values = values / info.world_size
    return values.cpu()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _truncate_csv(path: Path, upto_iter: int) -> None:
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if rows:
        keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= upto_iter]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(keep)


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ====================================================================== loop
def run_training(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    step_fn: Callable[[nn.Module, dict[str, Any], int], dict[str, torch.Tensor]],
    dataset: Dataset,
    transform: Callable,
    workdir: str | Path,
    info: DistInfo,
    iters: int,
    batch_size: int,
    seed: int,
    config: dict[str, Any],
    resume: bool = False,
    max_iters_this_run: int | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    log_every: int = 20,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    amp: str = "none",
    grad_clip: float | None = None,
    loss_terms: Sequence[str] = ("loss",),
    find_unused_parameters: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``model`` for ``iters`` iterations of GLOBAL batch ``batch_size`` (split over the processes).

    ``step_fn(train_model, batch, it) -> {"loss": ..., other terms}``: the forward pass and loss of one
    iteration (``train_model`` is the DDP wrapper under torchrun); the loop does the backward pass, gradient
    clipping, the optimizer step and (CUDA) autocast / fp16 scaling. ``dataset[i]`` samples go through
    ``transform(sample, rng=default_rng([seed, it, slot]))`` and ``collate_fn``. ``schedule`` needs
    ``set_iteration(it) -> lr`` and ``state_dict()``. ``config`` (a plain dict) is stored in the checkpoints
    and compared on resume. The model's parameters and buffers are loaded from the latest checkpoint with
    ``resume=True`` (a fresh start when there is none); without ``resume`` a workdir holding checkpoints is
    refused. Returns a summary dict (same on every rank except "checkpoint").
    """
    from weakclip.data.datasets import collate_samples
    from weakclip.engine.trainer import GlobalBatchSampler, SeededTransformDataset, mix_seed

    workdir = Path(workdir)
    log = _Log(info, quiet)
    if batch_size % info.world_size:
        raise WeakclipError(f"the global batch {batch_size} is not divisible by the {info.world_size} "
                            "processes")
    ckpt = None
    if resume:
        path = latest_checkpoint(workdir)
        if path is not None:
            ckpt = load_checkpoint(path)
            log(f"resuming from {path} (iteration {ckpt['iteration']})")
        else:
            log(f"no checkpoint in {workdir}: starting from iteration 0")
    elif list_checkpoints(workdir):
        raise WeakclipError(f"{workdir} already holds checkpoints: pass --resume to continue, or use another "
                            "--workdir")
    start_iter = int(ckpt["iteration"]) if ckpt is not None else 0
    end_iter = iters
    if max_iters_this_run is not None:
        end_iter = min(iters, start_iter + max(0, int(max_iters_this_run)))
    end_iter = max(end_iter, start_iter)

    use_amp = info.device.type == "cuda" and amp != "none"
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    if ckpt is not None:
        result = model.load_state_dict(ckpt["model"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            shown = ", ".join((list(result.missing_keys) + list(result.unexpected_keys))[:5])
            raise WeakclipError(f"the checkpoint does not fit the model (missing or unexpected: {shown})")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        diffs = _differences(ckpt.get("config") or {}, config)
        if diffs:
            log("note: the config differs from the checkpoint's: " + "; ".join(diffs[:8]))
    schedule.set_iteration(start_iter)

    train_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids,
                                              find_unused_parameters=find_unused_parameters)
    if info.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            _truncate_csv(workdir / "log.csv", start_iter)
    if info.distributed:
        dist.barrier()
    if ckpt is not None and ckpt.get("rng"):
        states = ckpt["rng"]
        restore_rng_state(states[info.rank] if info.rank < len(states) else states[0])

    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, info.rank, info.world_size,
                                 start_iter=start_iter)
    loader = DataLoader(SeededTransformDataset(dataset, transform, seed), batch_sampler=sampler,
                        num_workers=num_workers, collate_fn=collate_fn or collate_samples,
                        pin_memory=info.device.type == "cuda")
    terms_names = list(loss_terms)
    csv_fh = None
    writer = None
    if info.is_main:
        path = workdir / "log.csv"
        new = not (ckpt is not None and path.is_file())
        csv_fh = open(path, "w" if new else "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed below
        writer = csv.writer(csv_fh)
        if new:
            writer.writerow(["iter", "lr", *terms_names, "seconds", "images_per_s"])
    bar = None
    if info.is_main and progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=iters, initial=start_iter, desc="retrain", dynamic_ncols=True)
        log.bar = bar

    def save(done: int) -> Path | None:
        state = {"iteration": done, "model": trainable_state_dict(model), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "schedule": schedule.state_dict(), "config": config, "rng": _gather_rng(info),
                 "world_size": info.world_size}
        out = save_checkpoint(workdir, state, done, keep=keep_checkpoints) if info.is_main else None
        if info.distributed:
            dist.barrier()
        return out

    model.train()
    window = torch.zeros(len(terms_names), dtype=torch.float64)
    window_n, window_t0 = 0, time.perf_counter()
    t0 = window_t0
    last_row: dict[str, float] = {}
    history: list[dict[str, float]] = []
    ckpt_path = None
    lr = schedule.set_iteration(start_iter)
    data_iter = iter(loader) if end_iter > start_iter else None
    try:
        for it in range(start_iter, end_iter):
            batch = next(data_iter)
            lr = schedule.set_iteration(it)
            torch.manual_seed(mix_seed(seed, it, info.rank))
            with _autocast(info.device, amp):
                terms = step_fn(train_model, batch, it)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise WeakclipError(f"the loss is {loss.item()} at iteration {it}: lower the learning rate "
                                    "or set a gradient clip")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
            values = torch.tensor([float(terms[k].detach()) if k in terms else math.nan for k in terms_names],
                                  dtype=torch.float64)
            history.append(dict(zip(terms_names, values.tolist())))
            window += values
            window_n += 1
            done = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"loss": f"{values[0]:.4f}", "lr": f"{lr:.2e}"}, refresh=False)
            if done % log_every == 0 or done == end_iter:
                means = _mean_over_ranks(window / window_n, info)
                seconds = time.perf_counter() - window_t0
                ips = window_n * batch_size / seconds if seconds > 0 else math.nan
                last_row = {"iter": done, "lr": lr, **dict(zip(terms_names, means.tolist())),
                            "seconds": seconds, "images_per_s": ips}
                if writer is not None:
                    writer.writerow([done, f"{lr:.6e}", *(f"{v:.6f}" for v in means.tolist()),
                                     f"{seconds:.3f}", f"{ips:.3f}"])
                    csv_fh.flush()
                window.zero_()
                window_n, window_t0 = 0, time.perf_counter()
            if done % checkpoint_every == 0 or done == end_iter:
                ckpt_path = save(done) or ckpt_path
    finally:
        if bar is not None:
            bar.close()
        if csv_fh is not None:
            csv_fh.close()
        del data_iter
    elapsed = time.perf_counter() - t0
    ran = end_iter - start_iter
    if ckpt_path is None:
        ckpt_path = latest_checkpoint(workdir)
    summary = {
        "workdir": str(workdir), "start_iter": start_iter, "end_iter": end_iter, "total_iters": iters,
        "finished": end_iter >= iters, "iterations_run": ran, "seconds": elapsed,
        "images_per_s": ran * batch_size / elapsed if ran and elapsed > 0 else math.nan,
        "final": last_row, "history": history, "world_size": info.world_size,
        "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
    }
    if ran:
        log(f"done: iterations {start_iter}->{end_iter} of {iters} in {elapsed:.1f} s "
            f"({summary['images_per_s']:.2f} images/s); loss {last_row.get('loss', math.nan):.4f}")
    return summary
