"""Reading images and label maps, writing label PNGs and JSON files atomically.

Conventions used by every function here:

* Images come back as ``H x W x 3`` ``uint8`` RGB arrays. Greyscale, palette, RGBA (alpha dropped),
  CMYK and 16-bit greyscale files are converted. Two choices make the pixels (:func:`read_image`):
  ``reader`` -- the decoding library, ``"pil"`` (Pillow, ``Image.open(...).convert("RGB")``) or
  ``"opencv"`` (``cv2.imdecode(..., IMREAD_COLOR)`` then BGR -> RGB, what ``cv2.imread`` and mmcv's
  ``imfrombytes`` do) -- and ``orientation`` -- ``"ignore"`` (the stored pixel grid) or ``"exif"`` (turned
  upright by the EXIF orientation tag, as image viewers show it). Each stage reads as its reference does for
  VOC and COCO, and upright for folder datasets and ``weakclip predict`` (:func:`resolve_orientation`;
  docs/method.md, "Image reading").
* A label map belongs to its image's grid as the stage reads it. When the image is turned upright by an
  orientation that swaps width and height (EXIF 5-8) and a label map has the STORED size instead, it was
  drawn on the stored pixels: :func:`fit_label_to_image` turns it the same way (so it stays on the same
  content) and warns once per file (:class:`OrientationWarning`); a map of neither size is an error.
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from weakclip.data.classes import IGNORE_INDEX, voc_palette
from weakclip.errors import DataError, WeakclipError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ORIENTATIONS",
    "READERS",
    "ImageGeometry",
    "OrientationWarning",
    "fit_label_to_image",
    "image_geometry",
    "orient_array",
    "pil_to_rgb",
    "read_image",
    "resolve_orientation",
    "read_json",
    "read_label_png",
    "write_json_atomic",
    "write_label_png",
    "write_bytes_atomic",
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


READERS: tuple[str, ...] = ("pil", "opencv")
ORIENTATIONS: tuple[str, ...] = ("ignore", "exif")
EXIF_ORIENTATION = 0x0112  # the EXIF/TIFF "Orientation" tag
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # orientations whose upright image is W x H


class OrientationWarning(UserWarning):
    """A label map drawn on an image's stored pixels was turned upright with its image (see
    :func:`fit_label_to_image`)."""


def resolve_orientation(orientation: str, reader: str, kind: str | None = None) -> str:
    """``"ignore"`` or ``"exif"`` for a dataset of ``kind`` read with ``reader``.

    ``"auto"`` is the rule of this package: folder datasets (a user's photos) are read upright
    (``"exif"``); VOC and COCO as the stage's reference reads them, i.e. as its library does by default:
    OpenCV's ``IMREAD_COLOR`` applies the orientation (``"exif"``), Pillow's ``Image.open`` does not
    (``"ignore"``). ``"ignore"`` and ``"exif"`` are taken as they are."""
    if reader not in READERS:
        raise ValueError(f"image reader must be one of {', '.join(READERS)}, got {reader!r}")
    if orientation in ORIENTATIONS:
        return orientation
    if orientation != "auto":
        raise ValueError(f"image orientation must be auto, {' or '.join(ORIENTATIONS)}, got {orientation!r}")
    if kind == "folder" or reader == "opencv":
        return "exif"
    return "ignore"


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1
    return value if 1 <= value <= 8 else 1


def read_image(path: str | Path, reader: str = "pil", orientation: str = "ignore") -> np.ndarray:
    """Read an image file as an ``H x W x 3`` ``uint8`` RGB array.

    Args:
        path: the image file.
        reader: ``"pil"``: Pillow decodes the file (``Image.open`` + ``convert("RGB")``; the whole file is
            decoded, so a truncated JPEG or PNG raises instead of coming back half grey, unless some other
            code set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``). ``"opencv"``: ``cv2.imdecode`` with
            ``IMREAD_COLOR`` and a BGR -> RGB conversion, the pixels ``cv2.imread`` / mmcv's
            ``imfrombytes`` give (OpenCV's own conversions of greyscale, CMYK or 16-bit files).
        orientation: ``"ignore"``: the pixels as stored; ``"exif"``: turned upright by the file's EXIF
            orientation tag (Pillow: ``ImageOps.exif_transpose``; OpenCV: without
            ``IMREAD_IGNORE_ORIENTATION``).

    Raises:
        DataError: ``image not found: P`` or ``cannot read image P: <reason>``.
        WeakclipError: ``reader="opencv"`` without OpenCV installed.
    """
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"image reader must be one of {', '.join(READERS)}, got {reader!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"image orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if reader == "opencv":
        arr = _read_opencv(path, orientation == "exif")
    else:
        arr = _decode(path, "image", lambda im: pil_to_rgb(im, orientation))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"cannot read image {path}: unexpected decoded shape {arr.shape}")
    return arr


def _read_opencv(path: Path, upright: bool) -> np.ndarray:
    try:
        import cv2
    except ImportError as exc:
        raise WeakclipError("image reader 'opencv' needs OpenCV: pip install opencv-python-headless "
                            "(or choose the 'pil' reader)") from exc
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
    flags = cv2.IMREAD_COLOR if upright else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(data, flags) if data.size else None
    if bgr is None:
        raise DataError(f"cannot read image {path}: OpenCV cannot decode it (corrupt, truncated or not an "
                        f"image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class ImageGeometry(NamedTuple):
    """An image file's stored size and EXIF orientation, read from its header (pixels not decoded)."""

    stored_hw: tuple[int, int]
    orientation: int  # EXIF orientation 1..8 (1: none, absent or invalid)

    @property
    def upright_hw(self) -> tuple[int, int]:
        """``(height, width)`` once turned upright."""
        h, w = self.stored_hw
        return (w, h) if self.orientation in SWAPPING_ORIENTATIONS else (h, w)


def image_geometry(path: str | Path) -> ImageGeometry:
    """The stored ``(height, width)`` and EXIF orientation of an image file (its header only).

    Raises:
        DataError: ``image not found: P`` or ``cannot read image P: <reason>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            w, h = im.size
            return ImageGeometry((int(h), int(w)), _exif_orientation(im))
    except Exception as exc:  # noqa: BLE001 - PIL's many error types
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (``H x W`` or ``H x W x C``) turned as an image with EXIF ``orientation`` is turned upright
    (the geometry of Pillow's ``ImageOps.exif_transpose``); a C-contiguous copy, or ``arr`` itself for 1."""
    a = np.asarray(arr)
    if orientation in (None, 1):
        return a
    if orientation == 2:
        out = a[:, ::-1]
    elif orientation == 3:
        out = a[::-1, ::-1]
    elif orientation == 4:
        out = a[::-1]
    elif orientation == 5:
        out = np.swapaxes(a, 0, 1)
    elif orientation == 6:
        out = np.swapaxes(a, 0, 1)[:, ::-1]
    elif orientation == 7:
        out = np.swapaxes(a, 0, 1)[::-1, ::-1]
    elif orientation == 8:
        out = np.swapaxes(a, 0, 1)[::-1]
    else:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    return np.ascontiguousarray(out)


_warned_labels: set[str] = set()


def fit_label_to_image(
    label: np.ndarray,
    label_path: str | Path,
    image_path: str | Path | None,
    orientation: str,
    *,
    expected_hw: tuple[int, int] | None = None,
    what: str = "mask",
    reference: str | None = None,
) -> np.ndarray:
    """A label map of ``image_path`` on the image's grid as it is read with ``orientation``.

    With ``orientation="exif"`` and an image whose EXIF orientation swaps width and height, a label map of
    the image's STORED size was drawn on the stored pixels: it is turned upright the same way (so every
    class id stays on the same content) and an :class:`OrientationWarning` names it once per file. Then,
    when ``expected_hw`` is given, a label map of another size is the usual error. Label maps of an image
    whose orientation keeps the size (2-4; 5-8 on a square image) cannot be told apart: they are taken as
    drawn on the upright image.

    ``reference`` names what ``expected_hw`` is the size of, in the error (default: ``its image
    <image_path>``): the message names the label map that differs and the file it was compared with.

    Raises:
        DataError: the label map's size is not ``expected_hw`` (with a hint when it fits the image
            turned by its EXIF orientation but the stage reads the stored pixels).
    """
    shape = tuple(int(v) for v in label.shape[:2])
    geometry = None
    mismatch = expected_hw is not None and shape != tuple(expected_hw)
    if image_path is not None and (mismatch or (orientation == "exif" and expected_hw is None)):
        try:
            geometry = image_geometry(image_path)
        except DataError:
            geometry = None  # the image's own error is reported where it is read
    if (orientation == "exif" and geometry is not None and geometry.orientation in SWAPPING_ORIENTATIONS
            and shape == geometry.stored_hw and geometry.stored_hw != geometry.upright_hw):
        key = str(label_path)
        if key not in _warned_labels:
            _warned_labels.add(key)
            h, w = geometry.stored_hw
            warnings.warn(
                f"{what} {label_path} is {w}x{h}, the stored size of its image {image_path}, which is shown "
                f"turned by its EXIF orientation {geometry.orientation} ({h}x{w}); the {what} is turned the "
                f"same way to stay aligned with it",
                OrientationWarning, stacklevel=2)
        label = orient_array(label, geometry.orientation)
        shape = tuple(int(v) for v in label.shape[:2])
    if expected_hw is not None and shape != tuple(expected_hw):
        eh, ew = int(expected_hw[0]), int(expected_hw[1])
        h, w = shape
        hint = ""
        if (orientation == "ignore" and geometry is not None and geometry.orientation in SWAPPING_ORIENTATIONS
                and shape == geometry.upright_hw):
            hint = (f" (it fits the image turned by its EXIF orientation {geometry.orientation}, but this "
                    f"stage reads the stored pixels)")
        if reference is None:
            reference = f"its image {image_path}" if image_path is not None else "its image"
        raise DataError(f"{what} {label_path} is {w}x{h} but {reference} is {ew}x{eh} (width x height){hint}")
    return label


def _owned(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous, writeable array (``np.asarray(pil_image)`` is a read-only view of a bytes copy)."""
    if arr.flags.writeable and arr.flags.c_contiguous:
        return arr
    return np.array(arr, order="C", copy=True)


def pil_to_rgb(im: Image.Image, orientation: str = "exif") -> np.ndarray:
    """A PIL image as an ``H x W x 3`` ``uint8`` RGB array (C-contiguous, writeable, never a view of ``im``):
    the ONE conversion of decoded pixels, shared by :func:`read_image` (every command, ``weakclip predict``)
    and :meth:`weakclip.api.Segmenter.predict` (PIL images given in Python), so both see the same pixels.

    ``orientation``: ``"exif"`` turns the image upright by its EXIF orientation tag first
    (``ImageOps.exif_transpose``), ``"ignore"`` keeps the stored grid. Modes: RGB as it is; 16-bit and
    32-bit greyscale (``I;16*``, ``I``) and float (``F``) scaled to 8 bits (not clipped at 255 as Pillow's
    ``convert("RGB")`` does, which turns a 16-bit photo white); a palette with transparency through RGBA;
    every other mode (1, L, LA, P, RGBA, CMYK, YCbCr ...) by Pillow's ``convert("RGB")``, alpha dropped.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB (callers name the file or the image).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"image orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if orientation == "exif":
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


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
    reference: str | None = None,
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
        reference: what ``expected_hw`` is the size of, named in the error (e.g. ``"its ground-truth mask
            <path>"``; default ``"its image"``).

    Raises:
        DataError: missing or unreadable file, colour-coded mask, size mismatch, values out of range.
    """
    path = Path(path)
    arr = _decode(path, what, lambda im: _label_array(im, path, what))
    if expected_hw is not None:
        eh, ew = int(expected_hw[0]), int(expected_hw[1])
        h, w = arr.shape
        if (h, w) != (eh, ew):
            raise DataError(f"{what} {path} is {w}x{h} but {reference or 'its image'} is {ew}x{eh} "
                            f"(width x height)")
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
    """Write ``path`` through a temporary file in the same folder, then rename it over ``path``. A full or
    read-only disk is an :class:`~weakclip.errors.OutputError` (the temporary file removed)."""
    from weakclip.write_errors import writing

    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with writing(path):  # the free space is measured before the partial file goes
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open with mode 0o666 respects the umask, unlike tempfile (0o600), so the final file gets
            # the same permissions as a plain open() would give it.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data``. Returns the path written."""
    return _atomic_write(path, lambda fh: fh.write(data), fsync=False)


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
