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
