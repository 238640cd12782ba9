"""The retraining stage's typed configuration: :class:`RetrainConfig` (model, data, train and eval sections),
its presets (``weakclip/configs/retrain_<name>.yaml``: ``voc`` / ``coco`` the authors' DeepLab-v1 recipe,
``voc-plus`` / ``coco-plus`` torchvision's DeepLabV3), ``key=value`` overrides, the checks the types cannot
express, and the dense-CRF parameters its evaluation names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from weakclip.errors import WeakclipError
from weakclip.sections import SectionedConfig

__all__ = [
    "RETRAIN_PATH_KEYS",
    "RETRAIN_PRESETS",
    "RetrainConfig",
    "RetrainDataConfig",
    "RetrainEvalConfig",
    "RetrainModelConfig",
    "RetrainTrainConfig",
    "apply_retrain_overrides",
    "crf_params_of",
    "load_retrain_preset",
]

RETRAIN_PRESETS: tuple[str, ...] = ("voc", "coco", "voc-plus", "coco-plus")
#: The keys that name files or folders: retraining records them absolute (its checkpoint reads the same
#: anywhere).
RETRAIN_PATH_KEYS: tuple[str, ...] = ("data.root", "data.masks", "model.backbone_weights")


@dataclass
class RetrainModelConfig:
    """The network (:func:`weakclip.retrain.models.build_segmenter`)."""

    name: str = "deeplabv3_resnet101"
    output_stride: int = 16
    pretrained_backbone: bool = True
    backbone_weights: str | None = None
    head_channels: int = 256
    sync_bn: bool = True  # SyncBatchNorm under DDP on CUDA (several processes); plain BatchNorm otherwise
    bn_momentum: float | None = None  # of every BatchNorm of the network (PyTorch convention); None: as built
    width_divisor: int = 1  # deeplabv1_resnet38 only: channel counts divided (1 = the authors'; >1 for tests)


@dataclass
class RetrainDataConfig:
    """Training data (the pseudo masks are the targets) and the augmentation."""

    kind: Literal["voc", "coco", "coco91", "folder"] = "voc"
    root: str | None = None
    split: str | None = "train_aug"
    val_split: str | None = "val"
    masks: str | None = None
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    photometric: bool = False
    normalize: Literal["imagenet", "clip"] = "imagenet"
    num_workers: int = 4
    # "standard": scale, crop (top-left padding), flip, [photometric]; "release": the authors' DeepLab-v1
    # pipeline (weakclip.retrain.augment: HSV jitter, flip, bicubic scale, normalise, random-offset crop)
    pipeline: Literal["standard", "release"] = "standard"
    hsv_jitter: tuple[int, int, int] = (10, 10, 10)  # "release" pipeline: H, S, V shift ranges
    # How training and validation images are read (weakclip.data.io.read_image): the release's cv2.imread;
    # "auto" orientation: upright for folder datasets, for VOC/COCO what the reader does (OpenCV: upright)
    image_reader: Literal["pil", "opencv"] = "opencv"
    image_orientation: Literal["auto", "ignore", "exif"] = "auto"


@dataclass
class RetrainTrainConfig:
    """Optimisation: ``lr`` is the backbone's rate, the head's is ``lr * head_lr_mult``; ``batch_size`` is
    GLOBAL."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0
    iters: int = 30000
    batch_size: int = 16
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 50
    keep_checkpoints: int = 3
    # "poly": (1 - it / iters) ** power; "poly_release": (1 - it / (iters + 1)) ** power (the authors')
    schedule: Literal["poly", "poly_release"] = "poly"
    # DeepLab-v1 only (its four convolution-only groups): bias rate multiplier and bias weight decay
    bias_lr_mult: float = 2.0
    bias_weight_decay: float | None = 0.0
    # DeepLab-v1 only: conv1a's rate drops to 0 after the first epoch (len(train set) // batch iterations)
    freeze_stem_after_first_epoch: bool = False


