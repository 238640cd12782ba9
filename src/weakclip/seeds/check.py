"""Validate a seed folder (built-in or from another CAM method) against a dataset.

Checks per image id of the dataset: the image decodes (whole: a truncated JPEG is found), the seed
``<id>.png`` exists and decodes as a label map, has the image's size, holds only class ids (< K) or 255,
and shows no class outside the image's labels. The ground-truth masks the dataset has (the files that exist;
none with ``with_gt=False``) are read as every stage reads them: of the image's size, class ids or 255, not
colour-coded. A size error names the file that differs and the image it was compared with.
Labelled classes that a seed does not show are counted too (a note, not an error: CAMs often miss
small objects). Coverage statistics: the share of labelled (non-255) pixels overall, of background,
of each class, and per class the share of its images in which the seed shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.datasets import require_images
from weakclip.data.io import read_image, read_label_png
from weakclip.errors import DataError

__all__ = ["SeedReport", "check_seeds"]

_SHOW = 5


@dataclass
class SeedReport:
    """What :func:`check_seeds` found. Lists hold ``(id, message)`` pairs."""

    seed_dir: str
    classes: list[str]
    images: int = 0
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    wrong_size: list[tuple[str, str]] = field(default_factory=list)
    bad_values: list[tuple[str, str]] = field(default_factory=list)
    extra_classes: list[tuple[str, str]] = field(default_factory=list)
    image_problems: list[tuple[str, str]] = field(default_factory=list)
    gt_problems: list[tuple[str, str]] = field(default_factory=list)
    missed_labels: int = 0
    images_missing_a_label: int = 0
    extra_files: int = 0
    total_pixels: int = 0
    labelled_pixels: int = 0
    class_pixels: list[int] = field(default_factory=list)
    class_images: list[int] = field(default_factory=list)
    class_shown: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no seed is missing, unreadable, of the wrong size, out of range or off-label, and no
        image or ground-truth mask has a problem."""
        return not (self.missing or self.unreadable or self.wrong_size or self.bad_values
                    or self.extra_classes or self.image_problems or self.gt_problems)

    @property
    def coverage(self) -> float:
        """Share of seed pixels that are labelled (class or background, not 255)."""
        return self.labelled_pixels / self.total_pixels if self.total_pixels else float("nan")

    def class_coverage(self) -> dict[str, float]:
        """Share of all seed pixels given to each class (background included)."""
        t = self.total_pixels
        return {c: (n / t if t else float("nan")) for c, n in zip(self.classes, self.class_pixels)}

    def problems(self) -> list[str]:
        out = [f"{i}: seed missing" for i in self.missing]
        kinds = (self.unreadable, self.wrong_size, self.bad_values, self.extra_classes, self.image_problems,
                 self.gt_problems)
        for kind in kinds:
            out.extend(f"{i}: {m}" for i, m in kind)
        return out

    def to_dict(self) -> dict:
        return {
            "seed_dir": self.seed_dir, "ok": self.ok, "images": self.images, "checked": self.checked,
            "missing": self.missing, "unreadable": dict(self.unreadable), "wrong_size": dict(self.wrong_size),
            "bad_values": dict(self.bad_values), "extra_classes": dict(self.extra_classes),
            "image_problems": dict(self.image_problems), "gt_problems": dict(self.gt_problems),
            "missed_labels": self.missed_labels,
            "images_missing_a_label": self.images_missing_a_label, "extra_files": self.extra_files,
            "coverage": self.coverage, "class_coverage": self.class_coverage(),
            "class_images": dict(zip(self.classes, self.class_images)),
            "class_shown": dict(zip(self.classes, self.class_shown)),
        }

    def format(self) -> str:
        lines = [f"seed folder {self.seed_dir}: {self.images} images, {self.checked} seeds read"]
        for name, items in (("missing", self.missing), ("unreadable", self.unreadable),
                            ("wrong size", self.wrong_size), ("values out of range", self.bad_values),
                            ("classes not among the image labels", self.extra_classes),
                            ("image problems", self.image_problems),
                            ("ground-truth masks", self.gt_problems)):
            if items:
                lines.append(f"  {name}: {len(items)}")
                for item in items[:_SHOW]:
                    lines.append(f"    {item}" if isinstance(item, str) else f"    {item[0]}: {item[1]}")
                if len(items) > _SHOW:
                    lines.append(f"    ... ({len(items) - _SHOW} more)")
        if self.missed_labels:
            lines.append(f"  note: {self.missed_labels} labelled classes in {self.images_missing_a_label} "
                         "images have no seed pixel")
        if self.extra_files:
            lines.append(f"  note: {self.extra_files} PNGs in the folder belong to no image of the dataset")
        width = max([len(c) for c in self.classes] + [7])
        lines.append(f"coverage (labelled pixels): {100 * self.coverage:.2f}%")
        lines.append(f"{'class':<{width}}  {'pixels%':>8}  {'images':>7}  {'shown':>7}")
        for c, share, n_img, shown in zip(self.classes, self.class_coverage().values(), self.class_images,
                                          self.class_shown):
            lines.append(f"{c:<{width}}  {100 * share:8.2f}  {n_img:7d}  {shown:7d}")
        lines.append("OK" if self.ok else f"{len(self.problems())} problems")
        return "\n".join(lines)


