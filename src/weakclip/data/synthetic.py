"""A small synthetic WSSS dataset: textured shapes with exact masks and deliberately poor seeds.

Each image is a muted textured background (smooth noise, a gradient or soft stripes) with one to
three objects. Every object class has its own shape *and* its own colour/texture family, and a
readable English name usable in CLIP prompts:

==========  ==========================================  ===================================
class       shape                                       colour / texture
==========  ==========================================  ===================================
disk        filled circle                               red-orange with light yellow dots
square      rotated square                              blue checkerboard
triangle    rotated equilateral triangle                green stripes
ring        annulus                                     cyan concentric bands
cross       rotated plus sign                           yellow with dark diagonal hatching
star        rotated five-pointed star                   magenta, bright centre fading out
==========  ==========================================  ===================================

Objects have random sizes, positions and rotations and may overlap (later ones occlude earlier
ones); the ground truth is the exact painted label map. The *seeds* imitate a CAM method's
output: a shrunken, partly missing core of each object, confident background only away from the
objects and with holes, everything else 255 (unsure), plus wrong-class blobs inside objects and
false-positive blobs on the background next to (or away from) objects. Noise labels are always
background or a class of the image's own labels, so image-level labels stay consistent. With the
default ``seed_quality=0.5`` the seeds' mIoU against the ground truth (unsure read as background)
is around half while most confident pixels are right, like real CAM seeds.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from weakclip.data.classes import IGNORE_INDEX, voc_palette
from weakclip.data.io import write_text_atomic
from weakclip.errors import DataError

#: Object classes in order; ``make_synthetic_dataset(n_classes=k)`` uses the first ``k``.
SHAPE_CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "cross", "star")

# hue range (degrees) of each class's colour family
# half-thickness of each shape as a fraction of its radius (how far an erosion may go)
_THICKNESS: dict[str, float] = {
    "disk": 1.0, "square": 0.8, "triangle": 0.5, "ring": 0.225, "cross": 0.3, "star": 0.35,
}

# Seed corruption at seed_quality=0.5 (scaled linearly by badness = 2 * (1 - seed_quality)):
# erosion (fraction of the half-thickness), fraction of the core cut away (uniform in
# [cut_min, cut_max]), probabilities and radii (fraction of the object radius) of wrong-class
# blobs, of false positives bleeding out of an object, of a stray false positive per image, and
# the confident-background margin (fraction of the short side) and hole level.
_SEED: dict = {
    "erode": 0.1, "cut_min": 0.0, "cut_max": 0.3, "p_wrong": 0.6, "r_wrong": (0.3, 0.5),
    "p_bleed": 1.0, "r_bleed": (0.3, 0.6), "p_stray": 0.25, "bg_margin": 0.09, "bg_holes": 0.3,
}

_HUES: dict[str, tuple[float, float]] = {
    "disk": (0.0, 28.0), "square": (212.0, 240.0), "triangle": (95.0, 135.0),
    "ring": (176.0, 194.0), "cross": (48.0, 60.0), "star": (292.0, 325.0),
}


# --------------------------------------------------------------------------------------------------
# small helpers


def _rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32) * 255.0


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a small random grid upsampled bicubically."""
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    small = (rng.random((gh, gw)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) / 255.0
    lo, hi = float(big.min()), float(big.max())
    return (big - lo) / (hi - lo) if hi > lo else np.zeros_like(big)


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation by a (2k+1)-square, separable; pixels outside the image count as False."""
    if k <= 0:
        return mask.copy()
    win = np.lib.stride_tricks.sliding_window_view
    m = np.pad(mask, ((0, 0), (k, k)), constant_values=False)
    m = win(m, 2 * k + 1, axis=1).any(axis=-1)
    m = np.pad(m, ((k, k), (0, 0)), constant_values=False)
    return win(m, 2 * k + 1, axis=0).any(axis=-1)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1)-square; the image border does not erode (outside counts as True)."""
    return ~_dilate(~mask, k)


def _rot(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, a: float) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(a), np.sin(a)
    return dx * c + dy * s, -dx * s + dy * c


# --------------------------------------------------------------------------------------------------
# shapes: (yy, xx, cy, cx, r, angle) -> bool mask


def _shape_mask(name: str, yy, xx, cy: float, cx: float, r: float, a: float) -> np.ndarray:
    u, v = _rot(yy, xx, cy, cx, a)
    if name == "disk":
        return u * u + v * v < r * r
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8 * r
    if name == "triangle":
        inside = np.ones(u.shape, bool)
        for k in range(3):  # edge midpoints of a circumradius-r equilateral triangle lie at r/2
            phi = np.pi / 3 + 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) < 0.5 * r
        return inside
    if name == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.3 * r) & (av < r)) | ((av < 0.3 * r) & (au < r))
    if name == "star":
        theta = np.arctan2(v, u)
        t = np.abs(np.mod(theta, 2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)  # 1 at the tips, 0 between
        return np.sqrt(u * u + v * v) < r * (0.42 + 0.58 * t)
    raise DataError(f"synthetic data: unknown class {name!r}; known: {', '.join(SHAPE_CLASSES)}")


def _texture(name: str, rng: np.random.Generator, yy, xx, cy: float, cx: float, r: float,
             a: float) -> np.ndarray:
    """``HxWx3`` float texture of a class's colour family (only the object's pixels get used)."""
    hue = rng.uniform(*_HUES[name])
    u, v = _rot(yy, xx, cy, cx, a)
    if name == "disk":  # warm, light dots on a grid
        base, dot = _rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)), _rgb(hue + 25, 0.35, 1.0)
        p = rng.uniform(6, 10)
        on = (np.mod(u, p) - p / 2) ** 2 + (np.mod(v, p) - p / 2) ** 2 < (0.3 * p) ** 2
    elif name == "square":  # blue checkerboard aligned with the square
        base, dot = _rgb(hue, 0.85, 0.95), _rgb(hue, 0.9, 0.5)
        p = rng.uniform(6, 12)
        on = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif name == "triangle":  # green stripes at a random angle
        base, dot = _rgb(hue, 0.8, 0.85), _rgb(hue, 0.9, 0.4)
        p = rng.uniform(5, 9)
        b = rng.uniform(0, np.pi)
        on = np.mod(u * np.cos(b) + v * np.sin(b), p) < p / 2
    elif name == "ring":  # cyan concentric bands
        base, dot = _rgb(hue, 0.85, 0.9), _rgb(hue, 0.6, 0.55)
        p = rng.uniform(3, 5)
        on = np.mod(np.sqrt(u * u + v * v), p) < p / 2
    elif name == "cross":  # yellow with dark diagonal hatching
        base, dot = _rgb(hue, 0.9, 0.95), _rgb(hue - 20, 0.9, 0.35)
        p = rng.uniform(6, 9)
        on = np.mod(u + v, p) < p / 3
    else:  # star: magenta, bright centre fading outwards
        d = np.clip(np.sqrt(u * u + v * v) / max(r, 1.0), 0, 1)[..., None]
        inner, outer = _rgb(hue, 0.35, 1.0), _rgb(hue, 0.95, 0.6)
        return inner * (1 - d) + outer * d
    return np.where(on[..., None], dot, base)


