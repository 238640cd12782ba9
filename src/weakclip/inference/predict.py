"""Masks and side-by-side overlays of single images, for a person to look at (``weakclip predict``).

For each image ``<stem>`` the output folder gets:

* ``<stem>.png``: the mask, a VOC-palette PNG of class ids (same size as the image);
* ``<stem>_overlay.png``: three panels side by side, each as large as the image, so the file is
  ``3 * width`` x ``height``: the image | the image blended with the mask's colours (background
  left untinted) | a legend
  (colour swatch and class name of every class in the mask, and of the asked-for labels).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from weakclip.config import PseudoMaskConfig
from weakclip.crf import dense_crf
from weakclip.data.classes import voc_palette
from weakclip.data.io import _atomic_write, read_image, write_label_png
from weakclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from weakclip.errors import DataError, WeakclipError
from weakclip.inference.batching import WindowRunner
from weakclip.inference.jobs import warn
from weakclip.inference.pseudo_masks import restrict_probs
from weakclip.inference.sliding import multiscale_inference_batch

__all__ = ["overlay_image", "parse_labels", "predict_images"]


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def parse_labels(labels: str | Sequence[str] | None, class_names: Sequence[str]) -> list[int] | None:
    """Class names (a comma-separated string or a list) -> class ids; None -> None (all classes).

    Matching ignores case, spaces and punctuation ("dining table" finds "diningtable"). An unknown
    name raises a one-line WeakclipError listing the closest class names.
    """
    if labels is None:
        return None
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise WeakclipError("--labels is empty: give class names like cat,dog, or leave it out")
    table = {_key(c): i for i, c in enumerate(class_names)}
    ids = []
    for name in names:
        idx = table.get(_key(name))
        if idx is None:
            close = difflib.get_close_matches(name.lower(), [c.lower() for c in class_names], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise WeakclipError(f"unknown label {name!r}{hint} (the model's {len(class_names)} classes: "
                                f"{', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''})")
        ids.append(idx)
    return sorted(set(ids))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def overlay_image(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str],
                  legend_ids: Sequence[int] | None = None, alpha: float = 0.5) -> Image.Image:
    """``image | colour overlay of mask | legend`` as one RGB image of ``3 * W`` x ``H``."""
    h, w = mask.shape
    palette = voc_palette(256)
    colours = palette[mask].astype(np.float32)
    blend = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    plain = (mask == 0) | (mask == 255)  # background and unsure keep the image's own colours
    blend = np.where(plain[..., None], image, np.clip(np.rint(blend), 0, 255)).astype(np.uint8)
    canvas = Image.new("RGB", (3 * w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    ids = sorted(set(int(c) for c in np.unique(mask) if c != 255) | set(legend_ids or []))
    draw = ImageDraw.Draw(canvas)
    row = max(8, min(24, (h - 8) // max(1, len(ids))))
    font = _font(max(6, row - 4))
    x0, y = 2 * w + 6, 4
    for n, c in enumerate(ids):
        last = n == len(ids) - 1
        if y + (row if last else 2 * row) > h:  # keep a line for "+N more"
            draw.text((x0, y), f"+{len(ids) - n} more", fill=(0, 0, 0), font=font)
            break
        swatch = tuple(int(v) for v in palette[c])
        draw.rectangle([x0, y + 1, x0 + row - 3, y + row - 3], fill=swatch, outline=(0, 0, 0))
        shown = class_names[c] if c < len(class_names) else str(c)
        if c not in np.unique(mask):
            shown += " (absent)"
        draw.text((x0 + row + 2, y), shown, fill=(0, 0, 0), font=font)
        y += row
    return canvas


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem
    n = 2
    candidate = stem
    while candidate in used:
        candidate = f"{stem}_{n}"
        n += 1
    used.add(candidate)
    return candidate


def predict_images(model: torch.nn.Module, paths: Sequence[str | Path], class_names: Sequence[str],
                   labels: str | Sequence[str] | None = None, out_dir: str | Path = "predictions",
                   settings: PseudoMaskConfig | None = None, *, kind: str = "voc",
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   alpha: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Predict a mask for each image and write ``<stem>.png`` and ``<stem>_overlay.png`` to ``out_dir``.

    Args:
        model: trained refinement model (eval mode) on the device to run on.
        paths: image files.
        class_names: the model's classes (index 0 background), shown in the legend.
        labels: class names present in the images (comma-separated or a list): the prediction is
            restricted to them plus background; None predicts over all classes. Unknown names raise
            a one-line WeakclipError before any image is read.
        settings: the test-time settings, the pseudo-mask config section (scales, flip, windows, their
            averaging and batches, amp, ``crf``); default: the release's, without CRF.
            ``restrict_to_labels`` and ``image_batch`` do not apply (``labels`` restricts).
        kind: the dataset kind ``settings.crf == "auto"`` picks the CRF parameters by.
        mean, std: the normalisation the model was trained with.

    Returns ``{"written": [{"image", "mask", "overlay", "classes"}...], "failures": {path: message}}``;
    an unreadable image is reported on stderr and listed, the others still written.
    """
    settings = PseudoMaskConfig(crf="none") if settings is None else settings
    class_names = list(class_names)
    allowed = parse_labels(labels, class_names)
    if getattr(model, "num_classes", len(class_names)) != len(class_names):
        raise WeakclipError(f"the model predicts {model.num_classes} classes, {len(class_names)} names given")
    multi_hot = None
    if allowed is not None:
        multi_hot = np.zeros(len(class_names), dtype=np.float32)
        multi_hot[allowed] = 1.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    used: set[str] = set()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    runner = WindowRunner(model, len(class_names), window_batch=settings.window_batch,
                          autocast_dtype=settings.autocast_dtype(device))
    tta = dict(scales=settings.scales, flip=settings.flip, crop=settings.crop, stride=settings.stride,
               base_scale=settings.base_scale, mean=mean, std=std, window_batch=runner,
               average=settings.average, size_divisor=settings.size_divisor, num_classes=len(class_names),
               resize=settings.resize)
    was_training = model.training
    model.eval()
    try:
        _predict_each(model, paths, class_names, allowed, multi_hot, out_dir, written, failures, used, tta,
                      settings.crf_params(kind), settings.crf_backend, alpha, progress)
    finally:
        model.train(was_training)
    return {"written": written, "failures": failures}


