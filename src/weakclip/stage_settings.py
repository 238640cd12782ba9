"""What made a stage of a work folder, and whether a new run may reuse it.

Every stage of ``weakclip run`` records the settings it was made with as one flat dict (dotted keys such as
``pseudo.scales``, ``train.iters``, ``data.images``), split by :func:`made_with` in two: ``output``, the
settings that change the stage's results, and ``incidental``, those that change how it runs but not what it
makes (:data:`INCIDENTAL`). The record lies in ``<stage>/made_with.json`` from the stage's start and in its
``stage.json`` when it has finished. :func:`check_reuse`, the one comparison for every stage and method,
refuses a run asking for other output settings in one line (the stage, the setting, both values and the way
out), and returns a one-line note for incidental differences. Keys one side lacks (a record of an older
version) are not compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError

__all__ = ["INCIDENTAL", "MADE_WITH", "ORIGIN_KEYS", "check_reuse", "file_fingerprint", "flatten",
           "folder_fingerprint", "ids_fingerprint", "made_with", "normalised"]

#: The file a stage writes when it starts: ``{"stage": ..., "made_with": {"output": {}, "incidental": {}}}``.
MADE_WITH = "made_with.json"

#: Settings that do not change a stage's results; a difference is a note and the stage is reused:
#: - where it runs and how much at once: ``device`` (cpu / cuda), ``processes`` (torchrun's world size: the
#:   training batches are global), ``seeds.batch_size`` (images through CLIP at once: float rounding only),
#:   ``pseudo.window_batch`` / ``pseudo.image_batch`` (the same for the pseudo masks), the worker processes
#:   ``data.num_workers`` and ``pseudo.crf_workers`` (each sample's randomness is seeded by its iteration
#:   and slot, not by the worker), ``train.deterministic`` (deterministic kernels: float rounding only);
#: - bookkeeping: ``train.checkpoint_every``, ``train.log_every``, ``train.keep_checkpoints``, and the
#:   refinement's periodic evaluation ``train.eval_every`` / ``eval_split`` / ``eval_max_images`` (it adds
#:   ``eval.csv`` and ``best.pth``; every iteration re-seeds the random state, and the pseudo masks use the
#:   last checkpoint);
#: - where the inputs lie: ``data.root``, ``data.seeds``, ``data.masks``, ``seeds.dir``,
#:   ``clip.weights_file``, ``model.backbone_weights``, ``text.descriptors_file`` (what they hold is compared:
#:   ``data.images``, ``data.classes``, ``seeds.files``, ``clip.weights``, ``backbone.weights``,
#:   ``text.descriptors``);
#: - ``preset``: the name; the settings it stands for are compared one by one.
INCIDENTAL: frozenset[str] = frozenset({
    "device", "processes", "preset",
    "seeds.batch_size", "pseudo.window_batch", "pseudo.image_batch", "data.num_workers", "pseudo.crf_workers",
    "train.deterministic",
    "train.checkpoint_every", "train.log_every", "train.keep_checkpoints", "train.eval_every",
    "train.eval_split", "train.eval_max_images",
    "data.root", "data.seeds", "data.masks", "seeds.dir", "clip.weights_file", "model.backbone_weights",
    "text.descriptors_file",
})

#: Incidental settings named in a refusal when they differ too (they tell where the difference comes from).
ORIGIN_KEYS: tuple[str, ...] = ("preset",)

_MIB = 1 << 20


def normalised(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, paths as strings, NaN as None)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, float) and v != v:
            return None
        if hasattr(v, "item") and callable(v.item):  # numpy scalars
            return v.item()
        return v

    return json.loads(json.dumps(plain(value)))


def flatten(tree: Mapping[str, Any], prefix: str = "", skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{"pseudo": {"scales": [1]}}`` -> ``{"pseudo.scales": [1]}``, leaving out the sections in ``skip``."""
    skip = set(skip)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not prefix and key in skip:
            continue
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def made_with(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A stage's flat settings as recorded: ``{"output": ..., "incidental": ...}`` (:data:`INCIDENTAL`)."""
    flat = normalised(dict(settings))
    return {"output": {k: v for k, v in flat.items() if k not in INCIDENTAL},
            "incidental": {k: v for k, v in flat.items() if k in INCIDENTAL}}


def file_fingerprint(path: str | Path | None) -> str | None:
    """What a weights file holds, cheaply: its size and a SHA-256 of its first, middle and last MiB (so a
    moved or copied file is the same, another file is not). None for no file."""
    if path is None:
        return None
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as fh:
            for start in sorted({0, max(0, size // 2 - _MIB // 2), max(0, size - _MIB)}):
                fh.seek(start)
                digest.update(fh.read(_MIB))
    except OSError as exc:
        raise WeakclipError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]} (first, middle, last MiB)"


def folder_fingerprint(folder: str | Path, pattern: str = "*.png") -> str:
    """What a folder of label PNGs holds: how many, and a SHA-256 of their names and sizes."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob(pattern))
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
    return f"{len(files)} files, names and sizes sha256 {digest.hexdigest()[:16]}"


def ids_fingerprint(ids: Iterable[str]) -> str:
    """A split's images: how many, and a SHA-256 of their ids in order."""
    ids = [str(i) for i in ids]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return f"{len(ids)} images, ids sha256 {digest}"


def _show(value: Any, limit: int = 80) -> str:
    """A value for a message: strings (paths, fingerprints) whole, long lists (class names) shortened."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return repr(value)
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    return {**(record.get("output") or {}), **(record.get("incidental") or {})}


def check_reuse(stage: str, where: str | Path, held: Mapping[str, Any] | None, wanted: Mapping[str, Any], *,
                complete: bool = True) -> str | None:
    """Whether the run may reuse (``complete``) or resume a stage that ``held`` (its recorded
    :func:`made_with`, None: nothing recorded) when it asks for ``wanted`` (a :func:`made_with` too).

    A key both hold with another value: among ``wanted``'s output settings a WeakclipError in one line
    (``pseudo_masks in W was made with pseudo.scales = [1.0], this run asks for [0.5]: use a new --workdir,
    or pass --redo pseudo_masks ...``), among its incidental ones the note returned (None: nothing
    differs). Keys only one side has are not compared.
    """
    if not held:
        return None
    old = _flat(held)
    output, incidental = wanted.get("output") or {}, wanted.get("incidental") or {}
    changed = [k for k in output if k in old and old[k] != output[k]]
    aside = [k for k in incidental if k in old and old[k] != incidental[k]]
    verb = "was made with" if complete else "was started with"
    if changed:
        first, more = changed[0], len(changed) - 1
        tail = []
        if more:
            tail.append(f"and {more} more setting{'s' if more > 1 else ''}: {', '.join(changed[1:4])}"
                        f"{', ...' if more > 3 else ''}")
        tail += [f"{k} {_show(old[k])}, this run {_show(incidental[k])}" for k in ORIGIN_KEYS if k in aside]
        extra = f" ({'; '.join(tail)})" if tail else ""
        raise WeakclipError(
            f"{stage} in {where} {verb} {first} = {_show(old[first])}, this run asks for "
            f"{_show(output[first])}{extra}: use a new --workdir, or pass --redo {stage} to recompute "
            f"{stage} and every stage after it")
    if not aside:
        return None
    shown = ", ".join(f"{k} {_show(old[k])} -> {_show(incidental[k])}" for k in aside)
    kept = "reused" if complete else "resumed"
    return f"note: {stage} {verb} {shown}: {'this does' if len(aside) == 1 else 'these do'} not change its " \
           f"results, so it is {kept}"
