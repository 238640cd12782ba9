"""Sliding-window / multi-scale inference, pseudo masks (resume, labels, CRF, corrupt images) and predict.

One tiny model (the test-only "tiny" CLIP arch with small matching/neck/head) is trained for a few
iterations on the synthetic dataset with the real engine, once per module, and reused by every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from weakclip.cli import main
from weakclip.config import Config, PseudoMaskConfig
from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import WeakclipError
from weakclip.inference.loading import load_trained_model
from weakclip.inference.pseudo_masks import SUMMARY_NAME, generate_pseudo_masks, restrict_probs
from weakclip.inference.sliding import multiscale_inference, slide_inference, window_grid
from weakclip.models.clip import get_arch, make_open_clip_model
from weakclip.models.weakclip import ModelConfig

# Small and fast: one 64x64 window per 48x64 image at scale 1.0 of base (64, 48).
TTA = dict(scales=(1.0,), flip=True, crop=64, stride=43, base_scale=(64, 48))


def settings(**changes) -> PseudoMaskConfig:
    """The pseudo-mask section of the tests: TTA above, the VOC CRF, plus ``changes``."""
    return PseudoMaskConfig(**{**TTA, "crf": "voc", **changes})
CLI_TTA = ["--scales", "1.0", "--base-scale", "64", "48", "--crop", "64", "--stride", "43"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(dataset root, CLIP weights file, work folder) of a tiny model trained for a few iterations."""
    base = tmp_path_factory.mktemp("inference")
    root = make_synthetic_dataset(base / "data", n_train=5, n_val=0, image_size=(48, 64), n_classes=3)
    weights = base / "tiny_clip.pt"
    torch.manual_seed(0)
    torch.save(make_open_clip_model(get_arch("tiny")).state_dict(), weights)
    from weakclip.engine.trainer import train

    cfg = Config()
    # frozen towers (the -plus switch): the checkpoint leaves them out and records the weights file
    cfg.model = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), drop_path_rate=0.0, match_width=32,
                            match_heads=2, match_layers=1, neck_channels=32, head_channels=32,
                            freeze_towers=True)
    cfg.data.kind = "folder"
    cfg.data.root = str(root)
    cfg.data.split = "train"
    cfg.data.crop_size = 64
    cfg.data.scale = (64, 48)
    cfg.data.num_workers = 0
    cfg.train.iters = 24
    cfg.train.batch_size = 2
    cfg.train.warmup_iters = 2
    cfg.train.lr = 1e-3
    cfg.train.checkpoint_every = 24
    cfg.train.amp = "none"
    cfg.loss.loss_size = 32  # the boundary loss's exact CRF is O((size^2)^2): keep the test fast
    workdir = base / "work"
    train(cfg, workdir, clip_weights=weights, device="cpu", progress=False)
    return root, weights, workdir


@pytest.fixture(scope="module")
def model_and_data(trained):
    root, weights, workdir = trained
    model, cfg = load_trained_model(workdir, weights)
    dataset = build_dataset("folder", root, split="train")
    return model, cfg, dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != SUMMARY_NAME}


