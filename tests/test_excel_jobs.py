"""ExCEL's per-image mask jobs (methods/excel/jobs.py), the seed band, ``weakclip seeds --method excel`` and
``weakclip pseudo-masks`` given an ExCEL network.

A tiny CLIP (the ``tiny-excel`` arch, random weights) on a synthetic folder dataset of 5 small images of
different sizes; the network's squares are 64 px. The masks of the jobs are compared pixel for pixel with
the functions they run (``training_free_mask`` / ``training_free_maps`` and ``infer_image``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tiny_refinement import tiny_refinement_folder
from weakclip.cli import main
from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png
from weakclip.errors import EXIT_USAGE, WeakclipError
from weakclip.metrics import ConfusionMatrix

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SETTINGS = ["model.clip_arch=tiny-excel", "data.kind=folder", f"data.crop_size={SIZE}", f"free.size={SIZE}",
            f"infer.size={SIZE}", "infer.scales=1.0,1.5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """CLIP weights, a 5-image folder dataset with masks (sizes 40-56 x 48-72), a descriptors file."""
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.models.clip import get_arch, make_open_clip_model

    folder = tmp_path_factory.mktemp("excel_jobs")
    torch.manual_seed(5)
    torch.save(make_open_clip_model(get_arch("tiny-excel")).state_dict(), folder / "clip.pt")
    root = make_synthetic_dataset(folder / "data", n_train=5, n_val=0, image_size=((40, 56), (48, 72)))
    classes = (root / "classes.txt").read_text().split()
    descriptors = folder / "descriptors.json"
    edges = ("sharp", "soft", "no", "round")
    table = {name: [f"a {name} with {w} edges." for w in edges] for name in classes[1:]}
    descriptors.write_text(json.dumps(table))
    return {"folder": folder, "weights": folder / "clip.pt", "root": root, "classes": classes,
            "descriptors": descriptors}


def _config(*extra: str):
    from weakclip.methods.excel.config import apply_excel_overrides, load_excel_preset

    return apply_excel_overrides(load_excel_preset("excel-voc"), [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def net(world):
    from weakclip.methods.excel.train import build_network

    torch.manual_seed(0)
    return build_network(_config("text.num_clusters=12"), world["classes"], clip_weights=world["weights"],
                         descriptors=world["descriptors"]).eval()


@pytest.fixture(scope="module")
def dataset(world):
    return build_dataset("folder", world["root"], split="train")


def _free():
    from weakclip.methods.excel.training_free import FreeSettings

    return FreeSettings(size=SIZE)


def _infer(crf: bool = False):
    from weakclip.methods.excel.infer import InferenceSettings

    return InferenceSettings(size=SIZE, scales=(1.0, 1.5), crf=crf)


def _pngs(folder) -> dict[str, np.ndarray]:
    return {p.stem: read_label_png(p) for p in sorted(folder.glob("*.png"))}


def _scores(masks: dict[str, np.ndarray], dataset, unsure: str = "error") -> ConfusionMatrix:
    cm = ConfusionMatrix(dataset.classes, unsure=unsure)
    for i, ident in enumerate(dataset.ids):
        cm.update(masks[ident], dataset.read_gt(i))
    return cm


# ====================================================================== the band rule
def test_the_band_rule_on_a_crafted_case():
    """Maps of classes 1 and 3 (foreground indices 0 and 2): above 0.7 the class of the maximum, at or below
    0.25 background, between (0.7 itself included) 255; a pixel where the band's label and the mask differ
    is 255, wherever it is."""
    from weakclip.methods.excel.seed_band import SeedBand, apply_seed_band, band_labels

    first = torch.tensor([[0.9, 0.9, 0.7, 0.5, 0.25, 0.1, 0.1, 0.8]])
    second = torch.tensor([[0.1, 0.95, 0.0, 0.2, 0.2, 0.1, 0.0, 0.71]])
    maps = torch.stack([first, second])  # 2 x 1 x 8
    mask = np.array([[1, 3, 1, 1, 0, 0, 1, 0]], dtype=np.uint8)
    band = SeedBand()
    assert band_labels(maps, [0, 2], band).tolist() == [[1, 3, 255, 255, 0, 0, 0, 1]]
    assert apply_seed_band(mask, maps, torch.tensor([0, 2]), band).tolist() == \
        [[1, 3, 255, 255, 0, 0, 255, 255]]
    wide = SeedBand(high=0.4, low=0.3)  # the thresholds are the band's, not constants
    assert band_labels(maps, [0, 2], wide).tolist() == [[1, 3, 1, 1, 0, 0, 0, 1]]
    with pytest.raises(WeakclipError, match="low <= high"):
        SeedBand(high=0.2, low=0.5)
    assert SeedBand.of_config(_config()) == SeedBand(high=0.7, low=0.25)
    assert SeedBand.of_config(_config("labels.high_thre=0.8"), low=0.1) == SeedBand(high=0.8, low=0.1)


def test_training_free_maps_keep_the_mask(net, dataset):
    """training_free_maps gives the very mask of training_free_mask, and the normalised maps of the
    labelled classes at the image's size."""
    from weakclip.methods.excel.training_free import training_free_maps, training_free_mask

    image, labels = dataset.read_image(0), dataset.get_labels(0)[1:]
    out = training_free_maps(net, image, labels, _free())
    assert np.array_equal(out.mask, training_free_mask(net, image, labels, _free()))
    assert out.classes.tolist() == np.nonzero(labels)[0].tolist()
    assert tuple(out.maps.shape) == (len(out.classes), *image.shape[:2])
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1 + 1e-6


