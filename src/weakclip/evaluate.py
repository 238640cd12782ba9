"""Evaluate a folder of predicted label PNGs against a folder of ground-truth label PNGs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weakclip.data.classes import read_class_file, resolve_classes
from weakclip.data.io import read_label_png
from weakclip.errors import DataError
from weakclip.metrics import ConfusionMatrix, SegScores


def _png_stems(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"id list not found: {path}")
    return [ln.split()[0] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _check_class_count(names: list[str], spec, gt_dir: Path) -> None:
    """A class list of another size than the ground truth's dataset (the ``classes.txt`` of the folder layout
    beside ``gt_dir``) would name every class wrongly: a one-line error."""
    own = gt_dir.parent / "classes.txt"
    if not own.is_file() or (isinstance(spec, (str, Path)) and Path(spec).resolve() == own.resolve()):
        return
    theirs = read_class_file(own)
    if len(theirs) != len(names):
        given = spec if isinstance(spec, (str, Path)) else "the list given"
        raise DataError(f"class list {given} has {len(names)} classes, but the ground truth's dataset lists "
                        f"{len(theirs)} in {own}: pass --classes {own}")


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    classes: str | Path | list[str],
    *,
    ids: list[str] | str | Path | None = None,
    unsure: str = "background",
    workers: int = 4,
    progress: bool = True,
) -> tuple[SegScores, dict]:
    """Score every prediction ``<pred_dir>/<id>.png`` against ``<gt_dir>/<id>.png``.

    ``classes`` is ``"voc"``, ``"coco"``, a class-list file or a list of names. ``ids`` (a list or
    an id-list file) selects the images; by default every ground-truth PNG that has a prediction is
    scored, and ground truths with no prediction are an error (listed), because a silently skipped
    image would inflate the score. Returns the scores and a small record of what was matched.
    """
    names = list(classes) if isinstance(classes, (list, tuple)) else resolve_classes(classes)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = _png_stems(pred_dir, "prediction")
    gts = _png_stems(gt_dir, "ground-truth")
    if ids is None:
        wanted = sorted(gts)
    else:
        wanted = list(ids) if isinstance(ids, list) else _read_ids(Path(ids))
        no_gt = [i for i in wanted if i not in gts]
        if no_gt:
            raise DataError(f"{len(no_gt)} ids have no ground truth in {gt_dir}, e.g. {no_gt[:5]}")
    if not wanted:
        raise DataError(f"no ground-truth PNGs in {gt_dir}")
    missing = [i for i in wanted if i not in preds]
    if missing:
        raise DataError(f"{len(missing)} of {len(wanted)} images have no prediction in {pred_dir}, "
                        f"e.g. {missing[:5]} (to score a subset, pass its id list: --ids FILE)")
    _check_class_count(names, classes, gt_dir)

    cm = ConfusionMatrix(names, unsure=unsure)

    def load(i: str):
        gt = read_label_png(gts[i], num_classes=len(names), what="ground truth")
        pred = read_label_png(preds[i], expected_hw=gt.shape, num_classes=len(names), what="prediction",
                              reference=f"its ground truth {gts[i]}")
        return i, pred, gt

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, pred, gt in tqdm(pool.map(load, wanted), total=len(wanted), desc="evaluate",
                                disable=not progress, unit="img"):
            cm.update(pred, gt, name=str(preds[i]))
    present = np.flatnonzero(cm.matrix.sum(axis=0) + cm.matrix.sum(axis=1))
    top = int(present.max()) if present.size else 0
    record = {"images": len(wanted), "extra_predictions": len(set(preds) - set(wanted)),
              "unsure_pixels": cm.unsure_pixels, "unsure": unsure, "highest_class_id": top}
    return cm.scores(), record
