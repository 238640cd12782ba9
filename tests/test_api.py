"""``weakclip.load`` and ``weakclip predict`` for every network kind: retrained DeepLab-v1 ResNet-38 (narrow)
and torchvision DeepLab (ResNet-18), a ``weakclip run`` work folder, the refinement model (tiny CLIP), the
authors' released WeakCLIP and DeepLab-v1 checkpoints; predictions equal to ``retrain`` evaluation's; bad
input as one-line errors.

The retrained networks are trained for 2 iterations on a small synthetic dataset (random initialisation);
the refinement checkpoint is written without training (random tiny-CLIP model). Photos: skimage.data,
shrunk so the suite stays fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import weakclip
from weakclip.cli import main
from weakclip.config import Config, PseudoMaskConfig
from weakclip.data.io import read_image, read_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import WeakclipError

pytestmark = pytest.mark.usefixtures("one_thread")

#: Width divisor of the narrow DeepLab-v1 ResNet-38 (the authors' layout, 1/64 of the parameters).
W = 8
TINY_TTA = dict(scales=(1.0,), flip=True, crop=64, stride=43, base_scale=(64, 48))


def _retrain(root: Path, work: Path, preset: str, *extra: str) -> Path:
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, retrain

    cfg = apply_retrain_overrides(load_retrain_preset(preset), [
        "data.kind=folder", f"data.root={root}", "data.split=train", "data.val_split=val",
        "model.pretrained_backbone=false", "data.crop_size=32", "data.num_workers=0", "train.iters=2",
        "train.batch_size=2", "train.checkpoint_every=1", *extra])
    retrain(cfg, root / "masks", workdir=work, progress=False, quiet=True, pred_dir=work / "val_pred")
    return work


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_thread):
    """Data, the two retrained work folders, a refinement work folder, the release files."""
    from weakclip.models import ModelConfig, build_model
    from weakclip.models.release_checkpoint import RELEASE_VOC_CLASSES, save_release_checkpoint
    from weakclip.retrain.deeplabv1 import build_deeplabv1

    base = tmp_path_factory.mktemp("api")
    root = make_synthetic_dataset(base / "data", n_train=4, n_val=4, image_size=(40, 48), n_classes=3, seed=1)
    v1 = _retrain(root, base / "v1", "voc", f"model.width_divisor={W}")  # the release's evaluation, CRF
    tv = _retrain(root, base / "tv", "voc-plus", "model.name=deeplabv3plus_resnet18",
                  "model.head_channels=16", "eval.scales=0.75,1.0", "eval.flip=true", "eval.crf=true")
    # a refinement checkpoint as the engine writes one (towers included: no CLIP weights file)
    classes = ["background", "disk", "square", "triangle"]
    cfg = Config()
    cfg.model = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_width=32, match_heads=2,
                            match_layers=1, neck_channels=32, head_channels=32)
    cfg.data.kind, cfg.data.root, cfg.classes = "folder", str(root), classes
    cfg.pseudo = PseudoMaskConfig(**TINY_TTA, crf="none")
    model = build_model(cfg.model, classes, pretrained_download=False)
    refine = base / "refine"
    (refine / "checkpoints").mkdir(parents=True)
    torch.save({"iteration": 3, "model": model.state_dict(), "config": cfg.to_dict(), "clip_weights": None},
               refine / "checkpoints" / "iter_0000003.pth")
    release_refine = save_release_checkpoint(
        base / "train_iter_8000.pth",
        build_model(ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_mode="release"),
                    list(RELEASE_VOC_CLASSES), pretrained_download=False).eval())
    release_v1 = base / "deeplabv1_voc.pth"
    torch.save(build_deeplabv1(21, pretrained_backbone=False, width_divisor=W).net.state_dict(), release_v1)
    # a `weakclip run` work folder: its stage folders as the pipeline lays them out
    run = base / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data_root": str(root), "kind": "folder"}))
    shutil.copytree(v1, run / "retrain")
    shutil.copytree(refine, run / "refine")
    return {"root": root, "v1": v1, "tv": tv, "refine": refine, "release_refine": release_refine,
            "release_v1": release_v1, "run": run, "classes": classes}


def _photos(folder: Path, sizes=((40, 56), (40, 56), (48, 40))) -> list[Path]:
    """skimage.data photos shrunk to ``sizes`` (H, W), as JPEG/PNG files."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for (name, fmt), (h, w) in zip((("astronaut", "jpg"), ("coffee", "png"), ("chelsea", "jpg")), sizes):
        path = folder / f"{name}.{fmt}"
        Image.fromarray(getattr(data, name)()).resize((w, h), Image.BILINEAR).save(path)
        out.append(path)
    return out


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ====================================================================== every kind loads and says what it is
def test_every_kind_loads_and_says_what_it_is(made):
    cases = [(made["v1"], {}, "deeplabv1-resnet38", "DeepLab-v1 ResNet-38"),
             (made["v1"] / "checkpoints" / "iter_0000002.pth", {}, "deeplabv1-resnet38", "iteration 2"),
             (made["tv"], {}, "torchvision", "deeplabv3plus_resnet18"),
             (made["run"], {}, "deeplabv1-resnet38", "retrain stage of the weakclip run"),
             (made["run"], {"stage": "refine"}, "refinement", "refine stage of the weakclip run"),
             (made["refine"], {}, "refinement", "WeakCLIP refinement model"),
             (made["release_refine"], {}, "release-refinement", "the authors' release checkpoint"),
             (made["release_v1"], {}, "release-deeplabv1", "the authors' released checkpoint")]
    for path, kwargs, kind, words in cases:
        seg = weakclip.load(path, "cpu", **kwargs)
        assert seg.kind == kind and words in seg.description and "\n" not in seg.description, seg
        assert seg.device == torch.device("cpu") and not seg.network.training
        assert seg.palette.dtype == np.uint8 and seg.palette.shape[0] >= len(seg.classes)
        assert len(seg.mean) == len(seg.std) == 3 and seg.classes[0] == "background"
        json.dumps(seg.settings)  # JSON-able
    v1 = weakclip.load(made["v1"], "cpu")
    assert v1.classes == made["classes"]
    assert v1.settings["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5] and v1.settings["flip"] is True
    assert v1.settings["crf"] and v1.settings["crf_classes"] == "present" and v1.settings["fuse"] == "logits"
    assert v1.settings["crf_values"]["bilateral_sxy"] == 112.0  # release_voc
    release = weakclip.load(made["release_v1"], "cpu")
    assert len(release.classes) == 21 and release.classes[15] == "person"
    assert release.settings["crf_params"] == "release_voc" and release.mean[0] == pytest.approx(123.675)
    refine = weakclip.load(made["run"], "cpu", stage="refine")
    assert refine.classes == made["classes"] and refine.settings["crop"] == 64


def test_network_is_one_plain_forward_at_the_input_size(made):
    """The ``network`` contract the exporter relies on: normalised input -> logits of the input's size; with
    one scale, no flip and no CRF, predict_proba is its softmax."""
    image = read_image(sorted((made["root"] / "images").iterdir())[0])  # 40 x 48
    for path, changes in ((made["v1"], dict(scales=[1.0], flip=False, crf=False, fuse="probs")),
                          (made["tv"], dict(scales=[1.0], flip=False, crf=False)),
                          (made["refine"], dict(scales=[1.0], flip=False, crop=64, base_scale=[48, 40]))):
        seg = weakclip.load(path, "cpu").configure(**changes)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        x = (x - torch.tensor(seg.mean).view(1, 3, 1, 1)) / torch.tensor(seg.std).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = seg.network(x)
        assert logits.shape == (1, len(seg.classes), 40, 48)
        probs = seg.predict_proba(image)
        assert probs.dtype == np.float32 and probs.shape == (len(seg.classes), 40, 48)
        np.testing.assert_allclose(probs, logits[0].softmax(0).numpy(), atol=1e-5)
        np.testing.assert_array_equal(seg.predict(image), probs.argmax(0))


# ====================================================================== equal to retrain evaluation
def test_release_deeplab_runs_the_crf_over_the_present_classes(made):
    """The authors' DeepLab-v1 (random weights) on a real photo: the argmax has several classes, and predict
    is the release's make_crf over those classes of predict_probs (its eval settings)."""
    from skimage import data

    from weakclip.retrain.evaluate import crf_present, predict_probs
    from weakclip.retrain.train import crf_params_of, load_retrain_preset

    seg = weakclip.load(made["release_v1"], "cpu")
    image = np.asarray(Image.fromarray(data.astronaut()).resize((64, 56), Image.BILINEAR))
    e = load_retrain_preset("voc").eval
    probs = predict_probs(seg.network, image, seg.mean, seg.std, e.scales, e.flip, fuse=e.fuse,
                          resize=e.resize, align_corners=e.align_corners).numpy()
    assert len(np.unique(probs.argmax(0))) > 1
    np.testing.assert_allclose(seg.predict_proba(image), probs, atol=1e-6)
    np.testing.assert_array_equal(seg.predict(image), crf_present(image, probs, crf_params_of(e)))


@pytest.mark.parametrize("which", ["v1", "tv"])
def test_retrained_prediction_equals_retrain_evaluation(made, which):
    """The masks ``retrain`` evaluation wrote (pred_dir) for the val images, with the checkpoint's eval
    section (v1: 5 scales, flip, softmax of mean logits, bicubic, align_corners, CRF over the present
    classes; tv: 2 scales, flip, CRF over all classes)."""
    seg = weakclip.load(made[which], "cpu")
    root = made["root"]
    ids = [line.strip() for line in (root / "splits" / "val.txt").read_text().split()]
    images = [read_image(next((root / "images").glob(f"{i}.*"))) for i in ids]
    masks = seg.predict(images)
    for ident, mask in zip(ids, masks):
        expected = read_label_png(made[which] / "val_pred" / f"{ident}.png")
        np.testing.assert_array_equal(mask, expected)
    # tv runs its CRF on every image; v1 (trained 2 iterations) predicts one class everywhere here, so its
    # CRF over the present classes is checked on a photo (test_release_deeplab_runs_the_crf_...)
    # a PIL image gives the same as its array
    np.testing.assert_array_equal(seg.predict(Image.fromarray(images[0])), masks[0])


def test_labels_restrict_the_prediction(made):
    seg = weakclip.load(made["tv"], "cpu")
    image = read_image(sorted((made["root"] / "images").iterdir())[1])
    probs = seg.predict_proba(image, labels=["square"])
    assert np.all(probs[[1, 3]] == 0) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert set(np.unique(seg.predict(image, labels="square")).tolist()) <= {0, 2}
    with pytest.raises(WeakclipError, match="unknown label 'sqare'") as info:
        seg.predict(image, labels="sqare")
    assert "square" in _one_line(info)


# ====================================================================== bad input
def test_bad_paths_and_wrong_kinds_fail_in_one_line(made, tmp_path):
    with pytest.raises(WeakclipError, match="not found") as info:
        weakclip.load(tmp_path / "nope.pth")
    _one_line(info)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeakclipError, match="without checkpoints/") as info:
        weakclip.load(tmp_path / "empty")
    _one_line(info)
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(WeakclipError) as info:
        weakclip.load(tmp_path / "other.pth")
    text = _one_line(info)
    assert "holds a state dict of 1 tensors (encoder.weight)" in text and "expected a weakclip" in text
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeakclipError, match="holds a list; expected") as info:
        weakclip.load(tmp_path / "list.pth")
    with pytest.raises(WeakclipError, match="not the refine stage") as info:
        weakclip.load(made["v1"], stage="refine")
    with pytest.raises(WeakclipError, match="no best checkpoint") as info:
        weakclip.load(made["v1"], best=True)
    with pytest.raises(WeakclipError, match="best takes a work folder") as info:
        weakclip.load(made["release_v1"], best=True)
    with pytest.raises(WeakclipError, match="stage 'seeds' holds no network"):
        weakclip.load(made["run"], stage="seeds")
    bare = tmp_path / "bare_run"
    shutil.copytree(made["run"] / "refine", bare / "refine")
    # a run stopped before retraining: its last network stage present, the refinement model
    assert "refine stage of the weakclip run" in weakclip.load(bare, "cpu").description
    with pytest.raises(WeakclipError, match="no retrain checkpoint yet") as info:
        weakclip.load(bare, stage="retrain")
    _one_line(info)
    with pytest.raises(WeakclipError, match="no network stage 'train'; its network stages: refine, "
                                            "retrain") as info:
        weakclip.load(bare, stage="train")  # ExCEL's stage name, not WeakCLIP's
    _one_line(info)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"kind": "folder"}))
    with pytest.raises(WeakclipError, match="holds no trained network yet") as info:
        weakclip.load(empty)
    _one_line(info)
    seg = weakclip.load(made["tv"], "cpu")
    with pytest.raises(WeakclipError, match="unknown test-time setting"):
        seg.configure(crop=64)
    with pytest.raises(WeakclipError, match="eval.scales"):
        seg.configure(scales=[0.0])
    with pytest.raises(WeakclipError, match="H x W x 3 uint8"):
        seg.predict(np.zeros((4, 4), dtype=np.uint8))


