"""The training and inference behaviour of the release that the `voc` / `coco` presets reproduce (issue 10):
each test checks one point against an independent computation of what the release does."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakclip.config import apply_overrides, load_preset
from weakclip.crf import TRAIN_CRF
from weakclip.data.classes import COCO91_CLASSES, COCO_CLASSES, coco_to_81, coco_to_91
from weakclip.data.datasets import build_dataset
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.engine.checkpoint import best_checkpoint_path, load_checkpoint
from weakclip.engine.schedule import WarmupCosineSchedule
from weakclip.engine.trainer import optimizer_groups, train
from weakclip.errors import WeakclipError
from weakclip.inference.periodic import build_evaluator
from weakclip.inference.pseudo_masks import argmax_probs
from weakclip.inference.sliding import multiscale_inference, slide_inference
from weakclip.losses import WeakCLIPLoss, release_crf_image, softmax_probs
from weakclip.models.weakclip import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**changes):
    cfg = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), neck_channels=16, head_channels=16,
                      match_width=16, match_layers=1, **changes)
    return build_model(cfg, ["background", "cat", "diningtable"], pretrained_download=False)


# ============================================================= 1. lr of the lr_mult=0 group (mmcv 1.3.17)
def mmcv_lr(it, base_lr, total=20000, warmup=1500, ratio=1e-6, min_lr=1e-6):
    """mmcv's CosineAnnealingLrUpdaterHook + linear warm-up, written from its documented formulas."""
    regular = min_lr + 0.5 * (base_lr - min_lr) * (math.cos(math.pi * it / total) + 1)
    if it < warmup:
        return regular * (1 - (1 - it / warmup) * (1 - ratio))
    return regular


def test_lr_mult_zero_group_follows_mmcv_min_lr_rule():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr_mult": 1.0},
                             {"params": [params[1]], "lr_mult": 0.0}], lr=1e-4)
    sched = WarmupCosineSchedule(opt, 1e-4, 20000, 1500, 1e-6, 1e-6)
    for it in (0, 1, 750, 1499, 1500, 5000, 10000, 19999, 20000):
        sched.set_iteration(it)
        assert opt.param_groups[0]["lr"] == pytest.approx(mmcv_lr(it, 1e-4), rel=1e-12, abs=1e-18)
        assert opt.param_groups[1]["lr"] == pytest.approx(mmcv_lr(it, 0.0), rel=1e-12, abs=1e-18)
    # the "frozen" group is not still: 0 at the start, min_lr at the end, ~1e-2 summed over training
    sched.set_iteration(0)
    assert opt.param_groups[1]["lr"] == 0.0
    sched.set_iteration(20000)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-6)
    total_zero = sum(mmcv_lr(it, 0.0) for it in range(20000))
    total_base = sum(mmcv_lr(it, 1e-4) for it in range(20000))
    assert 0.008 < total_zero < 0.011 and 0.9 < total_base < 1.0


def test_optimizer_groups_put_towers_and_adapter_in_their_groups():
    model = tiny_model()  # the release: towers trainable (in the lr_mult=0 group)
    groups = {g["name"]: g for g in optimizer_groups(model, 3e-5, tower_lr_mult=0.0, adapter_lr_mult=0.0)}
    assert set(groups) == {"towers", "adapter", "rest"}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert ids["towers"] == {id(p) for n, p in model.named_parameters() if n.startswith(("image_tower.",
                                                                                           "text_tower."))}
    assert ids["adapter"] == {id(p) for p in model.adapter.parameters()}
    assert id(model.prompts.context) in ids["rest"] and groups["towers"]["lr_mult"] == 0.0
    assert all(g["weight_decay"] == 3e-5 for g in groups.values())
    frozen = tiny_model(freeze_towers=True)
    names = {g["name"] for g in optimizer_groups(frozen, 3e-5, adapter_lr_mult=1.0)}
    assert names == {"adapter", "rest"}


