"""The seed stage's settings: :class:`ClipEsConfig` (CLIP-ES's defaults; every departure a named switch),
the seed presets (:func:`seed_preset`: ``voc`` / ``coco`` are CLIP-ES's scripts, ``-plus`` our departures)
and CLIP-ES's constants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from weakclip.errors import WeakclipError
from weakclip.seeds.names import (
    BACKGROUND_COCO,
    BACKGROUND_VOC,
    clip_es_background,
    recognise_class_list,
)

__all__ = [
    "BACKGROUND_PROMPTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ES_EPS",
    "MASK_KINDS",
    "PLUS_SWITCHES",
    "SEED_PRESETS",
    "ClipEsConfig",
    "seed_preset",
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
