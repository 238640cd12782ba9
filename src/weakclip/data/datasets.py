"""Datasets of images with image-level labels, optional seeds and optional ground-truth masks.

Every dataset yields a sample dict::

    "id"      str                           the image id (file stem)
    "image"   H x W x 3 uint8 RGB array     (read with weakclip.data.io.read_image, EXIF not applied)
    "labels"  float32 multi-hot, length K   K = number of classes including background; [0] is always 1
    "seed"    H x W uint8                   class id or 255 (only when the dataset has seeds)
    "gt"      H x W uint8                   class id or 255 (only when the dataset has ground truth)

and then applies ``transform(sample) -> sample`` when one is given. Whether samples carry "seed" and
"gt" is decided per dataset (``has_seeds``, ``has_gt``), never per item, so batches stay uniform: a
dataset with seeds or ground truth needs them for every id and raises DataError naming the id if one is
missing. Seeds come from ``seed_dir`` (``<seed_dir>/<id>.png``, the PNG folder of any CAM method) for
every dataset type.

Problems with a single item (missing or corrupt image, mask of the wrong size, value out of range, missing
seed) raise DataError when the item is read; ``validate()`` scans every item and returns all of them as a
list of one-line messages. Problems with the dataset as a whole (missing folders or lists, unknown class
names, a cls_labels file lacking ids) raise DataError in the constructor.

Supported layouts
-----------------
VOC 2012 (``VOCDataset``): ``root`` = ``VOCdevkit/VOC2012`` with ``JPEGImages/``, ``SegmentationClassAug/``
(SBD-augmented ground truth; ``SegmentationClass/`` is used for the train/val/trainval splits when the
Aug folder is absent) and the id list ``ImageSets/Segmentation/<split>.txt`` or
``ImageSets/SegmentationAug/<split>.txt``. Image labels are the classes of the ground-truth mask, or come
from a ``cls_labels`` .npy dict (id -> 20-dim multi-hot) as IRN and MCTformer ship it.

COCO 2014 (``COCODataset``): the output of :func:`weakclip.data.coco.prepare_coco` (``ImageSets/<split>.txt``,
``labels_<split>.json``, ``SegmentationClass/<split>/<id>.png``) with the images in ``<root>/images/<split>/``
or ``<root>/<split>/`` (or ``image_root``), named ``COCO_train2014_000000000009.jpg``.

Folder layout (``FolderDataset``), for your own data, and what the synthetic data generator writes::

    root/classes.txt            one class name per line, the first is "background"
    root/images/<id>.<ext>      ext one of jpg, jpeg, png, bmp, webp (any case); one file per id
    root/labels.json            {"<id>": ["cat", "dog"], ...}  (an empty list = background only)
      or root/labels.csv        header "image,labels", then rows like: 0001,cat;dog
    root/seeds/<id>.png         optional seeds (class id or 255); used when seed_dir is None and the
                                folder has a seed for every id of the split (the synthetic generator
                                writes seeds for the train ids only, so split="val" simply has none)
    root/masks/<id>.png         optional ground truth (class id or 255); used when the folder exists
                                (and with_gt=True)
    root/splits/<split>.txt     optional id lists, one id a line (e.g. train.txt, val.txt);
                                split=None -> every image of the labels file, in its order

Names in the labels file must be names of classes.txt ("background" may be listed; it is implied anyway).
Keys of labels.json and the image column of labels.csv may carry an image extension ("0001.jpg"); it is
stripped.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from weakclip.data.classes import (
    COCO81_TO_91,
    COCO91_CLASSES,
    COCO_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    coco_to_91,
    read_class_file,
)
from weakclip.data.coco import prepare_coco
from weakclip.data.io import IMAGE_EXTENSIONS, read_image, read_json, read_label_png
from weakclip.errors import DataError

__all__ = [
    "COCO91Dataset",
    "COCODataset",
    "ConcatSegDataset",
    "FolderDataset",
    "SegDataset",
    "VOCDataset",
    "build_dataset",
    "collate_samples",
    "detect_kind",
    "load_cls_labels",
    "prepare_coco",
    "read_id_list",
]

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]

_LIST_MAX = 5  # how many ids / names a message lists before "(+N more)"


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_LIST_MAX])
    more = len(items) - _LIST_MAX
    return shown + (f" (+{more} more)" if more > 0 else "")


def _strip_image_ext(name: str) -> str:
    """``"a/b/0001.jpg"`` -> ``"0001"``; a name without a known image extension keeps its dots."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else name


