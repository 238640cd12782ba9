"""ExCEL's trained network everywhere a network is taken (issue 29, points 2 and 7): ``weakclip.load`` of a
checkpoint, a training folder and a ``weakclip run`` folder; ``weakclip predict`` equal to the release's
test-time inference (:func:`~weakclip.methods.excel.infer.infer_image`) pixel for pixel; a copied folder
whose data is gone; ``weakclip export`` to ONNX (onnxruntime alone) and TorchScript against PyTorch;
``weakclip train --preset excel-voc`` and its resume; the one-line errors (exit 2) for the other method's
folders and for bad descriptors.

A tiny ExCEL (the ``tiny-excel`` CLIP: 12 blocks, patch 16, random weights) is trained for 3 iterations on a
small synthetic folder dataset, once for the module. Its crops (48) differ from CLIP's own grid (64): the
test-time positional embedding (CLIP's grid, the release's test model) is not the training one. Three
iterations leave class biases that outweigh the decoder's variation over an image (every pixel one class):
the checkpoint's classifier biases are then shifted so that each class's mean logit over the set's images is
0, so that the masks hold several classes and comparing them means something (the network is still the
checkpoint's; the train command's test compares with the checkpoint as training wrote it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import weakclip
from weakclip.cli import main
from weakclip.errors import WeakclipError

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS = 3
#: The training settings of the module's network, as ``--set`` items of ``weakclip train``.
SETTINGS = ["model.clip_arch=tiny-excel", "data.kind=folder", "data.split=train", "data.crop_size=48",
            "data.scale_range=0.75,1.25", "data.num_workers=0", "train.batch_size=2", f"train.iters={ITERS}",
            "train.warmup_iters=1", "train.checkpoint_every=1", "train.log_every=1", "text.num_clusters=12",
            "infer.size=64", "infer.scales=0.75,1.0,1.5"]


# ====================================================================== the trained network
@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """CLIP weights, a synthetic dataset of several image sizes, a descriptors file, the ExCEL training
    folder (``train_excel``) and a ``weakclip run`` folder made by hand around it."""
    from weakclip.data.datasets import build_dataset
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.methods.excel.config import apply_excel_overrides, load_excel_preset
    from weakclip.methods.excel.train import train_excel
    from weakclip.models.clip import get_arch, make_open_clip_model

    base = tmp_path_factory.mktemp("excel_net")
    torch.manual_seed(3)
    weights = base / "clip.pt"
    state = make_open_clip_model(get_arch("tiny-excel")).state_dict()
    # positions that weigh in the random CLIP's tokens: the test-time positional grid (CLIP's, not the
    # crop's) then shows in the masks
    state["visual.positional_embedding"] = state["visual.positional_embedding"] * 30
    torch.save(state, weights)
    root = make_synthetic_dataset(base / "data", n_train=4, n_val=3, image_size=((56, 80), (56, 100)))
    classes = list(build_dataset("folder", root, split="train").classes)
    descriptors = base / "descriptors.json"
    descriptors.write_text(json.dumps({name: [f"a {name} with {w} edges and a {c} colour." for w, c in
                                              (("sharp", "bright"), ("soft", "dark"), ("no", "striped"))]
                                       for name in classes[1:]}))
    cfg = apply_excel_overrides(load_excel_preset("excel-voc"), [*SETTINGS, f"data.root={root}"])
    train = base / "train"
    summary = train_excel(cfg, train, clip_weights=weights, descriptors=descriptors, device="cpu",
                          progress=False, quiet=True)
    checkpoint = Path(summary["checkpoint"])
    as_trained = base / "as_trained.pth"
    shutil.copy(checkpoint, as_trained)
    _balance_classes(checkpoint, sorted((Path(root) / "images").iterdir()))
    run = base / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "excel", "preset": "excel-voc", "kind": "folder",
                                              "data_root": str(root)}))
    shutil.copytree(train, run / "train")
    val = sorted((Path(root) / "images").glob("val_*"))
    return {"base": base, "weights": weights, "root": Path(root), "classes": classes,
            "descriptors": descriptors, "cfg": cfg, "train": train, "run": run, "checkpoint": checkpoint,
            "as_trained": as_trained, "val": val}


def _balance_classes(checkpoint: Path, images: list[Path]) -> None:
    """Shift the classifier biases of ``checkpoint`` by minus each class's mean logit over ``images`` (one
    64 x 64 pass each, CLIP's positional grid)."""
    import torch.nn.functional as F

    from weakclip.methods.excel.augment import normalize_image
    from weakclip.methods.excel.train import load_excel_checkpoint

    net, ckpt = load_excel_checkpoint(checkpoint)
    net.set_position_mode("clip")
    tensors = [torch.from_numpy(normalize_image(_rgb(p)).transpose(2, 0, 1).copy())[None] for p in images]
    batch = torch.cat([F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)
                       for t in tensors])
    with torch.no_grad():
        mean = net.segment(batch).mean(dim=(0, 2, 3))
    ckpt["model"]["decoder.classifier.bias"] = ckpt["model"]["decoder.classifier.bias"] - mean
    torch.save(ckpt, checkpoint)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _release_masks(folder: Path, images: list[Path], *, crf: bool = False) -> list[np.ndarray]:
    """The masks the release's test script gives: the network rebuilt by ``load_excel_checkpoint``, CLIP's
    own positional grid (its test model), ``infer_image`` with the checkpoint's ``infer`` settings."""
    import dataclasses

    from weakclip.methods.excel.config import ExcelConfig
    from weakclip.methods.excel.infer import infer_image
    from weakclip.methods.excel.train import load_excel_checkpoint

    net, ckpt = load_excel_checkpoint(folder)
    net.set_position_mode("clip")
    settings = ExcelConfig.from_dict(ckpt["config"]).infer.settings()
    if crf:
        settings = dataclasses.replace(settings, crf=True)
    out = []
    for path in images:
        pred = infer_image(net, _rgb(path), settings)
        out.append(pred.crf if crf else pred.labels)
    return out


