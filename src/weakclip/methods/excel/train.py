"""ExCEL's training: the release's loop body (scripts/train_voc.py, train_coco.py) on the package's training
loop (:func:`weakclip.engine.loop.run_training`).

One step (:class:`ExcelStep`), as the release's loop body computes it:

1. the network's forward on the normalised crops: segmentation logits, the fused features (detached), the
   patch-text maps, CLIP's attention weights and the predicted affinity
   (:meth:`~weakclip.methods.excel.model.ExcelNet.forward`);
2. from ``labels.switch_iter`` (VOC 14,000, COCO 30,000) the patch-text maps come from a second CLIP pass with
   the decoder's features (``cure_attr_map``; :meth:`ExcelNet.attr_maps_from_features`, no gradients) and
   the attention refinement is gated by the predicted affinity;
3. per image, the online pseudo labels: attention-affinity refinement, background and PAR on the
   de-normalised crop (the release's ``denormalize_img2``: truncated to uint8, / 255), argmax; the affinity
   targets within radius 8 from those labels or, from ``labels.aff_from_pred_iter`` (VOC 24,000; COCO never),
   from the prediction; ``lam_to_label`` (which the release only logs)
   (:func:`~weakclip.methods.excel.labels.training_targets`);
4. loss = ``seg_weight`` x balanced segmentation cross-entropy of the logits upsampled to the crop +
   ``aff_weight`` x affinity loss (:func:`~weakclip.methods.excel.losses.excel_loss`);
5. zero_grad, backward, step (the loop's :func:`~weakclip.engine.loop.optimizer_step`): AdamW whose rates
   the release's PolyWarmupAdamW sets (:class:`~weakclip.methods.excel.schedule.ExcelAdamW`).

What the loop adds to the release: a data order and augmentation seeded by ``(seed, iteration, slot)`` (the
release: a DistributedSampler and its workers' global random streams), torch's RNG reseeded every iteration
(the fusion's Dropout2d), checkpoints with exact resume, ``log.csv`` (the decoder groups' rate; the release
logs group 0's, a tenth of it, which holds no parameter), a progress bar, DDP under ``torchrun`` with a GLOBAL
batch. Under several processes each process's images form the batch whose mean the affinity prediction and
the second pass subtract (the release: per GPU likewise).

Records: ``config.yaml`` and every checkpoint name the method (``"method": "excel"``,
:mod:`weakclip.methods`). A checkpoint holds the trained fusion + decoder only (``"model"``; the frozen CLIP
comes from the weights file, recorded as ``"clip_weights"``), the network's settings and text bank
(``"excel"``: class names, prompt names, background words, integral and enriched text features, k-means
centres and flags), ``"classes"`` and ``"palette"``, so that :func:`load_excel_checkpoint` rebuilds the
network without the descriptors file or the data folder.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from weakclip.data.classes import class_record
from weakclip.errors import DataError, WeakclipError
from weakclip.methods import METHOD_KEY, check_same, of_checkpoint
from weakclip.methods.excel.config import EXCEL_PRESETS, METHOD, ExcelConfig, load_excel_preset
from weakclip.sections import absolute_paths

__all__ = [
    "LOSS_TERMS",
    "ExcelSampleTransform",
    "ExcelStep",
    "StepSchedule",
    "build_excel_optimizer",
    "build_network",
    "build_par",
    "label_settings",
    "load_excel_checkpoint",
    "train_command",
    "train_excel",
    "train_step",
    "training_classes",
]

LOSS_TERMS: tuple[str, ...] = ("loss", "seg", "aff")
NONFINITE_HINT = "lower train.lr or set train.grad_clip"


# ====================================================================== settings of the parts
def label_settings(cfg: ExcelConfig, patch_size: int = 16):
    """The online labels' settings (:class:`~weakclip.methods.excel.labels.LabelSettings`) of ``cfg``."""
    from weakclip.methods.excel.labels import LabelSettings

    lb = cfg.labels
    return LabelSettings(caa_thre=lb.caa_threshold, attn_layers=lb.attn_layers,
                         calibration_iter=lb.switch_iter, prediction_affinity_iter=lb.aff_from_pred_iter,
                         radius=lb.radius, bkg_thre=lb.bkg_thre, high_thre=lb.high_thre, low_thre=lb.low_thre,
                         ignore_index=lb.ignore_index, patch_size=patch_size)


