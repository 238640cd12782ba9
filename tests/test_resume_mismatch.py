"""Resuming a work folder with another preset or network fails in one line that names what the folder
holds, before any weight is loaded and without touching the folder's config.yaml; a checkpoint whose
tensors have other shapes (the fallback) is worded the same way, never as PyTorch's size-mismatch list."""

from __future__ import annotations

import pytest
import torch

from weakclip.cli import main
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import WeakclipError

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny refinement model (random CLIP towers) on the synthetic data
_TINY_REFINE = ["model.clip_arch=tiny", "model.out_blocks=1,2,3,4", "model.neck_channels=32",
                "model.head_channels=32", "model.match_width=32", "model.match_layers=1",
                "train.warmup_iters=1", "loss.loss_size=16", "classes=none", "data.scale=96,64",
                "data.ratio_range=0.75,1.5"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=6, n_val=2, image_size=(64, 80),
                                  n_classes=4)


def _train_argv(root, work, preset):
    sets = [x for s in _TINY_REFINE for x in ("--set", s)]
    return ["train", "--preset", preset, "--data-root", str(root), "--dataset", "folder", "--split", "train",
            "--seeds", str(root / "masks"), "--workdir", str(work), "--device", "cpu", "--iters", "2",
            "--batch-size", "2", "--crop-size", "64", "--num-workers", "0", "--checkpoint-every", "1",
            "--max-iters-this-run", "1", "--amp", "none", "--quiet", *sets]


def test_train_resume_with_another_preset_names_the_folders(synth, tmp_path, capsys):
    work = tmp_path / "refine"
    assert main(_train_argv(synth, work, "voc")) == 0
    saved = (work / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*_train_argv(synth, work, "voc-plus"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "size mismatch" not in err and "Traceback" not in err
    # (voc and coco have the same model section: both are named)
    assert f"{work} holds a refinement model of preset voc / coco with 6 settings changed" in err
    assert "this run asks for preset voc-plus with" in err and "model.bn_eval: False -> True" in err
    assert (work / "config.yaml").read_text() == saved  # the folder still says what it holds
    # the same preset resumes
    assert main([*_train_argv(synth, work, "voc"), "--resume"]) == 0


def test_retrain_resume_with_another_network_names_it(synth, tmp_path):
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, retrain

    def cfg(name):
        return apply_retrain_overrides(load_retrain_preset("voc-plus"), [
            "data.kind=folder", f"data.root={synth}", "data.split=train", f"model.name={name}",
            "model.pretrained_backbone=false", "model.head_channels=16", "data.num_workers=0",
            "data.crop_size=48", "train.iters=2", "train.batch_size=2", "train.checkpoint_every=1"])

    work = tmp_path / "retrain"
    retrain(cfg("deeplabv3plus_resnet18"), synth / "masks", None, work, evaluate=False, progress=False,
            quiet=True, max_iters_this_run=1)
    saved = (work / "config.yaml").read_text()
    with pytest.raises(WeakclipError) as info:
        retrain(cfg("deeplabv3_resnet18"), synth / "masks", None, work, resume=True, evaluate=False,
                progress=False, quiet=True)
    message = str(info.value)
    assert "\n" not in message
    assert f"{work} holds a retrained network of deeplabv3plus_resnet18 (retrain preset voc-plus" in message
    assert "this run asks for deeplabv3_resnet18" in message
    assert "model.name: 'deeplabv3plus_resnet18' -> 'deeplabv3_resnet18'" in message
    assert (work / "config.yaml").read_text() == saved


def test_tensors_of_other_shapes_are_one_line(tmp_path):
    from weakclip.engine.checkpoint import check_shapes, load_trainable_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_shapes(model, state)  # the same network passes
    state["1.weight"] = torch.zeros(21, 3)
    state["1.bias"] = torch.zeros(21)
    with pytest.raises(WeakclipError) as info:
        load_trainable_state_dict(model, state, f"checkpoint {tmp_path / 'c.pth'}")
    message = str(info.value)
    assert "\n" not in message and "size mismatch" not in message
    assert "2 tensors of other shapes (1.weight (21, 3) in the file, (2, 3) here;" in message