# ====================================================================== weakclip.load
def test_load_takes_a_checkpoint_a_training_folder_and_a_run_folder(world):
    image = _rgb(world["val"][0])
    masks = []
    for source, kwargs, where in ((world["checkpoint"], {}, ""),
                                  (world["train"], {}, ""),
                                  (world["run"], {}, "train stage of the weakclip run"),
                                  (world["run"], {"stage": "train"}, "train stage of the weakclip run")):
        seg = weakclip.load(source, "cpu", **kwargs)
        assert seg.kind == "excel" and seg.classes == world["classes"]
        assert f"iteration {ITERS}" in seg.description and where in seg.description
        assert seg.palette[1].tolist() == [128, 0, 0]
        # the release's test-time settings, as the checkpoint's config records them
        assert seg.settings["size"] == 64 and seg.settings["scales"] == [0.75, 1.0, 1.5]
        assert seg.settings["flip"] is True and seg.settings["crf"] is False
        assert seg.network.net.position_mode == "clip"
        masks.append(seg.predict(image))
    assert all(np.array_equal(m, masks[0]) for m in masks)
    assert masks[0].shape == image.shape[:2] and masks[0].dtype == np.uint8
    for bad, words in (({"stage": "refine"}, "no network stage 'refine'; its network stages: train, retrain"),
                       ({"stage": "retrain"}, "no retrain checkpoint yet")):
        with pytest.raises(WeakclipError, match=words) as info:
            weakclip.load(world["run"], "cpu", **bad)
        assert "\n" not in str(info.value)
    with pytest.raises(WeakclipError, match="not the retrain stage's"):
        weakclip.load(world["checkpoint"], "cpu", stage="retrain")


def test_a_run_with_a_retraining_loads_the_retrained_network_by_default(world, tmp_path):
    """An ExCEL run with ``retrain/`` (a DeepLab retrained on its masks): the last network stage present is
    the default, ``stage="train"`` still gives ExCEL's network."""
    from weakclip.data.classes import class_record
    from weakclip.retrain.train import apply_retrain_overrides, build_model, load_retrain_preset

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    cfg = apply_retrain_overrides(load_retrain_preset("voc-plus"), [
        "model.name=deeplabv3_resnet18", "model.head_channels=32", "model.pretrained_backbone=false"])
    model = build_model(cfg, len(world["classes"]), pretrained=False)
    (run / "retrain" / "checkpoints").mkdir(parents=True)
    torch.save({"iteration": 1, "model": model.state_dict(), "config": cfg.to_dict(),
                **class_record(world["classes"])}, run / "retrain" / "checkpoints" / "iter_0000001.pth")
    final = weakclip.load(run, "cpu")
    assert final.kind == "torchvision" and "retrain stage of the weakclip run" in final.description
    assert weakclip.load(run, "cpu", stage="train").kind == "excel"


