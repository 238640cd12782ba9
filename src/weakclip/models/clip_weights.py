"""Reading CLIP weights in three formats into OpenAI/open_clip key names, and checking their shape.

Formats:
  * OpenAI's TorchScript archive (``ViT-B-16.pt`` of the openai/CLIP release), or a plain pickled
    state dict in OpenAI naming;
  * an open_clip state dict (.pt/.bin/.pth through ``torch.load(weights_only=True)``, or .safetensors),
    possibly nested under "state_dict"/"model" and with "module." prefixes;
  * a Hugging Face ``CLIPModel`` folder (config.json + model.safetensors or pytorch_model.bin), or one
    of those weight files with config.json beside it; converted to OpenAI names here.
Every problem is a one-line WeightsError naming the file.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from weakclip.errors import WeightsError
from weakclip.models.clip_arch import CLIP_ARCHS, ClipArch, default_out_blocks
from weakclip.models.clip_download import OFFLINE_ENV, download_openai_weights
from weakclip.models.clip_hf_keys import convert_hf_state_dict, is_hf_naming
from weakclip.safe_load import describe_contents, explain_read_error, safe_torch_load, sniff_file

__all__ = [
    "OFFLINE_ENV",
    "ClipWeights",
    "check_arch",
    "convert_hf_state_dict",
    "download_openai_weights",
    "infer_arch",
    "load_clip_state_dict",
    "load_into_model",
    "read_clip_weights",
    "weights_shape",
]

FORMAT_TORCHSCRIPT = "openai-torchscript"
FORMAT_STATE_DICT = "open_clip"
FORMAT_SAFETENSORS = "open_clip-safetensors"
FORMAT_HF = "huggingface"

# Entries of OpenAI's archive (and of open_clip models) that are not parameters of the towers.
_IGNORED_KEYS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask"})

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Hugging Face CLIPVisionConfig / CLIPTextConfig defaults, used when config.json leaves a field out.
_HF_DEFAULTS = {"vision": {"num_attention_heads": 12}, "text": {"num_attention_heads": 8}}


@dataclass
class ClipWeights:
    """A weights file read into OpenAI key names, plus what its format says beyond the shapes."""

    state_dict: dict[str, Tensor]
    format: str
    path: Path
    vision_heads: int | None = None  # known from a Hugging Face config.json
    text_heads: int | None = None
    quick_gelu: bool | None = None  # known from a Hugging Face config.json (hidden_act)


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unreadable(path: Path | str, reason: object) -> WeightsError:
    return WeightsError(f"cannot read CLIP weights from {path}: {_one_line(reason)}")


# --------------------------------------------------------------------------------------------------
# Reading


def read_clip_weights(path: str | PathLike) -> ClipWeights:
    """Read any supported CLIP weights file (or Hugging Face folder) into OpenAI key names."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"CLIP weights file {p} does not exist")
    try:
        return _read_path(p)
    except WeightsError:
        raise
    except Exception as err:  # corrupt, truncated, unrelated: torch/zip/safetensors/json errors
        if p.is_file() and p.name != "config.json":  # the file's own bytes say what is wrong
            raise WeightsError(f"CLIP weights file {p} {explain_read_error(p, err)}") from None
        raise _unreadable(p, err) from err


def _read_path(p: Path) -> ClipWeights:
    if p.is_dir():
        if not (p / "config.json").is_file():  # an open_clip Hugging Face hub snapshot?
            inner = next((p / n for n in _OPEN_CLIP_HUB_FILES if (p / n).is_file()), None)
            if inner is not None:
                return _read_path(inner)
        return _read_hf(p, None)
    if p.name == "config.json":
        return _read_hf(p.parent, None)
    if p.suffix == ".safetensors":
        raw, fmt = _load_safetensors(p), FORMAT_SAFETENSORS
    else:
        raw, fmt = _load_torch_file(p)
    tensors = _as_tensor_dict(raw, p)
    if is_hf_naming(tensors):
        config = p.parent / "config.json"
        return _hf_weights(tensors, config if config.is_file() else None, p)
    return ClipWeights(_check_openai_naming(tensors, p), fmt, p)


