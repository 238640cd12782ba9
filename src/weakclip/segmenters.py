"""The :class:`Segmenter` that :func:`weakclip.load` returns: a trained network with its classes, palette,
normalisation and test-time settings, predicting label maps and probabilities of images. Two families: a
retrained DeepLab (``retrain`` evaluation's multi-scale + flip + CRF, exactly) and the refinement model (the
pseudo-mask stage's multi-scale sliding windows and CRF). Images are PIL images (turned upright by their EXIF
tag) or ``H x W x 3`` uint8 RGB arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import WeakclipError

__all__ = ["RefinementSegmenter", "RetrainedSegmenter", "Segmenter", "as_rgb_array"]


# ============================================================================ images
def as_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an ``H x W x 3`` uint8 array -> ``H x W x 3`` uint8 C-contiguous array (one-line
    WeakclipError otherwise). A PIL image is turned upright by its EXIF orientation tag first (as viewers
    show it, and as ``weakclip predict`` reads files); an array is taken as it is."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)  # a writeable copy
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


# ============================================================================ the segmenter
class Segmenter:
    """A trained segmentation network with its classes, normalisation and test-time settings.

    Attributes:
        kind: one of :data:`KINDS`.
        description: one line: what was loaded from where.
        classes: class names, index 0 background.
        palette: ``N x 3`` uint8 colours (N >= number of classes): the checkpoint's stored colours for its
            classes (the VOC palette), the VOC palette beyond.
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
                 std: Sequence[float], network: nn.Module, device: torch.device,
                 palette: np.ndarray | None = None) -> None:
        from weakclip.data.classes import voc_palette

        self.kind = kind
        self.description = description
        self.classes = list(classes)
        self.palette = voc_palette(max(256, len(self.classes)))
        if palette is not None:  # the colours the checkpoint stores for its classes
            self.palette[:len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
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

    def _check_known(self, changes: dict[str, Any], known: set[str]) -> None:
        """One-line WeakclipError naming the settings of ``changes`` that are not in ``known``."""
        unknown = sorted(set(changes) - known)
        if unknown:
            raise WeakclipError(f"unknown test-time setting(s) {', '.join(unknown)} of a {self.kind} "
                                f"network; known: {', '.join(sorted(known))}")

    # ------------------------------------------------------------------ prediction
    def label_ids(self, labels: str | Sequence[str] | None) -> list[int] | None:
        """Class names (a list or ``"cat,dog"``) -> class ids; one-line WeakclipError for an unknown name."""
        from weakclip.inference.predict import parse_labels

        return parse_labels(labels, self.classes)

    def _run(self, images: list[np.ndarray], allowed: list[int] | None,
             together: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
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
        settings: scales, flip and their fusion, ``labels`` restricting (the other classes 0). These are the
        probabilities before the dense CRF; with the CRF on, :meth:`predict` returns its label map."""
        images, many = _as_batch(image_or_list)
        allowed = self.label_ids(labels)
        out = [probs for probs, _ in self._run(images, allowed)]
        return out if many else out[0]

    def predict_batch(self, images: Sequence[np.ndarray], labels: str | Sequence[str] | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(probabilities, label map)`` of each image of a list (what :meth:`predict_proba` and
        :meth:`predict` return), computing each once, the images run together (``weakclip predict
        --batch-size``): the refinement model's windows of all of them share forward passes; a retrained
        network takes the images of one size in one batch per scale (equal to one at a time up to float
        rounding; :meth:`predict` runs one at a time, exactly as ``retrain`` evaluation)."""
        return self._run([as_rgb_array(im) for im in images], self.label_ids(labels), together=True)


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


class RetrainedSegmenter(Segmenter):
    """A retrained DeepLab (ours or the authors'): ``retrain`` evaluation's predict_probs and CRF."""

    def __init__(self, *, eval_cfg, **kwargs) -> None:
        super().__init__(**kwargs)
        self._eval = eval_cfg

    @property
    def settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable
        from weakclip.retrain.config import crf_params_of

        out = {k: v for k, v in dataclasses.asdict(self._eval).items() if k != "max_images"}
        params = crf_params_of(self._eval)
        out["crf_values"] = None if params is None else dataclasses.asdict(params)
        return jsonable(out)

    def configure(self, **changes: Any) -> Segmenter:
        from weakclip.retrain.config import RetrainConfig

        self._check_known(changes, {f.name for f in dataclasses.fields(self._eval)} - {"max_images"})
        raw = {**dataclasses.asdict(self._eval), **changes}
        self._eval = RetrainConfig.from_dict({"eval": raw}, source="test-time settings").eval
        return self

    def _run(self, images, allowed, together=False):
        from weakclip.retrain.config import crf_params_of
        from weakclip.retrain.evaluate import crf_present, predict_probs_batch

        e = self._eval
        crf = crf_params_of(e)
        # one image at a time (retrain evaluation exactly), or, together, the images of one size per batch
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2] if together else (i,), []).append(i)
        all_probs: list[Any] = [None] * len(images)
        for members in groups.values():
            probs_list = predict_probs_batch(self.network, [images[i] for i in members], self.mean, self.std,
                                             e.scales, e.flip, self.device, fuse=e.fuse, resize=e.resize,
                                             align_corners=e.align_corners)
            for i, probs in zip(members, probs_list):
                all_probs[i] = probs
        out = []
        for image, probs in zip(images, all_probs):
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


class RefinementSegmenter(Segmenter):
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

        self._check_known(changes, {f.name for f in dataclasses.fields(PseudoMaskConfig)})
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

    def _run(self, images, allowed, together=False):
        from weakclip.crf import dense_crf
        from weakclip.inference.pseudo_masks import kept_classes
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
            # the pseudo-mask stage's classes: the labels given, or the release's argmax classes
            keys, kept = kept_classes(probs, multi_hot)
            full = probs
            if multi_hot is not None:
                full = torch.zeros_like(probs)
                full[keys] = kept
            if crf_params is not None:  # on the probabilities' device
                rgb = torch.from_numpy(image).to(kept.device).permute(2, 0, 1)[None].float()
                kept = dense_crf(kept[None].float(), rgb, crf_params, backend=p.crf_backend)[0]
            label = keys.cpu().numpy().astype(np.uint8)[kept.argmax(dim=0).cpu().numpy()]
            out.append((full.float().cpu().numpy(), label))
        return out
