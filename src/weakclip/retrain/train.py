"""Retraining: a DeepLab-family network trained on the (refined) pseudo masks, then evaluated on val.

Presets (:class:`RetrainConfig`; ``weakclip/configs/retrain_<name>.yaml``, whose comments give the source of
every number):

* ``voc`` / ``coco``: the authors' retraining (github Yingyue-L/deeplabv1-resnet38): DeepLab-v1 (LargeFOV) on
  the wide ResNet-38 (:mod:`weakclip.retrain.deeplabv1`), SGD with the release's four convolution-only groups
  (x1 / x2 / x10 / x20), ``(1 - it / (iters + 1)) ** 0.9``, BatchNorm momentum 3e-4 and its affine parameters
  never updated, weight decay 5e-4, batch 10, crop 448 with HSV jitter, flip and scale 0.5-1.5
  (:mod:`weakclip.retrain.augment`); VOC lr 1e-3 for 40k iterations, COCO lr 1.5e-3 for 160k; evaluation at
  scales 0.5-1.5 with flip, softmax of the mean logits, dense CRF over the predicted classes;
* ``voc-plus`` / ``coco-plus``: torchvision's DeepLabV3 on ResNet-101 with the common DeepLabV3 recipe (SGD,
  weight decay 1e-4, lr 1e-3 and head x10, poly, scale 0.5-2.0, crop 512, flip; 30k / 80k iterations of 16).

The configuration lives in :mod:`weakclip.retrain.config` (re-exported here). Pixel-wise cross-entropy with
255 ignored. :func:`retrain` runs the whole stage on top of the training engine (deterministic data order,
atomic checkpoints, exact resume, DDP under torchrun, CSV log, progress bar; :mod:`weakclip.engine.loop`);
:func:`evaluate_checkpoint` scores a released or trained network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import IGNORE_INDEX, class_record
from weakclip.data.transform_base import _Transform
from weakclip.errors import DataError, WeakclipError
from weakclip.retrain.config import (
    RETRAIN_PATH_KEYS,
    RETRAIN_PRESETS,
    RetrainConfig,
    RetrainDataConfig,
    RetrainEvalConfig,
    RetrainModelConfig,
    RetrainTrainConfig,
    apply_retrain_overrides,
    crf_params_of,
    load_retrain_preset,
)

__all__ = [
    "RETRAIN_PRESETS",
    "RetrainConfig",
    "RetrainDataConfig",
    "RetrainEvalConfig",
    "RetrainModelConfig",
    "RetrainTrainConfig",
    "apply_retrain_overrides",
    "build_retrain_transform",
    "crf_params_of",
    "check_backbone_weights",
    "evaluate_checkpoint",
    "load_retrain_preset",
    "retrain",
]


# ====================================================================== data
class RandomScale(_Transform):
    """Resize image and masks by ``r ~ U(low, high)`` times their own size (the DeepLab augmentation).

    A ``_Transform`` so that :class:`~weakclip.data.transform_base.Compose` forwards its seeded ``rng``.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        from weakclip.data.resampling import resize_image, resize_mask
        from weakclip.data.transform_base import MASK_KEYS

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
    from weakclip.data.normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (CLIP_MEAN, CLIP_STD)


def build_retrain_transform(d: RetrainDataConfig):
    """Random scale, random crop (padded with 255 when smaller), flip, [photometric], normalise, tensors; or
    (``pipeline: release``) the authors' :class:`~weakclip.retrain.augment.ReleaseAugment`."""
    from weakclip.data.augmentations import PhotometricDistortion, RandomCrop, RandomFlip
    from weakclip.data.fixed_transforms import Pad, ToTensor
    from weakclip.data.normalization import Normalize
    from weakclip.data.transform_base import Compose

    mean, std = norm_stats(d.normalize)
    if d.pipeline == "release":
        from weakclip.retrain.augment import ReleaseAugment

        return Compose([ReleaseAugment(d.crop_size, d.scale_range, d.hsv_jitter, d.flip_prob, mean, std)])
    ts: list = [RandomScale(d.scale_range), RandomCrop(d.crop_size, cat_max_ratio=1.0),
                RandomFlip(d.flip_prob)]
    if d.photometric:
        ts.append(PhotometricDistortion())
    ts += [Normalize(mean, std), Pad(d.crop_size, pad_value=0, seg_pad_value=IGNORE_INDEX), ToTensor()]
    return Compose(ts)