def load_clip_state_dict(path: str | PathLike) -> tuple[dict[str, Tensor], str]:
    """(state dict in OpenAI/open_clip key names, format name) of a CLIP weights file or HF folder.

    Format names: "openai-torchscript", "open_clip", "open_clip-safetensors", "huggingface".
    """
    weights = read_clip_weights(path)
    return weights.state_dict, weights.format


def _load_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(p), device="cpu")


def _is_torchscript(p: Path) -> bool:
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torch_file(p: Path) -> tuple[object, str]:
    sniffed = sniff_file(p)
    if sniffed is not None:
        raise WeightsError(f"CLIP weights file {p} {sniffed}")
    if _is_torchscript(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
        return dict(module.state_dict()), FORMAT_TORCHSCRIPT
    return safe_torch_load(p, what="CLIP weights file"), FORMAT_STATE_DICT


def _as_tensor_dict(obj: object, p: Path) -> dict[str, Tensor]:
    for _ in range(4):  # unwrap {"state_dict": {...}} / {"model": {...}} checkpoints
        if not isinstance(obj, Mapping) or any(isinstance(v, Tensor) for v in obj.values()):
            break
        wrappers = ("state_dict", "model", "module")
        inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise _unreadable(p, f"it holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise _unreadable(p, f"it holds {describe_contents(obj)}, no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _check_openai_naming(tensors: dict[str, Tensor], p: Path) -> dict[str, Tensor]:
    if "visual.conv1.weight" in tensors and "visual.proj" in tensors:
        return {k: v for k, v in tensors.items() if k not in _IGNORED_KEYS}
    if any(k.startswith("visual.layer1.") for k in tensors):
        raise WeightsError(f"weights file {p} holds a ResNet CLIP; weakclip needs a CLIP ViT (e.g. ViT-B/16)")
    sample = ", ".join(repr(k) for k in list(tensors)[:3])
    raise _unreadable(p, f"no CLIP ViT keys in it (found e.g. {sample})")


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel


def _read_hf(folder: Path, weights_file: Path | None) -> ClipWeights:
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError(f"Hugging Face CLIP folder {folder} has no config.json")
    tensors: dict[str, Tensor] = {}
    if weights_file is None:
        weights_file = next((folder / n for n in _HF_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights_file is not None:
        shards = [weights_file]
    else:
        index = next((folder / n for n in _HF_INDEX_FILES if (folder / n).is_file()), None)
        if index is None:
            raise WeightsError(
                f"Hugging Face CLIP folder {folder} has neither model.safetensors nor pytorch_model.bin"
            )
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if shard.suffix == ".safetensors":
            tensors.update(_load_safetensors(shard))
        else:
            tensors.update(_as_tensor_dict(safe_torch_load(shard, what="CLIP weights file"), shard))
    if not is_hf_naming(tensors):
        raise _unreadable(folder, "no Hugging Face CLIPModel keys (vision_model.*, text_model.*) in it")
    return _hf_weights(tensors, config, folder)


def _hf_weights(tensors: dict[str, Tensor], config: Path | None, p: Path) -> ClipWeights:
    vision_heads = text_heads = quick_gelu = None
    if config is not None:
        cfg = json.loads(config.read_text())
        acts = []
        for tower, heads_key in (("vision", "vision_config"), ("text", "text_config")):
            sub = cfg.get(heads_key) or {}
            heads = int(sub.get("num_attention_heads", _HF_DEFAULTS[tower]["num_attention_heads"]))
            if tower == "vision":
                vision_heads = heads
            else:
                text_heads = heads
            acts.append(sub.get("hidden_act", "quick_gelu"))
            eps = float(sub.get("layer_norm_eps", 1e-5))
            if not math.isclose(eps, 1e-5, rel_tol=1e-3):
                raise WeightsError(f"weights file {p}: {tower} layer_norm_eps {eps} is not CLIP's 1e-5")
        if len(set(acts)) != 1 or acts[0] not in ("quick_gelu", "gelu"):
            raise WeightsError(
                f"weights file {p}: hidden_act {'/'.join(acts)} is not supported "
                "(quick_gelu or gelu in both towers)"
            )
        quick_gelu = acts[0] == "quick_gelu"
    state_dict = convert_hf_state_dict(tensors, path=p)
    return ClipWeights(state_dict, FORMAT_HF, p, vision_heads, text_heads, quick_gelu)


# --------------------------------------------------------------------------------------------------
# Shapes


def _count_blocks(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise WeightsError(f"blocks under {prefix} are not numbered 0..n-1")
    return len(indices)


def weights_shape(state_dict: Mapping[str, Tensor], path: Path | str = "<state dict>") -> dict[str, int]:
    """The architecture numbers a state dict in OpenAI naming implies (WeightsError when it cannot)."""
    try:
        conv = state_dict["visual.conv1.weight"]
        pos = state_dict["visual.positional_embedding"]
        shape = {
            "width": conv.shape[0],
            "layers": _count_blocks(state_dict, "visual.transformer.resblocks."),
            "patch_size": conv.shape[-1],
            "embed_dim": state_dict["visual.proj"].shape[1],
            "text_width": state_dict["ln_final.weight"].shape[0],
            "text_layers": _count_blocks(state_dict, "transformer.resblocks."),
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "text_embed_dim": state_dict["text_projection"].shape[1],
            "mlp_width": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "text_mlp_width": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        }
    except KeyError as err:
        raise _unreadable(path, f"missing key {err.args[0]!r}") from err
    except (WeightsError, IndexError) as err:
        raise _unreadable(path, err) from err
    grid = math.isqrt(pos.shape[0] - 1)
    if conv.shape[-1] != conv.shape[-2] or grid * grid + 1 != pos.shape[0]:
        raise _unreadable(path, "non-square patches or positional grid")
    shape["grid"] = grid
    shape["image_size"] = grid * shape["patch_size"]
    if shape["text_embed_dim"] != shape["embed_dim"]:
        raise _unreadable(path, f"image embed {shape['embed_dim']} != text embed {shape['text_embed_dim']}")
    if shape["mlp_width"] != 4 * shape["width"] or shape["text_mlp_width"] != 4 * shape["text_width"]:
        raise _unreadable(path, "MLP width is not 4x the transformer width")
    return shape


_VISION_KEYS = ("width", "layers", "patch_size", "embed_dim")
_OTHER_KEYS = ("grid", "text_width", "text_layers", "context_length", "vocab_size")
_LABELS = {
    "width": "width {}",
    "layers": "{} blocks",
    "patch_size": "patch {}",
    "embed_dim": "embed {}",
    "grid": "grid {}",
    "heads": "{} heads",
    "text_width": "text width {}",
    "text_layers": "{} text blocks",
    "text_heads": "{} text heads",
    "context_length": "context {}",
    "vocab_size": "vocab {}",
}


def _arch_numbers(arch: ClipArch) -> dict[str, int]:
    return {
        "width": arch.width,
        "layers": arch.layers,
        "patch_size": arch.patch_size,
        "embed_dim": arch.embed_dim,
        "grid": arch.grid_size,
        "heads": arch.heads,
        "text_width": arch.text_width,
        "text_layers": arch.text_layers,
        "text_heads": arch.text_heads,
        "context_length": arch.context_length,
        "vocab_size": arch.vocab_size,
    }


def _registered_like(shape: Mapping[str, int]) -> ClipArch | None:
    def same(arch: ClipArch, keys: tuple[str, ...]) -> bool:
        return all(_arch_numbers(arch)[k] == shape[k] for k in keys)

    candidates = [a for a in CLIP_ARCHS.values() if same(a, _VISION_KEYS)]
    exact = [a for a in candidates if same(a, _OTHER_KEYS)]
    return (exact or candidates or [None])[0]


def infer_arch(
    state_dict: Mapping[str, Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    quick_gelu: bool | None = None,
    path: Path | str = "<state dict>",
) -> ClipArch:
    """The architecture of a state dict in OpenAI naming.

    A registered arch with the same shapes is returned as such (its name, heads, out_blocks);
    otherwise a custom arch with heads = width // 64 (CLIP's convention) unless the heads are known
    (Hugging Face config). ``quick_gelu`` None keeps True, OpenAI's activation.
    """
    shape = weights_shape(state_dict, path)
    known = _registered_like(shape)
    if (
        known is not None
        and all(_arch_numbers(known)[k] == shape[k] for k in _VISION_KEYS + _OTHER_KEYS)
        and vision_heads in (None, known.heads)
        and text_heads in (None, known.text_heads)
    ):
        if quick_gelu is not None and quick_gelu != known.quick_gelu:
            return replace(known, quick_gelu=quick_gelu)
        return known
    heads = vision_heads or max(1, shape["width"] // 64)
    t_heads = text_heads or max(1, shape["text_width"] // 64)
    return ClipArch(
        name=f"ViT-{shape['width']}x{shape['layers']}/{shape['patch_size']}",
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        width=shape["width"],
        layers=shape["layers"],
        heads=heads,
        embed_dim=shape["embed_dim"],
        text_width=shape["text_width"],
        text_layers=shape["text_layers"],
        text_heads=t_heads,
        context_length=shape["context_length"],
        vocab_size=shape["vocab_size"],
        quick_gelu=True if quick_gelu is None else quick_gelu,
        out_blocks=default_out_blocks(shape["layers"]),
    )


def check_arch(
    state_dict: Mapping[str, Tensor],
    arch: ClipArch,
    path: Path | str,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> None:
    """WeightsError (one line, naming both architectures) unless the weights have ``arch``'s shapes."""
    shape = dict(weights_shape(state_dict, path))
    if vision_heads is not None:
        shape["heads"] = vision_heads
    if text_heads is not None:
        shape["text_heads"] = text_heads
    expected = _arch_numbers(arch)
    differing = [k for k in _OTHER_KEYS + ("heads", "text_heads") if k in shape and shape[k] != expected[k]]
    if not differing and all(shape[k] == expected[k] for k in _VISION_KEYS):
        return
    fields = list(_VISION_KEYS) + differing

    def describe(numbers: Mapping[str, int]) -> str:
        return ", ".join(_LABELS[k].format(numbers[k]) for k in fields)

    like = _registered_like(shape)
    found = f"CLIP {like.name}-like weights" if like is not None else "CLIP ViT weights of another size"
    raise WeightsError(
        f"weights file {path} holds {found} ({describe(shape)}); expected {arch.name} ({describe(expected)})"
    )


def load_into_model(
    model: nn.Module, state_dict: Mapping[str, Tensor], path: Path | str, arch: ClipArch
) -> None:
    """Strictly load an OpenAI-named state dict into an open_clip ``CLIP`` (dtype converted on copy)."""
    expected = set(model.state_dict())
    given = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected)
    if missing:
        raise WeightsError(f"weights file {path} lacks {len(missing)} {arch.name} keys (e.g. {missing[0]!r})")
    if unexpected:
        raise WeightsError(
            f"weights file {path} has {len(unexpected)} keys a CLIP {arch.name} does not use "
            f"(e.g. {unexpected[0]!r})"
        )
    try:
        model.load_state_dict(given, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"weights file {path} does not fit CLIP {arch.name}: {_one_line(err)}") from err


def describe_weights(path: str | PathLike) -> dict[str, object]:
    """What a CLIP weights file holds: format, architecture (as inferred from the shapes) and size.

    Raises :class:`WeightsError` for a missing, corrupt or non-CLIP file, like every loader here.
    """
    weights = read_clip_weights(path)
    arch = infer_arch(weights.state_dict, vision_heads=weights.vision_heads, text_heads=weights.text_heads,
                      quick_gelu=weights.quick_gelu, path=weights.path)
    n_params = sum(t.numel() for t in weights.state_dict.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.state_dict.values()})
    return {
        "file": str(weights.path),
        "format": weights.format,
        "architecture": arch.describe(),
        "image_size": arch.image_size,
        "text": f"width {arch.text_width}, {arch.text_layers} blocks, context {arch.context_length}",
        "activation": "QuickGELU" if arch.quick_gelu else "GELU",
        "parameters": f"{n_params / 1e6:.1f} M",
        "dtypes": ", ".join(dtypes),
    }
