import csv
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakclip.cli import main
from weakclip.config import apply_overrides, load_preset
from weakclip.data.datasets import build_dataset
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.data.transforms import CLIP_MEAN, CLIP_STD
from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint, load_trainable_state_dict
from weakclip.engine.sampling import GlobalBatchSampler
from weakclip.engine.schedule import WarmupCosineSchedule, lr_at
from weakclip.engine.trainer import train
from weakclip.metrics import ConfusionMatrix
from weakclip.models import clip_arch as clip_module
from weakclip.models.clip import CLIP_ARCHS, ClipArch

# Test-only CLIP shape: patch 8, so a 64-96 px crop gives an 8-12 token grid; random weights.
TEST_ARCH = ClipArch("test-p8", 64, 8, 64, 4, 2, 32, 32, 2, 2, out_blocks=(1, 2, 3, 4))


def register_test_arch() -> str:
    CLIP_ARCHS[TEST_ARCH.name] = TEST_ARCH
    clip_module._ALIASES[clip_module._alias_key(TEST_ARCH.name)] = TEST_ARCH.name
    return TEST_ARCH.name


def small_config(root, *extra, arch="tiny", crop=64, iters=6, batch=2):
    """A folder-dataset config with a small model (random CLIP) on the synthetic data."""
    return apply_overrides(load_preset("voc"), [
        "data.kind=folder", f"data.root={root}", "data.split=train", f"data.crop_size={crop}",
        f"data.scale={int(crop * 1.5)},{crop}", "data.ratio_range=0.75,1.5", "data.num_workers=0",
        f"model.clip_arch={arch}", "model.out_blocks=1,2,3,4", "model.neck_channels=32",
        "model.head_channels=32", "model.match_width=32", "model.match_layers=1",
        f"train.iters={iters}", f"train.batch_size={batch}", "train.warmup_iters=2",
        "train.checkpoint_every=1000", "train.log_every=1", "loss.loss_size=16", "classes=none",
        *extra,
    ])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=8, n_val=0, image_size=(64, 96))


# ====================================================================== schedule
def test_schedule_hand_computed_values():
    kw = dict(base_lr=1e-4, total_iters=20000, warmup_iters=1500, warmup_ratio=1e-6, min_lr=1e-6)
    # it = 0: the cosine is at its peak, scaled by warmup_ratio
    assert lr_at(0, **kw) == pytest.approx(1e-10, rel=1e-9)
    # half-way through the warm-up: cos term 9.96584...e-5 x (1 - 0.5 x (1 - 1e-6))
    assert lr_at(750, **kw) == pytest.approx(4.9828494138e-05, rel=1e-9)
    # end of the warm-up: 1e-6 + 9.9e-5 x (1 + cos(0.075 pi)) / 2
    assert lr_at(1500, **kw) == pytest.approx(9.8632311060e-05, rel=1e-9)
    # half-way through the whole schedule (cos(pi/2) = 0): the midpoint of lr and min_lr
    assert lr_at(10000, **kw) == pytest.approx((1e-4 + 1e-6) / 2, rel=1e-12)
    # the end: min_lr
    assert lr_at(20000, **kw) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(19999, **kw) > 1e-6
    values = [lr_at(i, **kw) for i in range(0, 20001, 100)]
    peak = int(np.argmax(values))
    assert values[peak] == pytest.approx(lr_at(1500, **kw))
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))


def test_scheduler_state_is_the_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = WarmupCosineSchedule(opt, 1e-4, 100, 10, 1e-3, 1e-6)
    for _ in range(37):
        sched.step()
    other = WarmupCosineSchedule(torch.optim.AdamW([p], lr=1.0), 1e-4, 100, 10, 1e-3, 1e-6)
    other.load_state_dict(sched.state_dict())
    assert sched.state_dict() == {"iteration": 37}
    assert other.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == lr_at(
        37, base_lr=1e-4, total_iters=100, warmup_iters=10, warmup_ratio=1e-3, min_lr=1e-6)