def test_release_towers_get_gradients_and_tiny_updates():
    model = tiny_model()
    model.train()
    opt = torch.optim.AdamW(optimizer_groups(model, 3e-5, tower_lr_mult=0.0, adapter_lr_mult=0.0), lr=1e-4)
    sched = WarmupCosineSchedule(opt, 1e-4, 100, 0, 1.0, 1e-6)
    sched.set_iteration(50)  # tower rate: 1e-6 * (1 - cos(pi / 2)) / 2 = 5e-7
    before = model.image_tower.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    (out["logits"].square().mean() + out["score_logits"].square().mean()).backward()
    grads = [p.grad for p in model.image_tower.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    opt.step()
    moved = max(float((model.image_tower.state_dict()[k] - v).abs().max()) for k, v in before.items())
    # Adam's first step moves each weight by at most its rate (plus decay and float32 rounding of w ~ 1)
    assert 0 < moved <= 5e-7 * 1.2


# ============================================================= 2. BatchNorm in train mode
def test_bn_statistics_move_in_train_mode_unless_bn_eval():
    for bn_eval, should_move in ((False, True), (True, False)):
        model = tiny_model(bn_eval=bn_eval, drop_path_rate=0.0)
        model.train()
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns
        before = [bn.running_mean.clone() for bn in bns]
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
        moved = any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
        assert moved == should_move
        assert all(bn.training == should_move for bn in bns)


# ============================================================= 6. class names
def test_release_prompts_the_raw_names_and_plus_the_readable_ones():
    assert tiny_model().class_names == ["background", "cat", "diningtable"]
    assert tiny_model(readable_names=True).class_names == ["background", "cat", "dining table"]


# ============================================================= 9. the boundary loss's CRF target
def _photo(h=96, w=128):
    """A photo-like RGB image: smooth gradients, two shapes with edges, mild noise."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + 0.8 * xx, 90 + 0.5 * yy, 140 - 0.3 * xx], -1).astype(np.float32)
    img[(yy - 40) ** 2 + (xx - 50) ** 2 < 25 ** 2] = (220, 40, 40)
    img[60:90, 80:120] = (30, 200, 60)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255)


def test_release_crf_image_is_corner_aligned_and_truncated():
    img = torch.from_numpy(_photo()).permute(2, 0, 1)[None].float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    norm = (img - mean) / std
    got = release_crf_image(norm, (16, 16), mean, std)
    assert got.shape == (1, 16, 16, 3) and got.dtype == np.uint8
    # independent: corner-aligned bilinear (align_corners=True) and truncation toward zero
    ref = F.interpolate(norm.double(), size=(16, 16), mode="bilinear", align_corners=True)
    ref = (ref * std.double() + mean.double())[0].permute(1, 2, 0).numpy()
    expected = np.trunc(ref).astype(np.uint8)
    diff = np.abs(got[0].astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97  # float32 vs float64 at integer boundaries
    # the corners are the image's corners (corner-aligned), which a half-pixel resize would not give
    assert np.abs(got[0, 0, 0].astype(int) - np.trunc(_photo()[0, 0]).astype(int)).max() <= 1
    assert np.abs(got[0, -1, -1].astype(int) - np.trunc(_photo()[-1, -1]).astype(int)).max() <= 1


def test_release_crf_target_equals_pydensecrf_on_the_floored_probs():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 3, 16, 16)
    probs = softmax_probs(logits)
    images = torch.from_numpy(np.stack([_photo(), _photo()[::-1].copy()])).permute(0, 3, 1, 2).float()
    crit = WeakCLIPLoss(loss_size=16)
    small = release_crf_image(images, (16, 16))
    q = crit.crf_target_release(probs, small)
    for b in range(2):
        p = probs[b].numpy().astype(np.float32).copy()
        p[p < 1e-4] = 1e-4
        d = dcrf.DenseCRF2D(16, 16, 3)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p)))
        d.addPairwiseGaussian(sxy=TRAIN_CRF.gaussian_sxy, compat=TRAIN_CRF.gaussian_compat)
        d.addPairwiseBilateral(sxy=TRAIN_CRF.bilateral_sxy, srgb=TRAIN_CRF.bilateral_srgb,
                               rgbim=np.ascontiguousarray(small[b]), compat=TRAIN_CRF.bilateral_compat)
        ref = np.array(d.inference(10), dtype=np.float64).reshape(3, 16, 16)
        ref = np.maximum(ref, 1e-4)
        ref /= ref.sum(0, keepdims=True)
        np.testing.assert_allclose(q[b].numpy(), ref, rtol=1e-5, atol=1e-7)
    # the full loss in release mode runs, and differs from the fast mode's target
    seeds = torch.randint(0, 3, (2, 32, 32))
    out = crit(logits, torch.randn(2, 3, 8, 8), seeds, images)
    fast = WeakCLIPLoss(loss_size=16, boundary_crf="fast")(logits, torch.randn(2, 3, 8, 8), seeds, images)
    assert torch.isfinite(out["boundary"])
    assert out["boundary"].item() != pytest.approx(fast["boundary"].item())


# ============================================================= 12. the concatenated training set
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("fid"), n_train=6, n_val=3, image_size=(48, 64))


def test_concatenated_splits_repeat_images(synth):
    train = build_dataset("folder", synth, split="train")
    both = build_dataset("folder", synth, split="train+val+train")
    assert len(both) == 2 * len(train) + 3
    assert both.ids[: len(train)] == train.ids and both.ids[-len(train):] == train.ids
    np.testing.assert_array_equal(both[len(train) + 3 + 1]["image"], train[1]["image"])
    np.testing.assert_array_equal(both.get_labels(len(train) + 3 + 2), train.get_labels(2))
    with pytest.raises(Exception, match="bad split"):
        build_dataset("folder", synth, split="train+")


# ============================================================= 14. sliding window: logits averaged, any size
class FixedLogits(torch.nn.Module):
    """Logits that depend on the window's position in the image (via its pixels) and its size."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.batches = []
        self.w = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0], [-1.5, 0.2, 2.0]]))

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        self.batches.append(x.shape[0])
        logits = torch.einsum("kc,bchw->bkhw", self.w, x) * (1 + x.shape[-1] / 100)
        return {"logits": logits[:, :, ::2, ::2]}


