"""Image labels given as class names (the labels files of COCO and folder datasets) turned into class
ids, with one-line errors naming the image, the name (and the closest class names) and the file."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from weakclip.errors import DataError


def names_to_ids(
    names: Any, classes: Sequence[str], ident: str, source: Path, class_file: str
) -> list[int]:
    """Class names of one image -> sorted class ids; DataError naming the id, the name and the file."""
    if isinstance(names, str):
        names = names.split(";")
    if not isinstance(names, (list, tuple)):
        raise DataError(
            f"{source}: labels of image {ident!r} must be a list of class names, got {names!r:.60}"
        )
    index = {c: k for k, c in enumerate(classes)}
    out: set[int] = set()
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        k = index.get(name)
        if k is None:
            close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise DataError(
                f"{source}: image {ident!r} has unknown class {name!r}{hint}; the classes are those of "
                f"{class_file}"
            )
        if k != 0:
            out.add(k)
    return sorted(out)


def resolve_labels(
    raw: dict[str, Any], keys: Iterable[str], classes: Sequence[str], source: Path, class_file: str
) -> dict[str, list[int]]:
    """:func:`names_to_ids` over many images; one DataError reporting the first problem and a count."""
    out: dict[str, list[int]] = {}
    errors: list[str] = []
    for ident in keys:
        try:
            out[ident] = names_to_ids(raw[ident], classes, ident, source, class_file)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        more = f" ({len(errors) - 1} more images with bad labels in that file)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    return out
