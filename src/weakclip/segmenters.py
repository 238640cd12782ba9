"""The :class:`Segmenter` that :func:`weakclip.load` returns: a trained network with its classes, palette,
normalisation and test-time settings, predicting label maps and probabilities of images. Here the two
families of WeakCLIP: a retrained DeepLab (``retrain`` evaluation's multi-scale + flip + CRF, exactly) and the
refinement model (the pseudo-mask stage's multi-scale sliding windows and CRF); another method's network
subclasses :class:`Segmenter` in its own package (ExCEL's:
:class:`weakclip.methods.excel.segmenter.ExcelSegmenter`, the release's test-time inference). Images are PIL
images (turned upright by their EXIF tag) or ``H x W x 3`` uint8 RGB arrays.

Large images (a 48 MP photo) are processed at a bounded size, ``max_side`` (:data:`DEFAULT_MAX_SIDE`; a
setting like the others, ``weakclip predict --max-side``): a retrained network, which has no size rule of its
own, sees the image shrunk (OpenCV's area average) so that its longer side is ``max_side``, then runs its own
test-time scales, flip and CRF on it; the refinement model keeps its own rule for what the network sees (each
scale resized from the full image to fit ``base_scale``) and bounds only what it builds at the image's size,
the fused probabilities and the dense CRF. Label maps come back at the image's full size (each pixel takes
the label of the processed pixel it falls in); :meth:`Segmenter.predict_proba` upsamples the probabilities
bilinearly. An image that still runs out of memory raises :class:`~weakclip.errors.OutOfMemory`, one line
with its size and the ``max_side`` to set (``weakclip predict`` lists it as failed and writes the others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import OutOfMemory, WeakclipError
from weakclip.memory import DEFAULT_MAX_SIDE

__all__ = ["DEFAULT_MAX_SIDE", "RefinementSegmenter", "RetrainedSegmenter", "Segmenter", "as_rgb_array",
           "enlarge_labels", "processing_size", "shrink_image"]


# ============================================================================ images
def as_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an ``H x W x 3`` uint8 array -> ``H x W x 3`` uint8 C-contiguous array (one-line
    WeakclipError otherwise). A PIL image is converted exactly as ``weakclip predict`` converts the files it
    reads (:func:`weakclip.data.io.pil_to_rgb`, the one function of both: turned upright by its EXIF
    orientation tag, 16-bit greyscale scaled to 8 bits, palettes and CMYK converted, alpha dropped); an
    array is taken as it is."""
    from PIL import Image

    from weakclip.data.io import pil_to_rgb

    if isinstance(image, Image.Image):
        try:
            return pil_to_rgb(image, "exif")  # a writeable copy
        except Exception as exc:  # noqa: BLE001 - Pillow's many error types, one line for the user
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise WeakclipError(f"cannot convert a {image.width}x{image.height} PIL image of mode "
                                f"{image.mode!r} to RGB: {reason}") from exc
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise WeakclipError(f"an image array must be H x W x 3 uint8 (RGB), got {image.dtype} "
                                f"{'x'.join(map(str, image.shape))}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise WeakclipError(f"empty image array of shape {image.shape}")
        return np.ascontiguousarray(image)
    raise WeakclipError(f"expected a PIL image or an H x W x 3 uint8 array, got {type(image).__name__}")


def processing_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(h, w)`` an ``height x width`` image is processed at: itself when its longer side is at most
    ``max_side`` (or ``max_side`` is None), else shrunk, aspect kept, to a longer side of ``max_side``."""
    longer = max(height, width)
    if not max_side or longer <= max_side:
        return int(height), int(width)
    ratio = max_side / longer
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


def shrink_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8) at ``size`` ``(h, w)`` by OpenCV's area average (``INTER_AREA``, no
    aliasing); the image itself when it already has that size."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    import cv2

    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA)


def enlarge_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map ``h x w`` at ``size`` ``(H, W)``: each pixel takes the label of the pixel of the small map
    its centre falls in (nearest, exact to half-pixel centres); the map itself when it has that size."""
    h, w = labels.shape
    big_h, big_w = int(size[0]), int(size[1])
    if (h, w) == (big_h, big_w):
        return labels
    # floor((i + 0.5) * h / H) in integers, exact where floats round the other way (Pillow's NEAREST)
    rows = np.minimum((2 * np.arange(big_h, dtype=np.int64) + 1) * h // (2 * big_h), h - 1)
    cols = np.minimum((2 * np.arange(big_w, dtype=np.int64) + 1) * w // (2 * big_w), w - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]])


def _enlarge_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probabilities ``K x h x w`` at ``size`` ``(H, W)``, bilinear (half-pixel centres); one-line
    :class:`OutOfMemory` when they do not fit."""
    from weakclip.memory import human_bytes, is_out_of_memory, oom_reason

    if tuple(probs.shape[1:]) == tuple(size):
        return probs
    try:
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(probs))[None],
                          size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)
        return t[0].numpy()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are turned, the rest re-raised
        if not is_out_of_memory(exc):
            raise
        message = (f"out of memory for the probabilities of a {size[1]}x{size[0]} image at its full size "
                   f"({probs.shape[0]} classes, {human_bytes(4 * probs.shape[0] * size[0] * size[1])}): "
                   f"{oom_reason(exc)}; predict() gives its mask without them")
    raise OutOfMemory(message)


def _check_max_side(value: Any) -> int | None:
    """``max_side`` as stored: a positive int, or None for no bound (``None`` or 0); one-line error else."""
    if value is None:
        return None
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not whole or int(value) < 0 or 0 < int(value) < 32:
        raise WeakclipError(f"max_side must be a whole number of pixels >= 32, or 0 / None for no bound "
                            f"(the image at its full size), got {value!r}")
    return int(value) or None


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
        settings: the test-time settings (JSON-able; change them with :meth:`configure`), ``max_side``
            among them (the longest side an image is processed at, :data:`DEFAULT_MAX_SIDE`; None: the
            full size).
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
        self.max_side: int | None = DEFAULT_MAX_SIDE

    def __repr__(self) -> str:
        return f"<weakclip.Segmenter {self.kind}: {self.description}>"

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> dict[str, Any]:
        """The test-time settings as a JSON-able dict (the network's own, and ``max_side``)."""
        return {**self._settings(), "max_side": self.max_side}

    def configure(self, **changes: Any) -> Segmenter:
        """Change test-time settings by name (keys of :attr:`settings`), checked like the config files;
        returns ``self``. ``max_side``: the longest side images are processed at (>= 32; 0 or None: their
        full size, which a very large photo may not have the memory for)."""
        if "max_side" in changes:
            max_side = _check_max_side(changes.pop("max_side"))
            if changes:
                self._configure(**changes)  # checked first: nothing changes when a setting is wrong
            self.max_side = max_side
        elif changes:
            self._configure(**changes)
        return self

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _configure(self, **changes: Any) -> None:
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
        """``(probabilities K x h x w float32 at the processing size, label map H x W uint8 at the image's
        size)`` of each image."""
        raise NotImplementedError

    def _guarded_run(self, images: list[np.ndarray], allowed: list[int] | None,
                     together: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`_run`, an out-of-memory error of any library turned into one line (:class:`OutOfMemory`)
        with the image's size and what to set; the memory of the failed attempt is given back first."""
        from weakclip.memory import is_out_of_memory

        try:
            return self._run(images, allowed, together)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are turned, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            message = self._oom_message(images, exc)
        # out of the except block: the failed attempt's frames (and their tensors) are released
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(message)

    def _oom_message(self, images: list[np.ndarray], exc: BaseException) -> str:
        from weakclip.memory import oom_reason

        h, w = images[0].shape[:2]
        ph, pw = processing_size(h, w, self.max_side)
        what = f"a {w}x{h} image" if len(images) == 1 else f"{len(images)} images together ({w}x{h} ...)"
        if (ph, pw) != (h, w):
            at = f"processed at {pw}x{ph} (max side {self.max_side})"
        else:
            at = "processed at its full size" + (f" (max side {self.max_side})" if self.max_side else
                                                 " (no max side)")
        suggest = max(64, min(max(ph, pw), self.max_side or max(h, w)) // 2)
        batch = "; or fewer images at a time (--batch-size 1)" if len(images) > 1 else ""
        return (f"out of memory for {what} {at} on {self.device.type}: {oom_reason(exc)}; set a smaller max "
                f"side, e.g. --max-side {suggest} (Python: configure(max_side={suggest})){batch}")

    def predict(self, image_or_list: Any, labels: str | Sequence[str] | None = None):
        """The label map(s), ``H x W`` uint8 class ids, with the test-time settings (scales, flip, CRF ...).

        ``image_or_list``: a PIL image, an ``H x W x 3`` uint8 RGB array, or a list of them (then a list
        comes back). ``labels``: class names known to be in the image(s); the prediction is restricted to
        them and background.
        """
        images, many = _as_batch(image_or_list)
        allowed = self.label_ids(labels)
        out = [label for _, label in self._guarded_run(images, allowed)]
        return out if many else out[0]

    def predict_proba(self, image_or_list: Any, labels: str | Sequence[str] | None = None):
        """Class probabilities ``K x H x W`` float32 (one map per image for a list) with the test-time
        settings: scales, flip and their fusion, ``labels`` restricting (the other classes 0). These are the
        probabilities before the dense CRF; with the CRF on, :meth:`predict` returns its label map. An image
        larger than ``max_side`` is processed shrunk and its probabilities upsampled (bilinear) to its size:
        ``K x H x W`` float32 of a 48 MP photo and 21 classes take 4 GB."""
        images, many = _as_batch(image_or_list)
        allowed = self.label_ids(labels)
        out = [_enlarge_probs(probs, im.shape[:2]) for im, (probs, _) in
               zip(images, self._guarded_run(images, allowed))]
        return out if many else out[0]

    def predict_batch(self, images: Sequence[np.ndarray], labels: str | Sequence[str] | None = None, *,
                      probabilities: bool = True) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """``(probabilities, label map)`` of each image of a list (what :meth:`predict_proba` and
        :meth:`predict` return), computing each once, the images run together (``weakclip predict
        --batch-size``): the refinement model's windows of all of them share forward passes; a retrained
        network takes the images of one size in one batch per scale (equal to one at a time up to float
        rounding; :meth:`predict` runs one at a time, exactly as ``retrain`` evaluation).
        ``probabilities=False``: None in their place (``weakclip predict``, which writes masks only, never
        holds them at a large image's full size)."""
        arrays = [as_rgb_array(im) for im in images]
        out = self._guarded_run(arrays, self.label_ids(labels), together=True)
        if not probabilities:
            return [(None, label) for _, label in out]
        return [(_enlarge_probs(probs, im.shape[:2]), label) for im, (probs, label) in zip(arrays, out)]


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

    def _settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable
        from weakclip.retrain.config import crf_params_of

        out = {k: v for k, v in dataclasses.asdict(self._eval).items() if k != "max_images"}
        params = crf_params_of(self._eval)
        out["crf_values"] = None if params is None else dataclasses.asdict(params)
        return jsonable(out)

    def _configure(self, **changes: Any) -> None:
        from weakclip.retrain.config import RetrainConfig

        self._check_known(changes, {f.name for f in dataclasses.fields(self._eval)} - {"max_images"} |
                          {"max_side"})
        raw = {**dataclasses.asdict(self._eval), **changes}
        self._eval = RetrainConfig.from_dict({"eval": raw}, source="test-time settings").eval

    def _run(self, images, allowed, together=False):
        """``retrain`` evaluation of each image shrunk to ``max_side`` (the network has no size rule of its
        own: every scale, flip and the CRF run on the shrunk image), its label map enlarged back."""
        from weakclip.retrain.config import crf_params_of
        from weakclip.retrain.evaluate import crf_present, predict_probs_batch

        e = self._eval
        crf = crf_params_of(e)
        full_sizes = [image.shape[:2] for image in images]
        images = [shrink_image(image, processing_size(*image.shape[:2], self.max_side)) for image in images]
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
        for image, probs, size in zip(images, all_probs, full_sizes):
            probs = _restrict(probs, allowed).numpy()
            if crf is not None and e.crf_classes == "present":
                label = crf_present(image, probs, crf)
            elif crf is not None:
                from weakclip.crf import dense_crf_numpy

                label = dense_crf_numpy(image, probs, crf).argmax(axis=0)
            else:
                label = probs.argmax(axis=0)
            out.append((probs.astype(np.float32, copy=False), enlarge_labels(label.astype(np.uint8), size)))
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

    def _settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable

        p = self._cfg.pseudo
        out = dataclasses.asdict(p)
        params = p.crf_params(self._cfg.data.kind)
        out["crf_values"] = None if params is None else dataclasses.asdict(params)
        return jsonable(out)

    def _configure(self, **changes: Any) -> None:
        from weakclip.config import Config, PseudoMaskConfig

        self._check_known(changes, {f.name for f in dataclasses.fields(PseudoMaskConfig)} | {"max_side"})
        raw = self._cfg.to_dict()
        raw["pseudo"] = {**raw["pseudo"], **changes}
        self._cfg = Config.from_dict(raw, source="test-time settings")
        self._runner = None

    def _window_runner(self):
        from weakclip.inference.batching import WindowRunner

        p = self._cfg.pseudo
        if self._runner is None:
            self._runner = WindowRunner(self._model, len(self.classes), window_batch=p.window_batch,
                                        autocast_dtype=p.autocast_dtype(self.device))
        return self._runner

    def _run(self, images, allowed, together=False):
        """The pseudo-mask stage's inference of each image: the network sees each scale resized from the full
        image by its own rule (``base_scale``); the fused probabilities and the CRF are at the processing
        size (``max_side``), the label map enlarged back to the image's size."""
        from weakclip.crf import dense_crf
        from weakclip.inference.pseudo_masks import kept_classes
        from weakclip.inference.sliding import multiscale_inference_batch

        p = self._cfg.pseudo
        k = len(self.classes)
        sizes = [processing_size(*image.shape[:2], self.max_side) for image in images]
        probs_list = multiscale_inference_batch(
            self._model, images, scales=p.scales, flip=p.flip, crop=p.crop, stride=p.stride, mean=self.mean,
            std=self.std, base_scale=p.base_scale, num_classes=k, window_batch=self._window_runner(),
            average=p.average, size_divisor=p.size_divisor, resize=p.resize, out_sizes=sizes)
        crf_params = p.crf_params(self._cfg.data.kind)
        multi_hot = None
        if allowed is not None:
            multi_hot = np.zeros(k, dtype=np.float32)
            multi_hot[allowed] = 1.0
        out = []
        for image, probs, size in zip(images, probs_list, sizes):
            # the pseudo-mask stage's classes: the labels given, or the release's argmax classes
            keys, kept = kept_classes(probs, multi_hot)
            full = probs
            if multi_hot is not None:
                full = torch.zeros_like(probs)
                full[keys] = kept
            if crf_params is not None:  # on the probabilities' device, at the processing size
                small = np.require(shrink_image(image, size), requirements=["C", "W"])
                rgb = torch.from_numpy(small).to(kept.device).permute(2, 0, 1)[None].float()
                kept = dense_crf(kept[None].float(), rgb, crf_params, backend=p.crf_backend)[0]
            label = keys.cpu().numpy().astype(np.uint8)[kept.argmax(dim=0).cpu().numpy()]
            out.append((full.float().cpu().numpy(), enlarge_labels(label, image.shape[:2])))
        return out
