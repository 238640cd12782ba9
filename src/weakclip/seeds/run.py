"""Write seeds for a whole dataset: resumable, sharded over ``torchrun`` processes, scored on the GT.

Each process takes every ``world``-th image (:func:`weakclip.distributed.shard`). An image whose seed
PNG already exists (and, with ``save_cams``, its CAM file) is skipped, so an interrupted run resumes;
files are written atomically (CAM file first, the PNG last), so any PNG found is complete. An image
that cannot be read (or whose labels cannot be) is reported, skipped and listed in the summary.

Layout of ``out_dir``: ``<id>.png`` (the seeds with their ignore band: the seed folder refinement
trains on, same format as external seeds), ``argmax/<id>.png`` and ``crf/<id>.png`` (CLIP-ES's
training-free masks, :mod:`weakclip.seeds.masks`, when the seeder's ``config.masks`` asks for them),
``cams/<id>.npz`` with ``keys`` (class ids) and ``cams`` (float16, keys x H x W, after the affinity,
at image resolution) when ``save_cams``, and ``seeds_summary.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weakclip.data.datasets import require_images
from weakclip.data.io import jsonable, read_label_png, write_json_atomic, write_label_png
from weakclip.distributed import env_world, shard
from weakclip.errors import DataError
from weakclip.metrics import ConfusionMatrix
from weakclip.write_errors import writing

__all__ = ["format_names", "format_summary", "generate_seeds", "write_cams_npz"]


def write_cams_npz(path: str | Path, cams: np.ndarray, keys) -> Path:
    """Atomically write CAMs (float16, compressed) and their class ids to ``path`` (.npz)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, keys=np.asarray(keys, dtype=np.int16),
                                    cams=np.asarray(cams, np.float16))
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _load(dataset, i: int) -> tuple[np.ndarray, np.ndarray]:
    return dataset.read_image(i), dataset.get_labels(i)