# ====================================================================== data order
def test_global_batches_do_not_depend_on_the_process_count():
    one = GlobalBatchSampler(10, 4, seed=3)
    two = [GlobalBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for it in range(12):  # crosses several epochs
        full = one.local_batch(it)
        assert two[0].local_batch(it) + two[1].local_batch(it) == full
        assert [slot for _, slot, _ in full] == [0, 1, 2, 3]
    # every epoch is a permutation, and the seed changes it
    stream = [i for it in range(5) for _, _, i in one.local_batch(it)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream != [i for it in range(5) for _, _, i in GlobalBatchSampler(10, 4, seed=4).local_batch(it)]
    # resuming at iteration 7 yields what the uninterrupted stream yields there
    resumed = iter(GlobalBatchSampler(10, 4, seed=3, start_iter=7))
    assert next(resumed) == one.local_batch(7)


# ====================================================================== resume
def _trainable(path):
    return load_checkpoint(path)["model"]


def test_resume_continues_exactly(synth, tmp_path):
    # dropout and stochastic depth stay ON: their randomness must be restored too
    cfg = small_config(synth, "train.checkpoint_every=3", "model.drop_path_rate=0.1", iters=6)
    full = train(cfg, tmp_path / "full", device="cpu", progress=False)
    part = train(cfg, tmp_path / "part", device="cpu", progress=False, max_iters_this_run=3)
    assert part["end_iter"] == 3 and not part["finished"]
    assert latest_checkpoint(tmp_path / "part").name == "iter_0000003.pth"
    rest = train(cfg, tmp_path / "part", device="cpu", progress=False, resume=True)
    assert rest["start_iter"] == 3 and rest["finished"]

    a, b = _trainable(full["checkpoint"]), _trainable(rest["checkpoint"])
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = load_checkpoint(full["checkpoint"]), load_checkpoint(rest["checkpoint"])
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [h["loss"] for h in full["history"][3:]] == [h["loss"] for h in rest["history"]]
    # the CSV log holds each iteration once
    with open(tmp_path / "part" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # the trainable parts are stored; so are the towers here, as no CLIP weights file was given
    assert any(k.startswith("head.") for k in a) and any(k.startswith("image_tower.") for k in a)
    assert ca["clip_weights"] is None


@pytest.mark.parametrize("damage", ["empty", "missing", "headerless"])
def test_resumed_log_csv_gets_its_header_back(synth, tmp_path, damage):
    from weakclip.report.analysis import read_log_csv

    cfg = small_config(synth, "train.checkpoint_every=2", iters=4)
    work = tmp_path / "w"
    train(cfg, work, device="cpu", progress=False, max_iters_this_run=2)
    log = work / "log.csv"
    header, *rows = log.read_text().splitlines()
    # killed after the checkpoint but before the log reached the disk / a log that lost its header
    {"empty": lambda: log.write_text(""), "missing": log.unlink,
     "headerless": lambda: log.write_text("\n".join(rows) + "\n")}[damage]()
    train(cfg, work, device="cpu", progress=False, resume=True)
    lines = log.read_text().splitlines()
    assert lines[0] == header
    kept = [1, 2] if damage == "headerless" else []
    assert [int(r["iter"]) for r in csv.DictReader(lines)] == [*kept, 3, 4]
    curves = read_log_csv(log)  # what the report plots
    assert curves["iter"] == [float(i) for i in (*kept, 3, 4)] and len(curves["lr"]) == len(kept) + 2


def test_a_fresh_run_refuses_a_used_workdir(synth, tmp_path):
    cfg = small_config(synth, iters=1)
    train(cfg, tmp_path / "w", device="cpu", progress=False)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg, tmp_path / "w", device="cpu", progress=False)


# ====================================================================== learning
def _predict_miou(model, dataset):
    """Full-image forward, bilinear upsampling, argmax over the image's labels (+ background)."""
    preds = ConfusionMatrix(dataset.classes)
    seeds = ConfusionMatrix(dataset.classes, unsure="background")
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            s = dataset[i]
            x = (torch.from_numpy(s["image"]).permute(2, 0, 1)[None].float() - mean) / std
            logits = F.interpolate(model(x)["logits"], size=s["image"].shape[:2], mode="bilinear",
                                   align_corners=False)
            logits[:, ~torch.from_numpy(s["labels"]).bool()] = -math.inf
            preds.update(logits.argmax(1)[0], s["gt"])
            seeds.update(s["seed"], s["gt"])
    return preds.scores().miou, seeds.scores().miou


def test_training_lowers_the_loss_and_beats_the_seeds(tmp_path):
    from weakclip.models.weakclip import build_model

    arch = register_test_arch()
    root = make_synthetic_dataset(tmp_path / "data", n_train=16, n_val=0, image_size=(64, 96))
    cfg = small_config(root, "train.lr=1e-3", "train.warmup_iters=20", "train.min_lr=1e-5",
                       "model.neck_channels=64", "model.head_channels=64", "model.match_width=64",
                       "model.drop_path_rate=0", "loss.loss_size=32", "train.log_every=20",
                       arch=arch, crop=64, iters=200, batch=4)
    t0 = time.perf_counter()
    summary = train(cfg, tmp_path / "work", device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in summary["history"]]
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))

    dataset = build_dataset("folder", root, split="train")
    model = build_model(cfg.model, dataset.classes)
    load_trainable_state_dict(model, load_checkpoint(summary["checkpoint"])["model"])
    pred_miou, seed_miou = _predict_miou(model, dataset)
    print(f"\n{len(losses)} iterations in {seconds:.0f} s; loss {first:.3f} -> {last:.3f}; "
          f"train mIoU: predictions {100 * pred_miou:.1f}% vs seeds {100 * seed_miou:.1f}%")
    assert last < 0.8 * first
    assert pred_miou > seed_miou


