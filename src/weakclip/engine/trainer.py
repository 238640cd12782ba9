"""WeakCLIP refinement training: the model, loss, optimiser and schedule of the release on the shared loop.

:func:`train` builds the seeded training set (:func:`build_train_data`), the WeakCLIP model (frozen CLIP
towers), the :class:`~weakclip.losses.WeakCLIPLoss` (terms :data:`LOSS_TERMS`), AdamW over the trainable
parameters and the warm-up + cosine schedule, then runs them on :func:`weakclip.engine.loop.run_training`:
one process or many (``torchrun``, DDP), exactly resumable, with the data order, reseeding, checkpoints and
logs described there. Its checkpoints hold the trainable parameters only when a CLIP weights file is given
(recorded as ``clip_weights``, an absolute path: a resumed run takes it from there); with random towers they
hold the towers too. Every checkpoint stores the class names and palette it was trained with (``classes``,
``palette``) and its config's paths absolute, so that it loads from any folder without its dataset.
:func:`train_step` is one optimisation step outside the loop (benchmarks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from weakclip.config import Config
from weakclip.distributed import init_distributed
from weakclip.engine.checkpoint import load_trainable_state_dict, trainable_state_dict
from weakclip.engine.loop import LoopSettings, MainLog, TrainingTask, optimizer_step, run_training
from weakclip.engine.resume import check_resume_network, resume_checkpoint
from weakclip.engine.sampling import mix_seed
from weakclip.engine.schedule import WarmupCosineSchedule
from weakclip.errors import WeakclipError

__all__ = ["LOSS_TERMS", "optimizer_groups", "refinement_loss", "train", "train_step"]

LOSS_TERMS: tuple[str, ...] = ("loss", "seeding", "boundary", "identity")
NONFINITE_HINT = "lower train.lr, set train.grad_clip, or use train.amp=bf16/none"


# ====================================================================== data
def norm_constants(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from weakclip.data.normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return (CLIP_MEAN, CLIP_STD) if normalize == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def build_train_data(cfg: Config):
    """The seeded training set (dataset + transforms); returns ``(dataset, transform)``."""
    from weakclip.data.datasets import build_dataset, require_images
    from weakclip.data.transforms import train_transforms

    d = cfg.data
    if not d.root:
        raise WeakclipError("no dataset root given (data.root / --data-root)")
    if d.seeds is not None and not Path(d.seeds).is_dir():
        raise WeakclipError(f"seed folder not found: {d.seeds}")
    dataset = build_dataset(d.kind, d.root, split=d.split, seed_dir=d.seeds, with_gt=False,
                            image_reader=d.image_reader, image_orientation=d.image_orientation)
    require_images(dataset, "training")
    if not dataset.has_seeds:
        raise WeakclipError(f"the {d.kind} dataset at {d.root} has no seeds: pass the seed PNG folder "
                            "(--seeds / data.seeds)")
    mean, std = norm_constants(d.normalize)
    transform = train_transforms(crop_size=d.crop_size, scale=d.scale, ratio_range=d.ratio_range,
                                 cat_max_ratio=d.cat_max_ratio, flip_prob=d.flip_prob,
                                 photometric=d.photometric, mean=mean, std=std)
    return dataset, transform


# ====================================================================== helpers
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


# Parameter-name prefixes of the release's ``lr_mult=0`` optimizer groups ("backbone" = image tower + pyramid
# adapter ``fpn1..fpn4``; "text_encoder" = text tower), mapped to our module names.
_TOWER_PREFIXES = ("image_tower.", "text_tower.")
_ADAPTER_PREFIXES = ("adapter.",)


def optimizer_groups(model, weight_decay: float, *, tower_lr_mult: float = 1.0,
                     adapter_lr_mult: float = 1.0) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: ``towers`` (``tower_lr_mult``), ``adapter``
    (``adapter_lr_mult``) and ``rest`` (1), each with ``weight_decay`` (empty groups left out).

    The release puts the image tower, the adapter and the text tower in mmcv groups with ``lr_mult=0``; with
    :class:`~weakclip.engine.schedule.WarmupCosineSchedule` (mmcv's rule) their rate still rises from 0 to
    ``min_lr``. A model without these submodules gets one group.
    """
    named = (model.named_trainable_parameters() if hasattr(model, "named_trainable_parameters")
             else [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    buckets: dict[str, list] = {"towers": [], "adapter": [], "rest": []}
    for name, param in named:
        key = ("towers" if name.startswith(_TOWER_PREFIXES)
               else "adapter" if name.startswith(_ADAPTER_PREFIXES) else "rest")
        buckets[key].append(param)
    mults = {"towers": float(tower_lr_mult), "adapter": float(adapter_lr_mult), "rest": 1.0}
    return [{"params": params, "weight_decay": weight_decay, "lr_mult": mults[key], "name": key}
            for key, params in buckets.items() if params]


# ====================================================================== step
def refinement_loss(model, loss_fn, images: torch.Tensor, seeds: torch.Tensor, mean: torch.Tensor,
                    std: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward pass (under the caller's autocast, if any), then the loss terms, outside autocast in fp32
    on the de-normalised images."""
    out = model(images)
    with torch.autocast(device_type=images.device.type, enabled=False):
        images_rgb = images * std + mean
        return loss_fn(out["logits"].float(), out["score_logits"].float(), seeds, images_rgb,
                       images_norm=images, mean=mean, std=std)


def train_step(model, loss_fn, optimizer, images: torch.Tensor, seeds: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor, *, autocast=None, scaler=None, grad_clip: float | None = None
               ) -> dict[str, torch.Tensor]:
    """One optimisation step outside the training loop: :func:`refinement_loss` under ``autocast``, then
    backward (through ``scaler`` for fp16), optional clipping of the optimizer's parameters, optimizer step
    (:func:`~weakclip.engine.loop.optimizer_step`).

    Raises FloatingPointError, before touching the weights, when the loss is not finite (with fp16 the
    scaler skips such steps itself and lowers its scale instead).
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        terms = refinement_loss(model, loss_fn, images, seeds, mean, std)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_step(terms["loss"], optimizer, params, scaler=scaler, grad_clip=grad_clip)
    return terms


# ====================================================================== train
def train(cfg: Config, workdir: str | Path, *, clip_weights: str | Path | None = None, resume: bool = False,
          device: str | None = None, max_iters_this_run: int | None = None, progress: bool = True,
          evaluator: Callable | None = None) -> dict[str, Any]:
    """Train WeakCLIP on the seeds of ``cfg.data``; returns a summary dict (main rank; others too).

    ``evaluator(cfg, info, mean, std) -> evaluate(model, iteration)``: builds the periodic evaluation that
    ``train.eval_every`` > 0 needs (the callers above pass
    :func:`weakclip.inference.periodic.build_evaluator`: the engine does not reach up to inference).

    ``resume``: continue from ``workdir``'s latest checkpoint (start fresh when there is none).
    ``max_iters_this_run``: stop after this many iterations (a checkpoint is written), e.g. for jobs
    with a time limit; a later ``resume=True`` run continues the same schedule.
    Works alone and under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU); ``train.batch_size`` is global.
    """
    from weakclip.config import PATH_KEYS
    from weakclip.data.classes import class_record
    from weakclip.losses import WeakCLIPLoss
    from weakclip.models.weakclip import build_model
    from weakclip.sections import absolute_paths

    cfg = Config.from_dict(cfg.to_dict())  # a copy whose paths are recorded absolute: readable from anywhere
    absolute_paths(cfg, PATH_KEYS)
    t_cfg = cfg.train
    if t_cfg.eval_every > 0 and evaluator is None:
        raise WeakclipError("train.eval_every > 0 needs an evaluator: pass "
                            "evaluator=weakclip.inference.periodic.build_evaluator")
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    workdir = Path(workdir)
    log = MainLog(info)
    if t_cfg.batch_size % info.world_size:
        raise WeakclipError(f"train.batch_size {t_cfg.batch_size} (global) is not divisible by the "
                            f"{info.world_size} processes")
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {clip_weights}")

    # -------------------------------------------------------------- resume or fresh
    ckpt = resume_checkpoint(workdir, resume, log)  # before the model: it may name the CLIP weights
    if ckpt is not None:  # another preset's or network's folder: one line, before the weights are loaded
        from weakclip.config import PRESETS, load_preset

        presets = {name: load_preset(name).to_dict()["model"] for name in PRESETS}
        check_resume_network(ckpt, cfg.to_dict(), workdir, kind="refinement model", presets=presets)
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

    # -------------------------------------------------------------- data, model, loss, optimiser
    dataset, transform = build_train_data(cfg)
    classes = list(cfg.classes) if cfg.classes is not None else list(dataset.classes)
    if len(classes) != dataset.num_classes:
        raise WeakclipError(f"the config names {len(classes)} classes, the dataset has {dataset.num_classes}")
    model = build_model(cfg.model, classes, clip_weights=clip_weights).to(info.device)
    if info.distributed and info.device.type == "cuda" and not cfg.model.bn_eval:
        # BatchNorm with batch statistics over the GLOBAL batch, as the release's SyncBN
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    loss_fn = WeakCLIPLoss(loss_size=cfg.loss.loss_size, identity_weight=cfg.loss.identity_weight,
                           boundary_crf=cfg.loss.boundary_crf, identity_mean=cfg.loss.identity_mean)
    loss_fn = loss_fn.to(info.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    groups = optimizer_groups(model, t_cfg.weight_decay, tower_lr_mult=t_cfg.tower_lr_mult,
                              adapter_lr_mult=t_cfg.adapter_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    schedule = WarmupCosineSchedule(optimizer, t_cfg.lr, t_cfg.iters, t_cfg.warmup_iters, t_cfg.warmup_ratio,
                                    t_cfg.min_lr)
    use_amp = info.device.type == "cuda" and t_cfg.amp != "none"
    if t_cfg.amp != "none" and info.device.type != "cuda":
        log(f"note: train.amp={t_cfg.amp} acts on CUDA only; this {info.device.type} run uses float32")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=info.device).view(1, 3, 1, 1)
                     for v in norm_constants(cfg.data.normalize))

    def step(train_model, batch: dict[str, Any], it: int) -> dict[str, torch.Tensor]:
        images = batch["image"].to(info.device, non_blocking=True)
        seeds = batch["seed"].to(info.device, non_blocking=True)
        return refinement_loss(train_model, loss_fn, images, seeds, mean_t, std_t)

    include_frozen = clip_weights is None  # random towers: the checkpoint must hold them
    intro = [
        *_summary_lines(model),
        f"data: {len(dataset)} images ({dataset!r}); global batch {t_cfg.batch_size} = "
        f"{info.world_size} x {t_cfg.batch_size // info.world_size}; crop {cfg.data.crop_size}; "
        f"normalise {cfg.data.normalize}",
        f"schedule: {t_cfg.iters} iterations, AdamW lr {t_cfg.lr:g} wd {t_cfg.weight_decay:g}, warm-up "
        f"{t_cfg.warmup_iters} from x{t_cfg.warmup_ratio:g}, cosine to {t_cfg.min_lr:g}; device "
        f"{info.device}, amp {t_cfg.amp if use_amp else 'off'}",
    ]
    task = TrainingTask(
        model=model, optimizer=optimizer, schedule=schedule, step_fn=step, dataset=dataset,
        transform=transform, loss_terms=LOSS_TERMS, find_unused_parameters=_has_unused(model),
        state_dict_fn=lambda m: trainable_state_dict(m, include_frozen=include_frozen),
        load_state_fn=lambda m, state: load_trainable_state_dict(m, state, "the checkpoint"),
        # the classes and palette travel with the network: it loads without its dataset, from any folder
        extra_state={"clip_weights": None if clip_weights is None else os.path.abspath(clip_weights),
                     **class_record(classes)},
        intro=intro, prepare_workdir=lambda w: cfg.to_yaml(w / "config.yaml"), nonfinite_hint=NONFINITE_HINT,
        desc="train", evaluate_fn=(evaluator(cfg, info, *norm_constants(cfg.data.normalize))
                                   if t_cfg.eval_every > 0 else None))
    summary = run_training(task, LoopSettings.from_section(t_cfg, num_workers=cfg.data.num_workers),
                           workdir=workdir, info=info, config=cfg.to_dict(), checkpoint=ckpt,
                           max_iters_this_run=max_iters_this_run, progress=progress)
    if started_group and info.distributed:
        dist.destroy_process_group()
    return summary
