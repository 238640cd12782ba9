"""The training loop of WeakCLIP refinement and of retraining: one process or many (``torchrun``, DDP),
exactly resumable.

:func:`run_training` trains a model the caller built, with the caller's optimiser and schedule, for a number
of iterations of a GLOBAL batch; ``step_fn`` is the forward pass and loss of one iteration and the loop does
the rest: data order, reseeding, (CUDA) autocast and fp16 scaling, backward pass, gradient clipping,
optimizer step, DDP, checkpoints, resume, ``log.csv``, progress bar and the closing ``done:`` line.
:func:`weakclip.engine.trainer.train` (refinement) and :func:`weakclip.retrain.train.retrain` run on it.

Determinism and data order
--------------------------
Which images a step sees and how they are augmented is a pure function of ``(seed, iteration, global
slot)``:

* the sample stream is the concatenation of per-epoch permutations of the dataset, permutation ``e``
  drawn from a ``torch.Generator`` seeded with ``(seed, e)``; iteration ``it`` takes stream positions
  ``[it * B, (it + 1) * B)`` (``B`` = GLOBAL batch) and process ``r`` of ``W`` takes the contiguous
  slice ``[r * B / W, (r + 1) * B / W)`` of it (:class:`GlobalBatchSampler`);
* the augmentation of global slot ``j`` of iteration ``it`` draws from
  ``numpy.random.default_rng([seed, it, j])``, whatever process or DataLoader worker runs it
  (:class:`SeededTransformDataset`);
* torch's global RNG (dropout, stochastic depth) is reseeded at every iteration from
  ``(seed, it, rank)`` (:func:`mix_seed`).

So one process with global batch ``B`` and two processes with ``B / 2`` each see identical samples.

Checkpoints, resume and logs
----------------------------
Every ``checkpoint_every`` iterations and at the end of a run, an atomic checkpoint
(:mod:`weakclip.engine.checkpoint`: a ``latest`` pointer, the last N kept) records the model state, the
optimizer, the fp16 scaler, the schedule, the caller's config dict, the RNG states of every rank and any
extra fields of the caller. A resumed run (:func:`resume_checkpoint`) restores all of them, so it continues
exactly as an uninterrupted one; a config that differs from the checkpoint's is reported, not refused.
``log.csv`` gets one row every ``log_every`` iterations (the learning rate, each loss term averaged over the
window and the processes, seconds, images/s); rows past the checkpoint are dropped on resume.

The schedule is any object with ``set_iteration(it) -> lr`` and ``state_dict()``: the refinement's
:class:`~weakclip.engine.schedule.WarmupCosineSchedule`, retraining's
:class:`~weakclip.engine.schedule.PolySchedule`.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from weakclip.distributed import DistInfo
from weakclip.engine.checkpoint import (
    best_checkpoint_path,
    capture_rng_state,
    check_shapes,
    latest_checkpoint,
    restore_rng_state,
    save_best_checkpoint,
    save_checkpoint,
    trainable_state_dict,
)
from weakclip.engine.csv_log import open_csv_log, truncate_csv
from weakclip.engine.resume import config_differences, resume_checkpoint
from weakclip.engine.sampling import GlobalBatchSampler, SeededTransformDataset, mix_seed
from weakclip.errors import WeakclipError
from weakclip.worker_pool import usable_cpus

__all__ = ["LoopSettings", "MainLog", "TrainingTask", "optimizer_step", "run_training"]


# ====================================================================== pieces
class MainLog:
    """``log(msg)`` prints ``msg`` on the main process (through the tqdm bar while there is one)."""

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


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *,
                   scaler=None, grad_clip: float | None = None) -> None:
    """Backward pass of ``loss`` (through ``scaler`` for fp16), optional clipping of the gradients of
    ``params`` to norm ``grad_clip``, optimizer step.

    Raises FloatingPointError, before touching the gradients, when the loss is not finite (with fp16 the
    scaler skips such steps itself and lowers its scale instead).
    """
    if scaler is None and not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    check_shapes(model, state, "the checkpoint")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        shown = ", ".join((list(result.missing_keys) + list(result.unexpected_keys))[:5])
        raise WeakclipError(f"the checkpoint does not fit the model (missing or unexpected: {shown})")


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


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ====================================================================== loop
@dataclass
class LoopSettings:
    """How long and how the loop trains: one typed section built from a stage's train config
    (:meth:`from_section`). ``batch_size`` is GLOBAL (split over the processes)."""

    iters: int
    batch_size: int
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    num_workers: int = 0
    amp: str = "none"
    grad_clip: float | None = None
    eval_every: int = 0

    @classmethod
    def from_section(cls, section: Any, **changes: Any) -> LoopSettings:
        """The fields of ``section`` (e.g. :class:`~weakclip.config.TrainConfig`) that the loop knows,
        with ``changes`` on top (e.g. ``num_workers`` from the data section)."""
        known = {f.name for f in fields(cls)}
        values = {name: getattr(section, name) for name in known if hasattr(section, name)}
        return cls(**{**values, **changes})


@dataclass
class TrainingTask:
    """What the loop trains and the stage's hooks (:func:`run_training`).

    ``step_fn(train_model, batch, it) -> {"loss": ..., other terms}``: the forward pass and loss of one
    iteration, run under (CUDA) autocast (``train_model`` is the DDP wrapper under torchrun); the loop does
    the rest (:func:`optimizer_step`). ``dataset[i]`` samples go through
    ``transform(sample, rng=default_rng([seed, it, slot]))`` and ``collate_fn`` (default
    :func:`~weakclip.data.collate.collate_samples`). ``schedule`` needs ``set_iteration(it) -> lr`` and
    ``state_dict()``. The ``loss_terms`` are logged (CSV columns, progress bar, ``done:`` line).

    ``state_dict_fn(model)`` gives the model state to store (default: the trainable parameters and the
    buffers) and ``load_state_fn(model, state)`` restores it (default: ``load_state_dict`` with every stored
    key required to fit); ``extra_state`` holds further checkpoint fields. ``intro`` lines are logged once the
    checkpoint is loaded; ``prepare_workdir(workdir)`` runs on the main process once the workdir exists.
    ``nonfinite_hint`` ends the error on a non-finite loss (without an fp16 scaler; with one the step is
    skipped); ``desc`` labels the progress bar. ``evaluate_fn(model, iteration) -> {"miou": ..., ...}``
    runs every ``eval_every`` iterations of the settings.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    step_fn: Callable[[nn.Module, Any, int], dict[str, torch.Tensor]]
    dataset: Dataset
    transform: Callable
    collate_fn: Callable | None = None
    loss_terms: Sequence[str] = ("loss",)
    find_unused_parameters: bool = False
    state_dict_fn: Callable[[nn.Module], dict[str, torch.Tensor]] = trainable_state_dict
    load_state_fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any] = _load_model_state
    extra_state: dict[str, Any] | None = None
    intro: Sequence[str] = ()
    prepare_workdir: Callable[[Path], Any] | None = None
    nonfinite_hint: str = "lower the learning rate or set a gradient clip"
    desc: str = "retrain"
    evaluate_fn: Callable[[nn.Module, int], dict[str, float]] | None = None


