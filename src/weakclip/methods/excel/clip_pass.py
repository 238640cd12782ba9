"""ExCEL's pass of the frozen CLIP image tower: surgery attention in the last blocks, every layer's tokens and
attention weights, and the second pass that mixes the decoder's features into the surgery attention.

What the release computes (clip/clip_surgery_model.py ``VisionTransformer`` after ``reload_self_attn``, called
through clip/clip.py ``generate_clip_fts``), on the parameters of our ``CLIPImageTower`` (open_clip layout,
OpenAI names), without changing that tower:

- ``reload_self_attn(layers=6)`` replaces the attention of the last ``layers - 1`` blocks (5 of 12, not 6:
  its loop runs ``range(1, layers)``) by a two-path attention. The *original* path is CLIP's q-k attention
  followed by the MLP; the *surgery* path adds, from the first replaced block on, the average of the
  q-q, k-k and v-v softmax attentions (heads summed, not averaged) applied to v, with no MLP. Both paths read
  ``ln_1`` of the original path's tokens.
- Attention weights of every block are returned: averaged over the heads in the unchanged blocks (PyTorch's
  ``nn.MultiheadAttention``), summed over the heads in the replaced ones (the original path's q-k softmax).
- Quirk, in-place aliasing (the release's ``x += x_res`` and ``x_ori += x_ori_res`` on tensors it has already
  stored as a layer's tokens): the stored tokens of the last unchanged block end up as the final surgery-path
  tokens, and the stored tokens of each replaced block but the last include the next block's attention
  output (before that block's MLP). The fusion head reads these stored tokens.
- The surgery path's CLS token is replaced by the original path's, then ``ln_post`` and the projection give
  the image features, which ``generate_clip_fts`` normalises over the *token* axis (dim 1), not the channels.
- With decoder features (``ex_feats``, its Learnable Visual Calibration; utils/camutils.py
  ``cure_attr_map``):
  their cosine similarities, minus the mean over the whole batch (an image's maps depend on its batch),
  times 3, negatives set to -inf, row softmax, are added to the patch-patch part of the surgery attention
  (every head) before the heads are summed. The original path is unaffected.
- Positional embedding: in training mode (its ``mode`` string contains "train") the release resizes the
  stored embedding once, at load, from CLIP's grid to the crop's (``crop // 16``), and any other square input
  is resized from that grid; otherwise (its val/test models) every input is resized from CLIP's own grid.
  Bilinear, align_corners False. ``base_grid`` says which: the crop's grid, or None for CLIP's. The release
  only works on square inputs; this pass takes any grid (non-square grids are resized to their own shape).
- All of it runs without gradients (the release's ``torch.no_grad``).

The unchanged blocks call ``torch.nn.functional.multi_head_attention_forward`` on the tokens-first layout,
as the release's ``nn.MultiheadAttention`` does, so that their numbers are the library's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.models.clip_image import CLIPImageTower

__all__ = [
    "RELEASE_SURGERY_LAYERS",
    "ClipPassOutput",
    "ExcelClipPass",
    "base_grid_for_mode",
    "calibration_attention",
    "patch_token_maps",
]

#: The release's ``reload_self_attn(layers=6, ...)`` argument (it changes ``layers - 1`` = 5 blocks).
RELEASE_SURGERY_LAYERS = 6


def base_grid_for_mode(mode: str, crop: int, patch_size: int = 16) -> tuple[int, int] | None:
    """The grid the positional embedding is resized from, as the release's ``reload_self_attn(mode=...)``
    sets it: the crop's grid when ``mode`` contains "train" (its training model, and ``infer_lam`` on a
    train split), else None (CLIP's own grid: its val / test models). The release divides by 16 whatever
    the patch; this uses the patch size (the same for ViT-B/16)."""
    if "train" in str(mode):
        side = int(crop) // int(patch_size)
        if side < 1:
            raise WeakclipError(f"crop {crop} is smaller than the CLIP patch size {patch_size}")
        return side, side
    return None



def block_self_attention(block: nn.Module, x: Tensor,
                         attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A CLIP block's self-attention on its ``ln_1`` of tokens-first ``x`` through
    ``torch.nn.functional.multi_head_attention_forward``, as the release's ``nn.MultiheadAttention`` runs it
    (so the numbers are the library's): the output and the attention weights averaged over the heads. Used by
    the image pass's unchanged blocks and the text encoding (with the causal mask)."""
    attn = block.attn
    normed = block.ln_1(x)
    return F.multi_head_attention_forward(
        normed, normed, normed, attn.embed_dim, attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias,
        training=False, need_weights=True, attn_mask=attn_mask, average_attn_weights=True,
    )

@dataclass
class ClipPassOutput:
    """What the release's ``generate_clip_fts`` returns, batch first.

    image_features: B x (1 + N) x embed_dim, ``ln_post`` + projection of the surgery path (CLS from the
        original path), normalised over the token axis (dim 1) as the release does.
    attn: L x B x (1 + N) x (1 + N), every block's attention weights (heads averaged in the unchanged blocks,
        summed in the replaced ones).
    tokens: L x B x (1 + N) x width, every block's stored tokens, aliasing quirk included (module docstring).
    grid: the patch grid (h, w); N = h * w, CLS first.
    (``image_features`` and ``attn`` are None from a ``tokens_only`` pass.)
    """

    image_features: Tensor | None
    attn: Tensor | None
    tokens: Tensor
    grid: tuple[int, int]


def patch_token_maps(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The stored tokens as maps, L x B x width x h x w, CLS left out (the release's ``all_feats[:, :, 1:]``
    permuted and reshaped in ``ExCEL_model.forward``)."""
    layers, batch, _, width = tokens.shape
    return tokens[:, :, 1:].permute(0, 1, 3, 2).reshape(layers, batch, width, grid[0], grid[1])


def calibration_attention(ex_feats: Tensor, beta: float = 1.0, gamma: float = 3.0) -> Tensor:
    """The attention the release adds to its surgery attention in the second pass (clip_surgery_model.py
    ``Attention.forward`` with ``ex_feats``): cosine similarities of the B x D x h x w features' columns,
    ``(s - mean(s) * beta) * gamma`` with the mean over the whole batch (quirk: batch-dependent), negatives
    set to -inf, softmax over the last axis. Returns B x 1 x hw x hw (the release repeats it per head)."""
    unit = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", unit, unit)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    return F.softmax(similarity.unsqueeze(1), dim=-1)


def _resize_positions(pos: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners False) of a (1 + h*w) x width positional embedding's grid, CLS kept."""
    width = pos.shape[1]
    grid = pos[1:].reshape(1, source[0], source[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(target[0] * target[1], width)
    return torch.cat([pos[:1], grid], dim=0)


class ExcelClipPass(nn.Module):
    """The release's CLIP image pass on our frozen ``CLIPImageTower`` (module docstring).

    surgery_layers: the release's ``reload_self_attn`` ``layers`` (6): the last ``surgery_layers - 1`` blocks
        get the two-path attention.
    base_grid: the grid the positional embedding is resized from (``base_grid_for_mode``): the crop's for the
        release's training model, None for CLIP's own (its val / test models).
    The tower is used as it is (its parameters, eval mode, no gradients); nothing of it is changed.
    """

    def __init__(
        self,
        tower: CLIPImageTower,
        surgery_layers: int = RELEASE_SURGERY_LAYERS,
        base_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        blocks = tower.num_blocks
        replaced = int(surgery_layers) - 1
        if not 1 <= replaced <= blocks:
            raise WeakclipError(
                f"surgery_layers must lie in 2..{blocks + 1} for a CLIP of {blocks} blocks "
                f"(the release changes surgery_layers - 1 blocks), got {surgery_layers}"
            )
        for index, block in enumerate(tower.visual.transformer.resblocks, start=1):
            if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
                raise WeakclipError(
                    f"ExCEL's CLIP pass needs a CLIP without layer scale (block {index} has one)"
                )
        self.tower = tower
        self.surgery_layers = int(surgery_layers)
        self.num_replaced = replaced
        self.base_grid: tuple[int, int] | None = None
        self._pos_cache: dict[tuple[int, int], tuple[tuple, Tensor]] = {}
        #: keep each grid's resized embedding (off while an export traces the pass: the cache is keyed on
        #: the grid, which would fix the traced size in the graph; the numbers are the same either way)
        self.cache_positions = True
        self.set_base_grid(base_grid)

    def _apply(self, fn, recurse: bool = True):  # moving or casting invalidates the cached embeddings
        self._pos_cache.clear()
        return super()._apply(fn, recurse)

    @property
    def num_blocks(self) -> int:
        return self.tower.num_blocks

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size

    def set_base_grid(self, grid: tuple[int, int] | None) -> None:
        """Resize positional embeddings from ``grid`` (None: CLIP's own grid); see ``base_grid_for_mode``."""
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if grid[0] < 1 or grid[1] < 1:
                raise WeakclipError(f"positional grid must be positive, got {grid[0]}x{grid[1]}")
        self.base_grid = grid
        self._pos_cache.clear()

    def positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1 + h*w) x width positional embedding for an h x w grid: CLIP's stored embedding, resized once to
        ``base_grid`` when set (the release's load-time resize), then to ``grid`` when that differs."""
        pos = self.tower.visual.positional_embedding
        if self.cache_positions:
            stamp = (pos.data_ptr(), pos._version, pos.device, pos.dtype, self.base_grid)
            hit = self._pos_cache.get(grid)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        native = tuple(self.tower.native_grid)
        with torch.no_grad():
            source, current = native, pos.detach()
            if self.base_grid is not None and self.base_grid != native:
                current = _resize_positions(current, native, self.base_grid)
                source = self.base_grid
            if grid != source:
                current = _resize_positions(current, source, grid)
        if self.cache_positions:
            self._pos_cache[grid] = (stamp, current)
        return current

    def _grid_of(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise WeakclipError(f"ExCEL's CLIP pass expects B x 3 x H x W images, got {tuple(images.shape)}")
        p = self.patch_size
        height, width = images.shape[2], images.shape[3]
        if height < p or width < p:
            raise WeakclipError(f"image size {height}x{width} is smaller than the CLIP patch size {p}")
        # the release's strided patch convolution leaves the last rows / columns of a size not divisible out
        return height // p, width // p

    # ----------------------------------------------------------------------------------------------

    def _embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens entering block 1, tokens first ((1 + N) x B x width), as the release's ViT forward."""
        visual = self.tower.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
        )
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid).to(x.dtype)
        x = visual.ln_pre(x)
        return x.permute(1, 0, 2)

    @staticmethod
    def _plain_block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """An unchanged CLIP block on tokens-first x; attention weights averaged over the heads."""
        out, weights = block_self_attention(block, x)
        x = x + out
        x = x + block.mlp(block.ln_2(x))
        return x, weights

    @staticmethod
    def _two_path_attention(
        block: nn.Module, normed: Tensor, calibration: Tensor | None, weights: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A replaced block's attention on tokens-first ``normed`` (``ln_1`` of the original path).

        Returns the surgery path's and the original path's attention outputs (tokens first) and the original
        path's weights summed over the heads (B x N x N; None without ``weights``).

        The release's operations in its order, on fewer buffers: the scaling, the sum of the three softmaxes,
        its division and the calibration run in place, and on the CPU each softmax too (``out=`` its input:
        the same numbers there, each element read before it is written); the N x N buffers are the cost."""
        attn = block.attn
        heads = attn.num_heads
        tokens_bf = normed.transpose(0, 1)
        batch, length, width = tokens_bf.shape
        qkv = F.linear(tokens_bf, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = (width // heads) ** -0.5

        def attention(a: Tensor, b: Tensor) -> Tensor:  # ((a @ b^T) * scale).softmax(-1)
            scores = torch.matmul(a, b.transpose(-2, -1)).mul_(scale)
            if scores.device.type == "cpu":
                return torch.softmax(scores, dim=-1, out=scores)
            return scores.softmax(dim=-1)

        original = attention(q, k)
        # (softmax(qq) + softmax(kk) + softmax(vv)) / 3, summed left to right as the release does
        surgery = attention(q, q)
        surgery.add_(attention(k, k)).add_(attention(v, v)).div_(3)
        if calibration is not None:
            surgery[:, :, 1:, 1:].add_(calibration)
        # quirk: the heads' attentions are summed, then applied to every head's v
        surgery = torch.sum(surgery, dim=1, keepdim=True)

        surgery_out = (surgery @ v).transpose(1, 2).reshape(batch, length, width)
        original_out = (original @ v).transpose(1, 2).reshape(batch, length, width)
        surgery_out = F.linear(surgery_out, attn.out_proj.weight, attn.out_proj.bias)
        original_out = F.linear(original_out, attn.out_proj.weight, attn.out_proj.bias)
        summed = torch.sum(original, dim=1) if weights else None
        return surgery_out.transpose(0, 1), original_out.transpose(0, 1), summed

    def forward(self, images: Tensor, ex_feats: Tensor | None = None, *, tokens_only: bool = False
                ) -> ClipPassOutput:
        """The release's image pass; with ``ex_feats`` (B x D x h x w on the token grid) its second pass.
        ``tokens_only``: the stored tokens alone (what the decoder reads), the same numbers; the image
        features and the replaced blocks' attention weights are not computed (``image_features`` and
        ``attn`` None)."""
        grid = self._grid_of(images)
        calibration = None
        if ex_feats is not None and (
            ex_feats.ndim != 4 or ex_feats.shape[0] != images.shape[0] or tuple(ex_feats.shape[2:]) != grid
        ):
            raise WeakclipError(
                f"ex_feats must be B x D x {grid[0]} x {grid[1]} for {images.shape[0]} images of "
                f"{images.shape[2]}x{images.shape[3]}, got {tuple(ex_feats.shape)}"
            )
        with torch.no_grad():
            if ex_feats is not None:
                calibration = calibration_attention(ex_feats.detach())
            blocks = self.tower.visual.transformer.resblocks
            plain = len(blocks) - self.num_replaced
            x = self._embed(images, grid)
            stored: list[Tensor] = []
            weights: list[Tensor] = []
            for index in range(plain):
                x, w = self._plain_block(blocks[index], x)
                stored.append(x)
                weights.append(w)

            surgery = x
            original = x
            for step, index in enumerate(range(plain, len(blocks))):
                block = blocks[index]
                surgery_res, original_res, w = self._two_path_attention(
                    block, block.ln_1(original), calibration, weights=not tokens_only
                )
                original = original + original_res
                if step > 0:
                    # quirk: the release adds this attention output in place to the tokens it stored for the
                    # previous block (``x_ori += x_ori_res``)
                    stored[-1] = original
                original = original + block.mlp(block.ln_2(original))
                surgery = surgery + surgery_res
                stored.append(original)
                weights.append(w)

            # the surgery path's CLS token comes from the original path (the release's ``x[0] = x_ori[0]``)
            surgery = torch.cat([original[:1], surgery[1:]], dim=0)
            if plain > 0:
                # quirk: the release's ``x += x_res`` runs in place on the last unchanged block's output, so
                # the tokens stored for that block are the final surgery-path tokens (CLS replaced included)
                stored[plain - 1] = surgery

            tokens = torch.stack([t.permute(1, 0, 2) for t in stored], dim=0)
            if tokens_only:
                return ClipPassOutput(None, None, tokens, grid)
            visual = self.tower.visual
            features = visual.ln_post(surgery.permute(1, 0, 2)) @ visual.proj
            features = features / features.norm(dim=1, keepdim=True)  # quirk: over the token axis
            attn = torch.stack(weights, dim=0)
        return ClipPassOutput(features, attn, tokens, grid)
