"""Models: the frozen CLIP towers (``clip``, ``clip_image``, ``clip_text``, ``clip_blocks``, ``clip_weights``)
and the WeakCLIP refinement model."""

from weakclip.models.adapter import PyramidAdapter
from weakclip.models.clip import CLIP_ARCHS, ClipArch, build_clip, get_arch
from weakclip.models.clip_image import CLIPImageTower, ImageFeatures
from weakclip.models.clip_text import CLIPTextTower
from weakclip.models.clip_weights import check_arch, infer_arch, load_clip_state_dict
from weakclip.models.decoder import FPNNeck, SemanticFPNHead
from weakclip.models.matching import CoAttentionMatching
from weakclip.models.prompts import PromptLearner
from weakclip.models.weakclip import ModelConfig, WeakCLIP, build_model

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
    # refinement model
    "CoAttentionMatching",
    "FPNNeck",
    "ModelConfig",
    "PromptLearner",
    "PyramidAdapter",
    "SemanticFPNHead",
    "WeakCLIP",
    "build_model",
]