# ------------------------------------------------------------------------------------- sliding window
class PixelwiseModel(nn.Module):
    """Translation-equivariant by construction (a 1x1 convolution): windows cannot change the result."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_classes, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def test_windows_cover_every_pixel_and_pixelwise_model_is_unchanged():
    for h, w, crop, stride in [(100, 150, 64, 43), (64, 64, 64, 43), (30, 200, 64, 43), (513, 700, 512, 341)]:
        count = np.zeros((h, w), int)
        for y1, y2, x1, x2 in window_grid(h, w, crop, stride):
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1
    model = PixelwiseModel().eval()
    x = torch.randn(1, 3, 100, 150)
    expected = model(x)["logits"]
    got = slide_inference(model, x, 3, crop=64, stride=43, window_batch=3)  # the release: mean logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got = slide_inference(model, x, 3, crop=64, stride=43, window_batch=3, average="probs", size_divisor=32)
    torch.testing.assert_close(got, expected.softmax(1), rtol=1e-5, atol=1e-6)


def test_crop_covering_the_image_equals_one_forward(model_and_data):
    model, _, _ = model_and_data
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        logits = model(x)["logits"]
        expected = nn.functional.interpolate(logits, size=(64, 96), mode="bilinear")
    got = slide_inference(model, x, model.num_classes, crop=128, stride=85)
    torch.testing.assert_close(got, expected)
    got = slide_inference(model, x, model.num_classes, crop=128, stride=85, average="probs")
    torch.testing.assert_close(got, expected.softmax(1))


def test_multiscale_is_a_distribution_of_the_original_size(model_and_data):
    model, _, _ = model_and_data
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    probs = multiscale_inference(model, image, scales=(0.5, 1.0, 1.5), flip=True, crop=64, stride=43,
                                 base_scale=(64, 48))
    assert probs.shape == (model.num_classes, 37, 53)
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))
    assert float(probs.min()) >= 0


def test_restrict_probs_keeps_background_and_labels_only():
    probs = np.random.default_rng(1).dirichlet(np.ones(5), size=(6, 7)).transpose(2, 0, 1).astype(np.float32)
    keys, kept = restrict_probs(probs, [0, 0, 1, 0, 1])
    assert keys.tolist() == [0, 2, 4]
    np.testing.assert_allclose(kept.sum(0), 1.0, rtol=1e-5)
    assert set(np.unique(keys[kept.argmax(0)])) <= {0, 2, 4}


# ------------------------------------------------------------------------------------------ pseudo masks
def test_pseudo_masks_crf_on_and_off_labels_and_scores(model_and_data, tmp_path):
    model, _, dataset = model_and_data
    on = generate_pseudo_masks(model, dataset, tmp_path / "crf",
                               settings(crf_workers=1, restrict_to_labels=True), save_probs=True,
                               progress=False)
    off = generate_pseudo_masks(model, dataset, tmp_path / "plain",
                                settings(crf="none", restrict_to_labels=True), progress=False)
    assert on["written"] == off["written"] == len(dataset) and on["failed"] == 0
    for i, ident in enumerate(dataset.ids):
        allowed = set(np.flatnonzero(dataset.get_labels(i)).tolist())
        h, w = np.asarray(Image.open(dataset.image_path(i))).shape[:2]
        for path in (tmp_path / "crf" / f"{ident}.png", tmp_path / "crf" / "no_crf" / f"{ident}.png",
                     tmp_path / "plain" / f"{ident}.png"):
            mask = read_label_png(path, expected_hw=(h, w))
            assert set(np.unique(mask).tolist()) <= allowed, path
        with np.load(tmp_path / "crf" / "probs" / f"{ident}.npz") as z:
            assert z["probs"].dtype == np.float16 and set(z["keys"].tolist()) == allowed
            assert z["probs"].shape == (len(allowed), h, w)
        assert (tmp_path / "plain" / f"{ident}.png").read_bytes() == \
            (tmp_path / "crf" / "no_crf" / f"{ident}.png").read_bytes()
    assert not (tmp_path / "plain" / "no_crf").exists()
    for key in ("miou_before_crf", "miou_after_crf", "crf_seconds_per_image", "model_seconds_per_image"):
        assert on[key] is not None and np.isfinite(on[key]), key
    assert set(on["scores"]) == {"before_crf", "after_crf"}
    assert on["miou_before_crf"] == pytest.approx(off["miou"])
    saved = json.loads((tmp_path / "crf" / SUMMARY_NAME).read_text())
    assert saved["miou_after_crf"] == pytest.approx(on["miou_after_crf"])


def test_crf_where_the_probabilities_are_gives_the_worker_pool_result(model_and_data, tmp_path):
    """The inline CRF on the probabilities' device (the GPU path; here the CPU) writes the same masks."""
    model, _, dataset = model_and_data
    kw = dict(save_probs=True, progress=False)
    pool = generate_pseudo_masks(model, dataset, tmp_path / "pool", settings(crf_workers=1), **kw)
    inline = generate_pseudo_masks(model, dataset, tmp_path / "inline", settings(), crf_on_device=True, **kw)
    assert _files(tmp_path / "inline") == _files(tmp_path / "pool")
    assert inline["miou_after_crf"] == pytest.approx(pool["miou_after_crf"])
    assert inline["crf_seconds_per_image"] is not None


def test_crf_on_the_device_runs_batched_over_images_of_one_size(model_and_data, tmp_path, monkeypatch):
    """The GPU path (``crf_backend: auto`` on CUDA is our lattice where the model runs), here on the CPU
    with the lattice named: the images of a group that share their size and class count go through one
    dense_crf call, and the masks equal those of one image at a time."""
    from collections import Counter

    import weakclip.inference.pseudo_masks as pm

    model, _, dataset = model_and_data
    calls = []
    real = pm.dense_crf

    def recorded(probs, images, params, backend="auto"):
        calls.append((probs.shape[0], backend))
        return real(probs, images, params, backend=backend)

    monkeypatch.setattr(pm, "dense_crf", recorded)
    one = generate_pseudo_masks(model, dataset, tmp_path / "one",
                                settings(restrict_to_labels=True, crf_backend="lattice"), progress=False)
    assert calls == [(1, "lattice")] * len(dataset)
    assert one["settings"]["crf_on_device"] and one["settings"]["crf_backend"] == "lattice"
    calls.clear()
    generate_pseudo_masks(model, dataset, tmp_path / "group",
                          settings(restrict_to_labels=True, crf_backend="lattice", image_batch=len(dataset),
                                   window_batch=4), progress=False)
    # all images are 48 x 64: one call per number of kept classes (background + the image's labels)
    kept = Counter(int(dataset.get_labels(i).sum()) for i in range(len(dataset)))
    assert sorted(n for n, _ in calls) == sorted(kept.values()) and max(n for n, _ in calls) > 1
    assert _files(tmp_path / "group") == _files(tmp_path / "one")
    # "auto" on a GPU is the lattice, inline; the release's pydensecrf stays in the CPU workers
    monkeypatch.setattr(pm, "choose_backend", lambda device, h, w: "lattice")
    auto = generate_pseudo_masks(model, dataset, tmp_path / "auto", settings(crf_backend="auto"),
                                 progress=False)
    assert auto["settings"]["crf_on_device"] and auto["settings"]["crf_backend"] == "lattice"
    release = generate_pseudo_masks(model, dataset, tmp_path / "release", settings(crf_workers=1),
                                    progress=False)
    assert not release["settings"]["crf_on_device"] and release["settings"]["crf_backend"] == "pydensecrf"


