import dataclasses

import pytest

from weakclip.config import Config, ModelConfig, apply_overrides, load_preset
from weakclip.errors import WeakclipError


def test_voc_preset_holds_the_release_settings():
    cfg = load_preset("voc")
    t = cfg.train
    assert (t.iters, t.batch_size, t.lr, t.weight_decay) == (20000, 16, 1e-4, 3e-5)
    assert (t.warmup_iters, t.warmup_ratio, t.min_lr) == (1500, 1e-6, 1e-6)
    assert (t.tower_lr_mult, t.adapter_lr_mult, t.amp) == (0.0, 0.0, "none")
    d = cfg.data
    assert (d.kind, d.split, d.crop_size, d.scale, d.ratio_range) == ("voc", "train+train_aug", 512,
                                                                    (2048, 512), (0.5, 2.0))
    assert d.cat_max_ratio == 0.75 and d.photometric and d.flip_prob == 0.5
    assert d.normalize == "imagenet"
    lo = cfg.loss
    assert (lo.loss_size, lo.identity_weight) == (64, 0.4)
    assert (lo.boundary_crf, lo.identity_mean) == ("release", "all")
    m = cfg.model
    assert m.clip_arch == "ViT-B/16" and m.out_blocks == (4, 6, 8, 12)
    assert (m.drop_path_rate, m.n_ctx, m.tau, m.head_dropout) == (0.1, 8, 0.07, 0.1)
    assert not m.bn_eval and not m.freeze_towers and not m.readable_names and m.match_mode == "release"
    p = cfg.pseudo
    assert p.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and p.flip and (p.crop, p.stride) == (512, 341)
    assert (p.average, p.size_divisor, p.restrict_to_labels) == ("logits", 1, False)
    assert (p.crf, p.amp) == ("voc", "none")
    assert cfg.classes is None  # the dataset's raw names, as the release prompts them


def test_coco_preset_holds_the_release_settings():
    cfg = load_preset("coco")
    assert (cfg.train.iters, cfg.train.batch_size, cfg.train.lr) == (40000, 24, 1e-4)
    assert (cfg.data.kind, cfg.data.split, cfg.data.crop_size) == ("coco91", "train2014", 512)
    assert cfg.pseudo.crf == "coco" and not cfg.pseudo.restrict_to_labels
    assert cfg.classes is None


def test_presets_equal_the_model_defaults():
    """The presets spell the sections out; the release's presets must agree with the dataclass defaults,
    which are the release's too (so ``Config()`` is the release)."""
    voc = load_preset("voc")
    assert voc.model == ModelConfig()
    assert voc.loss == Config().loss and dataclasses.replace(voc.pseudo, crf="auto") == Config().pseudo
    defaults = Config().train
    assert (voc.train.amp, voc.train.tower_lr_mult, voc.train.adapter_lr_mult) == (
        defaults.amp, defaults.tower_lr_mult, defaults.adapter_lr_mult)
    assert voc.data.normalize == Config().data.normalize


# Every departure of the -plus presets from the release, as (key, release value, plus value).
PLUS_SWITCHES = [
    ("model.match_mode", "release", "chain"), ("model.bn_eval", False, True),
    ("model.freeze_towers", False, True), ("data.normalize", "imagenet", "clip"),
    ("train.amp", "none", "bf16"),
    ("train.adapter_lr_mult", 0.0, 1.0), ("loss.boundary_crf", "release", "fast"),
    ("loss.identity_mean", "all", "valid"), ("pseudo.average", "logits", "probs"),
    ("pseudo.size_divisor", 1, 32), ("pseudo.restrict_to_labels", False, True),
    ("pseudo.amp", "none", "bf16"), ("pseudo.window_batch", 1, 0), ("pseudo.image_batch", 1, 4),
    ("pseudo.crf_backend", "pydensecrf", "auto"), ("pseudo.resize", "opencv", "torch"),
    ("model.double_cls", True, False), ("model.pos_embed_size", 512, 0),
    ("model.drop_path_mode", "token", "sample"), ("model.init_scheme", "release", "mmseg"),
    ("model.partial_patches", "drop", "error"),
]


