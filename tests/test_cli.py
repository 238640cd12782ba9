import subprocess
import sys

import pytest

from weakclip.cli import build_parser, main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("evaluate", "prepare", "synth", "weights", "seeds", "train", "pseudo-masks", "predict",
                    "retrain", "run", "demo"):
        assert command in out


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        assert sp.format_help().startswith("usage: weakclip " + name)


def test_module_entry_point_runs():
    cmd = [sys.executable, "-m", "weakclip", "--version"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert res.stdout.startswith("weakclip ")


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_train_print_config_needs_no_data(tmp_path, capsys):
    assert main(["train", "--preset", "voc", "--workdir", str(tmp_path / "w"), "--print-config",
                 "--iters", "7", "--set", "model.match_mode=release"]) == 0
    out = capsys.readouterr().out
    assert "iters: 7" in out and "match_mode: release" in out and "clip_arch: ViT-B/16" in out
    assert not (tmp_path / "w").exists()


def test_pseudo_masks_conflicting_flags_are_a_one_line_error(tmp_path, capsys):
    args = ["pseudo-masks", "--checkpoint", str(tmp_path / "c.pth"), "--data-root", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert main([*args, "--restrict", "--no-restrict"]) == 2
    assert "--restrict and --no-restrict exclude each other" in capsys.readouterr().err
    assert main([*args, "--scales", "0", "1"]) == 2  # checked through the typed pseudo section
    assert "pseudo.scales must be positive" in capsys.readouterr().err
    assert main([*args, "--image-batch", "0"]) == 2
    assert "pseudo.image_batch must be >= 1" in capsys.readouterr().err


def test_run_seed_batch_size_is_checked_before_any_work(tmp_path, capsys):
    argv = ["run", "--data-root", str(tmp_path), "--workdir", str(tmp_path / "w"), "--batch-size", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size must be >= 1" in err
    assert not (tmp_path / "w").exists()