def test_windows_average_logits_then_softmax_and_take_any_size():
    torch.manual_seed(0)
    model = FixedLogits()
    image = torch.randn(1, 3, 40, 70)
    got = slide_inference(model, image, 3, crop=32, stride=21)
    assert set(model.sizes) == {(32, 32)}  # windows of the crop size, no padding
    # by hand: each window's logits resized to the window, summed, divided by the count
    acc = torch.zeros(1, 3, 40, 70)
    count = torch.zeros(1, 1, 40, 70)
    for y1 in (0, 8):
        for x1 in (0, 21, 38):
            win = image[:, :, y1:y1 + 32, x1:x1 + 32]
            logits = F.interpolate(model(win)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
            acc[:, :, y1:y1 + 32, x1:x1 + 32] += logits
            count[:, :, y1:y1 + 32, x1:x1 + 32] += 1
    torch.testing.assert_close(got, acc / count)
    probs = slide_inference(model, image, 3, crop=32, stride=21, average="probs")
    assert not torch.allclose(probs, (acc / count).softmax(1), atol=1e-4)  # the plus mode differs
    small = slide_inference(model, image[:, :, :40, :50], 3, crop=48, stride=32)
    assert small.shape == (1, 3, 40, 50) and model.sizes[-1] == (40, 48)  # no padding to a multiple of 32
    tiny = slide_inference(model, image[:, :, :20, :30], 3, crop=48, stride=32)
    assert tiny.shape == (1, 3, 20, 30) and model.sizes[-1] == (32, 32)  # under 32 px: padded, then cropped


def test_multiscale_softmax_after_resizing_the_averaged_logits():
    torch.manual_seed(0)
    model = FixedLogits()
    image = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    got = multiscale_inference(model, image, scales=(1.0,), flip=True, crop=32, stride=21,
                               mean=(0, 0, 0), std=(255, 255, 255), base_scale=(50, 30), num_classes=3)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    plain = slide_inference(model, x, 3, crop=32, stride=21).softmax(1)
    flipped = slide_inference(model, x.flip(-1), 3, crop=32, stride=21).softmax(1).flip(-1)
    torch.testing.assert_close(got, ((plain + flipped) / 2)[0])


# ============================================================= 15. unrestricted pseudo masks: argmax classes
def test_unrestricted_masks_keep_the_argmax_classes_unnormalised():
    probs = np.zeros((5, 2, 3), np.float32)
    probs[0] = 0.5
    probs[3, 0] = 0.45
    probs[4, 1] = 0.2
    probs[2, 0, 0] = 0.55
    probs[1] = 1 - probs.sum(0)
    keys, kept = argmax_probs(probs)
    assert keys.tolist() == [0, 2]
    np.testing.assert_array_equal(kept, probs[[0, 2]])  # as they are: no renormalisation


# ============================================================= 17. COCO's 91-id label space
def test_coco_91_label_space_round_trip():
    assert len(COCO91_CLASSES) == 91
    assert COCO91_CLASSES[12] == "street sign" and COCO91_CLASSES[90] == "toothbrush"
    mask = np.arange(81, dtype=np.uint8).reshape(9, 9)
    mask[0, 0] = 255
    ids = coco_to_91(mask)
    for c in range(1, 81):
        assert COCO91_CLASSES[ids.flat[c]] == COCO_CLASSES[c]
    np.testing.assert_array_equal(coco_to_81(ids), mask)
    assert ids[0, 0] == 255 and coco_to_81(np.array([12, 26, 83], np.uint8)).tolist() == [255, 255, 255]


# ============================================================= 16. periodic evaluation, best checkpoint
def test_periodic_evaluation_keeps_the_best_checkpoint(synth, tmp_path):
    cfg = apply_overrides(load_preset("voc"), [
        "data.kind=folder", f"data.root={synth}", "data.split=train", "data.crop_size=48",
        "data.scale=64,48", "data.ratio_range=0.75,1.5", "data.num_workers=0", "model.clip_arch=tiny",
        "model.out_blocks=1,2,3,4", "model.neck_channels=16", "model.head_channels=16",
        "model.match_width=16", "model.match_layers=1", "train.iters=4", "train.batch_size=2",
        "train.warmup_iters=1", "train.lr=1e-3", "train.checkpoint_every=2", "train.log_every=1",
        "train.eval_every=2", "train.eval_split=val", "train.eval_max_images=2", "loss.loss_size=16",
        "pseudo.crop=48", "pseudo.stride=32", "pseudo.base_scale=64,48", "classes=none",
    ])
    with pytest.raises(WeakclipError, match="needs an evaluator"):
        train(cfg, tmp_path / "w", device="cpu", progress=False)
    part = train(cfg, tmp_path / "w", device="cpu", progress=False, max_iters_this_run=2,
                 evaluator=build_evaluator)
    assert part["best"]["iteration"] == 2
    rest = train(cfg, tmp_path / "w", device="cpu", progress=False, resume=True, evaluator=build_evaluator)
    with open(tmp_path / "w" / "eval.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iter"]) for r in rows] == [2, 4]
    mious = [float(r["miou"]) for r in rows]
    assert all(0.0 <= m <= 1.0 for m in mious)
    best = load_checkpoint(best_checkpoint_path(tmp_path / "w"))
    assert best["miou"] == pytest.approx(max(mious), abs=1e-6) and rest["best"]["miou"] == best["miou"]
    assert best["iteration"] == [2, 4][int(np.argmax(mious))]
    assert any(k.startswith("head.") for k in best["model"])


