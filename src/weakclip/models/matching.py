"""Co-attention matching module: text embeddings and pixel embeddings refine each other.

Inputs are CLIP-space embeddings (``embed_dim``, 512 for ViT-B/16):

* visual context ``B x (1 + h*w) x C``: the global (CLS) embedding followed by the dense patch embeddings;
  projected LN -> Linear(C -> width) -> LN;
* text ``B x K x C`` (or ``K x C``, shared by the batch): projected LN -> Linear(C -> width).

Two transformer decoders (``layers`` layers each, width 256, 4 heads, dropout 0.1 by default; each layer
is pre-norm self-attention, cross-attention, MLP x4 with GELU) compute

* ``text_diff``: the text queries attend to the pixels;
* ``visual_diff``: the pixel queries attend to the text;

each is mapped back with LN -> Linear(width -> C), and the outputs are
``text + gamma * text_diff`` and ``visual + beta * visual_diff`` (gamma, beta: per-channel, init 0.1).

``mode`` selects how the decoder layers are used:

* ``"chain"`` (default, the paper's intent): the layers run in sequence, each on the previous output.
* ``"release"`` (the authors' code): only the LAST layer's output is kept, and every layer reads the
  undecoded (projected) input, so only the last layer matters; it alone is run here. The other layers
  still exist so that parameter counts and checkpoints match the release, but they receive no gradient:
  under DistributedDataParallel the model then needs ``find_unused_parameters=True``
  (see ``has_unused_parameters``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakclip.errors import WeakclipError

__all__ = ["MATCH_MODES", "CoAttentionMatching", "CrossAttention", "MatchingDecoder", "MatchingDecoderLayer"]

MATCH_MODES = ("chain", "release")


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` (B x N x D) over ``memory`` (B x M x D), by SDPA.

    Separate q/k/v projections (no bias by default, as in the release), an output projection with bias,
    and dropout on the output (no dropout on the attention weights). Self-attention: ``memory = query``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise WeakclipError(f"attention width {dim} is not a multiple of the head count {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        batch, tokens, dim = query.shape
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(memory))
        v = self._split(self.v_proj(memory))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class MatchingDecoderLayer(nn.Module):
    """Pre-norm decoder layer: x += SelfAttn(LN x); x += CrossAttn(LN x, memory); x += MLP(LN x)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = CrossAttention(width, heads, dropout, qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads, dropout, qkv_bias)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class MatchingDecoder(nn.Module):
    """A stack of decoder layers, chained (``"chain"``) or reduced to its last layer (``"release"``)."""

    def __init__(
        self, width: int, heads: int, layers: int, dropout: float, mode: str, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        if mode not in MATCH_MODES:
            raise WeakclipError(f"matching mode must be one of {MATCH_MODES}, got {mode!r}")
        if layers < 1:
            raise WeakclipError(f"matching decoders need at least one layer, got {layers}")
        self.mode = mode
        self.layers = nn.ModuleList(
            [MatchingDecoderLayer(width, heads, dropout, qkv_bias) for _ in range(layers)]
        )

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        if self.mode == "release":
            # The release loops over the layers, each applied to the undecoded input, and keeps the last
            # output: the earlier layers' results are discarded, so they are not computed here.
            return self.layers[-1](x, memory)
        for layer in self.layers:
            x = layer(x, memory)
        return x


class CoAttentionMatching(nn.Module):
    """Bidirectional text <-> pixel matching. ``forward(text, visual) -> (text', visual')`` (same shapes)."""

    def __init__(
        self,
        embed_dim: int = 512,
        width: int = 256,
        heads: int = 4,
        layers: int = 3,
        dropout: float = 0.1,
        *,
        mode: str = "chain",
        gamma_init: float = 0.1,
        qkv_bias: bool = False,
        init: str = "release",
    ) -> None:
        super().__init__()
        if init not in ("release", "mmseg"):
            raise WeakclipError(f"init must be 'release' or 'mmseg', got {init!r}")
        self.init = init
        self.embed_dim = embed_dim
        self.width = width
        self.mode = mode
        self.visual_proj = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.text_decoder = MatchingDecoder(width, heads, layers, dropout, mode, qkv_bias)
        self.visual_decoder = MatchingDecoder(width, heads, layers, dropout, mode, qkv_bias)
        self.text_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.visual_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.gamma = nn.Parameter(torch.full((embed_dim,), float(gamma_init)))
        self.beta = nn.Parameter(torch.full((embed_dim,), float(gamma_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights truncated-normal at std 0.02, biases 0; LayerNorms (1, 0). The cut: "release"
        +-2 ABSOLUTE (timm's ``trunc_normal_(std=.02)`` defaults, the release's: 100 std, so a plain normal
        in effect); "mmseg" +-2 std."""
        bound = 2.0 if self.init == "release" else 0.04
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-bound, b=bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def has_unused_parameters(self) -> bool:
        """True when some parameters never get a gradient ("release" mode with more than one layer)."""
        return self.mode == "release" and len(self.text_decoder.layers) > 1

    def unused_parameter_names(self) -> list[str]:
        """Names of the parameters that receive no gradient in the current mode."""
        if not self.has_unused_parameters:
            return []
        names = []
        for prefix, decoder in (("text_decoder", self.text_decoder), ("visual_decoder", self.visual_decoder)):
            for index, layer in enumerate(decoder.layers[:-1]):
                names += [f"{prefix}.layers.{index}.{n}" for n, _ in layer.named_parameters()]
        return names

    def forward(self, text: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """text: B x K x C or K x C; visual: B x N x C ([global; dense]) -> (B x K x C, B x N x C)."""
        if visual.ndim != 3 or visual.shape[-1] != self.embed_dim:
            raise WeakclipError(f"visual context must be B x N x {self.embed_dim}, got {tuple(visual.shape)}")
        if text.ndim == 2:
            text = text.unsqueeze(0).expand(visual.shape[0], -1, -1)
        if text.ndim != 3 or text.shape[-1] != self.embed_dim or text.shape[0] != visual.shape[0]:
            raise WeakclipError(
                f"text must be K x {self.embed_dim} or {visual.shape[0]} x K x {self.embed_dim}, "
                f"got {tuple(text.shape)}"
            )
        visual_tokens = self.visual_proj(visual)
        text_tokens = self.text_proj(text)
        text_diff = self.text_out(self.text_decoder(text_tokens, visual_tokens))
        visual_diff = self.visual_out(self.visual_decoder(visual_tokens, text_tokens))
        return text + self.gamma * text_diff, visual + self.beta * visual_diff

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