# ====================================================================== CLI
def _cli_args(root, workdir, *extra):
    return ["train", "--preset", "voc", "--dataset", "folder", "--data-root", str(root), "--split", "train",
            "--seeds", str(root / "seeds"), "--workdir", str(workdir), "--device", "cpu", "--quiet",
            "--iters", "3", "--batch-size", "2", "--crop-size", "64", "--num-workers", "0",
            "--set", "model.clip_arch=tiny", "--set", "model.out_blocks=1,2,3,4", "--set", "data.scale=96,64",
            "--set", "model.neck_channels=32", "--set", "model.head_channels=32",
            "--set", "loss.loss_size=16", "--set", "classes=none", *extra]


def test_cli_trains_and_writes_its_outputs(synth, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(_cli_args(synth, work, "--checkpoint-every", "2", "--lr", "2e-4", "--seed", "5")) == 0
    assert (work / "config.yaml").is_file()
    with open(work / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iter"]) for r in rows] == [3]  # log_every 50 from the preset: the last iteration
    assert set(rows[0]) >= {"iter", "lr", "loss", "seeding", "boundary", "identity", "seconds",
                            "images_per_s"}
    assert sorted(p.name for p in (work / "checkpoints").glob("*.pth")) == ["iter_0000002.pth",
                                                                            "iter_0000003.pth"]
    saved = load_preset(work / "config.yaml")
    assert (saved.train.iters, saved.train.lr, saved.train.seed, saved.data.crop_size) == (3, 2e-4, 5, 64)
    out = capsys.readouterr()
    assert "trainable" in out.out and "frozen" in out.out
    # --resume on a finished run does nothing and succeeds
    assert main(_cli_args(synth, work, "--resume")) == 0


@pytest.mark.parametrize("change, words", [
    (("--seeds", "/no/such/seeds"), "seed folder not found: /no/such/seeds"),
    (("--preset", "nonsense"), "unknown preset 'nonsense'"),
    (("--set", "train.itres=4"), "unknown config key 'train.itres'"),
    (("--set", "train.iters=four"), "not an integer"),
    (("--data-root", "/no/such/data"), "dataset folder not found: /no/such/data"),
    (("--clip-weights", "/no/such/ViT-B-16.pt"), "CLIP weights file not found"),
])
def test_cli_bad_input_is_a_one_line_error(synth, tmp_path, capsys, change, words):
    args = _cli_args(synth, tmp_path / "w")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("weakclip train: error: ") and "\n" not in err
    assert words in err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_loop_settings_come_from_each_stages_train_section():
    from weakclip.engine.loop import LoopSettings
    from weakclip.retrain.train import load_retrain_preset

    t = load_preset("voc").train
    s = LoopSettings.from_section(t, num_workers=3)
    assert (s.iters, s.batch_size, s.seed, s.amp, s.eval_every) == (t.iters, t.batch_size, t.seed, t.amp,
                                                                     t.eval_every)
    assert (s.checkpoint_every, s.keep_checkpoints, s.log_every, s.grad_clip, s.num_workers) == (
        t.checkpoint_every, t.keep_checkpoints, t.log_every, t.grad_clip, 3)
    r = load_retrain_preset("voc").train  # retraining has no periodic evaluation: its default, 0
    s = LoopSettings.from_section(r)
    assert (s.iters, s.batch_size, s.eval_every, s.num_workers) == (r.iters, r.batch_size, 0, 0)
