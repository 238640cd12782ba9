"""Reading images and label maps, writing label PNGs and JSON files atomically.

Conventions used by every function here:

* Images come back as ``H x W x 3`` ``uint8`` RGB arrays. Greyscale, palette, RGBA (alpha dropped),
  CMYK and 16-bit greyscale files are converted. The EXIF orientation tag is deliberately NOT applied:
  the masks of VOC and COCO (and the seeds and pseudo masks made from them) are aligned with the stored
  pixel grid, so rotating the image would misalign it with its masks.
* Label maps (ground truth, seeds, pseudo masks) are single-channel PNGs holding class ids, with
  255 = ignore. Palette ('P') PNGs are read as their indices, never as colours.
* Sizes in messages are written ``width x height`` like image viewers do (VOC images are 500x375).
* Every bad-input problem raises :class:`~weakclip.errors.DataError` with a one-line message naming the
  file.
* Writes are atomic: the data goes to a hidden temporary file in the destination folder
  (``.<name>.<random>.tmp``) which is then renamed over the destination, so a killed process never
  leaves a half-written file under the final name (a resumable job may trust any file it finds).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from weakclip.data.classes import IGNORE_INDEX, voc_palette
from weakclip.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_image",
    "read_json",
    "read_label_png",
    "write_json_atomic",
    "write_label_png",
    "write_text_atomic",
]

# File name extensions recognised as images (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_MAX_LISTED = 10  # how many offending values a message lists before "..."


def _reason(exc: BaseException) -> str:
    """A one-line description of an exception."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _decode(path: Path, what: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open ``path``, decode every pixel (so truncated files fail here) and ``convert`` the image."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return convert(im)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors ...
        raise DataError(f"cannot read {what} {path}: {_reason(exc)}") from exc


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` ``uint8`` RGB array.

    The whole file is decoded, so a truncated JPEG or PNG raises instead of coming back half grey
    (unless some other code set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, which this function refuses
    to override globally). The EXIF orientation is not applied (see the module docstring).

    Raises:
        DataError: ``image not found: P`` or ``cannot read image P: <reason>``.
    """
    path = Path(path)
    arr = _decode(path, "image", _to_rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"cannot read image {path}: unexpected decoded shape {arr.shape}")
    return arr


def _owned(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous, writeable array (``np.asarray(pil_image)`` is a read-only view of a bytes copy)."""
    if arr.flags.writeable and arr.flags.c_contiguous:
        return arr
    return np.array(arr, order="C", copy=True)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return _owned(np.asarray(im, dtype=np.uint8))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: scale to 8 bits instead of letting PIL clip at 255.
        a = np.asarray(im).astype(np.float64)
        if mode == "F":
            top = 1.0 if a.size and float(np.nanmax(a)) <= 1.0 else 255.0
        else:
            top = 65535.0 if a.size and float(a.max()) > 255 else 255.0
        g = np.clip(np.rint(np.nan_to_num(a) * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's warning about palette transparency; alpha dropped below
    return _owned(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _fmt_values(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(values) > _MAX_LISTED else ''}]"


def _label_array(im: Image.Image, path: Path, what: str) -> np.ndarray:
    """The class ids of a decoded label image (see :func:`read_label_png` for what is accepted)."""
    if im.format == "JPEG":
        raise DataError(
            f"{what} {path} is a JPEG; label maps must be lossless PNGs of class ids (JPEG compression "
            f"changes the values)"
        )
    mode = im.mode
    if mode in ("P", "L"):
        arr = np.asarray(im, dtype=np.uint8)
    elif mode == "1":
        arr = np.asarray(im).astype(np.uint8)
    elif mode in ("PA", "LA"):
        arr = np.asarray(im.getchannel(0), dtype=np.uint8)
    elif mode.startswith("I"):
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 255):
            raise DataError(
                f"{what} {path} is a {mode} image with values up to {int(wide.max())}; label maps need "
                f"class ids 0..254 and 255 = ignore in an 8-bit indexed or greyscale PNG"
            )
        arr = wide.astype(np.uint8)
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(
                f"{what} {path} is an {mode} colour image; label maps must be single-channel PNGs of "
                f"class ids (indexed 'P' mode like VOC's SegmentationClass, or greyscale 'L'), so convert "
                f"colour-coded masks to class ids first"
            )
        arr = rgb[..., 0]
    else:
        raise DataError(
            f"{what} {path} has PIL mode {mode!r}; label maps must be indexed ('P') or greyscale ('L') PNGs"
        )
    return _owned(arr)


def read_label_png(
    path: str | Path,
    *,
    expected_hw: tuple[int, int] | None = None,
    num_classes: int | None = None,
    what: str = "mask",
) -> np.ndarray:
    """Read a label map (class ids, 255 = ignore) as an ``H x W`` ``uint8`` array.

    Palette ('P') PNGs give their indices; greyscale ('L', '1', 16-bit with values <= 255) PNGs give
    their values. An RGB file whose three channels are equal is accepted as greyscale; any other RGB(A)
    file is a colour-coded mask and is refused, as are JPEG files (lossy compression alters class ids).

    Args:
        path: the PNG file.
        expected_hw: ``(height, width)`` of the image the map belongs to; a different size raises.
        num_classes: when given, values must be ``< num_classes`` or equal to 255.
        what: the word used for the file in messages ("mask", "seed", "pseudo mask" ...).

    Raises:
        DataError: missing or unreadable file, colour-coded mask, size mismatch, values out of range.
    """
    path = Path(path)
    arr = _decode(path, what, lambda im: _label_array(im, path, what))
    if expected_hw is not None:
        eh, ew = int(expected_hw[0]), int(expected_hw[1])
        h, w = arr.shape
        if (h, w) != (eh, ew):
            raise DataError(f"{what} {path} is {w}x{h} but its image is {ew}x{eh} (width x height)")
    if num_classes is not None:
        present = np.unique(arr)
        bad = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
        if bad:
            raise DataError(
                f"{what} {path} has values {_fmt_values(bad)} outside the {num_classes} class ids "
                f"0..{num_classes - 1} (255 = ignore)"
            )
    return arr


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, fsync: bool) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 respects the umask, unlike tempfile (0o600), so the final file gets
    # the same permissions as a plain open() would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_label_png(path: str | Path, array: np.ndarray, palette: bool = True) -> Path:
    """Atomically write an ``H x W`` map of class ids (0..255) as a PNG.

    With ``palette=True`` the PNG is indexed ('P' mode) with the VOC colour map, so it views in colour
    and reads back as class ids; otherwise it is greyscale ('L'). Returns the path written.

    Raises:
        ValueError: the array is not 2-D or holds values outside 0..255 (a programming error).
    """
    a = np.asarray(array)
    if a.ndim != 2:
        raise ValueError(f"label map for {path} must be 2-D (H x W), got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"label map for {path} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
        raise ValueError(f"label map for {path} has values outside 0..255 ({int(a.min())}..{int(a.max())})")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    h, w = a.shape
    if palette:
        im = Image.frombytes("P", (w, h), a.tobytes())
        im.putpalette(voc_palette(256).reshape(-1).tolist())
    else:
        im = Image.frombytes("L", (w, h), a.tobytes())
    return _atomic_write(path, lambda fh: im.save(fh, format="PNG"), fsync=False)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON (indented, trailing newline). Returns the path written."""
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` as UTF-8. Returns the path written."""
    data = text.encode("utf-8")
    return _atomic_write(path, lambda fh: fh.write(data), fsync=True)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Load a JSON file; DataError ``<what> not found: P`` or ``cannot parse <what> P: <reason>``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot parse {what} {path}: {_reason(exc)}") from exc


def jsonable(obj: Any) -> Any:
    """``obj`` made fit for strict JSON, recursively: NaN (absent classes) -> None, numpy scalars ->
    Python numbers, tuples -> lists, keys -> strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
