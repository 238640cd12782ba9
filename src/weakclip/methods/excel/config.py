"""ExCEL's typed configuration: :class:`ExcelConfig` (sections ``model``, ``text``, ``labels``, ``data``,
``train``, ``infer``, ``free`` and the class list), its presets ``excel-voc`` and ``excel-coco``
(``weakclip/configs/excel-<name>.yaml``: the release's settings, each value's source named beside it),
``section.key=value`` overrides and the checks the types cannot express; the YAML round trip, presets and
overrides are those of every stage's config (:class:`weakclip.sections.SectionedConfig`).

Every record this method writes names it (``"method": "excel"``, :mod:`weakclip.methods`); a config dict or
YAML file that names another method is refused in one line.

Sections::

    model   the network: CLIP architecture, the trained decoder's widths and depth, the surgery blocks
    text    prompt, background classes, class names, descriptors file, k-means bank, attribute top-K
    labels  the online pseudo labels of a training step: attention affinity, PAR, thresholds, switches
    data    training data and the crops the release's dataset really makes
    train   optimisation (PolyWarmupAdamW), loss weights, GLOBAL batch, bookkeeping
    infer   test-time inference (tools/infer_seg_voc.py / infer_seg_coco.py)
    free    training-free pseudo masks (tools/infer_lam.py --training_free true)
    classes readable class names, background first (None: the dataset's)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from weakclip.errors import WeakclipError
from weakclip.methods import check_same
from weakclip.sections import SectionedConfig

__all__ = [
    "EXCEL_PRESETS",
    "ExcelConfig",
    "ExcelDataConfig",
    "ExcelFreeConfig",
    "ExcelInferConfig",
    "ExcelLabelsConfig",
    "ExcelModelConfig",
    "ExcelTextConfig",
    "ExcelTrainConfig",
    "METHOD",
    "all_keys",
    "apply_excel_overrides",
    "config_with_overrides",
    "load_excel_preset",
    "training_free_config",
]

METHOD = "excel"
EXCEL_PRESETS: tuple[str, ...] = ("excel-voc", "excel-coco")


@dataclass
class ExcelModelConfig:
    """The network (frozen CLIP + trained decoder). ``surgery_layers``: the release's
    ``reload_self_attn(layers=...)`` (that many last blocks minus one get value-value attention);
    ``fuse_dropout``: the SegFormer-style fusion's Dropout2d, active in training."""

    clip_arch: str = "ViT-B/16"
    embedding_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    fuse_dropout: float = 0.1
    surgery_layers: int = 6


@dataclass
class ExcelTextConfig:
    """Text Semantic Enrichment. ``prompt``: the class prompt template; ``background``: background words
    (None: the release's list for VOC's or COCO's classes, else VOC's less the words of the class names);
    ``descriptors``: the JSON file of class descriptors (None: plain class prompts, said in one line);
    ``num_clusters``: the k-means bank's size (None: 112 for VOC, 224 for COCO, else VOC's ratio);
    ``kmeans_seeding``: ``sklearn-1.0.2`` (the release's pinned scikit-learn: n_init 10, elkan, its k-means++
    draws) or ``sklearn`` (today's); ``top_k``: ``attr_aggregate``'s topK (the lowest ``1 - top_k`` of the
    clusters are masked)."""

    prompt: str = "a clean origami {}."
    background: list[str] | None = None
    descriptors: str | None = None
    num_clusters: int | None = 112
    kmeans_seeding: Literal["sklearn-1.0.2", "sklearn"] = "sklearn-1.0.2"
    top_k: float = 0.9


@dataclass
class ExcelLabelsConfig:
    """The online pseudo labels of every training step. ``switch_iter``: from this iteration the maps come
    from the second CLIP pass with the decoder's features and the attention refinement is gated by the
    predicted affinity; ``aff_from_pred_iter`` (None: never): from this iteration the affinity target comes
    from the prediction instead of the pseudo labels."""

    caa_threshold: float = 0.79
    attn_layers: int = 6
    par_iters: int = 20
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    high_thre: float = 0.7
    low_thre: float = 0.25
    bkg_thre: float = 0.5
    radius: int = 8
    ignore_index: int = 255
    switch_iter: int | None = 14000
    aff_from_pred_iter: int | None = 24000