def test_release_checkpoints_hold_the_trained_towers_and_load_without_weights(synth, tmp_path):
    from weakclip.inference.loading import load_trained_model
    from weakclip.models.clip import get_arch, make_open_clip_model

    weights = tmp_path / "tiny.pt"
    torch.save(make_open_clip_model(get_arch("tiny")).state_dict(), weights)
    cfg = apply_overrides(load_preset("voc"), [
        "data.kind=folder", f"data.root={synth}", "data.split=train", "data.crop_size=48",
        "data.scale=64,48", "data.num_workers=0", "model.clip_arch=tiny", "model.out_blocks=1,2,3,4",
        "model.neck_channels=16", "model.head_channels=16", "model.match_width=16", "model.match_layers=1",
        "train.iters=2", "train.batch_size=2", "train.warmup_iters=0", "train.log_every=1",
        "loss.loss_size=16", "classes=none",
    ])
    summary = train(cfg, tmp_path / "w", clip_weights=weights, device="cpu", progress=False)
    state = load_checkpoint(summary["checkpoint"])["model"]
    original = make_open_clip_model(get_arch("tiny"))
    original.load_state_dict(torch.load(weights))
    prefix = "image_tower.visual."
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert tower and any(not torch.equal(v, original.visual.state_dict()[k]) for k, v in tower.items())
    weights.unlink()  # the checkpoint alone suffices
    model, _ = load_trained_model(tmp_path / "w")
    assert torch.equal(model.image_tower.visual.conv1.weight, tower["conv1.weight"])


def test_clip_es_seeds_know_the_release_coco_space():
    from weakclip.seeds.clip_es import ClipEsConfig
    from weakclip.seeds.names import COCO_NAMES, prompt_vocabulary

    vocab = prompt_vocabulary(COCO91_CLASSES)
    names, theirs = list(vocab.names), vocab.clip_es
    assert theirs and len(names) == 90
    by_id = dict(zip(COCO91_CLASSES[1:], names))
    assert [by_id[c] for c in COCO_CLASSES[1:]] == list(COCO_NAMES)  # CLIP-ES's names on the 80 classes
    assert by_id["street sign"] == "street sign"
    assert ClipEsConfig().for_classes(COCO91_CLASSES).box_threshold == 0.7


def test_flips_share_window_batches_with_the_same_result():
    torch.manual_seed(0)
    model = FixedLogits()
    image = (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)
    kw = dict(scales=(1.0, 0.5), flip=True, crop=32, stride=21, mean=(0, 0, 0), std=(255, 255, 255),
              base_scale=(90, 70), num_classes=3)
    one = multiscale_inference(model, image, window_batch=1, **kw)
    assert max(model.batches) == 1  # the release: one window at a time
    model.batches.clear()
    many = multiscale_inference(model, image, window_batch=8, **kw)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    assert max(model.batches) == 8  # 4 windows of the image and the same 4 of its flip