# ====================================================================== the jobs
@pytest.mark.parametrize("with_band", [False, True])
def test_free_masks_equal_the_direct_functions(net, dataset, tmp_path, with_band):
    """Every PNG at its image's size, equal to training_free_mask (with the band: apply_seed_band of
    training_free_maps) on the network in infer_lam's position mode; the scores are those of the files; the
    network's own position mode is back afterwards."""
    from weakclip.methods.excel.jobs import SeedBand, free_mask_job
    from weakclip.methods.excel.seed_band import apply_seed_band
    from weakclip.methods.excel.training_free import training_free_maps, training_free_mask

    band = SeedBand() if with_band else None
    grid, mode = net.clip_pass.base_grid, net.position_mode
    net.set_position_mode("crop", 96)  # not the job's: it sets and restores its own
    summary = free_mask_job(net, dataset, tmp_path / "m", _free(), band=band, progress=False)
    assert net.clip_pass.base_grid == (6, 6) and net.position_mode == "crop"
    net.set_position_mode("crop", SIZE)  # infer_lam's model for the training split: the square's grid
    masks = _pngs(tmp_path / "m")
    assert sorted(masks) == sorted(dataset.ids)
    for i, ident in enumerate(dataset.ids):
        image, labels = dataset.read_image(i), dataset.get_labels(i)[1:]
        if band is None:
            expected = training_free_mask(net, image, labels, _free())
        else:
            out = training_free_maps(net, image, labels, _free())
            expected = apply_seed_band(out.mask, out.maps, out.classes, band)
        assert masks[ident].shape == image.shape[:2]
        assert np.array_equal(masks[ident], expected)
    net.clip_pass.set_base_grid(grid)
    net.position_mode = mode
    unsure = sum(int((m == 255).sum()) for m in masks.values())
    total = sum(m.size for m in masks.values())
    assert (unsure > 0) == with_band
    assert summary["coverage"] == pytest.approx(1 - unsure / total)
    assert summary["miou"] == pytest.approx(_scores(masks, dataset, "background").scores().miou)
    assert summary["miou_confident"] == pytest.approx(_scores(masks, dataset, "ignore").scores().miou)
    assert (summary["miou_confident"] != summary["miou"]) == with_band
    assert summary["written"] == summary["images"] == 5 and summary["no_labels"] == 0


