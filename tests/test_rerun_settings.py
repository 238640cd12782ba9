"""A finished ``weakclip run`` started again with other settings (issue 27, point 2): a setting that changes
a stage's results is refused in one line naming the stage, the setting, both values and the way out, before
anything is written; a setting that does not is a one-line note; ``--redo STAGE`` recomputes that stage and
every stage after it; ``run.json`` describes what the folder holds. Before, the run exited 0, skipped every
stage and rewrote ``run.json`` with the new preset."""

from __future__ import annotations

import json
import shutil

import pytest

from weakclip.cli import main
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.demo import DemoSize, make_tiny_clip, refine_overrides, retrain_overrides
from weakclip.pipeline import STAGES

pytestmark = pytest.mark.usefixtures("one_thread")

_SIZE = DemoSize(n_train=4, n_val=2, refine_iters=2, retrain_iters=2)


def _argv(root, clip, work, *extra):
    """The demo's run at a tiny size as a ``weakclip run`` command line, without worker processes."""
    refine = [s for s in refine_overrides(_SIZE) if not s.startswith("pseudo.scales=")]
    refine += ["data.num_workers=0", "pseudo.crf_workers=0"]
    sets = [x for s in refine for x in ("--set", s)]
    retrain_sets = [x for s in [*retrain_overrides(_SIZE), "data.num_workers=0"] for x in ("--retrain-set", s)]
    return ["run", "--data-root", str(root), "--dataset", "folder", "--split", "train", "--val-split", "val",
            "--clip-weights", str(clip), "--seeds", str(root / "seeds"), "--retrain-preset", "voc-plus",
            "--no-pretrained", "--workdir", str(work), "--device", "cpu", "--quiet", "--scales", "1.0",
            *sets, *retrain_sets, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: (data root, CLIP weights, work folder); tests work on copies of the folder."""
    base = tmp_path_factory.mktemp("rerun")
    root = make_synthetic_dataset(base / "data", n_train=_SIZE.n_train, n_val=_SIZE.n_val,
                                  image_size=_SIZE.image_size)
    clip = make_tiny_clip(base / "clip.pt")
    work = base / "run0"
    assert main(_argv(root, clip, work)) == 0
    return root, clip, work


def _copy(finished, tmp_path):
    root, clip, work = finished
    copy = tmp_path / "run0"
    shutil.copytree(work, copy)
    return root, clip, copy


def _snapshot(work):
    """Every file of the folder with its bytes (the lock file aside)."""
    return {p.relative_to(work): p.read_bytes() for p in sorted(work.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _record(work, stage):
    return json.loads((work / stage / "stage.json").read_text())


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_another_preset_is_refused_and_nothing_is_written(finished, tmp_path, capsys):
    root, clip, work = _copy(finished, tmp_path)
    before = _snapshot(work)
    capsys.readouterr()
    assert main(_argv(root, clip, work, "--preset", "voc-plus")) == 2
    err = _error_line(capsys)
    # the first stage whose results the preset changes is the refinement (the seeds are external)
    assert err.startswith(f"weakclip run: error: refine in {work} was made with model.")
    assert "this run asks for" in err and "preset voc, this run voc-plus" in err
    assert f"use a new --workdir, or pass --redo refine to recompute refine and every stage after it" in err
    assert _snapshot(work) == before  # run.json still says voc
    assert json.loads((work / "run.json").read_text())["preset"] == "voc"


def test_other_pseudo_mask_scales_are_refused(finished, tmp_path, capsys):
    root, clip, work = _copy(finished, tmp_path)
    before = _snapshot(work)
    assert _record(work, "pseudo_masks")["settings"]["scales"] == [1.0]
    capsys.readouterr()
    argv = _argv(root, clip, work)
    argv[argv.index("--scales") + 1] = "0.5"
    assert main(argv) == 2
    err = _error_line(capsys)
    assert (f"pseudo_masks in {work} was made with pseudo.scales = [1.0], this run asks for [0.5]: use a new "
            "--workdir, or pass --redo pseudo_masks") in err
    assert _snapshot(work) == before
