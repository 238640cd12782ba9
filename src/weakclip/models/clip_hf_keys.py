"""Hugging Face ``CLIPModel`` key names -> OpenAI/open_clip key names (q/k/v projections joined into
``in_proj``, the two projections transposed): what :mod:`weakclip.models.clip_weights` reads a Hugging
Face folder or file with."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from weakclip.errors import WeightsError

__all__ = ["convert_hf_state_dict", "is_hf_naming"]


def is_hf_naming(tensors: Mapping[str, Tensor]) -> bool:
    """Whether a state dict uses Hugging Face ``CLIPModel`` names."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in tensors)


def _unreadable(path: Path | str, reason: str) -> WeightsError:
    return WeightsError(f"cannot read CLIP weights from {path}: {reason}")


_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_SINGLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def convert_hf_state_dict(hf: Mapping[str, Tensor], path: Path | str = "<state dict>") -> dict[str, Tensor]:
    """Hugging Face ``CLIPModel`` keys -> OpenAI keys (q/k/v joined into in_proj, projections transposed)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in hf.items():
        if key.endswith("position_ids"):  # a buffer of older checkpoints
            continue
        if key in _HF_SINGLE:
            out[_HF_SINGLE[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower, index, rest = match.groups()
        prefix = ("visual.transformer" if tower == "vision_model" else "transformer") + f".resblocks.{index}."
        projection = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if projection is not None:
            qkv.setdefault((prefix, projection.group(2)), {})[projection.group(1)] = value
            continue
        part, _, leaf = rest.rpartition(".")
        if part not in _HF_LAYER_PARTS:
            unknown.append(key)
            continue
        out[prefix + _HF_LAYER_PARTS[part] + "." + leaf] = value
    if unknown:
        raise _unreadable(path, f"{len(unknown)} unexpected Hugging Face keys (e.g. {unknown[0]!r})")
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise _unreadable(path, f"incomplete q/k/v projections for {prefix}attn")
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