def _get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("base", ["voc", "coco"])
def test_plus_presets_differ_from_the_release_only_by_the_named_switches(base):
    release, plus = load_preset(base), load_preset(f"{base}-plus")
    extra = ([("model.readable_names", False, True), ("data.split", "train+train_aug", "train_aug")]
             if base == "voc" else [("data.kind", "coco91", "coco")])
    switches = PLUS_SWITCHES + extra
    for key, before, after in switches:
        assert (_get(release, key), _get(plus, key)) == (before, after), key
    # nothing else differs
    rd, pd = release.to_dict(), plus.to_dict()
    changed = {f"{s}.{k}" for s in rd if isinstance(rd[s], dict) for k in rd[s] if rd[s][k] != pd[s][k]}
    assert changed == {key for key, _, _ in switches}


def test_overrides_are_typed():
    cfg = apply_overrides(load_preset("voc"), [
        "train.iters=100", "train.lr=2e-4", "train.grad_clip=1", "train.deterministic=yes",
        "model.match_mode=release", "model.out_blocks=3,5,7,11", "data.scale=[1024, 256]",
        "data.seeds=/x/seeds", "data.split=none", "classes=background,cat,dog",
    ])
    assert cfg.train.iters == 100 and isinstance(cfg.train.iters, int)
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.train.deterministic is True
    assert cfg.model.match_mode == "release" and cfg.model.out_blocks == (3, 5, 7, 11)
    assert cfg.data.scale == (1024, 256) and cfg.data.seeds == "/x/seeds" and cfg.data.split is None
    assert cfg.classes == ["background", "cat", "dog"]
    # the input is not modified
    assert load_preset("voc").train.iters == 20000


@pytest.mark.parametrize("override, words", [
    ("train.iter=3", ["unknown config key 'train.iter'", "train.iters"]),
    ("nosuch.key=1", ["unknown config key"]),
    ("train=3", ["unknown config key"]),
    ("train.iters=many", ["train.iters", "not an integer"]),
    ("train.lr=fast", ["train.lr", "not a number"]),
    ("train.deterministic=maybe", ["not a boolean"]),
    ("train.amp=fp32", ["train.amp", "bf16"]),
    ("data.scale=1,2,3", ["data.scale", "expected 2 values"]),
    ("model.match_mode=sideways", ["match_mode"]),
    ("model.out_blocks=1,2", ["out_blocks"]),
    ("train.iters=0", ["train.iters must be positive"]),
    ("train.iters", ["section.key=value"]),
])
def test_bad_overrides_give_one_line_errors(override, words):
    with pytest.raises(WeakclipError) as exc:
        apply_overrides(load_preset("voc"), [override])
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(load_preset("coco"), ["train.grad_clip=0.5", "model.match_mode=release",
                                                "data.root=/data/coco", "train.amp=fp16"])
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    back = Config.from_yaml(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    # a YAML file works as a preset too, and partial files keep the defaults
    assert load_preset(str(path)) == cfg
    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  iters: 7\n")
    small = load_preset(partial)
    assert small.train.iters == 7 and small.train.batch_size == 16 and small.classes is None


def test_bad_yaml_and_unknown_preset(tmp_path):
    with pytest.raises(WeakclipError, match="unknown preset 'vocc'"):
        load_preset("vocc")
    with pytest.raises(WeakclipError, match="config file not found"):
        load_preset(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  itres: 7\n")
    with pytest.raises(WeakclipError, match="train.itres"):
        load_preset(bad)
    bad.write_text("trian:\n  iters: 7\n")
    with pytest.raises(WeakclipError, match="unknown section"):
        load_preset(bad)