def test_best_takes_the_kept_best_checkpoint(made, tmp_path):
    work = tmp_path / "refine"
    shutil.copytree(made["refine"], work)
    state = torch.load(work / "checkpoints" / "iter_0000003.pth", weights_only=True)
    state["iteration"] = 2
    torch.save(state, work / "checkpoints" / "best.pth")
    assert "iteration 3" in weakclip.load(work, "cpu").description
    best = weakclip.load(work, "cpu", best=True)
    assert "iteration 2" in best.description and "best.pth" in best.description


def test_moved_dataset_gives_numbered_classes_of_the_network(made, tmp_path):
    state = torch.load(made["tv"] / "checkpoints" / "iter_0000002.pth", weights_only=True)
    state["config"]["data"]["root"] = str(tmp_path / "moved_away")
    torch.save(state, tmp_path / "moved.pth")
    assert weakclip.load(tmp_path / "moved.pth", "cpu").classes == made["classes"]  # the names it stores
    del state["classes"], state["palette"]  # a checkpoint written before checkpoints stored them
    torch.save(state, tmp_path / "moved.pth")
    seg = weakclip.load(tmp_path / "moved.pth", "cpu")
    assert seg.classes == ["background", "class_1", "class_2", "class_3"]
    assert "class names not found, classes numbered" in seg.description


