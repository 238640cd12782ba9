"""Training checkpoints: atomic writes, a ``latest`` pointer, the last N kept, RNG states.

Layout under the work folder::

    checkpoints/iter_0002000.pth   one file per saved iteration
    checkpoints/latest             text file naming the newest checkpoint file (written last)
    checkpoints/best.pth           with periodic evaluation: the model of the best evaluation so far

A checkpoint is written to a hidden temporary file in the same folder and renamed over its final
name (``os.replace``), then ``latest`` is replaced the same way; a process killed at any moment
leaves either the previous state or the new one, never a half-written file under a final name.

Contents (a dict of tensors and plain values only -- dict, list, tuple, str, int, float, bool, None -- so
that it loads with ``torch.load(weights_only=True)``: opening a checkpoint never runs pickled code)::

    "iteration"     number of finished iterations (the next one to run)
    "model"         trainable parameters and all buffers of the model (frozen CLIP weights are left
                    out: they come from the CLIP weights file; without one the towers are random,
                    tests only, and are stored too)
    "clip_weights"  the CLIP weights file the towers were built from, an absolute path (None: random towers)
    "classes"       the class names the network was trained with (index 0 background), and
    "palette"       their K RGB colours (0..255, the VOC colours of every mask written): the checkpoint loads
                    without its dataset, wherever it is copied (checkpoints written before these were
                    stored need ``--classes FILE``)
    "optimizer", "scaler", "schedule"   state dicts (scaler None without fp16)
    "config"        the Config as a dict (its file and folder paths absolute)
    "rng"           per-rank RNG states (list indexed by rank): python (``random.getstate()``, a tuple of
                    ints), numpy (the legacy MT19937 state as a dict: key as an int64 tensor, pos,
                    has_gauss, cached_gaussian), torch CPU and CUDA (uint8 tensors)
    "world_size"    the number of processes that wrote it
"""

from __future__ import annotations

import os
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weakclip.errors import WeakclipError
from weakclip.safe_load import foreign_file, safe_torch_load
from weakclip.write_errors import writing

__all__ = [
    "capture_rng_state",
    "check_shapes",
    "check_training_checkpoint",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint_file",
    "restore_rng_state",
    "best_checkpoint_path",
    "save_best_checkpoint",
    "save_checkpoint",
    "trainable_state_dict",
]

_NAME = re.compile(r"^iter_(\d+)\.pth$")


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "checkpoints"


def _atomic_replace(path: Path, write, kept: str | None = None, what: str = "checkpoint") -> None:
    """Write ``path`` through a temporary file renamed over it; a full or read-only disk is a one-line
    :class:`~weakclip.errors.OutputError` saying ``kept`` (the temporary file removed)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with writing(path, kept, what=what):  # the free space is measured before the partial file goes
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kept_checkpoint(workdir: str | Path) -> str:
    """What a failed checkpoint write keeps: the last complete checkpoint, to resume from."""
    last = latest_checkpoint(workdir)
    if last is None:
        return "no complete checkpoint exists yet: free some space and run the same command again"
    return (f"the last complete checkpoint, {last.name}, is kept: free some space and run the same command "
            f"again (with --resume for train/retrain) to go on from it")


def trainable_state_dict(model: nn.Module, include_frozen: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters and every buffer (detached CPU copies); frozen parameters left out unless
    ``include_frozen`` (towers without a weights file are random: the checkpoint must then hold them)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and not include_frozen}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def check_shapes(model: nn.Module, state: dict[str, Any], source: str = "checkpoint") -> None:
    """WeakclipError (one line) when tensors of ``state`` have other shapes than ``model``'s of the same name
    (a network of other settings: another preset, class count or architecture), instead of PyTorch's
    many-line list of size mismatches."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise WeakclipError(f"{source} does not fit the model: {len(wrong)} tensors of other shapes ("
                            f"{'; '.join(wrong[:2])}): it holds a network of other settings; use those "
                            "settings (its config.yaml) or another work folder")


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Load what :func:`trainable_state_dict` saved; every trainable parameter must be there, of its shape."""
    check_shapes(model, state, source)
    result = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trainable)
    if missing or result.unexpected_keys:
        shown = ", ".join((missing + list(result.unexpected_keys))[:5])
        raise WeakclipError(f"{source} does not fit the model (missing or unexpected: {shown})")


def capture_rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["key"]
        key = np.asarray(key.numpy() if torch.is_tensor(key) else key, dtype=np.uint32)
        numpy_state = (numpy_state["bit_generator"], key, int(numpy_state["pos"]),
                       int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"]))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(workdir: str | Path) -> list[Path]:
    """Checkpoint files of ``workdir``, oldest first."""
    folder = checkpoint_dir(workdir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(workdir: str | Path, state: dict[str, Any], iteration: int, keep: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/iter_<iteration>.pth`` atomically, point ``latest`` at it and
    delete all but the newest ``keep`` checkpoints. Returns the checkpoint's path."""
    folder = checkpoint_dir(workdir)
    path = folder / f"iter_{int(iteration):07d}.pth"
    kept = _kept_checkpoint(workdir)
    _atomic_replace(path, lambda fh: torch.save(state, fh), kept)
    _atomic_replace(folder / "latest", lambda fh: fh.write((path.name + "\n").encode("utf-8")), kept,
                    what="checkpoint pointer")
    if keep > 0:
        for old in list_checkpoints(workdir)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def best_checkpoint_path(workdir: str | Path) -> Path:
    """``checkpoints/best.pth``: the model of the best periodic evaluation (``train.eval_every``)."""
    return checkpoint_dir(workdir) / "best.pth"


def save_best_checkpoint(workdir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (``iteration``, ``model``, ...) atomically as :func:`best_checkpoint_path`."""
    path = best_checkpoint_path(workdir)
    _atomic_replace(path, lambda fh: torch.save(state, fh), "the previous best.pth (if any) and "
                    + _kept_checkpoint(workdir), what="best checkpoint")
    return path


def latest_checkpoint(workdir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at (falling back to the newest file), or None."""
    folder = checkpoint_dir(workdir)
    pointer = folder / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if name and (folder / name).is_file():
            return folder / name
    found = list_checkpoints(workdir)
    return found[-1] if found else None


def read_checkpoint_file(path: str | Path) -> Any:
    """Whatever a ``.pth`` file holds, read with ``torch.load(weights_only=True)`` (no extra types allowed);
    WeakclipError (one line) when it is missing, unreadable or needs types outside that set."""
    return safe_torch_load(path, what="checkpoint")


def check_training_checkpoint(state: Any, path: str | Path) -> dict[str, Any]:
    """``state`` when it is a weakclip training checkpoint, else WeakclipError."""
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise foreign_file(path, state, "a weakclip training checkpoint (iteration, model, config)")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (refinement or retraining), loaded with ``weights_only=True``."""
    return check_training_checkpoint(read_checkpoint_file(path), path)
