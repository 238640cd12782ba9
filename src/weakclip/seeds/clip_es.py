"""Training-free seeds from a frozen CLIP: CLIP-ES (Lin et al., CVPR 2023, github linyq2117/CLIP-ES).

The defaults reproduce CLIP-ES's scripts (``generate_cams_voc12.py`` / ``generate_cams_coco14.py``,
``eval_cam.py``, ``eval_cam_with_crf.py``); every departure is a named switch of :class:`ClipEsConfig`
(on in the ``-plus`` presets of :func:`seed_preset`). Per image and per labelled foreground class ``c``:

1. The uint8 image is resized with PIL bicubic to sides rounded up to multiples of the patch size
   (``float_resize``: torch bicubic on floats instead), scaled to [0, 1] and normalised; it runs
   through the image tower (fp16 on CUDA, as CLIP-ES; ``precision``), blocks 1..L-1 without
   gradients, collecting the head-averaged attention of the last ``affinity_blocks`` blocks.
2. Grad-CAM on the last block: the target is the softmax probability of ``c`` over the prompt
   embeddings of the image's labels plus the background prompts (``softmax_over="labels"``, CLIP-ES;
   ``"all"`` puts every class in the softmax), with logits ``logit_scale * cos(image, text)`` and the
   image embedding the mean over the patch tokens after ``ln_post``, projected. Prompts use CLIP-ES's
   synonym-extended class names for VOC and COCO, the class list recognised in any spelling
   (:mod:`weakclip.seeds.names`; ``plain_names``).
   The activation is the last block's attention input (``ln_1`` output), channel weights the
   patch-averaged gradients, ``cam = relu(sum_ch w_ch * A_ch)``, normalised twice as
   ``(x - min) / (max + 1e-7)`` (CLIP-ES's Grad-CAM library normalises per layer, then again after
   averaging its one layer). All labelled classes share one forward and one backward pass.
3. Class-aware attention affinity (CAA): the attention averaged over the blocks, patch-to-patch part,
   alternately column- and row-normalised ``sinkhorn_iters`` times, symmetrised, raised to the power
   ``affinity_power``, applied to the Grad-CAM masked to boxes (:func:`box_mask`: the CAM scaled to
   uint8, thresholded at ``int(box_threshold * max)``, the bounding boxes of its 8-connected regions,
   their end clipped to the last row / column and used as an exclusive end, as CLIP-ES's
   ``scoremap2bbox`` does; ``inclusive_boxes`` keeps the full box); normalised once more.
4. The per-view CAMs are resized (bilinear) to the image size and averaged over scales and flips.

Three label maps come from the CAMs (:mod:`weakclip.seeds.masks` has the two CLIP-ES rules):

* the seed (what refinement trains on): a labelled class where its CAM is the largest and at least
  ``hi``, background where every labelled class's CAM is below ``lo``, 255 (unsure) in between;
* CLIP-ES's mask: argmax over the CAMs and a background score ``(1 - max)^bg_power``;
* CLIP-ES's CRF pseudo mask: dense CRF on those scores, 255 where its confidence is under 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from weakclip.data.classes import IGNORE_INDEX
from weakclip.errors import WeakclipError
from weakclip.seeds.names import (
    BACKGROUND_COCO,
    BACKGROUND_VOC,
    clip_es_background,
    prompt_vocabulary,
    recognise_class_list,
)

__all__ = [
    "BACKGROUND_PROMPTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "MASK_KINDS",
    "SEED_PRESETS",
    "ClipEsConfig",
    "ClipEsSeeder",
    "box_mask",
    "encode_prompts",
    "es_normalise",
    "seed_from_cams",
    "seed_preset",
    "split_background",
]

#: CLIP-ES's background prompt list of its VOC script (scene and stuff words that often co-occur with
#: VOC objects); its COCO script leaves out "keyboard" and "sign" (``names.BACKGROUND_COCO``).
BACKGROUND_PROMPTS: tuple[str, ...] = BACKGROUND_VOC

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: CLIP-ES's normalisation constant: ``(x - min) / (max + 1e-7)``.
ES_EPS = 1e-7
#: The extra label maps the seed stage can write besides the seeds (see :mod:`weakclip.seeds.masks`).
MASK_KINDS: tuple[str, ...] = ("argmax", "crf")


@dataclass(frozen=True)
class ClipEsConfig:
    """Settings of the seed stage. The defaults are CLIP-ES's; ``None`` means "CLIP-ES's value for the
    dataset", resolved from the class list (COCO's, 80 classes or the release's 91 ids, in any spelling
    (:func:`~weakclip.seeds.names.recognise_class_list`): the COCO script's, otherwise the VOC
    script's). See :func:`seed_preset` for the named presets.

    templates: prompt templates, ``{}`` = the class name; embeddings averaged over templates.
    background: background prompts, extra softmax entries that are never labels (None: CLIP-ES's
        list for the dataset, 25 words for VOC, 23 for COCO).
    scales: resize factors of the (``input_size``-scaled) image; CAMs averaged over them.
    flip: also run each scale horizontally flipped.
    input_size: short side the image is resized to before ``scales``; None keeps its own size. Sides
        are rounded up to multiples of the patch size.
    logit_scale: CLIP's temperature for the softmax (OpenAI's trained value is 100).
    softmax_over: ``"labels"`` (the image's labels + background prompts, CLIP-ES) or ``"all"``
        (every class prompt + background prompts; departure).
    plain_names: prompt the readable class names instead of CLIP-ES's synonym-extended ones
        (departure; CLIP-ES's names exist for VOC and COCO only, other class lists always use plain;
        a recognised VOC / COCO list gets our readable names of that dataset, whatever its spelling).
    refine: apply the class-aware attention affinity (False: plain Grad-CAM).
    affinity_blocks: how many of the last blocks' attentions are averaged (clipped to the depth).
    sinkhorn_iters: rounds of column-then-row normalisation of the attention.
    affinity_power: power of the symmetrised transition matrix.
    box_threshold: fraction of a CAM's (uint8) maximum outlining the affinity boxes (None: 0.4 for
        VOC, 0.7 for COCO, as CLIP-ES's two scripts).
    inclusive_boxes: a box touching the right / bottom border keeps its last column / row
        (departure; CLIP-ES clips the exclusive box end to W-1 / H-1, which drops them).
    float_resize: resize the image as floats with torch bicubic (antialiased) instead of PIL bicubic
        on uint8 (departure).
    precision: ``"auto"`` (fp16 on CUDA, as CLIP-ES runs its whole model; fp32 on CPU, where fp16 is
        impractically slow), ``"fp16"`` or ``"fp32"`` (departure on CUDA).
    lo, hi: seed thresholds (background below ``lo`` for every label, a class at or above ``hi``).
    masks: which CLIP-ES label maps to write besides the seeds (:data:`MASK_KINDS`).
    bg_power: exponent ``t`` of CLIP-ES's background score ``(1 - max)^t`` (its CRF script uses 1;
        its eval script tries 1 and 2 and keeps the better on the ground truth).
    crf_confidence: CRF pixels whose marginal is under this become 255 (CLIP-ES: 0.95).
    crf_fix_wrap: feed the CRF the image itself (departure); CLIP-ES casts the mean-subtracted BGR
        image straight to uint8, so negative values wrap around.
    """

    templates: tuple[str, ...] = ("a clean origami {}.",)
    background: tuple[str, ...] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    input_size: int | None = None
    logit_scale: float = 100.0
    softmax_over: str = "labels"
    plain_names: bool = False
    refine: bool = True
    affinity_blocks: int = 8
    sinkhorn_iters: int = 3
    affinity_power: int = 2
    box_threshold: float | None = None
    inclusive_boxes: bool = False
    float_resize: bool = False
    precision: str = "auto"
    lo: float = 0.25
    hi: float = 0.5
    masks: tuple[str, ...] = MASK_KINDS
    bg_power: float = 1.0
    crf_confidence: float = 0.95
    crf_fix_wrap: bool = False
    mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    std: tuple[float, float, float] = field(default=CLIP_STD)

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise WeakclipError(f"seed settings: {msg}")

        object.__setattr__(self, "templates", tuple(self.templates))
        if self.background is not None:
            background = tuple(str(b).strip() for b in self.background if str(b).strip())
            object.__setattr__(self, "background", background)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "masks", tuple(dict.fromkeys(str(m) for m in self.masks)))
        if not self.templates or any("{}" not in t for t in self.templates):
            fail(f"every prompt template needs a '{{}}' for the class name, got {self.templates}")
        if not self.scales or any(not (0.0 < s <= 8.0) for s in self.scales):
            fail(f"scales must be positive (at most 8), got {self.scales}")
        if self.input_size is not None and self.input_size < 16:
            fail(f"input_size must be at least 16 pixels, got {self.input_size}")
        if self.softmax_over not in ("all", "labels"):
            fail(f"softmax_over must be 'all' or 'labels', got {self.softmax_over!r}")
        if self.precision not in ("auto", "fp16", "fp32"):
            fail(f"precision must be 'auto', 'fp16' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.lo <= self.hi <= 1.0:
            fail(f"thresholds must satisfy 0 <= lo <= hi <= 1, got lo={self.lo} hi={self.hi}")
        if self.box_threshold is not None and not 0.0 <= self.box_threshold < 1.0:
            fail(f"box_threshold must lie in [0, 1), got {self.box_threshold}")
        if self.affinity_blocks < 1 or self.sinkhorn_iters < 0 or self.affinity_power < 1:
            fail("affinity_blocks and affinity_power must be >= 1 and sinkhorn_iters >= 0")
        if self.logit_scale <= 0:
            fail(f"logit_scale must be positive, got {self.logit_scale}")
        bad = [m for m in self.masks if m not in MASK_KINDS]
        if bad:
            fail(f"unknown mask kinds {bad}; choose from {list(MASK_KINDS)}")
        if not self.bg_power > 0:
            fail(f"bg_power must be positive, got {self.bg_power}")
        if not 0.0 <= self.crf_confidence <= 1.0:
            fail(f"crf_confidence must lie in [0, 1], got {self.crf_confidence}")

    def for_classes(self, classes: Sequence[str]) -> ClipEsConfig:
        """This config with the dataset-dependent ``None`` fields filled in for ``classes``."""
        kind = recognise_class_list(classes)
        coco = kind in ("coco", "coco91")
        return replace(
            self,
            background=self.background if self.background is not None else clip_es_background(kind),
            box_threshold=self.box_threshold if self.box_threshold is not None else (0.7 if coco else 0.4),
        )

    def dtype_on(self, device: torch.device | str) -> torch.dtype:
        """The tower precision on ``device``."""
        if self.precision == "fp16" or (self.precision == "auto" and torch.device(device).type == "cuda"):
            return torch.float16
        return torch.float32


#: Departures from CLIP-ES, all on in the ``-plus`` presets (unmeasured; see docs/method.md).
PLUS_SWITCHES: dict = {"softmax_over": "all", "plain_names": True, "inclusive_boxes": True,
                       "float_resize": True, "precision": "fp32", "crf_fix_wrap": True}

SEED_PRESETS: dict[str, dict] = {
    "voc": {"background": BACKGROUND_VOC, "box_threshold": 0.4},
    "coco": {"background": BACKGROUND_COCO, "box_threshold": 0.7},
    "voc-plus": {"background": BACKGROUND_VOC, "box_threshold": 0.4, **PLUS_SWITCHES},
    "coco-plus": {"background": BACKGROUND_COCO, "box_threshold": 0.7, **PLUS_SWITCHES},
}


def seed_preset(name: str, **overrides) -> ClipEsConfig:
    """The seed settings of a preset: ``voc`` / ``coco`` are CLIP-ES's VOC / COCO scripts exactly;
    ``voc-plus`` / ``coco-plus`` switch on our departures (:data:`PLUS_SWITCHES`). ``overrides`` are
    :class:`ClipEsConfig` fields set on top."""
    key = str(name).lower()
    if key not in SEED_PRESETS:
        raise WeakclipError(f"unknown seed preset {name!r}; choose from {sorted(SEED_PRESETS)}")
    return ClipEsConfig(**{**SEED_PRESETS[key], **overrides})


# --------------------------------------------------------------------------------------------------
# helpers


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


# --------------------------------------------------------------------------------------------------


class ClipEsSeeder:
    """CLIP-ES CAMs, seeds and masks for images with known image-level labels.

    Args:
        image_tower: a ``CLIPImageTower`` (frozen; its device is used). It is cast IN PLACE to the
            config's precision (fp16 on CUDA by default, as CLIP-ES runs its model).
        class_names: the dataset's classes, background first (``dataset.classes``); the foreground
            names in the prompts are CLIP-ES's for VOC and COCO in any spelling
            (:func:`~weakclip.seeds.names.prompt_vocabulary`).
        text_tower: a ``CLIPTextTower`` to embed the prompts once (cast in place like the image
            tower); may be omitted when both embeddings below are given.
        config: :class:`ClipEsConfig` (its dataset-dependent ``None`` fields are filled in from
            ``class_names``: ``self.config`` is the resolved one).
        class_embeddings: (K-1) x D text embeddings of the foreground classes (instead of the tower).
        background_embeddings: n_bg x D embeddings of the background prompts (instead of the tower).

    Attributes ``class_prompts`` / ``background_prompts`` list the names put into the templates
    (empty when the embeddings were given), ``dropped_background`` the background words left out
    because they name a class, ``vocabulary`` the :class:`~weakclip.seeds.names.PromptNames` chosen
    for the class list (``names_source``: "clip-es voc", "clip-es coco" or "plain"; ``clip_es_names``:
    whether they are CLIP-ES's). :meth:`names_record` gathers them for summaries.
    """

    def __init__(
        self,
        image_tower,
        class_names: Sequence[str],
        *,
        text_tower=None,
        config: ClipEsConfig | None = None,
        class_embeddings: Tensor | None = None,
        background_embeddings: Tensor | None = None,
    ) -> None:
        self.classes = list(class_names)
        self.config = (config or ClipEsConfig()).for_classes(self.classes)
        if len(self.classes) < 2:
            raise WeakclipError("the seeder needs background plus at least one object class")
        self.device = next(image_tower.parameters()).device
        self.dtype = self.config.dtype_on(self.device)
        self.image_tower = image_tower.to(self.dtype).eval()
        if (class_embeddings is None or background_embeddings is None) and text_tower is None:
            raise WeakclipError("ClipEsSeeder needs a text tower or precomputed text embeddings")
        if text_tower is not None:
            text_tower = text_tower.to(self.dtype)
        self.vocabulary = prompt_vocabulary(self.classes, plain=self.config.plain_names)
        names = list(self.vocabulary.names)
        self.names_source = self.vocabulary.source
        self.clip_es_names = self.vocabulary.clip_es
        self.class_prompts: list[str] = []
        if class_embeddings is None:
            self.class_prompts = names
            class_embeddings = encode_prompts(text_tower, names, self.config.templates)
        self.background_prompts: list[str] = []
        self.dropped_background: list[str] = []
        if background_embeddings is None:
            self.background_prompts, self.dropped_background = split_background(
                self.config.background, names
            )
            background_embeddings = encode_prompts(text_tower, self.background_prompts, self.config.templates)
        fg = F.normalize(torch.as_tensor(class_embeddings).to(self.dtype), dim=-1)
        bg = torch.as_tensor(background_embeddings).to(self.dtype).reshape(-1, fg.shape[-1])
        bg = F.normalize(bg, dim=-1)
        if fg.shape[0] != len(self.classes) - 1:
            raise WeakclipError(
                f"{fg.shape[0]} class embeddings for {len(self.classes) - 1} foreground classes"
            )
        self.class_embeddings = fg.to(self.device)
        self.background_embeddings = bg.to(self.device)

    def names_record(self) -> dict:
        """Which prompts the seeder uses, for summaries and stage records: ``names_source`` ("clip-es
        voc", "clip-es coco", "plain"; "given embeddings" when the class embeddings were passed in),
        ``class_list`` ("voc", "coco", "coco91" or None), ``names`` (one per foreground class),
        ``background`` (the background prompts), ``dropped_background`` and, for a class list CLIP-ES
        has no names for, ``names_note``."""
        record = {
            "names_source": self.names_source if self.class_prompts else "given embeddings",
            "class_list": self.vocabulary.class_list,
            "names": list(self.class_prompts),
            "background": list(self.background_prompts),
            "dropped_background": list(self.dropped_background),
        }
        if self.vocabulary.note and self.class_prompts:
            record["names_note"] = self.vocabulary.note
        return record

    # ------------------------------------------------------------------ inputs
    def label_ids(self, labels) -> list[int]:
        """Sorted foreground class ids from a multi-hot vector (float/bool array or tensor of length K)
        or from a sequence of class ids (ints; 0 ignored)."""
        if isinstance(labels, Tensor):
            labels = labels.detach().cpu().numpy()
        arr = np.asarray(labels)
        if arr.dtype.kind in "fb":
            if arr.shape != (len(self.classes),):
                raise WeakclipError(f"multi-hot labels must have length {len(self.classes)}, got {arr.shape}")
            ids = [int(i) for i in np.nonzero(arr > 0.5)[0]]
        else:
            ids = [int(i) for i in arr.reshape(-1)]
        bad = [i for i in ids if not 0 <= i < len(self.classes)]
        if bad:
            raise WeakclipError(f"label ids {bad} are outside 0..{len(self.classes) - 1}")
        return sorted({i for i in ids if i != 0})

    @staticmethod
    def _check_image(image: np.ndarray) -> None:
        ok = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
        if not ok or image.dtype != np.uint8:
            what = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise WeakclipError(f"image must be an H x W x 3 uint8 array, got {what}")

    def _views(self, image: np.ndarray) -> list[tuple[Tensor, bool]]:
        cfg = self.config
        h, w = image.shape[:2]
        base = 1.0 if cfg.input_size is None else cfg.input_size / min(h, w)
        p = self.image_tower.patch_size
        mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        views = []
        for s in cfg.scales:
            size = (
                max(p, math.ceil(s * base * h / p) * p),
                max(p, math.ceil(s * base * w / p) * p),
            )
            y = resize_image(image, size, float_resize=cfg.float_resize).to(self.device)
            y = ((y - mean) / std).to(self.dtype)
            views.append((y, False))
            if cfg.flip:
                views.append((y.flip(-1), True))
        return views

    # ------------------------------------------------------------------ one view
    def _text_rows(self, keys: list[int]) -> tuple[Tensor, Tensor]:
        if self.config.softmax_over == "all":
            text = torch.cat([self.class_embeddings, self.background_embeddings])
            target = torch.tensor([k - 1 for k in keys], device=self.device)
        else:
            text = torch.cat([self.class_embeddings[[k - 1 for k in keys]], self.background_embeddings])
            target = torch.arange(len(keys), device=self.device)
        return text, target

    def view_cams(self, image: Tensor, keys: list[int]) -> Tensor:
        """CAMs of the classes ``keys`` on one normalised 1 x 3 x h x w image: K x grid_h x grid_w."""
        return self.view_cams_batch(image, [keys])[0]

    def view_cams_batch(self, images: Tensor, keys_list: Sequence[list[int]]) -> list[Tensor]:
        """CAMs of B normalised images of one size (B x 3 x h x w), image ``i`` for the classes
        ``keys_list[i]`` (at least one each): a list of K_i x grid_h x grid_w tensors.

        One forward pass for the batch; the last block runs once per (image, class) row, and a single
        backward pass gives every row its Grad-CAM (each row's score depends on its own tokens only).
        """
        cfg = self.config
        tower = self.image_tower
        depth = tower.num_blocks
        first_attn = depth - min(cfg.affinity_blocks, depth) + 1
        if images.shape[0] != len(keys_list) or any(not keys for keys in keys_list):
            raise WeakclipError("view_cams_batch needs one non-empty class list per image")
        attn_sum = None
        with torch.no_grad():
            x, (gh, gw) = tower.embed(images)
            for b in range(1, depth):
                x, weights = tower.run_block(b, x, need_weights=cfg.refine and b >= first_attn)
                if weights is not None:
                    a = weights.float().mean(dim=1)  # B x N x N
                    attn_sum = a if attn_sum is None else attn_sum + a
            normed = tower.block_norm(depth, x)
        owner = [i for i, keys in enumerate(keys_list) for _ in keys]  # image of each row
        first_row = [owner.index(i) for i in range(len(keys_list))]
        rows = torch.tensor(owner, device=x.device)
        with torch.enable_grad():
            act = normed.detach()[rows].clone().requires_grad_(True)
            out, weights = tower.run_block(depth, x.detach()[rows], normed=act, need_weights=cfg.refine)
            # CLIP-ES: ln_post, mean over the patch tokens, projection, cosine logits, in the tower's dtype
            pooled = tower.visual.ln_post(out[:, 1:]).mean(dim=1) @ tower.visual.proj
            feat = pooled / pooled.norm(dim=-1, keepdim=True)
            score = feat.new_zeros(())
            for i, keys in enumerate(keys_list):
                text, target = self._text_rows(keys)
                mine = feat[first_row[i]:first_row[i] + len(keys)]
                probs = (cfg.logit_scale * mine @ text.t()).softmax(dim=-1)
                score = score + probs[torch.arange(len(keys), device=probs.device), target].sum()
            (grad,) = torch.autograd.grad(score, act)
        act, grad = act.detach()[:, 1:].float(), grad[:, 1:].float()
        cam = (act * grad.mean(dim=1, keepdim=True)).sum(dim=-1).clamp_min(0)  # rows x n
        cam = es_normalise(es_normalise(cam))  # twice, as CLIP-ES's Grad-CAM library
        result = []
        for i, keys in enumerate(keys_list):
            c = cam[first_row[i]:first_row[i] + len(keys)]
            if cfg.refine:
                a = weights[first_row[i]].detach().float().mean(dim=0)  # the same for all rows of image i
                attn = a if attn_sum is None else attn_sum[i] + a
                trans = affinity_matrix(attn[1:, 1:], cfg.sinkhorn_iters, cfg.affinity_power)
                masks = torch.stack([
                    box_mask(row.view(gh, gw), cfg.box_threshold, cfg.inclusive_boxes).flatten() for row in c
                ])
                c = es_normalise((c * masks) @ trans.t())
            result.append(c.view(len(keys), gh, gw))
        return result

    # ------------------------------------------------------------------ public
    def cams_and_keys(self, image: np.ndarray, labels) -> tuple[np.ndarray, list[int]]:
        """CAMs (K_labels x H x W float32 in [0, 1]) of the image's labelled foreground classes, and
        those class ids (ascending) in the order of the CAMs."""
        return self.cams_and_keys_batch([image], [labels])[0]

    def cams_and_keys_batch(self, images: Sequence[np.ndarray], labels_list: Sequence
                            ) -> list[tuple[np.ndarray, list[int]]]:
        """:meth:`cams_and_keys` of several images of ONE size (H x W x 3 uint8 each), computed as a batch
        (the same result as one at a time, up to float rounding)."""
        if len(images) != len(labels_list):
            raise WeakclipError(f"{len(images)} images but {len(labels_list)} label sets")
        for image in images:
            self._check_image(image)
        if len({image.shape for image in images}) > 1:
            raise WeakclipError("cams_and_keys_batch needs images of one size; group them by size")
        keys_list = [self.label_ids(labels) for labels in labels_list]
        results: list[tuple[np.ndarray, list[int]]] = []
        if not images:
            return results
        h, w = images[0].shape[:2]
        busy = [i for i, keys in enumerate(keys_list) if keys]
        totals = {i: torch.zeros(len(keys_list[i]), h, w, device=self.device) for i in busy}
        views_per_image = {i: self._views(images[i]) for i in busy}
        n_views = len(next(iter(views_per_image.values()))) if busy else 0
        for v in range(n_views):
            batch = torch.cat([views_per_image[i][v][0] for i in busy])
            flipped = views_per_image[busy[0]][v][1]
            cams = self.view_cams_batch(batch, [keys_list[i] for i in busy])
            for i, cam in zip(busy, cams):
                if flipped:
                    cam = cam.flip(-1)
                totals[i] += F.interpolate(cam[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        for i, keys in enumerate(keys_list):
            if not keys:
                results.append((np.zeros((0, h, w), np.float32), keys))
                continue
            total = totals[i] / n_views
            if n_views > 1:  # peak back at 1 so that the thresholds mean the same for any view count
                total /= total.flatten(1).max(dim=1).values.clamp_min(1e-7).view(-1, 1, 1)
            results.append((total.clamp_(0, 1).cpu().numpy().astype(np.float32), keys))
        return results

    def cams(self, image: np.ndarray, labels) -> np.ndarray:
        """K_labels x H x W CAMs in [0, 1], classes in ascending id order (see :meth:`label_ids`)."""
        return self.cams_and_keys(image, labels)[0]

    def seed_from(self, cams: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        return seed_from_cams(cams, keys, self.config.lo, self.config.hi)

    def seed(self, image: np.ndarray, labels) -> np.ndarray:
        """H x W uint8 seed: class id where confident, 0 = background, 255 = unsure."""
        cams, keys = self.cams_and_keys(image, labels)
        return self.seed_from(cams, keys)