def _prefetch(dataset, indices: list[int], depth: int = 3) -> Iterator[tuple[int, Future]]:
    """(index, future of (image, labels)) in order, reading up to ``depth`` images ahead in threads."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        queue: deque[tuple[int, Future]] = deque()
        rest = iter(indices)
        for i in itertools.islice(rest, depth):
            queue.append((i, pool.submit(_load, dataset, i)))
        while queue:
            item = queue.popleft()
            nxt = next(rest, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(_load, dataset, nxt)))
            yield item


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_counts(values: list[int]) -> list[int]:
    if not _dist_on():
        return values
    on_gpu = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


def _gather_lists(items: list) -> list:
    if not _dist_on():
        return items
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def generate_seeds(
    dataset,
    seeder,
    out_dir: str | Path,
    *,
    save_cams: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    evaluate: bool = True,
    batch_size: int | None = None,
) -> dict:
    """Write ``<out_dir>/<id>.png`` for every image of ``dataset`` (this process's shard of it).

    Args:
        dataset: a :class:`~weakclip.data.base.SegDataset` (ids, classes, image paths, labels).
        seeder: a :class:`~weakclip.seeds.clip_es.ClipEsSeeder` (anything with ``cams_and_keys`` and
            ``seed_from``; ``cams_and_keys_batch`` is used when it has one).
        save_cams: also write ``cams/<id>.npz`` (float16 CAMs of the labelled classes).
        rank, world_size: this process's place; default from the ``torchrun`` environment.
        progress: a progress bar on rank 0.
        evaluate: when the dataset has ground truth, score the seeds (the existing ones too).
        batch_size: up to this many consecutive images go through the CLIP tower together, those of
            one size as one batch (``seeder.cams_and_keys_batch``). Default 1, one image at a time as
            CLIP-ES runs; larger batches are a speed switch for GPUs (the CAMs change by float rounding
            only; on 2 CPU cores batches of 4 were 13 % slower per image).

    Returns the summary (identical on every process; also written to ``seeds_summary.json`` by rank 0):
    counts written / skipped / failed, the failures ``{id: message}``, seconds per computed image and,
    with ground truth, ``miou`` (unsure as background), ``miou_confident`` (unsure pixels left out),
    ``coverage`` (share of confident pixels), per-class IoU, ``masks_miou`` (CLIP-ES's masks:
    ``argmax``; ``crf``, its CRF labels before the confidence cut, as CLIP-ES scores them, over the
    images computed in this run; ``crf_confident``, the written CRF masks with 255 left out), and the
    two ``SegScores`` under ``"scores"`` (not JSON; left out of the file). With a seeder that has
    ``names_record`` (:meth:`~weakclip.seeds.clip_es.ClipEsSeeder.names_record`), the prompts it used:
    ``names_source``, ``class_list``, ``names``, ``background``, ``dropped_background`` and, for a class
    list CLIP-ES has no names for, ``names_note``.

    The seeder's ``config.masks`` (when it has one) says which of CLIP-ES's masks are written
    (``argmax/<id>.png``, ``crf/<id>.png``); an image counts as done when all its files exist.
    """
    require_images(dataset, "seeds")
    env_rank, env_world_size, _ = env_world()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world_size if world_size is None else int(world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_dir = out_dir / "cams"
    classes = list(dataset.classes)
    with_gt = evaluate and bool(getattr(dataset, "has_gt", False))
    cm_bg = ConfusionMatrix(classes, unsure="background")
    cm_conf = ConfusionMatrix(classes, unsure="ignore")
    config = getattr(seeder, "config", None)
    mask_kinds = tuple(getattr(config, "masks", ()))
    # scores of CLIP-ES's masks: "argmax"; "crf" = the CRF labels before the 0.95 cut (CLIP-ES's
    # --eval_only protocol; images computed in this run only, the uncut labels are not written);
    # "crf_confident" = the written CRF masks, 255 left out
    score_keys = [k for k in ("argmax", "crf", "crf_confident") if k.split("_")[0] in mask_kinds]
    cm_masks = {key: ConfusionMatrix(classes, unsure="ignore") for key in score_keys}
    confident = total = 0
    written = skipped = 0
    failures: list[tuple[str, str]] = []
    unscored: list[tuple[str, str]] = []
    compute_s = 0.0

    def read_gt(i: int, shape: tuple[int, ...], path: Path) -> np.ndarray:
        """The ground truth of item ``i``, checked against its image, then against the map at ``path``
        (of ``shape``; itself checked against the image, unless the image cannot be read)."""
        gt = dataset.read_gt(i)
        if gt.shape != tuple(shape[:2]):
            gt = dataset.read_gt(i, tuple(shape[:2]), reference=str(path))
        return gt

    def score(i: int, ident: str, seed: np.ndarray, png: Path) -> None:
        nonlocal confident, total
        try:
            gt = read_gt(i, seed.shape, png)
        except DataError as exc:
            unscored.append((ident, str(exc)))
            _warn(f"seeds: seed of {ident!r} not scored: {exc}", progress and rank == 0)
            return
        cm_bg.update(seed, gt, name=str(png))
        cm_conf.update(seed, gt, name=str(png))
        confident += int((seed != 255).sum())
        total += int(seed.size)

    def paths(i: int) -> tuple[str, Path, Path]:
        ident = dataset.ids[i]
        return ident, out_dir / f"{ident}.png", cam_dir / f"{ident}.npz"

    def mask_path(kind: str, ident: str) -> Path:
        return out_dir / kind / f"{ident}.png"

    def score_masks(i: int, ident: str, masks: dict[str, np.ndarray]) -> None:
        try:
            kind, mask = next(iter(masks.items()))
            gt = read_gt(i, mask.shape, mask_path(kind.removesuffix("_confident"), ident))
        except DataError:
            return  # reported by score() already
        for kind, mask in masks.items():
            cm_masks[kind].update(mask, gt, name=str(mask_path(kind, ident)))

    mine = shard(range(len(dataset)), rank, world_size)
    todo = []
    for i in mine:
        ident, png, npz = paths(i)
        done = png.is_file() and (not save_cams or npz.is_file())
        if not (done and all(mask_path(kind, ident).is_file() for kind in mask_kinds)):
            todo.append(i)
            continue
        skipped += 1
        if with_gt:  # existing seeds count in the scores too
            try:  # on its image's grid, checked against it
                seed = dataset.fit_label(i, read_label_png(png, num_classes=len(classes), what="seed"), png,
                                         "seed")
            except DataError as exc:
                unscored.append((ident, str(exc)))
                continue
            score(i, ident, seed, png)
            if cm_masks:
                try:
                    masks = {kind: dataset.fit_label(i, read_label_png(mask_path(kind, ident),
                                                                       num_classes=len(classes)),
                                                     mask_path(kind, ident), "mask")
                             for kind in mask_kinds}
                except DataError:
                    continue
                if "crf" in masks:  # the uncut CRF labels are not on disk: score the written ones only
                    masks["crf_confident"] = masks.pop("crf")
                score_masks(i, ident, masks)

    if batch_size is None:
        batch_size = 1  # as CLIP-ES
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = tqdm(total=len(todo), desc=f"seeds [{rank}/{world_size}]", disable=not progress or rank != 0,
               unit="img")
    loaded_stream = _prefetch(dataset, todo, depth=max(3, 2 * batch_size))
    while chunk := list(itertools.islice(loaded_stream, batch_size)):
        by_size: dict[tuple, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for i, loaded in chunk:
            try:
                image, labels = loaded.result()
            except DataError as exc:
                ident = dataset.ids[i]
                failures.append((ident, str(exc)))
                _warn(f"seeds: skipped image {ident!r}: {exc}", progress and rank == 0)
                bar.update(1)
                continue
            by_size.setdefault(image.shape, []).append((i, image, labels))
        for group in by_size.values():
            start = time.perf_counter()
            if hasattr(seeder, "cams_and_keys_batch"):
                results = seeder.cams_and_keys_batch([g[1] for g in group], [g[2] for g in group])
            else:
                results = [seeder.cams_and_keys(image, labels) for _, image, labels in group]
            compute_s += time.perf_counter() - start
            for (i, image, _), (cams, keys) in zip(group, results):
                ident, png, npz = paths(i)
                seed = seeder.seed_from(cams, keys)
                masks = _clip_es_masks(config, mask_kinds, image, cams, keys)
                if save_cams:
                    write_cams_npz(npz, cams, keys)
                for kind in mask_kinds:
                    write_label_png(mask_path(kind, ident), masks[kind])
                write_label_png(png, seed)
                written += 1
                bar.update(1)
                if with_gt:
                    score(i, ident, seed, png)
                    if cm_masks:
                        named = {"argmax": masks.get("argmax"), "crf": masks.get("crf_uncut"),
                                 "crf_confident": masks.get("crf")}
                        score_masks(i, ident, {k: v for k, v in named.items() if v is not None})
    bar.close()

    computed = written
    written, skipped, confident, total, n_failed = _sum_counts(
        [written, skipped, confident, total, len(failures)]
    )
    failures = _gather_lists(failures)
    unscored = _gather_lists(unscored)
    secs = _gather_lists([compute_s])
    summary: dict = {
        "out_dir": str(out_dir),
        "images": len(dataset),
        "written": written,
        "skipped_existing": skipped,
        "failed": n_failed,
        "failures": dict(failures),
        "seconds_per_image": (sum(secs) / written) if written else None,
        "this_process_written": computed,
    }
    if hasattr(seeder, "names_record"):
        summary.update(seeder.names_record())
    if with_gt:
        cm_bg.all_reduce()
        cm_conf.all_reduce()
        s_bg, s_conf = cm_bg.scores(), cm_conf.scores()
        summary.update({
            "miou": s_bg.miou,
            "miou_confident": s_conf.miou,
            "pixel_accuracy_confident": s_conf.pixel_accuracy,
            "coverage": confident / total if total else float("nan"),
            "unscored": dict(unscored),
            "iou": dict(zip(classes, s_bg.iou.tolist())),
            "iou_confident": dict(zip(classes, s_conf.iou.tolist())),
        })
        for cm in cm_masks.values():
            cm.all_reduce()
        summary["masks_miou"] = {key: cm.scores().miou for key, cm in cm_masks.items()
                                 if cm.matrix.sum() > 0}
    if rank == 0:
        write_json_atomic(out_dir / "seeds_summary.json", jsonable(summary))
    if with_gt:
        summary["scores"] = {"unsure_as_background": s_bg, "confident_only": s_conf}
    return summary


def _clip_es_masks(config, kinds: tuple[str, ...], image: np.ndarray, cams: np.ndarray, keys
                   ) -> dict[str, np.ndarray]:
    """CLIP-ES's masks of one image for ``kinds`` (of :data:`~weakclip.seeds.clip_es.MASK_KINDS`):
    "argmax", and with "crf" both "crf" (255 under the confidence cut, as written) and "crf_uncut"."""
    from weakclip.seeds.masks import argmax_mask, crf_labels

    out: dict[str, np.ndarray] = {}
    if "argmax" in kinds:
        out["argmax"] = argmax_mask(cams, keys, config.bg_power)
    if "crf" in kinds:
        label, conf = crf_labels(image, cams, keys, power=config.bg_power, fix_wrap=config.crf_fix_wrap)
        out["crf_uncut"] = label.copy()
        label[conf < config.crf_confidence] = 255
        out["crf"] = label
    return out


def _warn(msg: str, with_bar: bool) -> None:
    if with_bar:
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)



def format_names(record: dict) -> list[str]:
    """The lines saying which prompt names and background words a seed run used (from a summary or a
    seeder's ``names_record``; none when it has no ``names_source``). Names are separated by "; " as
    CLIP-ES's own contain commas."""
    if "names_source" not in record:
        return []
    lines = [f"class names ({record['names_source']}): {'; '.join(record.get('names', []))}"]
    background = record.get("background", [])
    lines.append(f"background prompts ({len(background)}): {'; '.join(background)}")
    if record.get("dropped_background"):
        dropped = "; ".join(record["dropped_background"])
        lines.append(f"background prompts left out (they name a class): {dropped}")
    if record.get("names_note"):
        lines.append(f"note: {record['names_note']}")
    return lines


def format_summary(summary: dict) -> str:
    """A short text report of :func:`generate_seeds`'s summary (with the mIoU table when scored)."""
    lines = [
        f"seeds in {summary['out_dir']}: {summary['written']} written, {summary['skipped_existing']} "
        f"already there, {summary['failed']} failed (of {summary['images']} images)",
        *format_names(summary),
    ]
    if summary.get("seconds_per_image") is not None:
        lines.append(f"{summary['seconds_per_image']:.3f} s per computed image")
    for ident, msg in list(summary["failures"].items())[:10]:
        lines.append(f"  failed {ident}: {msg}")
    if "miou" in summary:
        scores = summary["scores"]
        bg, conf = scores["unsure_as_background"], scores["confident_only"]
        width = max([len(c) for c in bg.classes] + [5])
        lines.append(f"{'class':<{width}}  {'IoU':>7}  {'IoU conf':>8}")
        for c, a, b in zip(bg.classes, bg.iou, conf.iou):
            fa = "      -" if np.isnan(a) else f"{100 * a:7.2f}"
            fb = "       -" if np.isnan(b) else f"{100 * b:8.2f}"
            lines.append(f"{c:<{width}}  {fa}  {fb}")
        lines.append(f"mIoU (unsure as background): {100 * summary['miou']:.2f}%")
        lines.append(f"mIoU of confident pixels:    {100 * summary['miou_confident']:.2f}% "
                     f"(pixel precision {100 * summary['pixel_accuracy_confident']:.2f}%, "
                     f"coverage {100 * summary['coverage']:.2f}%)")
        labels = {"argmax": "CLIP-ES masks, argmax", "crf": "CLIP-ES masks, CRF (before the cut)",
                  "crf_confident": "CLIP-ES masks, CRF (confident pixels)"}
        for key, value in summary.get("masks_miou", {}).items():
            lines.append(f"mIoU of {labels.get(key, key) + ':':<40} {100 * value:.2f}%")
    return "\n".join(lines)
