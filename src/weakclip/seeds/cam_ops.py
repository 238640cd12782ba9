"""The building blocks of CLIP-ES's CAMs, each as CLIP-ES computes it: prompt embeddings, the background
words kept, the ``(x - min) / (max + 1e-7)`` normalisation, the boxes of ``scoremap2bbox`` (with OpenCV),
the attention affinity, the seed rule with an ignore band, and the image's PIL bicubic resize."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from weakclip.data.classes import IGNORE_INDEX
from weakclip.seeds.settings import ES_EPS

__all__ = [
    "affinity_matrix",
    "box_mask",
    "encode_prompts",
    "es_normalise",
    "resize_image",
    "seed_from_cams",
    "split_background",
]


@torch.no_grad()
def encode_prompts(text_tower, names: Sequence[str], templates: Sequence[str], chunk: int = 256) -> Tensor:
    """One L2-normalised embedding per name: templates filled, encoded, normalised, averaged, normalised
    (as CLIP-ES's ``zeroshot_classifier``), in the text tower's precision.

    All prompts are encoded in batches, cut after the longest one's [EOT] (exact: the text tower is
    causal, so padding after [EOT] never reaches it).
    """
    names, templates = list(names), list(templates)
    if not names:
        return torch.zeros(0, text_tower.embed_dim)
    ids = text_tower.tokenize([t.format(n) for n in names for t in templates], truncate=True)
    ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
    emb = torch.cat([text_tower.encode(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])
    emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def split_background(background: Sequence[str], class_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped) background prompts: a prompt that is a class name, or a whole word of one, would
    compete with that class in the softmax, so it is dropped (for COCO this removes "keyboard" and
    "sign", as CLIP-ES's COCO list does)."""
    words = set()
    for name in class_names:
        words.add(name.lower().strip())
        words.update(w for w in name.lower().replace(",", " ").split())
    kept = [b for b in background if b.lower().strip() not in words]
    dropped = [b for b in background if b.lower().strip() in words]
    return kept, dropped


def es_normalise(x: Tensor) -> Tensor:
    """Per row of a K x ... tensor, CLIP-ES's (and its Grad-CAM library's) normalisation in float32:
    ``x - min``, then divided by ``max + 1e-7`` (so the peak stays just under 1; a constant row -> 0)."""
    flat = x.float().flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + ES_EPS)
    return flat.view(x.shape)


def box_mask(cam: Tensor, threshold: float, inclusive: bool = False) -> Tensor:
    """Union of the bounding boxes of the regions of a CAM above ``threshold`` of its maximum, as CLIP-ES's
    ``scoremap2bbox(multi_contour_eval=True)`` and the mask its scripts paint from the boxes, with the same
    OpenCV calls:

    the CAM (values in [0, 1]) is scaled to uint8 (``cam * 255``, truncated), ``cv2.threshold`` strictly
    above ``int(threshold * max)``, ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``; each contour's
    ``cv2.boundingRect`` gives a box whose exclusive end is clipped to ``W - 1`` / ``H - 1``, so a box
    touching the right / bottom border loses its last column / row. ``inclusive`` keeps those (departure).

    cam: h x w. Returns an h x w bool tensor (all False when nothing exceeds the threshold).
    """
    u8 = (cam.detach().float() * 255).to(torch.uint8).cpu().numpy()
    h, w = u8.shape
    _, binary = cv2.threshold(u8, int(threshold * int(u8.max())), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    out = np.zeros((h, w), dtype=bool)
    for contour in contours:
        x0, y0, bw, bh = cv2.boundingRect(contour)
        x1, y1 = x0 + bw, y0 + bh
        if not inclusive:
            x1, y1 = min(x1, w - 1), min(y1, h - 1)
        out[y0:y1, x0:x1] = True
    return torch.from_numpy(out).to(cam.device)


def affinity_matrix(attn: Tensor, sinkhorn_iters: int = 3, power: int = 2) -> Tensor:
    """CAA transition matrix from an n x n (patch-to-patch, head-averaged) attention map."""
    t = attn.float().clamp_min(1e-12)
    for _ in range(sinkhorn_iters):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.transpose(0, 1)) / 2
    return torch.linalg.matrix_power(t, power) if power > 1 else t


def seed_from_cams(cams: np.ndarray, keys: Sequence[int], lo: float, hi: float) -> np.ndarray:
    """Seed map from K x H x W CAMs of the classes ``keys``: the argmax class where its CAM >= hi,
    background where every CAM < lo, 255 in between. No classes: all background."""
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != len(keys):
        raise ValueError(f"cams must be len(keys) x H x W, got {cams.shape} for {len(keys)} keys")
    if len(keys) == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    top = cams.max(axis=0)
    arg = cams.argmax(axis=0)
    seed = np.full(top.shape, IGNORE_INDEX, dtype=np.uint8)
    seed[top < lo] = 0
    fg = top >= hi
    seed[fg] = np.asarray(keys, dtype=np.uint8)[arg[fg]]
    return seed


def resize_image(image: np.ndarray, size: tuple[int, int], float_resize: bool = False) -> Tensor:
    """An H x W x 3 uint8 image as a 1 x 3 x h x w float32 tensor in [0, 1] of ``size`` (h, w).

    Default: CLIP-ES's preprocessing, PIL bicubic on the uint8 image, then ``/ 255`` (torchvision's
    ``Resize`` + ``ToTensor`` on a PIL image). ``float_resize``: torch bicubic (antialiased) on the
    float image, clamped to [0, 1] (departure). The same size returns the image unchanged either way.
    """
    h, w = size
    if not float_resize and image.shape[:2] != (h, w):
        image = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BICUBIC))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    if float_resize and image.shape[:2] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return x
