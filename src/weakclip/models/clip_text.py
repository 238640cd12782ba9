"""The CLIP text tower: ``CLIPTextTower`` (plain encoding and CoOp-style learnable context) and its
BPE tokenizer (open_clip's bundled vocabulary, so it works offline)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from open_clip.model import CLIP
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.models.clip_arch import ClipArch
from weakclip.models.clip_blocks import _causal_mask, _run_block

__all__ = ["CLIPTextTower"]


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # bundled vocabulary: works offline

    return SimpleTokenizer()


class CLIPTextTower(nn.Module):
    """CLIP text transformer; parameter names equal OpenAI's (``token_embedding.weight``, ...)."""

    def __init__(self, clip_model: CLIP, arch: ClipArch) -> None:
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.logit_scale = clip_model.logit_scale
        self.arch = arch
        self.width = arch.text_width
        self.embed_dim = arch.embed_dim
        self.context_length = arch.context_length

    def tokenize(
        self, names: str | Sequence[str], context_length: int | None = None, *, truncate: bool = False
    ) -> Tensor:
        """[SOT] + BPE tokens + [EOT], zero-padded to ``context_length`` (default: the tower's 77).

        A text that does not fit raises WeakclipError unless ``truncate`` (then its last kept token
        becomes [EOT], as CLIP's tokenizer does).
        """
        if isinstance(names, str):
            names = [names]
        length = context_length or self.context_length
        if not 2 <= length <= self.context_length:
            raise WeakclipError(f"token length {length} must lie in 2..{self.context_length}")
        tokenizer = _bpe_tokenizer()
        if not truncate:
            for name in names:
                needed = len(tokenizer.encode(name)) + 2
                if needed > length:
                    raise WeakclipError(
                        f"text {name!r} needs {needed} tokens with [SOT]/[EOT], only {length} fit"
                    )
        return tokenizer(list(names), context_length=length).to(self.token_embedding.weight.device)

    def _encode_embeddings(self, x: Tensor, eot: Tensor) -> Tensor:
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = _causal_mask(length, x.device, x.dtype)
        for block in self.transformer.resblocks:
            x, _ = _run_block(block, x, mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection

    def _check_ids(self, token_ids: Tensor, extra: int = 0) -> None:
        if token_ids.ndim != 2:
            raise WeakclipError(f"token ids must be K x L, got {tuple(token_ids.shape)}")
        if token_ids.shape[1] + extra > self.context_length:
            raise WeakclipError(
                f"token sequence of {token_ids.shape[1] + extra} exceeds the context length "
                f"{self.context_length}"
            )

    def encode(self, token_ids: Tensor) -> Tensor:
        """Standard CLIP text encoding of K x L token ids (L <= context length) -> K x embed_dim."""
        self._check_ids(token_ids)
        x = self.token_embedding(token_ids)
        return self._encode_embeddings(x, token_ids.argmax(dim=-1))

    forward = encode

    def forward_with_context(self, name_token_ids: Tensor, context: Tensor) -> Tensor:
        """Class embeddings with learnable context: [SOT] + context + name tokens + [EOT] + padding.

        name_token_ids: K x L_name, class names tokenized short (e.g. 5 incl. [SOT]/[EOT]).
        context: n_ctx x text_width (shared by all classes) -> K x embed_dim; or B x n_ctx x text_width
        (one context per sample) -> B x K x embed_dim. The positional embedding is cut to the total
        length n_ctx + L_name and the feature is read at [EOT], whose position shifts by n_ctx.
        """
        batched = context.ndim == 3
        if context.ndim not in (2, 3) or context.shape[-1] != self.width:
            raise WeakclipError(
                f"context must be n_ctx x {self.width} or B x n_ctx x {self.width}, "
                f"got {tuple(context.shape)}"
            )
        ctx = context if batched else context.unsqueeze(0)
        n_batch, n_ctx, width = ctx.shape
        self._check_ids(name_token_ids, extra=n_ctx)
        classes, name_len = name_token_ids.shape

        names = self.token_embedding(name_token_ids)
        names = names.unsqueeze(0).expand(n_batch, classes, name_len, width)
        ctx = ctx.to(names.dtype).unsqueeze(1).expand(n_batch, classes, n_ctx, width)
        x = torch.cat([names[:, :, :1], ctx, names[:, :, 1:]], dim=2)
        x = x.reshape(n_batch * classes, n_ctx + name_len, width)
        eot = (name_token_ids.argmax(dim=-1) + n_ctx).repeat(n_batch)
        out = self._encode_embeddings(x, eot).reshape(n_batch, classes, -1)
        return out if batched else out[0]