def run_training(
    task: TrainingTask,
    settings: LoopSettings,
    *,
    workdir: str | Path,
    info: DistInfo,
    config: dict[str, Any],
    resume: bool = False,
    checkpoint: dict[str, Any] | None | str = "latest",
    max_iters_this_run: int | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``task.model`` for ``settings.iters`` iterations of GLOBAL batch ``settings.batch_size``.

    ``config`` (a plain dict) is stored in the checkpoints and compared on resume.

    ``checkpoint``: ``"latest"`` looks up the start with :func:`resume_checkpoint` (``resume=True``
    continues from the latest checkpoint, a fresh start when there is none; without ``resume`` a workdir
    holding checkpoints is refused); a dict (or None) is that lookup already made by the caller.

    ``settings.eval_every`` > 0 with ``task.evaluate_fn``: every so many iterations (and at the end) every
    process calls ``evaluate_fn`` (the model in eval mode; it returns the same metrics on every process);
    the main process appends a row to ``eval.csv`` and, when ``miou`` beats the best so far, writes
    ``checkpoints/best.pth`` (``iteration``, ``model``, ``miou``, the config and the extra fields). The best
    so far is kept in the regular checkpoints, so a resumed run continues the comparison. Returns a summary
    dict (same on every rank except "checkpoint"; ``best`` with the best evaluation when there is one).
    """
    from weakclip.data.collate import collate_samples

    model, optimizer, schedule, step_fn = task.model, task.optimizer, task.schedule, task.step_fn
    dataset, transform, collate_fn = task.dataset, task.transform, task.collate_fn
    loss_terms, state_dict_fn, load_state_fn = task.loss_terms, task.state_dict_fn, task.load_state_fn
    extra_state, intro, prepare_workdir = task.extra_state, task.intro, task.prepare_workdir
    nonfinite_hint, desc = task.nonfinite_hint, task.desc
    find_unused_parameters, evaluate_fn = task.find_unused_parameters, task.evaluate_fn
    iters, batch_size, seed = settings.iters, settings.batch_size, settings.seed
    checkpoint_every, keep_checkpoints, log_every = (settings.checkpoint_every, settings.keep_checkpoints,
                                                     settings.log_every)
    num_workers, amp, grad_clip, eval_every = (settings.num_workers, settings.amp, settings.grad_clip,
                                               settings.eval_every)

    workdir = Path(workdir)
    log = MainLog(info, quiet)
    if batch_size % info.world_size:
        raise WeakclipError(f"the global batch {batch_size} is not divisible by the {info.world_size} "
                            "processes")
    ckpt = resume_checkpoint(workdir, resume, log) if isinstance(checkpoint, str) else checkpoint
    start_iter = int(ckpt["iteration"]) if ckpt is not None else 0
    end_iter = iters
    if max_iters_this_run is not None:
        end_iter = min(iters, start_iter + max(0, int(max_iters_this_run)))
    end_iter = max(end_iter, start_iter)

    use_amp = info.device.type == "cuda" and amp != "none"
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    if ckpt is not None:
        load_state_fn(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        diffs = config_differences(ckpt.get("config") or {}, config)
        if diffs:
            log("note: the config differs from the checkpoint's: " + "; ".join(diffs[:8]))
    schedule.set_iteration(start_iter)
    for line in intro:
        log(line)

    train_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids,
                                              find_unused_parameters=find_unused_parameters)
        log(f"DDP over {info.world_size} processes ({dist.get_backend()}), "
            f"find_unused_parameters={find_unused_parameters}")
    if info.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        if prepare_workdir is not None:
            prepare_workdir(workdir)
        if ckpt is not None:
            truncate_csv(workdir / "log.csv", start_iter)
    if info.distributed:
        dist.barrier()
    if ckpt is not None and ckpt.get("rng"):
        states = ckpt["rng"]
        if len(states) != info.world_size:
            log(f"note: the checkpoint was written by {len(states)} processes, this run has "
                f"{info.world_size}; RNG states of rank 0 are reused")
        restore_rng_state(states[info.rank] if info.rank < len(states) else states[0])

    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, info.rank, info.world_size,
                                 start_iter=start_iter)
    if num_workers > usable_cpus():  # more would only contend (and torch warns of freezes)
        log(f"note: {num_workers} data loader workers asked for, {usable_cpus()} CPUs here: using "
            f"{usable_cpus()} (the batches do not depend on it)")
        num_workers = usable_cpus()
    loader = DataLoader(SeededTransformDataset(dataset, transform, seed), batch_sampler=sampler,
                        num_workers=num_workers, collate_fn=collate_fn or collate_samples,
                        pin_memory=info.device.type == "cuda")
    names = list(loss_terms)
    csv_fh = None
    writer = None
    tb = None
    if info.is_main:
        csv_fh, writer = open_csv_log(workdir / "log.csv", ["iter", "lr", *names, "seconds", "images_per_s"],
                                       resume=ckpt is not None)
        from weakclip.engine.tensorboard import scalar_writer

        tb = scalar_writer(workdir, desc)  # None without the tensorboard package
    bar = None
    if info.is_main and progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=iters, initial=start_iter, desc=desc, dynamic_ncols=True)
        log.bar = bar

    def save(done: int) -> Path | None:
        rng_states = _gather_rng(info)  # collective: every rank takes part
        out = None
        if info.is_main:
            state = {"iteration": done, "model": state_dict_fn(model), **(extra_state or {}),
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "schedule": schedule.state_dict(), "config": config, "rng": rng_states,
                     "world_size": info.world_size, "best_eval": best}
            out = save_checkpoint(workdir, state, done, keep=keep_checkpoints)
        if info.distributed:
            dist.barrier()
        return out

    best: dict[str, Any] | None = (ckpt or {}).get("best_eval")
    eval_fh = None
    if info.is_main and eval_every > 0 and evaluate_fn is not None:
        eval_path = workdir / "eval.csv"
        if ckpt is not None:
            truncate_csv(eval_path, start_iter)
        eval_fh, _ = open_csv_log(eval_path, ["iter", "miou", "best_miou"], resume=ckpt is not None)

    def periodic_eval(done: int) -> None:
        nonlocal best
        model.eval()
        try:
            metrics = evaluate_fn(model, done)
        finally:
            model.train()
        miou = float(metrics["miou"])
        improved = best is None or miou > float(best["miou"])
        if improved:
            best = {"iteration": done, "miou": miou}
        if info.is_main:
            if improved:
                save_best_checkpoint(workdir, {"iteration": done, "model": state_dict_fn(model),
                                               **(extra_state or {}), "config": config, "miou": miou})
            csv.writer(eval_fh).writerow([done, f"{miou:.6f}", f"{best['miou']:.6f}"])
            eval_fh.flush()
            log(f"eval at iteration {done}: mIoU {100 * miou:.2f}% (best {100 * best['miou']:.2f}% at "
                f"iteration {best['iteration']})")
        if info.distributed:
            dist.barrier()

    model.train()
    window = torch.zeros(len(names), dtype=torch.float64)
    window_n, window_t0 = 0, time.perf_counter()
    t0 = window_t0
    last_row: dict[str, float] = {}
    history: list[dict[str, float]] = []
    ckpt_path = None
    data_iter = iter(loader) if end_iter > start_iter else None
    try:
        for it in range(start_iter, end_iter):
            batch = next(data_iter)
            lr = schedule.set_iteration(it)
            torch.manual_seed(mix_seed(seed, it, info.rank))
            with _autocast(info.device, amp):
                terms = step_fn(train_model, batch, it)
            try:
                optimizer_step(terms["loss"], optimizer, model.parameters(), scaler=scaler,
                               grad_clip=grad_clip)
            except FloatingPointError as exc:
                raise WeakclipError(f"{exc} at iteration {it}: {nonfinite_hint}") from None
            values = torch.tensor([float(terms[k].detach()) if k in terms else math.nan for k in names],
                                  dtype=torch.float64)
            history.append(dict(zip(names, values.tolist())))
            window += values
            window_n += 1
            done = it + 1
            if bar is not None:
                bar.update(1)
                postfix = {k: f"{v:.4f}" for k, v in zip(names, values.tolist())}
                bar.set_postfix(postfix | {"lr": f"{lr:.2e}"}, refresh=False)
            if done % log_every == 0 or done == end_iter:
                means = _mean_over_ranks(window / window_n, info)
                seconds = time.perf_counter() - window_t0
                ips = window_n * batch_size / seconds if seconds > 0 else math.nan
                last_row = {"iter": done, "lr": lr, **dict(zip(names, means.tolist())),
                            "seconds": seconds, "images_per_s": ips}
                if writer is not None:
                    writer.writerow([done, f"{lr:.6e}", *(f"{v:.6f}" for v in means.tolist()),
                                     f"{seconds:.3f}", f"{ips:.3f}"])
                    csv_fh.flush()
                if tb is not None:
                    tb.add(done, {"lr": lr, **dict(zip(names, means.tolist())), "images_per_s": ips})
                window.zero_()
                window_n, window_t0 = 0, time.perf_counter()
            if evaluate_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == iters):
                periodic_eval(done)
            if done % checkpoint_every == 0 or done == end_iter:
                ckpt_path = save(done) or ckpt_path
    finally:
        if bar is not None:
            bar.close()
        if csv_fh is not None:
            csv_fh.close()
        if eval_fh is not None:
            eval_fh.close()
        if tb is not None:
            tb.close()
        del data_iter
    elapsed = time.perf_counter() - t0
    ran = end_iter - start_iter
    if ckpt_path is None:
        ckpt_path = latest_checkpoint(workdir)
    summary = {
        "workdir": str(workdir), "start_iter": start_iter, "end_iter": end_iter, "total_iters": iters,
        "finished": end_iter >= iters, "iterations_run": ran, "seconds": elapsed,
        "images_per_s": ran * batch_size / elapsed if ran and elapsed > 0 else math.nan,
        "final": last_row, "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        "history": history, "world_size": info.world_size, "best": best,
        "best_checkpoint": str(best_checkpoint_path(workdir)) if best is not None else None,
    }
    if ran:
        final = ", ".join(f"{k} {last_row[k]:.4f}" for k in names if k in last_row)
        log(f"done: iterations {start_iter}->{end_iter} of {iters} in {elapsed:.1f} s "
            f"({summary['images_per_s']:.2f} images/s); {final}; checkpoint {ckpt_path}")
    return summary
