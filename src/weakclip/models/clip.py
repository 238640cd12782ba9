"""Building the frozen CLIP towers WeakCLIP adapts: ``build_clip`` and the open_clip model behind it.

open_clip's ``CLIP`` class is used only as the container of the parameters, so that the parameter
names equal OpenAI's (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...).
The forward passes are ours: the image tower (``weakclip.models.clip_image``) runs the blocks itself
(scaled-dot-product attention, stochastic depth, optional attention weights of the last block, positional
embedding resized to any input grid), and the text tower (``weakclip.models.clip_text``) can insert
learnable context vectors after [SOT] (CoOp-style prompts); both run the block forward of
``weakclip.models.clip_blocks``. The towers, the architecture configs and the block helpers are
importable from here too, as before they had modules of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from os import PathLike

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from weakclip.errors import WeakclipError
from weakclip.models import clip_weights
from weakclip.models.clip_arch import CLIP_ARCHS, ClipArch, default_out_blocks, get_arch
from weakclip.models.clip_blocks import DROP_PATH_MODES as DROP_PATH_MODES
from weakclip.models.clip_blocks import _causal_mask as _causal_mask
from weakclip.models.clip_blocks import _drop_path as _drop_path
from weakclip.models.clip_blocks import _run_block as _run_block
from weakclip.models.clip_blocks import _self_attention as _self_attention
from weakclip.models.clip_image import CLIPImageTower, ImageFeatures
from weakclip.models.clip_text import CLIPTextTower
from weakclip.models.clip_text import _bpe_tokenizer as _bpe_tokenizer

__all__ = [
    "CLIP_ARCHS",
    "CLIPImageTower",
    "CLIPTextTower",
    "ClipArch",
    "ImageFeatures",
    "build_clip",
    "default_out_blocks",
    "get_arch",
    "make_open_clip_model",
]


def make_open_clip_model(arch: ClipArch) -> CLIP:
    """A randomly initialised open_clip ``CLIP`` of this shape (state-dict names equal OpenAI's)."""
    vision_cfg = CLIPVisionCfg(
        layers=arch.layers,
        width=arch.width,
        head_width=arch.width // arch.heads,
        patch_size=arch.patch_size,
        image_size=arch.image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=arch.context_length,
        vocab_size=arch.vocab_size,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_layers,
    )
    return CLIP(arch.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=arch.quick_gelu)


def build_clip(
    arch: str | ClipArch = "ViT-B/16",
    weights: str | PathLike | None = None,
    *,
    pretrained_download: bool = True,
    drop_path_rate: float = 0.0,
    drop_path_mode: str = "sample",
    double_cls: bool = False,
    frozen: bool = True,
    device: str | torch.device = "cpu",
    downloader: Callable[[ClipArch], str | PathLike] | None = None,
) -> tuple[CLIPImageTower, CLIPTextTower]:
    """Build the CLIP image and text towers, loading ``weights`` when given.

    weights: OpenAI's TorchScript archive (``ViT-B-16.pt``), an open_clip state dict (.pt/.bin/.pth/
    .safetensors) or a Hugging Face ``CLIPModel`` folder; the file's shapes are checked against
    ``arch``. ``arch="auto"`` takes the architecture from the file instead.
    With ``weights=None``, OpenAI's weights are downloaded through open_clip for the released archs
    when ``pretrained_download`` (WeightsError when that fails, or when WEAKCLIP_OFFLINE=1); with
    ``weights=None`` and ``pretrained_download=False`` (or an arch without a release, such as "tiny")
    the towers keep open_clip's RANDOM initialisation, which is meant for tests only.
    ``downloader(arch) -> path`` replaces open_clip's download (tests).
    With ``frozen`` every tower parameter has requires_grad False. The towers come back in eval mode;
    stochastic depth (``drop_path_rate``, ``drop_path_mode``) acts only after ``.train()``.
    ``double_cls``: see ``CLIPImageTower`` (off: CLIP's own forward).
    """
    auto = isinstance(arch, str) and arch.strip().lower() == "auto"
    spec = None if auto else get_arch(arch)
    if weights is None and pretrained_download:
        if auto:
            raise WeakclipError('arch "auto" needs a weights file to read the architecture from')
        weights = clip_weights.download_openai_weights(spec, downloader=downloader)
    loaded = None
    if weights is not None:
        loaded = clip_weights.read_clip_weights(weights)
        if auto:
            spec = clip_weights.infer_arch(
                loaded.state_dict,
                vision_heads=loaded.vision_heads,
                text_heads=loaded.text_heads,
                quick_gelu=loaded.quick_gelu,
                path=loaded.path,
            )
        else:
            clip_weights.check_arch(
                loaded.state_dict,
                spec,
                loaded.path,
                vision_heads=loaded.vision_heads,
                text_heads=loaded.text_heads,
            )
            if loaded.quick_gelu is not None and loaded.quick_gelu != spec.quick_gelu:
                spec = replace(spec, quick_gelu=loaded.quick_gelu)  # the file's activation wins
    elif auto:
        raise WeakclipError('arch "auto" needs a weights file to read the architecture from')

    model = make_open_clip_model(spec)
    if loaded is not None:
        clip_weights.load_into_model(model, loaded.state_dict, loaded.path, spec)
    model = model.to(device).eval()
    image_tower = CLIPImageTower(
        model.visual,
        spec,
        drop_path_rate=drop_path_rate,
        drop_path_mode=drop_path_mode,
        double_cls=double_cls,
    ).eval()
    text_tower = CLIPTextTower(model, spec).eval()
    if frozen:
        for tower in (image_tower, text_tower):
            tower.requires_grad_(False)
    return image_tower, text_tower
