"""COCO 2014: convert the instance annotations once into label PNGs, a list of ids and image labels.

``prepare_coco(coco_root, out_root)`` reads ``<coco_root>/annotations/instances_<split>.json`` and writes::

    <out_root>/SegmentationClass/<split>/<image_file_stem>.png   class ids 1..80 (COCO_CLASSES order),
                                                                 0 background, 255 crowd-only regions
    <out_root>/ImageSets/<split>.txt                             every image id of the split, one a line
                                                                 (images without annotations included)
    <out_root>/labels_<split>.json                               {"<id>": ["person", "dog"], ...}

Painting rule: crowd regions are set to 255 first, then the non-crowd objects are painted in
decreasing order of their pixel area, so a small object lying on a large one stays visible and a
crowd region keeps 255 only where no non-crowd object covers it. Image labels are the classes of all
the image's annotations, crowd ones included (the class is present in the picture).

The conversion is resumable: a PNG that already exists is skipped (PNGs are written atomically, so an
existing one is complete); the list and the labels file are rewritten each run. This module does not
import torch, so worker processes start quickly. :class:`weakclip.data.coco_dataset.COCODataset` reads the
result.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from weakclip.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, IGNORE_INDEX
from weakclip.data.io import read_json, write_json_atomic, write_label_png, write_text_atomic
from weakclip.errors import DataError
from weakclip.worker_pool import init_worker, worker_context

__all__ = ["coco_label_map", "decode_segmentation", "prepare_coco"]

# COCO category id -> class index 1..80.
_CATEGORY_TO_CLASS: dict[int, int] = {cid: i + 1 for i, cid in enumerate(COCO_CATEGORY_IDS)}

# One annotation as the workers see it: (segmentation, class index, is crowd, annotation id).
_Ann = tuple[Any, int, bool, Any]


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed RLE or compressed RLE) -> ``H x W`` bool mask.

    Raises:
        ValueError: a malformed segmentation or an RLE of another size (callers add the file name).
    """
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6]
        if any(len(p) % 2 for p in polys):
            raise ValueError("polygon with an odd number of coordinates")
        if not polys:
            return np.zeros((height, width), dtype=bool)
        # (each polygon needs >= 3 points: pycocotools reads a 4-number list as a box)
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in polys], height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = [int(v) for v in segm["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE of size {size[1]}x{size[0]} for an image of {width}x{height}")
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segm).__name__}")
    with warnings.catch_warnings():
        # pycocotools' Cython decoder trips numpy 2's __array__(copy=...) deprecation; harmless
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        mask = mask_utils.decode(rle)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    if mask.shape != (height, width):
        raise ValueError(f"decoded mask of shape {mask.shape}, expected {(height, width)}")
    return mask.astype(bool)


def coco_label_map(height: int, width: int, anns: Iterable[_Ann], source: str = "annotations") -> np.ndarray:
    """Paint one image's annotations into an ``H x W`` uint8 map (see the module docstring's rule).

    ``anns`` holds ``(segmentation, class_index, is_crowd, annotation_id)`` tuples; ``source`` names the
    annotation file in error messages.
    """
    label = np.zeros((height, width), dtype=np.uint8)
    objects: list[tuple[int, int, np.ndarray, int]] = []
    for order, (segm, cls, crowd, ann_id) in enumerate(anns):
        try:
            mask = decode_segmentation(segm, height, width)
        except Exception as exc:
            raise DataError(f"{source}: annotation {ann_id}: bad segmentation: {exc}") from exc
        if crowd:
            label[mask] = IGNORE_INDEX
        else:
            objects.append((int(mask.sum()), order, mask, cls))
    # Largest first; equal areas keep the annotation order. Later (smaller) objects paint over earlier.
    objects.sort(key=lambda t: (-t[0], t[1]))
    for _, _, mask, cls in objects:
        label[mask] = cls
    return label


def _render(task: tuple[str, int, int, list[_Ann], str]) -> str:
    out_png, height, width, anns, source = task
    write_label_png(out_png, coco_label_map(height, width, anns, source), palette=True)
    return out_png


def _check_categories(data: dict, ann_file: Path) -> None:
    for cat in data.get("categories", []):
        cid = cat.get("id")
        if cid not in _CATEGORY_TO_CLASS:
            raise DataError(
                f"{ann_file}: category id {cid} ({cat.get('name')!r}) is not one of the 80 COCO classes"
            )
        expected = COCO_CLASSES[_CATEGORY_TO_CLASS[cid]]
        if cat.get("name") is not None and cat["name"] != expected:
            raise DataError(
                f"{ann_file}: category id {cid} is named {cat['name']!r}, expected {expected!r} "
                f"(prepare_coco handles the standard 80 COCO classes only)"
            )