def _train_dataset(cfg: RetrainConfig, masks: Path, extra: dict[str, Any]):
    from weakclip.data.datasets import build_dataset, require_images

    d = cfg.data
    if not d.root:
        raise WeakclipError("no dataset root given (--data-root / data.root)")
    if not Path(d.root).exists():
        raise DataError(f"dataset folder not found: {d.root}")
    dataset = build_dataset(d.kind, d.root, split=d.split, seed_dir=masks, with_gt=False,
                            image_reader=d.image_reader, image_orientation=d.image_orientation, **extra)
    require_images(dataset, "retraining")
    return dataset


def _val_dataset(cfg: RetrainConfig, extra: dict[str, Any]):
    from weakclip.data.datasets import build_dataset, require_images

    d = cfg.data
    dataset = build_dataset(d.kind, d.root, split=d.val_split, with_gt=True, image_reader=d.image_reader,
                            image_orientation=d.image_orientation, **extra)
    require_images(dataset, "evaluation")
    return dataset


def cross_entropy_step(model, batch: dict[str, Any], it: int) -> dict[str, torch.Tensor]:
    """Pixel-wise cross-entropy of the logits against the pseudo masks (``"seed"``), 255 ignored."""
    device = next(model.parameters()).device
    images = batch["image"].to(device, non_blocking=True)
    target = batch["seed"].to(device, non_blocking=True)
    logits = model(images).float()
    if not bool((target != IGNORE_INDEX).any()):
        return {"loss": logits.sum() * 0.0}
    return {"loss": F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)}



# ====================================================================== model, optimiser, evaluation
def build_model(cfg: RetrainConfig, num_classes: int, *, pretrained: bool | None = None):
    """``cfg.model``'s network for ``num_classes`` (the dataset's), with ``model.bn_momentum`` applied."""
    from weakclip.retrain.models import build_segmenter

    m = cfg.model
    use_pretrained = m.pretrained_backbone if pretrained is None else pretrained
    weights = m.backbone_weights if use_pretrained else None
    model = build_segmenter(m.name, num_classes, backbone_weights=weights,
                            pretrained_backbone=use_pretrained, output_stride=m.output_stride,
                            head_channels=m.head_channels, width_divisor=m.width_divisor)
    if m.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = float(m.bn_momentum)
    return model


def check_backbone_weights(cfg: RetrainConfig) -> None:
    """Fail now, not after the data checks (or, in the pipeline, hours of refinement), when the network needs
    an ImageNet weights file that is not given (ResNet-38 has no download) or does not exist."""
    from weakclip.errors import WeightsError
    from weakclip.retrain.deeplabv1 import missing_weights_error
    from weakclip.retrain.models import RELEASE_MODEL

    m = cfg.model
    if not m.pretrained_backbone:
        return
    if m.backbone_weights is not None:
        if not Path(m.backbone_weights).is_file():
            raise WeightsError(f"backbone weights file not found: {m.backbone_weights}")
    elif m.name.strip().lower() == RELEASE_MODEL:
        raise missing_weights_error()


