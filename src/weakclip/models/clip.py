"""The frozen CLIP towers WeakCLIP adapts: architecture configs, image tower, text tower, ``build_clip``.

open_clip's ``CLIP`` class is used only as the container of the parameters, so that the parameter
names equal OpenAI's (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...).
The forward passes are ours: the image tower runs the blocks itself (scaled-dot-product attention,
stochastic depth, optional attention weights of the last block, positional embedding resized to any
input grid), and the text tower can insert learnable context vectors after [SOT] (CoOp-style prompts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from os import PathLike

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.models import clip_weights
from weakclip.models.clip_arch import CLIP_ARCHS, ClipArch, default_out_blocks, get_arch

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

DROP_PATH_MODES = ("sample", "token")


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


# --------------------------------------------------------------------------------------------------
# Transformer block forward (parameters of open_clip's ResidualAttentionBlock, our computation)


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


# --------------------------------------------------------------------------------------------------
# Image tower


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


# --------------------------------------------------------------------------------------------------
# Text tower


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


# --------------------------------------------------------------------------------------------------


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
