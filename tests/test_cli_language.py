"""One command-line language (issue 23): every option explained, one spelling and one rule per setting,
old spellings as noted hidden aliases, each command's default split of a folder dataset, flags without
effect said."""

from __future__ import annotations

import argparse
import shutil

import pytest

from tiny_refinement import tiny_refinement_folder
from weakclip.cli import build_parser, main
from weakclip.commands.flags import AMP_CHOICES, CRF_CHOICES, DATASET_KINDS, PRESET_NAMES
from weakclip.data.synthetic import make_synthetic_dataset


def _parsers(parser: argparse.ArgumentParser, path: str = "weakclip"):
    """Every parser under ``parser`` (itself included) with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _options(name: str):
    """(command path, action) of every visible option spelled ``name``."""
    return [(path, a) for path, p in _parsers(build_parser()) for a in p._actions
            if name in a.option_strings and a.help is not argparse.SUPPRESS]


def test_every_parser_has_a_description_and_every_option_help():
    seen = 0
    for path, parser in _parsers(build_parser()):
        if path != "weakclip":
            assert parser.description and parser.description.strip(), f"{path}: no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # the listed sub-commands / actions
                    assert choice.help and choice.help.strip(), f"{path} {choice.dest}: no help"
                continue
            name = action.option_strings or action.dest
            assert action.help and action.help.strip(), f"{path} {name}: no help"
            seen += 1
    assert seen > 150  # the walk reached every sub-command and its options


def test_one_spelling_and_one_set_of_values_per_setting():
    from weakclip.config import DATASET_KINDS as CONFIG_KINDS
    from weakclip.config import PRESETS
    from weakclip.retrain.config import RETRAIN_PRESETS

    assert DATASET_KINDS == CONFIG_KINDS and PRESET_NAMES == PRESETS == RETRAIN_PRESETS
    datasets = _options("--dataset")
    assert {p for p, _ in datasets} >= {"weakclip run", "weakclip train", "weakclip retrain",
                                        "weakclip pseudo-masks", "weakclip seeds generate",
                                        "weakclip seeds check"}
    assert all(tuple(a.choices) == DATASET_KINDS for _, a in datasets)
    crf = _options("--crf")
    assert {p for p, _ in crf} == {"weakclip run", "weakclip retrain", "weakclip pseudo-masks",
                                   "weakclip predict"}
    assert all(tuple(a.choices) == CRF_CHOICES for _, a in crf)
    amp = _options("--amp")
    assert {p for p, _ in amp} == {"weakclip train", "weakclip pseudo-masks", "weakclip predict"}
    assert all(tuple(a.choices) == AMP_CHOICES for _, a in amp)
    devices = _options("--device")
    assert len(devices) == 7 and len({a.type for _, a in devices}) == 1  # one shared argparse type
    scales = _options("--scales")
    assert {p for p, _ in scales} == {"weakclip run", "weakclip retrain", "weakclip pseudo-masks",
                                      "weakclip predict", "weakclip seeds generate"}
    assert all(a.nargs == "+" and a.type is float for _, a in scales)
    for gone in ("--no-crf", "--pseudo-scales", "--seeds-batch", "--image-batch"):
        assert _options(gone) == []  # hidden aliases only
    presets = dict(_options("--preset"))
    for command in ("weakclip train", "weakclip retrain", "weakclip run"):
        assert all(name in presets[command].help for name in PRESET_NAMES), command


@pytest.mark.parametrize("device,ok", [("cpu", True), ("cuda", True), ("cuda:3", True), ("CUDA:0", True),
                                       ("gpu", False), ("cuda:x", False), ("cuda1", False), ("mps", False)])
def test_one_device_rule_everywhere(device, ok, capsys):
    argvs = [["run", "--data-root", "d", "--workdir", "w"], ["demo"], ["train", "--workdir", "w"],
             ["retrain", "--workdir", "w"],
             ["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o"],
             ["predict", "x.jpg", "--checkpoint", "c", "--out", "o"],
             ["seeds", "--data-root", "d", "--clip-weights", "c", "--out", "o"]]
    parser = build_parser()
    for argv in argvs:
        if ok:
            assert parser.parse_args([*argv, "--device", device]).device == device.lower()
        else:
            with pytest.raises(SystemExit) as exc:
                parser.parse_args([*argv, "--device", device])
            assert exc.value.code == 2
            assert "expected cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("old,new", [
    (["run", "--data-root", "d", "--workdir", "w", "--pseudo-scales", "0.5", "1"],
     ["run", "--data-root", "d", "--workdir", "w", "--scales", "0.5", "1"]),
    (["run", "--data-root", "d", "--workdir", "w", "--seeds-batch", "8"],
     ["run", "--data-root", "d", "--workdir", "w", "--batch-size", "8"]),
    (["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--no-crf"],
     ["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--crf", "none"]),
    (["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--image-batch", "4"],
     ["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--batch-size", "4"]),
    (["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--amp"],
     ["pseudo-masks", "--checkpoint", "c", "--data-root", "d", "--out", "o", "--amp", "bf16"]),
    (["predict", "x.jpg", "--amp", "--checkpoint", "c", "--out", "o"],
     ["predict", "x.jpg", "--amp", "bf16", "--checkpoint", "c", "--out", "o"]),
    (["retrain", "--workdir", "w", "--crf"], ["retrain", "--workdir", "w", "--crf", "auto"]),
])
def test_old_spellings_parse_as_the_new_ones_with_a_note(old, new, capsys):
    parser = build_parser()
    assert vars(parser.parse_args(new)) == vars(parser.parse_args(old))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and ("renamed" in err[0] or "deprecated" in err[0])


def test_old_spellings_still_act(tmp_path, capsys):
    """Through main: the alias reaches the setting (a bad value is refused by the setting's own check)."""
    pm = ["pseudo-masks", "--checkpoint", str(tmp_path / "c.pth"), "--data-root", str(tmp_path), "--out",
          str(tmp_path / "o")]
    assert main([*pm, "--image-batch", "0"]) == 2
    assert "pseudo.image_batch must be >= 1" in capsys.readouterr().err
    assert main([*pm, "--batch-size", "0"]) == 2
    assert "pseudo.image_batch must be >= 1" in capsys.readouterr().err


def test_seeds_actions_and_their_required_options(capsys):
    parser = build_parser()
    short = parser.parse_args(["seeds", "--data-root", "d", "--clip-weights", "c", "--out", "o"])
    long = parser.parse_args(["seeds", "generate", "--data-root", "d", "--clip-weights", "c", "--out", "o"])
    assert vars(short) == vars(long) and short.seeds_action == "generate"
    check = parser.parse_args(["seeds", "check", "s", "--data-root", "d"])
    assert check.seeds_action == "check" and str(check.dir) == "s"
    with pytest.raises(SystemExit):
        parser.parse_args(["seeds"])
    assert "required: --data-root, --clip-weights, --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["seeds", "check", "s"])
    assert "required: --data-root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["seeds", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "check" in out and "default action" in out


def _folder(tmp_path, n_train=3, n_val=2):
    return make_synthetic_dataset(tmp_path / "data", n_train=n_train, n_val=n_val, image_size=(32, 40))


def test_folder_datasets_take_their_own_splits_by_default(tmp_path, capsys):
    root = _folder(tmp_path)
    assert main(["train", "--dataset", "folder", "--data-root", str(root), "--workdir", str(tmp_path / "w"),
                 "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "split: train\n" in out and "training split 'train' (splits/train.txt)" in err
    assert main(["retrain", "--dataset", "folder", "--data-root", str(root), "--workdir", str(tmp_path / "w"),
                 "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "split: train\n" in out and "val_split: val\n" in out and "val split 'val'" in err
    assert main(["retrain", "--data-root", str(root), "--workdir", str(tmp_path / "w"), "--print-config",
                 "--scales", "0.75", "1.25"]) == 0
    assert "scales: [0.75, 1.25]\n" in capsys.readouterr().out
    # without split lists: every labelled image for training, and no evaluation
    shutil.rmtree(root / "splits")
    assert main(["retrain", "--dataset", "folder", "--data-root", str(root), "--workdir", str(tmp_path / "w"),
                 "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "split: null" in out and "val_split: null" in out and "every labelled image" in err


def test_run_on_a_folder_dataset_takes_its_own_splits(tmp_path):
    from weakclip.pipeline import Pipeline, PipelineConfig

    root = _folder(tmp_path)
    lines = []
    pipe = Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=root, dataset="folder"),
                    log=lines.append)
    assert pipe.train_split == pipe.pseudo_split == pipe.retrain_cfg.data.split == "train"
    assert pipe.retrain_cfg.data.val_split == "val"
    assert any("training split 'train'" in line for line in lines)
    given = Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=root, dataset="folder",
                                    val_split="none"), log=lines.append)
    assert given.retrain_cfg.data.val_split is None


def test_seeds_check_of_a_folder_dataset_checks_the_training_split(tmp_path, capsys):
    """The synthetic set has seeds for its training images only: the default split has them all; every
    labelled image (the val ones too) would count seeds as missing."""
    root = _folder(tmp_path)
    assert main(["seeds", "check", str(root / "seeds"), "--data-root", str(root), "--quiet"]) == 0
    assert "training split 'train'" in capsys.readouterr().out
    assert main(["seeds", "check", str(root / "seeds"), "--data-root", str(root), "--split", "val",
                 "--quiet"]) == 1


def test_evaluate_refuses_a_class_list_of_another_size(tmp_path, capsys):
    root = _folder(tmp_path)
    pred = tmp_path / "pred"
    shutil.copytree(root / "masks", pred)
    base = ["evaluate", "--pred", str(pred), "--gt", str(root / "masks"), "--quiet"]
    assert main([*base, "--classes", "voc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has 21 classes" in err
    assert f"--classes {root / 'classes.txt'}" in err
    assert main([*base, "--classes", str(root / "classes.txt")]) == 0
    assert "mIoU 100.00%" in capsys.readouterr().out
    # ground truth without its dataset's class list: scored, with a note that the list looks too long
    bare = tmp_path / "bare" / "gt"
    shutil.copytree(root / "masks", bare)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(bare), "--quiet", "--classes", "voc"]) == 0
    assert "class ids go up to 4 but --classes voc has 21 classes" in capsys.readouterr().err
    (pred / sorted(p.name for p in pred.glob("*.png"))[0]).unlink()
    assert main([*base, "--classes", str(root / "classes.txt")]) == 2
    assert "--ids FILE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def towers_checkpoint(tmp_path_factory):
    """A tiny refinement work folder whose checkpoint holds its CLIP towers (as one trained without a
    weights file)."""
    return tiny_refinement_folder(tmp_path_factory.mktemp("towers"))


def test_pseudo_masks_default_split_and_unused_clip_weights_note(towers_checkpoint, tmp_path, capsys):
    root, work = towers_checkpoint
    unused = tmp_path / "ViT-B-16.pt"
    unused.write_bytes(b"not read")
    assert main(["pseudo-masks", "--checkpoint", str(work), "--data-root", str(root), "--out",
                 str(tmp_path / "o"), "--clip-weights", str(unused), "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err.count(f"note: --clip-weights {unused} is not used") == 1 and "holds the CLIP towers" in err
    assert "training split 'train'" in out
    train_ids = (root / "splits" / "train.txt").read_text().split()
    assert sorted(p.stem for p in (tmp_path / "o").glob("*.png")) == sorted(train_ids)


def test_predict_says_the_clip_weights_are_unused(towers_checkpoint, tmp_path, capsys):
    root, work = towers_checkpoint
    image = sorted((root / "images").iterdir())[0]
    argv = ["predict", str(image), "--checkpoint", str(work), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--quiet"]
    assert main(argv) == 0
    assert "--clip-weights" not in capsys.readouterr().err  # not given: nothing to say
    assert main([*argv, "--clip-weights", str(tmp_path / "clip.pt")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --clip-weights") and "not used" in err[0]