def build_optimizer(model, cfg: RetrainConfig, train_size: int):
    """The optimizer over ``model.param_groups`` and its schedule (the release's four DeepLab-v1 groups and
    ``(1 - it / (iters + 1)) ** power`` when so configured)."""
    from weakclip.engine.schedule import PolySchedule
    from weakclip.retrain.deeplabv1 import DeepLabV1Segmenter, ReleasePolySchedule

    t = cfg.train
    if isinstance(model, DeepLabV1Segmenter):
        stem = max(1, train_size // t.batch_size) if t.freeze_stem_after_first_epoch else None
        groups = model.param_groups(t.head_lr_mult, t.bias_lr_mult, None, t.bias_weight_decay, stem)
    else:
        groups = model.param_groups(t.head_lr_mult)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.schedule == "poly_release":
        schedule = ReleasePolySchedule(optimizer, t.lr, t.iters, t.poly_power)
    else:
        schedule = PolySchedule(optimizer, t.lr, t.iters, t.poly_power, t.min_lr, t.warmup_iters, 1e-6)
    return optimizer, schedule


def run_evaluation(model, val, cfg: RetrainConfig, info, *, progress: bool, pred_dir=None):
    from weakclip.retrain.evaluate import evaluate_segmenter

    e = cfg.eval
    mean, std = norm_stats(cfg.data.normalize)
    return evaluate_segmenter(model, val, mean=mean, std=std, scales=e.scales, flip=e.flip,
                              crf=crf_params_of(e), info=info, progress=progress, max_images=e.max_images,
                              pred_dir=pred_dir, fuse=e.fuse, resize=e.resize, align_corners=e.align_corners,
                              crf_classes=e.crf_classes)


def _report(scores, record, path: Path, quiet: bool) -> None:
    from weakclip.retrain.evaluate import write_eval

    write_eval(path, scores, record)
    if not quiet:
        print(scores.table())
        print(f"val mIoU {100 * scores.miou:.2f}% over {record['images']} images (scales {record['scales']}, "
              f"flip {record['flip']}, crf {'on' if record['crf'] else 'off'}); wrote {path}", flush=True)


def evaluate_checkpoint(cfg: RetrainConfig, checkpoint: str | Path, workdir: str | Path = "work_retrain", *,
                        val_kwargs: dict[str, Any] | None = None, device: str | None = None,
                        progress: bool = True, quiet: bool = False,
                        pred_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a trained network on ``cfg.data.val_split`` with ``cfg.eval``: the authors' released
    DeepLab-v1 checkpoints (``torch.save(net.state_dict())``) or any state dict of ``cfg.model``'s network
    (:func:`weakclip.retrain.deeplabv1.read_checkpoint`). No ImageNet weights are needed; the class count
    is the val set's. Writes ``<workdir>/eval.json``; returns the scores (percent) and the record."""
    import torch.distributed as dist

    from weakclip.distributed import init_distributed
    from weakclip.retrain.deeplabv1 import load_release_checkpoint

    if not cfg.data.root:
        raise WeakclipError("no dataset root given (--data-root / data.root)")
    if not Path(cfg.data.root).exists():
        raise DataError(f"dataset folder not found: {cfg.data.root}")
    if not cfg.data.val_split:
        raise WeakclipError("no validation split given (data.val_split)")
    if not Path(checkpoint).is_file():
        raise WeakclipError(f"checkpoint not found: {checkpoint}")
    workdir = Path(workdir)
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        val = _val_dataset(cfg, dict(val_kwargs or {}))
        model = build_model(cfg, val.num_classes, pretrained=False)
        load_release_checkpoint(model, checkpoint)
        model = model.to(info.device)
        scores, record = run_evaluation(model, val, cfg, info, progress=progress and not quiet,
                                        pred_dir=pred_dir)
        record.update({"model": cfg.model.name, "split": cfg.data.val_split, "checkpoint": str(checkpoint)})
        if info.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            _report(scores, record, workdir / "eval.json", quiet)
        return {**scores.to_dict(), **record, "scores": scores}
    finally:
        if started_group and info.distributed:
            dist.destroy_process_group()


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
    per-class table. The checkpoints store the class names and palette (``classes``, ``palette``) and the
    config with absolute paths: they load from any folder without the dataset. ``resume=True`` continues
    from the latest checkpoint (on a finished workdir it only evaluates, e.g. with other eval settings).
    Returns the training summary plus ``"eval"`` (percent).
    """
    import torch.distributed as dist

    from weakclip.distributed import init_distributed
    from weakclip.engine.loop import LoopSettings, MainLog, TrainingTask, run_training
    from weakclip.engine.resume import check_resume_network, resume_checkpoint
    from weakclip.engine.sampling import mix_seed
    from weakclip.retrain.check import preflight_masks
    from weakclip.sections import absolute_paths

    masks = Path(masks_dir) if masks_dir is not None else (Path(cfg.data.masks) if cfg.data.masks else None)
    if masks is None:
        raise WeakclipError("no pseudo-mask folder given (--masks DIR)")
    if not masks.is_dir():
        raise DataError(f"pseudo-mask folder not found: {masks}")
    cfg = apply_retrain_overrides(cfg, [f"data.masks={masks}"])
    absolute_paths(cfg, RETRAIN_PATH_KEYS)  # recorded absolute: the checkpoint reads the same from anywhere
    masks = Path(cfg.data.masks)
    check_backbone_weights(cfg)
    workdir = Path(workdir)
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        # the checkpoint to resume from, checked against this run's network before any work
        ckpt = resume_checkpoint(workdir, resume, MainLog(info, quiet))
        presets = {name: load_retrain_preset(name).to_dict()["model"] for name in RETRAIN_PRESETS}
        check_resume_network(ckpt, cfg.to_dict(), workdir, kind="retrained network", presets=presets,
                             name_key="name", preset_word="retrain preset",
                             ignore=("pretrained_backbone", "backbone_weights"))
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
        model = build_model(cfg, dataset.num_classes)
        if info.distributed and m.sync_bn and info.device.type == "cuda":  # SyncBatchNorm is CUDA-only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(info.device)
        optimizer, schedule = build_optimizer(model, cfg, len(dataset))
        if info.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(workdir / "config.yaml")
            if not quiet:
                n_back = sum(p.numel() for p in model.backbone_parameters())
                n_all = sum(p.numel() for p in model.parameters())
                print(f"retrain: {m.name} (output stride {model.output_stride}), {n_all:,} parameters "
                      f"({n_back:,} backbone); {len(dataset)} images, {dataset.num_classes} classes, "
                      f"masks {masks}; {t.iters} iterations x {t.batch_size} ({info.world_size} "
                      f"process(es)), {t.optimizer} lr {t.lr:g} (head x{t.head_lr_mult:g}), poly "
                      f"{t.poly_power:g}; device {info.device}",
                      flush=True)
        # the classes and palette travel with the network: it loads without its dataset, from any folder
        task = TrainingTask(model=model, optimizer=optimizer, schedule=schedule, step_fn=cross_entropy_step,
                            dataset=dataset, transform=build_retrain_transform(cfg.data),
                            extra_state=class_record(dataset.classes))
        summary = run_training(task, LoopSettings.from_section(t, num_workers=cfg.data.num_workers),
                               workdir=workdir, info=info, config=cfg.to_dict(), checkpoint=ckpt,
                               max_iters_this_run=max_iters_this_run, progress=progress, quiet=quiet)
        summary["model"] = model
        if val is not None and summary["finished"]:
            scores, record = run_evaluation(model, val, cfg, info, progress=progress and not quiet,
                                            pred_dir=pred_dir)
            record.update({"model": m.name, "split": cfg.data.val_split, "masks": str(masks),
                           "iteration": summary["end_iter"]})
            summary["eval"] = {**scores.to_dict(), **record}
            summary["scores"] = scores
            if info.is_main:
                _report(scores, record, workdir / "eval.json", quiet)
        return summary
    finally:
        if started_group and info.distributed:
            dist.destroy_process_group()
