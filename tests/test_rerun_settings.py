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
    retrain = [*retrain_overrides(_SIZE), "data.num_workers=0"]
    retrain_sets = [x for s in retrain for x in ("--retrain-set", s)]
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
    assert "use a new --workdir, or pass --redo refine to recompute refine and every stage after it" in err
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


def test_settings_that_do_not_change_results_are_a_note(finished, tmp_path, capsys):
    """Worker counts, and a data folder and seed folder moved elsewhere (same images, same seed files): one
    note per stage, every stage reused, nothing recomputed; run.json then names where the data is now."""
    root, clip, work = _copy(finished, tmp_path)
    moved = tmp_path / "moved_data"
    shutil.copytree(root, moved)
    records = {s: (work / s / "stage.json").read_bytes() for s in STAGES}
    capsys.readouterr()
    argv = _argv(moved, clip, work, "--set", "data.num_workers=1", "--set", "pseudo.crf_workers=1",
                 "--retrain-set", "train.log_every=1")
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if line.startswith("note: ")]
    assert len(notes) == 4 and all("not change its results, so it is reused" in n for n in notes)
    assert notes[0] == (f"note: seeds was made with data.root {root} -> {moved}, seeds.dir {root / 'seeds'} "
                        f"-> {moved / 'seeds'}: these do not change its results, so it is reused")
    assert "data.num_workers 0 -> 1" in notes[1] and "pseudo.crf_workers 0 -> 1" in notes[2]
    assert "train.log_every 10 -> 1" in notes[3]
    assert sum(line.startswith(f"== {s}: complete, skipped") for s in STAGES for line in out) == 4
    assert {s: (work / s / "stage.json").read_bytes() for s in STAGES} == records
    assert json.loads((work / "run.json").read_text())["data_root"] == str(moved)


def test_other_images_or_retraining_settings_are_refused(finished, tmp_path, capsys):
    root, clip, work = _copy(finished, tmp_path)
    # the same folder name holding fewer images: refused at the first stage, the seeds
    fewer = tmp_path / "fewer"
    shutil.copytree(root, fewer)
    split = fewer / "splits" / "train.txt"
    split.write_text("\n".join(split.read_text().split()[:3]) + "\n")
    capsys.readouterr()
    assert main(_argv(fewer, clip, work)) == 2
    err = _error_line(capsys)
    assert f"seeds in {work} was made with data.images = 4 images, ids sha256 " in err
    assert ", this run asks for 3 images, ids sha256 " in err and "--redo seeds" in err
    assert main(_argv(root, clip, work, "--retrain-set", "train.iters=3")) == 2
    assert f"retrain in {work} was made with train.iters = 2, this run asks for 3: " in _error_line(capsys)


def test_redo_recomputes_the_stage_and_the_later_ones(finished, tmp_path, capsys):
    root, clip, work = _copy(finished, tmp_path)
    kept = {s: (work / s / "stage.json").read_bytes() for s in ("seeds", "refine")}
    tokens = {s: _record(work, s)["token"] for s in STAGES}
    argv = _argv(root, clip, work, "--redo", "pseudo_masks")
    argv[argv.index("--scales") + 1] = "0.5"
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"== --redo pseudo_masks: removed pseudo_masks, retrain of {work}" in out
    assert "== seeds: complete, skipped" in out and "== refine: complete, skipped" in out
    assert "\n== pseudo_masks\n" in out and "\n== retrain\n" in out
    assert {s: (work / s / "stage.json").read_bytes() for s in ("seeds", "refine")} == kept
    pseudo, retrained = _record(work, "pseudo_masks"), _record(work, "retrain")
    assert pseudo["settings"]["scales"] == [0.5] and pseudo["made_with"]["output"]["pseudo.scales"] == [0.5]
    assert pseudo["token"] != tokens["pseudo_masks"] and retrained["token"] != tokens["retrain"]
    # each stage records which making of the stage before it it comes from
    assert pseudo["made_with"]["output"]["from.refine"].endswith(f"#{tokens['refine']}")
    assert retrained["made_with"]["output"]["from.pseudo_masks"].endswith(f"#{pseudo['token']}")
    assert (work / "retrain" / "log.txt").read_text().count("== retrain ") == 1  # a new folder
    # the folder now holds the 0.5 masks: the same command without --redo reuses everything
    argv.remove("--redo")
    argv.remove("pseudo_masks")
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": complete, skipped (--redo ") == 4


