"""Exit status and empty inputs, the same rule for every command: 1 when the work finished but some images
failed ("N failed (of M images)"), 2 for bad input before any work (an empty split), never a stage recorded
complete over zero images; ``seeds check`` decodes the images (a truncated JPEG is found)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from weakclip.cli import main
from weakclip.data.datasets import build_dataset
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import EXIT_ITEMS_FAILED, EXIT_USAGE, DataError, ItemsFailed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from weakclip.demo import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.pt")


def _data(tmp_path, n_train=4):
    root = make_synthetic_dataset(tmp_path / "data", n_train=n_train, n_val=2)
    (root / "splits" / "empty.txt").write_text("# nothing yet\n")
    return root


def _truncate_to_jpeg(root, index: int) -> str:
    """Replace training image ``index`` by a JPEG of it cut in half (an interrupted copy); its id."""
    dataset = build_dataset("folder", root, split="train")
    path = dataset.image_path(index)
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
    path.unlink()
    data = buffer.getvalue()
    path.with_suffix(".jpg").write_bytes(data[: len(data) // 2])
    return dataset.ids[index]


def _seeds_argv(root, clip, out, split="train"):
    return ["seeds", "--data-root", str(root), "--split", split, "--clip-weights", str(clip), "--arch",
            "tiny-p8", "--out", str(out), "--device", "cpu", "--quiet", "--masks"]


def _run_argv(root, clip, work, split="train"):
    return ["run", "--data-root", str(root), "--dataset", "folder", "--split", split, "--val-split", "val",
            "--clip-weights", str(clip), "--set", "model.clip_arch=tiny-p8", "--retrain-set",
            "model.pretrained_backbone=false", "--workdir", str(work), "--device", "cpu", "--quiet"]


# ---------------------------------------------------------------------------- failed images: exit 1
def test_seeds_exit_1_after_a_truncated_jpeg_and_check_notices_it(tmp_path, tiny_clip, capsys):
    root = _data(tmp_path)
    out = tmp_path / "seeds"
    assert main(_seeds_argv(root, tiny_clip, out)) == 0
    check = ["seeds", "check", str(out), "--data-root", str(root), "--split", "train", "--quiet"]
    assert main(check) == 0
    bad = _truncate_to_jpeg(root, 1)
    capsys.readouterr()
    # the seed of the image is still there: only decoding the image shows the damage
    assert main(check) == 1
    captured = capsys.readouterr()
    assert "image problems: 1" in captured.out and bad in captured.out and "truncated" in captured.out
    # generating again: the other seeds are kept, the bad image fails, exit status 1 with one line
    (out / f"{bad}.png").unlink()
    assert main(_seeds_argv(root, tiny_clip, out)) == EXIT_ITEMS_FAILED == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"weakclip seeds: 1 failed (of 4 images): {bad}: cannot read image ")
    assert "fix or remove them and run again" in err


def test_run_exits_1_on_failed_images_before_refinement(tmp_path, tiny_clip, capsys):
    root = _data(tmp_path)
    bad = _truncate_to_jpeg(root, 2)
    work = tmp_path / "w"
    assert main(_run_argv(root, tiny_clip, work)) == EXIT_ITEMS_FAILED
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the warning naming the skipped image
    assert err.startswith("weakclip run: error: seeds: 1 failed (of 4 images): " + bad)
    assert not (work / "seeds" / "stage.json").exists() and not (work / "refine").exists()


def test_one_exit_status_for_failed_items():
    from weakclip.commands import report_failed_items
    from weakclip.pipeline import RegressionStop

    assert ItemsFailed("x").exit_status == 1 and DataError("x").exit_status == EXIT_USAGE == 2
    assert RegressionStop("x").exit_status == 3
    assert report_failed_items("predict", {}, 3) == 0
    assert report_failed_items("predict", {"a.jpg": "truncated"}, 3, show=False) == 1


# ---------------------------------------------------------------- zero images: exit 2, before work
def test_empty_split_is_an_error_before_work_in_every_command(tmp_path, tiny_clip, capsys):
    root = _data(tmp_path)
    out = tmp_path / "seeds"
    assert main(_seeds_argv(root, tiny_clip, out, split="empty")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no images in the split 'empty'" in err and "empty.txt lists none" in err
    assert not out.exists() or not any(out.iterdir())
    # seeds check: an error, not a table of nan
    out.mkdir(exist_ok=True)
    assert main(["seeds", "check", str(out), "--data-root", str(root), "--split", "empty", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "nan" not in captured.out and "seeds check: no images in the split 'empty'" in captured.err
    # run: stops before the first stage
    work = tmp_path / "w"
    assert main(_run_argv(root, tiny_clip, work, split="empty")) == 2
    err = capsys.readouterr().err.strip()
    assert "training split 'empty'" in err and "no images" in err and "\n" not in err
    assert not (work / "seeds").exists()


def test_training_and_pseudo_masks_refuse_an_empty_split(tmp_path):
    from weakclip.config import apply_overrides, load_preset
    from weakclip.engine.trainer import train
    from weakclip.inference.pseudo_masks import generate_pseudo_masks

    root = _data(tmp_path)
    cfg = apply_overrides(load_preset("voc"), ["data.kind=folder", f"data.root={root}", "data.split=empty",
                                               f"data.seeds={root}", "model.clip_arch=tiny"])
    with pytest.raises(DataError, match="^training: no images in the split 'empty'"):
        train(cfg, tmp_path / "refine", device="cpu", progress=False)
    assert not (tmp_path / "refine" / "checkpoints").exists()
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, retrain

    r_cfg = apply_retrain_overrides(load_retrain_preset("voc-plus"), [
        "data.kind=folder", f"data.root={root}", "data.split=empty", "model.pretrained_backbone=false"])
    with pytest.raises(DataError, match="^retraining: no images in the split 'empty'"):
        retrain(r_cfg, root / "masks", None, tmp_path / "retrain", progress=False, quiet=True)
    assert not (tmp_path / "retrain" / "config.yaml").exists()
    empty = build_dataset("folder", root, split="empty")
    with pytest.raises(DataError, match="^pseudo masks: no images in the split 'empty'"):
        generate_pseudo_masks(object(), empty, tmp_path / "pm")
    assert not (tmp_path / "pm").exists()


def test_a_stage_recorded_complete_over_zero_images_runs_again(tmp_path, tiny_clip):
    from weakclip.pipeline import Pipeline, PipelineConfig

    root = _data(tmp_path)
    work = tmp_path / "w"
    stale = {"stage": "seeds", "status": "complete", "settings": {}, "metrics": {"images": 0}}
    (work / "seeds").mkdir(parents=True)
    (work / "seeds" / "stage.json").write_text(json.dumps(stale))  # what an empty split left before
    cfg = PipelineConfig(workdir=work, data_root=root, dataset="folder", train_split="train",
                         clip_weights=tiny_clip, refine_overrides=["model.clip_arch=tiny-p8"], progress=False)
    lines: list[str] = []
    pipeline = Pipeline(cfg, log=lines.append)
    assert pipeline.stage_record("seeds") is None and "recorded complete over 0 images" in lines[-1]
    pipeline.run(stages=("seeds",))
    record = json.loads((work / "seeds" / "stage.json").read_text())
    assert record["metrics"]["images"] == 4
    assert len(list((work / "seeds").glob("*.png"))) == 4
    with pytest.raises(Exception, match="no image was processed"):
        pipeline._finish("seeds", {}, {"images": 0})
    assert np.isfinite(record["metrics"]["coverage"])