@pytest.mark.parametrize("crf", [False, True])
def test_trained_masks_equal_infer_image(net, dataset, tmp_path, crf):
    """Every PNG equal to infer_image's labels (with the CRF: its CRF labels, and the labels before it in
    no_crf/) on the network in CLIP's position mode (the release's test models); the scores are those of the
    files."""
    from weakclip.methods.excel.infer import infer_image, release_miou
    from weakclip.methods.excel.jobs import trained_mask_job

    summary = trained_mask_job(net, dataset, tmp_path / "m", _infer(crf), progress=False)
    assert net.position_mode == "crop" and net.clip_pass.base_grid == (SIZE // 16, SIZE // 16)
    masks, before = _pngs(tmp_path / "m"), _pngs(tmp_path / "m" / "no_crf")
    net.set_position_mode("clip")
    try:
        for i, ident in enumerate(dataset.ids):
            pred = infer_image(net, dataset.read_image(i), _infer(crf))
            assert np.array_equal(masks[ident], pred.crf if crf else pred.labels)
            if crf:
                assert np.array_equal(before[ident], pred.labels)
    finally:
        net.set_position_mode("crop")
    assert bool(before) == crf
    final = _scores(masks, dataset)
    assert summary["miou"] == pytest.approx(final.scores().miou)
    assert summary["release_miou"] == pytest.approx(release_miou(final.matrix))
    assert summary["miou_no_crf"] == pytest.approx(_scores(before or masks, dataset).scores().miou)
    assert summary["per_class"]["iou"] == final.scores().to_dict()["iou"]
    assert set(summary["per_class"]) >= {"miou", "iou", "fp_per_class", "fn_per_class"}


def _identity(folder) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.png")}


def test_free_job_resumes_as_a_single_run(net, dataset, tmp_path):
    """Stopped after 2 images, run again: the rest written, the first 2 not rewritten, files and scores
    equal to one uninterrupted run's (the found masks scored from their files)."""
    from weakclip.methods.excel.jobs import SeedBand, free_mask_job

    whole = free_mask_job(net, dataset, tmp_path / "whole", _free(), band=SeedBand(), progress=False)
    part = free_mask_job(net, dataset, tmp_path / "part", _free(), band=SeedBand(), progress=False, limit=2)
    assert part["written"] == 2 and not part["complete"]
    first = _identity(tmp_path / "part")
    rest = free_mask_job(net, dataset, tmp_path / "part", _free(), band=SeedBand(), progress=False)
    assert rest["written"] == 3 and rest["skipped_existing"] == 2 and rest["complete"]
    assert {k: v for k, v in _identity(tmp_path / "part").items() if k in first} == first
    assert _pngs(tmp_path / "part").keys() == _pngs(tmp_path / "whole").keys()
    assert all(np.array_equal(a, _pngs(tmp_path / "whole")[k]) for k, a in _pngs(tmp_path / "part").items())
    for key in ("miou", "miou_confident", "coverage"):
        assert rest[key] == pytest.approx(whole[key]), key
    # a band-less run over seeds with 255 does not take them for masks
    plain = free_mask_job(net, dataset, tmp_path / "part", _free(), progress=False)
    assert plain["written"] == 0 and len(plain["unscored"]) == 5
    assert all("255" in why for why in plain["unscored"].values())


def test_trained_job_resumes_as_a_single_run(net, dataset, tmp_path):
    from weakclip.methods.excel.jobs import trained_mask_job

    whole = trained_mask_job(net, dataset, tmp_path / "whole", _infer(True), progress=False)
    part = trained_mask_job(net, dataset, tmp_path / "part", _infer(True), progress=False, limit=3)
    first = _identity(tmp_path / "part")
    rest = trained_mask_job(net, dataset, tmp_path / "part", _infer(True), progress=False)
    assert (part["written"], rest["written"], rest["skipped_existing"]) == (3, 2, 3)
    assert {k: v for k, v in _identity(tmp_path / "part").items() if k in first} == first
    for key in ("miou", "miou_no_crf", "release_miou", "per_class"):
        assert rest[key] == pytest.approx(whole[key]) if key != "per_class" else rest[key] == whole[key], key


def test_a_bad_image_is_listed_and_an_unlabelled_one_is_background(world, net, tmp_path):
    """An unreadable image: reported, listed, the others written (both jobs). An image without a foreground
    label: an all-background mask, counted."""
    from weakclip.methods.excel.jobs import SeedBand, free_mask_job, trained_mask_job

    root = tmp_path / "data"
    shutil.copytree(world["root"], root)
    data = build_dataset("folder", root, split="train")
    bad, empty = data.ids[1], data.ids[3]
    data.image_path(1).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    labels = json.loads((root / "labels.json").read_text())
    labels[empty] = []
    (root / "labels.json").write_text(json.dumps(labels))
    data = build_dataset("folder", root, split="train")
    free = free_mask_job(net, data, tmp_path / "free", _free(), band=SeedBand(), progress=False)
    assert free["failed"] == 1 and list(free["failures"]) == [bad] and free["written"] == 4
    assert free["no_labels"] == 1
    assert not (read_label_png(tmp_path / "free" / f"{empty}.png")).any()
    assert not (tmp_path / "free" / f"{bad}.png").exists()
    trained = trained_mask_job(net, data, tmp_path / "trained", _infer(), progress=False)
    assert trained["failed"] == 1 and list(trained["failures"]) == [bad] and trained["written"] == 4


def test_jobs_refuse_another_class_list(net, world, tmp_path):
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.methods.excel.jobs import free_mask_job

    other = build_dataset("folder", make_synthetic_dataset(tmp_path / "d", n_train=1, n_val=0, n_classes=2),
                          split="train")
    with pytest.raises(WeakclipError, match="5 classes"):
        free_mask_job(net, other, tmp_path / "o", _free(), progress=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ====================================================================== weakclip seeds --method excel
def _seeds_argv(world, out, *extra):
    return ["seeds", "--method", "excel", "--data-root", str(world["root"]), "--split", "train",
            "--clip-weights", str(world["weights"]), "--arch", "tiny-excel", "--set", f"free.size={SIZE}",
            "--out", str(out), "--quiet", "--device", "cpu", *extra]


def test_seeds_command_writes_a_seed_folder(world, dataset, tmp_path, capsys):
    """The seeds of free_mask_job with the band, accepted by 'seeds check' and readable as the seeds of a
    dataset (what 'weakclip train --seeds' reads); --band none: the plain masks."""
    from weakclip.methods.excel.jobs import SeedBand, free_mask_job
    from weakclip.methods.excel.train import build_network

    out = tmp_path / "seeds"
    argv = _seeds_argv(world, out, "--descriptors", str(world["descriptors"]), "--json",
                       str(tmp_path / "s.json"))
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "ignore band" in said and "mIoU of confident pixels" in said
    # a folder dataset: the clusters of another class list (VOC's ratio), as the command sets them
    net = build_network(_config("text.num_clusters=none"), world["classes"], clip_weights=world["weights"],
                        descriptors=world["descriptors"])
    free_mask_job(net, dataset, tmp_path / "direct", _free(), band=SeedBand(), progress=False)
    seeds, direct = _pngs(out), _pngs(tmp_path / "direct")
    assert seeds.keys() == direct.keys() and all(np.array_equal(seeds[k], direct[k]) for k in seeds)
    record = json.loads((out / "seeds_summary.json").read_text())
    assert record["band"] == {"high": 0.7, "low": 0.25} and record["method"] == "excel"
    assert json.loads((tmp_path / "s.json").read_text())["written"] == 5
    assert main(["seeds", "check", str(out), "--data-root", str(world["root"]), "--split", "train",
                 "--quiet"]) == 0
    with_seeds = build_dataset("folder", world["root"], split="train", seed_dir=out)
    assert all(np.array_equal(with_seeds.read_seed(i), seeds[k]) for i, k in enumerate(with_seeds.ids))

    plain = tmp_path / "plain"
    assert main(_seeds_argv(world, plain, "--band", "none")) == 0
    assert "plain class prompts" in capsys.readouterr().out  # no descriptors: said in one line
    masks = _pngs(plain)
    assert not any((m == 255).any() for m in masks.values())
    assert any((m != seeds[k]).any() for k, m in masks.items())


def test_training_free_config_by_dataset_kind():
    """The preset by the data, the text side's kind, a folder dataset's cluster count by VOC's ratio; given
    overrides win."""
    from weakclip.methods.excel.config import training_free_config

    assert training_free_config("voc")[0] == "excel-voc" and training_free_config("coco91")[0] == "excel-coco"
    voc, coco, folder = (training_free_config(k)[1] for k in ("voc", "coco91", "folder"))
    assert (voc.data.kind, coco.data.kind, folder.data.kind) == ("voc", "coco", "folder")
    assert voc.text.num_clusters == 112 and coco.text.num_clusters == 224 and folder.text.num_clusters is None
    assert training_free_config("folder", "excel-coco", ["text.num_clusters=9"])[1].text.num_clusters == 9


@pytest.mark.parametrize("case", ["not_json", "missing_class", "no_weights", "clip_es_flag", "band_flags",
                                  "clip_es_with_descriptors", "excel_preset_for_clip_es", "clusters"])
def test_seeds_command_bad_input_is_one_line(world, tmp_path, capsys, case):
    out = tmp_path / "out"
    bad = tmp_path / "descriptors.json"
    weights = str(world["weights"])
    if case == "not_json":
        bad.write_text("{'disk': ['round']}")
        argv, words = _seeds_argv(world, out, "--descriptors", str(bad)), "is not JSON"
    elif case == "missing_class":
        table = json.loads(world["descriptors"].read_text())
        del table["ring"]
        bad.write_text(json.dumps(table))
        argv, words = _seeds_argv(world, out, "--descriptors", str(bad)), "no descriptors for class 'ring'"
    elif case == "no_weights":
        argv = [a if a != weights else str(tmp_path / "gone.pt") for a in _seeds_argv(world, out)]
        words = "CLIP weights file not found"
    elif case == "clip_es_flag":
        argv = _seeds_argv(world, out, "--flip", "--scales", "1.0")
        words = "--scales, --flip are settings of CLIP-ES"
    elif case == "band_flags":
        argv, words = _seeds_argv(world, out, "--band", "none", "--hi", "0.8"), "--band none leaves out"
    elif case == "clusters":
        argv = _seeds_argv(world, out, "--descriptors", str(world["descriptors"]), "--set",
                           "text.num_clusters=40")
        words = "text.num_clusters 40 (preset excel-voc) needs as many descriptor sentences"
    elif case == "clip_es_with_descriptors":
        argv = ["seeds", "--data-root", str(world["root"]), "--clip-weights", weights, "--out", str(out),
                "--descriptors", str(world["descriptors"])]
        words = "--descriptors: for --method excel"
    else:
        argv = ["seeds", "--data-root", str(world["root"]), "--clip-weights", weights, "--out", str(out),
                "--preset", "excel-voc"]
        words = "add --method excel"
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not list(out.glob("*.png")) if out.exists() else True


# ====================================================================== weakclip pseudo-masks
@pytest.fixture(scope="module")
def excel_run(world, tmp_path_factory):
    """A 1-iteration ExCEL training work folder, and a 'weakclip run' folder of ExCEL holding it."""
    from weakclip.methods.excel.train import train_excel

    saved = os.environ.get("WEAKCLIP_TENSORBOARD")
    os.environ["WEAKCLIP_TENSORBOARD"] = "0"
    folder = tmp_path_factory.mktemp("excel_run")
    cfg = _config(f"data.root={world['root']}", "data.split=train", "train.batch_size=2", "train.iters=1",
                  "train.checkpoint_every=1", "data.num_workers=0")
    try:
        train_excel(cfg, folder / "run" / "train", clip_weights=world["weights"], device="cpu",
                    progress=False, quiet=True)
    finally:
        if saved is None:
            os.environ.pop("WEAKCLIP_TENSORBOARD", None)
        else:
            os.environ["WEAKCLIP_TENSORBOARD"] = saved
    (folder / "run" / "run.json").write_text(json.dumps({"method": "excel", "preset": "excel-voc"}))
    return folder / "run"


def test_pseudo_masks_of_an_excel_network(world, dataset, excel_run, tmp_path, capsys):
    """A checkpoint file, its training work folder and the run folder: the masks of trained_mask_job with the
    checkpoint's test-time settings; --crf voc adds the CRF (no_crf/ beside it)."""
    from weakclip.engine.checkpoint import latest_checkpoint
    from weakclip.methods.excel.config import ExcelConfig
    from weakclip.methods.excel.jobs import trained_mask_job
    from weakclip.methods.excel.train import load_excel_checkpoint

    net, ckpt = load_excel_checkpoint(excel_run / "train", world["weights"])
    cfg = ExcelConfig.from_dict(ckpt["config"])
    trained_mask_job(net, dataset, tmp_path / "direct", cfg.infer.settings(), progress=False)
    direct = _pngs(tmp_path / "direct")
    file = latest_checkpoint(excel_run / "train")
    for name, where in (("file", file), ("train", excel_run / "train"), ("run", excel_run)):
        out = tmp_path / name
        assert main(["pseudo-masks", "--checkpoint", str(where), "--data-root", str(world["root"]), "--split",
                     "train", "--out", str(out), "--quiet", "--device", "cpu"]) == 0, name
        masks = _pngs(out)
        assert masks.keys() == direct.keys() and all(np.array_equal(masks[k], direct[k]) for k in masks)
        assert json.loads((out / "pseudo_masks_summary.json").read_text())["method"] == "excel"
        assert not (out / "no_crf").exists()
    assert "mIoU as the release computes it" in capsys.readouterr().out
    assert main(["pseudo-masks", "--checkpoint", str(excel_run), "--data-root", str(world["root"]), "--split",
                 "train", "--out", str(tmp_path / "crf"), "--crf", "voc", "--quiet", "--device", "cpu"]) == 0
    assert _pngs(tmp_path / "crf" / "no_crf").keys() == direct.keys()
    assert all(np.array_equal(m, direct[k]) for k, m in _pngs(tmp_path / "crf" / "no_crf").items())
    assert main(["pseudo-masks", "--checkpoint", str(excel_run), "--data-root", str(world["root"]), "--out",
                 str(tmp_path / "x"), "--crf-workers", "2", "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--crf-workers is a setting of WeakCLIP" in err[0]


@pytest.fixture(scope="module")
def weakclip_checkpoint(world, tmp_path_factory):
    """A WeakCLIP refinement checkpoint holding its towers (an untrained tiny model), as a work folder."""
    return tiny_refinement_folder(tmp_path_factory.mktemp("weakclip_ckpt"), n_val=0)


def test_pseudo_masks_of_a_weakclip_checkpoint_still_work(weakclip_checkpoint, tmp_path, capsys):
    """WeakCLIP's path as before, given the file (read once, handed to its loader) or the work folder."""
    root, work = weakclip_checkpoint
    outputs = []
    for where in (work, work / "checkpoints" / "iter_0000001.pth"):
        out = tmp_path / where.name
        assert main(["pseudo-masks", "--checkpoint", str(where), "--data-root", str(root), "--split", "train",
                     "--out", str(out), "--device", "cpu", "--quiet"]) == 0
        summary = json.loads((out / "pseudo_masks_summary.json").read_text())
        assert summary["written"] == 3 and "method" not in summary and "window_batch" in summary
        outputs.append(_pngs(out))
    assert outputs[0].keys() == outputs[1].keys() and len(outputs[0]) == 3
    assert all(np.array_equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert "mIoU" in capsys.readouterr().out