def _predict_each(model, paths, class_names, allowed, multi_hot, out_dir, written, failures, used, tta,
                  crf_params, crf_backend, alpha, progress) -> None:
    for path in paths:
        path = Path(path)
        try:
            image = read_image(path)
        except DataError as exc:
            failures[str(path)] = str(exc)
            warn(f"predict: skipped {path}: {exc}")
            continue
        probs = multiscale_inference_batch(model, [image], **tta)[0]
        keys, kept = restrict_probs(probs, multi_hot)
        if crf_params is not None:  # on the probabilities' device
            rgb = torch.from_numpy(np.ascontiguousarray(image)).to(kept.device).permute(2, 0, 1)[None].float()
            kept = dense_crf(kept[None].float(), rgb, crf_params, backend=crf_backend)[0]
        keys, kept = keys.cpu().numpy(), kept.cpu().numpy()
        mask = keys.astype(np.uint8)[kept.argmax(axis=0)]
        stem = _unique_stem(path, used)
        mask_path = write_label_png(out_dir / f"{stem}.png", mask)
        canvas = overlay_image(image, mask, class_names, allowed, alpha)
        overlay_path = _atomic_write(out_dir / f"{stem}_overlay.png",
                                     lambda fh, im=canvas: im.save(fh, format="PNG"), fsync=False)
        present = [class_names[int(c)] for c in np.unique(mask)]
        written.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "classes": present})
        if progress:
            print(f"{path} -> {overlay_path} ({', '.join(present)})", flush=True)
