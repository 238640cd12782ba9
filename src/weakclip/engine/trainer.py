"""The WeakCLIP training loop: one process or many (``torchrun``, DDP), exactly resumable.

Determinism and data order
--------------------------
Which images a step sees and how they are augmented is a pure function of
``(train.seed, iteration, global slot)``:

* the sample stream is the concatenation of per-epoch permutations of the dataset, permutation ``e``
  drawn from a ``torch.Generator`` seeded with ``(seed, e)``; iteration ``it`` takes stream positions
  ``[it * B, (it + 1) * B)`` (``B`` = GLOBAL batch) and process ``r`` of ``W`` takes the contiguous
  slice ``[r * B / W, (r + 1) * B / W)`` of it (:class:`GlobalBatchSampler`);
* the augmentation of global slot ``j`` of iteration ``it`` draws from
  ``numpy.random.default_rng([seed, it, j])``, whatever process or DataLoader worker runs it;
* torch's global RNG (dropout, stochastic depth) is reseeded at every iteration from
  ``(seed, it, rank)``.

So one process with global batch ``B`` and two processes with ``B / 2`` each see identical samples, and a
run resumed at iteration ``n`` continues exactly as an uninterrupted one (the checkpoint also holds the
optimizer, the scaler and every rank's RNG states).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from weakclip.config import Config
from weakclip.distributed import DistInfo, init_distributed
from weakclip.engine.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state_dict,
    restore_rng_state,
    save_checkpoint,
    trainable_state_dict,
)
from weakclip.engine.schedule import WarmupCosineSchedule
from weakclip.errors import WeakclipError

__all__ = ["GlobalBatchSampler", "LOSS_TERMS", "mix_seed", "train", "train_step"]

LOSS_TERMS: tuple[str, ...] = ("loss", "seeding", "boundary", "identity")
CSV_FIELDS: tuple[str, ...] = ("iter", "lr", *LOSS_TERMS, "seconds", "images_per_s")


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# ====================================================================== data
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


def norm_constants(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from weakclip.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return (CLIP_MEAN, CLIP_STD) if normalize == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def build_train_data(cfg: Config):
    """The seeded training set (dataset + transforms); returns ``(dataset, transform)``."""
    from weakclip.data.datasets import build_dataset
    from weakclip.data.transforms import train_transforms

    d = cfg.data
    if not d.root:
        raise WeakclipError("no dataset root given (data.root / --data-root)")
    if d.seeds is not None and not Path(d.seeds).is_dir():
        raise WeakclipError(f"seed folder not found: {d.seeds}")
    dataset = build_dataset(d.kind, d.root, split=d.split, seed_dir=d.seeds, with_gt=False)
    if not dataset.has_seeds:
        raise WeakclipError(f"the {d.kind} dataset at {d.root} has no seeds: pass the seed PNG folder "
                            "(--seeds / data.seeds)")
    mean, std = norm_constants(d.normalize)
    transform = train_transforms(crop_size=d.crop_size, scale=d.scale, ratio_range=d.ratio_range,
                                 cat_max_ratio=d.cat_max_ratio, flip_prob=d.flip_prob,
                                 photometric=d.photometric, mean=mean, std=std)
    return dataset, transform


# ====================================================================== helpers
class _Logger:
    def __init__(self, info: DistInfo, bar=None) -> None:
        self.info = info
        self.bar = bar

    def __call__(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _summary_lines(model) -> list[str]:
    """The start-up parameter report: the model's own summary, plus our count as a fallback."""
    lines = []
    summary = model.parameter_summary() if hasattr(model, "parameter_summary") else None
    if isinstance(summary, str):
        lines.extend(summary.splitlines())
    elif isinstance(summary, dict):
        lines.extend(f"{k}: {v}" for k, v in summary.items())
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    frozen = _count(p for p in model.parameters() if not p.requires_grad)
    towers = []
    for attr, label in (("image_tower", "image tower"), ("text_tower", "text tower")):
        tower = getattr(model, attr, None)
        if isinstance(tower, torch.nn.Module):
            towers.append((label, _count(tower.parameters()),
                           _count(p for p in tower.parameters() if p.requires_grad)))
    if towers and all(t == 0 for _, _, t in towers):
        listed = ", ".join(f"{label} {n:,} params" for label, n, _ in towers)
        lines.append(f"frozen: {listed}; trainable: {trainable:,} params (AdamW updates these only)")
    else:
        lines.append(f"frozen: {frozen:,} params; trainable: {trainable:,} params")
    return lines


