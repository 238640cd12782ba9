"""The WeakCLIP refinement model: frozen CLIP towers + trainable adapter, prompts, matching and decoder.

Data flow (sizes for ViT-B/16, a 512 x 512 input and K classes):

1. Frozen image tower -> patch tokens after blocks 4, 6, 8, 12 (B x 768 x 32 x 32 each), the global
   embedding (B x 512) and the dense embeddings (B x 512 x 32 x 32).
2. ``PyramidAdapter`` -> levels at strides 4, 8, 16, 32 (768 channels: 128, 64, 32, 16 px).
3. ``PromptLearner`` + frozen text tower -> text embeddings K x 512.
4. ``CoAttentionMatching`` on [global; dense] (B x 1025 x 512) and the text (B x K x 512).
5. Score map: cosine of the L2-normalised dense embeddings and text embeddings, B x K x 32 x 32.
6. The score map, resized (bilinear, align_corners=True) to each level, is concatenated to it
   (768 + K channels) -> ``FPNNeck`` (256) -> ``SemanticFPNHead`` -> logits B x K x 128 x 128.
7. Identity head: ``score_map / tau``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from weakclip.data.classes import prompt_names
from weakclip.errors import WeakclipError
from weakclip.models.adapter import PyramidAdapter
from weakclip.models.clip import build_clip, get_arch
from weakclip.models.clip_blocks import DROP_PATH_MODES
from weakclip.models.clip_image import CLIPImageTower
from weakclip.models.clip_text import CLIPTextTower
from weakclip.models.decoder import INIT_SCHEMES, FPNNeck, SemanticFPNHead
from weakclip.models.matching import MATCH_MODES, CoAttentionMatching
from weakclip.models.prompts import PromptLearner

__all__ = ["ModelConfig", "WeakCLIP", "build_model", "configure_image_tower"]

_TOWERS = ("image_tower", "text_tower")


@dataclass
class ModelConfig:
    """Every size of the refinement model; the defaults are the release's ViT-B/16 model.

    clip_arch: CLIP architecture name (``weakclip.models.clip.CLIP_ARCHS``).
    out_blocks: the 4 image-tower blocks (1-based) whose patch tokens feed the pyramid adapter.
    drop_path_rate: stochastic depth of the frozen image tower during training (rises linearly to it).
    n_ctx / name_length / ctx_init_std / truncate_names: learnable prompt context (see ``PromptLearner``);
        the release initialises its context with ``trunc_normal_`` at std 1 (cut at +-2), our default too;
        CoOp's 0.02 is a setting.
    match_*: co-attention matching (width, heads, layers per decoder, dropout, "chain" | "release",
        bias of the q/k/v projections: off in the release); gamma_init: initial gamma and beta.
    neck_channels / head_channels / head_dropout: FPN neck and Semantic-FPN head.
    tau: temperature of the identity head (score_logits = score_map / tau).
    bn_eval: keep every BatchNorm in eval mode (running statistics frozen) even in train mode. Off in the
        release: its ``norm_eval`` only catches ``BatchNorm2d``, and its BNs are SyncBN, so all of them train
        with batch statistics (the ``-plus`` presets turn it on).
    freeze_towers: both CLIP towers get ``requires_grad=False`` and stay out of the optimizer. Off in the
        release, whose towers sit in an ``lr_mult=0`` optimizer group that still receives gradients and tiny
        AdamW updates (``train.tower_lr_mult``; see ``weakclip.engine.schedule``).
    frozen_no_grad: with ``freeze_towers``, run the image tower under ``torch.no_grad()`` (nothing
        trainable precedes it).
    readable_names: prompt readable class names ("diningtable" -> "dining table"); off in the release,
        which prompts the raw dataset strings.

    Fidelity switches (default: the release's behaviour; the other value is our departure):
    double_cls: True (release) adds ``class_embedding`` twice to the CLS token (token + CLS position);
        False: once, as CLIP.
    pos_embed_size: 512 (release) resizes the stored positional embedding once, at build, to the patch
        grid of a ``pos_embed_size`` px input (32 x 32 for patch 16) and resizes every other input grid
        from that one; 0 keeps CLIP's native grid (14 x 14) and resizes from it. Both bilinear,
        align_corners=False.
    drop_path_mode: "token" (release) draws stochastic depth per token position, shared by the batch
        and the channels; "sample": per sample.
    init_scheme: "release" (neck convs Kaiming-normal fan_out, classifier PyTorch's default, matching
        Linear layers trunc-normal std 0.02 cut at +-2 absolute, i.e. untruncated in effect: what the
        release's constructors do, its ``init_weights`` never being called); "mmseg" (the init mmseg
        declares: neck Xavier-uniform, classifier normal std 0.01, matching cut at +-2 std).
    partial_patches: "drop" (release) accepts any input size, the strided patch convolution leaving the
        last H mod 16 rows / W mod 16 columns out (the release runs whole images smaller than its 512 crop
        so); "error": such sizes raise (callers pad).
    """

    clip_arch: str = "ViT-B/16"
    out_blocks: tuple[int, ...] = (4, 6, 8, 12)
    drop_path_rate: float = 0.1
    n_ctx: int = 8
    name_length: int = 5
    ctx_init_std: float = 1.0
    truncate_names: bool = False
    match_width: int = 256
    match_heads: int = 4
    match_layers: int = 3
    match_dropout: float = 0.1
    match_mode: str = "release"
    match_qkv_bias: bool = False
    gamma_init: float = 0.1
    neck_channels: int = 256
    head_channels: int = 256
    head_dropout: float = 0.1
    tau: float = 0.07
    bn_eval: bool = False
    freeze_towers: bool = False
    frozen_no_grad: bool = True
    readable_names: bool = False
    double_cls: bool = True
    pos_embed_size: int = 512
    drop_path_mode: str = "token"
    init_scheme: str = "release"
    partial_patches: str = "drop"

    def __post_init__(self) -> None:
        self.out_blocks = tuple(int(b) for b in self.out_blocks)
        levels = PyramidAdapter.num_levels
        if len(self.out_blocks) != levels or len(set(self.out_blocks)) != levels:
            raise WeakclipError(f"out_blocks must name 4 distinct blocks, got {self.out_blocks}")
        if list(self.out_blocks) != sorted(self.out_blocks):
            raise WeakclipError(f"out_blocks must be ascending (shallow to deep), got {self.out_blocks}")
        if self.match_mode not in MATCH_MODES:
            raise WeakclipError(f"match_mode must be one of {MATCH_MODES}, got {self.match_mode!r}")
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise WeakclipError(
                f"drop_path_mode must be one of {DROP_PATH_MODES}, got {self.drop_path_mode!r}"
            )
        if self.partial_patches not in ("drop", "error"):
            raise WeakclipError(f"partial_patches must be 'drop' or 'error', got {self.partial_patches!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise WeakclipError(f"init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if int(self.pos_embed_size) < 0:
            raise WeakclipError(
                f"pos_embed_size must be 0 (CLIP's grid) or a size in px, got {self.pos_embed_size}"
            )
        if self.tau <= 0:
            raise WeakclipError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise WeakclipError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")
        for name in ("match_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise WeakclipError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in (
            "n_ctx",
            "name_length",
            "match_width",
            "match_heads",
            "match_layers",
            "neck_channels",
            "head_channels",
        ):
            if int(getattr(self, name)) < 1:
                raise WeakclipError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_blocks"] = list(self.out_blocks)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise WeakclipError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise WeakclipError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**dict(values))


def _count(params: Iterator[nn.Parameter]) -> tuple[int, int]:
    trainable = frozen = 0
    for p in params:
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


class WeakCLIP(nn.Module):
    """The refinement model. ``forward(images) -> {"logits", "score_logits", "score_map"}``.

    images: B x 3 x H x W, normalised, H and W multiples of the patch size (16) -- and of 32 for the
    pyramid sizes to be exact (H/4, H/8, H/16, H/32); with ``cfg.partial_patches == "drop"`` any size,
    the last H mod 16 rows and W mod 16 columns left out (the outputs follow the floored patch grid).
    logits: B x K x H/4 x W/4 (decode head); score_map: B x K x H/16 x W/16 cosines in [-1, 1];
    score_logits: score_map / tau (identity head).

    Train/eval policy (``train(mode)``): the text tower is always in eval mode. The image tower is in eval
    mode too, with ONE exception: with a stochastic-depth rate > 0 its training flag follows ``mode``,
    because the spec trains with drop path 0.1 inside the frozen tower (the flag has no other effect in
    our tower: no dropout, no BatchNorm). With ``cfg.bn_eval`` every BatchNorm stays in eval mode.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        image_tower: CLIPImageTower,
        text_tower: CLIPTextTower,
        class_names: Sequence[str],
    ) -> None:
        super().__init__()
        if image_tower.embed_dim != text_tower.embed_dim:
            raise WeakclipError(
                f"image and text towers disagree on the embedding size "
                f"({image_tower.embed_dim} vs {text_tower.embed_dim})"
            )
        self.cfg = cfg
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_tower = image_tower.requires_grad_(not cfg.freeze_towers)
        self.text_tower = text_tower.requires_grad_(not cfg.freeze_towers)
        width = image_tower.width
        embed_dim = image_tower.embed_dim
        self.adapter = PyramidAdapter(width)
        self.prompts = PromptLearner(
            self.class_names,
            text_tower,
            n_ctx=cfg.n_ctx,
            name_length=cfg.name_length,
            ctx_init_std=cfg.ctx_init_std,
            truncate_names=cfg.truncate_names,
        )
        self.matching = CoAttentionMatching(
            embed_dim,
            cfg.match_width,
            cfg.match_heads,
            cfg.match_layers,
            cfg.match_dropout,
            mode=cfg.match_mode,
            gamma_init=cfg.gamma_init,
            qkv_bias=cfg.match_qkv_bias,
            init=cfg.init_scheme,
        )
        in_channels = width + self.num_classes
        self.neck = FPNNeck(
            [in_channels] * PyramidAdapter.num_levels, cfg.neck_channels, init=cfg.init_scheme
        )
        # Nominal strides (exact for patch 16); the head only uses their ratios (x4, x2, x1, x1/2).
        self.head = SemanticFPNHead(
            cfg.neck_channels,
            self.num_classes,
            cfg.head_channels,
            (4, 8, 16, 32),
            cfg.head_dropout,
            init=cfg.init_scheme,
        )
        self._text_cache: tuple[tuple, Tensor] | None = None
        self.train()

    # ---------------------------------------------------------------------------------------- modes

    @property
    def image_tower_stochastic(self) -> bool:
        """Whether the image tower has stochastic depth (and so follows the train flag)."""
        return any(rate > 0 for rate in self.image_tower.drop_path_rates)

    @property
    def has_unused_parameters(self) -> bool:
        """True when some trainable parameters get no gradient (DDP then needs find_unused_parameters):
        the unused matching layers of ``match_mode="release"``, and with trainable towers the text tower's
        ``logit_scale``, which the model never uses (the release runs DDP with find_unused_parameters)."""
        towers_train = any(p.requires_grad for p in self.text_tower.parameters())
        return self.matching.has_unused_parameters or towers_train

    def train(self, mode: bool = True) -> WeakCLIP:
        super().train(mode)
        self.text_tower.eval()
        self.image_tower.train(mode and self.image_tower_stochastic)
        if self.cfg.bn_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------- parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def parameter_summary(self) -> str:
        """A table of trainable and frozen parameter counts per submodule, with totals."""
        rows = [(name, *_count(child.parameters())) for name, child in self.named_children()]
        total = _count(self.parameters())
        lines = [f"{'module':<14}{'trainable':>14}{'frozen':>14}"]
        lines += [f"{name:<14}{t:>14,}{f:>14,}" for name, t, f in rows]
        lines.append(f"{'total':<14}{total[0]:>14,}{total[1]:>14,}")
        return "\n".join(lines)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the frozen CLIP towers (what a checkpoint needs to store); towers that
        train (the release: ``freeze_towers`` off) are part of it."""
        frozen = tuple(t + "." for t in _TOWERS
                       if not any(p.requires_grad for p in getattr(self, t).parameters()))
        return {k: v for k, v in self.state_dict().items() if not (frozen and k.startswith(frozen))}

    # -------------------------------------------------------------------------------------- forward

    def encode_image(self, images: Tensor):
        """The image tower's ``ImageFeatures``; under no_grad when it is frozen and images need no grad."""
        skip_graph = (
            self.cfg.frozen_no_grad
            and not images.requires_grad
            and not any(p.requires_grad for p in self.image_tower.parameters())
        )
        with torch.no_grad() if skip_graph else contextlib.nullcontext():
            return self.image_tower(images, self.cfg.out_blocks)

    def text_embeddings(self) -> Tensor:
        """K x embed_dim prompt embeddings before matching.

        Without autograd (inference, validation) the result depends only on the prompt context and the
        frozen text tower, so it is cached, keyed on their storage and version counters: sliding-window
        and multi-scale inference do not rerun the text tower (K x 13 tokens through 12 blocks).
        """
        context = self.prompts.context
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.prompts.parameters()):
            return self.prompts(self.text_tower)
        tower = self.text_tower
        stamp = tuple(
            (t.data_ptr(), t._version, t.device, t.dtype)
            for t in (
                context,
                tower.token_embedding.weight,
                tower.positional_embedding,
                tower.text_projection,
            )
        )
        hit = self._text_cache
        # an inference-mode tensor is not reused outside inference mode
        if (
            hit is not None
            and hit[0] == stamp
            and (torch.is_inference_mode_enabled() or not hit[1].is_inference())
        ):
            return hit[1]
        with torch.no_grad():
            embeddings = self.prompts(tower)
        self._text_cache = (stamp, embeddings)
        return embeddings

    def _apply(self, fn, recurse: bool = True):  # moving/casting invalidates the text cache
        self._text_cache = None
        return super()._apply(fn, recurse)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.encode_image(images)
        levels = self.adapter(feats.features)
        dense = feats.dense_embed
        batch, channels, grid_h, grid_w = dense.shape

        visual = torch.cat([feats.global_embed.unsqueeze(1), dense.flatten(2).transpose(1, 2)], dim=1)
        text, visual = self.matching(self.text_embeddings(), visual)
        dense = visual[:, 1:].transpose(1, 2).reshape(batch, channels, grid_h, grid_w)

        score_map = torch.einsum("bchw,bkc->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
        queried = [
            torch.cat(
                [level, F.interpolate(score_map, size=level.shape[-2:], mode="bilinear", align_corners=True)],
                dim=1,
            )
            for level in levels
        ]
        logits = self.head(self.neck(queried))
        return {"logits": logits, "score_logits": score_map / self.cfg.tau, "score_map": score_map}


def build_model(
    cfg: ModelConfig,
    class_names: Sequence[str],
    clip_weights: str | PathLike | None = None,
    *,
    image_tower: CLIPImageTower | None = None,
    text_tower: CLIPTextTower | None = None,
    pretrained_download: bool = True,
    device: str | torch.device = "cpu",
) -> WeakCLIP:
    """Build the refinement model for ``class_names`` (dataset or readable names; index 0 background).

    With ``cfg.readable_names`` class names go through ``prompt_names`` ("diningtable" -> "dining table");
    the release prompts them as given. The CLIP towers are built
    from ``clip_weights`` (see ``build_clip``; ``None`` downloads OpenAI's weights unless
    ``pretrained_download=False``, which leaves them RANDOM: tests only) with ``cfg.drop_path_rate``, or
    passed ready-made as ``image_tower`` and ``text_tower`` (both; frozen here with ``cfg.freeze_towers``;
    they keep their own stochastic depth, which should equal ``cfg.drop_path_rate``).
    """
    if (image_tower is None) != (text_tower is None):
        raise WeakclipError("pass both image_tower and text_tower, or neither")
    arch = get_arch(cfg.clip_arch)
    if image_tower is None:
        image_tower, text_tower = build_clip(
            arch,
            clip_weights,
            pretrained_download=pretrained_download,
            drop_path_rate=cfg.drop_path_rate,
            frozen=True,
            device=device,
        )
    else:
        if clip_weights is not None:
            raise WeakclipError("clip_weights cannot be combined with ready-made towers")
        if image_tower.arch.name != arch.name:
            raise WeakclipError(f"the towers are {image_tower.arch.name}, the config asks for {arch.name}")
        tower_rate = max(image_tower.drop_path_rates, default=0.0)
        if abs(tower_rate - cfg.drop_path_rate) > 1e-9:
            warnings.warn(
                f"image tower stochastic depth {tower_rate} differs from cfg.drop_path_rate "
                f"{cfg.drop_path_rate}; the tower's own rate is used",
                stacklevel=2,
            )
    if any(b > image_tower.arch.layers for b in cfg.out_blocks):
        raise WeakclipError(
            f"out_blocks {cfg.out_blocks} exceed the {image_tower.arch.layers} blocks of {arch.name}"
        )
    if not class_names or isinstance(class_names, str):
        raise WeakclipError("build_model needs a list of class names")
    configure_image_tower(image_tower, cfg)
    names = prompt_names(list(class_names)) if cfg.readable_names else list(class_names)
    model = WeakCLIP(cfg, image_tower, text_tower, names)
    return model.to(device)


def configure_image_tower(image_tower: CLIPImageTower, cfg: ModelConfig) -> None:
    """Apply the config's tower switches: CLS doubling, drop-path mode, partial patches, the stored grid
    (resized once to the grid of a ``cfg.pos_embed_size`` px input; no-op when already that grid)."""
    image_tower.double_cls = cfg.double_cls
    image_tower.drop_path_mode = cfg.drop_path_mode
    image_tower.partial_patches = cfg.partial_patches
    if cfg.pos_embed_size:
        side = int(cfg.pos_embed_size) // image_tower.patch_size
        if side < 1:
            raise WeakclipError(
                f"pos_embed_size {cfg.pos_embed_size} is smaller than the patch size {image_tower.patch_size}"
            )
        image_tower.resize_stored_grid(side, side)
