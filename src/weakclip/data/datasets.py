"""Which dataset a name or a folder means: :func:`build_dataset` and :func:`detect_kind`.

Every dataset yields the sample dict of :mod:`weakclip.data.base`. Each layout lives in its own module,
whose docstring describes its files, and is re-exported here:

* ``voc``: :class:`~weakclip.data.voc.VOCDataset`, PASCAL VOC 2012 (``VOCdevkit/VOC2012``, SBD masks,
  cls_labels files);
* ``coco`` / ``coco91``: :class:`~weakclip.data.coco_dataset.COCODataset` /
  :class:`~weakclip.data.coco_dataset.COCO91Dataset`, COCO 2014 after
  :func:`weakclip.data.coco.prepare_coco`, in 81 classes or the release's 91 ids;
* ``folder``: :class:`~weakclip.data.folder.FolderDataset`, your own images and tags
  (``classes.txt``, ``images/``, ``labels.json`` or ``labels.csv``), what the synthetic generator writes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from weakclip.data.base import ConcatSegDataset, SegDataset
from weakclip.data.coco import prepare_coco
from weakclip.data.coco_dataset import COCO91Dataset, COCODataset
from weakclip.data.collate import collate_samples
from weakclip.data.folder import FolderDataset
from weakclip.data.id_lists import read_id_list
from weakclip.data.voc import VOCDataset, load_cls_labels
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
    "require_images",
]


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


def _constructor_options(cls: type) -> set[str]:
    """The keyword options a dataset class takes, those its ``__init__`` passes on through ``**kwargs`` to a
    base class included (``COCO91Dataset`` takes ``COCODataset``'s)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self", "root"}


def build_dataset(kind_or_root: str | Path, root: str | Path | None = None, **kwargs: Any) -> SegDataset:
    """``build_dataset("voc", root, split=...)``, ``"coco"``, ``"folder"``, or ``build_dataset(root)``.

    With a path alone the layout is detected (:func:`detect_kind`). Keyword arguments go to the
    dataset's constructor; those set to None are dropped so each dataset's default applies, and one the
    dataset does not take raises DataError. A ``split`` of the form ``"a+b"`` concatenates the splits
    (:class:`ConcatSegDataset`). ``image_reader`` / ``image_orientation`` (None: the defaults) set how
    images are read (:meth:`SegDataset.set_image_reading`).
    """
    reader = kwargs.pop("image_reader", None)
    orientation = kwargs.pop("image_orientation", None)
    if reader is not None or orientation is not None:
        dataset = build_dataset(kind_or_root, root, **kwargs)
        return dataset.set_image_reading(reader or dataset.image_reader,
                                         orientation or dataset.image_orientation)
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
    accepted = _constructor_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"option(s) {', '.join(unknown)} do not apply to {kind} datasets")
    return cls(root, **options)


def require_images(dataset, what: str) -> None:
    """DataError, before any work, when ``dataset`` holds no image (an empty split file, a folder dataset
    without labelled images): a stage over zero images would finish at once and look done."""
    if len(dataset) > 0:
        return
    parts = getattr(dataset, "parts", None) or [dataset]
    files = [str(p.list_file) for p in parts if getattr(p, "list_file", None) is not None]
    source = f" (the split file {', '.join(files)} lists none)" if files else ""
    split, root = getattr(dataset, "split", None), getattr(dataset, "root", "?")
    where = f"split {split!r} of {root}" if split else f"{root}"
    raise DataError(f"{what}: no images in the {where}{source}: fix the split file or choose another split "
                    "(--split)")
