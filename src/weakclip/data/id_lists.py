"""Image ids: reading id lists, image ids from file names, telling a list file from a split name, and
how messages list ids or names (the first few, then a count)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weakclip.data.io import IMAGE_EXTENSIONS
from weakclip.errors import DataError

_LIST_MAX = 5  # how many ids / names a message lists before "(+N more)"


def listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_LIST_MAX])
    more = len(items) - _LIST_MAX
    return shown + (f" (+{more} more)" if more > 0 else "")


def strip_image_ext(name: str) -> str:
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
        ident = strip_image_ext(line.split()[0])
        if ident in seen:
            dups.append(ident)
            continue
        seen.add(ident)
        ids.append(ident)
    return ids, dups


def is_path_like(split: str | Path) -> bool:
    s = str(split)
    return isinstance(split, Path) or s.endswith(".txt") or "/" in s or os.sep in s
