"""The authors' released checkpoints (mmsegmentation 0.19 ``.pth``): key mapping both ways, and loading.

A release file is ``{"meta": {...}, "state_dict": OrderedDict, ["optimizer": ...]}``. Its ``state_dict``
holds the WHOLE model, both CLIP towers and every BatchNorm statistic included, so no CLIP weights file
is needed. Module tree of the release's ``WeakCLIP`` segmentor (ViT-B/16, K classes) and where each part
lives here:

=============================================  ==========================================================
release key                                    ours
=============================================  ==========================================================
``backbone.{conv1,class_embedding,             ``image_tower.visual.*`` (same names; the positional
positional_embedding,ln_pre,transformer,        embedding is the 32 x 32 grid + CLS, 1025 x 768)
ln_post,proj}``
``backbone.fpn1.{0,1,2,4}`` / ``fpn2.{0,1}``     ``adapter.levels.0.{0,1,2,4}`` / ``adapter.levels.1.{0,1}``
``backbone.fpn3`` / ``backbone.fpn4.0``          ``adapter.levels.2.0`` / ``adapter.levels.3.0``
``text_encoder.*``                             ``text_tower.*`` (positional embedding: 13 rows there, 77
                                               here: rows 13+ are not in the file and are set to 0; the
                                               prompts use 13; ``logit_scale`` is ours only)
``contexts`` (1 x 8 x 512)                     ``prompts.context`` (8 x 512)
``gamma`` / ``beta``                           ``matching.gamma`` / ``matching.beta``
``context_decoder.memory_proj`` / ``text_proj``  ``matching.visual_proj`` / ``matching.text_proj``
``context_decoder.decoder.i`` / ``anti_decoder.i``  ``matching.text_decoder.layers.i`` / ``visual_decoder``
``context_decoder.out_proj`` / ``anti_out_proj``  ``matching.text_out`` / ``matching.visual_out``
``neck.lateral_convs.i.conv`` / ``fpn_convs.i.conv``  ``neck.lateral_convs.i`` / ``neck.output_convs.i``
``decode_head.scale_heads.i.j.{conv,bn}``      ``head.scale_heads.i.k`` / ``.k+1`` (stage s: j = s or 2s,
                                               k = 3s or 4s: the release's Sequential holds ConvModule +
                                               Upsample per stage, ours conv, BN, ReLU, Upsample)
``decode_head.conv_seg``                       ``head.classifier``
=============================================  ==========================================================

The identity head, the losses and the release's ``texts`` tensor hold no state. The config of the model
is derived from the tensors: class count (``decode_head.conv_seg``), CLIP size, positional grid (-> the
``pos_embed_size``), context length, decoder layers and widths; the classes are ``meta["CLASSES"]`` when
it has the right length, else the release's VOC (21) or COCO (91) names, raw as the release prompts them.

Safe loading: ``torch.load(weights_only=True)``. What mmseg 0.19 / mmcv 1.3.17 write in ``meta`` (mmcv:
``mmcv_version``, ``time``, ``epoch``, ``iter``; the release's ``train.py``: ``env_info``, ``seed``,
``exp_name``; its checkpoint hook: ``mmseg_version``, ``config`` (text), ``CLASSES`` (tuple of str),
``PALETTE`` (list of lists of int), ``hook_msgs`` (str)) and the AdamW state are plain str / int / float /
None / tuple / list / dict, and the state dict an ``OrderedDict`` with ``_metadata``: all within torch's
weights-only set, so the allow-list adds nothing (``RELEASE_ALLOWED_GLOBALS`` is empty); a file that needs
anything more is refused.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weakclip.data.classes import COCO91_CLASSES, VOC_CLASSES
from weakclip.errors import WeakclipError
from weakclip.safe_load import foreign_file, safe_torch_load

__all__ = [
    "RELEASE_ALLOWED_GLOBALS",
    "RELEASE_COCO_CLASSES",
    "RELEASE_VOC_CLASSES",
    "build_release_model",
    "from_release_state_dict",
    "is_release_checkpoint",
    "load_release_checkpoint",
    "release_model_config",
    "save_release_checkpoint",
    "to_release_state_dict",
]

RELEASE_ALLOWED_GLOBALS: tuple[Any, ...] = ()

# mmseg's PascalVOCDataset.CLASSES (raw, as the release prompts them) and the release's COCO label space
# (background + COCO's 90 category ids, the 10 ids without annotations included; its weakclip/coco.py).
RELEASE_VOC_CLASSES: tuple[str, ...] = VOC_CLASSES
RELEASE_COCO_CLASSES: tuple[str, ...] = COCO91_CLASSES

# (release prefix, our prefix), most specific first; both directions use this table.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.fpn1.", "adapter.levels.0."),
    ("backbone.fpn2.", "adapter.levels.1."),
    ("backbone.fpn3.", "adapter.levels.2.0."),
    ("backbone.fpn4.", "adapter.levels.3."),
    ("backbone.", "image_tower.visual."),
    ("text_encoder.", "text_tower."),
    ("context_decoder.memory_proj.", "matching.visual_proj."),
    ("context_decoder.text_proj.", "matching.text_proj."),
    ("context_decoder.decoder.", "matching.text_decoder.layers."),
    ("context_decoder.anti_decoder.", "matching.visual_decoder.layers."),
    ("context_decoder.out_proj.", "matching.text_out."),
    ("context_decoder.anti_out_proj.", "matching.visual_out."),
    ("decode_head.conv_seg.", "head.classifier."),
)
_SINGLE = {"gamma": "matching.gamma", "beta": "matching.beta"}
_NECK = re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$")
_OUR_NECK = re.compile(r"^neck\.(lateral_convs|output_convs)\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(conv|bn)\.(.+)$")
_OUR_HEAD = re.compile(r"^head\.scale_heads\.(\d+)\.(\d+)\.(.+)$")
_TEXT_POS = "text_tower.positional_embedding"
_LOGIT_SCALE = "text_tower.logit_scale"


def _release_key_to_ours(key: str) -> str | None:
    if key in _SINGLE:
        return _SINGLE[key]
    m = _NECK.match(key)
    if m:
        kind = "lateral_convs" if m.group(1) == "lateral_convs" else "output_convs"
        return f"neck.{kind}.{m.group(2)}.{m.group(3)}"
    m = _HEAD.match(key)
    if m:
        level, index, part, leaf = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        stage = index // 2 if level > 0 else index  # release: ConvModule (+ Upsample) per stage
        ours = stage * (4 if level > 0 else 3) + (1 if part == "bn" else 0)  # conv, BN, ReLU (+ Upsample)
        return f"head.scale_heads.{level}.{ours}.{leaf}"
    for release, own in _PREFIXES:
        if key.startswith(release):
            return own + key[len(release):]
    return None


def _our_key_to_release(key: str) -> str | None:
    for release, own in _SINGLE.items():
        if key == own:
            return release
    m = _OUR_NECK.match(key)
    if m:
        kind = "lateral_convs" if m.group(1) == "lateral_convs" else "fpn_convs"
        return f"neck.{kind}.{m.group(2)}.conv.{m.group(3)}"
    m = _OUR_HEAD.match(key)
    if m:
        level, index, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
        per_stage = 4 if level > 0 else 3
        stage, offset = divmod(index, per_stage)
        if offset > 1:
            return None
        release_index = stage * 2 if level > 0 else stage
        return f"decode_head.scale_heads.{level}.{release_index}.{'bn' if offset else 'conv'}.{leaf}"
    for release, own in _PREFIXES:
        if key.startswith(own):
            return release + key[len(own):]
    return None


def from_release_state_dict(
    release: Mapping[str, Tensor], text_context_length: int = 77, source: str = "release checkpoint"
) -> dict[str, Tensor]:
    """Release keys -> our state dict (all keys of ``WeakCLIP.state_dict()``).

    ``contexts`` loses its leading 1; the text positional embedding (the release keeps the first 13 rows)
    is zero-padded to ``text_context_length`` rows; ``logit_scale`` (not in the release) is CLIP's initial
    ln(1/0.07). Unknown keys raise WeakclipError.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in release.items():
        if key == "contexts":
            if value.ndim != 3 or value.shape[0] != 1:
                raise WeakclipError(f"{source}: contexts must be 1 x n_ctx x width, got {tuple(value.shape)}")
            out["prompts.context"] = value[0]
            continue
        ours = _release_key_to_ours(key)
        if ours is None:
            unknown.append(key)
            continue
        if ours == _TEXT_POS and value.shape[0] < text_context_length:
            padded = value.new_zeros(text_context_length, value.shape[1])
            padded[: value.shape[0]] = value
            value = padded
        out[ours] = value
    if unknown:
        raise WeakclipError(
            f"{source}: {len(unknown)} keys the release's model does not have (e.g. {unknown[0]!r})"
        )
    if _TEXT_POS in out:
        out.setdefault(_LOGIT_SCALE, torch.tensor(math.log(1 / 0.07)))
    return out


