"""Reading ``.pth`` files without running pickled code: ``torch.load(weights_only=True)`` plus a narrow
allow-list, and one-line errors.

``weights_only`` loading rebuilds only tensors, storages, dtypes and plain containers (dict, OrderedDict,
list, tuple, set, str, bytes, int, float, bool, None); any other class or function a pickle names is refused
before it is called. ``allow`` extends that set for one call only (``torch.serialization.safe_globals``),
never globally. A file that needs more is refused with a one-line WeakclipError naming what it needs.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from weakclip.errors import WeakclipError

__all__ = ["safe_torch_load", "unsafe_globals"]


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def unsafe_globals(path: str | Path, allow: Iterable[Any] = ()) -> list[str]:
    """The globals a (zip-format) checkpoint names beyond torch's weights-only set and ``allow``
    (empty when it cannot tell)."""
    allowed = {_qualified(a) for a in allow}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files and corrupt ones: nothing to list
        return []
    return sorted(g for g in found if g not in allowed)


def safe_torch_load(path: str | Path, *, allow: Iterable[Any] = (), what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ``allow`` (classes/functions) added
    to the allowed globals for this call. WeakclipError (one line) for a missing, unreadable or refused file.
    """
    path = Path(path)
    allow = tuple(allow)
    if not path.is_file():
        raise WeakclipError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = unsafe_globals(path, allow)
        if needs:
            raise WeakclipError(
                f"refusing to load {what} {path}: it needs {', '.join(needs[:6])}, outside the allow-list of "
                "types weakclip unpickles (torch.load weights_only=True; pickled code is never run)"
            ) from None
        raise WeakclipError(f"refusing to load {what} {path}: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - zip/pickle/torch errors come in many types
        raise WeakclipError(f"cannot read {what} {path}: {_one_line(exc)}") from None
