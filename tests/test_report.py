"""The run report: analysis of a work folder from its PNG folders, regression warnings, the page, the
``weakclip report`` command, ``--stop-on-regression``, the TensorBoard hook and the headless-browser check.

The work folders here are made by hand (the synthetic dataset, its seeds, pseudo masks written on purpose
good or bad), so no training runs; the demo's real report is checked in tests/test_demo.py.
"""

import json
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png, write_json_atomic, write_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.metrics import ConfusionMatrix
from weakclip.report.analysis import analyse
from weakclip.report.checks import find_regressions
from weakclip.report.page import build_report, image_ious

GOOD = 3  # the first GOOD training images get perfect pseudo masks, the others all-background ones


def _stage(work, stage, metrics=None, settings=None):
    write_json_atomic(work / stage / "stage.json", {"stage": stage, "status": "complete",
                                                    "settings": settings or {}, "metrics": metrics or {},
                                                    "seconds": 12.5})


def _fake_run(tmp_path, *, pseudo=None, with_gt=True, stages=("seeds", "refine", "pseudo_masks")):
    """A work folder as the pipeline leaves it, minus the checkpoints: run.json, stage records, a refinement
    log.csv and pseudo masks (``pseudo(i, gt) -> mask``; default: perfect for the first GOOD images, all
    background after)."""
    root = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=2, image_size=(48, 64))
    work = tmp_path / "work"
    work.mkdir()
    write_json_atomic(work / "run.json", {"data_root": str(root), "kind": "folder", "train_split": "train",
                                          "val_split": "val", "seed_dir": str(root / "seeds")})
    dataset = build_dataset("folder", root, split="train")
    if "seeds" in stages:
        _stage(work, "seeds", {"images": 6, "coverage": 0.5},
               {"source": "external", "dir": str(root / "seeds")})
    if "refine" in stages:
        (work / "refine").mkdir()
        rows = ["iter,lr,loss,seeding,boundary,identity,seconds,images_per_s"]
        rows += [f"{i},{1e-3 / i:.6e},{3 / i:.4f},{2 / i:.4f},{0.5 / i:.4f},{0.5 / i:.4f},0.5,8.0"
                 for i in range(5, 55, 5)]
        (work / "refine" / "log.csv").write_text("\n".join(rows) + "\n")
        _stage(work, "refine", {"final_losses": {"iter": 50, "loss": 0.06}})
    if "pseudo_masks" in stages:
        for i, ident in enumerate(dataset.ids):
            gt = dataset.read_gt(i)
            mask = pseudo(i, gt) if pseudo is not None else (gt if i < GOOD else np.zeros_like(gt))
            write_label_png(work / "pseudo_masks" / f"{ident}.png", mask)
            write_label_png(work / "pseudo_masks" / "no_crf" / f"{ident}.png", mask)
        _stage(work, "pseudo_masks", {"images": 6}, {"crf": "voc"})
    if not with_gt:
        (root / "masks").rename(root / "masks_hidden")
    return work, root, dataset


def _reference(dataset, folder):
    cm = ConfusionMatrix(dataset.classes, unsure="background")
    for i, ident in enumerate(dataset.ids):
        cm.update(read_label_png(folder / f"{ident}.png"), dataset.read_gt(i))
    return cm.scores()


def test_analysis_scores_the_mask_folders(tmp_path):
    work, root, dataset = _fake_run(tmp_path)
    a = analyse(work, log=lambda line: None)
    assert a["classes"] == dataset.classes and a["has_gt"]
    for name, folder in (("seeds", root / "seeds"), ("pseudo", work / "pseudo_masks")):
        ref = _reference(dataset, folder)
        got = a["sets"][name]
        assert got["images"] == 6
        assert got["miou"] == pytest.approx(ref.miou, abs=1e-6)
        np.testing.assert_allclose(np.array(got["iou"], dtype=float), ref.iou, atol=1e-6)
        np.testing.assert_allclose(np.array(got["fp"], dtype=float), ref.fp, atol=1e-6)
        np.testing.assert_allclose(np.array(got["fn"], dtype=float), ref.fn, atol=1e-6)
    # per image: perfect masks score 1, all-background ones the background IoU alone over 2+ classes
    ious = image_ious(a, "pseudo")
    for i, ident in enumerate(dataset.ids):
        gt = dataset.read_gt(i)
        if i < GOOD:
            assert ious[ident] == 1.0
        else:
            fg = int((gt > 0).sum())
            bg_iou = (gt == 0).sum() / gt.size
            present = len(set(np.unique(gt).tolist()) - {255})
            assert fg > 0 and ious[ident] == pytest.approx(bg_iou / present, abs=1e-5)
    # pixel counts: every pixel of every pseudo mask counted once, shares per image add up to 1
    total = sum(dataset.read_gt(i).size for i in range(len(dataset)))
    assert sum(a["sets"]["pseudo"]["pixels"]) == total
    shares = a["sets"]["seeds"]["per_image"][dataset.ids[0]]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3) and "255" in {str(k) for k in shares}


