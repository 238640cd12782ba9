"""ExCEL through ``weakclip run`` / ``weakclip demo --method excel``: stages recorded, reused, resumed, the
report, the refusals (another method's folder, a changed setting, bad descriptors, WeakCLIP's flags), the
optional DeepLab retraining, and ExCEL's training-free masks as WeakCLIP's seeds (``--seed-method excel``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weakclip.cli import main
from weakclip.data.io import read_label_png

EXCEL_STAGES = ("seeds", "train", "pseudo_masks", "evaluate")


@pytest.fixture(scope="module")
def excel_demo(tmp_path_factory, one_thread):
    """``weakclip demo --method excel --small``, run once by the CLI: (work folder, printed lines)."""
    work = tmp_path_factory.mktemp("excel_demo") / "demo"
    assert main(["demo", "--method", "excel", "--small", "--workdir", str(work), "--device", "cpu",
                 "--quiet"]) == 0
    return work


def _run_argv(work: Path, *extra: str) -> list[str]:
    """The ``weakclip run`` command the demo's run stands for (its data, weights, descriptors, overrides)."""
    from weakclip.methods.excel.demo import ExcelDemoSize, demo_overrides

    sets = [x for o in demo_overrides(ExcelDemoSize.small()) for x in ("--set", o)]
    return ["run", "--preset", "excel-voc", "--dataset", "folder", "--data-root", str(work / "data"),
            "--split", "train", "--val-split", "val", "--clip-weights", str(work / "tiny_excel_clip.pt"),
            "--descriptors", str(work / "descriptors.json"), "--workdir", str(work), *sets, "--device", "cpu",
            "--quiet", *extra]


def _copy(work: Path, to: Path) -> Path:
    """A copy of the demo folder whose records point at its own data (the run reads paths from the flags)."""
    shutil.copytree(work, to)
    return to