def _background(rng: np.random.Generator, yy, xx, h: int, w: int) -> np.ndarray:
    """Muted (low-saturation) textured background: smooth noise, a gradient or soft stripes."""
    c1 = _rgb(rng.uniform(0, 360), rng.uniform(0.03, 0.3), rng.uniform(0.35, 0.9))
    c2 = _rgb(rng.uniform(0, 360), rng.uniform(0.03, 0.3), rng.uniform(0.35, 0.9))
    kind = int(rng.integers(3))
    if kind == 0:
        t = _smooth_field(rng, h, w, int(rng.integers(3, 7)))
    else:
        b = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(b) + yy * np.sin(b)
        if kind == 1:
            t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        else:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / rng.uniform(14, 40))
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


# --------------------------------------------------------------------------------------------------
# one sample


def render_sample(rng: np.random.Generator, classes: Sequence[str], size: tuple[int, int],
                  seed_quality: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic sample.

    Args:
        rng: the only source of randomness (same state -> same sample).
        classes: class names with ``"background"`` first; the others must be in
            :data:`SHAPE_CLASSES`. Objects are drawn from ``classes[1:]``.
        size: ``(H, W)``.
        seed_quality: 1.0 gives seeds equal to the ground truth; 0.5 (default) CAM-like seeds
            (about half mIoU, mostly correct confident pixels); towards 0 ever sparser, noisier seeds.

    Returns:
        ``(image, gt, seed)``: ``HxWx3`` uint8 RGB, ``HxW`` uint8 class ids (exact), ``HxW`` uint8
        seed (class id, or 255 = unsure).
    """
    if len(classes) < 2 or classes[0] != "background":
        raise DataError("synthetic data: classes must start with 'background' and hold an object class")
    h, w = int(size[0]), int(size[1])
    if h < 8 or w < 8:
        raise DataError(f"synthetic data: image size {h}x{w} is too small (8x8 at least)")
    if not 0.0 <= seed_quality <= 1.0:
        raise ValueError(f"seed_quality must be in [0, 1], got {seed_quality}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)

    img = _background(rng, yy, xx, h, w)
    gt = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.int32)  # 1-based instance index of the visible object
    objects = []  # (class id, cy, cx, r, half-thickness / r)
    for j in range(int(rng.integers(1, 4))):
        cid = int(rng.integers(1, len(classes)))
        name = classes[cid]
        r = rng.uniform(0.14, 0.3) * side
        cy, cx = rng.uniform(0.12 * h, 0.88 * h), rng.uniform(0.12 * w, 0.88 * w)
        a = rng.uniform(0, 2 * np.pi)
        m = _shape_mask(name, yy, xx, cy, cx, r, a)
        tex = _texture(name, rng, yy, xx, cy, cx, r, a)
        img[m] = tex[m]
        gt[m] = cid
        inst[m] = j + 1
        objects.append((cid, cy, cx, r, _THICKNESS[name]))
    img = img + rng.normal(0.0, 4.0, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    seed = _make_seed(rng, gt, inst, objects, yy, xx, seed_quality)
    return image, gt, seed


def _make_seed(rng: np.random.Generator, gt: np.ndarray, inst: np.ndarray, objects: list,
               yy: np.ndarray, xx: np.ndarray, seed_quality: float) -> np.ndarray:
    """CAM-like seed: eroded, partly cut object cores, sparse far background, noise blobs."""
    h, w = gt.shape
    bad = 2.0 * (1.0 - seed_quality)  # 0: perfect, 1: default, 2: worst
    if bad == 0.0:
        return gt.copy()
    side = min(h, w)
    seed = np.full((h, w), IGNORE_INDEX, np.uint8)
    present = sorted({c for c, *_ in objects if (gt == c).any()})

    # confident background: away from every object, with smooth holes
    bg = ~_dilate(gt > 0, int(round(bad * _SEED["bg_margin"] * side)))
    field = _smooth_field(rng, h, w, 5)
    bg &= field >= min(0.9, _SEED["bg_holes"] * bad)
    seed[bg] = 0

    # object cores: eroded visible part, minus a random missing side
    cores = []
    for j, (cid, cy, cx, r, thick) in enumerate(objects):
        vis = inst == j + 1
        core = _erode(vis, int(round(bad * _SEED["erode"] * thick * r))) & vis
        if core.any():
            b = rng.uniform(0, 2 * np.pi)
            proj = (xx - cx) * np.cos(b) + (yy - cy) * np.sin(b)
            cut = rng.uniform(_SEED["cut_min"], _SEED["cut_max"]) * bad
            keep = float(np.clip(1.0 - cut, 0.05, 1.0))
            core &= proj <= np.quantile(proj[core], keep)
        seed[core] = cid
        cores.append(core)

    def blob(cy: float, cx: float, rad: float) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 < rad * rad

    # wrong-class blobs inside objects (another label of the image, or background)
    for j, (cid, _cy, _cx, r, _t) in enumerate(objects):
        core = cores[j]
        if not core.any() or rng.random() >= _SEED["p_wrong"] * bad:
            continue
        others = [c for c in present if c != cid]
        wrong = int(rng.choice(others)) if others else 0
        ys, xs = np.nonzero(core)
        k = int(rng.integers(len(ys)))
        seed[blob(ys[k], xs[k], rng.uniform(*_SEED["r_wrong"]) * r) & core] = wrong

    # false positives on the background: bleeding next to an object, or a stray blob
    for cid, cy, cx, r, _t in objects:
        if cid not in present or rng.random() >= _SEED["p_bleed"] * bad:
            continue
        b = rng.uniform(0, 2 * np.pi)
        by, bx = cy + 1.05 * r * np.sin(b), cx + 1.05 * r * np.cos(b)
        seed[blob(by, bx, rng.uniform(*_SEED["r_bleed"]) * r) & (gt == 0)] = cid
    if present and rng.random() < _SEED["p_stray"] * bad:
        cid = int(rng.choice(present))
        by, bx = rng.uniform(0, h), rng.uniform(0, w)
        seed[blob(by, bx, rng.uniform(0.05, 0.1) * side) & (gt == 0)] = cid
    return seed


# --------------------------------------------------------------------------------------------------
# the dataset on disk


def _draw_size(rng: np.random.Generator, image_size) -> tuple[int, int]:
    h, w = image_size
    if isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)):
        return int(h), int(w)
    return int(rng.integers(h[0], h[1] + 1)), int(rng.integers(w[0], w[1] + 1))


def _save_label_png(arr: np.ndarray, path: Path, palette: bytes) -> None:
    im = Image.fromarray(arr)  # uint8 HxW -> "L"
    im.putpalette(palette)  # -> "P" with the VOC colours
    im.save(path, format="PNG")


def make_synthetic_dataset(root: str | Path, *, n_train: int = 24, n_val: int = 8,
                           image_size: tuple = (96, 128), n_classes: int = 4, seed: int = 0,
                           seed_quality: float = 0.5, image_format: str = "png") -> Path:
    """Write a small synthetic WSSS dataset to ``root`` and return ``root`` as a Path.

    Layout (the format every folder dataset of the project reads)::

        root/classes.txt          one class name per line, "background" first
        root/images/<id>.png      RGB images (".jpg" with image_format="jpg")
        root/labels.json          {"<id>": ["disk", "ring"], ...}: image-level labels, no background
        root/seeds/<id>.png       train ids only: palette PNG, class id or 255 (unsure)
        root/masks/<id>.png       every id: palette PNG, exact class ids
        root/splits/train.txt     one id per line ("train_0000", ...)
        root/splits/val.txt       one id per line ("val_0000", ...)

    Args:
        n_train, n_val: number of images of each split.
        image_size: ``(H, W)``, or ``((h_min, h_max), (w_min, w_max))`` for a size drawn per image.
        n_classes: number of object classes (1-6, background not counted); the first ``n_classes``
            of :data:`SHAPE_CLASSES`.
        seed: the output is a pure function of the arguments (same seed -> same bytes). Each image
            has its own random stream, so image ``train_0003`` does not depend on ``n_train``.
        seed_quality: see :func:`render_sample` (1.0 -> seeds equal the ground truth).
        image_format: ``"png"`` or ``"jpg"``.

    Image-level labels are the class sets of the ground-truth masks, so they always agree.
    """
    if not 1 <= n_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"n_classes must be in 1..{len(SHAPE_CLASSES)}, got {n_classes}")
    if n_train < 0 or n_val < 0:
        raise ValueError("n_train and n_val must be >= 0")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    root = Path(root)
    classes = ["background", *SHAPE_CLASSES[:n_classes]]
    for sub in ("images", "seeds", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette(256).tobytes()

    labels: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split_idx, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for i in range(n):
            rng = np.random.default_rng([int(seed), split_idx, i])
            sid = f"{split}_{i:04d}"
            image, gt, seed_map = render_sample(rng, classes, _draw_size(rng, image_size), seed_quality)
            im = Image.fromarray(image)
            if image_format == "png":
                im.save(root / "images" / f"{sid}.png", format="PNG")
            else:
                im.save(root / "images" / f"{sid}.jpg", format="JPEG", quality=95)
            _save_label_png(gt, root / "masks" / f"{sid}.png", palette)
            if split == "train":
                _save_label_png(seed_map, root / "seeds" / f"{sid}.png", palette)
            labels[sid] = [classes[c] for c in np.unique(gt) if c != 0]
            splits[split].append(sid)

    (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    for split, ids in splits.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in ids), encoding="utf-8")
    # Written last and atomically: its presence means the dataset is complete.
    write_text_atomic(root / "labels.json", json.dumps(labels, indent=1) + "\n")
    return root