def to_release_state_dict(ours: Mapping[str, Tensor], text_length: int = 13) -> OrderedDict[str, Tensor]:
    """Our state dict -> release keys (what the release's segmentor's ``state_dict()`` holds).

    ``text_length``: rows of the text positional embedding the release keeps (n_ctx + name length, 13).
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in ours.items():
        if key == _LOGIT_SCALE:
            continue
        if key == "prompts.context":
            out["contexts"] = value.unsqueeze(0)
            continue
        release = _our_key_to_release(key)
        if release is None:
            raise WeakclipError(f"our key {key!r} has no place in the release's model")
        if key == _TEXT_POS:
            value = value[:text_length]
        out[release] = value
    return out


# --------------------------------------------------------------------------------------------------
# Files


def is_release_checkpoint(obj: Any) -> bool:
    """Whether a loaded object looks like an mmseg checkpoint of the release's WeakCLIP."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    keys = obj["state_dict"].keys()
    return "decode_head.conv_seg.weight" in keys and any(str(k).startswith("backbone.") for k in keys)


def save_release_checkpoint(path: str | Path, model, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as the release would (``{"meta", "state_dict"}``, release keys); for tests and
    for handing a model to the release's code. ``meta`` defaults to CLASSES = the model's class names."""
    from weakclip.models.weakclip import WeakCLIP

    if not isinstance(model, WeakCLIP):
        raise WeakclipError("save_release_checkpoint needs a WeakCLIP model")
    path = Path(path)
    length = model.prompts.total_length
    state = to_release_state_dict(model.state_dict(), text_length=length)
    info = {"CLASSES": tuple(model.class_names), "mmcv_version": "1.3.17", "mmseg_version": "0.19.0"}
    info.update(meta or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"meta": info, "state_dict": state}, tmp)
    tmp.replace(path)
    return path


def _count(keys: Sequence[str], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return len(found)


def release_model_config(state: Mapping[str, Tensor], source: str = "release checkpoint"):
    """The ``ModelConfig`` a release state dict implies (release behaviour in every switch)."""
    from weakclip.models.clip_arch import CLIP_ARCHS
    from weakclip.models.weakclip import ModelConfig

    keys = list(state)
    try:
        conv1 = state["backbone.conv1.weight"]
        pos = state["backbone.positional_embedding"]
        width, patch = conv1.shape[0], conv1.shape[-1]
        layers = _count(keys, r"^backbone\.transformer\.resblocks\.(\d+)\.")
        embed_dim = state["backbone.proj"].shape[1]
        text_width = state["text_encoder.ln_final.weight"].shape[0]
        text_layers = _count(keys, r"^text_encoder\.transformer\.resblocks\.(\d+)\.")
        vocab = state["text_encoder.token_embedding.weight"].shape[0]
        text_rows = state["text_encoder.positional_embedding"].shape[0]
        n_ctx = state["contexts"].shape[1]
        match_width = state["context_decoder.memory_proj.1.weight"].shape[0]
        match_layers = _count(keys, r"^context_decoder\.decoder\.(\d+)\.")
        qkv_bias = "context_decoder.decoder.0.self_attn.q_proj.bias" in state
        neck_channels = state["neck.lateral_convs.0.conv.weight"].shape[0]
        head_channels = state["decode_head.conv_seg.weight"].shape[1]
    except KeyError as err:
        raise WeakclipError(f"{source}: missing key {err.args[0]!r}") from None
    if "context_decoder.anti_decoder.0.norm1.weight" not in state or "beta" not in state:
        raise WeakclipError(f"{source}: no visual decoder (anti_decoder, beta): only the if_decouple=True "
                            "model of the release's configs is supported")
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid + 1 != pos.shape[0]:
        raise WeakclipError(f"{source}: the positional embedding ({pos.shape[0]} rows) is not a square grid")
    arch = next(
        (a for a in CLIP_ARCHS.values()
         if (a.width, a.patch_size, a.layers, a.embed_dim, a.text_width, a.text_layers, a.vocab_size)
         == (width, patch, layers, embed_dim, text_width, text_layers, vocab)),
        None,
    )
    if arch is None:
        raise WeakclipError(f"{source}: a CLIP of width {width}, patch {patch}, {layers} blocks is not "
                            f"one of {', '.join(CLIP_ARCHS)}")
    default = ModelConfig()
    out_blocks = default.out_blocks if arch.name == default.clip_arch else arch.out_blocks
    return ModelConfig(
        clip_arch=arch.name,
        out_blocks=out_blocks,
        n_ctx=int(n_ctx),
        name_length=int(text_rows - n_ctx),
        match_width=int(match_width),
        match_layers=int(match_layers),
        match_mode="release",
        match_qkv_bias=qkv_bias,
        neck_channels=int(neck_channels),
        head_channels=int(head_channels),
        double_cls=True,
        pos_embed_size=int(grid * patch),
        drop_path_mode="token",
        init_scheme="release",
        partial_patches="drop",
    )


def release_classes(meta: Mapping[str, Any] | None, num_classes: int, source: str) -> list[str]:
    """The class names of a release checkpoint: its ``meta["CLASSES"]``, else the release's VOC/COCO set."""
    names = (meta or {}).get("CLASSES")
    usable = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
    if usable and len(names) == num_classes:
        return list(names)
    if num_classes == len(RELEASE_VOC_CLASSES):
        return list(RELEASE_VOC_CLASSES)
    if num_classes == len(RELEASE_COCO_CLASSES):
        return list(RELEASE_COCO_CLASSES)
    raise WeakclipError(f"{source}: {num_classes} classes and no matching meta CLASSES: neither VOC (21) nor "
                        "the release's COCO (91)")


def build_release_model(
    state: Mapping[str, Tensor], classes: Sequence[str], source: str = "release checkpoint"
):
    """Our model with the release's configuration and the release state dict loaded (eval mode, CPU).

    The towers are built random, then overwritten: no CLIP weights file is read. Class names are used raw
    (no readable renaming), as the release prompts them.
    """
    from weakclip.models.clip import build_clip
    from weakclip.models.weakclip import WeakCLIP, configure_image_tower

    cfg = release_model_config(state, source)
    image_tower, text_tower = build_clip(cfg.clip_arch, pretrained_download=False,
                                         drop_path_rate=cfg.drop_path_rate)
    configure_image_tower(image_tower, cfg)
    model = WeakCLIP(cfg, image_tower, text_tower, list(classes))
    ours = from_release_state_dict(state, text_tower.context_length, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:5])
        raise WeakclipError(f"{source} does not fit the release's model (missing or unexpected: {shown})")
    bad = [k for k, v in ours.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise WeakclipError(
            f"{source}: {k} has shape {tuple(ours[k].shape)}, the model {tuple(expected[k].shape)}"
        )
    model.load_state_dict(ours, strict=True)
    return model.eval()


def load_release_checkpoint(path: str | Path, obj: Mapping[str, Any] | None = None,
                            classes: Sequence[str] | None = None):
    """Read a release ``.pth`` (safely) -> ``(model, model_config, classes, meta)``. ``classes``: names that
    replace the checkpoint's (its ``meta["CLASSES"]`` or the release's VOC/COCO set), as many as it
    predicts."""
    path = Path(path)
    if obj is None:
        obj = safe_torch_load(path, allow=RELEASE_ALLOWED_GLOBALS, what="release checkpoint")
    if not is_release_checkpoint(obj):
        raise foreign_file(path, obj, "a checkpoint of the release's WeakCLIP (a state_dict with backbone.* "
                           "and decode_head.conv_seg)")
    state = {str(k): v for k, v in obj["state_dict"].items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    source = f"release checkpoint {path}"
    num_classes = state["decode_head.conv_seg.weight"].shape[0]
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    if classes is not None:
        if len(classes) != num_classes:
            raise WeakclipError(f"the class list given (--classes) has {len(classes)} names, but {source} "
                                f"predicts {num_classes} classes: give the list it was trained with")
        classes = list(classes)
    else:
        classes = release_classes(meta, num_classes, source)
    model = build_release_model(state, classes, source)
    return model, model.cfg, classes, dict(meta)
