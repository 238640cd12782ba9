"""The folder layout (``FolderDataset``): your own images and tags, and what the synthetic data generator
writes::

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
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from weakclip.data.base import SegDataset
from weakclip.data.classes import (
    read_class_file,
)
from weakclip.data.id_lists import is_path_like, listing, read_id_list, strip_image_ext
from weakclip.data.io import IMAGE_EXTENSIONS, read_json
from weakclip.data.label_names import resolve_labels
from weakclip.data.sample import Transform
from weakclip.errors import DataError

__all__ = ["DEFAULT_SPLITS", "FolderDataset", "default_split", "split_choice_line"]


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
        self._fg = resolve_labels(raw, raw, classes, self.labels_file, str(self.class_file))
        self.split = None if split is None else str(split)
        dups: list[str] = []
        if split is None:
            self.list_file = None
            ids = list(raw)
        else:
            self.list_file = Path(split) if is_path_like(split) else self.root / "splits" / f"{split}.txt"
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
                    f"{listing(missing)}"
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
            self._notes.append(f"id list {self.list_file} repeats ids {listing(dups)} (each used once)")
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
                ident = strip_image_ext(str(key))
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
            ident = strip_image_ext(row[ci].strip())
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


#: The split a folder dataset is read in by default for each purpose, when its list exists.
DEFAULT_SPLITS: dict[str, str] = {"training": "train", "val": "val"}


def split_choice_line(what: str, split: str | None, purpose: str = "training") -> str:
    """What a command says about the split it took of a folder dataset (:func:`default_split`;
    ``purpose``: training or val)."""
    if split:
        which = f"{split!r} (splits/{split}.txt)"
    elif purpose == "val":
        which = "none (no splits/val.txt), so no evaluation"
    else:
        which = "every labelled image (no splits/train.txt)"
    flag = "--val-split" if purpose == "val" else "--split"
    return f"folder dataset, {what} {which}; {flag} picks another"


def default_split(root: str | Path, purpose: str) -> str | None:
    """The split of the folder dataset at ``root`` a command takes by default for ``purpose`` (``"training"``:
    seeds, refinement, pseudo masks, retraining; ``"val"``: evaluation): ``splits/train.txt`` /
    ``splits/val.txt`` when the folder has it, else None (every labelled image; for ``"val"`` too, which the
    caller then refuses or skips)."""
    name = DEFAULT_SPLITS[purpose]
    return name if (Path(root) / "splits" / f"{name}.txt").is_file() else None
