"""The COCO stages run one at a time read a COCO folder in the label space `weakclip run` uses: the `coco`
presets (the release) in COCO's 91 category ids, `coco-plus` in the 81 classes (issue 23)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_coco import DOG, _coco_root
from weakclip.cli import main
from weakclip.data.classes import COCO91_CLASSES
from weakclip.data.datasets import build_dataset
from weakclip.data.io import write_label_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def coco(tmp_path):
    """A COCO-format set (3 images, instances JSON) prepared by `weakclip prepare coco`."""
    root = _coco_root(tmp_path / "coco")
    assert main(["prepare", "coco", "--coco-root", str(root), "--out", str(root), "--splits", "train2014",
                 "--workers", "0"]) == 0
    return root


def _kind_printed(capsys) -> str:
    out = capsys.readouterr().out
    return next(line.split(":", 1)[1].strip().split()[0] for line in out.splitlines()
                if line.strip().startswith("kind:"))


def test_each_stage_reads_coco_in_the_space_of_its_preset(coco, tmp_path, capsys):
    from weakclip.pipeline import Pipeline, PipelineConfig

    for preset, kind in (("coco", "coco91"), ("coco-plus", "coco")):
        work = str(tmp_path / "w")
        assert main(["train", "--preset", preset, "--data-root", str(coco), "--workdir", work,
                     "--print-config"]) == 0
        assert _kind_printed(capsys) == kind
        assert main(["retrain", "--preset", preset, "--data-root", str(coco), "--workdir", work,
                     "--print-config"]) == 0
        assert _kind_printed(capsys) == kind
        pipe = Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=coco, preset=preset,
                                       train_split="train2014", val_split="train2014"), log=lambda line: None)
        assert pipe.kind == pipe.retrain_cfg.data.kind == kind


def test_seed_check_reads_a_detected_coco_folder_in_the_91_ids(coco, tmp_path, capsys):
    """Seeds in the 91 category ids (what the coco refinement preset trains on) pass the check by default;
    read as the 81 classes, the dog (category 18, class 17) is not among the image's labels."""
    dataset = build_dataset("coco91", coco, split="train2014")
    seeds = tmp_path / "seeds"
    for i, ident in enumerate(dataset.ids):
        write_label_png(seeds / f"{ident}.png", dataset.read_gt(i))
    assert COCO91_CLASSES.index("dog") == DOG + 1  # the two spaces differ at the dog
    # as refinement reads it (COCO91Dataset passes its options on to COCODataset)
    training = build_dataset("coco91", coco, split="train2014", seed_dir=seeds, with_gt=False)
    assert len(training) == 3 and not training.has_gt
    assert any(DOG + 1 in np.unique(training.read_seed(i)) for i in range(3))
    assert main(["seeds", "check", str(seeds), "--data-root", str(coco), "--quiet"]) == 0
    assert "read as coco91" in capsys.readouterr().out
    assert main(["seeds", "check", str(seeds), "--data-root", str(coco), "--dataset", "coco", "--quiet"]) == 1


def test_standalone_retrain_coco_trains_on_the_91_id_masks(coco, tmp_path, capsys):
    """`weakclip retrain --preset coco` on pseudo masks of the coco preset (91 ids): a network of 91 classes,
    scored in that space (a tiny ResNet-38, one iteration)."""
    import weakclip

    dataset = build_dataset("coco91", coco, split="train2014")
    masks = tmp_path / "pseudo"
    for i, ident in enumerate(dataset.ids):
        write_label_png(masks / f"{ident}.png", dataset.read_gt(i))
    work = tmp_path / "retrain"
    assert main(["retrain", "--preset", "coco", "--masks", str(masks), "--data-root", str(coco),
                 "--workdir", str(work), "--no-pretrained", "--val-split", "train2014", "--iters", "1",
                 "--batch-size", "2", "--crop-size", "32", "--num-workers", "0", "--crf", "none", "--device",
                 "cpu", "--quiet", "--set", "model.width_divisor=8", "--set", "eval.scales=1.0",
                 "--set", "eval.flip=false"]) == 0
    seg = weakclip.load(work, "cpu")
    assert len(seg.classes) == 91 and seg.classes[COCO91_CLASSES.index("dog")] == "dog"
    record = json.loads((work / "eval.json").read_text())
    assert record["images"] == 3 and np.isfinite(record["miou"])