def test_finished_stages_are_cached_and_rescored_when_redone(tmp_path):
    work, _, dataset = _fake_run(tmp_path)
    lines = []
    first = analyse(work, log=lines.append)
    assert any("scored seeds, pseudo_no_crf, pseudo" in line for line in lines)
    lines.clear()
    again = analyse(work, log=lines.append)
    assert not lines and again["sets"]["pseudo"]["miou"] == first["sets"]["pseudo"]["miou"]
    # the pseudo-mask stage redone with perfect masks: its cache no longer applies
    for i, ident in enumerate(dataset.ids):
        write_label_png(work / "pseudo_masks" / f"{ident}.png", dataset.read_gt(i))
    _stage(work, "pseudo_masks", {"images": 6})
    third = analyse(work, log=lines.append)
    assert any("scored pseudo_no_crf, pseudo" in line for line in lines)
    assert third["sets"]["pseudo"]["miou"] == 1.0


def test_regressions_pseudo_below_seeds_vanished_class_and_final_below_pseudo(tmp_path):
    ring = 4

    def no_ring(i, gt):  # perfect masks except that class 'ring' is painted as background everywhere
        return np.where(gt == ring, 0, gt).astype(np.uint8)

    work, _, dataset = _fake_run(tmp_path, pseudo=no_ring)
    assert dataset.classes[ring] == "ring"
    found = find_regressions(analyse(work, log=lambda line: None))
    assert [r.stage for r in found] == ["pseudo_masks"]
    assert "class 'ring' vanished" in found[0].message

    work, _, _ = _fake_run(tmp_path / "bad", pseudo=lambda i, gt: np.zeros_like(gt))
    messages = [str(r) for r in find_regressions(analyse(work, log=lambda line: None))]
    assert any(m.startswith("the pseudo masks (") and "worse than the seeds" in m for m in messages)
    assert sum("vanished" in m for m in messages) == 4  # every foreground class

    # the final network: below the pseudo masks, and never predicting a class the pseudo masks have
    work, _, dataset = _fake_run(tmp_path / "final")
    classes = dataset.classes
    ev = {"miou": 40.0, "iou": {c: 50.0 for c in classes}, "fp_per_class": {c: 25.0 for c in classes},
          "fn_per_class": {c: 25.0 for c in classes}, "images": 2, "split": "val"}
    ev["iou"]["disk"], ev["fp_per_class"]["disk"], ev["fn_per_class"]["disk"] = 0.0, 0.0, 100.0
    write_json_atomic(work / "retrain" / "eval.json", ev)
    _stage(work, "retrain", {"final_miou": 0.4})
    final = [r for r in find_regressions(analyse(work, log=lambda line: None)) if r.stage == "retrain"]
    assert len(final) == 2
    assert "final network (40.00% mIoU on val) is more than 5 points below the pseudo" in final[0].message
    assert "class 'disk' vanished" in final[1].message
    # a drop within the tolerance (the paper's own is ~3 points, val against train) is no warning
    pseudo_miou = analyse(work, log=lambda line: None)["sets"]["pseudo"]["miou"]
    near = 100 * (pseudo_miou - 0.03)
    write_json_atomic(work / "retrain" / "eval.json", {**ev, "miou": near, "iou": {c: 50.0 for c in classes},
                                                       "fp_per_class": {c: 25.0 for c in classes}})
    _stage(work, "retrain", {"final_miou": near / 100})
    assert [r for r in find_regressions(analyse(work, log=lambda line: None)) if r.stage == "retrain"] == []


def test_no_warning_when_every_stage_improves(tmp_path):
    work, _, _ = _fake_run(tmp_path, pseudo=lambda i, gt: gt)
    a = analyse(work, log=lambda line: None)
    assert a["sets"]["pseudo"]["miou"] == 1.0 and find_regressions(a) == []
    page = build_report(work, log=lambda line: None, analysis=a).read_text()
    assert "No stage made things worse" in page and "class='warn'" not in page


