"""The CLIP ViT image tower: ``CLIPImageTower`` and its outputs, ``ImageFeatures``.

The tower runs the blocks of open_clip's ``VisionTransformer`` itself (``weakclip.models.clip_blocks``):
multi-level patch tokens, global and dense embeddings, stochastic depth, the last block's attention
weights on request, and the positional embedding resized to any input grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.models.clip_arch import ClipArch
from weakclip.models.clip_blocks import DROP_PATH_MODES, _run_block, _self_attention

__all__ = ["CLIPImageTower", "ImageFeatures"]


@dataclass
class ImageFeatures:
    """Outputs of ``CLIPImageTower``.

    features: patch tokens after each block of ``out_blocks`` (ascending), each B x width x h x w.
    global_embed: B x embed_dim, ln_post then proj on the CLS token.
    dense_embed: B x embed_dim x h x w, ln_post on all tokens then proj, patch tokens only.
    attn: the last block's attention weights B x heads x N x N (N = 1 + h*w, CLS first), when asked for.
    """

    features: list[Tensor]
    global_embed: Tensor
    dense_embed: Tensor
    out_blocks: tuple[int, ...] = ()
    attn: Tensor | None = None

    @property
    def attn_mean(self) -> Tensor | None:
        """The last block's attention averaged over heads, B x N x N (None unless asked for)."""
        return None if self.attn is None else self.attn.mean(dim=1)


