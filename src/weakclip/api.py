"""The trained network as a Python object: ``weakclip.load(PATH)`` -> :class:`Segmenter`.

``PATH`` may be any network this package or the authors make:

* a retraining checkpoint (``weakclip retrain``: ``checkpoints/iter_*.pth``) or its work folder (latest
  checkpoint; ``best=True``: ``checkpoints/best.pth`` where the stage kept one): the DeepLab-v1 ResNet-38 of
  the ``voc`` / ``coco`` presets (kind ``"deeplabv1-resnet38"``) or a torchvision DeepLab of the ``-plus``
  presets (kind ``"torchvision"``);
* a ``weakclip run`` work folder: its final network (the ``retrain`` stage) by default, ``stage="refine"``
  for the refinement model;
* a refinement checkpoint or work folder (``weakclip train``; kind ``"refinement"``) and the authors'
  released WeakCLIP ``.pth`` (mmseg; kind ``"release-refinement"``);
* the authors' released DeepLab-v1 ResNet-38 state dict (the file ``retrain --eval-only`` evaluates; kind
  ``"release-deeplabv1"``; 21 classes: VOC and the ``voc`` preset's evaluation, 81 / 91: COCO and ``coco``'s).

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

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import WeakclipError

__all__ = ["KINDS", "Segmenter", "as_rgb_array", "load"]

#: The kinds of network :func:`load` returns.
KINDS: tuple[str, ...] = ("deeplabv1-resnet38", "torchvision", "refinement", "release-refinement",
                          "release-deeplabv1")
#: The stages of a ``weakclip run`` work folder that hold a network.
RUN_STAGES: tuple[str, ...] = ("refine", "retrain")

_EXPECTED = ("a weakclip retraining or refinement checkpoint (a dict with iteration, model and config), "
             "a work folder of either (checkpoints/), a weakclip run work folder, the authors' released "
             "DeepLab-v1 ResNet-38 state dict or their WeakCLIP mmseg checkpoint")


# ============================================================================ images
def as_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an ``H x W x 3`` uint8 array -> ``H x W x 3`` uint8 C-contiguous array (one-line
    WeakclipError otherwise)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writeable copy
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise WeakclipError(f"an image array must be H x W x 3 uint8 (RGB), got {image.dtype} "
                                f"{'x'.join(map(str, image.shape))}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise WeakclipError(f"empty image array of shape {image.shape}")
        return np.ascontiguousarray(image)
    raise WeakclipError(f"expected a PIL image or an H x W x 3 uint8 array, got {type(image).__name__}")


def _as_batch(image_or_list: Any) -> tuple[list[np.ndarray], bool]:
    if isinstance(image_or_list, (list, tuple)):
        return [as_rgb_array(im) for im in image_or_list], True
    return [as_rgb_array(image_or_list)], False


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeakclipError(f"device {device} asked for, but no CUDA device is visible to PyTorch")
    return device


# ============================================================================ the segmenter
class Segmenter:
    """A trained segmentation network with its classes, normalisation and test-time settings.

    Attributes:
        kind: one of :data:`KINDS`.
        description: one line: what was loaded from where.
        classes: class names, index 0 background.
        palette: ``N x 3`` uint8 colours (N >= number of classes; the VOC palette).
        mean, std: the input normalisation, 0..255 scale, RGB order.
        settings: the test-time settings (JSON-able; change them with :meth:`configure`).
        network: the ``torch.nn.Module`` in eval mode: B x 3 x H x W float32 normalised
            (``(x - mean) / std``) -> B x K x H x W logits at the input size, one scale, no flip, no CRF
            (for the refinement model: one window, its text prompts built in).
        device: where ``network`` is.
    """

    kind: str
    description: str
    classes: list[str]
    palette: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    network: nn.Module
    device: torch.device

    def __init__(self, *, kind: str, description: str, classes: Sequence[str], mean: Sequence[float],
                 std: Sequence[float], network: nn.Module, device: torch.device) -> None:
        from weakclip.data.classes import voc_palette

        self.kind = kind
        self.description = description
        self.classes = list(classes)
        self.palette = voc_palette(max(256, len(self.classes)))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.network = network.eval()
        self.device = device

    def __repr__(self) -> str:
        return f"<weakclip.Segmenter {self.kind}: {self.description}>"

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> dict[str, Any]:
        """The test-time settings as a JSON-able dict."""
        raise NotImplementedError

    def configure(self, **changes: Any) -> Segmenter:
        """Change test-time settings by name (keys of :attr:`settings`), checked like the config files;
        returns ``self``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prediction
    def label_ids(self, labels: str | Sequence[str] | None) -> list[int] | None:
        """Class names (a list or ``"cat,dog"``) -> class ids; one-line WeakclipError for an unknown name."""
        from weakclip.inference.predict import parse_labels

        return parse_labels(labels, self.classes)

    def _run(self, images: list[np.ndarray],
             allowed: list[int] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(probabilities K x H x W float32, label map H x W uint8)`` of each image."""
        raise NotImplementedError

    def predict(self, image_or_list: Any, labels: str | Sequence[str] | None = None):
        """The label map(s), ``H x W`` uint8 class ids, with the test-time settings (scales, flip, CRF ...).

        ``image_or_list``: a PIL image, an ``H x W x 3`` uint8 RGB array, or a list of them (then a list
        comes back). ``labels``: class names known to be in the image(s); the prediction is restricted to
        them and background.
        """
        images, many = _as_batch(image_or_list)
        allowed = self.label_ids(labels)
        out = [label for _, label in self._run(images, allowed)]
        return out if many else out[0]

    def predict_proba(self, image_or_list: Any, labels: str | Sequence[str] | None = None):
        """Class probabilities ``K x H x W`` float32 (one map per image for a list) with the test-time
        settings: scales, flip and their fusion, ``labels`` restricting (the other classes 0). When the dense
        CRF is on, these are the probabilities it starts from; :meth:`predict` returns its label map."""
        images, many = _as_batch(image_or_list)
        allowed = self.label_ids(labels)
        out = [probs for probs, _ in self._run(images, allowed)]
        return out if many else out[0]

    def predict_batch(self, images: Sequence[np.ndarray], labels: str | Sequence[str] | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(probabilities, label map)`` of each image of a list (what :meth:`predict_proba` and
        :meth:`predict` return), computing each once. The refinement model runs the windows of all the
        images together; a retrained network runs one image at a time (exactly its evaluation)."""
        return self._run([as_rgb_array(im) for im in images], self.label_ids(labels))


def _restrict(probs: torch.Tensor, allowed: list[int] | None) -> torch.Tensor:
    """Probabilities of the background and ``allowed`` classes, renormalised; the others 0."""
    from weakclip.inference.pseudo_masks import restrict_probs

    if allowed is None:
        return probs
    multi_hot = np.zeros(probs.shape[0], dtype=np.float32)
    multi_hot[allowed] = 1.0
    keys, kept = restrict_probs(probs, multi_hot)
    full = torch.zeros_like(probs)
    full[keys] = kept
    return full


class _RetrainedSegmenter(Segmenter):
    """A retrained DeepLab (ours or the authors'): ``retrain`` evaluation's predict_probs and CRF."""

    def __init__(self, *, eval_cfg, **kwargs) -> None:
        super().__init__(**kwargs)
        self._eval = eval_cfg

    @property
    def settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable
        from weakclip.retrain.train import crf_params_of

        out = {k: v for k, v in dataclasses.asdict(self._eval).items() if k != "max_images"}
        params = crf_params_of(self._eval)
        out["crf_values"] = None if params is None else dataclasses.asdict(params)
        return jsonable(out)

    def configure(self, **changes: Any) -> Segmenter:
        from weakclip.retrain.train import RetrainConfig

        known = {f.name for f in dataclasses.fields(self._eval)} - {"max_images"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise WeakclipError(f"unknown test-time setting(s) {', '.join(unknown)} of a {self.kind} "
                                f"network; known: {', '.join(sorted(known))}")
        raw = {**dataclasses.asdict(self._eval), **changes}
        self._eval = RetrainConfig.from_dict({"eval": raw}, source="test-time settings").eval
        return self

    def _run(self, images, allowed):
        from weakclip.retrain.evaluate import crf_present, predict_probs
        from weakclip.retrain.train import crf_params_of

        e = self._eval
        crf = crf_params_of(e)
        out = []
        for image in images:
            probs = predict_probs(self.network, image, self.mean, self.std, e.scales, e.flip, self.device,
                                  fuse=e.fuse, resize=e.resize, align_corners=e.align_corners)
            probs = _restrict(probs, allowed).numpy()
            if crf is not None and e.crf_classes == "present":
                label = crf_present(image, probs, crf)
            elif crf is not None:
                from weakclip.crf import dense_crf_numpy

                label = dense_crf_numpy(image, probs, crf).argmax(axis=0)
            else:
                label = probs.argmax(axis=0)
            out.append((probs.astype(np.float32, copy=False), label.astype(np.uint8)))
        return out


class _WindowLogits(nn.Module):
    """The refinement model as a plain network: normalised B x 3 x H x W -> logits B x K x H x W (bilinear
    from the model's stride-4 output, as the sliding-window inference resizes each window's).

    Accepts H and W that are multiples of the CLIP patch size (16 for ViT-B/16; the release runs 512 x 512
    windows); the positional embedding is interpolated to the patch grid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        logits = out["logits"] if isinstance(out, dict) else out
        return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _RefinementSegmenter(Segmenter):
    """The WeakCLIP refinement model: the ``pseudo`` section's multi-scale sliding windows and CRF."""

    def __init__(self, *, model: nn.Module, cfg, **kwargs) -> None:
        super().__init__(network=_WindowLogits(model), **kwargs)
        self._model = model.eval()
        self._cfg = cfg
        self._runner = None

    @property
    def settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable

        p = self._cfg.pseudo
        out = dataclasses.asdict(p)
        params = p.crf_params(self._cfg.data.kind)
        out["crf_values"] = None if params is None else dataclasses.asdict(params)
        return jsonable(out)

    def configure(self, **changes: Any) -> Segmenter:
        from weakclip.config import Config, PseudoMaskConfig

        known = {f.name for f in dataclasses.fields(PseudoMaskConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise WeakclipError(f"unknown test-time setting(s) {', '.join(unknown)} of a {self.kind} "
                                f"network; known: {', '.join(sorted(known))}")
        raw = self._cfg.to_dict()
        raw["pseudo"] = {**raw["pseudo"], **changes}
        self._cfg = Config.from_dict(raw, source="test-time settings")
        self._runner = None
        return self

    def _window_runner(self):
        from weakclip.inference.batching import WindowRunner

        p = self._cfg.pseudo
        if self._runner is None:
            self._runner = WindowRunner(self._model, len(self.classes), window_batch=p.window_batch,
                                        autocast_dtype=p.autocast_dtype(self.device))
        return self._runner

    def _run(self, images, allowed):
        from weakclip.crf import dense_crf
        from weakclip.inference.pseudo_masks import restrict_probs
        from weakclip.inference.sliding import multiscale_inference_batch

        p = self._cfg.pseudo
        k = len(self.classes)
        probs_list = multiscale_inference_batch(
            self._model, images, scales=p.scales, flip=p.flip, crop=p.crop, stride=p.stride, mean=self.mean,
            std=self.std, base_scale=p.base_scale, num_classes=k, window_batch=self._window_runner(),
            average=p.average, size_divisor=p.size_divisor, resize=p.resize)
        crf_params = p.crf_params(self._cfg.data.kind)
        multi_hot = None
        if allowed is not None:
            multi_hot = np.zeros(k, dtype=np.float32)
            multi_hot[allowed] = 1.0
        out = []
        for image, probs in zip(images, probs_list):
            keys, kept = restrict_probs(probs, multi_hot)
            full = torch.zeros_like(probs)
            full[keys] = kept
            if crf_params is not None:  # on the probabilities' device
                rgb = torch.from_numpy(image).to(kept.device).permute(2, 0, 1)[None].float()
                kept = dense_crf(kept[None].float(), rgb, crf_params, backend=p.crf_backend)[0]
            label = keys.cpu().numpy().astype(np.uint8)[kept.argmax(dim=0).cpu().numpy()]
            out.append((full.float().cpu().numpy(), label))
        return out


# ============================================================================ loading
def _describe(obj: Any) -> str:
    """What a loaded ``.pth`` object holds, in a few words."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            more = ", ..." if len(keys) > 3 else ""
            return f"a state dict of {len(keys)} tensors ({', '.join(keys[:3])}{more})"
        if isinstance(obj.get("config"), Mapping):
            sections = ", ".join(str(k) for k in obj["config"])
            return f"a checkpoint whose config has the sections {sections}"
        if not keys:
            return "an empty dict"
        return f"a dict with keys {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
    if isinstance(obj, torch.Tensor):
        return f"one tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _wrong_kind(path: Path, obj: Any) -> WeakclipError:
    return WeakclipError(f"{path} holds {_describe(obj)}; expected {_EXPECTED}")


def _is_run_folder(path: Path) -> bool:
    return (path / "run.json").is_file() or any((path / s / "checkpoints").is_dir() for s in RUN_STAGES)


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
    if stage is not None and stage not in RUN_STAGES:
        raise WeakclipError(f"stage {stage!r} holds no network; choose {' or '.join(RUN_STAGES)}")
    if path.is_dir() and not (path / "checkpoints").is_dir() and _is_run_folder(path):
        stage = stage or "retrain"
        folder = path / stage
        if not (folder / "checkpoints").is_dir():
            hint = "; its refinement model: stage refine (--stage refine)" if stage == "retrain" else ""
            raise WeakclipError(f"the weakclip run {path} has no {stage} checkpoint yet "
                                f"({folder}/checkpoints){hint}")
        return _resolve(folder, best), f" ({stage} stage of the weakclip run {path})"
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise WeakclipError(f"{path} is a folder without checkpoints/ or run.json; expected {_EXPECTED}")
    if best and not path.is_dir():
        raise WeakclipError(f"best takes a work folder (its checkpoints/best.pth), got the file {path}")
    return _resolve(path, best), ""


def load(path: str | Path, device: str | torch.device | None = None, *, stage: str | None = None,
         best: bool = False, clip_weights: str | Path | None = None) -> Segmenter:
    """Load any trained network of this package or of the authors as a :class:`Segmenter`.

    Args:
        path: a checkpoint file, a training or retraining work folder (its latest checkpoint), or a
            ``weakclip run`` work folder (see the module docstring).
        device: where to run (default: CUDA when available, else the CPU).
        stage: for a ``weakclip run`` folder: ``"retrain"`` (the default, the final network) or ``"refine"``
            (the refinement model). For a plain work folder or file it must match what the file holds.
        best: the work folder's ``checkpoints/best.pth`` (kept by periodic evaluation) instead of the latest.
        clip_weights: the CLIP weights file, for refinement checkpoints that do not hold the frozen towers
            (default: the file the checkpoint records).

    Raises:
        WeakclipError: one line: a missing path, a file of another kind (what it holds, what was expected),
            weights that do not fit.
    """
    from weakclip.models.release_checkpoint import RELEASE_ALLOWED_GLOBALS, is_release_checkpoint
    from weakclip.safe_load import safe_torch_load

    path = Path(path)
    device = _resolve_device(device)
    file, where = _checkpoint_file(path, best, stage)
    obj = safe_torch_load(file, allow=RELEASE_ALLOWED_GLOBALS, what="checkpoint")
    if is_release_checkpoint(obj):
        found = "refine"
        seg = _load_refinement(file, where, obj, device, clip_weights)
    elif isinstance(obj, Mapping) and "iteration" in obj and "model" in obj:
        config = obj.get("config")
        if not isinstance(config, Mapping):
            raise WeakclipError(f"{file} is a training checkpoint without a config; expected {_EXPECTED}")
        if "eval" in config:
            found = "retrain"
            seg = _load_retrained(file, where, obj, device)
        else:
            found = "refine"
            seg = _load_refinement(file, where, obj, device, clip_weights)
    elif _is_deeplabv1_state(obj):
        found = "retrain"
        seg = _load_release_deeplabv1(file, obj, device)
    else:
        raise _wrong_kind(file, obj)
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
                       names_may_be_stale: bool = False):
    """``(network in eval mode, classes, note)``; ``classes`` None (or, with ``names_may_be_stale``, a list
    whose length does not fit the state) -> numbered names for the state's class count."""
    from weakclip.errors import WeightsError
    from weakclip.retrain.deeplabv1 import fit_state_dict
    from weakclip.retrain.train import build_model

    note = ""
    if classes is not None:
        model = build_model(cfg, len(classes), pretrained=False)
        try:
            fit_state_dict(model, state, source)
            return model.eval(), classes, note
        except WeightsError:
            if not names_may_be_stale:
                raise
            note = f"; its dataset's classes.txt now lists {len(classes)}"
    k = _class_count(state, cfg)
    classes = ["background", *(f"class_{i}" for i in range(1, k))]
    note = (note or "; class names not found") + ", classes numbered"
    model = build_model(cfg, k, pretrained=False)
    fit_state_dict(model, state, source)
    return model.eval(), classes, note


def _load_retrained(file: Path, where: str, obj: Mapping[str, Any], device: torch.device) -> Segmenter:
    from weakclip.retrain.deeplabv1 import MODEL_NAME, state_dict_of
    from weakclip.retrain.train import RetrainConfig, norm_stats

    cfg = RetrainConfig.from_dict(dict(obj["config"]), source=f"config of {file}")
    state = state_dict_of(obj["model"], file)
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
    return _RetrainedSegmenter(kind=kind, description=description, classes=classes, mean=mean, std=std,
                               network=model.to(device), device=device, eval_cfg=cfg.eval)


def _load_release_deeplabv1(file: Path, obj: Any, device: torch.device) -> Segmenter:
    from weakclip.retrain.deeplabv1 import state_dict_of
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, norm_stats

    state = state_dict_of(obj, file)
    k = int(state["cls_conv.weight"].shape[0])
    preset = "voc" if k == 21 else "coco"
    classes = _dataset_classes({21: "voc", 81: "coco", 91: "coco91"}.get(k, "folder"), None)
    width = 64 // max(1, int(state["backbone.conv1a.weight"].shape[0]))
    cfg = apply_retrain_overrides(load_retrain_preset(preset), [f"model.width_divisor={width}"])
    model, classes, note = _retrained_network(cfg, state, classes, file)
    mean, std = norm_stats(cfg.data.normalize)
    description = (f"DeepLab-v1 ResNet-38 (the authors' released checkpoint, {len(classes)} classes{note}; "
                   f"the {preset} preset's evaluation) from {file}")
    return _RetrainedSegmenter(kind="release-deeplabv1", description=description, classes=classes, mean=mean,
                               std=std, network=model.to(device), device=device, eval_cfg=cfg.eval)


# ---------------------------------------------------------------------------- refinement models
def _load_refinement(file: Path, where: str, raw, device: torch.device, clip_weights) -> Segmenter:
    from weakclip.inference.loading import load_trained_model, normalization_of

    model, cfg = load_trained_model(file, clip_weights, device=device, raw=raw)
    mean, std = normalization_of(cfg)
    if "iteration" not in raw:
        kind, what = "release-refinement", "the authors' release checkpoint"
    else:
        kind, what = "refinement", f"weakclip train checkpoint, iteration {raw.get('iteration')}"
    description = (f"WeakCLIP refinement model ({what}, CLIP {cfg.model.clip_arch}, {len(cfg.classes)} "
                   f"classes) from {file}{where}")
    return _RefinementSegmenter(kind=kind, description=description, classes=cfg.classes, mean=mean, std=std,
                                device=device, model=model, cfg=cfg)
