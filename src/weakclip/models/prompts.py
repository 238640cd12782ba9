"""Learnable prompts (CoOp style) for the frozen CLIP text tower.

Per class the token sequence is ``[SOT] + n_ctx learnable context vectors + class-name tokens + [EOT]``.
The context vectors are shared by all classes and live in the text tower's token-embedding space
(text width, 512 for ViT-B/16). With the defaults (8 context vectors, class names tokenized to 5 tokens
including [SOT]/[EOT]) the sequence is 13 tokens long; the text tower cuts its positional embedding to
that length and reads the feature at [EOT] (``CLIPTextTower.forward_with_context``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.models.clip_text import CLIPTextTower

__all__ = ["PromptLearner"]


class PromptLearner(nn.Module):
    """The learnable context (``n_ctx x text_width``) plus the class-name token ids (``K x name_length``).

    The text tower is NOT a submodule (the model owns it); pass it to ``forward``:
    ``prompts(text_tower) -> K x embed_dim`` text embeddings. Gradients reach ``context`` through the
    frozen tower. ``ctx_init_std``: standard deviation of the truncated-normal initialisation (cut at
    +-2 std). ``truncate_names``: cut class names that do not fit ``name_length`` instead of raising.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        text_tower: CLIPTextTower,
        *,
        n_ctx: int = 8,
        name_length: int = 5,
        ctx_init_std: float = 1.0,
        truncate_names: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(class_names, str) or not class_names:
            raise WeakclipError("PromptLearner needs a non-empty list of class names")
        if n_ctx < 1:
            raise WeakclipError(f"n_ctx must be >= 1, got {n_ctx}")
        if name_length < 3:
            raise WeakclipError(f"name_length must be >= 3 ([SOT] + a token + [EOT]), got {name_length}")
        if n_ctx + name_length > text_tower.context_length:
            raise WeakclipError(
                f"n_ctx + name_length = {n_ctx + name_length} exceeds the text context length "
                f"{text_tower.context_length}"
            )
        self.class_names = list(class_names)
        self.n_ctx = n_ctx
        self.name_length = name_length
        self.width = text_tower.width
        self.context = nn.Parameter(torch.empty(n_ctx, self.width))
        nn.init.trunc_normal_(self.context, std=ctx_init_std, a=-2 * ctx_init_std, b=2 * ctx_init_std)
        ids = text_tower.tokenize(self.class_names, name_length, truncate=truncate_names).cpu()
        # Not persistent: rebuilt from the class names, so checkpoints stay tokenizer-independent.
        self.register_buffer("name_token_ids", ids.long(), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def total_length(self) -> int:
        """Length of each class's token sequence (13 with the defaults)."""
        return self.n_ctx + self.name_length

    def forward(self, text_tower: CLIPTextTower) -> Tensor:
        """K x embed_dim text embeddings of the prompts (not normalised)."""
        ids = self.name_token_ids.to(text_tower.token_embedding.weight.device)
        return text_tower.forward_with_context(ids, self.context)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, n_ctx={self.n_ctx}, name_length={self.name_length}"
