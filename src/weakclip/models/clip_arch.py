"""CLIP architecture shapes (``ClipArch``) and their registry: no dependency on the towers or the weights.

``weakclip.models.clip`` (the towers) and ``weakclip.models.clip_weights`` (reading weights files) both
build on this module, so neither needs the other's names at import time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from weakclip.errors import WeakclipError

__all__ = ["CLIP_ARCHS", "ClipArch", "default_out_blocks", "get_arch"]


def default_out_blocks(layers: int) -> tuple[int, ...]:
    """Blocks at 1/3, 1/2, 2/3 and all of the depth (4, 6, 8, 12 for 12 blocks), 1-based."""
    picks = {max(1, layers // 3), max(1, layers // 2), max(1, (2 * layers) // 3), layers}
    return tuple(sorted(picks))


@dataclass(frozen=True)
class ClipArch:
    """Shape of a CLIP ViT: image tower, text tower, and the blocks whose patch tokens are returned.

    ``out_blocks`` are 1-based block indices; left empty, they default to ``default_out_blocks(layers)``.
    ``quick_gelu`` is True for OpenAI's weights (they were trained with QuickGELU).
    """

    name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True
    out_blocks: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise WeakclipError(
                f"CLIP arch {self.name}: image size {self.image_size} "
                f"is not a multiple of patch {self.patch_size}"
            )
        if self.width % self.heads or self.text_width % self.text_heads:
            raise WeakclipError(f"CLIP arch {self.name}: widths must be multiples of the head counts")
        blocks = tuple(sorted(set(self.out_blocks))) if self.out_blocks else default_out_blocks(self.layers)
        if not all(1 <= b <= self.layers for b in blocks):
            raise WeakclipError(
                f"CLIP arch {self.name}: out_blocks {self.out_blocks} must lie in 1..{self.layers}"
            )
        object.__setattr__(self, "out_blocks", blocks)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the stored positional embedding was trained for (14 for B/16)."""
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (
            f"{self.name} (width {self.width}, {self.layers} blocks, patch {self.patch_size}, "
            f"embed {self.embed_dim})"
        )


CLIP_ARCHS: dict[str, ClipArch] = {
    arch.name: arch
    for arch in (
        ClipArch("ViT-B/16", 224, 16, 768, 12, 12, 512, 512, 12, 8, out_blocks=(4, 6, 8, 12)),
        ClipArch("ViT-B/32", 224, 32, 768, 12, 12, 512, 512, 12, 8, out_blocks=(4, 6, 8, 12)),
        ClipArch("ViT-L/14", 224, 14, 1024, 24, 16, 768, 768, 12, 12, out_blocks=(6, 12, 18, 24)),
        ClipArch("ViT-L/14@336px", 336, 14, 1024, 24, 16, 768, 768, 12, 12, out_blocks=(6, 12, 18, 24)),
        # For tests only: 4x4 patch grid at 64 px, real vocabulary so that the real tokenizer works.
        ClipArch("tiny", 64, 16, 64, 4, 2, 32, 32, 2, 2, out_blocks=(1, 2, 3, 4)),
        # For the demo and tests that train: patch 8, so that a 64-96 px image has an 8-12 token grid.
        ClipArch("tiny-p8", 64, 8, 64, 4, 2, 32, 32, 2, 2, out_blocks=(1, 2, 3, 4)),
        # For ExCEL's tests and demo: 12 blocks (its fusion reads all 12 layers) and widths that are multiples
        # of 64 (the authors' CLIP derives its head counts as width // 64), so their code builds it too.
        ClipArch("tiny-excel", 64, 16, 128, 12, 2, 64, 64, 2, 1),
    )
}

_EXTRA_ALIASES = {"ViT-L-14-336": "ViT-L/14@336px", "vit_l_14_336": "ViT-L/14@336px"}


def _alias_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_ALIASES: dict[str, str] = {_alias_key(n): n for n in CLIP_ARCHS}
_ALIASES.update({_alias_key(a): n for a, n in _EXTRA_ALIASES.items()})


def get_arch(name: str | ClipArch) -> ClipArch:
    """Look up a registered architecture; accepts "ViT-B/16", "ViT-B-16", "vit_b_16" and the like."""
    if isinstance(name, ClipArch):
        return name
    key = _ALIASES.get(_alias_key(str(name)))
    if key is None:
        raise WeakclipError(f"unknown CLIP architecture {name!r}; known: {', '.join(CLIP_ARCHS)}")
    return CLIP_ARCHS[key]