@dataclass
class ExcelDataConfig:
    """Training data and the crops the release's VOC12ClsDataset really makes: random rescale by a ratio
    in ``scale_range``, horizontal flip, random crop ``crop_size`` (zero-padded, the image box kept),
    normalisation (ImageNet's mean/std, as the release feeds its CLIP). ``mask_guided_crop``: the crop
    window is redrawn (10 tries at most) until no class holds 75% of it, judged on the ground-truth mask
    (VOC's dataset class does so; COCO's does not); on a dataset without masks the first window is kept."""

    kind: Literal["voc", "coco", "coco91", "folder"] = "voc"
    root: str | None = None
    split: str | None = "train_aug"
    crop_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    mask_guided_crop: bool = True
    normalize: Literal["imagenet", "clip"] = "imagenet"
    num_workers: int = 2
    image_reader: Literal["pil", "opencv"] = "pil"
    image_orientation: Literal["auto", "ignore", "exif"] = "auto"


@dataclass
class ExcelTrainConfig:
    """PolyWarmupAdamW: AdamW (``betas``, ``eps``, ``weight_decay``), base rate ``lr`` and the decoder's
    groups at ``lr * decoder_lr_mult``; the rate ramps linearly from ``warmup_ratio`` x over
    ``warmup_iters``, then ``(1 - it / iters) ** power``. Loss = ``seg_weight`` x segmentation +
    ``aff_weight`` x affinity. ``batch_size`` is GLOBAL (split over the processes); the release's affinity
    prediction subtracts a mean over each process's batch, so the per-process batch is what it sees."""

    iters: int = 30000
    batch_size: int = 4
    lr: float = 1e-4
    decoder_lr_mult: float = 10.0
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seg_weight: float = 1.0
    aff_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 2000
    log_every: int = 200
    keep_checkpoints: int = 3
    amp: Literal["bf16", "fp16", "none"] = "none"
    grad_clip: float | None = None


@dataclass
class ExcelInferConfig:
    """Test-time inference (:class:`~weakclip.methods.excel.infer.InferenceSettings`): a base pass on the
    image resized to ``size`` x ``size`` and one per other ``scale``, each batched with its flip (``flip``);
    the base pass's flipped prediction averaged in (``flip_at_base``: COCO's script) or discarded (VOC's
    quirk); logits averaged on a grid of ``logits_fraction`` of the image (COCO 0.2); optional dense CRF."""

    size: int = 320
    scales: tuple[float, ...] = (0.7, 1.0, 1.2, 1.5)
    flip: bool = True
    flip_at_base: bool = False
    logits_fraction: float = 1.0
    crf: bool = False

    def settings(self):
        """These values as :class:`~weakclip.methods.excel.infer.InferenceSettings`."""
        from weakclip.methods.excel.infer import InferenceSettings

        return InferenceSettings(size=self.size, scales=tuple(self.scales), flip_at_base=self.flip_at_base,
                                 flip=self.flip, logits_fraction=self.logits_fraction, crf=self.crf)


@dataclass
class ExcelFreeConfig:
    """Training-free pseudo masks (tools/infer_lam.py ``--training_free true``): the image resized to
    ``size`` x ``size``; ``caa_threshold`` of the attention refinement; ``par_image``: the image PAR
    refines with, ``normalized`` (the release's infer_lam: the network's input) or ``denormalized`` (what
    training uses)."""

    size: int = 320
    caa_threshold: float = 0.79
    par_image: Literal["normalized", "denormalized"] = "normalized"


@dataclass
class ExcelConfig(SectionedConfig):
    model: ExcelModelConfig = field(default_factory=ExcelModelConfig)
    text: ExcelTextConfig = field(default_factory=ExcelTextConfig)
    labels: ExcelLabelsConfig = field(default_factory=ExcelLabelsConfig)
    data: ExcelDataConfig = field(default_factory=ExcelDataConfig)
    train: ExcelTrainConfig = field(default_factory=ExcelTrainConfig)
    infer: ExcelInferConfig = field(default_factory=ExcelInferConfig)
    free: ExcelFreeConfig = field(default_factory=ExcelFreeConfig)
    classes: list[str] | None = None

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ExcelModelConfig, "text": ExcelTextConfig, "labels": ExcelLabelsConfig,
        "data": ExcelDataConfig, "train": ExcelTrainConfig, "infer": ExcelInferConfig,
        "free": ExcelFreeConfig,
    }
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("method", "classes")
    METHOD: ClassVar[str | None] = METHOD
    KEY_EXAMPLE: ClassVar[str] = "train.iters, labels.radius"
    PRESETS: ClassVar[tuple[str, ...]] = EXCEL_PRESETS
    PRESET_NOUN: ClassVar[str] = "ExCEL preset"

    def read_extra(self, raw: dict[str, Any], source: str) -> None:
        """A ``method`` other than ExCEL's is a one-line error; then the class list."""
        if raw.get("method") is not None:
            check_same(str(raw["method"]), METHOD, source)
        super().read_extra(raw, source)

    def validate(self, source: str = "config") -> None:
        _validate(self, source)


