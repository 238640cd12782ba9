"""The README and docs cannot drift from the CLI: every `weakclip` command line of their code blocks parses
with the CLI's own parser, and the README's own-data example runs as it stands on the synthetic set
(issue 23)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from weakclip.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """The `weakclip ...` command lines of the fenced code blocks of a Markdown text, continuation lines
    joined, comments dropped; `torchrun ... -m weakclip ...` and `python -m weakclip ...` count too."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n[ \t]*", " ", block).splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an unbalanced quote: Python, not a shell line
                continue
            for k, word in enumerate(words):
                if word == "weakclip" and (k == 0 or words[k - 1] == "-m"):
                    out.append(shlex.join(words[k:]))
                    break
    return out


def test_command_lines_are_found_with_continuations_and_comments():
    text = ("```bash\n# weakclip demo --not-this\n"
            "weakclip run --preset voc \\\n    --workdir w   # a comment\n"
            "torchrun --nproc_per_node=2 -m weakclip train --workdir t\nimport weakclip\n```\n"
            "weakclip outside --a-block\n```python\nseg = weakclip.load('w')\n```\n")
    assert command_lines(text) == ["weakclip run --preset voc --workdir w", "weakclip train --workdir t"]


def _all_lines() -> list[tuple[str, str]]:
    return [(path.name, line) for path in DOCS for line in command_lines(path.read_text(encoding="utf-8"))]


def test_the_docs_have_command_lines():
    names = {line.split()[1] for _, line in _all_lines()}
    assert {"run", "seeds", "train", "pseudo-masks", "retrain", "export", "prepare", "demo"} <= names


@pytest.mark.parametrize("where,line", _all_lines())
def test_every_documented_command_line_parses(where, line, capsys):
    """Every sub-command and flag exists, in its current spelling (an old one would print a note)."""
    try:
        build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line}` does not parse: {capsys.readouterr().err.strip()} ({exc.code})")
    assert capsys.readouterr().err == "", f"{where}: `{line}` uses an old spelling"


def _own_data_example() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Running on your own data", 1)[1]
    return shlex.split(command_lines(section)[0])


def test_the_readme_own_data_example_runs_end_to_end(tmp_path, monkeypatch, one_thread, capsys):
    """The README's `weakclip run ... --dataset folder` command on the synthetic set, its file names
    replaced by the test's files and tiny overrides appended: a tiny random CLIP, a few iterations,
    ResNet-18 DeepLabV3 with the given (random) ImageNet file in place of ResNet-38. Every flag of the
    example stays as written."""
    import torch
    import torchvision

    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.demo import DemoSize, make_tiny_clip, refine_overrides, retrain_overrides

    argv = _own_data_example()
    assert argv[:2] == ["weakclip", "run"] and "--backbone-weights" in argv
    monkeypatch.chdir(tmp_path)
    make_synthetic_dataset(tmp_path / argv[argv.index("--data-root") + 1], n_train=4, n_val=2,
                           image_size=(48, 64))
    make_tiny_clip(tmp_path / argv[argv.index("--clip-weights") + 1])
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    argv[argv.index("--backbone-weights") + 1] = str(resnet)  # ResNet-38's file -> the small network's
    size = DemoSize(n_train=4, n_val=2, refine_iters=2, retrain_iters=2, image_size=(48, 64))
    given = ("data.split=", "data.val_split=", "model.pretrained_backbone=")  # the example's flags say these
    tiny = [*(x for o in refine_overrides(size) if not o.startswith(given) for x in ("--set", o)),
            *(x for o in retrain_overrides(size) if not o.startswith(given) for x in ("--retrain-set", o)),
            "--set", "train.batch_size=2", "--retrain-set", "train.batch_size=2", "--device", "cpu",
            "--quiet"]
    assert main(argv[1:] + tiny) == 0
    # the run's --clip-weights served its seeds and refinement: no note that a stage did not use it
    assert "is not used" not in capsys.readouterr().err
    work = tmp_path / argv[argv.index("--workdir") + 1]
    report = json.loads((work / "report.json").read_text())
    assert report["seeds_miou"] is not None and report["pseudo_miou"] is not None
    assert report["final_miou"] is not None  # the val split was evaluated
    run = json.loads((work / "run.json").read_text())
    assert (run["train_split"], run["val_split"]) == ("train", "val")
    retrain_cfg = (work / "retrain" / "config.yaml").read_text()
    assert f"backbone_weights: {resnet}" in retrain_cfg and "pretrained_backbone: true" in retrain_cfg
