"""Reading weights files without running pickled code, and one short line for each way that fails.

``safe_torch_load`` is ``torch.load(weights_only=True)`` plus a narrow allow-list: it rebuilds only tensors,
storages, dtypes and plain containers (dict, OrderedDict, list, tuple, set, str, bytes, int, float, bool,
None); any other class or function a pickle names is refused before it is called. ``allow`` extends that set
for one call only (``torch.serialization.safe_globals``), never globally.

Every reader of weights in weakclip goes through here, so a bad file is worded the same everywhere
(:class:`weakclip.errors.WeightsError`, one line, never PyTorch's advice to turn the safety off):

* not a PyTorch file: what its first bytes look like (``starts with 89 50 4e 47 (a PNG image)``, an empty
  file, text or HTML, gzip, a zip archive without a PyTorch record, a safetensors or MXNet file, ...);
* a truncated or damaged file (a zip archive without its central directory, an unexpected end of file);
* pickled code outside the allow-list: the refusal names the type it needs;
* a file of another program (it loads, but lacks the keys the caller expects): :func:`foreign_file`,
  naming the keys it has (:func:`describe_contents`).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from weakclip.errors import WeightsError

__all__ = ["describe_contents", "explain_read_error", "foreign_file", "safe_torch_load", "sniff_file",
           "unsafe_globals"]

# the pickled magic number that opens a legacy (pre-1.6, non-zip) torch.save file
_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"),
    (b"7z\xbc\xaf", "a 7-zip archive"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x12\x01\x00\x00\x00\x00\x00\x00", "an MXNet NDArray file (.params)"),
    (b"\x7fELF", "an executable"),
)
_REFUSAL = ("outside the allow-list of types weakclip unpickles (arbitrary pickled objects are never run: "
            "use a checkpoint that stores tensors and plain values)")


def _one_line(text: object, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def _hex(head: bytes) -> str:
    return " ".join(f"{b:02x}" for b in head[:4])


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and head[6:8] == b"\0\0"  # u64 header length, JSON


def _zip_problem(path: Path) -> str | None:
    """None for a zip archive torch can read (a ``<name>/data.pkl`` record), else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "is truncated or damaged (a zip archive without its central directory): copy it again"
    if any(n.endswith("data.pkl") for n in names) or any(n.endswith("constants.pkl") for n in names):
        return None
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"is a zip archive but not a PyTorch file (it holds {shown or 'nothing'})"


def sniff_file(path: str | Path, *, safetensors_ok: bool = False) -> str | None:
    """None when ``path`` looks like a PyTorch file (a zip with a pickle record, or a legacy torch pickle),
    else a phrase saying what it is instead (``is empty (0 bytes)``, ``starts with 89 50 4e 47 (a PNG
    image), not a PyTorch file``). ``safetensors_ok``: a safetensors file passes too."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): copy or download it again"
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_problem(path)
    if head.startswith(_LEGACY_TORCH):
        return None
    if _is_safetensors(head):
        if int.from_bytes(head[:8], "little") > size - 8:
            return "is truncated or damaged (its safetensors header runs past the end): copy it again"
        return None if safetensors_ok else "is a safetensors file; this reader takes PyTorch files (.pth/.pt)"
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if kind is None and head[:1] == b"\x80":
        kind = "a Python pickle, not written by torch.save"
    if kind is None and _looks_like_text(head):
        kind = "an HTML page: a failed download?" if b"<" in head[:16] else "text"
        first = _one_line(head.decode("utf-8"), 24)
        return f"starts with {first!r} ({kind}), not a PyTorch file"
    return f"starts with {_hex(head)} ({kind or 'no format weakclip knows'}), not a PyTorch file"


def unsafe_globals(path: str | Path, allow: Iterable[Any] = ()) -> list[str]:
    """The globals a (zip-format) checkpoint names beyond torch's weights-only set and ``allow``
    (empty when it cannot tell)."""
    allowed = {_qualified(a) for a in allow}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files and corrupt ones: nothing to list
        return []
    return sorted(g for g in found if g not in allowed)


def explain_read_error(path: str | Path, exc: BaseException, allow: Iterable[Any] = ()) -> str:
    """What went wrong reading ``path``, as a phrase that follows the file's name (no PyTorch advice)."""
    path = Path(path)
    if isinstance(exc, FileNotFoundError) or not path.exists():
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "cannot be opened (permission denied)"
    if path.is_file():
        sniffed = sniff_file(path, safetensors_ok=path.suffix == ".safetensors")
        if sniffed is not None:
            return sniffed
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError):
        needs = unsafe_globals(path, allow) if path.is_file() else []
        named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if needs or named:
            types = ", ".join(needs[:6]) if needs else named.group(1)
            return f"is refused: it needs {types}, {_REFUSAL}"
        if "Weights only load failed" in text:  # the WeightsUnpickler's own reason, without the advice
            reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
            return f"is refused: {_one_line(reason.group(1) if reason else 'not a weights-only pickle')}"
    truncation = ("central directory", "unexpected pos", "failed reading", "EOF", "Invalid argument",
                  "incomplete", "MetadataIncompleteBuffer", "truncated")
    if isinstance(exc, EOFError) or any(t in text for t in truncation):
        return "is truncated or damaged (it ends early): copy or download it again"
    return f"cannot be read ({_one_line(text) or type(exc).__name__})"


def safe_torch_load(path: str | Path, *, allow: Iterable[Any] = (), what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ``allow`` (classes/functions) added
    to the allowed globals for this call. WeightsError (one line) for a missing, unreadable, foreign-format or
    refused file: ``<what> <path> <what is wrong>``."""
    path = Path(path)
    allow = tuple(allow)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}")
    sniffed = sniff_file(path)
    if sniffed is not None:
        raise WeightsError(f"{what} {path} {sniffed}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip/pickle/torch errors come in many types
        raise WeightsError(f"{what} {path} {explain_read_error(path, exc, allow)}") from None


def describe_contents(obj: Any) -> str:
    """What a loaded weights object holds, in a few words (its keys, for a dict)."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            more = ", ..." if len(keys) > 3 else ""
            return f"a state dict of {len(keys)} tensors ({', '.join(keys[:3])}{more})"
        if isinstance(obj.get("config"), Mapping):
            sections = ", ".join(str(k) for k in obj["config"])
            return f"a checkpoint whose config has the sections {sections}"
        if not keys:
            return "an empty dict"
        return f"a dict with keys {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
    if isinstance(obj, torch.Tensor):
        return f"one tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def foreign_file(path: str | Path, obj: Any, expected: str) -> WeightsError:
    """The error for a file that loads but is not what the caller reads (another program's checkpoint)."""
    return WeightsError(f"{path} holds {describe_contents(obj)}; expected {expected}")
