"""The trained network as a Python object: ``weakclip.load(PATH)`` -> :class:`Segmenter`.

``PATH`` may be any network this package or the authors make:

* a retraining checkpoint (``weakclip retrain``: ``checkpoints/iter_*.pth``) or its work folder (latest
  checkpoint; ``best=True``: ``checkpoints/best.pth`` where the stage kept one): the DeepLab-v1 ResNet-38 of
  the ``voc`` / ``coco`` presets (kind ``"deeplabv1-resnet38"``) or a torchvision DeepLab of the ``-plus``
  presets (kind ``"torchvision"``);
* a ``weakclip run`` work folder: its final network (the last stage that holds a checkpoint, ``retrain``
  once it has run) by default, ``stage="refine"`` for the refinement model;
* a refinement checkpoint or work folder (``weakclip train``; kind ``"refinement"``) and the authors'
  released WeakCLIP ``.pth`` (mmseg; kind ``"release-refinement"``);
* the authors' released DeepLab-v1 ResNet-38 state dict (the file ``retrain --eval-only`` evaluates; kind
  ``"release-deeplabv1"``; 21 classes: VOC and the ``voc`` preset's evaluation, 81 / 91: COCO and ``coco``'s);
* a training checkpoint or work folder of another method (:mod:`weakclip.methods`: the method the
  checkpoint names loads it through its ``"load"`` entry point), e.g. ExCEL's (``weakclip train --preset
  excel-voc``; kind ``"excel"``, :mod:`weakclip.methods.excel.segmenter`), and a ``weakclip run`` folder of
  that method (``run.json`` names it): the last of its network stages that holds a checkpoint (ExCEL:
  ``retrain`` when it was run, else ``train``), ``stage=`` for another.

Every file is read with ``torch.load(weights_only=True)``. A file that is none of these fails with one line
saying what it holds and what was expected.

Test-time settings (:attr:`Segmenter.settings`) default to the network's own evaluation: for a retrained
network its config's ``eval`` section, exactly what ``retrain`` evaluation computes
(:func:`weakclip.retrain.evaluate.predict_probs`, then the dense CRF as configured); for the refinement model
its ``pseudo`` section (multi-scale sliding windows,
:func:`weakclip.inference.sliding.multiscale_inference_batch`, then the CRF of ``pseudo.crf``).
:meth:`Segmenter.configure` changes them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weakclip.errors import WeakclipError
from weakclip.methods import RUN_RECORD
from weakclip.segmenters import RefinementSegmenter, RetrainedSegmenter, Segmenter, as_rgb_array

__all__ = ["KINDS", "Segmenter", "as_rgb_array", "load"]

#: The kinds of network :func:`load` returns.
KINDS: tuple[str, ...] = ("deeplabv1-resnet38", "torchvision", "refinement", "release-refinement",
                          "release-deeplabv1", "excel")

_EXPECTED = ("a weakclip retraining, refinement or ExCEL checkpoint (a dict with iteration, model and "
             "config), a work folder of one (checkpoints/), a weakclip run work folder, the authors' "
             "released DeepLab-v1 ResNet-38 state dict or their WeakCLIP mmseg checkpoint")


def network_stages() -> tuple[str, ...]:
    """Every stage name of a ``weakclip run`` work folder that holds a network, over all methods."""
    from weakclip.methods import all_network_stages

    return all_network_stages()


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeakclipError(f"device {device} asked for, but no CUDA device is visible to PyTorch")
    return device


# ============================================================================ loading
def _wrong_kind(path: Path, obj: Any) -> WeakclipError:
    from weakclip.safe_load import foreign_file

    return foreign_file(path, obj, _EXPECTED)


def _is_run_folder(path: Path) -> bool:
    return (path / RUN_RECORD).is_file() or any((path / s / "checkpoints").is_dir() for s in network_stages())


def _run_method(path: Path):
    """The method a ``weakclip run`` folder belongs to: the one its ``run.json`` names (WeakCLIP without
    one, or without the file)."""
    from weakclip.methods import DEFAULT_METHOD, get, of_folder

    return of_folder(path) or get(DEFAULT_METHOD)


def _run_stage(path: Path, stage: str | None) -> str:
    """The stage of the run folder ``path`` to load: ``stage`` (one of its method's network stages), else
    the last of them that holds a checkpoint; one line when there is none."""
    from weakclip.engine.checkpoint import latest_checkpoint

    info = _run_method(path)
    stages = info.network_stages
    if stage is not None and stage not in stages:
        raise WeakclipError(f"the {info.title} run {path} has no network stage {stage!r}; its network "
                            f"stages: {', '.join(stages)}")
    if stage is not None:
        return stage
    present = [s for s in stages if latest_checkpoint(path / s) is not None]
    if not present:
        folders = " or ".join(f"{path / s}/checkpoints" for s in stages)
        raise WeakclipError(f"the {info.title} run {path} holds no trained network yet (no checkpoint in "
                            f"{folders}): let weakclip run train one first")
    return present[-1]


def _resolve(folder: Path, best: bool) -> Path:
    from weakclip.engine.checkpoint import best_checkpoint_path
    from weakclip.inference.loading import resolve_checkpoint

    if best and folder.is_dir() and not best_checkpoint_path(folder).is_file():
        raise WeakclipError(f"no best checkpoint in {folder} ({best_checkpoint_path(folder)}): only a "
                            "refinement trained with periodic evaluation (train.eval_every > 0) keeps one; "
                            "leave out best for the latest checkpoint")
    return resolve_checkpoint(folder, best=best)


def _checkpoint_file(path: Path, best: bool, stage: str | None) -> tuple[Path, str]:
    """``(checkpoint file, where)`` for a file or a work folder (training or ``weakclip run``)."""

    if not path.exists():
        raise WeakclipError(f"checkpoint not found: {path}")
    stages = network_stages()
    if stage is not None and stage not in stages:
        raise WeakclipError(f"stage {stage!r} holds no network; choose {' or '.join(stages)}")
    if path.is_dir() and not (path / "checkpoints").is_dir() and _is_run_folder(path):
        stage = _run_stage(path, stage)
        folder = path / stage
        if not (folder / "checkpoints").is_dir():
            raise WeakclipError(f"the weakclip run {path} has no {stage} checkpoint yet "
                                f"({folder}/checkpoints)")
        return _resolve(folder, best), f" ({stage} stage of the weakclip run {path})"
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise WeakclipError(f"{path} is a folder without checkpoints/ or run.json; expected {_EXPECTED}")
    if best and not path.is_dir():
        raise WeakclipError(f"best takes a work folder (its checkpoints/best.pth), got the file {path}")
    return _resolve(path, best), ""


def load(path: str | Path, device: str | torch.device | None = None, *, stage: str | None = None,
         best: bool = False, clip_weights: str | Path | None = None,
         classes: str | Path | Sequence[str] | None = None) -> Segmenter:
    """Load any trained network of this package or of the authors as a :class:`Segmenter`.

    Args:
        path: a checkpoint file, a training or retraining work folder (its latest checkpoint), or a
            ``weakclip run`` work folder (see the module docstring).
        device: where to run (default: CUDA when available, else the CPU).
        stage: for a ``weakclip run`` folder: one of its method's network stages (WeakCLIP: ``"refine"``,
            ``"retrain"``; ExCEL: ``"train"``, ``"retrain"``); default: the last that holds a checkpoint
            (the final network). For a plain work folder or file it must match what the file holds.
        best: the work folder's ``checkpoints/best.pth`` (kept by periodic evaluation) instead of the latest.
        clip_weights: the CLIP weights file, for refinement and ExCEL checkpoints that do not hold the
            frozen towers (default: the file the checkpoint records).
        classes: the class names, for checkpoints written before checkpoints stored them whose dataset is
            not where it was (``--classes``): a class-list file (one name per line, ``background`` first),
            ``"voc"`` / ``"coco"`` / ``"coco91"``, or a list of names; as many as the network predicts.
            Default: the names the checkpoint stores (then its dataset's, where still readable).

    Raises:
        WeakclipError: one line: a missing path, a file of another kind (what it holds, what was expected),
            weights that do not fit.
    """
    from weakclip.data.classes import given_classes
    from weakclip.methods import DEFAULT_METHOD, entry, of_checkpoint
    from weakclip.models.release_checkpoint import RELEASE_ALLOWED_GLOBALS, is_release_checkpoint
    from weakclip.safe_load import safe_torch_load

    path = Path(path)
    given = given_classes(classes)
    device = _resolve_device(device)
    file, where = _checkpoint_file(path, best, stage)
    obj = safe_torch_load(file, allow=RELEASE_ALLOWED_GLOBALS, what="checkpoint")
    if is_release_checkpoint(obj):
        found = "refine"
        seg = _load_refinement(file, where, obj, device, clip_weights, given)
    elif isinstance(obj, Mapping) and "iteration" in obj and "model" in obj:
        config = obj.get("config")
        if not isinstance(config, Mapping):
            raise WeakclipError(f"{file} is a training checkpoint without a config; expected {_EXPECTED}")
        method = of_checkpoint(obj)
        if "eval" in config:
            found = "retrain"
            seg = _load_retrained(file, where, obj, device, given)
        elif method.name != DEFAULT_METHOD:  # another method's network: its own loader
            found = method.network_stages[0]
            seg = entry(method, "load")(file, obj, where=where, device=device, clip_weights=clip_weights,
                                        classes=given)
        else:
            found = "refine"
            seg = _load_refinement(file, where, obj, device, clip_weights, given)
    elif _is_deeplabv1_state(obj):
        found = "retrain"
        seg = _load_release_deeplabv1(file, obj, device, given)
    else:
        raise _wrong_kind(file, obj)
    if found == "retrain" and clip_weights is not None:
        print(f"note: --clip-weights {clip_weights} is not used: {file} holds a {seg.kind} network, which "
              f"has no CLIP towers", file=sys.stderr)
    if stage is not None and not where and stage != found:
        raise WeakclipError(f"{file} holds a {seg.kind} network ({found} stage), not the {stage} stage's")
    return seg


# ---------------------------------------------------------------------------- retrained networks
def _is_deeplabv1_state(obj: Any) -> bool:
    from weakclip.retrain.deeplabv1 import state_dict_of

    try:
        state = state_dict_of(obj, "")
    except WeakclipError:
        return False
    return "backbone.conv1a.weight" in state and "cls_conv.weight" in state


def _dataset_classes(kind: str, root: str | None) -> list[str] | None:
    from weakclip.data.classes import COCO91_CLASSES, COCO_CLASSES, VOC_CLASSES, read_class_file

    table = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "coco91": COCO91_CLASSES}
    if kind in table:
        return list(table[kind])
    if root and (Path(root) / "classes.txt").is_file():
        return read_class_file(Path(root) / "classes.txt")
    return None


def _class_count(state: Mapping[str, torch.Tensor], cfg) -> int:
    """The number of classes a retrained state dict predicts: the output channels of the layer whose shape
    changes with the class count (found by building the network for 2 and 3 classes)."""
    from weakclip.retrain.train import build_model

    a = build_model(cfg, 2, pretrained=False).net.state_dict()
    b = build_model(cfg, 3, pretrained=False).net.state_dict()
    for key, value in a.items():
        if key in b and value.shape != b[key].shape and key in state:
            return int(state[key].shape[0])
    raise WeakclipError(f"cannot tell the class count of the {cfg.model.name} state dict")


def _retrained_network(cfg, state: dict[str, torch.Tensor], classes: list[str] | None, source: Path, *,
                       names_may_be_stale: bool = False, given: bool = False):
    """``(network in eval mode, classes, note)``; ``classes`` None (or, with ``names_may_be_stale``, a list
    whose length does not fit the state) -> numbered names for the state's class count. ``given``: the names
    came from the user (``--classes``): a count that does not fit is a one-line error saying so."""
    from weakclip.errors import WeightsError
    from weakclip.inference.loading import CLASSES_HINT
    from weakclip.retrain.deeplabv1 import fit_state_dict
    from weakclip.retrain.train import build_model

    note = ""
    if classes is not None:
        model = build_model(cfg, len(classes), pretrained=False)
        try:
            fit_state_dict(model, state, source)
            return model.eval(), classes, "; class names given" if given else note
        except WeightsError:
            k = _class_count(state, cfg)
            if given and k != len(classes):
                raise WeakclipError(f"the class list given (--classes) has {len(classes)} names, but the "
                                    f"network of {source} predicts {k} classes: give the list it was trained "
                                    "with") from None
            if not names_may_be_stale:
                raise
            note = f"; its dataset's classes.txt now lists {len(classes)}"
    k = _class_count(state, cfg)
    classes = ["background", *(f"class_{i}" for i in range(1, k))]
    hint = CLASSES_HINT.split(" (")[0]
    note = (note or "; class names not found") + f", classes numbered ({hint} for names)"
    model = build_model(cfg, k, pretrained=False)
    fit_state_dict(model, state, source)
    return model.eval(), classes, note


def _load_retrained(file: Path, where: str, obj: Mapping[str, Any], device: torch.device,
                    given: list[str] | None = None) -> Segmenter:
    from weakclip.data.classes import stored_classes, stored_palette
    from weakclip.retrain.deeplabv1 import MODEL_NAME, state_dict_of
    from weakclip.retrain.train import RetrainConfig, norm_stats

    cfg = RetrainConfig.from_dict(dict(obj["config"]), source=f"config of {file}")
    state = state_dict_of(obj["model"], file)
    stored = stored_classes(obj, f"checkpoint {file}")
    if given is not None or stored is not None:  # given by the user, or stored with the network
        model, classes, note = _retrained_network(cfg, state, given or stored, file, given=given is not None)
    else:  # a checkpoint written before they were stored: its dataset's, where still readable
        classes = _dataset_classes(cfg.data.kind, cfg.data.root)
        # a folder dataset's classes.txt may have changed since training: the network's class count wins
        model, classes, note = _retrained_network(cfg, state, classes, file,
                                                  names_may_be_stale=cfg.data.kind == "folder")
    mean, std = norm_stats(cfg.data.normalize)
    release = cfg.model.name.strip().lower() == MODEL_NAME
    kind = "deeplabv1-resnet38" if release else "torchvision"
    name = "DeepLab-v1 ResNet-38" if release else f"torchvision {cfg.model.name}"
    description = (f"{name} (weakclip retrain checkpoint, iteration {obj.get('iteration')}, {len(classes)} "
                   f"classes{note}) from {file}{where}")
    palette = None if given is not None else stored_palette(obj, len(classes))
    return RetrainedSegmenter(kind=kind, description=description, classes=classes, mean=mean, std=std,
                               network=model.to(device), device=device, eval_cfg=cfg.eval, palette=palette)


def _load_release_deeplabv1(file: Path, obj: Any, device: torch.device,
                            given: list[str] | None = None) -> Segmenter:
    from weakclip.retrain.deeplabv1 import state_dict_of
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, norm_stats

    state = state_dict_of(obj, file)
    k = int(state["cls_conv.weight"].shape[0])
    preset = "voc" if k == 21 else "coco"
    classes = given or _dataset_classes({21: "voc", 81: "coco", 91: "coco91"}.get(k, "folder"), None)
    width = 64 // max(1, int(state["backbone.conv1a.weight"].shape[0]))
    cfg = apply_retrain_overrides(load_retrain_preset(preset), [f"model.width_divisor={width}"])
    model, classes, note = _retrained_network(cfg, state, classes, file, given=given is not None)
    mean, std = norm_stats(cfg.data.normalize)
    description = (f"DeepLab-v1 ResNet-38 (the authors' released checkpoint, {len(classes)} classes{note}; "
                   f"the {preset} preset's evaluation) from {file}")
    return RetrainedSegmenter(kind="release-deeplabv1", description=description, classes=classes, mean=mean,
                               std=std, network=model.to(device), device=device, eval_cfg=cfg.eval)


# ---------------------------------------------------------------------------- refinement models
def _load_refinement(file: Path, where: str, raw, device: torch.device, clip_weights,
                     given: list[str] | None = None) -> Segmenter:
    from weakclip.data.classes import stored_palette
    from weakclip.inference.loading import load_trained_model, normalization_of

    model, cfg = load_trained_model(file, clip_weights, device=device, raw=raw, classes=given)
    mean, std = normalization_of(cfg)
    if "iteration" not in raw:
        kind, what = "release-refinement", "the authors' release checkpoint"
    else:
        kind, what = "refinement", f"weakclip train checkpoint, iteration {raw.get('iteration')}"
    note = "; class names given" if given is not None else ""
    description = (f"WeakCLIP refinement model ({what}, CLIP {cfg.model.clip_arch}, {len(cfg.classes)} "
                   f"classes{note}) from {file}{where}")
    palette = None if given is not None else stored_palette(raw, len(cfg.classes))
    return RefinementSegmenter(kind=kind, description=description, classes=cfg.classes, mean=mean, std=std,
                                device=device, model=model, cfg=cfg, palette=palette)
