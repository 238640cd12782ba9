"""Class lists of the supported datasets, readable prompt names, and the VOC colour palette.

Index 0 is always ``background``. Dataset names (``VOC_CLASSES``) are the strings the datasets use;
prompt names (``VOC_PROMPT_NAMES``) are the readable forms fed to the CLIP text tower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weakclip.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

VOC_PROMPT_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
)

# The 80 COCO "thing" categories in the order of their category ids.
COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_PROMPT_NAMES: tuple[str, ...] = COCO_CLASSES

# COCO category id (1..90, with gaps) of each of the 80 classes, in the order of COCO_CLASSES[1:].
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

# The 10 COCO category ids (1..90) that have no annotations in COCO 2014/2017, with their names from the
# COCO paper's 91-category list.
COCO_UNANNOTATED: dict[int, str] = {
    12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror", 68: "window",
    69: "desk", 71: "door", 83: "blender",
}


def _coco91_classes() -> tuple[str, ...]:
    names = dict(zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:]))
    names.update(COCO_UNANNOTATED)
    return ("background", *(names[i] for i in range(1, 91)))


# The release's COCO label space: label value = COCO category id (0 background, 1..90), 91 classes, the ids
# without annotations included (the release's ``weakclip/coco.py``).
COCO91_CLASSES: tuple[str, ...] = _coco91_classes()
# Lookup tables between the 81 contiguous classes and the 91 category ids (255 stays 255).
COCO81_TO_91 = np.full(256, 255, dtype=np.uint8)
COCO81_TO_91[0] = 0
COCO81_TO_91[1:81] = COCO_CATEGORY_IDS
COCO91_TO_81 = np.full(256, 255, dtype=np.uint8)
COCO91_TO_81[0] = 0
COCO91_TO_81[list(COCO_CATEGORY_IDS)] = np.arange(1, 81)


def coco_to_91(mask: np.ndarray) -> np.ndarray:
    """An 81-class COCO label mask (0..80, 255) in the release's 91-id space (0..90, 255)."""
    return COCO81_TO_91[np.asarray(mask, dtype=np.uint8)]


def coco_to_81(mask: np.ndarray) -> np.ndarray:
    """A 91-id COCO label mask in the 81 contiguous classes; the 10 ids without annotations become 255."""
    return COCO91_TO_81[np.asarray(mask, dtype=np.uint8)]


IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: an ``(n, 3)`` uint8 array, class ``i`` -> RGB colour."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def read_class_file(path: str | Path) -> list[str]:
    """Read a class list: one name per line, blank lines and ``#`` comments skipped.

    The first name must be ``background`` (index 0), as in every WSSS dataset here.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class list not found: {path}")
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"class list is empty: {path}")
    return check_class_names(names, f"class list {path}")


def resolve_classes(spec: str | Path) -> list[str]:
    """``"voc"``, ``"coco"``, ``"coco91"`` or the path of a class-list file -> the list of class names."""
    if str(spec).lower() == "voc":
        return list(VOC_CLASSES)
    if str(spec).lower() == "coco":
        return list(COCO_CLASSES)
    if str(spec).lower() == "coco91":
        return list(COCO91_CLASSES)
    return read_class_file(spec)


def prompt_names(classes: list[str] | tuple[str, ...]) -> list[str]:
    """Readable prompt names for a class list (VOC's run-together names are split)."""
    readable = dict(zip(VOC_CLASSES, VOC_PROMPT_NAMES))
    return [readable.get(c, c.replace("_", " ")) for c in classes]


# ---------------------------------------------------------------------- classes stored with a network
def check_class_names(names, source: str) -> list[str]:
    """``names`` (a sequence of strings) as a class list, checked as :func:`read_class_file` checks a file:
    not empty, ``background`` first, no duplicate, at most 255; one-line DataError naming ``source``."""
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{source}: expected a list of class names (strings)")
    names = [n.strip() for n in names]
    if not names or not all(names):
        raise DataError(f"{source}: empty class list or empty class name")
    if names[0].lower() != "background":
        raise DataError(f"{source}: the first class must be 'background', found {names[0]!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{source}: duplicate class names {dupes}")
    if len(names) > 255:
        raise DataError(f"{source}: {len(names)} classes; at most 255 fit in a PNG label map")
    return names


def class_record(classes) -> dict:
    """What a checkpoint (and a work folder's record) stores about the classes a network was trained with,
    so that it loads anywhere without its dataset: ``{"classes": K names, "palette": K [r, g, b] lists}``
    (the VOC colours every mask of this package is written in)."""
    names = [str(c) for c in classes]
    return {"classes": names, "palette": voc_palette(max(256, len(names)))[:len(names)].astype(int).tolist()}


def stored_classes(record, source: str) -> list[str] | None:
    """The class names a checkpoint or record stores (:func:`class_record`); None when it stores none
    (written before checkpoints stored them); one-line DataError when they are not a class list."""
    names = record.get("classes") if hasattr(record, "get") else None
    if names is None:
        return None
    return check_class_names(list(names) if isinstance(names, (list, tuple)) else names,
                             f"the class names stored in {source}")


def stored_palette(record, count: int) -> np.ndarray | None:
    """The ``count x 3`` uint8 palette a checkpoint or record stores, or None when it stores none that
    fits ``count`` classes."""
    rows = record.get("palette") if hasattr(record, "get") else None
    try:
        palette = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError):
        return None
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < count or palette.min(initial=0) < 0 \
            or palette.max(initial=0) > 255:
        return None
    return palette[:count].astype(np.uint8)


def given_classes(spec) -> list[str] | None:
    """Class names a user gives for a network (``--classes`` / ``weakclip.load(classes=...)``): None passes
    through; a path (str or Path) is a class-list file (one name per line, ``background`` first) or ``voc`` /
    ``coco`` / ``coco91``; a list or tuple of names is taken as it is. Checked in one line."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        return resolve_classes(spec)
    if isinstance(spec, (list, tuple)):
        return check_class_names(list(spec), "classes")
    raise DataError(f"classes: expected a class-list file or a list of names, got {type(spec).__name__}")
