"""Load a trained refinement model from a training checkpoint (``weakclip train``'s output) or from one
of the authors' released checkpoints (mmseg ``.pth``, e.g. ``train_74p03_iter_8000.pth``).

Our checkpoint holds the trainable parameters and the config, not the frozen CLIP towers: those come
from a CLIP weights file, the one the model was trained with. A release checkpoint holds everything (the
towers and the BatchNorm statistics included): no CLIP weights file is read
(:mod:`weakclip.models.release_checkpoint`). Every file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from weakclip.errors import WeakclipError

__all__ = [
    "CLASSES_HINT", "load_trained_model", "normalization_of", "refinement_class_count", "release_config",
    "resolve_checkpoint", "trained_classes",
]


def resolve_checkpoint(path: str | Path, best: bool = False) -> Path:
    """A checkpoint file, or a training work folder (its latest checkpoint; with ``best`` the
    ``checkpoints/best.pth`` of its periodic evaluation)."""
    from weakclip.engine.checkpoint import best_checkpoint_path, latest_checkpoint

    path = Path(path)
    if best:
        if not path.is_dir():
            raise WeakclipError(f"--best takes the training work folder, got {path}")
        found = best_checkpoint_path(path)
        if not found.is_file():
            raise WeakclipError(f"no best checkpoint in {path}: it is written by training with "
                                "train.eval_every > 0")
        return found
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise WeakclipError(f"no checkpoint in {path} (expected {path}/checkpoints/iter_*.pth)")
        return found
    if not path.is_file():
        raise WeakclipError(f"checkpoint not found: {path}")
    return path


def _recorded_clip_weights(state: Mapping[str, Any]) -> str | None:
    """The CLIP weights path a checkpoint records, if any (top level, config, or its model section)."""
    config = state.get("config") or {}
    for where in (state, config, config.get("model") or {}, config.get("train") or {}):
        value = where.get("clip_weights") if isinstance(where, Mapping) else None
        if value:
            return str(value)
    return None


def _holds_towers(model_state: Mapping[str, Any]) -> bool:
    return any(k.startswith("image_tower.") for k in model_state) and \
        any(k.startswith("text_tower.") for k in model_state)


def _load_everything(model, model_state: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint that holds the whole model, frozen towers included (every key must fit)."""
    from weakclip.engine.checkpoint import check_shapes

    check_shapes(model, dict(model_state), f"checkpoint {path}")
    result = model.load_state_dict(dict(model_state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        shown = ", ".join((list(result.missing_keys) + list(result.unexpected_keys))[:5])
        raise WeakclipError(f"checkpoint {path} does not fit the model (missing or unexpected: {shown})")


#: What every message about missing class names tells the user to do.
CLASSES_HINT = ("pass --classes FILE (the class list it was trained with, one name per line, background "
                "first; weakclip.load(..., classes=FILE))")


def _dataset_class_file(root) -> list[str] | None:
    from weakclip.data.classes import read_class_file

    if root and (Path(root) / "classes.txt").is_file():
        return read_class_file(Path(root) / "classes.txt")
    return None


def _check_given_count(given: list[str], count: int | None, what: str) -> None:
    if count is not None and len(given) != count:
        shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
        raise WeakclipError(f"the class list given (--classes) has {len(given)} names ({shown}), but {what} "
                            f"predicts {count} classes: give the list it was trained with")


def refinement_class_count(model_state: Mapping[str, Any]) -> int | None:
    """The number of classes a refinement state dict predicts (its classifier's output channels)."""
    weight = model_state.get("head.classifier.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def trained_classes(cfg, state: Mapping[str, Any] | None = None, given: list[str] | None = None,
                    source: str = "the checkpoint") -> list[str]:
    """The class list the model was trained on: ``given`` (``--classes``) first, then the names the
    checkpoint ``state`` stores, ``cfg.classes``, the dataset kind's list, a folder dataset's
    ``classes.txt`` where it is still readable; else one line saying to pass ``--classes``."""
    from weakclip.data.classes import COCO91_CLASSES, COCO_CLASSES, VOC_CLASSES, stored_classes

    stored = stored_classes(state, source) if state is not None else None
    if given is not None:
        count = len(stored) if stored is not None else None
        if count is None and state is not None and isinstance(state.get("model"), Mapping):
            count = refinement_class_count(state["model"])
        _check_given_count(given, count, f"the network of {source}")
        return list(given)
    if stored is not None:
        return stored
    if cfg.classes:
        return list(cfg.classes)
    kind = cfg.data.kind
    if kind == "voc":
        return list(VOC_CLASSES)
    if kind == "coco":
        return list(COCO_CLASSES)
    if kind == "coco91":
        return list(COCO91_CLASSES)
    found = _dataset_class_file(cfg.data.root)
    if found is not None:
        return found
    raise WeakclipError(f"{source} stores no class names (written before checkpoints kept them) and its "
                        f"folder dataset's {cfg.data.root}/classes.txt is not readable here: {CLASSES_HINT}")


def normalization_of(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (0-255, RGB) the model was trained with."""
    from weakclip.data.normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return (IMAGENET_MEAN, IMAGENET_STD) if cfg.data.normalize == "imagenet" else (CLIP_MEAN, CLIP_STD)


def release_config(model_cfg, classes: list[str]):
    """The run config of a release checkpoint: the ``voc`` preset (21 classes) or ``coco`` (otherwise)
    with the checkpoint's model section, its classes and the release's ImageNet normalisation."""
    from weakclip.config import load_preset

    cfg = load_preset("voc" if len(classes) == 21 else "coco")
    cfg.model = model_cfg
    cfg.classes = list(classes)
    cfg.data.normalize = "imagenet"
    return cfg


def _unused_clip_weights(clip_weights, why: str) -> None:
    """One note on stderr when a CLIP weights file was given but the checkpoint does not need it."""
    if clip_weights is not None:
        print(f"note: --clip-weights {clip_weights} is not used: {why}", file=sys.stderr)


def load_trained_model(checkpoint: str | Path, clip_weights: str | Path | None = None,
                       device: str | torch.device = "cpu", *, best: bool = False, raw: Any = None,
                       note_unused: bool = True, classes: list[str] | None = None):
    """Rebuild the trained model in eval mode -> ``(model, config)``.

    Args:
        checkpoint: a ``checkpoints/iter_*.pth`` file, the training work folder (latest checkpoint), or a
            release checkpoint of the authors (then ``clip_weights`` is not needed and is ignored; the
            config is the ``voc``/``coco`` preset with the checkpoint's model, classes and ImageNet
            normalisation).
        clip_weights: the CLIP weights file the model was trained with; default: the path the
            checkpoint records, when it exists. Unused when the checkpoint holds the towers itself
            (the engine stores them when it trained without a weights file).
        device: where to put the model.
        best: take the work folder's ``checkpoints/best.pth`` (periodic evaluation) instead of the latest.
        note_unused: say on stderr when ``clip_weights`` is not needed (off where the caller passes it
            on from a run that used it for other stages).
        raw: what the checkpoint file holds, when the caller has read it already (``checkpoint`` is then
            that file): it is not read again.
        classes: class names that replace the ones the checkpoint stores (``--classes``: for checkpoints
            written before they were stored, whose dataset is gone); their count must be the network's.

    Raises:
        WeakclipError: unreadable checkpoint, missing CLIP weights (one line: pass --clip-weights),
            or weights that do not fit.
    """
    from weakclip.config import Config
    from weakclip.engine.checkpoint import (
        check_training_checkpoint,
        load_trainable_state_dict,
        read_checkpoint_file,
    )
    from weakclip.methods import DEFAULT_METHOD, check_same, of_checkpoint
    from weakclip.models.release_checkpoint import is_release_checkpoint, load_release_checkpoint
    from weakclip.models.weakclip import build_model

    path = resolve_checkpoint(checkpoint, best=best)
    if raw is None:
        raw = read_checkpoint_file(path)
    if is_release_checkpoint(raw):
        model, model_cfg, classes, _ = load_release_checkpoint(path, raw, classes=classes)
        unused = clip_weights if note_unused else None
        _unused_clip_weights(unused, f"{path} is the authors' release checkpoint, which holds the towers")
        return model.to(device), release_config(model_cfg, classes)
    state = check_training_checkpoint(raw, path)
    found = of_checkpoint(state)
    if found.name != DEFAULT_METHOD:  # e.g. an ExCEL checkpoint: one line naming what takes it
        check_same(found, DEFAULT_METHOD, str(path),
                   f"this command needs the WeakCLIP refinement model; weakclip predict, weakclip export and "
                   f"weakclip.load take the {found.title} network, weakclip train --preset "
                   f"{found.presets[0]} --resume continues its training")
    if not isinstance(state.get("config"), Mapping):
        raise WeakclipError(f"checkpoint {path} holds no config")
    cfg = Config.from_dict(dict(state["config"]), source=f"config of {path}")
    classes = trained_classes(cfg, state, classes, source=f"checkpoint {path}")
    cfg.classes = classes
    if _holds_towers(state["model"]):
        # trained without a weights file: the checkpoint carries the towers it was trained with
        unused = clip_weights if note_unused else None
        _unused_clip_weights(unused, f"{path} holds the CLIP towers it was trained with")
        model = build_model(cfg.model, classes, pretrained_download=False)
        _load_everything(model, state["model"], path)
        model.eval()
        return model.to(device), cfg
    if clip_weights is None:
        recorded = _recorded_clip_weights(state)
        if recorded is not None and Path(recorded).is_file():
            clip_weights = recorded
        else:
            where = f" (it records {recorded}, which is not there)" if recorded else ""
            raise WeakclipError(
                f"checkpoint {path} needs the CLIP weights it was trained with{where}: "
                f"pass --clip-weights FILE ({cfg.model.clip_arch})"
            )
    if not Path(clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {clip_weights}")
    model = build_model(cfg.model, classes, clip_weights=clip_weights, pretrained_download=False)
    load_trainable_state_dict(model, state["model"], f"checkpoint {path}")
    model.eval()
    return model.to(device), cfg
