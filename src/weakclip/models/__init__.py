"""Models: the frozen CLIP towers (``clip``) and their weight files (``clip_weights``)."""

from weakclip.models.clip import (
    CLIP_ARCHS,
    ClipArch,
    CLIPImageTower,
    CLIPTextTower,
    ImageFeatures,
    build_clip,
    get_arch,
)
from weakclip.models.clip_weights import check_arch, infer_arch, load_clip_state_dict

__all__ = [
    "CLIP_ARCHS",
    "CLIPImageTower",
    "CLIPTextTower",
    "ClipArch",
    "ImageFeatures",
    "build_clip",
    "check_arch",
    "get_arch",
    "infer_arch",
    "load_clip_state_dict",
]
