"""PASCAL VOC 2012 with SBD's augmented masks, and the cls_labels files IRN and MCTformer ship.

VOC 2012 (``VOCDataset``): ``root`` = ``VOCdevkit/VOC2012`` with ``JPEGImages/``, ``SegmentationClassAug/``
(SBD-augmented ground truth; ``SegmentationClass/`` is used for the train/val/trainval splits when the
Aug folder is absent) and the id list ``ImageSets/Segmentation/<split>.txt`` or
``ImageSets/SegmentationAug/<split>.txt``. Image labels are the classes of the ground-truth mask, or come
from a ``cls_labels`` .npy dict (id -> 20-dim multi-hot) as IRN and MCTformer ship it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from weakclip.data.base import SegDataset
from weakclip.data.classes import (
    VOC_CLASSES,
)
from weakclip.data.id_lists import is_path_like, listing, read_id_list
from weakclip.data.safe_npy import load_npy_safely
from weakclip.data.sample import Transform
from weakclip.errors import DataError

__all__ = ["VOCDataset", "load_cls_labels"]


def load_cls_labels(path: str | Path, num_foreground: int) -> dict[str, np.ndarray]:
    """Read a ``cls_labels.npy`` dict (id -> multi-hot over the foreground classes) as IRN/MCTformer ship it.

    Returns id -> array of class ids (1-based, background excluded). Keys are kept as strings; IRN's
    integer keys (``2007000032`` for ``2007_000032``) are found by :meth:`VOCDataset` too. The file is a
    pickle; it is read without running code (:func:`~weakclip.data.safe_npy.load_npy_safely`: numpy data
    only, anything else refused).
    """
    obj = load_npy_safely(path, what="cls_labels file")
    if not isinstance(obj, dict):
        raise DataError(
            f"cls_labels file {path} must hold a dict id -> multi-hot vector (np.save of a dict), "
            f"found {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        try:
            vec = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"cls_labels file {path}: entry {key!r} is a {type(value).__name__}, not a "
                            f"vector of {num_foreground} numbers") from None
        if vec.shape[0] != num_foreground:
            raise DataError(
                f"cls_labels file {path}: entry {key!r} has {vec.shape[0]} values, expected {num_foreground} "
                f"(one per foreground class, background excluded)"
            )
        out[str(key)] = np.flatnonzero(vec > 0.5) + 1
    return out


def _lookup_cls(table: dict[str, np.ndarray], ident: str) -> np.ndarray | None:
    hit = table.get(ident)
    if hit is None and "_" in ident:
        hit = table.get(ident.replace("_", ""))  # IRN's integer keys
    return hit


class VOCDataset(SegDataset):
    """PASCAL VOC 2012 (+ SBD), 21 classes. See the module docstring for the layout.

    Args:
        root: ``VOCdevkit/VOC2012`` (``VOCdevkit`` or its parent is accepted too).
        split: a list name (``train_aug``, ``train``, ``val`` ...) or the path of an id list.
        seed_dir: folder of seed PNGs ``<id>.png``.
        transform: applied to each sample last.
        cls_labels: a ``cls_labels.npy`` dict giving the image labels instead of the masks.
        with_gt: put the ground-truth mask in the samples as ``"gt"``.
    """

    kind = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str | Path = "train_aug",
        seed_dir: str | Path | None = None,
        transform: Transform | None = None,
        cls_labels: str | Path | None = None,
        with_gt: bool = True,
    ) -> None:
        self.root = self._find_root(Path(root))
        self.image_dir = self.root / "JPEGImages"
        self.split = str(split)
        self.list_file = self._find_list(self.root, split)
        ids, dups = read_id_list(self.list_file)
        if not ids:
            raise DataError(f"VOC id list {self.list_file} is empty")
        split_name = Path(self.split).stem if is_path_like(split) else self.split
        need_gt = with_gt or cls_labels is None
        self.gt_dir = self._find_gt_dir(self.root, split_name, need_gt)
        self._cls: dict[str, np.ndarray] | None = None
        self.cls_labels = None if cls_labels is None else Path(cls_labels)
        if self.cls_labels is not None:
            table = load_cls_labels(self.cls_labels, len(VOC_CLASSES) - 1)
            missing = [i for i in ids if _lookup_cls(table, i) is None]
            if missing:
                raise DataError(
                    f"cls_labels file {self.cls_labels} has no entry for {len(missing)} of the "
                    f"{len(ids)} ids of {self.list_file}: {listing(missing)}"
                )
            self._cls = {i: _lookup_cls(table, i) for i in ids}
        super().__init__(
            VOC_CLASSES,
            ids,
            seed_dir=seed_dir,
            transform=transform,
            has_gt=with_gt,
            labels_from_gt=self._cls is None,
        )
        if dups:
            self._notes.append(f"id list {self.list_file} repeats ids {listing(dups)} (each used once)")

    @staticmethod
    def _find_root(root: Path) -> Path:
        candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
        for cand in candidates:
            if (cand / "JPEGImages").is_dir():
                return cand
        looked = ", ".join(str(c / "JPEGImages") for c in candidates)
        raise DataError(f"VOC images not found: looked for {looked} (root should be VOCdevkit/VOC2012)")

    @staticmethod
    def _find_list(root: Path, split: str | Path) -> Path:
        if is_path_like(split):
            path = Path(split)
            if not path.is_file():
                raise DataError(f"VOC id list not found: {path}")
            return path
        candidates = [
            root / "ImageSets" / "Segmentation" / f"{split}.txt",
            root / "ImageSets" / "SegmentationAug" / f"{split}.txt",
        ]
        for cand in candidates:
            if cand.is_file():
                return cand
        raise DataError(f"VOC split list {split!r} not found: looked for {', '.join(map(str, candidates))}")

    @staticmethod
    def _find_gt_dir(root: Path, split_name: str, needed: bool) -> Path | None:
        aug, plain = root / "SegmentationClassAug", root / "SegmentationClass"
        if aug.is_dir():
            return aug
        plain_ok = split_name in ("train", "val", "trainval")
        if plain_ok and plain.is_dir():
            return plain
        if not needed:
            return None
        looked = f"{aug} and {plain}" if plain_ok else str(aug)
        raise DataError(
            f"VOC masks for split {split_name!r} not found: looked for {looked} (the SBD-augmented masks "
            f"SegmentationClassAug are needed for train_aug; or pass cls_labels= and with_gt=False)"
        )

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[self._index(i)]}.jpg"

    def gt_path(self, i: int) -> Path | None:
        if self.gt_dir is None:
            return None
        return self.gt_dir / f"{self.ids[self._index(i)]}.png"

    def _label_ids(self, i: int) -> Iterable[int]:
        assert self._cls is not None
        return self._cls[self.ids[i]]

    def _validate_item(self, i: int) -> list[str]:
        problems = super()._validate_item(i)
        # With cls_labels, also compare them with the mask's classes when both are at hand.
        if self._cls is not None and self.gt_dir is not None and not self.has_gt:
            try:
                gt = self.read_gt(i)
            except DataError as exc:
                problems.append(str(exc))
            else:
                extra = self._extra_classes(gt, self._labels_vector(i))
                if extra:
                    problems.append(
                        f"mask {self.gt_path(i)} shows classes {self._names(extra)} that the cls_labels "
                        f"file {self.cls_labels} does not give image {self.ids[i]!r}"
                    )
        return problems