#: Every settable key, ``section.field`` (and ``classes``).
all_keys = ExcelConfig.all_keys


# ====================================================================== presets and overrides
def load_excel_preset(name: str | Path) -> ExcelConfig:
    """``"excel-voc"`` / ``"excel-coco"`` (the release's settings, ``weakclip/configs/<name>.yaml``) or a
    YAML file of these sections."""
    return ExcelConfig.from_preset(name)


def apply_excel_overrides(cfg: ExcelConfig, overrides: list[str] | tuple[str, ...]) -> ExcelConfig:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied (typed as in :mod:`weakclip.config`;
    ``classes=a,b,c`` sets the class list)."""
    return cfg.with_overrides(overrides)


def training_free_config(kind: str, preset: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                         ) -> tuple[str, ExcelConfig]:
    """``(preset, config)`` for the training-free masks of a dataset of ``kind`` (voc, coco, coco91,
    folder): ``preset`` (default: excel-coco for COCO, else excel-voc); ``data.kind`` the kind the text side
    takes (coco91 read as coco's classes); for a folder dataset the k-means cluster count of another class
    list (``text.num_clusters: none``, VOC's ratio of the descriptor sentences; the presets' 112 / 224 are
    VOC's and COCO's); then ``overrides`` (``section.key=value``, which win)."""
    key = str(kind)
    name = preset or ("excel-coco" if key.startswith("coco") else "excel-voc")
    text_kind = "coco" if key.startswith("coco") else key
    own = ["text.num_clusters=none"] if text_kind == "folder" else []
    return name, apply_excel_overrides(load_excel_preset(name), [f"data.kind={text_kind}", *own, *overrides])


def check_text_inputs(cfg: ExcelConfig, descriptors: str | Path | None, classes: list[str],
                      preset: str | None = None) -> dict[str, list[str]] | None:
    """Before any work, what the text bank of ``cfg`` for ``classes`` will read: the descriptors file is JSON
    of the right shape describing every foreground class and no other
    (:func:`~weakclip.methods.excel.text.check_descriptors`), with at least as many sentences as
    ``text.num_clusters``. One-line DataError naming the file; returns its table (None without a file)."""
    from weakclip.errors import DataError
    from weakclip.methods.excel.text import check_descriptors

    if descriptors is None:
        return None
    table = check_descriptors(descriptors, list(classes), cfg.data.kind, cfg.text.background)
    sentences = sum(len(v) for v in table.values())
    if cfg.text.num_clusters is not None and cfg.text.num_clusters > sentences:
        named = f" (preset {preset})" if preset else ""
        raise DataError(f"text.num_clusters {cfg.text.num_clusters}{named} needs as many descriptor "
                        f"sentences; {descriptors} has {sentences}: --set text.num_clusters=N")
    return table


def config_with_overrides(preset: str | Path, overrides: list[str] | tuple[str, ...]) -> ExcelConfig:
    """The registry's ``"train_config"`` entry point (``weakclip train``): the preset (or YAML file) with
    ``section.key=value`` overrides applied in order. A folder dataset takes the k-means cluster count of its
    own class list (``text.num_clusters: none``, VOC's ratio; the presets' 112 / 224 are VOC's and COCO's), as
    ``weakclip run`` and ``weakclip seeds --method excel`` do, unless an override sets it."""
    from weakclip.sections import override_keys

    cfg = apply_excel_overrides(load_excel_preset(preset), list(overrides))
    if cfg.data.kind == "folder" and "text.num_clusters" not in override_keys(list(overrides)):
        cfg.text.num_clusters = None
    return cfg


# ====================================================================== validation
def _validate(cfg: ExcelConfig, source: str = "config") -> None:
    """Range checks the types alone do not express (one-line errors)."""
    m, x, lb, d, t, inf, fr = cfg.model, cfg.text, cfg.labels, cfg.data, cfg.train, cfg.infer, cfg.free

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise WeakclipError(f"{source}: {msg}")

    need(m.embedding_dim > 0, f"model.embedding_dim must be positive, got {m.embedding_dim}")
    need(m.decoder_layers > 0, f"model.decoder_layers must be positive, got {m.decoder_layers}")
    need(m.decoder_heads > 0 and m.embedding_dim % m.decoder_heads == 0,
         f"model.decoder_heads must divide model.embedding_dim {m.embedding_dim}, got {m.decoder_heads}")
    need(0 <= m.fuse_dropout < 1, f"model.fuse_dropout must lie in [0, 1), got {m.fuse_dropout}")
    need(m.surgery_layers >= 1, f"model.surgery_layers must be >= 1, got {m.surgery_layers}")
    need("{}" in x.prompt, f"text.prompt must hold '{{}}' where the class name goes, got {x.prompt!r}")
    need(x.num_clusters is None or x.num_clusters > 0,
         f"text.num_clusters must be positive or none, got {x.num_clusters}")
    need(x.background is None or all(isinstance(w, str) and w.strip() for w in x.background),
         "text.background must be non-empty words")
    need(0 <= x.top_k < 1, f"text.top_k must lie in [0, 1), got {x.top_k}")
    need(0 <= lb.caa_threshold <= 1, f"labels.caa_threshold must lie in [0, 1], got {lb.caa_threshold}")
    need(lb.attn_layers >= 1, f"labels.attn_layers must be >= 1, got {lb.attn_layers}")
    need(lb.par_iters >= 0, f"labels.par_iters must be >= 0, got {lb.par_iters}")
    need(len(lb.par_dilations) > 0 and min(lb.par_dilations) >= 1,
         f"labels.par_dilations must be positive integers, got {lb.par_dilations}")
    need(0 <= lb.low_thre <= lb.high_thre <= 1,
         f"labels.low_thre and labels.high_thre must be 0 <= low <= high <= 1, got {lb.low_thre}, "
         f"{lb.high_thre}")
    need(0 <= lb.bkg_thre <= 1, f"labels.bkg_thre must lie in [0, 1], got {lb.bkg_thre}")
    need(lb.radius >= 0, f"labels.radius must be >= 0, got {lb.radius}")
    need(0 <= lb.ignore_index <= 255, f"labels.ignore_index must lie in [0, 255], got {lb.ignore_index}")
    need(lb.switch_iter is None or lb.switch_iter >= 0,
         f"labels.switch_iter must be >= 0 or none, got {lb.switch_iter}")
    need(lb.aff_from_pred_iter is None or lb.aff_from_pred_iter >= 0,
         f"labels.aff_from_pred_iter must be >= 0 or none, got {lb.aff_from_pred_iter}")
    need(d.crop_size > 0, f"data.crop_size must be positive, got {d.crop_size}")
    need(0 < d.scale_range[0] <= d.scale_range[1], f"data.scale_range must be 0 < low <= high, got "
                                                     f"{d.scale_range}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.iters > 0, f"train.iters must be positive, got {t.iters}")
    need(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.decoder_lr_mult > 0, f"train.decoder_lr_mult must be positive, got {t.decoder_lr_mult}")
    need(t.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    need(0 < t.warmup_ratio <= 1, f"train.warmup_ratio must lie in (0, 1], got {t.warmup_ratio}")
    need(t.power >= 0, f"train.power must be >= 0, got {t.power}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(all(0 <= b < 1 for b in t.betas), f"train.betas must lie in [0, 1), got {t.betas}")
    need(t.eps > 0, f"train.eps must be positive, got {t.eps}")
    need(t.seg_weight >= 0 and t.aff_weight >= 0,
         f"train.seg_weight and train.aff_weight must be >= 0, got {t.seg_weight}, {t.aff_weight}")
    need(t.checkpoint_every > 0 and t.log_every > 0 and t.keep_checkpoints > 0,
         "train.checkpoint_every, train.log_every and train.keep_checkpoints must be positive")
    need(t.grad_clip is None or t.grad_clip > 0,
         f"train.grad_clip must be positive or none, got {t.grad_clip}")
    need(inf.size > 0, f"infer.size must be positive, got {inf.size}")
    need(len(inf.scales) > 0 and min(inf.scales) > 0, f"infer.scales must be positive, got {inf.scales}")
    need(0 < inf.logits_fraction <= 1, f"infer.logits_fraction must lie in (0, 1], got {inf.logits_fraction}")
    need(fr.size > 0, f"free.size must be positive, got {fr.size}")
    need(0 <= fr.caa_threshold <= 1, f"free.caa_threshold must lie in [0, 1], got {fr.caa_threshold}")
    if cfg.classes is not None:
        need(len(cfg.classes) >= 2, "classes needs background and at least one object class")
        need(all(isinstance(c, str) and c.strip() for c in cfg.classes), "classes must be non-empty names")
