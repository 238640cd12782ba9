"""COCO 2014 after :func:`weakclip.data.coco.prepare_coco`, in 81 classes or the release's 91 ids.

COCO 2014 (``COCODataset``): the output of :func:`weakclip.data.coco.prepare_coco` (``ImageSets/<split>.txt``,
``labels_<split>.json``, ``SegmentationClass/<split>/<id>.png``) with the images in ``<root>/images/<split>/``
or ``<root>/<split>/`` (or ``image_root``), named ``COCO_train2014_000000000009.jpg``.

``COCO91Dataset`` reads the same files in the 91-id label space of the release (class = category id).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from weakclip.data.base import SegDataset
from weakclip.data.classes import (
    COCO81_TO_91,
    COCO91_CLASSES,
    COCO_CLASSES,
    coco_to_91,
)
from weakclip.data.id_lists import listing, read_id_list
from weakclip.data.io import read_json, read_label_png
from weakclip.data.label_names import resolve_labels
from weakclip.data.sample import Transform
from weakclip.errors import DataError

__all__ = ["COCO91Dataset", "COCODataset"]


class COCODataset(SegDataset):
    """COCO 2014 as converted by :func:`prepare_coco`, 81 classes (module docstring).

    Args:
        root: the ``out_root`` of :func:`prepare_coco` (the id lists, labels files and masks).
        split: ``train2014`` or ``val2014``.
        seed_dir: folder of seed PNGs ``<id>.png``.
        transform: applied to each sample last.
        with_gt: put the converted mask in the samples as ``"gt"``.
        image_root: folder of the split's images (or its parent holding ``<split>/``); default
            ``<root>/images/<split>`` or ``<root>/<split>``.
        ids_file: an id list to use instead of ``ImageSets/<split>.txt`` (e.g. a 5,000-image val subset).
    """

    kind = "coco"

    def __init__(
        self,
        root: str | Path,
        split: str = "train2014",
        seed_dir: str | Path | None = None,
        transform: Transform | None = None,
        with_gt: bool = True,
        image_root: str | Path | None = None,
        ids_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = str(split)
        hint = f"run prepare_coco(<coco_root>, {self.root}) first"
        self.list_file = Path(ids_file) if ids_file is not None else self.root / "ImageSets" / f"{split}.txt"
        if not self.list_file.is_file():
            raise DataError(f"COCO id list not found: {self.list_file} ({hint})")
        ids, dups = read_id_list(self.list_file)
        self.labels_file = self.root / f"labels_{split}.json"
        if not self.labels_file.is_file():
            raise DataError(f"COCO labels file not found: {self.labels_file} ({hint})")
        raw = read_json(self.labels_file, "COCO labels file")
        if not isinstance(raw, dict):
            raise DataError(f"COCO labels file {self.labels_file} must hold a JSON object id -> class names")
        missing = [i for i in ids if i not in raw]
        if missing:
            raise DataError(
                f"{len(missing)} ids of {self.list_file} are not in {self.labels_file}: {listing(missing)}"
            )
        self._fg = resolve_labels(raw, ids, COCO_CLASSES, self.labels_file, "COCO_CLASSES")
        self.image_dir = self._find_image_dir(self.root, self.split, image_root)
        self.gt_dir = self.root / "SegmentationClass" / self.split
        if with_gt and not self.gt_dir.is_dir():
            raise DataError(f"COCO masks not found: {self.gt_dir} ({hint}, or pass with_gt=False)")
        super().__init__(COCO_CLASSES, ids, seed_dir=seed_dir, transform=transform, has_gt=with_gt)
        if dups:
            self._notes.append(f"id list {self.list_file} repeats ids {listing(dups)} (each used once)")

    @staticmethod
    def _find_image_dir(root: Path, split: str, image_root: str | Path | None) -> Path:
        if image_root is not None:
            base = Path(image_root)
            candidates = [base / split, base]
        else:
            candidates = [root / "images" / split, root / split]
        for cand in candidates:
            if cand.is_dir():
                return cand
        raise DataError(f"COCO {split} images not found: looked for {', '.join(map(str, candidates))}")

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[self._index(i)]}.jpg"

    def gt_path(self, i: int) -> Path | None:
        return self.gt_dir / f"{self.ids[self._index(i)]}.png" if self.gt_dir.is_dir() else None

    def _label_ids(self, i: int) -> Iterable[int]:
        return self._fg[self.ids[i]]


class COCO91Dataset(COCODataset):
    """COCO 2014 in the release's label space: 91 classes, label value = COCO category id (0 background),
    the 10 ids without annotations ("street sign", "hat", ...) included (``COCO91_CLASSES``).

    Reads the same prepared folder as :class:`COCODataset`; the 81-class masks are mapped to category ids on
    reading (:func:`~weakclip.data.classes.coco_to_91`), so predictions, seeds (e.g. MCTformer's COCO seeds,
    which use category ids) and masks written for this dataset are in the 91-id space.
    """

    kind = "coco91"

    def __init__(self, root: str | Path, split: str = "train2014", **kwargs: Any) -> None:
        super().__init__(root, split, **kwargs)
        self.classes = list(COCO91_CLASSES)

    def read_gt(self, i: int, expected_hw: tuple[int, int] | None = None,
                reference: str | None = None) -> np.ndarray:
        i = self._index(i)
        path = self.gt_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no ground-truth masks (image {self.ids[i]!r})")
        mask = read_label_png(path, num_classes=len(COCO_CLASSES), what="mask")
        return coco_to_91(self.fit_label(i, mask, path, "mask", expected_hw, reference))

    def _label_ids(self, i: int) -> Iterable[int]:
        return [int(COCO81_TO_91[c]) for c in self._fg[self.ids[i]]]