@pytest.mark.slow
def test_excel_demo_runs_every_stage_and_reports_them(excel_demo):
    work = excel_demo
    report = json.loads((work / "report.json").read_text())
    assert report["method"] == "excel"
    for key in ("seeds_miou", "pseudo_miou", "final_miou", "network_val_miou"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 100.0, key
    assert report["final_miou"] == report["network_val_miou"]  # nothing retrained: the ExCEL network's
    run = json.loads((work / "run.json").read_text())
    assert run["method"] == "excel" and run["stages"] == list(EXCEL_STAGES) and run["retrain"] == "none"
    for stage in EXCEL_STAGES:
        record = json.loads((work / stage / "stage.json").read_text())
        assert record["status"] == "complete" and record["made_with"]["output"]["method"] == "excel"
        assert (work / stage / "log.txt").read_text().startswith(f"== {stage} ")
    assert not (work / "retrain").exists()
    # the masks: one per image at its size, the report's numbers are those of the stages' records
    train_ids = (work / "data" / "splits" / "train.txt").read_text().split()
    for folder in ("seeds", "pseudo_masks"):
        assert sorted(p.stem for p in (work / folder).glob("*.png")) == sorted(train_ids)
    seeds = json.loads((work / "seeds" / "stage.json").read_text())["metrics"]
    assert report["seeds_miou"] == pytest.approx(100 * seeds["seeds_miou"], abs=0.006)
    ev = json.loads((work / "evaluate" / "eval.json").read_text())
    assert ev["split"] == "val" and ev["miou"] == pytest.approx(report["final_miou"], abs=0.006)
    val_ids = (work / "data" / "splits" / "val.txt").read_text().split()
    assert sorted(p.stem for p in (work / "evaluate" / "masks").glob("*.png")) == sorted(val_ids)
    # the training's curves: loss terms and learning rate in log.csv, on the page
    header = (work / "train" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "seg", "aff", "lr"} <= set(header)
    page = (work / "report.html").read_text()
    assert "weakclip run report: ExCEL" in page and "ExCEL training: loss terms and learning rate" in page
    assert (work / "report" / "training_train.png").is_file()
    assert "training-free masks" in page and "final network (val)" in page
    assert (work / "losses.png").is_file() and len(list((work / "overlays").glob("*.png"))) == 4


@pytest.mark.slow
def test_excel_run_again_skips_every_stage(excel_demo, tmp_path, capsys):
    work = _copy(excel_demo, tmp_path / "again")
    before = {s: (work / s / "stage.json").read_bytes() for s in EXCEL_STAGES}
    assert main(_run_argv(work)) == 0
    out = capsys.readouterr().out
    assert all(f"== {s}: complete, skipped" in out for s in EXCEL_STAGES)
    assert {s: (work / s / "stage.json").read_bytes() for s in EXCEL_STAGES} == before


@pytest.mark.slow
def test_an_interrupted_excel_training_resumes_to_the_same_network(excel_demo, tmp_path):
    """The training stage cut after its second checkpoint (last checkpoint and every later stage gone) is
    resumed by the same command and ends with the very same decoder and the same masks."""
    work = _copy(excel_demo, tmp_path / "cut")
    ckpts = sorted((work / "train" / "checkpoints").glob("iter_*.pth"))
    assert len(ckpts) >= 2
    final = torch.load(ckpts[-1], weights_only=True)
    ckpts[-1].unlink()
    (work / "train" / "stage.json").unlink()
    for stage in ("pseudo_masks", "evaluate"):
        shutil.rmtree(work / stage)
    assert main(_run_argv(work)) == 0
    again = torch.load(sorted((work / "train" / "checkpoints").glob("iter_*.pth"))[-1], weights_only=True)
    assert again["iteration"] == final["iteration"]
    for key, value in final["model"].items():
        assert torch.equal(again["model"][key], value), key
    for png in sorted((excel_demo / "pseudo_masks").glob("*.png")):
        assert np.array_equal(read_label_png(png), read_label_png(work / "pseudo_masks" / png.name))


@pytest.mark.slow
def test_excel_pseudo_masks_resume_where_they_stopped(excel_demo, tmp_path):
    work = _copy(excel_demo, tmp_path / "partial")
    (work / "pseudo_masks" / "stage.json").unlink()
    shutil.rmtree(work / "evaluate")
    pngs = sorted((work / "pseudo_masks").glob("*.png"))
    kept = {p.name: p.stat().st_mtime_ns for p in pngs[: len(pngs) // 2]}
    for png in pngs[len(pngs) // 2:]:
        png.unlink()
    assert main(_run_argv(work)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in pngs[: len(pngs) // 2]} == kept  # not rewritten
    for png in pngs:
        assert np.array_equal(read_label_png(png), read_label_png(excel_demo / "pseudo_masks" / png.name))
    a = json.loads((work / "report.json").read_text())
    b = json.loads((excel_demo / "report.json").read_text())
    assert a["pseudo_miou"] == b["pseudo_miou"] and a["final_miou"] == b["final_miou"]


@pytest.mark.slow
def test_a_changed_test_time_setting_is_refused_before_any_work(excel_demo, tmp_path, capsys):
    work = _copy(excel_demo, tmp_path / "changed")
    before = (work / "pseudo_masks" / "stage.json").read_bytes()
    assert main(_run_argv(work, "--set", "infer.scales=1.0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pseudo_masks" in err[0] and "infer.scales" in err[0] and "--redo" in err[0]
    assert (work / "pseudo_masks" / "stage.json").read_bytes() == before


@pytest.mark.slow
def test_a_folder_of_the_other_method_is_refused_in_one_line(excel_demo, tmp_path, capsys):
    from weakclip.demo import make_tiny_clip

    work = _copy(excel_demo, tmp_path / "other")
    make_tiny_clip(tmp_path / "clip_p8.pt")
    argv = ["run", "--preset", "voc", "--dataset", "folder", "--data-root", str(work / "data"), "--seeds",
            str(work / "data" / "seeds"), "--clip-weights", str(tmp_path / "clip_p8.pt"), "--workdir",
            str(work), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an ExCEL result" in err[0] and "WeakCLIP" in err[0]
    # and the reverse: a WeakCLIP folder (its run.json) given to an ExCEL run
    weak = tmp_path / "weak"
    weak.mkdir()
    run = json.loads((work / "run.json").read_text())
    (weak / "run.json").write_text(json.dumps({**run, "method": "weakclip"}))
    argv = _run_argv(work)
    argv[argv.index("--workdir") + 1] = str(weak)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a WeakCLIP result" in err[0] and "ExCEL" in err[0]
    assert not (weak / "seeds").exists()


def _tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.demo import make_tiny_clip

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_train=3, n_val=2, image_size=(64, 64))
    return data, make_tiny_clip(tmp_path / "clip.pt", arch="tiny-excel")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    (json.dumps({"disk": ["a round shape"]}), "square"),
])
def test_bad_descriptors_stop_the_run_before_any_work(tmp_path, capsys, content, message):
    data, clip = _tiny_data(tmp_path)
    bad = tmp_path / "descriptors.json"
    bad.write_text(content)
    work = tmp_path / "work"
    argv = ["run", "--preset", "excel-voc", "--dataset", "folder", "--data-root", str(data), "--clip-weights",
            str(clip), "--descriptors", str(bad), "--workdir", str(work), "--set",
            "model.clip_arch=tiny-excel", "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(bad) in err[0]
    assert not (work / "seeds").exists() and not (work / "run.json").exists()


@pytest.mark.parametrize("flag", [["--crf", "voc"], ["--scales", "1.0"], ["--restrict"], ["--seeds", "x"],
                                  ["--seed-method", "excel"], ["--crf-workers", "0"], ["--batch-size", "2"]])
def test_weakclip_stage_flags_are_refused_by_an_excel_run(tmp_path, capsys, flag):
    data, clip = _tiny_data(tmp_path)
    argv = ["run", "--preset", "excel-voc", "--dataset", "folder", "--data-root", str(data), "--clip-weights",
            str(clip), "--workdir", str(tmp_path / "work"), "--device", "cpu", "--quiet", *flag]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag[0] in err[0]
    assert not (tmp_path / "work" / "seeds").exists()


def test_excel_run_stage_list_follows_val_split_and_retrain(tmp_path):
    from weakclip.pipeline import PipelineConfig, build_pipeline

    data, clip = _tiny_data(tmp_path)

    def stages(**kw):
        cfg = PipelineConfig(workdir=tmp_path / "w", data_root=data, preset="excel-voc", dataset="folder",
                             clip_weights=clip, refine_overrides=["model.clip_arch=tiny-excel"], **kw)
        return build_pipeline(cfg, log=lambda _: None).active_stages()

    assert stages() == EXCEL_STAGES
    assert stages(val_split="none") == ("seeds", "train", "pseudo_masks")
    assert stages(retrain="deeplabv1") == (*EXCEL_STAGES, "retrain")
    with pytest.raises(Exception, match="--retrain-set"):
        stages(retrain_overrides=["train.iters=2"])


@pytest.mark.slow
def test_excel_run_with_a_retrained_deeplab_reuses_the_excel_stages(excel_demo, tmp_path, capsys):
    """``--retrain deeplabv1`` on a finished ExCEL folder: the four ExCEL stages are reused, a DeepLab is
    trained on its pseudo masks (here the small torchvision one of the -plus presets, random weights) and
    its val mIoU becomes final_miou, the ExCEL network's staying in network_val_miou."""
    work = _copy(excel_demo, tmp_path / "retrained")
    small = ["model.name=deeplabv3_resnet18", "model.pretrained_backbone=false", "data.crop_size=64",
             "train.iters=4", "train.batch_size=2", "train.checkpoint_every=2", "eval.scales=1.0"]
    argv = _run_argv(work, "--retrain", "deeplabv1", "--retrain-preset", "voc-plus",
                     *[x for o in small for x in ("--retrain-set", o)])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"== {s}: complete, skipped" in out for s in EXCEL_STAGES)
    report = json.loads((work / "report.json").read_text())
    before = json.loads((excel_demo / "report.json").read_text())
    assert report["network_val_miou"] == before["network_val_miou"]
    retrained = json.loads((work / "retrain" / "eval.json").read_text())
    assert report["final_miou"] == pytest.approx(retrained["miou"], abs=0.006)
    assert json.loads((work / "run.json").read_text())["stages"] == [*EXCEL_STAGES, "retrain"]
    assert "retrained DeepLab, val" in out


def test_weakclip_run_takes_excel_training_free_masks_as_seeds(tmp_path):
    """``--seed-method excel`` (unmeasured): the seeds stage writes ExCEL's training-free masks with the
    ignore band, which the seed checker accepts; without the band they hold no 255."""
    from weakclip.data.datasets import build_dataset
    from weakclip.pipeline import PipelineConfig, build_pipeline
    from weakclip.seeds.check import check_seeds

    data, clip = _tiny_data(tmp_path)
    results = {}
    for band in (True, False):
        work = tmp_path / f"band_{band}"
        cfg = PipelineConfig(workdir=work, data_root=data, preset="voc", dataset="folder",
                             train_split="train", val_split="none", clip_weights=clip, seed_method="excel",
                             seed_band=band,
                             refine_overrides=["model.clip_arch=tiny-excel"], progress=False)
        pipeline = build_pipeline(cfg, log=lambda _: None)
        pipeline.run(stages=("seeds",))
        record = json.loads((work / "seeds" / "stage.json").read_text())
        assert record["settings"]["source"] == "ExCEL training-free masks"
        assert record["made_with"]["output"]["seeds.source"] == "ExCEL training-free masks"
        dataset = build_dataset("folder", data, split="train", seed_dir=work / "seeds")
        assert check_seeds(work / "seeds", dataset, progress=False).ok
        results[band] = {p.name: read_label_png(p) for p in sorted((work / "seeds").glob("*.png"))}
        assert (record["metrics"]["coverage"] < 1.0) == band
    assert results[True].keys() == results[False].keys()
    for name, banded in results[True].items():
        plain = results[False][name]
        assert not (plain == 255).any()
        sure = banded != 255
        assert sure.any() and np.array_equal(banded[sure], plain[sure])  # every sure pixel is the mask's


@pytest.mark.slow
def test_predict_on_the_run_folder_equals_the_evaluation_masks(excel_demo, tmp_path):
    """``weakclip predict RUN`` takes the run's trained ExCEL network with the release's test-time settings:
    its masks of the val images are the evaluate stage's, pixel for pixel; ``weakclip.load`` says the same."""
    import weakclip

    images = sorted((excel_demo / "data" / "images").glob("val_*"))
    assert images
    out = tmp_path / "pred"
    assert main(["predict", *map(str, images), "--checkpoint", str(excel_demo), "--out", str(out), "--device",
                 "cpu", "--quiet"]) == 0
    for image in images:
        predicted = read_label_png(out / f"{image.stem}.png")
        evaluated = read_label_png(excel_demo / "evaluate" / "masks" / f"{image.stem}.png")
        assert np.array_equal(predicted, evaluated), image.name
    seg = weakclip.load(excel_demo, device="cpu")
    assert seg.kind == "excel"
    from weakclip.data.io import read_image

    assert np.array_equal(seg.predict(read_image(images[0])),
                          read_label_png(excel_demo / "evaluate" / "masks" / f"{images[0].stem}.png"))


@pytest.mark.slow
def test_weakclip_commands_that_cannot_take_an_excel_network_say_so(excel_demo, tmp_path, capsys):
    ckpt = sorted((excel_demo / "train" / "checkpoints").glob("iter_*.pth"))[-1]
    argv = ["retrain", "--eval-only", "--checkpoint", str(ckpt), "--data-root", str(excel_demo / "data"),
            "--dataset", "folder", "--workdir", str(tmp_path / "eval"), "--preset", "voc-plus", "--device",
            "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a trained ExCEL network" in err[0] and "predict" in err[0]


@pytest.mark.slow
def test_the_report_of_an_excel_run_rebuilds_and_renders(excel_demo, tmp_path):
    from weakclip.report.browser import check_page, find_chromium

    work = _copy(excel_demo, tmp_path / "report")
    (work / "report.html").unlink()
    shutil.rmtree(work / "report")
    assert main(["report", str(work)]) == 0
    page = (work / "report.html").read_text()
    assert "weakclip run report: ExCEL" in page and "ExCEL training: loss terms and learning rate" in page
    for row in ("training-free masks", "ExCEL training", "pseudo masks (trained network)",
                "final network (val)"):
        assert f"<td>{row}</td>" in page, row
    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
    check = check_page(work / "report.html")
    assert check.errors == [] and check.broken_images == [] and check.remote_requests == []
    assert len(check.images) >= 3 and check.title.startswith("weakclip report") and check.pixel_std > 5.0


@pytest.mark.slow
def test_excel_run_under_torchrun_shares_every_stage(excel_demo, tmp_path):
    """The same ``weakclip run`` under ``torchrun`` with two gloo processes: every stage made once by both,
    recorded with its process count; the training-free masks (which no process count changes) equal the
    single-process run's. (The training's batch-wide means are taken per process, as the release per GPU, so
    its network is not the single-process one: docs/method.md.)"""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "ddp"
    argv = _run_argv(excel_demo)
    argv[argv.index("--workdir") + 1] = str(work)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "weakclip", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in EXCEL_STAGES:
        record = json.loads((work / stage / "stage.json").read_text())
        assert record["status"] == "complete" and record["made_with"]["incidental"]["processes"] == 2
    assert res.stdout.count("== train\n") == 1  # one log of each stage: the first process's
    for png in sorted((excel_demo / "seeds").glob("*.png")):
        assert np.array_equal(read_label_png(png), read_label_png(work / "seeds" / png.name)), png.name
    report = json.loads((work / "report.json").read_text())
    assert report["final_miou"] is not None and report["method"] == "excel"


def test_excel_run_without_descriptors_or_val_split(tmp_path, capsys):
    """A folder dataset without a descriptors file (plain class prompts, said in one line) and without a val
    split (no evaluate stage): the three stages run and the report has no final mIoU."""
    from weakclip.methods.excel.demo import ExcelDemoSize, demo_overrides

    data, clip = _tiny_data(tmp_path)
    work = tmp_path / "work"
    sets = [x for o in demo_overrides(ExcelDemoSize(iters=4)) for x in ("--set", o)]
    argv = ["run", "--preset", "excel-voc", "--dataset", "folder", "--data-root", str(data), "--clip-weights",
            str(clip), "--val-split", "none", "--workdir", str(work), *sets, "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no descriptors file" in out
    run = json.loads((work / "run.json").read_text())
    assert run["stages"] == ["seeds", "train", "pseudo_masks"] and run["val_split"] is None
    report = json.loads((work / "report.json").read_text())
    assert report["final_miou"] is None and report["pseudo_miou"] is not None
    assert not (work / "evaluate").exists()


def test_a_preset_file_of_excel_runs_excel(tmp_path):
    """``weakclip run --preset my.yaml`` where the file is an ExCEL config (it names ``method: excel``, as
    ExCEL's config.yaml records do): ExCEL's run, with the file's settings."""
    from weakclip.methods.excel.config import apply_excel_overrides, load_excel_preset
    from weakclip.methods.excel.pipeline import ExcelPipeline
    from weakclip.pipeline import PipelineConfig, build_pipeline

    data, clip = _tiny_data(tmp_path)
    own = tmp_path / "my_excel.yaml"
    apply_excel_overrides(load_excel_preset("excel-voc"), ["model.clip_arch=tiny-excel", "train.iters=7"]
                          ).to_yaml(own)
    cfg = PipelineConfig(workdir=tmp_path / "w", data_root=data, preset=str(own), dataset="folder",
                         clip_weights=clip)
    pipeline = build_pipeline(cfg, log=lambda _: None)
    assert isinstance(pipeline, ExcelPipeline) and pipeline.excel_cfg.train.iters == 7
