"""Retraining: a DeepLab-family network trained on the (refined) pseudo masks, then evaluated on val.

The recipe (:class:`RetrainConfig`; presets ``weakclip/configs/retrain_voc.yaml`` and ``retrain_coco.yaml``,
whose comments give the source of every number) is the usual DeepLab recipe of WSSS papers:

* DeepLabV3 on an ImageNet-pretrained ResNet-101, output stride 16 (ASPP rates 6/12/18), BatchNorm trained;
* SGD, momentum 0.9, weight decay 1e-4; backbone lr 1e-3 and the freshly initialised head x10 (1e-2);
  "poly" decay ``(1 - it / iters) ** 0.9`` (AdamW is an option: ``train.optimizer=adamw``);
* random scale 0.5-2.0 of the original image, random crop 512 (padded with 255 when smaller), horizontal flip;
  ImageNet mean/std (the backbone's own statistics);
* pixel-wise cross-entropy with 255 ignored (pseudo masks may mark unsure pixels 255);
* VOC: 30k iterations of 16 images; COCO: 80k iterations of 16 images;
* evaluation on val at full resolution, single scale by default, multi-scale (0.5-1.75) + flip and dense CRF
  as options.

:func:`retrain` runs the whole stage on top of the training engine (deterministic data order, atomic
checkpoints, exact resume, DDP under torchrun, CSV log, progress bar; :mod:`weakclip.engine.loop`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.config import (
    _plain,
    dump_yaml,
    load_sections,
    packaged_yaml,
    read_yaml,
    set_section_value,
    split_override,
)
from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.transforms import _Transform
from weakclip.errors import DataError, WeakclipError

__all__ = [
    "RETRAIN_PRESETS",
    "RetrainConfig",
    "RetrainDataConfig",
    "RetrainEvalConfig",
    "RetrainModelConfig",
    "RetrainTrainConfig",
    "apply_retrain_overrides",
    "build_retrain_transform",
    "load_retrain_preset",
    "retrain",
]

RETRAIN_PRESETS: tuple[str, ...] = ("voc", "coco")


@dataclass
class RetrainModelConfig:
    """The network (:func:`weakclip.retrain.models.build_segmenter`)."""

    name: str = "deeplabv3_resnet101"
    output_stride: int = 16
    pretrained_backbone: bool = True
    backbone_weights: str | None = None
    head_channels: int = 256
    sync_bn: bool = True  # SyncBatchNorm under DDP on CUDA (several processes); plain BatchNorm otherwise


@dataclass
class RetrainDataConfig:
    """Training data (the pseudo masks are the targets) and the augmentation."""

    kind: Literal["voc", "coco", "folder"] = "voc"
    root: str | None = None
    split: str | None = "train_aug"
    val_split: str | None = "val"
    masks: str | None = None
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    photometric: bool = False
    normalize: Literal["imagenet", "clip"] = "imagenet"
    num_workers: int = 4


@dataclass
class RetrainTrainConfig:
    """Optimisation: ``lr`` is the backbone's rate, the head's is ``lr * head_lr_mult``; ``batch_size`` is
    GLOBAL."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0
    iters: int = 30000
    batch_size: int = 16
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 50
    keep_checkpoints: int = 3


