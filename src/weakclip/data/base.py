"""Datasets of images with image-level labels, optional seeds and optional ground-truth masks.

Every dataset yields a sample dict::

    "id"      str                           the image id (file stem)
    "image"   H x W x 3 uint8 RGB array     (read_image(i): the dataset's reader and orientation rule)
    "labels"  float32 multi-hot, length K   K = number of classes including background; [0] is always 1
    "seed"    H x W uint8                   class id or 255 (only when the dataset has seeds)
    "gt"      H x W uint8                   class id or 255 (only when the dataset has ground truth)

and then applies ``transform(sample) -> sample`` when one is given. Whether samples carry "seed" and
"gt" is decided per dataset (``has_seeds``, ``has_gt``), never per item, so batches stay uniform: a
dataset with seeds or ground truth needs them for every id and raises DataError naming the id if one is
missing. Seeds come from ``seed_dir`` (``<seed_dir>/<id>.png``, the PNG folder of any CAM method) for
every dataset type.

How images are read is set per dataset (:meth:`SegDataset.set_image_reading`, default: Pillow, orientation
"auto" = upright for folder datasets, stored pixels for VOC and COCO; each stage sets its reference's
reader); masks and seeds are fitted to the image's grid as read (:func:`weakclip.data.io.fit_label_to_image`).

Problems with a single item (missing or corrupt image, mask of the wrong size, value out of range, missing
seed) raise DataError when the item is read; ``validate()`` scans every item and returns all of them as a
list of one-line messages. Problems with the dataset as a whole (missing folders or lists, unknown class
names, a cls_labels file lacking ids) raise DataError in the constructor.

This module holds the base class every layout derives from (:class:`SegDataset`) and the concatenation
of splits (:class:`ConcatSegDataset`); it re-exports the sample types (:mod:`weakclip.data.sample`), the
batch collation (:mod:`weakclip.data.collate`) and the helpers the layouts share: id lists
(:mod:`weakclip.data.id_lists`) and class names to ids (:mod:`weakclip.data.label_names`). The layouts
themselves: :mod:`weakclip.data.voc`, :mod:`weakclip.data.coco_dataset`, :mod:`weakclip.data.folder`;
:func:`weakclip.data.datasets.build_dataset` picks one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from weakclip.data.classes import (
    IGNORE_INDEX,
)
from weakclip.data.collate import _as_tensor as _as_tensor
from weakclip.data.collate import _collate_values as _collate_values
from weakclip.data.collate import collate_samples
from weakclip.data.id_lists import _LIST_MAX as _LIST_MAX
from weakclip.data.id_lists import is_path_like as is_path_like
from weakclip.data.id_lists import listing as listing
from weakclip.data.id_lists import read_id_list
from weakclip.data.id_lists import strip_image_ext as strip_image_ext
from weakclip.data.io import (
    fit_label_to_image,
    image_geometry,
    read_image,
    read_label_png,
    resolve_orientation,
)
from weakclip.data.label_names import names_to_ids as names_to_ids
from weakclip.data.label_names import resolve_labels as resolve_labels
from weakclip.data.sample import Sample, Transform
from weakclip.errors import DataError

__all__ = ["ConcatSegDataset", "Sample", "SegDataset", "Transform", "collate_samples", "read_id_list"]


class SegDataset(Dataset):
    """Base of the datasets: ids, classes, labels, optional seeds and ground truth (module docstring).

    Subclasses set ``classes``, ``ids``, ``has_gt`` and implement :meth:`image_path`, :meth:`gt_path`
    and :meth:`_label_ids` (image labels from their own source, or from the ground-truth mask when
    ``_labels_from_gt`` is true).
    """

    kind = "base"
    image_reader = "pil"  # set_image_reading()
    image_orientation = "auto"

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
    def set_image_reading(self, reader: str = "pil", orientation: str = "auto") -> SegDataset:
        """How :meth:`read_image` (and every sample) reads images: ``reader`` ``"pil"`` or ``"opencv"``,
        ``orientation`` ``"ignore"``, ``"exif"`` or ``"auto"`` (:func:`weakclip.data.io.resolve_orientation`:
        upright for folder datasets; for VOC/COCO what the reader's library does by default). Returns self."""
        try:
            resolve_orientation(orientation, reader, self.kind)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.image_reader = reader
        self.image_orientation = orientation
        return self

    @property
    def orientation(self) -> str:
        """``"ignore"`` or ``"exif"``: whether this dataset's images are turned upright when read."""
        return resolve_orientation(self.image_orientation, self.image_reader, self.kind)

    def read_image(self, i: int) -> np.ndarray:
        """The image of item ``i`` (``H x W x 3`` uint8 RGB) as this dataset reads images."""
        return read_image(self.image_path(self._index(i)), self.image_reader, self.orientation)

    def image_hw(self, i: int) -> tuple[int, int]:
        """``(height, width)`` of item ``i``'s image as read here, from its header (sides swapped when the
        image is read upright and its EXIF orientation is 5-8)."""
        g = image_geometry(self.image_path(self._index(i)))
        return g.upright_hw if self.orientation == "exif" else g.stored_hw

    def label_fits(self, i: int, shape: Sequence[int]) -> bool:
        """Whether a label map of ``shape`` (H, W, ...) belongs to item ``i``'s image: the image's size as
        read, or, for an image read upright, its stored size (:meth:`fit_label` turns such maps)."""
        g = image_geometry(self.image_path(self._index(i)))
        hw = (int(shape[0]), int(shape[1]))
        if self.orientation == "exif":
            return hw in (g.upright_hw, g.stored_hw)
        return hw == g.stored_hw

    def fit_label(self, i: int, label: np.ndarray, path: Path, what: str = "mask",
                  expected_hw: tuple[int, int] | None = None, reference: str | None = None) -> np.ndarray:
        """A label map of item ``i`` on its image's grid as read here (turned with an upright image when
        it has the stored size; see :func:`weakclip.data.io.fit_label_to_image`), checked against
        ``expected_hw``: by default the size of its image as read here (from the file's header; no check
        when the image cannot be read: its own error is reported where it is read). ``reference`` names
        what ``expected_hw`` is the size of when it is not the image (e.g. ``"its ground-truth mask
        PATH"``): a size error names the label map that differs and the file it was compared with."""
        try:
            image_path = self.image_path(self._index(i))
        except DataError:  # a missing image is reported where it is read
            image_path = None
        if expected_hw is None and image_path is not None and reference is None:
            try:
                geometry = image_geometry(image_path)
            except DataError:
                geometry = None
            if geometry is not None:
                expected_hw = geometry.upright_hw if self.orientation == "exif" else geometry.stored_hw
        return fit_label_to_image(label, path, image_path, self.orientation, expected_hw=expected_hw,
                                  what=what, reference=reference)

    def read_gt(self, i: int, expected_hw: tuple[int, int] | None = None,
                reference: str | None = None) -> np.ndarray:
        """The ground-truth mask of item ``i`` (checked against ``num_classes`` and ``expected_hw``, by
        default its image's size, on the image's grid as read: :meth:`fit_label`)."""
        i = self._index(i)
        path = self.gt_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no ground-truth masks (image {self.ids[i]!r})")
        mask = read_label_png(path, num_classes=self.num_classes, what="mask")
        return self.fit_label(i, mask, path, "mask", expected_hw, reference)

    def read_seed(self, i: int, expected_hw: tuple[int, int] | None = None,
                  reference: str | None = None) -> np.ndarray:
        """The seed of item ``i`` (checked as :meth:`read_gt`); DataError naming the id when the seed folder
        lacks it."""
        i = self._index(i)
        path = self.seed_path(i)
        if path is None:
            raise DataError(f"{type(self).__name__} has no seed folder (image {self.ids[i]!r})")
        if not path.is_file():
            raise DataError(f"seed for image {self.ids[i]!r} not found: {path}")
        seed = read_label_png(path, num_classes=self.num_classes, what="seed")
        return self.fit_label(i, seed, path, "seed", expected_hw, reference)

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
        image = self.read_image(i)
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
            hw = self.read_image(i).shape[:2]
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

    def set_image_reading(self, reader: str = "pil", orientation: str = "auto") -> ConcatSegDataset:
        for part in self.parts:
            part.set_image_reading(reader, orientation)
        super().set_image_reading(reader, orientation)
        return self

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