def _split_tasks(
    data: dict, ann_file: Path, png_dir: Path
) -> tuple[list[str], dict[str, list[str]], list[tuple[str, int, int, list[_Ann], str]]]:
    """Ids (sorted), image labels and the rendering task of every image of one split."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann_file} is not a COCO instances file (no 'images' list)")
    anns_list = data.get("annotations") or []
    _check_categories(data, ann_file)

    images: dict[Any, tuple[str, int, int]] = {}
    seen: dict[str, Any] = {}
    for img in data["images"]:
        try:
            stem = Path(str(img["file_name"])).stem
            entry = (stem, int(img["height"]), int(img["width"]))
            img_id = img["id"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{ann_file}: malformed image entry {img!r:.80}: {exc}") from exc
        if stem in seen:
            raise DataError(f"{ann_file}: file name {stem!r} is used by images {seen[stem]} and {img_id}")
        seen[stem] = img_id
        images[img_id] = entry

    per_image: dict[Any, list[_Ann]] = {k: [] for k in images}
    for ann in anns_list:
        try:
            img_id, cid = ann["image_id"], ann["category_id"]
            segm = ann["segmentation"]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{ann_file}: malformed annotation {ann!r:.80}: missing {exc}") from exc
        if img_id not in per_image:
            raise DataError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image id {img_id}")
        if cid not in _CATEGORY_TO_CLASS:
            raise DataError(f"{ann_file}: annotation {ann.get('id')} has unknown category id {cid}")
        per_image[img_id].append((segm, _CATEGORY_TO_CLASS[cid], bool(ann.get("iscrowd", 0)), ann.get("id")))

    ids: list[str] = []
    labels: dict[str, list[str]] = {}
    tasks = []
    for img_id, (stem, height, width) in sorted(images.items(), key=lambda kv: kv[1][0]):
        anns = per_image[img_id]
        ids.append(stem)
        labels[stem] = [COCO_CLASSES[c] for c in sorted({a[1] for a in anns})]
        tasks.append((str(png_dir / f"{stem}.png"), height, width, anns, f"{ann_file} (image {stem})"))
    return ids, labels, tasks


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def prepare_coco(
    coco_root: str | Path,
    out_root: str | Path,
    splits: Sequence[str] = ("train2014", "val2014"),
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Convert COCO instance annotations into label PNGs, id lists and image labels (module docstring).

    Args:
        coco_root: folder holding ``annotations/instances_<split>.json``.
        out_root: where to write (may be ``coco_root`` itself).
        splits: the splits to convert.
        workers: processes rendering masks (default ``min(4, cpu_count)``); 0 or 1 renders in-process.
        progress: show a tqdm progress bar.

    Returns:
        ``{split: {"images": n, "written": n_new_pngs, "skipped": n_existing_pngs}}``.

    Raises:
        DataError: a missing or malformed annotation file, an unknown category.
    """
    coco_root, out_root = Path(coco_root), Path(out_root)
    if isinstance(splits, str):
        splits = (splits,)
    workers = _default_workers() if workers is None else int(workers)
    summary: dict[str, dict[str, int]] = {}
    for split in splits:
        ann_file = coco_root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise DataError(
                f"COCO annotations not found: {ann_file} "
                f"(expected <coco_root>/annotations/instances_<split>.json)"
            )
        data = read_json(ann_file, "COCO annotation file")
        png_dir = out_root / "SegmentationClass" / split
        ids, labels, tasks = _split_tasks(data, ann_file, png_dir)
        del data
        png_dir.mkdir(parents=True, exist_ok=True)
        todo = [t for t in tasks if not os.path.exists(t[0])]
        bar = tqdm(total=len(todo), desc=f"COCO {split} masks", unit="img", disable=not progress)
        try:
            if workers <= 1 or len(todo) <= 1:
                for task in todo:
                    _render(task)
                    bar.update(1)
            else:
                context = worker_context(runs_torch=False)  # pycocotools, numpy, PIL: no torch op
                with context.Pool(min(workers, len(todo)), init_worker, (os.getpid(),)) as pool:
                    for _ in pool.imap_unordered(_render, todo, chunksize=8):
                        bar.update(1)
        finally:
            bar.close()
        write_text_atomic(out_root / "ImageSets" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        write_json_atomic(out_root / f"labels_{split}.json", labels)
        summary[split] = {"images": len(ids), "written": len(todo), "skipped": len(tasks) - len(todo)}
    return summary
