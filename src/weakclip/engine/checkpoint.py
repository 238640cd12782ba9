"""Training checkpoints: atomic writes, a ``latest`` pointer, the last N kept, RNG states.

Layout under the work folder::

    checkpoints/iter_0002000.pth   one file per saved iteration
    checkpoints/latest             text file naming the newest checkpoint file (written last)
    checkpoints/best.pth           with periodic evaluation: the model of the best evaluation so far

A checkpoint is written to a hidden temporary file in the same folder and renamed over its final
name (``os.replace``), then ``latest`` is replaced the same way; a process killed at any moment
leaves either the previous state or the new one, never a half-written file under a final name.

Contents (a dict, loaded with ``torch.load(weights_only=False)``: open only your own files)::

    "iteration"     number of finished iterations (the next one to run)
    "model"         trainable parameters and all buffers of the model (frozen CLIP weights are left
                    out: they come from the CLIP weights file; without one the towers are random,
                    tests only, and are stored too)
    "clip_weights"  the CLIP weights file the towers were built from (None: random towers)
    "optimizer", "scaler", "schedule"   state dicts (scaler None without fp16)
    "config"        the Config as a dict
    "rng"           per-rank RNG states: python, numpy, torch CPU, CUDA (list indexed by rank)
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

__all__ = [
    "capture_rng_state",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "best_checkpoint_path",
    "save_best_checkpoint",
    "save_checkpoint",
    "trainable_state_dict",
]

_NAME = re.compile(r"^iter_(\d+)\.pth$")


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "checkpoints"


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def trainable_state_dict(model: nn.Module, include_frozen: bool = False) -> dict[str, torch.Tensor]:
    """Trainable parameters and every buffer (detached CPU copies); frozen parameters left out unless
    ``include_frozen`` (towers without a weights file are random: the checkpoint must then hold them)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and not include_frozen}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Load what :func:`trainable_state_dict` saved; every trainable parameter must be there."""
    result = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trainable)
    if missing or result.unexpected_keys:
        shown = ", ".join((missing + list(result.unexpected_keys))[:5])
        raise WeakclipError(f"{source} does not fit the model (missing or unexpected: {shown})")


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    _atomic_replace(path, lambda fh: torch.save(state, fh))
    _atomic_replace(folder / "latest", lambda fh: fh.write((path.name + "\n").encode("utf-8")))
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
    _atomic_replace(path, lambda fh: torch.save(state, fh))
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise WeakclipError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling failures come in many types
        raise WeakclipError(f"cannot read checkpoint {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise WeakclipError(f"{path} is not a weakclip training checkpoint")
    return state