class CLIPImageTower(nn.Module):
    """CLIP ViT image tower returning multi-level patch tokens plus global and dense embeddings.

    Accepts any H, W divisible by the patch size: the stored positional embedding (14 x 14 for B/16,
    or the grid ``resize_stored_grid`` set) is bilinearly resized (align_corners=False) to the input grid
    (CLS position kept) and cached per grid size.
    ``partial_patches``: "error" (default) or "drop" (sizes not divisible by the patch: the last
    rows/columns are left out). Stochastic depth rises linearly over the blocks from 0 to
    ``drop_path_rate`` and acts only in train mode; ``drop_path_mode`` "sample" (per sample) or "token"
    (per token position, shared by the batch: the release's). ``double_cls``: the CLS position also gets
    ``class_embedding`` added, so the CLS token is ``2 * class_embedding + pos[0]`` (the release's ViT);
    CLIP adds it once.
    All blocks always run (the embeddings need the last one).
    """

    def __init__(
        self,
        visual: nn.Module,
        arch: ClipArch,
        drop_path_rate: float = 0.0,
        *,
        drop_path_mode: str = "sample",
        double_cls: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise WeakclipError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        if drop_path_mode not in DROP_PATH_MODES:
            raise WeakclipError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {drop_path_mode!r}")
        self.drop_path_mode = drop_path_mode
        self.double_cls = bool(double_cls)
        self.partial_patches = "error"  # "drop": accept any size (see ``_grid_of``)
        self.visual = visual
        self.arch = arch
        self.width = arch.width
        self.embed_dim = arch.embed_dim
        self.patch_size = arch.patch_size
        self.out_blocks = arch.out_blocks
        layers = len(visual.transformer.resblocks)
        if layers > 1:
            self.drop_path_rates = tuple(drop_path_rate * i / (layers - 1) for i in range(layers))
        else:
            self.drop_path_rates = (drop_path_rate,) * layers
        self._pos_cache: dict[tuple[int, int], tuple[tuple, Tensor]] = {}

    def _apply(self, fn: Callable, recurse: bool = True):  # moving/casting invalidates the cache
        self._pos_cache.clear()
        return super()._apply(fn, recurse)

    @property
    def native_grid(self) -> tuple[int, int]:
        """The patch grid of the stored positional embedding (CLIP's 14 x 14 for B/16 unless resized)."""
        return tuple(self.visual.grid_size)

    def _resize_grid(self, pos: Tensor, grid_h: int, grid_w: int) -> Tensor:
        native_h, native_w = self.native_grid
        width = pos.shape[1]
        grid = pos[1:].reshape(1, native_h, native_w, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, width)
        return torch.cat([pos[:1], grid], dim=0)

    def resize_stored_grid(self, grid_h: int, grid_w: int) -> None:
        """Replace the stored positional embedding by its bilinear resize (align_corners=False, in fp32)
        to ``grid_h x grid_w`` once: later inputs are resized from that grid (the release resizes CLIP's
        14 x 14 to 32 x 32 when it loads the weights, for its 512 px input)."""
        if grid_h < 1 or grid_w < 1:
            raise WeakclipError(f"positional grid must be positive, got {grid_h}x{grid_w}")
        if (grid_h, grid_w) == self.native_grid:
            return
        old = self.visual.positional_embedding
        with torch.no_grad():
            new = self._resize_grid(old.detach(), grid_h, grid_w)
        self.visual.positional_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
        self.visual.grid_size = (grid_h, grid_w)
        self._pos_cache.clear()

    def positional_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """The positional embedding for a grid_h x grid_w patch grid: (1 + grid_h*grid_w) x width."""
        pos = self.visual.positional_embedding
        native_h, native_w = self.native_grid
        if (grid_h, grid_w) == (native_h, native_w):
            return pos
        cacheable = not (pos.requires_grad and torch.is_grad_enabled())
        stamp = (pos.data_ptr(), pos._version, pos.device, pos.dtype)
        if cacheable:
            hit = self._pos_cache.get((grid_h, grid_w))
            # an inference-mode tensor is not reused outside inference mode
            usable = hit is not None and (torch.is_inference_mode_enabled() or not hit[1].is_inference())
            if usable and hit[0] == stamp:
                return hit[1]
        resized = self._resize_grid(pos, grid_h, grid_w)
        if cacheable:
            resized = resized.detach()
            self._pos_cache[(grid_h, grid_w)] = (stamp, resized)
        return resized

    def _grid_of(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an input; sizes not divisible by the patch size raise unless
        ``partial_patches == "drop"`` (then the strided patch convolution leaves the last rows/columns
        out, as in the release, whose ViT accepts any size)."""
        p = self.patch_size
        if (height % p or width % p) and self.partial_patches != "drop":
            raise WeakclipError(f"image size {height}x{width} is not divisible by the CLIP patch size {p}")
        if height < p or width < p:
            raise WeakclipError(f"image size {height}x{width} is smaller than the CLIP patch size {p}")
        return height // p, width // p

    def _check_blocks(self, out_blocks: Sequence[int] | None) -> tuple[int, ...]:
        if out_blocks is None:
            return self.out_blocks
        layers = len(self.visual.transformer.resblocks)
        blocks = tuple(sorted(set(int(b) for b in out_blocks)))
        if not blocks or not all(1 <= b <= layers for b in blocks):
            raise WeakclipError(f"out_blocks {tuple(out_blocks)} must be 1-based block indices 1..{layers}")
        return blocks

    def forward(
        self, images: Tensor, out_blocks: Sequence[int] | None = None, *, return_attn: bool = False
    ) -> ImageFeatures:
        if images.ndim != 4 or images.shape[1] != 3:
            raise WeakclipError(f"CLIP image tower expects B x 3 x H x W images, got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        grid_h, grid_w = self._grid_of(height, width)
        blocks = self._check_blocks(out_blocks)
        visual = self.visual
        x = self._embed(images, grid_h, grid_w)

        features: list[Tensor] = []
        attn = None
        resblocks = visual.transformer.resblocks
        for index, block in enumerate(resblocks, start=1):
            last = index == len(resblocks)
            x, weights = _run_block(
                block,
                x,
                drop_rate=self.drop_path_rates[index - 1],
                training=self.training,
                need_weights=return_attn and last,
                drop_mode=self.drop_path_mode,
            )
            if weights is not None:
                attn = weights
            if index in blocks:
                features.append(x[:, 1:].transpose(1, 2).reshape(batch, -1, grid_h, grid_w))

        x = visual.ln_post(x) @ visual.proj
        global_embed = x[:, 0]
        dense_embed = x[:, 1:].transpose(1, 2).reshape(batch, -1, grid_h, grid_w)
        return ImageFeatures(features, global_embed, dense_embed, blocks, attn)

    # Step-by-step access for methods that need more than ``forward`` gives, such as Grad-CAM on the
    # last block or the attention of several blocks (``weakclip.seeds``). Eval-mode computation.

    def _embed(self, images: Tensor, grid_h: int, grid_w: int) -> Tensor:
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        pos = self.positional_embedding(grid_h, grid_w).to(x.dtype)
        if self.double_cls:  # the release: pos[0] + class_embedding at the CLS position, on top of the token
            pos = torch.cat([pos[:1] + visual.class_embedding.to(x.dtype), pos[1:]], dim=0)
        x = torch.cat([cls, x], dim=1) + pos
        return visual.ln_pre(x)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens entering block 1 (patch embedding, CLS, resized positional embedding, ln_pre).

        Returns the B x (1 + h*w) x width tokens (CLS first) and the patch grid (h, w).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise WeakclipError(f"CLIP image tower expects B x 3 x H x W images, got {tuple(images.shape)}")
        grid = self._grid_of(images.shape[2], images.shape[3])
        return self._embed(images, *grid), grid

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def run_block(
        self, index: int, x: Tensor, *, normed: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Block ``index`` (1-based) on tokens ``x`` without stochastic depth.

        ``normed``, when given, replaces ``ln_1(x)`` as the attention input (the residual still adds
        ``x``), so that a gradient with respect to the normalised tokens can be taken (Grad-CAM).
        Returns the output tokens and, with ``need_weights``, the attention B x heads x N x N.
        """
        if not 1 <= index <= self.num_blocks:
            raise WeakclipError(f"block {index} is not among the blocks 1..{self.num_blocks}")
        block = self.visual.transformer.resblocks[index - 1]
        if normed is None:
            return _run_block(block, x, need_weights=need_weights)
        y, weights = _self_attention(block.attn, normed, None, need_weights)
        x = x + block.ls_1(y)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, weights

    def block_norm(self, index: int, x: Tensor) -> Tensor:
        """``ln_1`` of block ``index`` (1-based): the attention input of that block."""
        return self.visual.transformer.resblocks[index - 1].ln_1(x)

    def project(self, x: Tensor) -> Tensor:
        """ln_post then the projection, on any B x N x width tokens -> B x N x embed_dim."""
        return self.visual.ln_post(x) @ self.visual.proj
