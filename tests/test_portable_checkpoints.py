"""A checkpoint works wherever it is copied (issue 27, point 3).

A small ``weakclip run`` (the demo's pipeline: tiny random CLIP, 2 iterations per network) is made with
RELATIVE paths from its own working folder, exactly as ``weakclip demo --workdir weakclip_demo`` does; its
folder is then copied elsewhere and the original (data included) deleted. From yet another working folder
each network (refinement and retrained) is predicted with, exported and loaded. Before this change the
refinement model re-read its class names from the data root recorded relative (``weakclip_demo/data``) and
failed there; the retrained network silently fell back to numbered class names. A checkpoint written before
classes were stored ("old": its classes and palette removed, its paths relative as then) needs
``--classes FILE`` and says so in one line.
"""

from __future__ import annotations

import json
import os
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
from weakclip.data.classes import voc_palette
from weakclip.data.io import read_label_png
from weakclip.errors import WeakclipError

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("refine", "retrain")
ITERS = 2


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory, one_thread):
    """``(the copied run folder, the class names, another working folder with a photo)``."""
    from weakclip.demo import DemoSize, run_demo

    base = tmp_path_factory.mktemp("portable")
    size = DemoSize(n_train=4, n_val=2, refine_iters=ITERS, retrain_iters=ITERS, image_size=(32, 48))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)  # relative work folder, data root and CLIP weights, as `weakclip demo` records them
        run_demo("weakclip_demo", size, device="cpu", progress=False, log=lambda line: None)
    classes = (base / "weakclip_demo" / "data" / "classes.txt").read_text().split()
    moved = base / "elsewhere" / "run"
    shutil.copytree(base / "weakclip_demo", moved)
    shutil.rmtree(base / "weakclip_demo")  # the original run and its data are gone
    shutil.rmtree(moved / "data")
    other = base / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(other / "x.png")
    return moved, classes, other


def _checkpoint(run: Path, stage: str) -> Path:
    return run / stage / "checkpoints" / f"iter_{ITERS:07d}.pth"


def _old_checkpoint(run: Path, stage: str, dest: Path) -> Path:
    """The stage's checkpoint as the code before this change wrote it: no classes or palette, paths relative
    to the working folder of the run (``weakclip_demo/...``)."""
    state = torch.load(_checkpoint(run, stage), weights_only=True)
    del state["classes"], state["palette"]
    state["config"]["data"]["root"] = "weakclip_demo/data"
    if state.get("clip_weights"):
        state["clip_weights"] = "weakclip_demo/tiny_clip.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest


def _one_line(capsys, argv: list[str], words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    return err


# ====================================================================== what a run records
def test_the_run_records_classes_palette_and_absolute_paths(run_copy):
    run, classes, _ = run_copy
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == classes and info["palette"] == voc_palette(len(classes)).tolist()
    for stage in STAGES:
        state = torch.load(_checkpoint(run, stage), weights_only=True)
        assert state["classes"] == classes and state["palette"] == voc_palette(len(classes)).tolist()
        data = state["config"]["data"]
        assert Path(data["root"]).is_absolute() and data["root"].endswith("weakclip_demo/data")
        for key in ("seeds", "masks"):
            assert data.get(key) is None or Path(data[key]).is_absolute()
    clip = torch.load(_checkpoint(run, "refine"), weights_only=True)["clip_weights"]
    assert Path(clip).is_absolute() and clip.endswith("weakclip_demo/tiny_clip.pt")
    for stage in ("seeds", "pseudo_masks"):
        assert Path(json.loads((run / stage / "stage.json").read_text())["settings"]["dir"]).is_absolute()
    for stage in STAGES:
        assert Path(json.loads((run / stage / "stage.json").read_text())["settings"]["config"]).is_absolute()


# ====================================================================== the copied run, from another folder
@pytest.mark.parametrize("stage", STAGES)
def test_copied_run_predicts_exports_and_loads_from_another_folder(run_copy, stage, monkeypatch, capsys):
    run, classes, other = run_copy
    monkeypatch.chdir(other)
    seg = weakclip.load(run, "cpu", stage=stage)
    assert seg.classes == classes and "numbered" not in seg.description
    np.testing.assert_array_equal(seg.palette[:len(classes)], voc_palette(len(classes)))
    # predict: the mask and the class names of its shares are the network's own
    out = Path(f"masks_{stage}")
    argv = ["predict", "x.png", "--checkpoint", str(run), "--stage", stage, "--out", str(out), "--quiet",
            "--json", f"{stage}.json"]
    assert main(argv) == 0, capsys.readouterr().err
    mask = read_label_png(out / "x.png", expected_hw=(40, 52))
    np.testing.assert_array_equal(mask, seg.predict(Image.open("x.png")))
    shares = json.loads(Path(f"{stage}.json").read_text())["images"]["x.png"]["shares"]
    assert set(shares) <= set(classes) and sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    # export: the metadata names the classes and palette the network was trained with
    capsys.readouterr()
    argv = ["export", str(run), "--stage", stage, "--format", "torchscript", "--out", f"exp_{stage}"]
    assert main(argv) == 0
    meta = json.loads(Path(f"exp_{stage}/weakclip-model.json").read_text())
    assert meta["classes"] == classes and meta["palette"] == voc_palette(len(classes)).tolist()


def test_the_issue_command_in_a_subprocess_from_another_folder(run_copy):
    """``weakclip predict x.jpg --checkpoint /abs/run --stage refine --out o`` run elsewhere (issue 27)."""
    run, _, other = run_copy
    env = {**os.environ, "PYTHONPATH": str(Path(weakclip.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "weakclip", "predict", "x.png", "--checkpoint", str(run),
                           "--stage", "refine", "--out", "o_sub", "--quiet"], cwd=other, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (other / "o_sub" / "x.png").is_file() and (other / "o_sub" / "x_overlay.png").is_file()


def test_a_stored_palette_travels_to_the_segmenter_and_the_export(run_copy, tmp_path, monkeypatch, capsys):
    run, classes, _ = run_copy
    state = torch.load(_checkpoint(run, "retrain"), weights_only=True)
    colours = [[10 * i, 255 - 10 * i, 7] for i in range(len(classes))]
    state["palette"] = colours
    torch.save(state, tmp_path / "coloured.pth")
    monkeypatch.chdir(tmp_path)
    seg = weakclip.load("coloured.pth", "cpu")
    assert seg.palette[:len(classes)].tolist() == colours
    assert seg.palette[len(classes):].tolist() == voc_palette(256)[len(classes):].tolist()
    assert main(["export", "coloured.pth", "--format", "torchscript", "--out", "exp"]) == 0
    assert json.loads(Path("exp/weakclip-model.json").read_text())["palette"] == colours


# ====================================================================== checkpoints written before the change
def test_old_refinement_checkpoint_needs_classes_and_works_with_them(run_copy, tmp_path, monkeypatch, capsys):
    run, classes, other = run_copy
    old = _old_checkpoint(run, "refine", tmp_path / "old" / "refine.pth")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    monkeypatch.chdir(other)
    # today's failure, now saying what to do, in one line
    with pytest.raises(WeakclipError, match="stores no class names") as info:
        weakclip.load(old, "cpu")
    assert "\n" not in str(info.value) and "pass --classes FILE" in str(info.value)
    assert "weakclip_demo/data/classes.txt is not readable here" in str(info.value)
    base = ["predict", "x.png", "--checkpoint", str(old), "--out", "o_old", "--quiet"]
    _one_line(capsys, base, "pass --classes FILE")
    _one_line(capsys, ["export", str(old), "--format", "torchscript", "--out", "e_old"],
              "pass --classes FILE")
    assert not Path("o_old").exists() and not Path("e_old").exists()
    # with the class list: the same network, the same masks as the checkpoint that stores its classes
    assert main([*base, "--classes", str(tmp_path / "classes.txt")]) == 0
    new = weakclip.load(run, "cpu", stage="refine")
    np.testing.assert_array_equal(read_label_png("o_old/x.png"), new.predict(Image.open("x.png")))
    seg = weakclip.load(old, "cpu", classes=tmp_path / "classes.txt")
    assert seg.classes == classes and "class names given" in seg.description
    assert weakclip.load(old, "cpu", classes=classes).classes == classes  # a list of names
    assert main(["export", str(old), "--format", "torchscript", "--out", "e_old", "--classes",
                 str(tmp_path / "classes.txt")]) == 0
    assert json.loads(Path("e_old/weakclip-model.json").read_text())["classes"] == classes
    # pseudo-masks of a dataset elsewhere: the same rule
    from weakclip.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data2", n_train=1, n_val=0, image_size=(32, 48))
    pm = ["pseudo-masks", "--checkpoint", str(old), "--data-root", str(data), "--dataset", "folder",
          "--out", "pm", "--crf", "none", "--quiet"]
    _one_line(capsys, pm, "pass --classes FILE")
    assert main([*pm, "--classes", str(tmp_path / "classes.txt")]) == 0
    assert len(list(Path("pm").glob("*.png"))) == 1
    # a list of another length does not fit the network: one line
    (tmp_path / "short.txt").write_text("background\ndisk\n")
    _one_line(capsys, [*base[:-3], "--out", "o_short", "--classes", str(tmp_path / "short.txt")],
              f"has 2 names (background, disk), but the network of checkpoint {old} predicts "
              f"{len(classes)} classes")
    _one_line(capsys, [*base[:-3], "--out", "o_bad", "--classes", str(tmp_path / "missing.txt")],
              "class list not found")


def test_old_retrained_checkpoint_numbers_its_classes_until_given_them(run_copy, tmp_path, monkeypatch,
                                                                       capsys):
    run, classes, other = run_copy
    old = _old_checkpoint(run, "retrain", tmp_path / "retrain.pth")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    monkeypatch.chdir(other)
    seg = weakclip.load(old, "cpu")  # the network still runs: its class count, numbered names
    assert seg.classes == ["background", *(f"class_{i}" for i in range(1, len(classes)))]
    assert "classes numbered (pass --classes FILE for names)" in seg.description
    named = weakclip.load(old, "cpu", classes=str(tmp_path / "classes.txt"))
    assert named.classes == classes and "class names given" in named.description
    np.testing.assert_array_equal(named.predict(Image.open("x.png")), seg.predict(Image.open("x.png")))
    assert main(["predict", "x.png", "--checkpoint", str(old), "--out", "o_rt", "--quiet", "--json",
                 "rt.json", "--classes", str(tmp_path / "classes.txt")]) == 0
    assert set(json.loads(Path("rt.json").read_text())["images"]["x.png"]["shares"]) <= set(classes)
    (tmp_path / "long.txt").write_text("\n".join([*classes, "extra"]) + "\n")
    _one_line(capsys, ["export", str(old), "--format", "torchscript", "--out", "e_rt", "--classes",
                       str(tmp_path / "long.txt")], f"has {len(classes) + 1} names")
    # names given replace the stored ones (same count)
    renamed = ["background", *(f"c{i}" for i in range(1, len(classes)))]
    assert weakclip.load(run, "cpu", classes=renamed).classes == renamed


def test_given_class_lists_are_checked_in_one_line(run_copy):
    run, classes, _ = run_copy
    for bad, words in ((["disk", "background"], "the first class must be 'background'"),
                       (["background", "disk", "disk"], "duplicate class names"),
                       ([], "empty class list"), (3, "expected a class-list file or a list of names")):
        with pytest.raises(WeakclipError, match=words) as info:
            weakclip.load(run, "cpu", classes=bad)
        assert "\n" not in str(info.value)