@dataclass
class RetrainEvalConfig:
    """Validation: ``scales`` (1.0 = the original size), ``flip``, dense CRF with ``crf_params``; ``fuse``
    (mean of softmax maps or softmax of mean logits), ``resize`` of the input per scale, ``align_corners`` of
    the logits' upsampling, ``crf_classes`` (all, or only those of the argmax as the authors' make_crf.py)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    crf_params: Literal["voc", "coco", "release_voc", "release_coco"] = "voc"
    max_images: int | None = None
    fuse: Literal["probs", "logits"] = "probs"
    # "opencv": cv2.resize(fx=s) of the normalised image on the CPU, the authors' test exactly; "bicubic" /
    # "bilinear": torch on the model's device to round(s * size) (faster on a GPU; not the release's sizes
    # and values)
    resize: Literal["opencv", "bilinear", "bicubic"] = "bilinear"
    align_corners: bool = False
    crf_classes: Literal["all", "present"] = "all"


@dataclass
class RetrainConfig(SectionedConfig):
    model: RetrainModelConfig = field(default_factory=RetrainModelConfig)
    data: RetrainDataConfig = field(default_factory=RetrainDataConfig)
    train: RetrainTrainConfig = field(default_factory=RetrainTrainConfig)
    eval: RetrainEvalConfig = field(default_factory=RetrainEvalConfig)

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": RetrainModelConfig, "data": RetrainDataConfig, "train": RetrainTrainConfig,
        "eval": RetrainEvalConfig,
    }
    KEY_EXAMPLE: ClassVar[str] = "train.iters, model.name"
    PRESETS: ClassVar[tuple[str, ...]] = RETRAIN_PRESETS
    PRESET_FILE: ClassVar[str] = "retrain_{}.yaml"
    PRESET_SOURCE: ClassVar[str] = "retrain preset {}"
    PRESET_NOUN: ClassVar[str] = "retrain preset"

    @staticmethod
    def is_config_file(path: Path) -> bool:
        return path.is_file()

    def validate(self, source: str = "config") -> None:
        _validate(self, source)


def _validate(cfg: RetrainConfig, source: str) -> None:
    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise WeakclipError(f"{source}: {msg}")

    need(m.output_stride in (8, 16, 32), f"model.output_stride must be 8, 16 or 32, got {m.output_stride}")
    need(m.head_channels > 0, f"model.head_channels must be positive, got {m.head_channels}")
    need(d.kind in ("voc", "coco", "coco91", "folder"),
         f"data.kind must be voc, coco, coco91 or folder, got {d.kind!r}")
    need(d.crop_size > 0, f"data.crop_size must be positive, got {d.crop_size}")
    need(0 < d.scale_range[0] <= d.scale_range[1],
         f"data.scale_range must be 0 < low <= high, got {d.scale_range}")
    need(0 <= d.flip_prob <= 1, f"data.flip_prob must lie in [0, 1], got {d.flip_prob}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.head_lr_mult > 0, f"train.head_lr_mult must be positive, got {t.head_lr_mult}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.poly_power >= 0, f"train.poly_power must be >= 0, got {t.poly_power}")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr must lie in [0, train.lr], got {t.min_lr}")
    need(t.iters > 0, f"train.iters must be positive, got {t.iters}")
    need(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    need(t.checkpoint_every > 0 and t.log_every > 0 and t.keep_checkpoints > 0,
         "train.checkpoint_every, train.log_every and train.keep_checkpoints must be positive")
    need(len(e.scales) > 0 and min(e.scales) > 0, f"eval.scales must be positive numbers, got {e.scales}")
    need(m.bn_momentum is None or 0 <= m.bn_momentum <= 1,
         f"model.bn_momentum must lie in [0, 1], got {m.bn_momentum}")
    need(m.width_divisor >= 1 and 64 % m.width_divisor == 0,
         f"model.width_divisor must divide 64, got {m.width_divisor}")
    need(min(d.hsv_jitter) >= 0, f"data.hsv_jitter must be >= 0, got {d.hsv_jitter}")
    need(d.image_reader in ("pil", "opencv"),
         f"data.image_reader must be pil or opencv, got {d.image_reader!r}")
    need(d.image_orientation in ("auto", "ignore", "exif"),
         f"data.image_orientation must be auto, ignore or exif, got {d.image_orientation!r}")
    need(t.bias_lr_mult > 0, f"train.bias_lr_mult must be positive, got {t.bias_lr_mult}")
    need(t.bias_weight_decay is None or t.bias_weight_decay >= 0,
         f"train.bias_weight_decay must be >= 0, got {t.bias_weight_decay}")


def load_retrain_preset(name: str | Path) -> RetrainConfig:
    """``"voc"`` / ``"coco"`` (the authors' DeepLab-v1 retraining), ``"voc-plus"`` / ``"coco-plus"``
    (torchvision's DeepLabV3) (``weakclip/configs/retrain_<name>.yaml``) or a YAML file of these sections."""
    return RetrainConfig.from_preset(name)


def apply_retrain_overrides(cfg: RetrainConfig, overrides: list[str] | tuple[str, ...]) -> RetrainConfig:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied (typed as in ``weakclip.config``)."""
    return cfg.with_overrides(overrides)


def crf_params_of(e: RetrainEvalConfig):
    """The dense-CRF parameters named by ``eval.crf_params`` (None when ``eval.crf`` is off)."""
    from weakclip.crf import COCO_CRF, VOC_CRF, DenseCRFParams

    if not e.crf:
        return None
    return {"voc": VOC_CRF, "coco": COCO_CRF,
            # tools/densecrf.py of the authors' retraining: crf_inference_voc12 / crf_inference_coco
            "release_voc": DenseCRFParams(1.0, 3.0, 112.0, 2.0, 3.0, 10),
            "release_coco": DenseCRFParams(1.0, 3.0, 67.0, 3.0, 4.0, 10)}[e.crf_params]
