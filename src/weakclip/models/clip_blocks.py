"""The transformer block forward the CLIP towers share: self-attention, stochastic depth, causal mask.

The parameters are those of open_clip's ``ResidualAttentionBlock`` (``attn``, ``ln_1``, ``ln_2``, ``mlp``,
``ls_1``, ``ls_2``); the computation is ours (``F.scaled_dot_product_attention``, or the explicit
softmax(QK^T)V when the attention weights are asked for).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How stochastic depth draws its mask (see ``_drop_path``).
DROP_PATH_MODES = ("sample", "token")


def _self_attention(
    attn: nn.MultiheadAttention, x: Tensor, mask: Tensor | None, need_weights: bool
) -> tuple[Tensor, Tensor | None]:
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    weights = None
    if need_weights:
        scores = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, tokens, width)
    return attn.out_proj(out), weights


def _drop_path(x: Tensor, rate: float, training: bool, mode: str = "sample") -> Tensor:
    """Stochastic depth on a residual branch ``x`` (B x N x D), scaled by 1/keep.

    ``"sample"``: one draw per sample (B x 1 x 1), the usual form. ``"token"``: one draw per token
    position, shared by the batch and the channels (1 x N x 1): what timm's ``drop_path`` does on the
    release's token-first (N x B x D) layout.
    """
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (1, x.shape[1], 1) if mode == "token" else (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


def _run_block(
    block: nn.Module,
    x: Tensor,
    *,
    mask: Tensor | None = None,
    drop_rate: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
    drop_mode: str = "sample",
) -> tuple[Tensor, Tensor | None]:
    y, weights = _self_attention(block.attn, block.ln_1(x), mask, need_weights)
    x = x + _drop_path(block.ls_1(y), drop_rate, training, drop_mode)
    x = x + _drop_path(block.ls_2(block.mlp(block.ln_2(x))), drop_rate, training, drop_mode)
    return x, weights


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)