def test_output_folder_inside_the_input_folder_is_not_read_back(made, tmp_path):
    from weakclip.predict_files import predict_files

    photos = _photos(tmp_path / "p")
    seg = weakclip.load(made["tv"], "cpu")
    first = predict_files(seg, [tmp_path / "p"], tmp_path / "p" / "masks", progress=False)
    again = predict_files(seg, [tmp_path / "p"], tmp_path / "p" / "masks", progress=False)
    assert first["written"] == again["skipped"] == [str(p) for p in sorted(photos)]
    assert again["written"] == [] and not again["failures"]


def test_import_weakclip_stays_light():
    code = "import sys, weakclip; assert callable(weakclip.load); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ====================================================================== the command
def test_predict_command_on_photos_with_a_retrained_network(made, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    bad = tmp_path / "photos" / "sub" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(photos[0].read_bytes()[:300])  # truncated JPEG
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "photos"), "--checkpoint", str(made["run"]), "--out", str(out),
            "--json", str(tmp_path / "shares.json"), "--batch-size", "2"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "loaded DeepLab-v1 ResNet-38" in captured.out
    assert "wrote 3 masks and overlays" in captured.out and f"could not be read: {bad}" in captured.out
    seg = weakclip.load(made["run"], "cpu")
    record = json.loads((tmp_path / "shares.json").read_text())
    assert record["kind"] == "deeplabv1-resnet38" and record["settings"]["crf"] is True
    assert list(record["failures"]) == [str(bad)]
    for photo in photos:
        w, h = Image.open(photo).size
        mask = read_label_png(out / f"{photo.stem}.png", expected_hw=(h, w))
        np.testing.assert_array_equal(mask, seg.predict(read_image(photo)))  # the API's own result
        overlay = Image.open(out / f"{photo.stem}_overlay.png")
        assert overlay.size == (3 * w, h)
        shares = record["images"][str(photo)]["shares"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
        for name, share in shares.items():
            assert share == pytest.approx(float((mask == seg.classes.index(name)).mean()), abs=1e-6)
    assert not (out / "broken.png").exists() and not list(out.glob(".*tmp"))
    # a rerun skips what is there, and the JSON still lists every image
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv + ["--quiet"]) == 1
    rerun = capsys.readouterr().out
    assert "wrote 0 masks and overlays" in rerun and "3 already there, skipped" in rerun
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert set(json.loads((tmp_path / "shares.json").read_text())["images"]) == {str(p) for p in photos}


