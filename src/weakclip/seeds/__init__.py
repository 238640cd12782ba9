"""Seed masks: the built-in training-free CLIP-ES (its VOC / COCO scripts by default, departures as
switches), CLIP-ES's own argmax and CRF masks, the batch runner, and a checker for seed folders made
by any method.

A seed folder holds ``<id>.png`` per image: single-channel label maps of class ids (0 = background)
and 255 = unsure, of the image's size. ``weakclip seeds`` writes one; ``check_seeds`` validates one.
Heavy parts (torch, the CLIP towers) are imported by the submodules only.
"""

from __future__ import annotations

__all__ = [
    "BACKGROUND_PROMPTS",
    "ClipEsConfig",
    "ClipEsSeeder",
    "SeedReport",
    "argmax_mask",
    "crf_mask",
    "check_seeds",
    "generate_seeds",
    "seed_from_cams",
    "seed_preset",
]


def __getattr__(name: str):
    if name in ("BACKGROUND_PROMPTS", "ClipEsConfig", "seed_preset"):
        from weakclip.seeds import settings

        return getattr(settings, name)
    if name == "seed_from_cams":
        from weakclip.seeds.cam_ops import seed_from_cams

        return seed_from_cams
    if name == "ClipEsSeeder":
        from weakclip.seeds.clip_es import ClipEsSeeder

        return ClipEsSeeder
    if name in ("argmax_mask", "crf_mask"):
        from weakclip.seeds import masks

        return getattr(masks, name)
    if name in ("SeedReport", "check_seeds"):
        from weakclip.seeds import check

        return getattr(check, name)
    if name == "generate_seeds":
        from weakclip.seeds.run import generate_seeds

        return generate_seeds
    raise AttributeError(f"module 'weakclip.seeds' has no attribute {name!r}")
