"""Pictures of masks: class colours (VOC palette, unsure seed pixels white), tiles and side-by-side rows."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weakclip.data.classes import voc_palette

UNSURE_RGB = (255, 255, 255)


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def colour(mask: np.ndarray) -> np.ndarray:
    """``H x W`` class ids -> ``H x W x 3`` uint8 RGB in the VOC palette (255, unsure: white)."""
    rgb = voc_palette(256)[mask]
    rgb[mask == 255] = UNSURE_RGB
    return rgb.astype(np.uint8)


def tile(array: np.ndarray, height: int, is_mask: bool) -> Image.Image:
    """An image (``H x W x 3``) or a mask (``H x W`` class ids) resized to ``height`` pixels high
    (nearest neighbour for masks, so the class colours stay exact)."""
    rgb = colour(array) if is_mask else np.asarray(array, dtype=np.uint8)
    im = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    width = max(1, round(w * height / h))
    return im.resize((width, height), Image.NEAREST if is_mask or height > h else Image.BILINEAR)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def panel_row(image: np.ndarray, masks: list[np.ndarray], titles: list[str], scale: int = 3) -> Image.Image:
    """``image | mask | mask ...`` side by side, each enlarged ``scale`` times, with a title above each."""
    h, w = image.shape[:2]
    tiles = [image] + [colour(m) for m in masks]
    th = 16
    canvas = Image.new("RGB", (len(tiles) * (w * scale + 4), h * scale + th), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    small = font(12)
    for k, (t, title) in enumerate(zip(tiles, ["image", *titles])):
        x = k * (w * scale + 4)
        big = Image.fromarray(t.astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(big, (x, th))
        draw.text((x + 2, 1), title, fill=(0, 0, 0), font=small)
    return canvas