def test_report_page_content(tmp_path):
    work, _, dataset = _fake_run(tmp_path)
    path = build_report(work, log=lambda line: None)
    assert path == work / "report.html"
    page = path.read_text()
    # self-contained: every image embedded, no script, nothing fetched from anywhere
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<link" not in page
    # warnings: the pseudo masks lost to the seeds
    assert "class='warn'" in page and "worse than the seeds" in page
    # stage table: every row, the status of the stages not run, the time of those that were
    for row in ("seeds", "refinement (training)", "pseudo masks before CRF", "pseudo masks",
                "final network (val)"):
        assert f"<td>{row}</td>" in page
    assert "not started" in page and "12.5 s" in page and "partial run" in page
    # the gallery: the perfect images gained most, the all-background ones lost most
    gained, lost = page.split("gained most against the seeds")[1].split("lost most against the seeds")
    shown = sorted((gained.index(f">{i}<"), i) for i in dataset.ids if f">{i}<" in gained)
    assert len(shown) == 4 and {i for _, i in shown[:GOOD]} == set(dataset.ids[:GOOD])
    in_lost = {i for i in dataset.ids if f">{i}<" in lost}
    assert in_lost and in_lost <= set(dataset.ids[GOOD:]) and not in_lost & {i for _, i in shown}
    assert "pseudo mask: IoU 100.00%" in gained
    # figures saved as PNGs too, and the per-class numbers as JSON
    for name in ("per_class.png", "training_refine.png"):
        with Image.open(work / "report" / name) as im:
            assert im.width > 300 and im.height > 200
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"seeds", "pseudo_no_crf", "pseudo"}
    assert summary["warnings"][0]["stage"] == "pseudo_masks"
    assert not (work / "report" / "training_retrain.png").exists()


def test_report_without_ground_truth_shows_class_shares(tmp_path):
    work, _, dataset = _fake_run(tmp_path, with_gt=False)
    page = build_report(work, log=lambda line: None).read_text()
    assert "a sample of the training images" in page and "ground truth</th>" not in page
    assert (work / "report" / "shares.png").is_file() and not (work / "report" / "per_class.png").exists()
    # captions give each mask's biggest class shares, e.g. "pseudo mask: background 80%, disk 20%"
    captions = re.findall(r"<div class='cap'>pseudo mask: ([^<]+)</div>", page)
    assert captions and all(re.fullmatch(r"([a-z]+ \d+%(, )?)+", c) for c in captions)
    assert "IoU" not in "".join(captions)


