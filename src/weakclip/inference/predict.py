"""Label names and overlay images for a person to look at (``weakclip predict``,
:mod:`weakclip.predict_files`).

* :func:`parse_labels`: class names (``"cat,dog"``) -> class ids, one-line errors for unknown names;
* :func:`overlay_image`: three panels side by side, each as large as the image, so the file is
  ``3 * width`` x ``height``: the image | the image blended with the mask's colours (background
  left untinted) | a legend
  (colour swatch and class name of every class in the mask, and of the asked-for labels).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weakclip.data.classes import voc_palette
from weakclip.errors import WeakclipError

__all__ = ["overlay_image", "parse_labels"]


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
    blend = np.empty_like(image, dtype=np.uint8)
    rows = max(1, (1 << 21) // max(1, w))  # a few MB at a time: a 48 MP photo needs no GB of float copies
    for y in range(0, h, rows):
        part, img = mask[y:y + rows], image[y:y + rows]
        mixed = img.astype(np.float32) * (1.0 - alpha) + palette[part].astype(np.float32) * alpha
        plain = (part == 0) | (part == 255)  # background and unsure keep the image's own colours
        blend[y:y + rows] = np.where(plain[..., None], img, np.clip(np.rint(mixed), 0, 255))
    canvas = Image.new("RGB", (3 * w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    present = set(int(c) for c in np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256)))
    ids = sorted((present - {255}) | set(legend_ids or []))
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
        if c not in present:
            shown += " (absent)"
        draw.text((x0 + row + 2, y), shown, fill=(0, 0, 0), font=font)
        y += row
    return canvas