# ====================================================================== weakclip predict
def _masks(folder: Path, images: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{p.stem}.png")) for p in images]


def test_predict_equals_the_release_inference_pixel_for_pixel(world, tmp_path, capsys):
    images = world["val"]
    assert len({_rgb(p).shape for p in images}) >= 2  # sizes of their own, none square
    expected = _release_masks(world["train"], images)
    assert len(np.unique(np.concatenate([m.ravel() for m in expected]))) >= 2
    out = tmp_path / "masks"
    assert main(["predict", str(images[0].parent), "--checkpoint", str(world["run"]), "--out", str(out),
                 "--json", str(tmp_path / "shares.json"), "--quiet"]) == 0
    files = sorted(p for p in images[0].parent.iterdir())
    got = _masks(out, files)
    for path, mask in zip(files, got):
        assert mask.shape == _rgb(path).shape[:2]
    for mask, ref in zip(_masks(out, images), expected):
        np.testing.assert_array_equal(mask, ref)
    settings = json.loads((tmp_path / "shares.json").read_text())
    assert "excel" in json.dumps(settings)
    # with the dense CRF on: the release's crf_proc labels
    out_crf = tmp_path / "masks_crf"
    assert main(["predict", *map(str, images), "--checkpoint", str(world["train"]), "--out", str(out_crf),
                 "--crf", "auto", "--quiet"]) == 0
    for mask, ref in zip(_masks(out_crf, images), _release_masks(world["train"], images, crf=True)):
        np.testing.assert_array_equal(mask, ref)
    # labels given: only those classes and the background
    seg = weakclip.load(world["train"], "cpu")
    restricted = seg.predict(_rgb(images[0]), labels=world["classes"][2])
    assert set(np.unique(restricted)) <= {0, 2}
    probs = seg.predict_proba(_rgb(images[0]))
    assert probs.shape == (len(world["classes"]), *_rgb(images[0]).shape[:2])
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_a_large_image_is_processed_at_the_max_side(world):
    """An image above ``max_side``: the release's inference on the image shrunk to it, the labels enlarged
    back to the image's size."""
    from weakclip.segmenters import enlarge_labels, processing_size, shrink_image

    seg = weakclip.load(world["checkpoint"], "cpu").configure(max_side=48)
    image = _rgb(world["val"][0])
    size = processing_size(*image.shape[:2], 48)
    assert max(size) == 48
    small = world["base"] / "small.png"
    Image.fromarray(np.ascontiguousarray(shrink_image(image, size))).save(small)
    (expected,) = _release_masks(world["train"], [small])
    np.testing.assert_array_equal(seg.predict(image), enlarge_labels(expected.astype(np.uint8),
                                                                     image.shape[:2]))


def test_predict_of_a_copied_folder_whose_data_and_descriptors_are_gone(world, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(world["run"], moved)
    images = tmp_path / "images"
    shutil.copytree(world["val"][0].parent, images)
    expected = _release_masks(world["train"], sorted(images.iterdir()))
    hidden = [(world["root"], world["root"].with_name("data_hidden")),
              (world["descriptors"], world["descriptors"].with_suffix(".hidden"))]
    for path, away in hidden:
        path.rename(away)
    try:
        assert main(["predict", str(images), "--checkpoint", str(moved), "--out", str(tmp_path / "out"),
                     "--quiet"]) == 0
    finally:
        for path, away in hidden:
            away.rename(path)
    for mask, ref in zip(_masks(tmp_path / "out", sorted(images.iterdir())), expected):
        np.testing.assert_array_equal(mask, ref)


# ====================================================================== weakclip export
def _inputs(world, seg) -> list[np.ndarray]:
    """Normalised photos of the set at sizes other than the traced one: non-square, sides that are not
    multiples of the patch (the patch convolution drops the remainder), CLIP's own grid side (64: the
    positional embedding is not resized there), the release's square, and a batch of two."""
    mean, std = np.float32(seg.mean), np.float32(seg.std)
    out = []
    sizes = ((64, 96), (70, 45), (64, 64), (80, 80))
    for path, (h, w) in zip([*world["val"], world["val"][0]], sizes):
        image = np.asarray(Image.fromarray(_rgb(path)).resize((w, h), Image.BILINEAR), dtype=np.float32)
        out.append(np.ascontiguousarray(((image - mean) / std).transpose(2, 0, 1)[None]))
    out.append(np.concatenate([out[0], out[0][:, :, :, ::-1]]).copy())
    return out


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    from weakclip.export.bundle import TOLERANCE

    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOLERANCE * np.abs(ref).max(), np.abs(got - ref).max()
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.999


def _pytorch(seg, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return seg.network(torch.from_numpy(x)).numpy()


def test_export_onnx_runs_in_onnxruntime_alone_as_pytorch(world, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'weakclip[export]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'weakclip[export]'")
    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", str(world["run"]), "--format", "onnx", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported excel ")
    assert "train stage of the weakclip run" in lines[0] and "any H and W of at least 32" in lines[0]
    meta = json.loads((out / "weakclip-model.json").read_text())
    assert meta["kind"] == "excel" and meta["classes"] == world["classes"]
    assert meta["input"]["multiple_of"] == 1 and meta["input"]["min_side"] == 32
    assert meta["input"]["shape"] == ["batch", 3, "height", "width"]
    assert meta["check"]["input_shape"] == [1, 3, 128, 96]  # traced at 96 x 128: not CLIP's grid side 64
    assert meta["test_time"]["size"] == 64 and meta["test_time"]["scales"] == [0.75, 1.0, 1.5]
    assert meta["mean"] == [123.675, 116.28, 103.53]
    seg = weakclip.load(world["run"], "cpu")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    classes_seen = set()
    for x in _inputs(world, seg):
        ref = _pytorch(seg, x)
        _assert_close(session.run(None, {"image": x})[0], ref)
        classes_seen |= set(np.unique(ref.argmax(axis=1)).tolist())
    assert len(classes_seen) >= 2  # the argmax comparison means something
    assert seg.network.net.clip_pass.cache_positions  # the export's switch is back


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_round_trip(world, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["export", str(world["checkpoint"]), "--format", "torchscript", "--out", str(out)]) == 0
    meta = json.loads((out / "weakclip-model.json").read_text())
    assert meta["format"] == "torchscript" and meta["kind"] == "excel"
    module = torch.jit.load(str(out / "model.pt"))
    seg = weakclip.load(world["checkpoint"], "cpu")
    for x in _inputs(world, seg):
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        _assert_close(got, _pytorch(seg, x))


# ====================================================================== weakclip train
def _train_argv(world, workdir: Path, *extra: str) -> list[str]:
    argv = ["train", "--preset", "excel-voc", "--data-root", str(world["root"]), "--clip-weights",
            str(world["weights"]), "--descriptors", str(world["descriptors"]), "--workdir", str(workdir),
            "--quiet"]
    for item in SETTINGS:
        argv += ["--set", item]
    return argv + list(extra)


def test_train_command_runs_and_resumes_as_the_python_training(world, tmp_path, capsys):
    """``weakclip train --preset excel-voc``: stopped after one iteration, resumed; the final network equals
    the module's, trained by ``train_excel`` in one go with the same settings."""
    from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint
    from weakclip.sections import read_yaml

    work = tmp_path / "work"
    assert main(_train_argv(world, work, "--print-config")) == 0
    printed = capsys.readouterr().out
    assert "method: excel" in printed and "crop_size: 48" in printed and "clip_arch: tiny-excel" in printed
    assert latest_checkpoint(work) is None
    assert main(_train_argv(world, work, "--max-iters-this-run", "1")) == 0
    capsys.readouterr()
    assert load_checkpoint(latest_checkpoint(work))["iteration"] == 1
    assert main(_train_argv(world, work, "--resume")) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") + 1:])
    assert summary["method"] == "excel" and summary["start_iter"] == 1 and summary["finished"]
    a, b = load_checkpoint(latest_checkpoint(work)), load_checkpoint(world["as_trained"])
    assert a["iteration"] == b["iteration"] == ITERS and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert read_yaml(work / "config.yaml")["method"] == "excel"


# ====================================================================== one-line errors
def _fails(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_the_other_methods_folders_are_refused_in_one_line(world, tmp_path, capsys):
    from weakclip.config import load_preset
    from weakclip.engine.checkpoint import save_checkpoint
    from weakclip.inference.loading import load_trained_model

    # an ExCEL checkpoint given to what needs WeakCLIP's refinement model
    with pytest.raises(WeakclipError) as info:
        load_trained_model(world["checkpoint"], world["weights"])
    text = str(info.value)
    assert "holds an ExCEL result, but this asks for WeakCLIP" in text and "\n" not in text
    assert "weakclip predict" in text and "--preset excel-voc --resume" in text
    excel_work = tmp_path / "excel_work"
    shutil.copytree(world["train"], excel_work)
    _fails(capsys, ["train", "--preset", "voc", "--data-root", str(world["root"]), "--workdir",
                    str(excel_work), "--resume"],
           "holds an ExCEL result, but this asks for WeakCLIP", "--preset excel-voc")
    # a WeakCLIP work folder resumed as ExCEL's training
    weak = tmp_path / "weak"
    save_checkpoint(weak, {"iteration": 3, "model": {}, "config": load_preset("voc").to_dict()}, 3)
    _fails(capsys, _train_argv(world, weak, "--resume"), "holds a WeakCLIP result, but this asks for ExCEL",
           "--preset voc")
    before = sorted(p.name for p in (weak / "checkpoints").iterdir())
    assert before == ["iter_0000003.pth", "latest"] and not (weak / "log.csv").exists()
    # flags of the other method
    _fails(capsys, _train_argv(world, tmp_path / "w1", "--seeds", str(tmp_path)), "--seeds", "without seeds")
    _fails(capsys, ["train", "--preset", "voc", "--data-root", str(world["root"]), "--workdir",
                    str(tmp_path / "w2"), "--descriptors", str(world["descriptors"])], "--descriptors")
    # a WeakCLIP stage of an ExCEL run
    _fails(capsys, ["predict", str(world["val"][0]), "--checkpoint", str(world["run"]), "--stage", "refine",
                    "--out", str(tmp_path / "o")], "no network stage 'refine'")


def test_bad_descriptors_are_one_line_errors_before_any_work(world, tmp_path, capsys):
    not_json = tmp_path / "bad.json"
    not_json.write_text("{'disk': ['a disk']}")
    missing = tmp_path / "missing.json"
    table = json.loads(world["descriptors"].read_text())
    del table["ring"]
    missing.write_text(json.dumps(table))
    cases = ((not_json, ("is not JSON", str(not_json))),
             (missing, ("has no descriptors for class 'ring'", str(missing))))
    for i, (path, words) in enumerate(cases):
        work = tmp_path / f"w{i}"
        argv = _train_argv(world, work)
        argv[argv.index("--descriptors") + 1] = str(path)
        _fails(capsys, argv, *words)
        assert not (work / "checkpoints").exists() and not (work / "config.yaml").exists()


def test_check_descriptors_is_the_one_check(world):
    from weakclip.errors import DataError
    from weakclip.methods.excel.text import check_descriptors

    table = check_descriptors(world["descriptors"], world["classes"], "folder")
    assert list(table) == world["classes"][1:]
    with pytest.raises(DataError, match="has no descriptors for class 'star'"):
        check_descriptors(world["descriptors"], [*world["classes"], "star"], "folder")
    with pytest.raises(DataError, match="names class 'ring', which the data does not have"):
        check_descriptors(world["descriptors"], world["classes"][:-1], "folder")


def test_the_readme_command_lines_parse():
    """The README's "ExCEL from the command line" block: each line is a command the CLI takes as written."""
    import re
    import shlex

    from weakclip.cli import build_parser
    from weakclip.methods import of_preset

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### ExCEL from the command line"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [" ".join(shlex.split(line, comments=True)) for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("weakclip ")]
    assert [c[0] for c in commands] == ["train", "predict", "export"]
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert args.func is not None
    assert of_preset(build_parser().parse_args(commands[0]).preset).name == "excel"