@dataclass
class RetrainEvalConfig:
    """Validation: ``scales`` (1.0 = the original size), ``flip``, dense CRF with ``crf_params``."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    crf_params: Literal["voc", "coco"] = "voc"
    max_images: int | None = None


@dataclass
class RetrainConfig:
    model: RetrainModelConfig = field(default_factory=RetrainModelConfig)
    data: RetrainDataConfig = field(default_factory=RetrainDataConfig)
    train: RetrainTrainConfig = field(default_factory=RetrainTrainConfig)
    eval: RetrainEvalConfig = field(default_factory=RetrainEvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}

    def to_yaml(self, path: str | Path | None = None) -> str:
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config") -> RetrainConfig:
        cfg = cls()
        load_sections(cfg, _SECTIONS, raw, source)
        _validate(cfg, source)
        return cfg


_SECTIONS: dict[str, type] = {
    "model": RetrainModelConfig, "data": RetrainDataConfig, "train": RetrainTrainConfig,
    "eval": RetrainEvalConfig,
}


def _validate(cfg: RetrainConfig, source: str) -> None:
    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise WeakclipError(f"{source}: {msg}")

    need(m.output_stride in (8, 16, 32), f"model.output_stride must be 8, 16 or 32, got {m.output_stride}")
    need(m.head_channels > 0, f"model.head_channels must be positive, got {m.head_channels}")
    need(d.kind in ("voc", "coco", "folder"), f"data.kind must be voc, coco or folder, got {d.kind!r}")
    need(d.crop_size > 0, f"data.crop_size must be positive, got {d.crop_size}")
    need(0 < d.scale_range[0] <= d.scale_range[1],
         f"data.scale_range must be 0 < low <= high, got {d.scale_range}")
    need(0 <= d.flip_prob <= 1, f"data.flip_prob must lie in [0, 1], got {d.flip_prob}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.head_lr_mult > 0, f"train.head_lr_mult must be positive, got {t.head_lr_mult}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.poly_power >= 0, f"train.poly_power must be >= 0, got {t.poly_power}")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr must lie in [0, train.lr], got {t.min_lr}")
    need(t.iters > 0, f"train.iters must be positive, got {t.iters}")
    need(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    need(t.checkpoint_every > 0 and t.log_every > 0 and t.keep_checkpoints > 0,
         "train.checkpoint_every, train.log_every and train.keep_checkpoints must be positive")
    need(len(e.scales) > 0 and min(e.scales) > 0, f"eval.scales must be positive numbers, got {e.scales}")


def load_retrain_preset(name: str | Path) -> RetrainConfig:
    """``"voc"`` / ``"coco"`` (``weakclip/configs/retrain_<name>.yaml``) or a YAML file of these sections."""
    key = str(name).strip()
    if key.lower() in RETRAIN_PRESETS:
        return RetrainConfig.from_dict(packaged_yaml(f"retrain_{key.lower()}.yaml"),
                                       source=f"retrain preset {key.lower()}")
    path = Path(key)
    if not path.is_file():
        raise WeakclipError(f"unknown retrain preset {key!r}: expected voc, coco or a .yaml file")
    return RetrainConfig.from_dict(read_yaml(path), source=str(path))


def apply_retrain_overrides(cfg: RetrainConfig, overrides: list[str] | tuple[str, ...]) -> RetrainConfig:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied (typed as in ``weakclip.config``)."""
    cfg = RetrainConfig.from_dict(cfg.to_dict())
    for item in overrides:
        key, value = split_override(item)
        set_section_value(cfg, _SECTIONS, key, value, example="train.iters, model.name")
    _validate(cfg, "override")
    return cfg