def _has_unused(model) -> bool:
    flag = getattr(model, "has_unused_parameters", False)
    return bool(flag() if callable(flag) else flag)


def _optimizer_groups(model, weight_decay: float):
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else None
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    frozen = [p for p in params if not p.requires_grad]
    if frozen:
        raise WeakclipError("model.trainable_parameters() returned parameters with requires_grad False")
    return [{"params": params, "weight_decay": weight_decay}]


def _autocast(info: DistInfo, amp: str):
    if info.device.type != "cuda" or amp == "none":
        return torch.autocast(device_type=info.device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values)
        values = values / info.world_size
    return values.cpu()


def _gather_rng(info: DistInfo) -> list[dict]:
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _open_csv(path: Path, append: bool):
    new = not (append and path.is_file())
    fh = open(path, "w" if new else "a", newline="", encoding="utf-8")  # noqa: SIM115 - open for the run
    writer = csv.writer(fh)
    if new:
        writer.writerow(CSV_FIELDS)
    return fh, writer


def _truncate_csv(path: Path, upto_iter: int) -> None:
    """On resume, drop CSV rows beyond the checkpoint (they will be recomputed)."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= upto_iter]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(keep)


def train_step(model, loss_fn, optimizer, images: torch.Tensor, seeds: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor, *, autocast=None, scaler=None, grad_clip: float | None = None
               ) -> dict[str, torch.Tensor]:
    """One optimisation step: forward (under ``autocast``), loss in fp32 on the de-normalised images,
    backward (through ``scaler`` for fp16), optional gradient clipping, optimizer step.

    Raises FloatingPointError, before touching the weights, when the loss is not finite (with fp16 the
    scaler skips such steps itself and lowers its scale instead).
    """
    import contextlib

    with autocast if autocast is not None else contextlib.nullcontext():
        out = model(images)
    images_rgb = images * std + mean
    terms = loss_fn(out["logits"].float(), out["score_logits"].float(), seeds, images_rgb)
    loss = terms["loss"]
    if scaler is None and not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return terms


# ====================================================================== train
def train(cfg: Config, workdir: str | Path, *, clip_weights: str | Path | None = None, resume: bool = False,
          device: str | None = None, max_iters_this_run: int | None = None, progress: bool = True,
          ) -> dict[str, Any]:
    """Train WeakCLIP on the seeds of ``cfg.data``; returns a summary dict (main rank; others too).

    ``resume``: continue from ``workdir``'s latest checkpoint (start fresh when there is none).
    ``max_iters_this_run``: stop after this many iterations (a checkpoint is written), e.g. for jobs
    with a time limit; a later ``resume=True`` run continues the same schedule.
    Works alone and under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU); ``train.batch_size`` is global.
    """
    from weakclip.data.datasets import collate_samples
    from weakclip.losses import WeakCLIPLoss
    from weakclip.models.weakclip import build_model

    t_cfg = cfg.train
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    workdir = Path(workdir)
    log = _Logger(info)
    if t_cfg.batch_size % info.world_size:
        raise WeakclipError(f"train.batch_size {t_cfg.batch_size} (global) is not divisible by the "
                            f"{info.world_size} processes")
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {clip_weights}")

    # -------------------------------------------------------------- resume or fresh
    ckpt = None
    if resume:
        path = latest_checkpoint(workdir)
        if path is not None:
            ckpt = load_checkpoint(path)
            log(f"resuming from {path} (iteration {ckpt['iteration']})")
        else:
            log(f"no checkpoint in {workdir}: starting from iteration 0")
    elif list_checkpoints(workdir):
        raise WeakclipError(f"{workdir} already holds checkpoints: pass --resume to continue, or use "
                            "another --workdir")
    start_iter = int(ckpt["iteration"]) if ckpt is not None else 0
    if ckpt is not None and clip_weights is None and ckpt.get("clip_weights"):
        if not Path(ckpt["clip_weights"]).is_file():
            raise WeakclipError(f"the checkpoint was trained with CLIP weights {ckpt['clip_weights']}, which "
                                "is gone: pass --clip-weights")
        clip_weights = ckpt["clip_weights"]
        log(f"CLIP weights (recorded in the checkpoint): {clip_weights}")
    if start_iter >= t_cfg.iters:
        log(f"nothing to do: the checkpoint is at iteration {start_iter} of {t_cfg.iters}")

    if t_cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(mix_seed(t_cfg.seed, -1, info.rank))

    # -------------------------------------------------------------- data
    dataset, transform = build_train_data(cfg)
    classes = list(cfg.classes) if cfg.classes is not None else list(dataset.classes)
    if len(classes) != dataset.num_classes:
        raise WeakclipError(f"the config names {len(classes)} classes, the dataset has {dataset.num_classes}")
    per_rank = t_cfg.batch_size // info.world_size
    sampler = GlobalBatchSampler(len(dataset), t_cfg.batch_size, t_cfg.seed, info.rank, info.world_size,
                                 start_iter=start_iter)
    loader = DataLoader(SeededTransformDataset(dataset, transform, t_cfg.seed), batch_sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_samples,
                        pin_memory=info.device.type == "cuda", persistent_workers=False)

    # -------------------------------------------------------------- model, loss, optimiser
    model = build_model(cfg.model, classes, clip_weights=clip_weights).to(info.device)
    model.train()
    loss_fn = WeakCLIPLoss(loss_size=cfg.loss.loss_size, identity_weight=cfg.loss.identity_weight)
    loss_fn = loss_fn.to(info.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    groups = _optimizer_groups(model, t_cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    schedule = WarmupCosineSchedule(optimizer, t_cfg.lr, t_cfg.iters, t_cfg.warmup_iters, t_cfg.warmup_ratio,
                                    t_cfg.min_lr)
    use_amp = info.device.type == "cuda" and t_cfg.amp != "none"
    scaler = torch.amp.GradScaler("cuda") if use_amp and t_cfg.amp == "fp16" else None
    if t_cfg.amp != "none" and info.device.type != "cuda":
        log(f"note: train.amp={t_cfg.amp} acts on CUDA only; this {info.device.type} run uses float32")

    if ckpt is not None:
        load_trainable_state_dict(model, ckpt["model"], "the checkpoint")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        schedule.set_iteration(start_iter)
        diffs = _config_differences(ckpt.get("config") or {}, cfg.to_dict())
        if diffs:
            log("note: the config differs from the checkpoint's: " + "; ".join(diffs[:8]))

    for line in _summary_lines(model):
        log(line)
    log(f"data: {len(dataset)} images ({dataset!r}); global batch {t_cfg.batch_size} = "
        f"{info.world_size} x {per_rank}; crop {cfg.data.crop_size}; normalise {cfg.data.normalize}")
    log(f"schedule: {t_cfg.iters} iterations, AdamW lr {t_cfg.lr:g} wd {t_cfg.weight_decay:g}, warm-up "
        f"{t_cfg.warmup_iters} from x{t_cfg.warmup_ratio:g}, cosine to {t_cfg.min_lr:g}; device "
        f"{info.device}, amp {t_cfg.amp if use_amp else 'off'}")

    train_model: torch.nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        unused = _has_unused(model)
        train_model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=unused)
        log(f"DDP over {info.world_size} processes ({dist.get_backend()}), "
            f"find_unused_parameters={unused}")

    # -------------------------------------------------------------- bookkeeping
    if info.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(workdir / "config.yaml")
        if ckpt is not None:
            _truncate_csv(workdir / "log.csv", start_iter)
    if info.distributed:
        dist.barrier()
    if ckpt is not None and ckpt.get("rng"):
        states = ckpt["rng"]
        if len(states) != info.world_size:
            log(f"note: the checkpoint was written by {len(states)} processes, this run has "
                f"{info.world_size}; RNG states of rank 0 are reused")
        restore_rng_state(states[info.rank] if info.rank < len(states) else states[0])

    end_iter = t_cfg.iters
    if max_iters_this_run is not None:
        end_iter = min(end_iter, start_iter + max(0, int(max_iters_this_run)))
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=info.device).view(1, 3, 1, 1)
                     for v in norm_constants(cfg.data.normalize))

    csv_fh, csv_writer = (None, None)
    if info.is_main:
        csv_fh, csv_writer = _open_csv(workdir / "log.csv", append=ckpt is not None)
    bar = None
    if info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=t_cfg.iters, initial=start_iter, desc="train", dynamic_ncols=True)
        log.bar = bar

    window = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
    window_n = 0
    window_t0 = time.perf_counter()
    run_t0 = window_t0
    last_row: dict[str, float] = {}
    history: list[dict[str, float]] = []
    ckpt_path: Path | None = None
    data_iter = iter(loader)

    def save(iteration: int) -> Path | None:
        rng_states = _gather_rng(info)  # collective: every rank takes part
        path = None
        if info.is_main:
            state = {
                "iteration": iteration,
                "model": trainable_state_dict(model, include_frozen=clip_weights is None),
                "clip_weights": None if clip_weights is None else str(clip_weights),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "schedule": schedule.state_dict(),
                "config": cfg.to_dict(),
                "rng": rng_states,
                "world_size": info.world_size,
            }
            path = save_checkpoint(workdir, state, iteration, keep=t_cfg.keep_checkpoints)
        if info.distributed:
            dist.barrier()
        return path

    try:
        for it in range(start_iter, end_iter):
            batch = next(data_iter)
            images = batch["image"].to(info.device, non_blocking=True)
            seeds = batch["seed"].to(info.device, non_blocking=True)
            lr = schedule.set_iteration(it)
            torch.manual_seed(mix_seed(t_cfg.seed, it, info.rank))

            try:
                terms = train_step(train_model, loss_fn, optimizer, images, seeds, mean_t, std_t,
                                   autocast=_autocast(info, t_cfg.amp), scaler=scaler,
                                   grad_clip=t_cfg.grad_clip)
            except FloatingPointError as exc:
                raise WeakclipError(f"{exc} at iteration {it}: lower train.lr, set train.grad_clip, or use "
                                    "train.amp=bf16/none") from None
            values = torch.tensor([float(terms[k].detach()) if k in terms else math.nan for k in LOSS_TERMS],
                                  dtype=torch.float64)
            history.append(dict(zip(LOSS_TERMS, values.tolist())))
            window += values
            window_n += 1
            done = it + 1
            if bar is not None:
                bar.update(1)
                postfix = {k: f"{v:.4f}" for k, v in zip(LOSS_TERMS, values.tolist())}
                bar.set_postfix(postfix | {"lr": f"{lr:.2e}"}, refresh=False)
            if done % t_cfg.log_every == 0 or done == end_iter:
                means = _reduce_mean(window / window_n, info)
                seconds = time.perf_counter() - window_t0
                images_per_s = window_n * t_cfg.batch_size / seconds if seconds > 0 else math.nan
                last_row = {"iter": done, "lr": lr, **dict(zip(LOSS_TERMS, means.tolist())),
                            "seconds": seconds, "images_per_s": images_per_s}
                if csv_writer is not None:
                    csv_writer.writerow([done, f"{lr:.6e}"] + [f"{v:.6f}" for v in means.tolist()]
                                        + [f"{seconds:.3f}", f"{images_per_s:.3f}"])
                    csv_fh.flush()
                window.zero_()
                window_n = 0
                window_t0 = time.perf_counter()
            if done % t_cfg.checkpoint_every == 0 or done == end_iter:
                ckpt_path = save(done) or ckpt_path
    finally:
        if bar is not None:
            bar.close()
        if csv_fh is not None:
            csv_fh.close()
        del data_iter

    elapsed = time.perf_counter() - run_t0
    if ckpt_path is None:
        ckpt_path = latest_checkpoint(workdir)
    ran = max(0, end_iter - start_iter)
    summary = {
        "workdir": str(workdir),
        "start_iter": start_iter,
        "end_iter": max(end_iter, start_iter),
        "total_iters": t_cfg.iters,
        "finished": max(end_iter, start_iter) >= t_cfg.iters,
        "iterations_run": ran,
        "seconds": elapsed,
        "images_per_s": ran * t_cfg.batch_size / elapsed if elapsed > 0 and ran else math.nan,
        "final": last_row,
        "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        "history": history,
        "world_size": info.world_size,
    }
    if ran:
        final = ", ".join(f"{k} {last_row[k]:.4f}" for k in LOSS_TERMS if k in last_row)
        log(f"done: iterations {start_iter}->{end_iter} of {t_cfg.iters} in {elapsed:.1f} s "
            f"({summary['images_per_s']:.2f} images/s); {final}; checkpoint {ckpt_path}")
    if started_group and info.distributed:
        dist.destroy_process_group()
    return summary
