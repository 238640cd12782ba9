"""Pre-flight check of a pseudo-mask folder against a dataset, before any training starts.

Every id of the training split needs ``<masks_dir>/<id>.png``: a readable single-channel PNG of its image's
size whose values are class ids ``0..K-1`` or 255 (ignored). :func:`check_masks` scans them all (image sizes
are read from the file headers, masks are decoded) and returns the problems grouped by kind;
:func:`preflight_masks` raises them as ONE :class:`~weakclip.errors.DataError` listing, per kind, the count
and the first few ids, e.g.::

    pseudo-mask folder /x/masks does not fit the 48 training images of /x (split train): 3 missing
    (train_0001, train_0002, train_0005); 1 of the wrong size (train_0007: 64x48, image 128x96); 2 with values
    outside 0..4 and 255 (train_0003: [7], train_0009: [5, 6]); 1 unreadable (...)

Under ``torchrun`` every process checks its share of the ids and the lists are gathered, so all processes
raise the same error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from weakclip.data.classes import IGNORE_INDEX
from weakclip.data.io import read_label_png
from weakclip.errors import DataError

__all__ = ["check_masks", "preflight_masks"]

_SHOW = 4
KINDS = ("missing", "size", "values", "unreadable")


def _check_one(dataset, masks_dir: Path, i: int) -> tuple[str, str] | None:
    ident = dataset.ids[i]
    path = masks_dir / f"{ident}.png"
    if not path.is_file():
        return "missing", ident
    try:
        mask = read_label_png(path, what="pseudo mask")
    except DataError as exc:
        return "unreadable", f"{ident}: {exc}"
    try:
        fits = dataset.label_fits(i, mask.shape)
    except DataError:  # the dataset reports image problems itself
        fits = True
    if not fits:
        hw = dataset.image_hw(i)
        return "size", f"{ident}: {mask.shape[1]}x{mask.shape[0]}, image {hw[1]}x{hw[0]}"
    k = dataset.num_classes
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= k and v != IGNORE_INDEX]
    if bad:
        return "values", f"{ident}: {bad[:6]}"
    return None


def check_masks(dataset, masks_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                workers: int = 4) -> dict[str, list[str]]:
    """Problems of ``masks_dir`` for ``dataset``'s ids, by kind (``missing``, ``size``, ``values``,
    ``unreadable``): lists of ids (missing) or ``"id: detail"`` strings. This process checks ids
    ``rank::world_size`` only."""
    masks_dir = Path(masks_dir)
    found: dict[str, list[str]] = {k: [] for k in KINDS}
    indices = list(range(rank, len(dataset), world_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(lambda i: _check_one(dataset, masks_dir, i), indices):
            if result is not None:
                found[result[0]].append(result[1])
    return found


def _gather(found: dict[str, list[str]]) -> dict[str, list[str]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return found
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, found)
    merged: dict[str, list[str]] = {k: [] for k in KINDS}
    for part in parts:
        for k in KINDS:
            merged[k].extend(part.get(k, []))
    return {k: sorted(v) for k, v in merged.items()}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = len(items) - _SHOW
    return shown + (f", +{more} more" if more > 0 else "")


def preflight_masks(dataset, masks_dir: str | Path, *, what: str = "training images",
                    workers: int = 4) -> None:
    """Raise one DataError describing every problem of ``masks_dir`` (module docstring); silent when fine."""
    import torch.distributed as dist

    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DataError(f"pseudo-mask folder not found: {masks_dir}")
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    found = _gather(check_masks(dataset, masks_dir, rank=rank, world_size=world, workers=workers))
    k = dataset.num_classes
    parts = []
    if found["missing"]:
        parts.append(f"{len(found['missing'])} missing ({_listing(found['missing'])})")
    if found["size"]:
        parts.append(f"{len(found['size'])} of the wrong size ({_listing(found['size'])})")
    if found["values"]:
        parts.append(f"{len(found['values'])} with values outside 0..{k - 1} and 255 "
                     f"({_listing(found['values'])})")
    if found["unreadable"]:
        parts.append(f"{len(found['unreadable'])} unreadable ({_listing(found['unreadable'][:1])})")
    if parts:
        split = getattr(dataset, "split", None)
        where = f" (split {split})" if split else ""
        raise DataError(f"pseudo-mask folder {masks_dir} does not fit the {len(dataset)} {what} of "
                        f"{getattr(dataset, 'root', '?')}{where}: " + "; ".join(parts))