def test_resume_after_a_kill_gives_the_identical_output_set(model_and_data, tmp_path):
    model, _, dataset = model_and_data
    kw = dict(save_probs=True, progress=False)
    full = generate_pseudo_masks(model, dataset, tmp_path / "full", settings(crf_workers=0), **kw)
    first = generate_pseudo_masks(model, dataset, tmp_path / "resumed", settings(crf_workers=1), limit=2,
                                  **kw)
    assert first["written"] == 2 and not first["complete"]
    # a kill can also leave a mask without its CRF output: the id is simply redone
    (tmp_path / "resumed" / f"{dataset.ids[1]}.png").unlink()
    second = generate_pseudo_masks(model, dataset, tmp_path / "resumed", settings(crf_workers=1), **kw)
    assert second["skipped_existing"] == 1 and second["written"] == len(dataset) - 1 and second["complete"]
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
    assert second["miou_after_crf"] == pytest.approx(full["miou_after_crf"])


def test_images_sharing_window_batches_write_the_same_masks(model_and_data, tmp_path):
    """image_batch and window_batch (the -plus speed switches) change no mask; a limit inside a group of
    images still stops at the limit."""
    model, _, dataset = model_and_data
    one = generate_pseudo_masks(model, dataset, tmp_path / "one", settings(crf_workers=0), progress=False)
    many = generate_pseudo_masks(model, dataset, tmp_path / "many",
                                 settings(crf_workers=1, image_batch=3, window_batch=4), progress=False)
    assert many["written"] == len(dataset) == 5
    assert _files(tmp_path / "many") == _files(tmp_path / "one")
    assert many["miou_after_crf"] == pytest.approx(one["miou_after_crf"])
    assert many["window_batch"] == 4 and one["window_batch"] == 1
    assert many["settings"]["image_batch"] == 3
    part = generate_pseudo_masks(model, dataset, tmp_path / "part", settings(crf="none", image_batch=4),
                                 limit=2, progress=False)
    assert part["written"] == 2 and not part["complete"]
    assert len(list((tmp_path / "part").glob("*.png"))) == 2


def _corrupt_copy(root: Path, dest: Path) -> tuple[Path, str]:
    shutil.copytree(root, dest)
    victim = sorted((dest / "images").iterdir())[2]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return dest, victim.stem


def test_pseudo_masks_command_reports_and_skips_a_corrupt_image(trained, tmp_path, capsys):
    root, weights, workdir = trained
    data, bad = _corrupt_copy(root, tmp_path / "data")
    out = tmp_path / "out"
    argv = ["pseudo-masks", "--checkpoint", str(workdir), "--clip-weights", str(weights), "--data-root",
            str(data), "--split", "train", "--out", str(out), "--crf-workers", "0", "--quiet", *CLI_TTA]
    assert main(argv + ["--image-batch", "3"]) == 1  # the bad image falls in the first group
    captured = capsys.readouterr()
    assert bad in captured.err and "mIoU before CRF" in captured.out and "1 failed" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"weakclip pseudo-masks: 1 failed (of 5 images): {bad}")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["failed"] == 1 and list(summary["failures"]) == [bad]
    assert summary["written"] == 4 and not (out / f"{bad}.png").exists()
    # running again skips what exists and still reports the bad image
    assert main(argv + ["--no-restrict"]) == 1
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["skipped_existing"] == 4 and list(summary["failures"]) == [bad]