def read_id_list(path: str | Path) -> tuple[list[str], list[str]]:
    """Read an id list (one id a line; blank lines and ``#`` comments skipped) -> (ids, duplicates).

    Lines in the DeepLab format ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` give ``x``.
    Duplicates are dropped (first occurrence kept) and returned separately.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read id list {path}: {exc}") from exc
    ids: list[str] = []
    seen: set[str] = set()
    dups: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ident = _strip_image_ext(line.split()[0])
        if ident in seen:
            dups.append(ident)
            continue
        seen.add(ident)
        ids.append(ident)
    return ids, dups


def _is_path_like(split: str | Path) -> bool:
    s = str(split)
    return isinstance(split, Path) or s.endswith(".txt") or "/" in s or os.sep in s


class SegDataset(Dataset):
    """Base of the datasets: ids, classes, labels, optional seeds and ground truth (module docstring).

    Subclasses set ``classes``, ``ids``, ``has_gt`` and implement :meth:`image_path`, :meth:`gt_path`
    and :meth:`_label_ids` (image labels from their own source, or from the ground-truth mask when
    ``_labels_from_gt`` is true).
    """

    kind = "base"

    def __init__(
        self,
        classes: Sequence[str],
        ids: Sequence[str],
        *,
        seed_dir: str | Path | None = None,
        transform: Transform | None = None,
        has_gt: bool = False,
        labels_from_gt: bool = False,
    ) -> None:
        super().__init__()
        self.classes: list[str] = list(classes)
        self.ids: list[str] = list(ids)
        self.transform = transform
        self.has_gt = bool(has_gt)
        self._labels_from_gt = bool(labels_from_gt)
        self.seed_dir: Path | None = None if seed_dir is None else Path(seed_dir)
        if self.seed_dir is not None and not self.seed_dir.is_dir():
            raise DataError(f"seed folder not found: {self.seed_dir}")
        self._label_cache: dict[int, np.ndarray] = {}
        # Problems of the dataset as a whole that do not stop it (e.g. duplicated ids in a list).
        self._notes: list[str] = []

    # ----------------------------------------------------------------- basic facts
    @property
    def num_classes(self) -> int:
        """K, the number of classes including background."""
        return len(self.classes)

    @property
    def has_seeds(self) -> bool:
        return self.seed_dir is not None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"seeds={'yes' if self.has_seeds else 'no'}, gt={'yes' if self.has_gt else 'no'})"
        )

    def _index(self, i: Any) -> int:
        n = len(self.ids)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        return i

    # ----------------------------------------------------------------- paths (subclasses)
    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def gt_path(self, i: int) -> Path | None:
        """The ground-truth mask of item ``i``, or None when the dataset has none."""
        return None

    def seed_path(self, i: int) -> Path | None:
        """``<seed_dir>/<id>.png``, or None when the dataset has no seeds."""
        if self.seed_dir is None:
            return None
        return self.seed_dir / f"{self.ids[self._index(i)]}.png"

    def _label_ids(self, i: int) -> Iterable[int]:
        """Foreground class ids of item ``i`` from the dataset's labels source (not the mask)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- reading
    def read_gt(self, i: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The ground-truth mask of item ``i`` (checked against ``num_classes`` and ``expected_hw``)."""
        i = self._index(i)
        path = self.gt_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no ground-truth masks (image {self.ids[i]!r})")
        return read_label_png(path, expected_hw=expected_hw, num_classes=self.num_classes, what="mask")

    def read_seed(self, i: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The seed of item ``i``; DataError naming the id when the seed folder lacks it."""
        i = self._index(i)
        path = self.seed_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no seed folder (image {self.ids[i]!r})")
        if not path.is_file():
            raise DataError(f"seed for image {self.ids[i]!r} not found: {path}")
        return read_label_png(path, expected_hw=expected_hw, num_classes=self.num_classes, what="seed")

    def _labels_vector(self, i: int, gt: np.ndarray | None = None) -> np.ndarray:
        vec = self._label_cache.get(i)
        if vec is None:
            if self._labels_from_gt:
                if gt is None:
                    gt = self.read_gt(i)
                fg = [int(c) for c in np.unique(gt) if c != 0 and c != IGNORE_INDEX]
            else:
                fg = [int(c) for c in self._label_ids(i)]
            vec = np.zeros(self.num_classes, dtype=np.float32)
            vec[0] = 1.0
            vec[fg] = 1.0
            self._label_cache[i] = vec
        return vec.copy()

    def get_labels(self, i: int) -> np.ndarray:
        """The float32 multi-hot label vector (length K, background = 1) without reading the image."""
        return self._labels_vector(self._index(i))

    def __getitem__(self, i: Any) -> Sample:
        i = self._index(i)
        image = read_image(self.image_path(i))
        hw = (int(image.shape[0]), int(image.shape[1]))
        gt = None
        if self.has_gt or (self._labels_from_gt and i not in self._label_cache):
            gt = self.read_gt(i, hw)
        sample: Sample = {"id": self.ids[i], "image": image, "labels": self._labels_vector(i, gt)}
        if self.has_seeds:
            sample["seed"] = self.read_seed(i, hw)
        if self.has_gt:
            sample["gt"] = gt
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    # ----------------------------------------------------------------- checking
    def _names(self, ids: Iterable[int]) -> list[str]:
        return [self.classes[c] if c < len(self.classes) else str(c) for c in ids]

    def _extra_classes(self, mask: np.ndarray, labels: np.ndarray) -> list[int]:
        present = [int(c) for c in np.unique(mask) if c != IGNORE_INDEX and c < self.num_classes]
        return [c for c in present if labels[c] == 0]

    def _validate_item(self, i: int) -> list[str]:
        problems: list[str] = []
        ident = self.ids[i]
        hw = None
        try:
            hw = read_image(self.image_path(i)).shape[:2]
        except DataError as exc:
            problems.append(str(exc))
        gt = None
        gt_failed = False
        if self.has_gt or self._labels_from_gt:
            try:
                gt = self.read_gt(i, hw)
            except DataError as exc:
                problems.append(str(exc))
                gt_failed = True
        labels = None
        if not (self._labels_from_gt and gt_failed):
            try:
                labels = self._labels_vector(i, gt)
            except DataError as exc:
                problems.append(str(exc))
        if gt is not None and labels is not None and not self._labels_from_gt:
            extra = self._extra_classes(gt, labels)
            if extra:
                problems.append(
                    f"mask {self.gt_path(i)} shows classes {self._names(extra)} that are not among the "
                    f"labels of image {ident!r}"
                )
        if self.has_seeds:
            try:
                seed = self.read_seed(i, hw)
            except DataError as exc:
                problems.append(str(exc))
            else:
                extra = self._extra_classes(seed, labels) if labels is not None else []
                if extra:
                    problems.append(
                        f"seed {self.seed_path(i)} has classes {self._names(extra)} that are not among the "
                        f"labels of image {ident!r}"
                    )
        return problems

    def validate(self, progress: bool = False) -> list[str]:
        """Read every item and return the problems found (one-line messages naming the file), [] if none.

        Checks: image exists and decodes fully; masks and seeds exist, are single-channel, have the
        image's size and values < K or 255; the image labels are readable and known; classes shown by
        a mask or seed are among the image's labels; plus dataset-wide notes such as duplicated ids.
        """
        problems = list(self._notes)
        for i in tqdm(range(len(self)), desc=f"validate {type(self).__name__}", disable=not progress):
            problems.extend(self._validate_item(i))
        return problems


# ===================================================================== VOC
def load_cls_labels(path: str | Path, num_foreground: int) -> dict[str, np.ndarray]:
    """Read a ``cls_labels.npy`` dict (id -> multi-hot over the foreground classes) as IRN/MCTformer ship it.

    Returns id -> array of class ids (1-based, background excluded). Keys are kept as strings; IRN's
    integer keys (``2007000032`` for ``2007_000032``) are found by :meth:`VOCDataset` too. The file is a
    pickle (``allow_pickle=True``): load only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cls_labels file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=True)
    except Exception as exc:
        raise DataError(f"cannot read cls_labels file {path}: {' '.join(str(exc).split())}") from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(
            f"cls_labels file {path} must hold a dict id -> multi-hot vector (np.save of a dict), "
            f"found {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        vec = np.asarray(value, dtype=np.float64).reshape(-1)
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
        split_name = Path(self.split).stem if _is_path_like(split) else self.split
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
                    f"{len(ids)} ids of {self.list_file}: {_listing(missing)}"
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
            self._notes.append(f"id list {self.list_file} repeats ids {_listing(dups)} (each used once)")

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
        if _is_path_like(split):
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


# ===================================================================== COCO
def _names_to_ids(
    names: Any, classes: Sequence[str], ident: str, source: Path, class_file: str
) -> list[int]:
    """Class names of one image -> sorted class ids; DataError naming the id, the name and the file."""
    if isinstance(names, str):
        names = names.split(";")
    if not isinstance(names, (list, tuple)):
        raise DataError(
            f"{source}: labels of image {ident!r} must be a list of class names, got {names!r:.60}"
        )
    index = {c: k for k, c in enumerate(classes)}
    out: set[int] = set()
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        k = index.get(name)
        if k is None:
            close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise DataError(
                f"{source}: image {ident!r} has unknown class {name!r}{hint}; the classes are those of "
                f"{class_file}"
            )
        if k != 0:
            out.add(k)
    return sorted(out)


def _resolve_labels(
    raw: dict[str, Any], keys: Iterable[str], classes: Sequence[str], source: Path, class_file: str
) -> dict[str, list[int]]:
    """:func:`_names_to_ids` over many images; one DataError reporting the first problem and a count."""
    out: dict[str, list[int]] = {}
    errors: list[str] = []
    for ident in keys:
        try:
            out[ident] = _names_to_ids(raw[ident], classes, ident, source, class_file)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        more = f" ({len(errors) - 1} more images with bad labels in that file)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    return out


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
                f"{len(missing)} ids of {self.list_file} are not in {self.labels_file}: {_listing(missing)}"
            )
        self._fg = _resolve_labels(raw, ids, COCO_CLASSES, self.labels_file, "COCO_CLASSES")
        self.image_dir = self._find_image_dir(self.root, self.split, image_root)
        self.gt_dir = self.root / "SegmentationClass" / self.split
        if with_gt and not self.gt_dir.is_dir():
            raise DataError(f"COCO masks not found: {self.gt_dir} ({hint}, or pass with_gt=False)")
        super().__init__(COCO_CLASSES, ids, seed_dir=seed_dir, transform=transform, has_gt=with_gt)
        if dups:
            self._notes.append(f"id list {self.list_file} repeats ids {_listing(dups)} (each used once)")

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

    def read_gt(self, i: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
        i = self._index(i)
        path = self.gt_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no ground-truth masks (image {self.ids[i]!r})")
        mask = read_label_png(path, expected_hw=expected_hw, num_classes=len(COCO_CLASSES), what="mask")
        return coco_to_91(mask)

    def _label_ids(self, i: int) -> Iterable[int]:
        return [int(COCO81_TO_91[c]) for c in self._fg[self.ids[i]]]


# ===================================================================== folder layout
class FolderDataset(SegDataset):
    """A user's own data in the folder layout of the module docstring.

    Args:
        root: the dataset folder.
        split: a name of ``splits/<split>.txt``, the path of an id list, or None for every labelled image.
        seed_dir: folder of seed PNGs (every id must have one); default ``root/seeds`` when it holds a
            seed for every id of the split, else no seeds.
        transform: applied to each sample last.
        with_gt: use ``root/masks`` (when it exists) as ground truth ``"gt"``.
    """

    kind = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str | Path | None = None,
        seed_dir: str | Path | None = None,
        transform: Transform | None = None,
        with_gt: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        self.class_file = self.root / "classes.txt"
        classes = read_class_file(self.class_file)
        self.image_dir = self.root / "images"
        if not self.image_dir.is_dir():
            raise DataError(
                f"image folder not found: {self.image_dir} (folder datasets keep images in images/)"
            )
        self._files = self._scan_images(self.image_dir)
        self.labels_file, raw = self._read_labels(self.root)
        self._fg = _resolve_labels(raw, raw, classes, self.labels_file, str(self.class_file))
        self.split = None if split is None else str(split)
        dups: list[str] = []
        if split is None:
            self.list_file = None
            ids = list(raw)
        else:
            self.list_file = Path(split) if _is_path_like(split) else self.root / "splits" / f"{split}.txt"
            if not self.list_file.is_file():
                avail = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
                raise DataError(
                    f"split list not found: {self.list_file}"
                    + (f" (available: {', '.join(avail)})" if avail else " (no splits/ lists)")
                )
            ids, dups = read_id_list(self.list_file)
            missing = [i for i in ids if i not in self._fg]
            if missing:
                raise DataError(
                    f"{self.list_file}: {len(missing)} ids have no labels in {self.labels_file}: "
                    f"{_listing(missing)}"
                )
        seed_note = None
        auto_seeds = self.root / "seeds"
        if seed_dir is None and auto_seeds.is_dir():
            have = {n[:-4] for n in os.listdir(auto_seeds) if n.endswith(".png") and not n.startswith(".")}
            covered = sum(1 for i in ids if i in have)
            if ids and covered == len(ids):
                seed_dir = auto_seeds
            elif covered:
                seed_note = (
                    f"seed folder {auto_seeds} covers only {covered} of the {len(ids)} ids, so it is not "
                    f"used (pass seed_dir= to require it)"
                )
        self.gt_dir = self.root / "masks"
        has_gt = with_gt and self.gt_dir.is_dir()
        super().__init__(classes, ids, seed_dir=seed_dir, transform=transform, has_gt=has_gt)
        if dups:
            self._notes.append(f"id list {self.list_file} repeats ids {_listing(dups)} (each used once)")
        if seed_note:
            self._notes.append(seed_note)

    @staticmethod
    def _scan_images(image_dir: Path) -> dict[str, str]:
        files: dict[str, str] = {}
        for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or not entry.is_file():
                continue
            stem, dot, ext = name.rpartition(".")
            if not dot or f".{ext.lower()}" not in IMAGE_EXTENSIONS:
                continue
            if stem in files:
                raise DataError(
                    f"image id {stem!r} has several files in {image_dir}: {files[stem]}, {name} (keep one)"
                )
            files[stem] = name
        return files

    @staticmethod
    def _read_labels(root: Path) -> tuple[Path, dict[str, Any]]:
        json_file, csv_file = root / "labels.json", root / "labels.csv"
        if json_file.is_file() and csv_file.is_file():
            raise DataError(f"both {json_file} and {csv_file} exist; keep one labels file")
        if json_file.is_file():
            data = read_json(json_file, "labels file")
            if not isinstance(data, dict):
                raise DataError(f"labels file {json_file} must hold a JSON object {{\"<id>\": [names], ...}}")
            out: dict[str, Any] = {}
            for key, names in data.items():
                ident = _strip_image_ext(str(key))
                if ident in out:
                    raise DataError(f"labels file {json_file} lists image {ident!r} twice")
                out[ident] = names
            return json_file, out
        if csv_file.is_file():
            return csv_file, FolderDataset._read_csv(csv_file)
        raise DataError(f"no labels file in {root}: expected labels.json or labels.csv")

    @staticmethod
    def _read_csv(path: Path) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read labels file {path}: {exc}") from exc
        if not rows:
            raise DataError(f"labels file {path} is empty (expected a header 'image,labels')")
        header = [h.strip().lower() for h in rows[0]]
        if "image" not in header or "labels" not in header:
            raise DataError(
                f"labels file {path} needs the header 'image,labels', found {','.join(rows[0])!r}"
            )
        ci, cl = header.index("image"), header.index("labels")
        out: dict[str, Any] = {}
        for n, row in enumerate(rows[1:], start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= ci:
                raise DataError(f"labels file {path}, line {n}: no image column")
            ident = _strip_image_ext(row[ci].strip())
            names = row[cl] if len(row) > cl else ""
            if ident in out:
                raise DataError(f"labels file {path} lists image {ident!r} twice (line {n})")
            out[ident] = [s for s in names.split(";") if s.strip()]
        return out

    def image_path(self, i: int) -> Path:
        ident = self.ids[self._index(i)]
        name = self._files.get(ident)
        if name is None:
            exts = "|".join(e[1:] for e in IMAGE_EXTENSIONS)
            raise DataError(f"image not found: {self.image_dir / ident}.<{exts}>")
        return self.image_dir / name

    def gt_path(self, i: int) -> Path | None:
        if not self.has_gt:
            return None
        return self.gt_dir / f"{self.ids[self._index(i)]}.png"

    def _label_ids(self, i: int) -> Iterable[int]:
        return self._fg[self.ids[i]]


# ===================================================================== helpers
_KINDS: dict[str, type[SegDataset]] = {"voc": VOCDataset, "coco": COCODataset, "coco91": COCO91Dataset,
                                       "folder": FolderDataset}


def detect_kind(root: str | Path) -> str:
    """Guess the layout of a dataset folder: "folder", "voc" or "coco"."""
    root = Path(root)
    if (root / "classes.txt").is_file():
        return "folder"
    if any((c / "JPEGImages").is_dir() for c in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")):
        return "voc"
    if (root / "ImageSets").is_dir() and any(root.glob("labels_*.json")):
        return "coco"
    raise DataError(
        f"cannot tell the dataset layout of {root}: expected classes.txt (folder layout), JPEGImages/ (VOC) "
        f"or ImageSets/<split>.txt + labels_<split>.json (COCO after prepare_coco)"
    )


class ConcatSegDataset(SegDataset):
    """Several splits of one dataset one after the other, repeated images kept (``split="train+train_aug"``:
    the release's VOC training set, 1,464 + 10,582 = 12,046 samples, the ``train`` images twice).

    Items are read through the part that holds them (its image, mask and labels); seeds come from the
    parts' common seed folder and the transform is applied here.
    """

    def __init__(self, parts: Sequence[SegDataset], transform: Transform | None = None) -> None:
        if not parts:
            raise DataError("ConcatSegDataset needs at least one dataset")
        first = parts[0]
        for part in parts[1:]:
            if list(part.classes) != list(first.classes):
                raise DataError(f"cannot concatenate datasets with different classes ({part!r}, {first!r})")
        self.parts = list(parts)
        self.kind = first.kind
        self.split = "+".join(str(getattr(p, "split", "?")) for p in parts)
        self._where = [(k, j) for k, part in enumerate(parts) for j in range(len(part))]
        super().__init__(first.classes, [i for part in parts for i in part.ids], seed_dir=first.seed_dir,
                         transform=transform, has_gt=all(p.has_gt for p in parts), labels_from_gt=False)
        for part in parts:
            self._notes.extend(part._notes)

    def _part(self, i: int) -> tuple[SegDataset, int]:
        k, j = self._where[self._index(i)]
        return self.parts[k], j

    def image_path(self, i: int) -> Path:
        part, j = self._part(i)
        return part.image_path(j)

    def gt_path(self, i: int) -> Path | None:
        part, j = self._part(i)
        return part.gt_path(j)

    def _labels_vector(self, i: int, gt: np.ndarray | None = None) -> np.ndarray:
        part, j = self._part(i)
        return part._labels_vector(j, gt)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, splits={self.split})"


def build_dataset(kind_or_root: str | Path, root: str | Path | None = None, **kwargs: Any) -> SegDataset:
    """``build_dataset("voc", root, split=...)``, ``"coco"``, ``"folder"``, or ``build_dataset(root)``.

    With a path alone the layout is detected (:func:`detect_kind`). Keyword arguments go to the
    dataset's constructor; those set to None are dropped so each dataset's default applies, and one the
    dataset does not take raises DataError. A ``split`` of the form ``"a+b"`` concatenates the splits
    (:class:`ConcatSegDataset`).
    """
    split = kwargs.get("split")
    if isinstance(split, str) and "+" in split:
        names = [s.strip() for s in split.split("+")]
        if not all(names):
            raise DataError(f"bad split {split!r}: expected names joined by '+', e.g. train+train_aug")
        transform = kwargs.pop("transform", None)
        parts = [build_dataset(kind_or_root, root, **{**kwargs, "split": name}) for name in names]
        return ConcatSegDataset(parts, transform=transform)
    key = str(kind_or_root).lower()
    if key in _KINDS:
        if root is None:
            raise DataError(f"build_dataset({key!r}) needs the dataset root folder")
        kind = key
    else:
        if root is not None:
            raise DataError(f"unknown dataset kind {kind_or_root!r}: expected voc, coco, coco91 or folder")
        root = Path(kind_or_root)
        if not root.exists():
            raise DataError(f"dataset folder not found: {root}")
        kind = detect_kind(root)
    cls = _KINDS[kind]
    options = {k: v for k, v in kwargs.items() if v is not None}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"option(s) {', '.join(unknown)} do not apply to {kind} datasets")
    return cls(root, **options)


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if value.dtype.kind not in "biufc":
        return None
    arr = np.ascontiguousarray(value)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _collate_values(values: list[Any]) -> Any:
    if all(isinstance(v, (np.ndarray, torch.Tensor)) for v in values):
        tensors = [_as_tensor(v) for v in values]
        if any(t is None for t in tensors):
            return list(values)
        first = tensors[0]
        if all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
            return torch.stack(tensors)
        return tensors
    if all(isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)) for v in values):
        return torch.as_tensor(values)
    return list(values)


def collate_samples(batch: Sequence[Sample]) -> dict[str, Any]:
    """Batch sample dicts for a DataLoader.

    Arrays and tensors of one shape and dtype are stacked into a tensor (numpy arrays become tensors);
    of different shapes they come back as a list of tensors; numbers become a tensor; anything else
    (ids, strings) a list. A key must be in every sample or in none (DataError otherwise).
    """
    if not batch:
        return {}
    keys: list[str] = []
    for sample in batch:
        for k in sample:
            if k not in keys:
                keys.append(k)
    out: dict[str, Any] = {}
    for k in keys:
        have = [s for s in batch if k in s]
        if len(have) != len(batch):
            lacking = [str(s.get("id", "?")) for s in batch if k not in s]
            raise DataError(
                f"cannot batch samples: key {k!r} is in {len(have)} of {len(batch)} samples "
                f"(missing for ids {_listing(lacking)})"
            )
        out[k] = _collate_values([s[k] for s in batch])
    return out
