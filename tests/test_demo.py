"""The one-command pipeline, end to end on the synthetic data at reduced size (about 2 minutes on CPU)."""

import json

import pytest
import yaml
from PIL import Image

from weakclip.config import load_preset
from weakclip.demo import DemoSize, run_demo
from weakclip.errors import WeakclipError
from weakclip.pipeline import Pipeline, PipelineConfig
from weakclip.retrain.config import load_retrain_preset


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The reduced demo, run once for this module's tests: (work folder, report, printed lines)."""
    work = tmp_path_factory.mktemp("demo")
    lines = []
    report = run_demo(work, DemoSize.small(), device="cpu", progress=False, log=lines.append)
    return work, report, lines


@pytest.mark.slow
def test_demo_runs_end_to_end_and_refinement_beats_the_seeds(small_demo):
    tmp_path, report, lines = small_demo
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for key in ("seeds_miou", "pseudo_miou", "final_miou"):
        assert isinstance(on_disk[key], float) and 0.0 <= on_disk[key] <= 100.0
    assert on_disk["pseudo_miou"] > on_disk["seeds_miou"]
    assert on_disk["pseudo_gain_over_seeds"] == pytest.approx(on_disk["pseudo_miou"] - on_disk["seeds_miou"],
                                                             abs=0.02)
    assert report["final_miou"] == on_disk["final_miou"]
    assert any("beat the seeds by" in line for line in lines)
    # every stage recorded, with its metrics and time
    for stage in ("seeds", "refine", "pseudo_masks", "retrain"):
        record = json.loads((tmp_path / stage / "stage.json").read_text())
        assert record["status"] == "complete" and record["metrics"] and record["seconds"] >= 0
        assert (tmp_path / stage / "log.txt").read_text().startswith(f"== {stage} ")
    assert "done: iterations 0->120 of 120" in (tmp_path / "refine" / "log.txt").read_text()
    # the worker pools users get: the presets' data loader workers and CRF worker processes
    pseudo = json.loads((tmp_path / "pseudo_masks" / "pseudo_masks_summary.json").read_text())["settings"]
    assert pseudo["crf_workers"] == load_preset("voc").pseudo.crf_workers >= 2
    assert pseudo["crf_backend"] == "pydensecrf" and not pseudo["crf_on_device"]
    refine_data = yaml.safe_load((tmp_path / "refine" / "config.yaml").read_text())["data"]
    retrain_data = yaml.safe_load((tmp_path / "retrain" / "config.yaml").read_text())["data"]
    assert refine_data["num_workers"] == load_preset("voc").data.num_workers >= 2
    assert retrain_data["num_workers"] == load_retrain_preset("voc").data.num_workers >= 2
    assert "val mIoU" in (tmp_path / "retrain" / "log.txt").read_text()
    # pictures a person can look at: image | seed | pseudo mask | ground truth, and the loss plot
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 4
    with Image.open(overlays[0]) as im:
        source = Image.open(tmp_path / "data" / "images" / overlays[0].name)
        assert im.width == 4 * (3 * source.width + 4) and im.height == 3 * source.height + 16
    with Image.open(tmp_path / "losses.png") as im:
        assert im.size == (540, 340)  # matplotlib, 5.4 x 3.4 inches at 100 dpi
    # the page, and the warnings of the run's summary in report.json and at the end of what it printed
    assert on_disk["html"] == str(tmp_path / "report.html") and (tmp_path / "report.html").is_file()
    summary = next(line for line in lines if line.startswith("stage "))
    assert all(f"WARNING: {w}" in summary for w in on_disk["warnings"])

    # a second run finds every stage complete and redoes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pseudo_masks").glob("*.png")}
    again_lines = []
    again = run_demo(tmp_path, DemoSize.small(), device="cpu", progress=False, log=again_lines.append)
    assert sum("skipped" in line for line in again_lines) == 4
    assert again["pseudo_miou"] == report["pseudo_miou"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_demo_report_opens_in_headless_chromium(small_demo):
    """The demo's report.html in a real browser: no error, every image loaded, nothing fetched, not blank."""
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[dev]')")
    from weakclip.report.browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
    work = small_demo[0]
    page = work / "report.html"
    html = page.read_text()
    check = check_page(page)
    assert check.errors == []
    assert len(check.images) == html.count("<img ") >= 1 + 2 * 4 * 4 + 2  # chart, gallery, curves
    assert check.broken_images == [] and min(im["natural_width"] for im in check.images) > 0
    assert check.remote_requests == []
    assert check.pixel_std > 20.0
    for heading in ("Stages", "Per class", "Gallery", "Training curves"):
        assert f"<h2>{heading}</h2>" in html


def test_pipeline_rejects_bad_paths(tmp_path):
    with pytest.raises(WeakclipError, match="dataset folder not found"):
        Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=tmp_path / "missing"))
    (tmp_path / "data").mkdir()
    with pytest.raises(WeakclipError, match="CLIP weights file not found"):
        Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=tmp_path / "data",
                                clip_weights=tmp_path / "nope.pt"))
    with pytest.raises(WeakclipError, match="seed folder not found"):
        Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=tmp_path / "data", seeds=tmp_path / "s"))


def test_pipeline_checks_the_splits_before_any_stage(tmp_path):
    from weakclip.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1)
    (root / "splits" / "val.txt").unlink()
    base = dict(workdir=tmp_path / "w", data_root=root, dataset="folder", train_split="train")
    with pytest.raises(WeakclipError, match="val split 'val'.*--val-split none"):
        Pipeline(PipelineConfig(**base))
    with pytest.raises(WeakclipError, match="training split 'trian'"):
        Pipeline(PipelineConfig(**{**base, "train_split": "trian"}))
    pipe = Pipeline(PipelineConfig(**base, val_split="none"))  # no final evaluation, but it can run
    assert pipe.retrain_cfg.data.val_split is None
    assert not (tmp_path / "w").exists()


