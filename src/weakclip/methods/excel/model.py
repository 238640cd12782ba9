"""The ExCEL network: the frozen CLIP image tower (ExCEL's pass), the text bank, the trained fusion + decoder.

``ExcelNet.forward`` returns what the release's model/model_excel.py ``ExCEL_model.forward`` returns, in the
same order: segmentation logits, the fused features (detached; the second pass's ``ex_feats``), the patch-text
maps, CLIP's attention weights and the predicted affinity. ``attr_maps_from_features`` is its forward with
``ex_feats`` (utils/camutils.py ``cure_attr_map``). The CLIP towers stay frozen and in eval mode whatever
``train()`` says (the release calls ``encoder.eval()`` in every forward); only ``fusion`` and ``decoder`` have
trainable parameters. The text tower is used while building the text bank and not kept.

Checkpoints: ``ExcelNet.payload()`` holds the trained parameters, the text bank (class names, integral and
enriched text features, k-means bank) and the settings; ``rebuild_excel_net(payload, clip_weights)`` makes
the network again from it and a CLIP weights file, without the descriptors file or the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from weakclip.errors import WeakclipError
from weakclip.methods.excel.clip_pass import (
    RELEASE_SURGERY_LAYERS,
    ExcelClipPass,
    base_grid_for_mode,
    patch_token_maps,
)
from weakclip.methods.excel.decoder import (
    LayerFusion,
    TransformerDecoder,
    predicted_affinity,
    release_state_dict_to_ours,
)
from weakclip.methods.excel.text import (
    RELEASE_TOP_K,
    TextBank,
    build_text_bank,
    feature_surgery,
    note_to_stderr,
)
from weakclip.models.clip import build_clip
from weakclip.models.clip_image import CLIPImageTower

__all__ = [
    "PARAM_GROUP_LR_SCALES",
    "POSITION_MODES",
    "ExcelNet",
    "ExcelOutput",
    "ExcelSettings",
    "build_excel_net",
    "rebuild_excel_net",
]

#: Learning-rate factors of ``ExcelNet.param_groups()``'s four groups, as the release's
#: engine/optimizer_engine.py builds them (backbone, backbone norms, classifier, segmentation head): groups
#: 2 and 3 get 10 x lr. Only group 3 holds parameters (the decoder's, then the fusion's), so every trained
#: parameter runs at 10 x lr (1e-3 for the release's lr 1e-4).
PARAM_GROUP_LR_SCALES = (1.0, 1.0, 10.0, 10.0)
#: "crop": positional embeddings resized from the crop's grid (the release's training model);
#: "clip": from CLIP's own grid (its val / test models).
POSITION_MODES = ("crop", "clip")


class ExcelOutput(NamedTuple):
    """``ExcelNet.forward``'s outputs, in the release's order.

    seg: B x classes x h x w logits (classes with background, at the token grid).
    features: B x 256 x h x w fused features (after the fusion's dropout), detached: the release's
        ``fts_diver``, fed back as ``ex_feats``.
    attr_maps: B x N x foreground classes patch-text maps (N = h * w, min-max normalised per class).
    attn: L x B x (1 + N) x (1 + N) CLIP attention weights of every block.
    affinity: B x N x N predicted affinity (batch-dependent, see ``predicted_affinity``).
    """

    seg: Tensor
    features: Tensor
    attr_maps: Tensor
    attn: Tensor
    affinity: Tensor


@dataclass(frozen=True)
class ExcelSettings:
    """What rebuilds an ``ExcelNet`` besides its weights and text bank (stored in checkpoints)."""

    arch: str
    crop: int = 320
    position_mode: str = "crop"
    embed_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    surgery_layers: int = RELEASE_SURGERY_LAYERS
    fusion_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise WeakclipError(
                f"position_mode must be one of {', '.join(POSITION_MODES)}, got {self.position_mode!r}"
            )
        if int(self.crop) < 1:
            raise WeakclipError(f"crop must be positive, got {self.crop}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint") -> ExcelSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown or "arch" not in data:
            why = f"unknown {', '.join(unknown)}" if unknown else "no arch"
            raise WeakclipError(f"{where}: unusable ExCEL settings ({why})")
        return cls(**dict(data))


class ExcelNet(nn.Module):
    """ExCEL's network (module docstring). Build it with ``build_excel_net`` or ``rebuild_excel_net``."""

    def __init__(self, image_tower: CLIPImageTower, text_bank: TextBank, settings: ExcelSettings) -> None:
        super().__init__()
        text_bank.check()
        if text_bank.enriched.shape[1] != image_tower.embed_dim:
            raise WeakclipError(
                f"the ExCEL text bank has features of width {text_bank.enriched.shape[1]}, the CLIP image "
                f"tower's embedding is {image_tower.embed_dim} wide (another CLIP?)"
            )
        self.settings = settings
        self.text_bank = text_bank
        image_tower.requires_grad_(False)
        self.clip_pass = ExcelClipPass(image_tower, settings.surgery_layers)
        self.set_position_mode(settings.position_mode)
        self.fusion = LayerFusion(
            image_tower.num_blocks, image_tower.width, settings.embed_dim, settings.fusion_dropout
        )
        self.decoder = TransformerDecoder(
            settings.embed_dim, settings.decoder_layers, settings.decoder_heads, text_bank.num_classes
        )
        device = image_tower.visual.conv1.weight.device
        self.fusion.to(device)
        self.decoder.to(device)
        self.register_buffer("text_features", text_bank.enriched.clone().to(device), persistent=False)
        self.clip_pass.eval()

    # ----------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.text_bank.num_classes

    @property
    def n_foreground(self) -> int:
        return self.text_bank.n_foreground

    @property
    def class_names(self) -> list[str]:
        return list(self.text_bank.class_names)

    def set_position_mode(self, mode: str, crop: int | None = None) -> None:
        """Where positional embeddings are resized from: "crop" (the crop's grid, as the release's training
        model; ``crop`` defaults to the settings') or "clip" (CLIP's grid, as its val / test models)."""
        if mode not in POSITION_MODES:
            raise WeakclipError(f"position mode must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
        size = int(crop if crop is not None else self.settings.crop)
        grid = base_grid_for_mode("train" if mode == "crop" else "val", size, self.clip_pass.patch_size)
        self.clip_pass.set_base_grid(grid)
        self.position_mode = mode

    def train(self, mode: bool = True) -> ExcelNet:
        super().train(mode)
        self.clip_pass.eval()  # the frozen CLIP always runs in eval mode
        return self

    def param_groups(self) -> list[list[nn.Parameter]]:
        """The release's ``get_param_groups``: four groups (backbone, backbone norms, classifier, segmentation
        head); only the last holds parameters, the decoder's then the fusion's. Learning-rate factors:
        ``PARAM_GROUP_LR_SCALES`` (groups 2 and 3 at 10 x lr)."""
        return [[], [], [], [*self.decoder.parameters(), *self.fusion.parameters()]]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained parameters only (``fusion.*``, ``decoder.*``), detached CPU copies."""
        out = {}
        for prefix, module in (("fusion", self.fusion), ("decoder", self.decoder)):
            for key, value in module.state_dict().items():
                out[f"{prefix}.{key}"] = value.detach().cpu().clone()
        return out

    def load_trainable_state_dict(self, state_dict: Mapping[str, Tensor], *, release: bool = False,
                                  where: str = "checkpoint") -> None:
        """Load ``trainable_state_dict()``'s keys (or, with ``release``, the release's ``ExCEL_model`` keys,
        see ``release_state_dict_to_ours``); every trained parameter must be there, nothing else."""
        if release:
            state_dict = release_state_dict_to_ours(state_dict, where)
        expected = {f"fusion.{k}" for k in self.fusion.state_dict()}
        expected |= {f"decoder.{k}" for k in self.decoder.state_dict()}
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise WeakclipError(
                f"{where} does not hold this ExCEL network's trained parameters ({what}, "
                f"{len(missing)} missing, {len(unexpected)} unexpected)"
            )
        for prefix, module in (("fusion", self.fusion), ("decoder", self.decoder)):
            part = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
            try:
                module.load_state_dict(part)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[-1].strip()
                raise WeakclipError(f"{where}: trained parameters of another shape ({first})") from None

    def payload(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network with ``rebuild_excel_net``."""
        return {
            "settings": asdict(self.settings),
            "text_bank": self.text_bank.to_payload(),
            "decoder": self.trainable_state_dict(),
        }

    # ----------------------------------------------------------------------------------------------

    def _attr_maps(self, image_features: Tensor) -> Tensor:
        return feature_surgery(image_features, self.text_features)[:, 1:, : self.n_foreground]

    def forward(self, images: Tensor) -> ExcelOutput:
        """The release's ``ExCEL_model.forward(img)`` (module docstring)."""
        self.clip_pass.eval()
        clip = self.clip_pass(images)
        attr_maps = self._attr_maps(clip.image_features)
        fused = self.fusion(patch_token_maps(clip.tokens, clip.grid))
        features = fused.clone()
        seg = self.decoder(fused)
        affinity = predicted_affinity(features)
        return ExcelOutput(seg, features.clone().detach(), attr_maps, clip.attn, affinity)

    def segment(self, images: Tensor) -> Tensor:
        """The segmentation logits alone (``forward(images).seg``, the same numbers), as the release's test
        scripts use the network (``model(x)[0]``): the CLIP pass keeps only the tokens the decoder reads; the
        patch-text maps, the attention weights and the affinity prediction are not computed."""
        self.clip_pass.eval()
        clip = self.clip_pass(images, tokens_only=True)
        return self.decoder(self.fusion(patch_token_maps(clip.tokens, clip.grid)))

    def attr_maps_from_features(self, images: Tensor, ex_feats: Tensor) -> Tensor:
        """The second pass (the release's forward with ``ex_feats``, ``cure_attr_map``): patch-text maps,
        B x N x foreground classes, with the decoder's features mixed into CLIP's surgery attention."""
        with torch.no_grad():
            clip = self.clip_pass(images, ex_feats)
            return self._attr_maps(clip.image_features)


# --------------------------------------------------------------------------------------------------


def _frozen_tower(arch: str, clip_weights: str | PathLike | None, device, pretrained_download: bool):
    image_tower, text_tower = build_clip(
        arch, weights=clip_weights, pretrained_download=pretrained_download, frozen=True, device=device
    )
    return image_tower.eval(), text_tower.eval()


def build_excel_net(
    arch: str = "ViT-B/16",
    clip_weights: str | PathLike | None = None,
    class_names: Sequence[str] = (),
    dataset: str | None = None,
    descriptors: str | PathLike | None = None,
    clusters: int | None = None,
    crop: int = 320,
    device: str | torch.device = "cpu",
    *,
    position_mode: str = "crop",
    background: Sequence[str] | None = None,
    top_k: float = RELEASE_TOP_K,
    kmeans_seeding: str = "sklearn-1.0.2",
    pretrained_download: bool = True,
    note: Callable[[str], None] | None = note_to_stderr,
    **settings: Any,
) -> ExcelNet:
    """ExCEL's network for ``class_names`` (background first) on a frozen CLIP (``build_clip``'s ``arch`` and
    weights file; None downloads OpenAI's when ``pretrained_download``), its text bank built from the
    descriptors file when given (``text.build_text_bank``: dataset, clusters, background, top_k,
    kmeans_seeding, note), a freshly initialised fusion + decoder. ``settings``: further ``ExcelSettings``
    fields (embed_dim, decoder_layers, decoder_heads, surgery_layers, fusion_dropout). In eval mode (call
    ``train()`` to train: the fusion's dropout then acts)."""
    image_tower, text_tower = _frozen_tower(arch, clip_weights, device, pretrained_download)
    bank = build_text_bank(
        text_tower, class_names, dataset=dataset, descriptors=descriptors, clusters=clusters,
        background=background, top_k=top_k, kmeans_seeding=kmeans_seeding, note=note,
    )
    del text_tower
    config = ExcelSettings(
        arch=image_tower.arch.name, crop=int(crop), position_mode=position_mode, **settings
    )
    return ExcelNet(image_tower, bank, config).eval()


def rebuild_excel_net(
    payload: Mapping[str, Any],
    clip_weights: str | PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    pretrained_download: bool = True,
    where: str = "checkpoint",
) -> ExcelNet:
    """The network again from ``ExcelNet.payload()`` and a CLIP weights file (no descriptors, no data), in
    eval mode."""
    if not isinstance(payload, Mapping) or not {"settings", "text_bank", "decoder"} <= set(payload):
        raise WeakclipError(f"{where} holds no ExCEL network (settings, text bank and decoder expected)")
    settings = ExcelSettings.from_dict(payload["settings"], where)
    bank = TextBank.from_payload(payload["text_bank"], where)
    image_tower, _ = _frozen_tower(settings.arch, clip_weights, device, pretrained_download)
    net = ExcelNet(image_tower, bank, settings)
    net.load_trainable_state_dict(payload["decoder"], where=where)
    return net.eval()