def test_a_stage_held_after_one_made_again_is_refused(finished, tmp_path, capsys):
    """The seeds' record gone (a folder deleted by hand): the seeds are made again, so the refinement made
    from the old ones would be reused with seeds it did not come from: refused, --redo seeds is the way."""
    root, clip, work = _copy(finished, tmp_path)
    (work / "seeds" / "stage.json").unlink()
    capsys.readouterr()
    assert main(_argv(root, clip, work)) == 2
    err = _error_line(capsys)
    assert err.startswith(f"weakclip run: error: refine in {work} is complete, but the seeds stage before it "
                          "is not")
    assert "pass --redo seeds to recompute seeds and every stage after it" in err


def test_an_interrupted_stage_resumes_only_with_its_settings(finished, tmp_path, capsys):
    root, clip, work = _copy(finished, tmp_path)
    (work / "retrain" / "stage.json").unlink()  # as if killed before the end
    capsys.readouterr()
    assert main(_argv(root, clip, work, "--retrain-set", "train.iters=3")) == 2
    assert (f"retrain in {work} was started with train.iters = 2, this run asks for 3: use a new --workdir, "
            "or pass --redo retrain") in _error_line(capsys)
    assert main(_argv(root, clip, work)) == 0  # the same settings resume it
    assert "resuming from" in (work / "retrain" / "log.txt").read_text()
    assert _record(work, "retrain")["made_with"]["output"]["train.iters"] == 2


def test_records_of_an_older_version_are_compared_too(finished, tmp_path, capsys):
    """A folder made before the stages recorded ``made_with``: the refinement's and retraining's config.yaml
    and the pseudo masks' stage.json settings tell what made them."""
    root, clip, work = _copy(finished, tmp_path)
    for stage in STAGES:
        path = work / stage / "stage.json"
        record = json.loads(path.read_text())
        for key in ("made_with", "finished", "token"):
            del record[key]
        path.write_text(json.dumps(record))
        (work / stage / "made_with.json").unlink()
    capsys.readouterr()
    assert main(_argv(root, clip, work)) == 0
    assert capsys.readouterr().out.count(": complete, skipped (--redo ") == 4
    argv = _argv(root, clip, work)
    argv[argv.index("--scales") + 1] = "0.5"
    assert main(argv) == 2
    assert "pseudo_masks in" in _error_line(capsys)
    assert main(_argv(root, clip, work, "--preset", "voc-plus")) == 2
    assert f"refine in {work} was made with model." in _error_line(capsys)


def test_redo_takes_a_stage_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--data-root", str(tmp_path), "--workdir", str(tmp_path / "w"), "--redo", "seed"])
    assert "invalid choice: 'seed'" in capsys.readouterr().err


# ------------------------------------------------------------------ the built-in seeds, through the API
def test_builtin_seeds_batch_is_a_note_and_the_plus_switches_are_refused(tmp_path):
    """``--batch-size`` (images through CLIP at once) is a note; ``--preset voc-plus`` switches on the seed
    departures, which change the seeds: refused, naming the preset; ``redo="seeds"`` makes them again."""
    from weakclip.errors import WeakclipError
    from weakclip.pipeline import Pipeline, PipelineConfig

    root = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=1, image_size=(48, 64))
    clip = make_tiny_clip(tmp_path / "clip.pt")
    work = tmp_path / "w"

    def run(lines=None, **kwargs):
        cfg = PipelineConfig(workdir=work, data_root=root, dataset="folder", train_split="train",
                             val_split="none", clip_weights=clip,
                             refine_overrides=["model.clip_arch=tiny-p8"], progress=False, write_html=False,
                             **kwargs)
        return Pipeline(cfg, log=(lines if lines is not None else []).append).run(stages=("seeds",))

    run()
    record = _record(work, "seeds")
    assert record["made_with"]["output"]["seeds.box_threshold"] == 0.4  # as resolved for the class list
    assert record["made_with"]["incidental"]["seeds.batch_size"] == 1
    lines: list[str] = []
    run(lines, seeds_batch=2)
    assert ("note: seeds was made with seeds.batch_size 1 -> 2: this does not change its results, so it is "
            "reused") in lines
    assert _record(work, "seeds") == record
    with pytest.raises(WeakclipError) as info:
        run(preset="voc-plus")
    message = str(info.value)
    assert f"seeds in {work} was made with seeds." in message and "preset voc, this run voc-plus" in message
    lines = []
    run(lines, preset="voc-plus", redo="seeds")
    assert f"== --redo seeds: removed seeds of {work}" in lines
    assert _record(work, "seeds")["made_with"]["incidental"]["preset"] == "voc-plus"
    assert json.loads((work / "run.json").read_text())["preset"] == "voc-plus"