_TORCHRUN_SCRIPT = """
import sys
from weakclip.demo import DemoSize, run_demo
size = DemoSize(n_train=8, n_val=4, refine_iters=6, retrain_iters=6)
run_demo(sys.argv[1], size, device="cpu", progress=False)
"""


@pytest.mark.slow
def test_pipeline_under_torchrun_two_processes(tmp_path):
    """The whole pipeline under torchrun (2 CPU processes, gloo): one process group through the four stages,
    the work of the seeds/pseudo-mask stages sharded and merged, one report."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    script = tmp_path / "demo_ddp.py"
    script.write_text(_TORCHRUN_SCRIPT)
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(work)]
    # its own session, so that a hang kills torchrun's workers too, not only torchrun
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the 2-process pipeline hung; last output:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("report:") == 1  # the summary is printed once, by the first process
    report = json.loads((work / "report.json").read_text())
    for key in ("seeds_miou", "pseudo_miou", "final_miou"):
        assert 0.0 <= report[key] <= 100.0
    stages = {s: json.loads((work / s / "stage.json").read_text()) for s in
              ("seeds", "refine", "pseudo_masks", "retrain")}
    assert all(r["status"] == "complete" for r in stages.values())
    # both processes' shares of the pseudo masks are written and scored together
    assert stages["pseudo_masks"]["metrics"]["images"] == 8
    assert len(list((work / "pseudo_masks").glob("*.png"))) == 8
    assert stages["retrain"]["metrics"]["val_images"] == 4
    refine_ckpt = torch.load(work / "refine" / "checkpoints" / "iter_0000006.pth", weights_only=False)
    assert refine_ckpt["world_size"] == 2


def test_run_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from weakclip.cli import main
    from weakclip.data.synthetic import make_synthetic_dataset

    assert main(["run", "--data-root", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1)
    args = ["run", "--data-root", str(root), "--dataset", "folder", "--workdir", str(tmp_path / "w")]
    assert main([*args, "--set", "train.itres=5"]) == 2
    assert "did you mean train.iters" in capsys.readouterr().err
    assert main([*args, "--retrain-set", "model.nmae=fcn_resnet50"]) == 2
    assert "did you mean model.name" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing started


_KILLABLE_SCRIPT = """
import sys
from weakclip.demo import DemoSize, run_demo
run_demo(sys.argv[1], DemoSize(n_train=8, n_val=4, refine_iters=60, retrain_iters=10), device="cpu",
         progress=False)
"""


@pytest.mark.slow
def test_pipeline_killed_during_refinement_resumes_from_its_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "demo_kill.py"
    script.write_text(_KILLABLE_SCRIPT)
    work = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, str(script), str(work)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    first = work / "refine" / "checkpoints" / "iter_0000015.pth"
    deadline = time.monotonic() + 300
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash in the middle of the refinement stage
    proc.wait()
    assert first.is_file()
    assert not (work / "refine" / "stage.json").exists() and not (work / "pseudo_masks").exists()

    report = run_demo(work, DemoSize(n_train=8, n_val=4, refine_iters=60, retrain_iters=10), device="cpu",
                      progress=False, log=lambda line: None)
    assert all(report[k] is not None for k in ("seeds_miou", "pseudo_miou", "final_miou"))
    log = (work / "refine" / "log.txt").read_text()
    assert log.count("== refine ") == 2  # the killed run's log is kept, the resumed one appended
    resumed = log.split("== refine ")[2]
    assert "resuming from" in resumed and "starting from iteration 0" not in resumed
    rows = (work / "refine" / "log.csv").read_text().splitlines()[1:]
    iters = [int(r.split(",")[0]) for r in rows]
    assert iters == sorted(set(iters)) and iters[-1] == 60  # no row lost or repeated across the kill


def test_pipeline_builtin_seed_stage(tmp_path):
    """Without --seeds the pipeline makes CLIP-ES seeds itself (a tiny random CLIP here: the seeds are noise,
    but valid: one PNG per training image, values restricted to the image's labels or 255, and scored)."""
    import numpy as np

    from weakclip.data.datasets import build_dataset
    from weakclip.data.io import read_label_png
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.demo import make_tiny_clip

    root = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=2)
    clip = make_tiny_clip(tmp_path / "clip.pt")
    cfg = PipelineConfig(workdir=tmp_path / "w", data_root=root, dataset="folder", train_split="train",
                         clip_weights=clip, refine_overrides=["model.clip_arch=tiny-p8"], progress=False)
    report = Pipeline(cfg, log=lambda line: None).run(stages=("seeds",))
    record = json.loads((tmp_path / "w" / "seeds" / "stage.json").read_text())
    assert record["settings"]["source"] == "built-in CLIP-ES" and record["metrics"]["images"] == 4
    assert 0.0 <= report["seeds_miou"] <= 100.0 and report["pseudo_miou"] is None
    dataset = build_dataset("folder", root, split="train")
    for i, ident in enumerate(dataset.ids):
        gt = dataset.read_gt(i)
        seed = read_label_png(tmp_path / "w" / "seeds" / f"{ident}.png", expected_hw=gt.shape)
        allowed = {0, 255} | {int(c) for c in np.unique(gt) if c != 255}
        assert set(np.unique(seed).tolist()) <= allowed