def build_par(cfg: ExcelConfig, device: torch.device | str = "cpu"):
    from weakclip.methods.excel.par import PAR

    return PAR(dilations=cfg.labels.par_dilations, num_iter=cfg.labels.par_iters).to(device)


def build_excel_optimizer(net, cfg: ExcelConfig):
    """PolyWarmupAdamW over the network's four groups (the release's ``build_optimizer``: lr, lr,
    lr x ``decoder_lr_mult``, lr x ``decoder_lr_mult``; only the last holds parameters)."""
    from weakclip.methods.excel.schedule import ExcelAdamW, PolyWarmup

    t = cfg.train
    schedule = PolyWarmup(lr=t.lr, warmup_iters=t.warmup_iters, max_iters=t.iters,
                          warmup_ratio=t.warmup_ratio, power=t.power)
    mults = (1.0, 1.0, t.decoder_lr_mult, t.decoder_lr_mult)
    return ExcelAdamW(net.param_groups(), schedule, mults, weight_decay=t.weight_decay, betas=tuple(t.betas),
                      eps=t.eps)


class StepSchedule:
    """The loop's schedule interface over :class:`ExcelAdamW`, whose ``step()`` sets the rates itself from its
    step counter: ``set_iteration(it)`` puts the counter at ``it`` (a resumed run's start) and returns the
    decoder groups' rate of that step."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def set_iteration(self, it: int) -> float:
        self.optimizer.iteration = int(it)
        self.optimizer.apply_schedule()
        return float(self.optimizer.param_groups[-1]["lr"])

    def state_dict(self) -> dict[str, int]:
        return {"iteration": int(self.optimizer.iteration)}


# ====================================================================== the step
class ExcelStep:
    """The release's loop body from the batch to the loss terms (module docstring, steps 1-4).

    ``__call__(train_model, batch, it)``: ``batch["image"]`` B x 3 x crop x crop (normalised),
    ``batch["cls_label"]`` B x foreground classes; ``it`` the 0-based iteration (the release's ``n_iter``).
    ``train_model`` is the network or its DDP wrapper. Returns ``{"loss", "seg", "aff"}``; ``last`` keeps the
    step's targets (:class:`~weakclip.methods.excel.labels.StepTargets`) for tests and logs."""

    def __init__(self, cfg: ExcelConfig, par, patch_size: int = 16) -> None:
        self.settings = label_settings(cfg, patch_size)
        self.par = par
        self.seg_weight = float(cfg.train.seg_weight)
        self.aff_weight = float(cfg.train.aff_weight)
        self.ignore_index = int(cfg.labels.ignore_index)
        self.last = None

    def __call__(self, train_model, batch: Mapping[str, Any], it: int) -> dict[str, torch.Tensor]:
        from weakclip.methods.excel.labels import denormalize_image, training_targets
        from weakclip.methods.excel.losses import excel_loss

        net = getattr(train_model, "module", train_model)
        device = next(net.decoder.parameters()).device
        images = batch["image"].to(device, non_blocking=True).float()
        cls_labels = batch["cls_label"].to(device, non_blocking=True)
        images_denorm = denormalize_image(images.clone())
        out = train_model(images)
        targets = training_targets(
            out.attr_maps, out.attn, out.affinity, cls_labels, images_denorm, int(it), self.settings,
            self.par, seg_logits=out.seg,
            second_pass=lambda: net.attr_maps_from_features(images, out.features))
        total, seg, aff = excel_loss(out.seg, targets.pseudo_labels, out.affinity, targets.affinity_targets,
                                     aff_weight=self.aff_weight, seg_weight=self.seg_weight,
                                     ignore_index=self.ignore_index)
        self.last = targets
        return {"loss": total, "seg": seg.detach(), "aff": aff.detach()}


def train_step(net, optimizer, step: ExcelStep, batch: Mapping[str, Any], it: int) -> dict[str, torch.Tensor]:
    """One whole iteration outside the loop (tests, benchmarks): :class:`ExcelStep`, then zero_grad, backward,
    optimizer step (the optimizer's counter set to ``it`` first, so its rates are that iteration's)."""
    from weakclip.engine.loop import optimizer_step

    optimizer.iteration = int(it)
    terms = step(net, batch, it)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_step(terms["loss"], optimizer, params)
    return terms


# ====================================================================== data
class _GuidedSamples(Dataset):
    """The training set's samples with the ground-truth mask under ``"crop_mask"``: the loop drops ``"gt"``
    before the transform (training sees no ground truth), but the release's VOC crops are placed with it
    (``data.mask_guided_crop``)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        if "gt" in sample:
            sample["crop_mask"] = sample.pop("gt")
        return sample


class ExcelSampleTransform:
    """``transform(sample, rng)`` for the loop: the release's training sample
    (:class:`~weakclip.methods.excel.augment.ExcelAugment`: rescale, flip, padded crop with its image box,
    ImageNet normalisation) with its two random streams (Python's ``random``, NumPy's ``RandomState``) seeded
    from ``rng`` (the loop's ``(seed, iteration, slot)`` generator)."""

    def __init__(self, cfg: ExcelConfig) -> None:
        from weakclip.methods.excel.augment import ExcelAugment

        d = cfg.data
        self.augment = ExcelAugment(crop_size=d.crop_size, scale_range=tuple(d.scale_range),
                                    mask_guided_crop=d.mask_guided_crop, ignore_index=cfg.labels.ignore_index)
        self.flip = d.flip

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        from weakclip.methods.excel.augment import Draws

        g = rng if rng is not None else np.random.default_rng()
        seeds = g.integers(0, 2**32, size=2, dtype=np.uint64)
        draws = Draws(random.Random(int(seeds[0])), np.random.RandomState(int(seeds[1]) % 2**32))
        if not self.flip:
            draws = Draws(_NoFlip(draws.py), draws.np)
        out = self.augment(sample["image"], sample.get("crop_mask"), draws)
        labels = np.asarray(sample["labels"], dtype=np.float32)
        return {"id": sample["id"], "image": torch.from_numpy(np.ascontiguousarray(out.image)),
                "cls_label": torch.from_numpy(labels[1:].copy()),
                "img_box": torch.from_numpy(out.img_box.astype(np.int64))}


class _NoFlip:
    """Python's ``random`` stream whose ``random()`` never asks for a flip (``data.flip: false``); the
    release always flips at random."""

    def __init__(self, stream: random.Random) -> None:
        self._stream = stream

    def random(self) -> float:
        return 0.0

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _train_dataset(cfg: ExcelConfig, dataset_kwargs: Mapping[str, Any]):
    from weakclip.data.datasets import build_dataset, require_images

    d = cfg.data
    if not d.root:
        raise WeakclipError("no dataset root given (data.root / --data-root)")
    if not Path(d.root).exists():
        raise DataError(f"dataset folder not found: {d.root}")
    # the crop window is placed with the ground truth only on VOC / COCO as the release's VOC class does;
    # a folder dataset's masks are for evaluation and training never reads them
    with_gt = bool(d.mask_guided_crop) and d.kind != "folder"
    dataset = build_dataset(d.kind, d.root, split=d.split, with_gt=with_gt, image_reader=d.image_reader,
                            image_orientation=d.image_orientation, **dict(dataset_kwargs))
    require_images(dataset, "training")
    return dataset


# ====================================================================== checkpoints
def check_excel_record(record: Any, where: str) -> None:
    """One line when ``record`` (a checkpoint, a config dict) belongs to another method than ExCEL."""
    check_same(of_checkpoint(record if isinstance(record, Mapping) else None), METHOD, where,
               "use a checkpoint or work folder of ExCEL training")


def load_excel_checkpoint(path: str | Path, clip_weights: str | Path | None = None,
                          device: str | torch.device = "cpu", *, pretrained_download: bool = True,
                          raw: Any = None):
    """``(network in eval mode, checkpoint dict)`` from an ExCEL training checkpoint or work folder (its
    latest checkpoint): the trained decoder, text bank and settings of the checkpoint on the CLIP of
    ``clip_weights`` (default: the file the checkpoint records). Another method's checkpoint, or a file
    that is no checkpoint, is a one-line WeakclipError. ``raw``: what the checkpoint file ``path`` holds,
    when the caller has read it already (it is not read again)."""
    from weakclip.engine.checkpoint import latest_checkpoint, read_checkpoint_file
    from weakclip.methods.excel.model import rebuild_excel_net

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise WeakclipError(f"no checkpoint in {path} (checkpoints/)")
        path = found
    elif not path.is_file():
        raise WeakclipError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint_file(path) if raw is None else raw
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise WeakclipError(f"{path} is not an ExCEL training checkpoint (a dict with method, model, excel)")
    check_excel_record(ckpt, str(path))
    if "excel" not in ckpt:
        raise WeakclipError(f"{path} names ExCEL but holds no network settings and text bank ('excel')")
    weights = clip_weights if clip_weights is not None else ckpt.get("clip_weights")
    if weights is not None and not Path(weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {weights} (pass clip_weights=)")
    payload = {**dict(ckpt["excel"]), "decoder": ckpt["model"]}
    net = rebuild_excel_net(payload, weights, device, pretrained_download=pretrained_download,
                            where=str(path))
    return net.eval(), dict(ckpt)


# ====================================================================== train
def build_network(cfg: ExcelConfig, classes: list[str], *, clip_weights: str | Path | None = None,
                  descriptors: str | Path | None = None, device: torch.device | str = "cpu",
                  note: Callable[[str], None] | None = None):
    """A fresh ExCEL network for ``classes`` (background first) with ``cfg``'s settings: the frozen CLIP of
    ``clip_weights``, the text bank from ``descriptors`` (None: plain class prompts), a new fusion + decoder
    (:func:`~weakclip.methods.excel.model.build_excel_net`)."""
    from weakclip.methods.excel.model import build_excel_net

    m, x = cfg.model, cfg.text
    return build_excel_net(
        m.clip_arch, clip_weights, classes, dataset=cfg.data.kind, descriptors=descriptors,
        clusters=x.num_clusters, crop=cfg.data.crop_size, device=device, position_mode="crop",
        background=x.background, top_k=x.top_k, kmeans_seeding=x.kmeans_seeding, note=note,
        embed_dim=m.embedding_dim, decoder_layers=m.decoder_layers, decoder_heads=m.decoder_heads,
        surgery_layers=m.surgery_layers, fusion_dropout=m.fuse_dropout)


def _network(cfg: ExcelConfig, classes: list[str], ckpt: Mapping[str, Any] | None, clip_weights, descriptors,
             device: torch.device, log: Callable[[str], None], workdir: Path):
    """A resumed run's network from its checkpoint (text bank included), else a fresh one."""
    from weakclip.methods.excel.model import rebuild_excel_net

    if ckpt is None:
        return build_network(cfg, classes, clip_weights=clip_weights, descriptors=descriptors, device=device,
                             note=log)
    if "excel" not in ckpt:
        raise WeakclipError(f"{workdir}: its checkpoint holds no ExCEL network settings and text bank")
    payload = {**dict(ckpt["excel"]), "decoder": ckpt["model"]}
    net = rebuild_excel_net(payload, clip_weights, device, where=f"the checkpoint of {workdir}")
    if list(net.class_names) != list(classes):
        raise WeakclipError(f"{workdir} was trained on the classes {', '.join(net.class_names)}; this "
                            f"data has {', '.join(classes)}: use another work folder")
    log("text bank and settings: from the checkpoint (the descriptors file is not read again)")
    return net


def train_excel(cfg: ExcelConfig, workdir: str | Path, *, clip_weights: str | Path | None = None,
                descriptors: str | Path | None = None, resume: bool = False, device: str | None = None,
                max_iters_this_run: int | None = None, progress: bool = True, quiet: bool = False,
                dataset_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train ExCEL on ``cfg.data``'s images and image-level labels; returns the loop's summary plus
    ``"method"`` and ``"model"`` (the network).

    ``clip_weights``: the CLIP weights file (None: OpenAI's, downloaded; a resumed run: the file its
    checkpoint records). ``descriptors``: the class descriptors JSON file (default ``cfg.text.descriptors``;
    None: plain class prompts, said in one line); a resumed run takes the text bank from its checkpoint.
    ``resume``: continue from ``workdir``'s latest checkpoint, exactly as an uninterrupted run (fresh start
    when there is none). ``max_iters_this_run``: stop after so many iterations (a checkpoint is written).
    Works alone and under ``torchrun`` (``train.batch_size`` is global). ``dataset_kwargs``: extra arguments
    of the dataset (e.g. ``image_root`` for COCO).
    """
    from weakclip.distributed import init_distributed
    from weakclip.engine.loop import LoopSettings, MainLog, TrainingTask, run_training
    from weakclip.engine.resume import check_resume_network, resume_checkpoint
    from weakclip.engine.sampling import mix_seed

    t = cfg.train
    descriptors = descriptors if descriptors is not None else cfg.text.descriptors
    if descriptors is not None and not Path(descriptors).is_file():
        raise WeakclipError(f"descriptors file not found: {descriptors}")
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {clip_weights}")
    workdir = Path(workdir)
    cfg = copy.deepcopy(cfg)
    absolute_paths(cfg, ("data.root", "text.descriptors"))  # config.yaml reads the same from any folder
    started_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        log = MainLog(info, quiet)
        if t.batch_size % info.world_size:
            raise WeakclipError(f"train.batch_size {t.batch_size} (global) is not divisible by the "
                                f"{info.world_size} processes")
        ckpt = resume_checkpoint(workdir, resume, log)
        if ckpt is not None:
            check_excel_record(ckpt, str(workdir))
            presets = {name: load_excel_preset(name).to_dict()["model"] for name in EXCEL_PRESETS}
            check_resume_network(ckpt, cfg.to_dict(), workdir, kind="trained ExCEL network",
                                 presets=presets)
            if clip_weights is None and ckpt.get("clip_weights"):
                if not Path(ckpt["clip_weights"]).is_file():
                    raise WeakclipError(f"the checkpoint was trained with CLIP weights "
                                        f"{ckpt['clip_weights']}, which is gone: pass clip_weights")
                clip_weights = ckpt["clip_weights"]
                log(f"CLIP weights (recorded in the checkpoint): {clip_weights}")

        dataset = _train_dataset(cfg, dataset_kwargs or {})
        classes = list(cfg.classes) if cfg.classes is not None else list(dataset.classes)
        if len(classes) != dataset.num_classes:
            raise WeakclipError(f"the config names {len(classes)} classes, the dataset has "
                                f"{dataset.num_classes}")
        torch.manual_seed(mix_seed(t.seed, -1, 0))  # the same initial decoder on every process
        net = _network(cfg, classes, ckpt, clip_weights, descriptors, info.device, log, workdir)
        net = net.to(info.device).train()
        optimizer = build_excel_optimizer(net, cfg)
        schedule = StepSchedule(optimizer)
        patch = int(net.clip_pass.patch_size)
        step = ExcelStep(cfg, build_par(cfg, info.device), patch)
        if cfg.data.crop_size % patch:
            raise WeakclipError(f"data.crop_size {cfg.data.crop_size} is not a multiple of the CLIP patch "
                                f"{patch}")

        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        bank = net.text_bank
        window = "placed with the masks" if dataset.has_gt else "at random"
        intro = [
            f"ExCEL: CLIP {net.settings.arch} frozen ({frozen:,} params); fusion + decoder trained "
            f"({trained:,} params); {len(classes)} classes; text bank: "
            + (f"{bank.centres.shape[0]} clusters of {bank.descriptors}" if bank.enriched_by_descriptors
               else "plain class prompts"),
            f"data: {len(dataset)} images ({dataset!r}); global batch {t.batch_size} = {info.world_size} x "
            f"{t.batch_size // info.world_size}; crop {cfg.data.crop_size}, rescale "
            f"{tuple(cfg.data.scale_range)}, crop window {window}",
            f"schedule: {t.iters} iterations, AdamW lr {t.lr:g} (decoder x{t.decoder_lr_mult:g}), warm-up "
            f"{t.warmup_iters} from x{t.warmup_ratio:g}, poly {t.power:g}, wd {t.weight_decay:g}; second "
            f"CLIP pass from {cfg.labels.switch_iter}, affinity target from the prediction from "
            f"{cfg.labels.aff_from_pred_iter}; device {info.device}",
        ]
        excel_record = {k: v for k, v in net.payload().items() if k != "decoder"}
        extra = {METHOD_KEY: METHOD, "excel": excel_record,
                 "clip_weights": None if clip_weights is None else os.path.abspath(clip_weights),
                 **class_record(classes)}
        task = TrainingTask(
            model=net, optimizer=optimizer, schedule=schedule, step_fn=step, dataset=_GuidedSamples(dataset),
            transform=ExcelSampleTransform(cfg), loss_terms=LOSS_TERMS,
            state_dict_fn=lambda m: m.trainable_state_dict(),
            load_state_fn=lambda m, state: m.load_trainable_state_dict(state, where=f"the checkpoint of "
                                                                               f"{workdir}"),
            extra_state=extra, intro=intro, prepare_workdir=lambda w: cfg.to_yaml(w / "config.yaml"),
            nonfinite_hint=NONFINITE_HINT, desc="excel")
        summary = run_training(task, _loop_settings(cfg, LoopSettings), workdir=workdir, info=info,
                               config=cfg.to_dict(), checkpoint=ckpt, max_iters_this_run=max_iters_this_run,
                               progress=progress, quiet=quiet)
        summary[METHOD_KEY] = METHOD
        summary["model"] = net
        return summary
    finally:
        if started_group and info.distributed:
            dist.destroy_process_group()


def training_classes(cfg: ExcelConfig, dataset_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The class list training on ``cfg.data`` uses: ``cfg.classes``, else the dataset's (one-line errors for
    a missing dataset, as training gives them)."""
    if cfg.classes is not None:
        return list(cfg.classes)
    return list(_train_dataset(cfg, dataset_kwargs or {}).classes)


def train_command(cfg: ExcelConfig, workdir: str | Path, *, clip_weights: str | Path | None = None,
                  descriptors: str | Path | None = None, resume: bool = False, device: str | None = None,
                  max_iters_this_run: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The registry's ``"train"`` entry point (``weakclip train --preset excel-voc ...``): the checks a
    command makes before any work (a dataset given and there, the CLIP weights file there, the descriptors
    file readable as JSON, naming every class of the data and holding enough sentences for the clusters when
    a fresh start will read it: :func:`~weakclip.methods.excel.config.check_text_inputs`), then
    :func:`train_excel`. Returns its summary without the network."""
    from weakclip.engine.checkpoint import latest_checkpoint
    from weakclip.methods.excel.config import check_text_inputs

    if not cfg.data.root:
        raise WeakclipError("no dataset given: pass --data-root")
    if not Path(cfg.data.root).exists():
        raise DataError(f"dataset folder not found: {cfg.data.root}")
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {clip_weights}")
    descriptors = descriptors if descriptors is not None else cfg.text.descriptors
    fresh = not (resume and latest_checkpoint(workdir) is not None)
    if descriptors is not None and fresh:  # a resumed run takes its text bank from the checkpoint
        check_text_inputs(cfg, descriptors, training_classes(cfg))
    summary = train_excel(cfg, workdir, clip_weights=clip_weights, descriptors=descriptors, resume=resume,
                          device=device, max_iters_this_run=max_iters_this_run, progress=progress)
    summary.pop("model", None)
    return summary


def _loop_settings(cfg: ExcelConfig, settings_cls):
    t = cfg.train
    return settings_cls(iters=t.iters, batch_size=t.batch_size, seed=t.seed,
                        checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                        log_every=t.log_every,
                        num_workers=cfg.data.num_workers, amp=t.amp, grad_clip=t.grad_clip)