def test_predict_command_settings_flags_and_errors(made, tmp_path, capsys):
    photo = _photos(tmp_path / "p", sizes=((40, 56),))[0]
    out = tmp_path / "o"
    base = ["predict", str(photo), "--out", str(out), "--quiet"]
    # the retrained network's settings switched by the flags: one scale, no flip, no CRF = plain argmax
    assert main(base + ["--checkpoint", str(made["v1"]), "--scales", "1.0", "--no-flip", "--crf", "none",
                        "--json", str(tmp_path / "s.json")]) == 0
    settings = json.loads((tmp_path / "s.json").read_text())["settings"]
    assert settings["scales"] == [1.0] and settings["flip"] is False and settings["crf"] is False
    seg = weakclip.load(made["v1"], "cpu").configure(scales=[1.0], flip=False, crf=False)
    np.testing.assert_array_equal(read_label_png(out / "astronaut.png"), seg.predict(read_image(photo)))
    capsys.readouterr()
    # errors: one line each, nothing written
    cases = [(["--checkpoint", str(made["v1"]), "--crop", "64"], "--crop: sliding-window settings"),
             (["--checkpoint", str(made["v1"]), "--labels", "circle"], "unknown label 'circle'"),
             (["--checkpoint", str(tmp_path / "missing.pth")], "checkpoint not found"),
             (["--checkpoint", str(made["v1"]), "--batch-size", "0"], "--batch-size must be >= 1")]
    for extra, words in cases:
        assert main(base[:-1] + ["--out", str(tmp_path / "none")] + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(made["v1"]), "--out",
                 str(tmp_path / "none")]) == 2
    assert "no images in" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "gone.jpg"), "--checkpoint", str(made["v1"]), "--out",
                 str(tmp_path / "none")]) == 2
    assert "not found: " in capsys.readouterr().err
    torch.save({"x": 1}, tmp_path / "x.pth")
    assert main(base + ["--checkpoint", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a dict with keys x; expected" in err
    assert not (tmp_path / "none").exists()


def test_refinement_batches_of_one_size_give_the_masks_of_one_at_a_time(made, tmp_path, capsys):
    from weakclip.predict_files import predict_files

    photos = _photos(tmp_path / "p", sizes=((48, 64), (48, 64), (48, 64)))
    seg = weakclip.load(made["refine"], "cpu").configure(flip=False)
    one = predict_files(seg, photos, tmp_path / "one", progress=False)
    three = predict_files(seg, photos, tmp_path / "three", batch_size=3, progress=False)
    assert one["written"] == three["written"] == [str(p) for p in photos]
    for p in photos:
        np.testing.assert_array_equal(read_label_png(tmp_path / "one" / f"{p.stem}.png"),
                                      read_label_png(tmp_path / "three" / f"{p.stem}.png"))
    # release refinement model through the command, its windows made small
    assert main(["predict", str(photos[0]), "--checkpoint", str(made["release_refine"]), "--out",
                 str(tmp_path / "rel"), "--scales", "1.0", "--base-scale", "64", "48", "--crop", "64",
                 "--stride", "43", "--crf", "none", "--labels", "person"]) == 0
    assert "the authors' release checkpoint" in capsys.readouterr().out
    assert set(np.unique(read_label_png(tmp_path / "rel" / "astronaut.png")).tolist()) <= {0, 15}


def test_batched_retrained_prediction_equals_one_at_a_time(made, tmp_path):
    """``predict_batch`` (``weakclip predict --batch-size``) runs the images of one size together through the
    retrained network, per scale: the same probabilities as one image at a time up to float rounding, the same
    masks; images of another size go in their own batch."""
    from skimage import data

    from weakclip.retrain.evaluate import predict_probs, predict_probs_batch

    seg = weakclip.load(made["release_v1"], "cpu")
    photos = [np.asarray(Image.fromarray(getattr(data, name)()).resize((60, 44), Image.BILINEAR))
              for name in ("astronaut", "coffee", "chelsea")]
    odd = np.asarray(Image.fromarray(data.rocket()).resize((52, 40), Image.BILINEAR))
    images = [photos[0], odd, photos[1], photos[2]]
    batched = seg.predict_batch(images)
    for image, (probs, label) in zip(images, batched):
        np.testing.assert_allclose(probs, seg.predict_proba(image), atol=1e-5)
        np.testing.assert_array_equal(label, seg.predict(image))
    # the batch function itself, against predict_probs, with and without flip, both fusions
    net = seg.network
    for flip, fuse in ((True, "logits"), (False, "probs")):
        together = predict_probs_batch(net, photos, seg.mean, seg.std, (0.5, 1.0), flip, fuse=fuse,
                                       resize="opencv", align_corners=True)
        for image, probs in zip(photos, together):
            alone = predict_probs(net, image, seg.mean, seg.std, (0.5, 1.0), flip, fuse=fuse, resize="opencv",
                                  align_corners=True)
            assert probs.shape == alone.shape
            torch.testing.assert_close(probs, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one size"):
        predict_probs_batch(net, [photos[0], odd], seg.mean, seg.std)


def test_predict_turns_photos_upright_by_their_exif_tag(made, tmp_path, capsys):
    """A phone photo stored sideways with EXIF orientation 6: ``weakclip predict`` and ``Segmenter.predict``
    of the PIL image segment it as viewers show it (upright), and the mask has the upright size."""
    from PIL import ImageOps
    from skimage import data

    stored = Image.fromarray(data.chelsea()).resize((56, 40), Image.BILINEAR)  # stored 40 x 56
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    folder = tmp_path / "phone"
    folder.mkdir()
    stored.save(folder / "cat.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--checkpoint", str(made["v1"]), "--out", str(out)]) == 0
    capsys.readouterr()
    mask = read_label_png(out / "cat.png")
    assert mask.shape == (56, 40)  # upright: the stored width is the height
    seg = weakclip.load(made["v1"], "cpu")
    with Image.open(folder / "cat.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        np.testing.assert_array_equal(seg.predict(im), mask)
    np.testing.assert_array_equal(seg.predict(upright), mask)


def test_predict_into_its_own_input_folder_says_why_it_found_nothing(tmp_path, capsys):
    # issue 27 (also): `weakclip predict DIR --out DIR` said "no images in DIR" of a folder full of photos
    photos = tmp_path / "p"
    _photos(photos, sizes=((40, 56), (40, 56)))
    _photos(photos / "sub", sizes=((40, 56),))
    checkpoint = str(tmp_path / "never-loaded.pth")  # the images are looked for first
    for given, out in ((photos, photos), (photos / "sub", photos)):
        assert main(["predict", str(given), "--checkpoint", checkpoint, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        n = 3 if given == photos else 1
        assert err == (f"weakclip predict: error: no images in {given} to predict: its {n} image files are "
                       f"in the output folder {out} (--out), which is never read as input (it receives "
                       f"the masks and overlays): give another --out folder")
    # an empty folder is still just that
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", checkpoint, "--out",
                 str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no images in" in capsys.readouterr().err