def _check_gt(dataset, i: int, rep: SeedReport) -> None:
    """Read item ``i``'s ground-truth mask, when the dataset has one on disk, as the stages read it (its
    image's size, class ids, no colour PNG); a problem goes to ``rep.gt_problems``."""
    if not getattr(dataset, "has_gt", False):
        return
    try:
        path = dataset.gt_path(i)
    except DataError:
        return
    if path is None or not Path(path).is_file():
        return  # a mask it does not have: nothing to check
    try:
        dataset.read_gt(i)
    except DataError as exc:
        rep.gt_problems.append((dataset.ids[i], str(exc)))


def check_seeds(seed_dir: str | Path, dataset, *, progress: bool = False) -> SeedReport:
    """Check the seed folder ``seed_dir`` against every image of ``dataset`` (module docstring)."""
    seed_dir = Path(seed_dir)
    if not seed_dir.is_dir():
        raise DataError(f"seed folder not found: {seed_dir}")
    require_images(dataset, "seeds check")
    classes = list(dataset.classes)
    k = len(classes)
    rep = SeedReport(str(seed_dir), classes, images=len(dataset), class_pixels=[0] * k,
                     class_images=[0] * k, class_shown=[0] * k)
    ids = set(dataset.ids)
    rep.extra_files = sum(1 for p in seed_dir.glob("*.png") if p.stem not in ids)
    for i, ident in enumerate(tqdm(dataset.ids, desc="check seeds", disable=not progress, unit="img")):
        _check_gt(dataset, i, rep)
        path = seed_dir / f"{ident}.png"
        if not path.is_file():
            rep.missing.append(ident)
            continue
        try:
            seed = read_label_png(path, what="seed")
        except DataError as exc:
            rep.unreadable.append((ident, str(exc)))
            continue
        rep.checked += 1
        try:
            read_image(dataset.image_path(i))  # decoded whole: a truncated or corrupt image shows here
            fits = dataset.label_fits(i, seed.shape)
            labels = dataset.get_labels(i)
        except DataError as exc:
            if (ident, str(exc)) not in rep.gt_problems:  # labels read from that mask: listed once
                rep.image_problems.append((ident, str(exc)))
            continue
        if not fits:
            hw = dataset.image_hw(i)
            size = (f"seed {path} is {seed.shape[1]}x{seed.shape[0]} but its image {dataset.image_path(i)} "
                    f"is {hw[1]}x{hw[0]} (width x height)")
            rep.wrong_size.append((ident, size))
            continue
        counts = np.bincount(seed.ravel(), minlength=256)
        bad = [v for v in np.nonzero(counts)[0].tolist() if v >= k and v != IGNORE_INDEX]
        if bad:
            rep.bad_values.append((ident, f"values {bad[:10]} outside the class ids 0..{k - 1} and 255"))
            continue
        present = [c for c in np.nonzero(counts[:k])[0].tolist()]
        extra = [c for c in present if labels[c] <= 0.5]
        if extra:
            rep.extra_classes.append((ident, "seed shows " + ", ".join(classes[c] for c in extra)
                                      + " not among the image labels"))
        labelled = [c for c in range(k) if labels[c] > 0.5]
        missed = [c for c in labelled if c != 0 and counts[c] == 0]
        rep.missed_labels += len(missed)
        rep.images_missing_a_label += bool(missed)
        rep.total_pixels += int(seed.size)
        rep.labelled_pixels += int(seed.size - counts[IGNORE_INDEX])
        for c in range(k):
            rep.class_pixels[c] += int(counts[c])
        for c in labelled:
            rep.class_images[c] += 1
        for c in present:
            rep.class_shown[c] += 1
    return rep