# --------------------------------------------------------------------------------------------- predict
def test_predict_writes_masks_and_overlays(trained, tmp_path, capsys):
    root, weights, workdir = trained
    images = sorted((root / "images").iterdir())[:2]
    out = tmp_path / "pred"
    argv = ["predict", *map(str, images), "--checkpoint", str(workdir), "--clip-weights", str(weights),
            "--out", str(out), "--quiet", *CLI_TTA]
    assert main(argv + ["--labels", "disk, Square"]) == 0
    for img in images:
        w, h = Image.open(img).size
        overlay = Image.open(out / f"{img.stem}_overlay.png")
        overlay.load()
        assert overlay.format == "PNG" and overlay.size == (3 * w, h) and overlay.mode == "RGB"
        mask = read_label_png(out / f"{img.stem}.png", expected_hw=(h, w))
        assert set(np.unique(mask).tolist()) <= {0, 1, 2}
        assert np.array_equal(np.asarray(overlay)[:, :w], np.asarray(Image.open(img).convert("RGB")))
    assert main(argv + ["--out", str(tmp_path / "all")]) == 0  # without --labels: every class
    assert len(list((tmp_path / "all").glob("*_overlay.png"))) == 2
    # the checkpoint's pseudo-mask settings with flags on top: the CRF on, windows in pairs
    assert main(argv + ["--labels", "disk", "--crf", "auto", "--window-batch", "2", "--out",
                        str(tmp_path / "crf")]) == 0
    for img in images:
        w, h = Image.open(img).size
        mask = read_label_png(tmp_path / "crf" / f"{img.stem}.png", expected_hw=(h, w))
        assert set(np.unique(mask).tolist()) <= {0, 1}
    capsys.readouterr()
    assert main(argv + ["--window-batch", "-1"]) == 2
    assert "window_batch must be >= 0" in capsys.readouterr().err

    assert main(argv + ["--labels", "disc,sqare"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown label 'disc'" in err and "disk" in err


def test_loading_finds_recorded_clip_weights_or_says_to_pass_them(trained, tmp_path):
    _, weights, workdir = trained
    model, cfg = load_trained_model(workdir)  # the checkpoint records the weights file it was trained with
    assert not model.training and model.num_classes == len(cfg.classes) == 4
    from weakclip.engine.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(workdir), map_location="cpu", weights_only=False)
    state["clip_weights"] = str(tmp_path / "moved_away.pt")
    torch.save(state, tmp_path / "moved.pth")
    with pytest.raises(WeakclipError, match="--clip-weights") as info:
        load_trained_model(tmp_path / "moved.pth")
    assert "\n" not in str(info.value) and "moved_away.pt" in str(info.value)
    model, _ = load_trained_model(tmp_path / "moved.pth", weights)
    assert model.num_classes == 4
    # a checkpoint trained without a weights file carries the towers itself: no weights needed
    state["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    state["clip_weights"] = None
    torch.save(state, tmp_path / "whole.pth")
    whole, _ = load_trained_model(tmp_path / "whole.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(whole(x)["logits"], model(x)["logits"])


def test_torchrun_shards_give_the_same_masks_and_one_summary(trained, model_and_data, tmp_path):
    """Two gloo processes under torchrun split the ids; files and merged scores equal a single run."""
    import os
    import subprocess
    import sys

    root, weights, workdir = trained
    model, _, dataset = model_and_data
    single = generate_pseudo_masks(model, dataset, tmp_path / "single", settings(crf_workers=0),
                                   progress=False)
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "weakclip", "pseudo-masks", "--checkpoint", str(workdir), "--clip-weights", str(weights),
           "--data-root", str(root), "--split", "train", "--out", str(out), "--device", "cpu",
           "--crf-workers", "1", "--quiet", *CLI_TTA]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _files(out) == _files(tmp_path / "single")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["processes"] == 2 and summary["written"] == len(dataset)
    assert summary["miou_after_crf"] == pytest.approx(single["miou_after_crf"])
    assert summary["miou_before_crf"] == pytest.approx(single["miou_before_crf"])


def test_predict_of_the_refinement_model_equals_its_pseudo_masks(trained, model_and_data, tmp_path):
    """``weakclip.load(...).predict`` with the pseudo section's settings (the release's: no label
    restriction, the CRF over the argmax's classes) writes what the pseudo-mask stage writes, and with labels
    what the stage writes with ``restrict_to_labels``."""
    import weakclip

    root, weights, workdir = trained
    model, _, dataset = model_and_data
    seg = weakclip.load(workdir, "cpu", clip_weights=weights).configure(**TTA, crf="voc")
    images = [dataset.read_image(i) for i in range(len(dataset))]
    for restrict in (False, True):
        out = tmp_path / f"stage_{restrict}"
        generate_pseudo_masks(model, dataset, out, settings(crf_workers=0, restrict_to_labels=restrict),
                              progress=False)
        for i, ident in enumerate(dataset.ids):
            labels = None
            if restrict:
                labels = [dataset.classes[c] for c in np.flatnonzero(dataset.get_labels(i))[1:]]
            np.testing.assert_array_equal(seg.predict(images[i], labels=labels or None),
                                          read_label_png(out / f"{ident}.png"))
