"""Typed training configuration: presets, YAML round-trip and ``key=value`` overrides.

A :class:`Config` has five sections and the class list::

    model   ModelConfig (weakclip.models.weakclip): CLIP arch, adapter, prompts, matching, heads
    data    DataConfig: dataset kind/root/split, seed folder, training pipeline
    train   TrainConfig: iterations, GLOBAL batch, AdamW, schedule, AMP, checkpoints, logging
    loss    LossConfig: loss resolution, identity-loss weight and averaging, boundary-loss CRF
    pseudo  PseudoMaskConfig: the pseudo-mask stage (test-time augmentation, label restriction, CRF)
    classes readable class names fed to the text tower as prompts (None: the dataset's names)

``load_preset("voc" | "coco" | path.yaml)`` reads the release's settings shipped in
``weakclip/configs/<name>.yaml`` (or any YAML file; keys it leaves out keep the defaults below).
``apply_overrides(cfg, ["train.iters=100", "model.match_mode=release"])`` converts each value to the
field's declared type and raises a one-line :class:`WeakclipError` on an unknown key or a bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from weakclip.errors import WeakclipError
from weakclip.losses import BOUNDARY_CRF_MODES, IDENTITY_MEANS
from weakclip.models.weakclip import ModelConfig

__all__ = [
    "PRESETS",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "PseudoMaskConfig",
    "TrainConfig",
    "apply_overrides",
    "load_preset",
]

PRESETS: tuple[str, ...] = ("voc", "coco", "voc-plus", "coco-plus")

DATASET_KINDS = ("voc", "coco", "coco91", "folder")
NORMALIZE_CHOICES = ("clip", "imagenet")
AMP_CHOICES = ("bf16", "fp16", "none")


@dataclass
class DataConfig:
    """Training data and the release's training pipeline (see ``weakclip.data.transforms``).

    ``normalize="imagenet"`` (the default) is what the release used; ``"clip"`` uses CLIP's own mean/std,
    natural for a CLIP tower (a ``-plus`` switch). ``split=None`` takes the dataset's default split
    (VOC ``train_aug``, COCO ``train2014``, folder: every labelled image); ``"a+b"`` concatenates splits,
    repeated images kept (the release trains VOC on ``train+train_aug``: 1,464 + 10,582 = 12,046 samples).
    """

    kind: Literal["voc", "coco", "coco91", "folder"] = "voc"
    root: str | None = None
    split: str | None = None
    seeds: str | None = None
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    normalize: Literal["clip", "imagenet"] = "imagenet"
    num_workers: int = 2


@dataclass
class TrainConfig:
    """Optimisation, schedule and bookkeeping. ``batch_size`` is GLOBAL (split over the processes).

    Schedule (mmcv ``CosineAnnealing`` + linear warm-up, as the release): the cosine runs from
    ``lr`` to ``min_lr`` over ``iters``; during the first ``warmup_iters`` it is scaled by a factor
    rising linearly from ``warmup_ratio`` to 1. ``amp`` acts on CUDA only (CPU runs in float32); the release
    trains in float32 (``"none"``).

    ``tower_lr_mult`` / ``adapter_lr_mult``: multipliers of the base rate for the CLIP towers (when
    ``model.freeze_towers`` is off) and the pyramid adapter. The release has 0 for both, and with mmcv's
    rule (``min_lr`` absolute) their rate rises from 0 to ``min_lr`` over training.

    ``eval_every`` > 0: every so many iterations the model is evaluated (single scale, sliding window) on
    ``eval_split`` (``None``: the training split), which needs ground truth; ``eval.csv`` logs the mIoU and
    the best one is kept as ``checkpoints/best.pth`` (the release evaluates every 500 iterations and
    ships a chosen checkpoint). This uses ground-truth masks, which true WSSS does not have.
    """

    iters: int = 20000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 3e-5
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    min_lr: float = 1e-6
    grad_clip: float | None = None
    amp: Literal["bf16", "fp16", "none"] = "none"
    tower_lr_mult: float = 0.0
    adapter_lr_mult: float = 0.0
    eval_every: int = 0
    eval_split: str | None = None
    eval_max_images: int | None = None
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 10
    keep_checkpoints: int = 3
    deterministic: bool = False


@dataclass
class LossConfig:
    """Seeding + boundary loss at ``loss_size`` x ``loss_size`` plus ``identity_weight`` x identity CE.

    ``boundary_crf``: ``"release"`` (scipy zoom + uint8 image, pydensecrf per image on the CPU, input floor
    1e-4) or ``"fast"`` (float image, our CRF on the device); ``identity_mean``: ``"all"`` (the release:
    mean over all pixels, unsure ones included) or ``"valid"``. See :class:`weakclip.losses.WeakCLIPLoss`.
    """

    loss_size: int = 64
    identity_weight: float = 0.4
    boundary_crf: Literal["release", "fast"] = "release"
    identity_mean: Literal["all", "valid"] = "all"


@dataclass
class PseudoMaskConfig:
    """The pseudo-mask stage (``weakclip.inference.pseudo_masks``); the defaults are the release's.

    Test-time augmentation: ``scales`` of ``base_scale`` (aspect kept), ``flip``, sliding window ``crop`` /
    ``stride``; ``average``: window logits averaged and one softmax (``"logits"``, the release) or a softmax
    per window (``"probs"``); ``size_divisor``: windows padded to a multiple of it (1: any size, the
    release). ``restrict_to_labels``: keep only the image's labels (+ background); off in the release.
    ``crf``: ``auto`` (COCO parameters for COCO, else VOC), ``voc``, ``coco`` or ``none``; ``crf_backend``:
    ``pydensecrf`` (the release: pydensecrf2 per image, in ``crf_workers`` CPU processes), ``auto``
    (:func:`~weakclip.crf.choose_backend`: our lattice, batched, where the model runs when that is a GPU;
    pydensecrf2 in the workers on a CPU) or ``lattice`` (ours wherever the model runs). Speed settings (the
    release: one window at a time, one image at a time, float32): ``window_batch`` windows per forward pass,
    from any scale and flip (0: as many as the free device memory allows), ``image_batch`` images whose
    windows share those passes, ``amp`` (``bf16`` on CUDA).
    """

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True
    crop: int = 512
    stride: int = 341
    base_scale: tuple[int, int] = (2048, 512)
    average: Literal["logits", "probs"] = "logits"
    size_divisor: int = 1
    restrict_to_labels: bool = False
    crf: Literal["auto", "voc", "coco", "none"] = "auto"
    crf_backend: Literal["pydensecrf", "auto", "lattice"] = "pydensecrf"
    crf_workers: int = 2
    window_batch: int = 1
    image_batch: int = 1
    amp: Literal["bf16", "none"] = "none"
    # each scale's image: "opencv" (cv2.resize INTER_LINEAR of the uint8 image on the CPU, the release's
    # mmseg Resize) or "torch" (bilinear on the model's device, rounded: no host round trip on a GPU)
    resize: Literal["opencv", "torch"] = "opencv"

    def crf_name(self, kind: str) -> str:
        """The CRF parameter set for a dataset kind: ``voc``, ``coco`` or ``none``."""
        return self.crf if self.crf != "auto" else ("coco" if str(kind).startswith("coco") else "voc")

    def crf_params(self, kind: str):
        """The :class:`~weakclip.crf.DenseCRFParams` for a dataset kind, or None (no CRF)."""
        from weakclip.crf import COCO_CRF, VOC_CRF

        return {"voc": VOC_CRF, "coco": COCO_CRF, "none": None}[self.crf_name(kind)]

    def autocast_dtype(self, device):
        """``torch.bfloat16`` with ``amp: bf16`` on CUDA, else None (float32)."""
        import torch

        return torch.bfloat16 if self.amp == "bf16" and torch.device(device).type == "cuda" else None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    classes: list[str] | None = None

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": _section_dict(self.model),
            "data": _section_dict(self.data),
            "train": _section_dict(self.train),
            "loss": _section_dict(self.loss),
            "pseudo": _section_dict(self.pseudo),
            "classes": None if self.classes is None else list(self.classes),
        }

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """Build a config from nested dicts; keys left out keep their defaults."""
        cfg = cls()
        raw = load_sections(cfg, _SECTIONS, raw, source, extra=("classes",), keys=all_keys())
        if raw.get("classes") is not None:
            cfg.classes = _coerce(raw["classes"], list[str], "classes")
        validate(cfg, source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        return cls.from_dict(read_yaml(path), source=str(path))


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "loss": LossConfig,
    "pseudo": PseudoMaskConfig,
}


# ====================================================================== presets
def load_preset(name: str | Path) -> Config:
    """``"voc"`` / ``"coco"`` (the release's settings, shipped with the package) or a YAML file."""
    key = str(name).strip()
    if key.lower() in PRESETS:
        return Config.from_dict(packaged_yaml(f"{key.lower()}.yaml"), source=f"preset {key.lower()}")
    path = Path(key)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return Config.from_yaml(path)
    raise WeakclipError(f"unknown preset {key!r}: expected {', '.join(PRESETS)} or a .yaml file")


# ====================================================================== overrides
def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied (typed, validated).

    Values are converted to the field's declared type: ``int``, ``float`` (``1e-4``), ``bool``
    (true/false/yes/no/1/0/on/off), ``str``, ``none``/``null`` for optional fields, tuples and lists
    as ``4,6,8,12`` or ``[4, 6, 8, 12]``. ``classes=a,b,c`` sets the class list.
    """
    cfg = Config.from_dict(cfg.to_dict())  # a deep copy through the typed path
    for item in overrides:
        key, value = split_override(item)
        if key == "classes":
            cfg.classes = _coerce(value, list[str] | None, key)
        else:
            set_section_value(cfg, _SECTIONS, key, value, keys=all_keys())
    validate(cfg, "override")
    return cfg


def all_keys() -> list[str]:
    """Every settable key, ``section.field`` (and ``classes``)."""
    keys = [f"{s}.{f}" for s, c in _SECTIONS.items() for f in _hints(c)]
    return keys + ["classes"]


def unknown_key_message(key: str, source: str, keys: list[str], example: str = "train.iters") -> str:
    """``source: unknown config key 'x'; did you mean ...?`` with the closest of ``keys``."""
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; keys look like {example}"
    return f"{source}: unknown config key {key!r}{hint}"


# ====================================================================== YAML (shared by the configs)
def dump_yaml(data: dict[str, Any], path: str | Path | None = None) -> str:
    """``data`` as YAML text (order kept, short lists inline); also written atomically to ``path``."""
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    if path is not None:
        from weakclip.data.io import write_text_atomic

        write_text_atomic(path, text)
    return text


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing or unreadable file is a one-line WeakclipError."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeakclipError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WeakclipError(f"cannot read config {path}: {' '.join(str(exc).split())}") from exc


def packaged_yaml(name: str) -> Any:
    """A preset shipped in ``weakclip/configs/``."""
    from importlib import resources

    return yaml.safe_load(resources.files("weakclip").joinpath("configs", name).read_text("utf-8"))


# ====================================================================== sections (shared by the configs)
def load_sections(cfg: Any, sections: dict[str, type], raw: Any, source: str, *, extra: tuple[str, ...] = (),
                  keys: list[str] | None = None) -> dict[str, Any]:
    """Set each dataclass section of ``cfg`` from the nested dict ``raw`` (typed; fields left out keep their
    defaults); top-level names in ``extra`` are allowed and left to the caller. Returns ``raw`` as a dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WeakclipError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(sections) - set(extra))
    if unknown:
        raise WeakclipError(f"{source}: unknown section(s) {', '.join(unknown)}; "
                            f"known: {', '.join([*sections, *extra])}")
    keys = keys if keys is not None else [f"{n}.{f}" for n, c in sections.items() for f in _hints(c)]
    for name, section_cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise WeakclipError(f"{source}: section {name!r} must be a mapping")
        hints = _hints(section_cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise WeakclipError(unknown_key_message(f"{name}.{key}", source, keys))
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        setattr(cfg, name, _rebuild(getattr(cfg, name), kwargs, source))
    return raw


def split_override(item: str) -> tuple[str, str]:
    """``"section.key=value"`` -> ``("section.key", "value")``."""
    if "=" not in item:
        raise WeakclipError(f"override {item!r} is not of the form section.key=value")
    key, value = (part.strip() for part in item.split("=", 1))
    return key, value


def set_section_value(cfg: Any, sections: dict[str, type], key: str, value: Any, *,
                      keys: list[str] | None = None, example: str = "train.iters") -> None:
    """Set ``section.field`` of ``cfg`` to ``value`` converted to the field's type."""
    section, dot, name = key.partition(".")
    if not dot or section not in sections or name not in _hints(sections[section]):
        keys = keys if keys is not None else [f"{n}.{f}" for n, c in sections.items() for f in _hints(c)]
        raise WeakclipError(unknown_key_message(key, "override", keys, example))
    converted = _coerce(value, _hints(sections[section])[name], key)
    setattr(cfg, section, _rebuild(getattr(cfg, section), {name: converted}, f"override {key}"))


# ====================================================================== validation
def validate(cfg: Config, source: str = "config") -> None:
    """Range and choice checks that the types alone do not express."""
    d, t, lo = cfg.data, cfg.train, cfg.loss

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise WeakclipError(f"{source}: {msg}")

    need(d.kind in DATASET_KINDS, f"data.kind must be one of {', '.join(DATASET_KINDS)}, got {d.kind!r}")
    need(d.normalize in NORMALIZE_CHOICES,
         f"data.normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {d.normalize!r}")
    need(d.crop_size > 0, f"data.crop_size must be positive, got {d.crop_size}")
    need(min(d.scale) > 0, f"data.scale must be positive, got {d.scale}")
    need(0 < d.ratio_range[0] <= d.ratio_range[1], f"data.ratio_range must be 0 < low <= high, got "
                                                     f"{d.ratio_range}")
    need(0 < d.cat_max_ratio <= 1, f"data.cat_max_ratio must lie in (0, 1], got {d.cat_max_ratio}")
    need(0 <= d.flip_prob <= 1, f"data.flip_prob must lie in [0, 1], got {d.flip_prob}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.iters > 0, f"train.iters must be positive, got {t.iters}")
    need(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    need(0 < t.warmup_ratio <= 1, f"train.warmup_ratio must lie in (0, 1], got {t.warmup_ratio}")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr must lie in [0, train.lr], got {t.min_lr}")
    need(t.grad_clip is None or t.grad_clip > 0,
         f"train.grad_clip must be positive or none, got {t.grad_clip}")
    need(t.amp in AMP_CHOICES, f"train.amp must be one of {', '.join(AMP_CHOICES)}, got {t.amp!r}")
    need(t.checkpoint_every > 0, f"train.checkpoint_every must be positive, got {t.checkpoint_every}")
    need(t.log_every > 0, f"train.log_every must be positive, got {t.log_every}")
    need(t.keep_checkpoints > 0, f"train.keep_checkpoints must be positive, got {t.keep_checkpoints}")
    need(t.tower_lr_mult >= 0, f"train.tower_lr_mult must be >= 0, got {t.tower_lr_mult}")
    need(t.adapter_lr_mult >= 0, f"train.adapter_lr_mult must be >= 0, got {t.adapter_lr_mult}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0: off), got {t.eval_every}")
    need(t.eval_max_images is None or t.eval_max_images > 0,
         f"train.eval_max_images must be positive or none, got {t.eval_max_images}")
    need(lo.boundary_crf in BOUNDARY_CRF_MODES,
         f"loss.boundary_crf must be one of {', '.join(BOUNDARY_CRF_MODES)}, got {lo.boundary_crf!r}")
    need(lo.identity_mean in IDENTITY_MEANS,
         f"loss.identity_mean must be one of {', '.join(IDENTITY_MEANS)}, got {lo.identity_mean!r}")
    ps = cfg.pseudo
    need(len(ps.scales) > 0 and min(ps.scales) > 0, f"pseudo.scales must be positive, got {ps.scales}")
    need(ps.crop > 0 and ps.stride > 0, f"pseudo.crop and pseudo.stride must be positive, got {ps.crop}, "
                                        f"{ps.stride}")
    need(ps.size_divisor >= 1, f"pseudo.size_divisor must be >= 1, got {ps.size_divisor}")
    need(ps.crf_workers >= 0, f"pseudo.crf_workers must be >= 0, got {ps.crf_workers}")
    need(ps.window_batch >= 0, f"pseudo.window_batch must be >= 0 (0: by free memory), got {ps.window_batch}")
    need(ps.image_batch >= 1, f"pseudo.image_batch must be >= 1, got {ps.image_batch}")
    need(ps.average in ("logits", "probs"), f"pseudo.average must be logits or probs, got {ps.average!r}")
    need(ps.crf_backend in ("pydensecrf", "auto", "lattice"),
         f"pseudo.crf_backend must be pydensecrf, auto or lattice, got {ps.crf_backend!r}")
    need(ps.crf in ("auto", "voc", "coco", "none"), f"pseudo.crf must be auto, voc, coco or none, got "
                                                     f"{ps.crf!r}")
    need(ps.amp in ("bf16", "none"), f"pseudo.amp must be bf16 or none, got {ps.amp!r}")
    need(lo.loss_size > 0, f"loss.loss_size must be positive, got {lo.loss_size}")
    need(lo.identity_weight >= 0, f"loss.identity_weight must be >= 0, got {lo.identity_weight}")
    if cfg.classes is not None:
        need(len(cfg.classes) >= 2, "classes needs background and at least one object class")
        need(all(isinstance(c, str) and c.strip() for c in cfg.classes), "classes must be non-empty names")


# ====================================================================== typed conversion
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _section_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        out[f.name] = _plain(getattr(obj, f.name))
    return out


def _plain(value: Any) -> Any:
    """Make a value YAML-safe: tuples -> lists, dataclasses -> dicts, paths -> str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _section_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _rebuild(section: Any, changes: dict[str, Any], source: str) -> Any:
    """``dataclasses.replace`` (re-runs the section's own checks), errors as WeakclipError."""
    if not changes:
        return section
    try:
        return dataclasses.replace(section, **changes)
    except WeakclipError as exc:
        raise WeakclipError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise WeakclipError(f"{source}: {' '.join(str(exc).split())}") from None


_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "1", "on")
_FALSE_WORDS = ("false", "no", "0", "off")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _split_sequence(value: str) -> list[str]:
    text = value.strip()
    if text[:1] in "[(" and text[-1:] in "])":
        text = text[1:-1]
    if not text.strip():
        return []
    return [part.strip().strip("'\"") for part in text.split(",")]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML value) to the type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = WeakclipError(f"{key}: cannot use {value!r} as {_type_name(tp)}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str)
                                                      and value.strip().lower() in _NONE_WORDS)):
            return None
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except WeakclipError as exc:
                errors.append(exc)
        raise errors[-1] if len(arms) == 1 else bad
    if value is None:
        raise WeakclipError(f"{key}: a value is required (got none), expected {_type_name(tp)}")
    if origin is Literal:
        choices = args
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:
                if str(c).lower() == value.strip().lower():
                    return c
        raise WeakclipError(f"{key}: {value!r} is not one of {', '.join(str(c) for c in choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise WeakclipError(f"{key}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    f = float(text)  # "2e4"
                except ValueError:
                    raise WeakclipError(f"{key}: {value!r} is not an integer") from None
                if f.is_integer():
                    return int(f)
        raise WeakclipError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise WeakclipError(f"{key}: {value!r} is not a number") from None
        raise WeakclipError(f"{key}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad
    if origin in (tuple, list) or tp in (tuple, list):
        items = _split_sequence(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise WeakclipError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        elem = args[0] if args else Any
        converted = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if (origin is tuple or tp is tuple) else converted
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise WeakclipError(f"{key}: is a section, set its fields ({key}.<field>=...)")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception:  # noqa: BLE001 - any failure of the constructor is a bad value
            raise bad from None
    return value