def test_partial_run_and_report_command(tmp_path, capsys):
    from weakclip.cli import main

    work, _, _ = _fake_run(tmp_path, stages=("seeds",))
    assert main(["report", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"page: {work / 'report.html'}" in out and "WARNING" not in out
    page = (work / "report.html").read_text()
    assert page.count("not started") == 4 and "No training log yet" in page
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "work folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no pipeline run" in capsys.readouterr().err


def _prefab_pipeline(tmp_path, **kwargs):
    """A pipeline whose first three stages are recorded as done (bad pseudo masks), so run() goes straight to
    the checks and the retraining stage."""
    from weakclip.pipeline import Pipeline, PipelineConfig

    work, root, _ = _fake_run(tmp_path)
    (work / "run.json").unlink()  # the pipeline writes its own
    cfg = PipelineConfig(workdir=work, data_root=root, dataset="folder", train_split="train",
                         seeds=root / "seeds", progress=False,
                         retrain_overrides=["model.pretrained_backbone=false"], **kwargs)
    return Pipeline(cfg, log=lambda line: None), work


def test_stop_on_regression_stops_before_retraining(tmp_path):
    from weakclip.pipeline import RegressionStop

    pipe, work = _prefab_pipeline(tmp_path, stop_on_regression=True)
    pipe.run_retrain = lambda: pytest.fail("retraining ran after a regression")
    with pytest.raises(RegressionStop, match="stopped after the pseudo_masks stage.*worse than the seeds"):
        pipe.run()
    assert not (work / "retrain").exists()
    report = json.loads((work / "report.json").read_text())
    assert any("worse than the seeds" in w for w in report["warnings"])
    assert report["html"] == str(work / "report.html")
    assert "worse than the seeds" in (work / "report.html").read_text()
    assert json.loads((work / "run.json").read_text())["kind"] == "folder"


def test_without_the_flag_the_run_goes_on_and_warns_at_the_end(tmp_path):
    pipe, work = _prefab_pipeline(tmp_path)
    lines, ran = [], []
    pipe._log = lines.append

    def fake_retrain():
        ran.append(True)
        return pipe._finish("retrain", {}, {"final_miou": None})

    pipe.run_retrain = fake_retrain
    report = pipe.run()
    assert ran and report["warnings"] and (work / "report.html").is_file()
    summary = lines[-1]
    assert "WARNING: the pseudo masks (" in summary and f"page: {work / 'report.html'}" in summary
    record = json.loads((work / "retrain" / "stage.json").read_text())
    assert record["seconds"] >= 0  # the stage's time is recorded


def test_run_command_exit_status_on_regression(tmp_path, capsys):
    from weakclip.cli import main

    _, work = _prefab_pipeline(tmp_path)
    root = tmp_path / "data"
    rc = main(["run", "--data-root", str(root), "--dataset", "folder", "--split", "train", "--seeds",
               str(root / "seeds"), "--workdir", str(work), "--stop-on-regression", "--quiet",
               "--retrain-set", "model.pretrained_backbone=false"])
    assert rc == 3
    assert "stopped after the pseudo_masks stage" in capsys.readouterr().err
    assert not (work / "retrain").exists()


# ---------------------------------------------------------------------- TensorBoard
class _FakeSummaryWriter:
    instances: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars = []
        self.closed = False
        _FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_is_optional(tmp_path, monkeypatch):
    from weakclip.engine.tensorboard import scalar_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard package
    assert scalar_writer(tmp_path) is None
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setenv("WEAKCLIP_TENSORBOARD", "0")
    assert scalar_writer(tmp_path) is None
    monkeypatch.delenv("WEAKCLIP_TENSORBOARD")
    writer = scalar_writer(tmp_path, "retrain")
    writer.add(10, {"loss": 0.5, "seeding": float("nan")})
    assert writer.writer.scalars == [("retrain/loss", 0.5, 10)]
    assert writer.writer.log_dir == str(tmp_path / "tensorboard")


def test_training_loop_sends_its_scalars_to_tensorboard(tmp_path, monkeypatch):
    import torch

    from weakclip.distributed import DistInfo
    from weakclip.engine.loop import LoopSettings, TrainingTask, run_training
    from weakclip.engine.schedule import PolySchedule

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeSummaryWriter.instances.clear()
    model = torch.nn.Linear(2, 1)
    data = [{"x": torch.tensor([float(i), 1.0]), "y": torch.tensor([2.0 * i])} for i in range(8)]

    def step(m, batch, it):
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        return {"loss": ((m(x) - y) ** 2).mean()}

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    task = TrainingTask(model=model, optimizer=opt, schedule=PolySchedule(opt, 1e-3, 6, 0.9, 0.0, 0, 1e-6),
                        step_fn=step, dataset=data, transform=lambda s, rng: s, collate_fn=list)
    run_training(task, LoopSettings(iters=6, batch_size=2, seed=0, log_every=2), workdir=tmp_path,
                 info=DistInfo(0, 1, 0, torch.device("cpu")), config={}, progress=False, quiet=True)
    (tb,) = _FakeSummaryWriter.instances
    losses = [(step, v) for tag, v, step in tb.scalars if tag == "retrain/loss"]
    csv_rows = (tmp_path / "log.csv").read_text().splitlines()[1:]
    assert [s for s, _ in losses] == [2, 4, 6] == [int(r.split(",")[0]) for r in csv_rows]
    assert [round(v, 6) for _, v in losses] == [float(r.split(",")[2]) for r in csv_rows]
    assert tb.closed


# ---------------------------------------------------------------------- a real browser
def _browser_or_skip():
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[dev]')")
    from weakclip.report.browser import find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")


def test_report_page_in_headless_chromium(tmp_path):
    _browser_or_skip()
    from weakclip.report.browser import check_page

    work, _, _ = _fake_run(tmp_path)
    page = build_report(work, log=lambda line: None)
    check = check_page(page)
    assert check.errors == []
    assert len(check.images) == page.read_text().count("<img ") and check.broken_images == []
    assert all(im["natural_width"] > 0 for im in check.images)
    assert check.remote_requests == [] and check.requests[0] == page.resolve().as_uri()
    assert check.title == "weakclip report: work"
    assert check.pixel_std > 20.0  # a blank page is 0


def test_browser_check_catches_a_broken_page(tmp_path):
    _browser_or_skip()
    from weakclip.report.browser import check_page

    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img src='missing.png'><script>console.error('boom'); nope();</script>"
                   "</body></html>")
    check = check_page(bad)
    assert any("console.error: boom" in e for e in check.errors)
    assert any("nope is not defined" in e for e in check.errors)
    assert len(check.broken_images) == 1 and check.pixel_std < 5.0
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert check_page(blank).pixel_std == 0.0


def test_a_mask_that_cannot_be_scored_is_named_not_fatal(tmp_path):
    work, _, dataset = _fake_run(tmp_path)
    write_label_png(work / "pseudo_masks" / f"{dataset.ids[1]}.png", np.zeros((5, 7), dtype=np.uint8))
    a = analyse(work, log=lambda line: None)
    assert a["sets"]["pseudo"]["images"] == 5
    (note,) = [n for n in a["notes"] if n.startswith("pseudo masks: 1 masks not scored")]
    assert dataset.ids[1] in note
    assert note in build_report(work, log=lambda line: None, analysis=a).read_text()
