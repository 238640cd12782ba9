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

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from weakclip.errors import WeakclipError
from weakclip.losses import BOUNDARY_CRF_MODES, IDENTITY_MEANS
from weakclip.models.weakclip import ModelConfig
from weakclip.sections import SectionedConfig

__all__ = [
    "PRESETS",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "PseudoMaskConfig",
    "TrainConfig",
    "PATH_KEYS",
    "apply_overrides",
    "load_preset",
]

PRESETS: tuple[str, ...] = ("voc", "coco", "voc-plus", "coco-plus")
#: The keys that name files or folders: training records them absolute (a checkpoint reads the same anywhere).
PATH_KEYS: tuple[str, ...] = ("data.root", "data.seeds")

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
    # How training, periodic evaluation and pseudo masks read images (weakclip.data.io.read_image): the
    # release reads them with mmcv's imfrombytes (OpenCV, IMREAD_COLOR); "auto" orientation: upright for
    # folder datasets, for VOC/COCO what the reader does (OpenCV applies the EXIF orientation, Pillow not).
    image_reader: Literal["pil", "opencv"] = "opencv"
    image_orientation: Literal["auto", "ignore", "exif"] = "auto"


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
    windows share those passes, ``amp`` (``bf16`` or ``fp16`` autocast on CUDA).
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
    amp: Literal["bf16", "fp16", "none"] = "none"
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
        """``torch.bfloat16`` / ``torch.float16`` with ``amp: bf16`` / ``fp16`` on CUDA, else None
        (float32)."""
        import torch

        if self.amp == "none" or torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if self.amp == "bf16" else torch.float16


@dataclass
class Config(SectionedConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    classes: list[str] | None = None

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "loss": LossConfig,
        "pseudo": PseudoMaskConfig,
    }
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("classes",)
    PRESETS: ClassVar[tuple[str, ...]] = PRESETS

    def validate(self, source: str = "config") -> None:
        _validate(self, source)


# ====================================================================== presets and overrides
def load_preset(name: str | Path) -> Config:
    """``"voc"`` / ``"coco"`` (the release's settings, shipped with the package) or a YAML file."""
    return Config.from_preset(name)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied (typed, validated).

    Values are converted to the field's declared type: ``int``, ``float`` (``1e-4``), ``bool``
    (true/false/yes/no/1/0/on/off), ``str``, ``none``/``null`` for optional fields, tuples and lists
    as ``4,6,8,12`` or ``[4, 6, 8, 12]``. ``classes=a,b,c`` sets the class list.
    """
    return cfg.with_overrides(overrides)


#: Every settable key, ``section.field`` (and ``classes``).
all_keys = Config.all_keys


# ====================================================================== validation
def _validate(cfg: Config, source: str = "config") -> None:
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
    need(d.image_reader in ("pil", "opencv"),
         f"data.image_reader must be pil or opencv, got {d.image_reader!r}")
    need(d.image_orientation in ("auto", "ignore", "exif"),
         f"data.image_orientation must be auto, ignore or exif, got {d.image_orientation!r}")
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
    need(ps.amp in AMP_CHOICES, f"pseudo.amp must be one of {', '.join(AMP_CHOICES)}, got {ps.amp!r}")
    need(lo.loss_size > 0, f"loss.loss_size must be positive, got {lo.loss_size}")
    need(lo.identity_weight >= 0, f"loss.identity_weight must be >= 0, got {lo.identity_weight}")
    if cfg.classes is not None:
        need(len(cfg.classes) >= 2, "classes needs background and at least one object class")
        need(all(isinstance(c, str) and c.strip() for c in cfg.classes), "classes must be non-empty names")
