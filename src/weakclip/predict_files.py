"""Masks and overlays of image files from a :class:`weakclip.api.Segmenter` (``weakclip predict``).

For each image ``<stem>`` the output folder gets ``<stem>.png`` (the mask: class ids, VOC palette, the image's
size) and ``<stem>_overlay.png`` (image | colour overlay | legend,
:func:`weakclip.inference.predict.overlay_image`), each written atomically, the mask first. Folders given as
inputs are walked (sorted, recursively) for files with an image extension; the output folder itself is never
read as input. A rerun skips an image whose mask and overlay both exist. An unreadable image is listed and the
rest are written; so is an image the memory does not suffice for (:class:`~weakclip.errors.OutOfMemory`: its
size and the ``--max-side`` to set; a batch that runs out of memory is run again one image at a time). Large
images are processed at the segmenter's ``max_side`` and their masks and overlays written at full size.
Images of one size are handed to :meth:`Segmenter.predict_batch` together, up to
``batch_size`` at a time: the refinement model's windows of all of them share forward passes; a retrained
network takes them in one batch per scale (with ``batch_size`` 1, one image at a time: exactly ``retrain``
evaluation's masks). With ``json_path`` a JSON file records each image's class pixel shares (also for skipped
images, read back from their masks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weakclip.errors import DataError, WeakclipError

__all__ = ["collect_images", "predict_files"]


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def collect_images(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> list[Path]:
    """Image files of ``inputs``: files as given, folders walked (sorted, recursively) for image extensions,
    leaving out anything under ``exclude`` (the output folder). One-line WeakclipError for a missing path
    or a folder without images."""
    from weakclip.data.io import IMAGE_EXTENSIONS

    exclude = Path(exclude) if exclude is not None else None
    if not inputs:
        raise WeakclipError("no image or folder given")
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise WeakclipError(f"not found: {item}")
        if item.is_dir():
            images = sorted(p for p in item.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files = [p for p in images if not _inside(p, exclude)]
            if images and not files:  # every one is the output folder's: say so, not "no images"
                raise WeakclipError(f"no images in {item} to predict: its {len(images)} image files are in "
                                    f"the output folder {exclude} (--out), which is never read as input "
                                    f"(it receives the masks and overlays): give another --out folder")
            if not files:
                raise WeakclipError(f"no images in {item} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                                    "in subfolders too)")
            found += files
        else:
            found.append(item)
    seen: set[Path] = set()
    out = []
    for p in found:  # a file given twice (directly and through its folder) is predicted once
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _stems(paths: Sequence[Path]) -> list[str]:
    """Output names: the file stem, ``_2``, ``_3`` ... after it for repeated stems (in input order)."""
    used: set[str] = set()
    out = []
    for path in paths:
        stem, n = path.stem, 2
        candidate = stem
        while candidate in used:
            candidate = f"{stem}_{n}"
            n += 1
        used.add(candidate)
        out.append(candidate)
    return out


def _shares(mask: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    counts = np.bincount(mask.reshape(-1), minlength=len(classes))
    total = max(1, mask.size)
    return {(classes[i] if i < len(classes) else str(i)): round(float(c) / total, 6)
            for i, c in enumerate(counts) if c}


def _groups(items: list[tuple[Path, str]], batch_size: int) -> Iterator[list[tuple[Path, str, Any]]]:
    """Read the images and yield lists of ``(path, stem, image or DataError)`` of one image size, at most
    ``batch_size`` long (an unreadable image alone); images wait for their group while at most
    ``4 * batch_size`` are held."""
    from weakclip.data.io import read_image

    pending: dict[tuple[int, int], list] = {}
    held = 0
    for path, stem in items:
        try:
            image = read_image(path, orientation="exif")  # as viewers show it (docs/method.md)
        except DataError as exc:
            yield [(path, stem, exc)]
            continue
        group = pending.setdefault(image.shape[:2], [])
        group.append((path, stem, image))
        held += 1
        if len(group) >= batch_size:
            yield pending.pop(image.shape[:2])
            held -= len(group)
        elif held > 4 * batch_size:
            largest = max(pending, key=lambda k: len(pending[k]))
            held -= len(pending[largest])
            yield pending.pop(largest)
    yield from pending.values()


def _predict_group(segmenter, group: list[tuple[Path, str, np.ndarray]], labels, failures: dict[str, str]
                   ) -> list[tuple[tuple[Path, str, np.ndarray], np.ndarray]]:
    """``((path, stem, image), mask)`` of the images of ``group`` (one size) predicted together; when memory
    runs out, each alone, and an image that runs out alone goes to ``failures`` (its one line)."""
    from weakclip.errors import OutOfMemory

    try:
        results = segmenter.predict_batch([im for _, _, im in group], labels, probabilities=False)
        return [(item, mask) for item, (_, mask) in zip(group, results)]
    except OutOfMemory as exc:
        if len(group) == 1:
            failures[str(group[0][0])] = str(exc)
            return []
    done = []
    for item in group:
        done += _predict_group(segmenter, [item], labels, failures)
    return done


def predict_files(segmenter, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  labels: str | Sequence[str] | None = None, batch_size: int = 1,
                  json_path: str | Path | None = None, progress: bool = True, alpha: float = 0.5
                  ) -> dict[str, Any]:
    """Predict every image of ``inputs`` with ``segmenter`` and write its mask and overlay to ``out_dir``.

    Returns ``{"written": [...], "skipped": [...], "failures": {path: message}, "images": {path: record}}``
    where each record has ``mask``, ``overlay`` and ``shares`` (class -> fraction of the pixels). Labels are
    checked, and inputs collected, before anything is written.
    """
    from tqdm import tqdm

    from weakclip.data.io import _atomic_write, read_label_png, write_json_atomic, write_label_png
    from weakclip.inference.predict import overlay_image
    from weakclip.memory import is_out_of_memory, oom_reason

    if batch_size < 1:
        raise WeakclipError(f"batch size must be >= 1, got {batch_size}")
    allowed = segmenter.label_ids(labels)
    out_dir = Path(out_dir)
    paths = collect_images(inputs, exclude=out_dir)
    stems = _stems(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = segmenter.classes
    records: dict[str, dict[str, Any]] = {}
    written: list[str] = []
    skipped: list[str] = []
    failures: dict[str, str] = {}
    todo = []
    for path, stem in zip(paths, stems):
        mask_path, overlay_path = out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"
        if mask_path.is_file() and overlay_path.is_file():
            skipped.append(str(path))
            record = {"mask": str(mask_path), "overlay": str(overlay_path), "skipped": True}
            if json_path is not None:
                record["shares"] = _shares(read_label_png(mask_path), classes)
            records[str(path)] = record
        else:
            todo.append((path, stem))
    bar = tqdm(total=len(paths), initial=len(skipped), desc="predict", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        for group in _groups(todo, batch_size):
            readable = [(p, s, im) for p, s, im in group if not isinstance(im, DataError)]
            for path, _, exc in group:
                if isinstance(exc, DataError):
                    failures[str(path)] = str(exc)
            if readable:
                done = _predict_group(segmenter, readable, labels, failures)
                for (path, stem, image), mask in done:
                    try:
                        mask_path = write_label_png(out_dir / f"{stem}.png", mask)
                        canvas = overlay_image(image, mask, classes, allowed, alpha)
                        overlay_path = _atomic_write(out_dir / f"{stem}_overlay.png",
                                                     lambda fh, im=canvas: im.save(fh, format="PNG"),
                                                     fsync=False)
                    except Exception as exc:  # noqa: BLE001 - only out of memory is this image's alone
                        if not is_out_of_memory(exc):
                            raise
                        h, w = mask.shape
                        failures[str(path)] = (f"out of memory for the mask and the {3 * w}x{h} overlay of a "
                                               f"{w}x{h} image: {oom_reason(exc)}")
                        continue
                    written.append(str(path))
                    records[str(path)] = {"mask": str(mask_path), "overlay": str(overlay_path),
                                          "shares": _shares(mask, classes)}
            bar.update(len(group))
    finally:
        bar.close()
    result = {"written": written, "skipped": skipped, "failures": failures,
              "images": {str(p): records[str(p)] for p in paths if str(p) in records}}
    if json_path is not None:
        write_json_atomic(json_path, {
            "network": segmenter.description, "kind": segmenter.kind, "classes": classes,
            "labels": None if allowed is None else [classes[i] for i in allowed],
            "settings": segmenter.settings, "images": result["images"], "failures": failures})
    return result
