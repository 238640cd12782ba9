"""Stage 4, retraining: a small randomly initialised DeepLabV3+ (ResNet-18) trained on the synthetic dataset.

The learning tests take about 12 s each on one CPU thread: 32 training images of 64x80, 64-pixel crops, batch
4, 100 iterations, random initialisation. Measured (train.seed 0 / 1): ground-truth masks -> 81% / 80% val
mIoU; block-corrupted masks of 41% mIoU -> 78% / 68% on the same images (seed 2: 71%).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png, write_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.engine.schedule import poly_lr
from weakclip.errors import DataError, WeakclipError, WeightsError
from weakclip.metrics import ConfusionMatrix
from weakclip.retrain.check import check_masks, preflight_masks
from weakclip.retrain.models import build_segmenter, load_backbone_file
from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, retrain

SMALL = ["model.name=deeplabv3plus_resnet18", "model.pretrained_backbone=false", "model.head_channels=64",
         "data.num_workers=0", "data.scale_range=0.75,1.5", "train.lr=0.01", "train.log_every=10",
         "train.checkpoint_every=1000"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a busy neighbour makes 2 OpenMP threads spin-wait
    (measured 60x slower than 1 thread); alone, 1 thread costs at most 2x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrain") / "data"
    return make_synthetic_dataset(root, n_train=32, n_val=16, image_size=(64, 80), n_classes=4, seed=0)


def small_cfg(root: Path, *extra: str):
    cfg = load_retrain_preset("voc-plus")
    return apply_retrain_overrides(cfg, ["data.kind=folder", f"data.root={root}", "data.split=train",
                                         "data.val_split=val", *SMALL, *extra])


def _miou(pred_dir: Path, root: Path, ids: list[str], classes: list[str]) -> float:
    cm = ConfusionMatrix(classes, unsure="background")
    for ident in ids:
        cm.update(read_label_png(pred_dir / f"{ident}.png"), read_label_png(root / "masks" / f"{ident}.png"))
    return 100.0 * cm.scores().miou


# ====================================================================== learning
@pytest.mark.slow
def test_trained_on_ground_truth_reaches_high_val_miou(synth, tmp_path, capsys):
    cfg = small_cfg(synth, "data.crop_size=64", "train.iters=100", "train.batch_size=4")
    work = tmp_path / "work"
    summary = retrain(cfg, synth / "masks", None, work, progress=False)
    miou = summary["eval"]["miou"]
    with capsys.disabled():
        print(f"\nval mIoU after 100 iterations on ground truth: {miou:.2f}%")
    assert miou > 65.0, miou  # measured 81%
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"] / 3
    # the workdir records the configuration, the log, the checkpoint and the evaluation
    record = json.loads((work / "eval.json").read_text())
    assert record["miou"] == pytest.approx(miou)
    assert record["images"] == 16 and record["split"] == "val" and record["scales"] == [1.0]
    assert set(record["iou"]) == {"background", "disk", "square", "triangle", "ring"}
    saved = load_retrain_preset(str(work / "config.yaml"))
    assert saved.train.iters == 100 and saved.data.masks == str(synth / "masks")
    assert (work / "checkpoints" / "latest").is_file()
    rows = (work / "log.csv").read_text().splitlines()
    assert rows[0].startswith("iter,lr,loss") and len(rows) == 1 + 10
    out = capsys.readouterr().out
    assert "mean" in out and "val mIoU" in out


def _corrupt(root: Path, out: Path, p: float = 0.3, block: int = 8, seed: int = 0) -> list[str]:
    """Replace each 8x8 block of the train masks by a random class with probability p."""
    ds = build_dataset("folder", root, split="train")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for ident in ds.ids:
        m = read_label_png(root / "masks" / f"{ident}.png").copy()
        h, w = m.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                if rng.random() < p:
                    m[y:y + block, x:x + block] = rng.integers(0, ds.num_classes)
        write_label_png(out / f"{ident}.png", m)
    return ds.ids


@pytest.mark.slow
def test_trained_on_noisy_masks_beats_them(synth, tmp_path):
    noisy = tmp_path / "noisy"
    ids = _corrupt(synth, noisy)
    classes = (synth / "classes.txt").read_text().split()
    noisy_miou = _miou(noisy, synth, ids, classes)
    # evaluate on the training images themselves, against their true masks
    cfg = small_cfg(synth, "data.crop_size=64", "train.iters=100", "train.batch_size=4",
                    "data.val_split=train")
    preds = tmp_path / "preds"
    summary = retrain(cfg, noisy, None, tmp_path / "work", progress=False, quiet=True, pred_dir=preds)
    miou = summary["eval"]["miou"]
    print(f"\nnoisy masks {noisy_miou:.2f}% -> retrained {miou:.2f}% on the same images")
    assert noisy_miou < 50.0  # measured 41%
    assert miou > noisy_miou + 15.0  # measured 78%
    assert _miou(preds, synth, ids, classes) == pytest.approx(miou, abs=1e-3)


# ====================================================================== resume
def test_resume_equals_uninterrupted_run(synth, tmp_path):
    extra = ("data.crop_size=48", "train.iters=4", "train.batch_size=2", "train.checkpoint_every=2",
             "model.head_channels=16", "train.log_every=1")
    cfg = small_cfg(synth, *extra)
    full = retrain(cfg, synth / "masks", None, tmp_path / "a", evaluate=False, progress=False, quiet=True)
    part = retrain(cfg, synth / "masks", None, tmp_path / "b", evaluate=False, progress=False, quiet=True,
                   max_iters_this_run=2)
    assert part["end_iter"] == 2 and not part["finished"]
    with pytest.raises(WeakclipError, match="already holds checkpoints"):
        retrain(cfg, synth / "masks", None, tmp_path / "b", evaluate=False, progress=False, quiet=True)
    rest = retrain(cfg, synth / "masks", None, tmp_path / "b", resume=True, evaluate=False, progress=False,
                   quiet=True)
    assert rest["start_iter"] == 2 and rest["end_iter"] == 4 and rest["finished"]
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    losses_a = [h["loss"] for h in full["history"]]
    losses_b = [h["loss"] for h in part["history"] + rest["history"]]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


# ====================================================================== bad mask folders
def _copy_masks(root: Path, dest: Path) -> Path:
    shutil.copytree(root / "masks", dest)
    return dest


def test_bad_masks_missing(synth, tmp_path):
    masks = _copy_masks(synth, tmp_path / "m")
    for ident in ("train_0003", "train_0007"):
        (masks / f"{ident}.png").unlink()
    ds = build_dataset("folder", synth, split="train", with_gt=False)
    assert check_masks(ds, masks)["missing"] == ["train_0003", "train_0007"]
    with pytest.raises(DataError, match=r"2 missing \(train_0003, train_0007\)"):
        retrain(small_cfg(synth), masks, None, tmp_path / "w", progress=False, quiet=True)
    assert not (tmp_path / "w").exists()  # reported before anything was trained or written


def test_bad_masks_wrong_size(synth, tmp_path):
    masks = _copy_masks(synth, tmp_path / "m")
    write_label_png(masks / "train_0005.png", np.zeros((32, 40), np.uint8))
    with pytest.raises(DataError, match=r"1 of the wrong size \(train_0005: 40x32, image 80x64\)"):
        retrain(small_cfg(synth), masks, None, tmp_path / "w", progress=False, quiet=True)


def test_bad_masks_values_out_of_range(synth, tmp_path):
    masks = _copy_masks(synth, tmp_path / "m")
    for ident, value in (("train_0001", 7), ("train_0002", 5)):
        m = read_label_png(masks / f"{ident}.png").copy()
        m[:4, :4] = value
        write_label_png(masks / f"{ident}.png", m)
    m = read_label_png(masks / "train_0004.png").copy()
    m[:4, :4] = 255  # ignore is fine
    write_label_png(masks / "train_0004.png", m)
    with pytest.raises(DataError, match=r"2 with values outside 0\.\.4 and 255 \(train_0001: \[7\], "
                                        r"train_0002: \[5\]\)"):
        retrain(small_cfg(synth), masks, None, tmp_path / "w", progress=False, quiet=True)


def test_bad_masks_all_problems_in_one_message(synth, tmp_path):
    masks = _copy_masks(synth, tmp_path / "m")
    for i in range(6):
        (masks / f"train_{i:04d}.png").unlink()
    write_label_png(masks / "train_0010.png", np.zeros((10, 10), np.uint8))
    (masks / "train_0011.png").write_bytes(b"not a png")
    m = read_label_png(masks / "train_0012.png").copy()
    m[0, 0] = 200
    write_label_png(masks / "train_0012.png", m)
    ds = build_dataset("folder", synth, split="train", with_gt=False)
    with pytest.raises(DataError) as info:
        preflight_masks(ds, masks)
    msg = str(info.value)
    assert "\n" not in msg and str(masks) in msg and "32 training images" in msg
    assert "6 missing (train_0000, train_0001, train_0002, train_0003, +2 more)" in msg
    assert "1 of the wrong size (train_0010: 10x10, image 80x64)" in msg
    assert "1 with values outside 0..4 and 255 (train_0012: [200])" in msg
    assert "1 unreadable (train_0011: cannot read pseudo mask" in msg
    with pytest.raises(DataError, match="pseudo-mask folder not found"):
        preflight_masks(ds, tmp_path / "nowhere")


# ====================================================================== models
@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "deeplabv3plus_resnet18", "fcn_resnet18"])
@pytest.mark.parametrize("stride", [8, 16])
def test_models_output_stride_and_shape(name, stride):
    model = build_segmenter(name, 3, pretrained_backbone=False, output_stride=stride, head_channels=16).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 50, 70)
        assert model.net.backbone(x)["out"].shape[-2:] == (-(-50 // stride), -(-70 // stride))
    groups = model.param_groups(10.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_torchvision_builder_by_name():
    model = build_segmenter("lraspp_mobilenet_v3_large", 4, pretrained_backbone=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    with pytest.raises(WeakclipError, match="unknown segmentation model 'deeplabv3_resnet10'.*did you mean"):
        build_segmenter("deeplabv3_resnet10", 4)


def test_backbone_weights_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_segmenter("deeplabv3_resnet18", 3, backbone_weights=path, head_channels=16)
    torch.testing.assert_close(model.net.backbone.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    load_backbone_file(torchvision.models.resnet18(), tmp_path / "wrapped.pth", "resnet18")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="do not fit a torchvision resnet18"):
        build_segmenter("deeplabv3_resnet18", 3, backbone_weights=tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="backbone weights file not found"):
        build_segmenter("deeplabv3_resnet18", 3, backbone_weights=tmp_path / "none.pth")


def test_offline_without_weights_names_the_file(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        build_segmenter("deeplabv3_resnet101", 21)
    msg = str(info.value)
    assert "\n" not in msg
    assert "resnet101-63fe2227.pth" in msg and "--backbone-weights" in msg and "--no-pretrained" in msg


# ====================================================================== config, schedule, CLI
def test_plus_presets_and_overrides():
    voc, coco = load_retrain_preset("voc-plus"), load_retrain_preset("COCO-plus")
    assert voc.model.name == "deeplabv3_resnet101" and voc.model.output_stride == 16
    assert (voc.train.optimizer, voc.train.lr, voc.train.head_lr_mult) == ("sgd", 1e-3, 10.0)
    assert (voc.train.iters, voc.train.batch_size, voc.data.crop_size) == (30000, 16, 512)
    assert (coco.train.iters, coco.data.kind, coco.eval.crf_params) == (80000, "coco", "coco")
    cfg = apply_retrain_overrides(voc, ["train.optimizer=adamw", "eval.scales=0.5,1.0,1.5",
                                        "train.iters=2e3"])
    assert cfg.train.optimizer == "adamw" and cfg.eval.scales == (0.5, 1.0, 1.5) and cfg.train.iters == 2000
    with pytest.raises(WeakclipError, match="did you mean train.iters"):
        apply_retrain_overrides(voc, ["train.iter=5"])
    with pytest.raises(WeakclipError, match="output_stride"):
        apply_retrain_overrides(voc, ["model.output_stride=4"])


def test_poly_schedule():
    assert poly_lr(0, base_lr=0.01, total_iters=100) == pytest.approx(0.01)
    assert poly_lr(50, base_lr=0.01, total_iters=100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(100, base_lr=0.01, total_iters=100) == 0.0


def test_cli_retrain_tiny_run(synth, tmp_path, capsys):
    from weakclip.cli import main

    work = tmp_path / "w"
    args = ["retrain", "--masks", str(synth / "masks"), "--data-root", str(synth), "--dataset", "folder",
            "--split", "train", "--val-split", "val", "--workdir", str(work), "--preset", "voc-plus",
            "--model", "deeplabv3plus_resnet18", "--no-pretrained", "--iters", "2", "--batch-size", "2",
            "--crop-size", "48", "--num-workers", "0", "--set", "model.head_channels=16", "--quiet",
            "--ms-eval", "--set", "eval.scales=0.75,1.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out and '"finished": true' in out
    record = json.loads((work / "eval.json").read_text())
    assert record["scales"] == [0.75, 1.0] and record["flip"] is True and record["crf"] is None
    assert "name: deeplabv3plus_resnet18" in (work / "config.yaml").read_text()
    # a finished workdir resumed: evaluation only, here with the dense CRF
    assert main(args + ["--resume", "--crf"]) == 0
    record = json.loads((work / "eval.json").read_text())
    assert record["crf"]["bilateral_sxy"] == 83.0
    assert main(["retrain", "--workdir", str(work), "--print-config", "--iters", "7"]) == 0
    assert "iters: 7" in capsys.readouterr().out
    assert main(["retrain", "--workdir", str(work), "--data-root", str(synth), "--dataset", "folder",
                 "--preset", "voc-plus", "--masks", str(tmp_path / "none")]) == 2
    assert "pseudo-mask folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(synth, tmp_path):
    """DDP over 2 CPU processes (gloo): the global batch is split, checkpoints and the val matrix merged."""
    import os
    import subprocess
    import sys

    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "weakclip", "retrain", "--masks", str(synth / "masks"), "--data-root", str(synth), "--dataset",
           "folder", "--split", "train", "--val-split", "val", "--workdir", str(work), "--preset", "voc-plus",
           "--model", "deeplabv3plus_resnet18", "--no-pretrained", "--iters", "2", "--batch-size", "4",
           "--crop-size", "48", "--num-workers", "0", "--set", "model.head_channels=16", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and res.stdout.count("val mIoU") == 1
    record = json.loads((work / "eval.json").read_text())
    assert record["images"] == 16 and record["iteration"] == 2
    assert (work / "checkpoints" / "iter_0000002.pth").is_file()
    state = torch.load(work / "checkpoints" / "iter_0000002.pth", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
