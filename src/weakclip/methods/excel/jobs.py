"""ExCEL's per-image mask jobs over a dataset: training-free masks (or seeds) and a trained network's masks.

Both walk the dataset with :class:`weakclip.inference.jobs.JobLedger`, as WeakCLIP's pseudo-mask job
(:func:`weakclip.inference.pseudo_masks.generate_pseudo_masks`): this process's share under ``torchrun``, a
progress bar on rank 0, one image at a time (as the release), ``<out_dir>/<id>.png`` written atomically
(VOC palette; written last, so a PNG found under its final name is complete). Resume: an image whose final
PNG exists is skipped, and scored from the file, so a resumed run's scores equal an uninterrupted run's. An
image that cannot be read is reported on stderr, skipped and listed under ``failures``; a ground truth that
cannot be read leaves its image unscored (``unscored``). ``limit``: stop after writing so many images in
this process (tests, smoke runs).

:func:`free_mask_job`: the training-free masks of
:func:`~weakclip.methods.excel.training_free.training_free_mask` (``tools/infer_lam.py --training_free
true``; the network's positional grid that of the ``settings.size`` square, as infer_lam builds its model
for the training split), with the image-level labels of each image; with a :class:`SeedBand`, the seeds of
:mod:`weakclip.methods.excel.seed_band` (255 = unsure). An image without any foreground label gets an
all-background mask (the release fails there; later stages need a mask for every image): counted under
``no_labels``.

:func:`trained_mask_job`: a trained network's masks with the release's test-time settings
(:func:`~weakclip.methods.excel.infer.infer_image`; the positional grid CLIP's own, as the release's test
models), at each image's size; with ``settings.crf`` the argmax before the CRF goes to
``<out_dir>/no_crf/<id>.png``.

The network's position mode and train/eval state are restored afterwards. Scores, when the dataset has
ground truth, are summed over the processes (:class:`weakclip.metrics.ConfusionMatrix`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.datasets import require_images
from weakclip.data.io import read_label_png, write_label_png
from weakclip.errors import DataError, WeakclipError
from weakclip.inference.jobs import JobLedger, gather_objects, sum_counts, warn
from weakclip.methods.excel.infer import InferenceSettings, infer_image, release_miou
from weakclip.methods.excel.par import PAR
from weakclip.methods.excel.seed_band import SeedBand, apply_seed_band
from weakclip.methods.excel.training_free import FreeSettings, training_free_maps
from weakclip.metrics import ConfusionMatrix

__all__ = ["FREE_KEYS", "TRAINED_KEYS", "SeedBand", "free_mask_job", "trained_mask_job"]

#: The score keys of :func:`free_mask_job`'s summary (besides the ledger's counts).
FREE_KEYS = ("miou", "miou_confident", "coverage", "images", "no_labels")
#: The score keys of :func:`trained_mask_job`'s summary (besides the ledger's counts).
TRAINED_KEYS = ("miou", "miou_no_crf", "release_miou", "per_class", "images")


def _check_classes(net, dataset, what: str) -> None:
    names = list(dataset.classes)
    if int(net.num_classes) != len(names):
        raise WeakclipError(f"{what}: the ExCEL network has {net.num_classes} classes (background included), "
                            f"the dataset {len(names)}")


@contextlib.contextmanager
def _network_state(net, mode: str, crop: int | None = None) -> Iterator[None]:
    """The network in eval mode with position mode ``mode`` for the job, as it was afterwards."""
    saved_mode, saved_grid, was_training = net.position_mode, net.clip_pass.base_grid, net.training
    net.set_position_mode(mode, crop)
    net.eval()
    try:
        yield
    finally:
        net.clip_pass.set_base_grid(saved_grid)
        net.position_mode = saved_mode
        net.train(was_training)


def _read_gt(dataset, i: int, hw, unscored: list, ledger: JobLedger, name: str) -> np.ndarray | None:
    try:
        return dataset.read_gt(i, hw)
    except DataError as exc:
        unscored.append((dataset.ids[i], str(exc)))
        warn(f"{name}: {dataset.ids[i]!r} not scored: {exc}", ledger.bar)
        return None


def _existing(dataset, i: int, paths: list[Path], with_gt: bool, unscored: list, ledger: JobLedger,
              name: str) -> tuple[list[np.ndarray], np.ndarray | None] | None:
    """The masks an earlier run wrote for item ``i`` (and its ground truth when scored), or None (listed
    as unscored) when one cannot be read or does not fit."""
    k = len(dataset.classes)
    try:
        gt = dataset.read_gt(i) if with_gt else None
        hw = None if gt is None else gt.shape
        reference = None if gt is None else f"its ground-truth mask {dataset.gt_path(i)}"
        masks = [read_label_png(p, expected_hw=hw, num_classes=k, what="mask", reference=reference)
                 for p in paths]
    except DataError as exc:
        unscored.append((dataset.ids[i], str(exc)))
        warn(f"{name}: existing mask of {dataset.ids[i]!r} not scored: {exc}", ledger.bar)
        return None
    return masks, gt


def _miou(cm: ConfusionMatrix) -> float:
    return float(cm.scores().miou)


# ====================================================================== training-free masks / seeds
def free_mask_job(net, dataset, out_dir, settings: FreeSettings, *, band: SeedBand | None = None,
                  rank: int | None = None, world_size: int | None = None, progress: bool = True,
                  limit: int | None = None) -> dict:
    """Training-free masks (``band=None``: the argmax, no 255) or seeds (with ``band``) of every image of
    ``dataset`` as ``<out_dir>/<id>.png`` (module docstring).

    Returns the ledger's summary (``images``, ``written``, ``skipped_existing``, ``failed``, ``failures``,
    ``complete``, ``processes``) and, over every mask of the dataset (found or written, all processes):
    ``miou`` (unsure 255 counted as background), ``miou_confident`` (unsure pixels left out), both None
    without ground truth; ``coverage`` (the share of pixels that are not 255; 1.0 without a band; from the
    masks alone, so given without ground truth too, None when no mask was read); ``no_labels`` (images
    without a foreground label, given an all-background mask); ``unscored`` {id: why}; ``out_dir``,
    ``settings``, ``band``."""
    name = "training-free masks" if band is None else "training-free seeds"
    require_images(dataset, name)
    _check_classes(net, dataset, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(dataset.classes)
    with_gt = bool(getattr(dataset, "has_gt", False))
    as_background = ConfusionMatrix(classes, unsure="background")
    confident = ConfusionMatrix(classes, unsure="ignore")
    counts = {"labelled": 0, "pixels": 0, "no_labels": 0}
    unscored: list[tuple[str, str]] = []

    def tally(mask: np.ndarray, gt: np.ndarray | None, where: Path) -> None:
        counts["pixels"] += int(mask.size)
        counts["labelled"] += int(mask.size - np.count_nonzero(mask == IGNORE_INDEX))
        if gt is not None:
            as_background.update(mask, gt, name=str(where))
            confident.update(mask, gt, name=str(where))

    device = next(net.decoder.parameters()).device
    par = PAR(settings.par_dilations, settings.par_iters).to(device)
    ledger = JobLedger(name, dataset.ids, rank=rank, world_size=world_size, progress=progress, limit=limit)
    with _network_state(net, "crop", int(settings.size)):  # infer_lam's model for the training split
        for i in ledger:
            ident = dataset.ids[i]
            final = out / f"{ident}.png"
            if final.is_file():
                ledger.skip(ident)
                with contextlib.suppress(DataError):
                    counts["no_labels"] += int(not dataset.get_labels(i)[1:].any())
                found = _existing(dataset, i, [final], with_gt, unscored, ledger, name)
                if found is not None:
                    (mask,), gt = found
                    if band is None and (mask == IGNORE_INDEX).any():
                        unscored.append((ident, f"{final} holds 255 (unsure) pixels: seeds of a run with "
                                                "the band, not masks"))
                    else:
                        tally(mask, gt, final)
                continue
            try:
                image = dataset.read_image(i)
                labels = np.asarray(dataset.get_labels(i), dtype=np.float32)[1:]
            except DataError as exc:
                ledger.fail(ident, exc)
                continue
            if labels.any():
                result = training_free_maps(net, image, labels, settings, par=par)
                mask = result.mask if band is None else apply_seed_band(result.mask, result.maps,
                                                                        result.classes, band)
            else:
                mask = np.zeros(image.shape[:2], dtype=np.uint8)
                counts["no_labels"] += 1
            write_label_png(final, mask)
            ledger.wrote(ident)
            gt = _read_gt(dataset, i, image.shape[:2], unscored, ledger, name) if with_gt else None
            tally(mask, gt, final)

    summary = ledger.summary()
    labelled, pixels, no_labels = sum_counts([counts["labelled"], counts["pixels"], counts["no_labels"]])
    summary.update({
        "out_dir": str(out),
        "settings": dataclasses.asdict(settings),
        "band": None if band is None else dataclasses.asdict(band),
        "no_labels": no_labels,
        "coverage": labelled / pixels if pixels else None,
        "unscored": dict(gather_objects(unscored)),
        "miou": None,
        "miou_confident": None,
    })
    if with_gt:
        as_background.all_reduce()
        confident.all_reduce()
        summary["miou"] = _miou(as_background)
        summary["miou_confident"] = _miou(confident)
    return summary


# ====================================================================== a trained network's masks
def trained_mask_job(net, dataset, out_dir, settings: InferenceSettings, *, rank: int | None = None,
                     world_size: int | None = None, progress: bool = True, limit: int | None = None) -> dict:
    """A trained ExCEL network's masks of every image of ``dataset`` as ``<out_dir>/<id>.png``, with the
    release's test-time ``settings`` (:data:`~weakclip.methods.excel.infer.VOC_INFERENCE`,
    :data:`~weakclip.methods.excel.infer.COCO_INFERENCE` or one's own); with ``settings.crf`` the mask before
    the CRF also as ``<out_dir>/no_crf/<id>.png`` (module docstring).

    Returns the ledger's summary and, over every mask of the dataset (found or written, all processes):
    ``miou`` (the final masks), ``miou_no_crf`` (before the CRF; equal to ``miou`` without it),
    ``release_miou`` (:func:`~weakclip.methods.excel.infer.release_miou` of the final masks' confusion
    matrix), ``per_class`` (:meth:`weakclip.metrics.SegScores.to_dict` of the final masks: per-class IoU, FP,
    FN in percent, the keys of an ``eval.json``), all None without ground truth; ``unscored`` {id: why};
    ``out_dir``, ``settings``."""
    name = "ExCEL masks"
    require_images(dataset, name)
    _check_classes(net, dataset, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    no_crf_dir = out / "no_crf"
    use_crf = bool(settings.crf)
    classes = list(dataset.classes)
    with_gt = bool(getattr(dataset, "has_gt", False))
    final_cm, before_cm = ConfusionMatrix(classes), ConfusionMatrix(classes)
    unscored: list[tuple[str, str]] = []

    ledger = JobLedger(name, dataset.ids, rank=rank, world_size=world_size, progress=progress, limit=limit)
    with _network_state(net, "clip"):  # the release's test models: CLIP's positional grid
        for i in ledger:
            ident = dataset.ids[i]
            final = out / f"{ident}.png"
            if final.is_file():
                ledger.skip(ident)
                if with_gt:
                    paths = [final, no_crf_dir / f"{ident}.png"] if use_crf else [final]
                    found = _existing(dataset, i, paths, True, unscored, ledger, name)
                    if found is not None:
                        masks, gt = found
                        final_cm.update(masks[0], gt, name=str(final))
                        before_cm.update(masks[-1], gt, name=str(paths[-1]))
                continue
            try:
                image = dataset.read_image(i)
            except DataError as exc:
                ledger.fail(ident, exc)
                continue
            pred = infer_image(net, image, settings)
            before = pred.labels.astype(np.uint8)
            mask = pred.crf.astype(np.uint8) if use_crf else before
            if use_crf:
                write_label_png(no_crf_dir / f"{ident}.png", before)
            write_label_png(final, mask)
            ledger.wrote(ident)
            gt = _read_gt(dataset, i, image.shape[:2], unscored, ledger, name) if with_gt else None
            if gt is not None:
                final_cm.update(mask, gt, name=str(final))
                before_cm.update(before, gt, name=str(no_crf_dir / f"{ident}.png") if use_crf else str(final))

    summary = ledger.summary()
    summary.update({
        "out_dir": str(out),
        "settings": dataclasses.asdict(settings),
        "unscored": dict(gather_objects(unscored)),
        "miou": None,
        "miou_no_crf": None,
        "release_miou": None,
        "per_class": None,
    })
    if with_gt:
        final_cm.all_reduce()
        before_cm.all_reduce()
        scores = final_cm.scores()
        summary["miou"] = float(scores.miou)
        summary["miou_no_crf"] = _miou(before_cm)
        summary["release_miou"] = release_miou(final_cm.matrix)
        summary["per_class"] = scores.to_dict()
    return summary
