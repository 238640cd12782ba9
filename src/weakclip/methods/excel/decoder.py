"""ExCEL's trained parts: the fusion of every CLIP layer's tokens, the transformer decoder, the affinity
prediction; and the map from the release's parameter names to these modules'.

What the release computes (model/segformer_head.py ``SegFormerHead`` with ``index=12``,
model/decoder/TransDecoder.py ``DecoderTransformer`` with model/decoder/myAtt.py's attention,
model/model_excel.py ``ExCEL_model.forward``):

- Fusion: per CLIP layer, a two-layer MLP on the patch tokens (Linear width -> 256, ReLU, Linear 256 -> 256),
  the layers' maps concatenated in layer order along the channels, a 1x1 convolution back to 256 channels,
  ``Dropout2d(0.1)`` (active in training mode; the release trains with it).
- Decoder: 3 pre-norm transformer blocks of width 256 and 8 heads on the fused map's tokens (tokens first),
  each ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with a 4x QuickGELU MLP; the attention divides q by
  sqrt(head width) before ``bmm`` (myAtt's own multi-head attention, dropout 0); then a 1x1 convolution to
  the class logits. Its attention weights are computed by the release and never used; they are not here.
- Affinity prediction: the fused features (after the dropout) as unit columns, all pairwise dot products,
  ``(x - mean(x)) * 3`` with the mean over the whole batch (quirk: an image's prediction depends on its
  batch), sigmoid.

Initialisation follows the release's modules (PyTorch defaults; the attention's input projection
Xavier-uniform, its biases zero); the random draws themselves differ from the release's, whose order of
construction is not kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakclip.errors import WeakclipError

__all__ = [
    "DecoderBlock",
    "LayerFusion",
    "TokenMLP",
    "TransformerDecoder",
    "predicted_affinity",
    "release_state_dict_to_ours",
]


class TokenMLP(nn.Module):
    """One CLIP layer's projection: B x width x h x w -> B x dim x h x w through Linear, ReLU, Linear on each
    token (the release's segformer_head.py ``MLP``)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        y = self.fc2(F.relu(self.fc1(x.flatten(2).transpose(1, 2))))
        return y.permute(0, 2, 1).reshape(batch, -1, height, width)


class LayerFusion(nn.Module):
    """SegFormer-style fusion of every CLIP layer (the release's ``SegFormerHead``, index = layer count):
    L x B x width x h x w tokens -> B x dim x h x w, dropout 0.1 on whole channels in training mode."""

    def __init__(self, layers: int, in_channels: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(TokenMLP(in_channels, dim) for _ in range(layers))
        self.fuse = nn.Conv2d(dim * layers, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 5 or tokens.shape[0] != len(self.mlps):
            raise WeakclipError(
                f"the ExCEL fusion expects {len(self.mlps)} layers of B x C x h x w tokens, "
                f"got {tuple(tokens.shape)}"
            )
        maps = [mlp(tokens[i].float()) for i, mlp in enumerate(self.mlps)]
        return self.dropout(self.fuse(torch.cat(maps, dim=1)))


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


class DecoderBlock(nn.Module):
    """A pre-norm transformer block on tokens-first input (L x B x dim), as the release's TransDecoder.py
    ``ResidualAttentionBlock`` with myAtt.py's attention. Parameters are registered in the release's order
    (attention in / out, ln_1, MLP, ln_2), so that optimiser groups list them alike."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise WeakclipError(f"decoder width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def attention(self, x: Tensor) -> Tensor:
        length, batch, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        q, k, v = (
            t.contiguous().view(length, batch * self.heads, head_dim).transpose(0, 1) for t in (q, k, v)
        )
        q = q / math.sqrt(head_dim)
        weights = F.softmax(torch.bmm(q, k.transpose(-2, -1)), dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(length, batch, dim)
        return self.out(out)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(_quick_gelu(self.fc1(self.norm2(x))))


class TransformerDecoder(nn.Module):
    """The release's ``DecoderTransformer``: B x dim x h x w -> B x classes x h x w logits."""

    def __init__(self, dim: int = 256, layers: int = 3, heads: int = 8, num_classes: int = 21) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        batch, dim, height, width = features.shape
        x = features.reshape(batch, dim, height * width).permute(2, 0, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(1, 2, 0).reshape(batch, dim, height, width)
        return self.classifier(x)


def predicted_affinity(features: Tensor) -> Tensor:
    """The release's affinity prediction from the fused B x D x h x w features: B x hw x hw,
    ``sigmoid((x - mean(x)) * 3)`` of the columns' cosine similarities, the mean over the whole batch."""
    batch, dim, height, width = features.shape
    flat = F.normalize(features.reshape(batch, dim, height * width), dim=1)
    affinity = flat.transpose(2, 1).bmm(flat)
    affinity = (affinity - torch.mean(affinity) * 1.0) * 3.0
    return torch.sigmoid(affinity)


# --------------------------------------------------------------------------------------------------
# The release's parameter names

_FUSION_KEYS = (
    (re.compile(r"^decoder_fts_fuse\.linears_modulelist\.(\d+)\.proj\.(weight|bias)$"),
     r"fusion.mlps.\1.fc1.\2"),
    (re.compile(r"^decoder_fts_fuse\.linears_modulelist\.(\d+)\.proj_2\.(weight|bias)$"),
     r"fusion.mlps.\1.fc2.\2"),
    (re.compile(r"^decoder_fts_fuse\.linear_fuse\.(weight|bias)$"), r"fusion.fuse.\1"),
)
_BLOCK_PARTS = {
    "attn.in_proj_weight": "qkv.weight", "attn.in_proj_bias": "qkv.bias",
    "attn.out_proj.weight": "out.weight", "attn.out_proj.bias": "out.bias",
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "mlp.c_fc.weight": "fc1.weight", "mlp.c_fc.bias": "fc1.bias",
    "mlp.c_proj.weight": "fc2.weight", "mlp.c_proj.bias": "fc2.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
}
_BLOCK_KEY = re.compile(r"^decoder\.transformer\.resblocks\.(\d+)\.(.+)$")
_PRED_KEY = re.compile(r"^decoder\.linear_pred\.(weight|bias)$")


def release_state_dict_to_ours(
    state_dict: Mapping[str, Tensor], where: str = "state dict"
) -> dict[str, Tensor]:
    """The release's ``ExCEL_model`` state dict (or its DDP checkpoint: ``module.`` prefixes) as the trained
    parameters of ``ExcelNet`` (``fusion.*``, ``decoder.*``). The frozen CLIP (``encoder.*``) is left out: it
    comes from the CLIP weights file. One-line WeakclipError on a key of neither."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("encoder."):
            continue
        mapped = None
        for pattern, target in _FUSION_KEYS:
            if pattern.match(name):
                mapped = pattern.sub(target, name)
                break
        if mapped is None and (match := _BLOCK_KEY.match(name)) and match.group(2) in _BLOCK_PARTS:
            mapped = f"decoder.blocks.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}"
        if mapped is None and (match := _PRED_KEY.match(name)):
            mapped = f"decoder.classifier.{match.group(1)}"
        if mapped is None:
            raise WeakclipError(f"{where}: {key!r} is not a parameter of the release's ExCEL model")
        out[mapped] = value
    return out