# ====================================================================== data
class RandomScale(_Transform):
    """Resize image and masks by ``r ~ U(low, high)`` times their own size (the DeepLab augmentation).

    A ``_Transform`` so that :class:`~weakclip.data.transforms.Compose` forwards its seeded ``rng``.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        from weakclip.data.transforms import MASK_KEYS, resize_image, resize_mask

        g = rng if rng is not None else np.random.default_rng(np.random.randint(0, 2**31 - 1))
        r = g.uniform(*self.scale_range)
        h, w = sample["image"].shape[:2]
        size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5)))
        out = dict(sample)
        out["image"] = resize_image(sample["image"], size)
        for k in MASK_KEYS:
            if sample.get(k) is not None:
                out[k] = resize_mask(sample[k], size)
        return out


def norm_stats(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from weakclip.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (CLIP_MEAN, CLIP_STD)


def build_retrain_transform(d: RetrainDataConfig):
    """Random scale, random crop (padded with 255 when smaller), flip, [photometric], normalise, tensors."""
    from weakclip.data.transforms import (
        Compose,
        Normalize,
        Pad,
        PhotometricDistortion,
        RandomCrop,
        RandomFlip,
        ToTensor,
    )

    mean, std = norm_stats(d.normalize)
    ts: list = [RandomScale(d.scale_range), RandomCrop(d.crop_size, cat_max_ratio=1.0),
                RandomFlip(d.flip_prob)]
    if d.photometric:
        ts.append(PhotometricDistortion())
    ts += [Normalize(mean, std), Pad(d.crop_size, pad_value=0, seg_pad_value=IGNORE_INDEX), ToTensor()]
    return Compose(ts)


def _train_dataset(cfg: RetrainConfig, masks: Path, extra: dict[str, Any]):
    from weakclip.data.datasets import build_dataset

    d = cfg.data
    if not d.root:
        raise WeakclipError("no dataset root given (--data-root / data.root)")
    if not Path(d.root).exists():
        raise DataError(f"dataset folder not found: {d.root}")
    return build_dataset(d.kind, d.root, split=d.split, seed_dir=masks, with_gt=False, **extra)


def _val_dataset(cfg: RetrainConfig, extra: dict[str, Any]):
    from weakclip.data.datasets import build_dataset

    return build_dataset(cfg.data.kind, cfg.data.root, split=cfg.data.val_split, with_gt=True, **extra)


def cross_entropy_step(model, batch: dict[str, Any], it: int) -> dict[str, torch.Tensor]:
    """Pixel-wise cross-entropy of the logits against the pseudo masks (``"seed"``), 255 ignored."""
    device = next(model.parameters()).device
    images = batch["image"].to(device, non_blocking=True)
    target = batch["seed"].to(device, non_blocking=True)
    logits = model(images).float()
    if not bool((target != IGNORE_INDEX).any()):
        return {"loss": logits.sum() * 0.0}
    return {"loss": F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)}


# ====================================================================== the stage
def retrain(cfg: RetrainConfig, masks_dir: str | Path | None = None,
            dataset_kwargs: dict[str, Any] | None = None, workdir: str | Path = "work_retrain", *,
            resume: bool = False, device: str | None = None,
            max_iters_this_run: int | None = None, evaluate: bool = True,
            val_kwargs: dict[str, Any] | None = None, progress: bool = True, quiet: bool = False,
            pred_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on the pseudo masks of ``masks_dir`` (default ``cfg.data.masks``) and evaluate it.

    ``dataset_kwargs`` / ``val_kwargs``: extra constructor arguments of the train / val dataset
    (e.g. ``image_root`` for COCO). The mask folder is checked first (:func:`preflight_masks`: one DataError
    listing missing files, wrong sizes and out-of-range values). Writes ``config.yaml``, ``log.csv``,
    ``checkpoints/`` and (with ``evaluate`` and a ``data.val_split``) ``eval.json`` in ``workdir``; prints the
    per-class table. ``resume=True`` continues from the latest checkpoint (on a finished workdir it only
    evaluates, e.g. with other eval settings). Returns the training summary plus ``"eval"`` (percent).
    """
    import torch.distributed as dist

    from weakclip.distributed import init_distributed
    from weakclip.engine.loop import mix_seed, run_training
    from weakclip.engine.schedule import PolySchedule
    from weakclip.retrain.check import preflight_masks
    from weakclip.retrain.evaluate import evaluate_segmenter, write_eval
    from weakclip.retrain.models import build_segmenter

    masks = Path(masks_dir) if masks_dir is not None else (Path(cfg.data.masks) if cfg.data.masks else None)
    if masks is None:
        raise WeakclipError("no pseudo-mask folder given (--masks DIR)")
    if not masks.is_dir():
        raise DataError(f"pseudo-mask folder not found: {masks}")
    cfg = apply_retrain_overrides(cfg, [f"data.masks={masks}"])
    workdir = Path(workdir)
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        dataset = _train_dataset(cfg, masks, dict(dataset_kwargs or {}))
        preflight_masks(dataset, masks, workers=max(1, cfg.data.num_workers))
        val = None
        if evaluate and cfg.data.val_split:
            val = _val_dataset(cfg, dict(val_kwargs or {}))
            if val.num_classes != dataset.num_classes:
                raise DataError(f"the val set has {val.num_classes} classes, the training set "
                                f"{dataset.num_classes}")

        m, t = cfg.model, cfg.train
        torch.manual_seed(mix_seed(t.seed, -1, 0))  # same initial weights on every process
        model = build_segmenter(m.name, dataset.num_classes, backbone_weights=m.backbone_weights,
                                pretrained_backbone=m.pretrained_backbone, output_stride=m.output_stride,
                                head_channels=m.head_channels)
        if info.distributed and m.sync_bn and info.device.type == "cuda":  # SyncBatchNorm is CUDA-only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(info.device)
        groups = model.param_groups(t.head_lr_mult)
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        schedule = PolySchedule(optimizer, t.lr, t.iters, t.poly_power, t.min_lr, t.warmup_iters, 1e-6)
        if info.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(workdir / "config.yaml")
            if not quiet:
                n_back = sum(p.numel() for p in model.backbone_parameters())
                n_all = sum(p.numel() for p in model.parameters())
                print(f"retrain: {m.name} (output stride {m.output_stride}), {n_all:,} parameters "
                      f"({n_back:,} backbone); {len(dataset)} images, {dataset.num_classes} classes, "
                      f"masks {masks}; {t.iters} iterations x {t.batch_size} ({info.world_size} "
                      f"process(es)), {t.optimizer} lr {t.lr:g} (head x{t.head_lr_mult:g}), poly "
                      f"{t.poly_power:g}; device {info.device}",
                      flush=True)
        summary = run_training(
            model=model, optimizer=optimizer, schedule=schedule, step_fn=cross_entropy_step, dataset=dataset,
            transform=build_retrain_transform(cfg.data), workdir=workdir, info=info, iters=t.iters,
            batch_size=t.batch_size, seed=t.seed, config=cfg.to_dict(), resume=resume,
            max_iters_this_run=max_iters_this_run, checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, log_every=t.log_every, num_workers=cfg.data.num_workers,
            amp=t.amp, grad_clip=t.grad_clip, progress=progress, quiet=quiet)
        summary["model"] = model
        if val is not None and summary["finished"]:
            from weakclip.crf import COCO_CRF, VOC_CRF

            e = cfg.eval
            mean, std = norm_stats(cfg.data.normalize)
            crf = (VOC_CRF if e.crf_params == "voc" else COCO_CRF) if e.crf else None
            scores, record = evaluate_segmenter(model, val, mean=mean, std=std, scales=e.scales, flip=e.flip,
                                                crf=crf, info=info, progress=progress and not quiet,
                                                max_images=e.max_images, pred_dir=pred_dir)
            record.update({"model": m.name, "split": cfg.data.val_split, "masks": str(masks),
                           "iteration": summary["end_iter"]})
            summary["eval"] = {**scores.to_dict(), **record}
            summary["scores"] = scores
            if info.is_main:
                write_eval(workdir / "eval.json", scores, record)
                if not quiet:
                    print(scores.table())
                    print(f"val mIoU {100 * scores.miou:.2f}% over {record['images']} images "
                          f"(scales {record['scales']}, flip {record['flip']}, "
                          f"crf {'on' if crf else 'off'}); "
                          f"wrote {workdir / 'eval.json'}", flush=True)
        return summary
    finally:
        if started_group and info.distributed:
            dist.destroy_process_group()
