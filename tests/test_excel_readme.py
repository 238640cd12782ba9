"""The README's "ExCEL from Python" block runs as written: train, load the checkpoint with neither the
descriptors nor the data, segment a photo. Only the sizes are made small (a tiny CLIP, crop 64, 3
iterations, a synthetic folder dataset): the test adds those overrides after the README's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.models.clip import get_arch, make_open_clip_model

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["model.clip_arch=tiny-excel", "data.kind=folder", "data.split=train", "data.crop_size=64",
         "data.num_workers=0", "train.batch_size=2", "train.iters=3", "train.warmup_iters=1",
         "train.checkpoint_every=2", "train.log_every=1", "text.num_clusters=12", "infer.size=64"]


def _block() -> str:
    text = README.read_text()
    section = text[text.index("### ExCEL from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_excel_python_block_runs(tmp_path, monkeypatch):
    import skimage.data

    from weakclip.data.datasets import build_dataset
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.methods.excel import config as excel_config

    code = _block()
    assert "train_excel(" in code and "load_excel_checkpoint(" in code and "infer_image(" in code
    root = make_synthetic_dataset(tmp_path / "synthetic", n_train=4, n_val=0, image_size=(64, 80))
    classes = build_dataset("folder", root, split="train").classes
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    torch.save(make_open_clip_model(get_arch("tiny-excel")).state_dict(), tmp_path / "ViT-B-16.pt")
    descriptors = tmp_path / "ExCEL/attributes_text/descriptors_pascal_voc_gpt4.0_cluster_a_photo_of4.json"
    descriptors.parent.mkdir(parents=True)
    descriptors.write_text(json.dumps({c: [f"a {c} with {w} edges." for w in ("sharp", "soft", "round", "no")]
                                       for c in classes[1:]}))
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(tmp_path / "photo.jpg")

    real = excel_config.apply_excel_overrides
    monkeypatch.setattr(excel_config, "apply_excel_overrides",
                        lambda cfg, overrides: real(cfg, [*overrides, f"data.root={root}", *SMALL]))
    namespace: dict = {}
    exec(compile(code, "README.md (ExCEL from Python)", "exec"), namespace)

    assert namespace["summary"]["finished"] and namespace["summary"]["method"] == "excel"
    assert namespace["checkpoint"]["method"] == "excel"
    mask = namespace["mask"]
    assert mask.shape == (128, 128) and mask.dtype.kind in "iu"
    assert set(np.unique(mask)) <= set(range(len(classes)))
    assert (tmp_path / "excel_voc").is_dir()


@pytest.mark.parametrize("name", ["excel-voc", "excel-coco"])
def test_the_readme_names_each_excel_preset(name):
    assert f"`{name}`" in README.read_text()
