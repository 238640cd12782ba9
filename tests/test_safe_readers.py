"""User files that could carry code are read without running it: ``cls_labels.npy`` (a pickle), YAML
configs, TorchScript CLIP archives. Each malicious file here would create a marker file when its code ran;
the tests assert the refusal is one line naming what the file held, and that the marker never appears.
(Checkpoints and weights read with ``torch.load`` are covered by tests/test_release_checkpoint.py,
tests/test_api.py and the checkpoint tests.)"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakclip.data.safe_npy import load_npy_safely
from weakclip.data.voc import VOCDataset, load_cls_labels
from weakclip.errors import DataError, WeakclipError

SRC = str(Path(__file__).resolve().parents[1] / "src")


class _RunsCode:
    """Pickles as a call of ``os.system`` that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def _irn_labels(int_keys: bool) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for ident in ("2007_000032", "2007_000039", "2008_000002"):
        vec = (rng.random(20) > 0.8).astype(np.float32)
        vec[3] = 1.0
        out[int(ident.replace("_", "")) if int_keys else ident] = vec
    return out


@pytest.mark.parametrize("int_keys", [True, False])
def test_cls_labels_of_the_irn_format_load(tmp_path, int_keys):
    labels = _irn_labels(int_keys)
    path = tmp_path / "cls_labels.npy"
    np.save(path, labels)
    table = load_cls_labels(path, 20)
    assert sorted(table) == sorted(str(k) for k in labels)
    for key, vec in labels.items():
        np.testing.assert_array_equal(table[str(key)], np.flatnonzero(vec) + 1)


def test_a_cls_labels_file_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = _irn_labels(False)
    evil["2007_000032"] = _RunsCode(marker)
    path = tmp_path / "evil.npy"
    np.save(path, evil, allow_pickle=True)
    with pytest.raises(DataError) as info:
        load_cls_labels(path, 20)
    text = _one_line(info)
    assert f"{os.system.__module__}.system" in text and "refused" in text and str(path) in text
    assert not marker.exists()
    # the same file as numpy itself reads it does run the code: the test's file is a real threat
    np.load(path, allow_pickle=True)
    assert marker.exists()


def test_a_pickle_naming_any_other_class_is_refused(tmp_path):
    from collections import OrderedDict

    path = tmp_path / "ordered.npy"
    np.save(path, OrderedDict(_irn_labels(False)), allow_pickle=True)
    with pytest.raises(DataError, match="collections.OrderedDict, which is not numpy data"):
        load_npy_safely(path, "cls_labels file")


def test_npy_files_that_are_not_labels_say_what_they_are(tmp_path):
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(20, dtype=np.float32))
    np.testing.assert_array_equal(load_npy_safely(plain), np.arange(20))  # numbers need no pickle at all
    with pytest.raises(DataError, match="must hold a dict id -> multi-hot vector .* found ndarray"):
        load_cls_labels(plain, 20)
    png = tmp_path / "labels.npy"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with pytest.raises(DataError, match=r"is not a \.npy file \(it starts with b'\\x89PNG"):
        load_cls_labels(png, 20)
    good = tmp_path / "good.npy"
    np.save(good, _irn_labels(False))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError, match="unreadable pickled data") as info:
        load_cls_labels(cut, 20)
    _one_line(info)
    with pytest.raises(DataError, match="cls_labels file not found"):
        load_cls_labels(tmp_path / "missing.npy", 20)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, {"2007_000032": np.ones(80, np.float32)})
    with pytest.raises(DataError, match="has 80 values, expected 20"):
        load_cls_labels(wrong, 20)


def _tiny_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for ident in ("2007_000032", "2007_000039"):
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{ident}.jpg")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000032\n2007_000039\n")
    return voc


def test_the_cli_refuses_a_malicious_cls_labels_file(tmp_path):
    voc = _tiny_voc(tmp_path / "data")
    marker = tmp_path / "ran"
    evil = {"2007_000032": _RunsCode(marker), "2007_000039": np.ones(20, np.float32)}
    path = tmp_path / "evil.npy"
    np.save(path, evil, allow_pickle=True)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "weakclip", "seeds", "check", str(seeds), "--data-root",
                           str(voc), "--dataset", "voc", "--no-gt", "--cls-labels", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "system" in lines[0], proc.stderr
    assert not marker.exists()
    # and the dataset reads the same file's honest twin
    np.save(path, _irn_labels(False))
    ds = VOCDataset(voc, split="train_aug", cls_labels=path, with_gt=False)
    assert ds.get_labels(0)[4] == 1  # class id 4 = vec[3]


# ------------------------------------------------------------------------------------------------ YAML
def test_a_yaml_config_with_python_tags_is_refused(tmp_path):
    from weakclip.config import Config
    from weakclip.retrain.config import load_retrain_preset

    marker = tmp_path / "ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"train:\n  iters: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(WeakclipError, match="cannot read config .*python/object/apply:os.system") as info:
        Config.from_yaml(bad)
    _one_line(info)
    with pytest.raises(WeakclipError, match="cannot read config"):
        load_retrain_preset(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- TorchScript CLIP
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation: still how to make one
def test_a_torchscript_archive_with_a_python_pickle_is_refused(tmp_path):
    """OpenAI's ``ViT-B-16.pt`` is a TorchScript archive: torch's own C++ unpickler reads it, which
    knows no Python functions. A ``data.pkl`` swapped for a pickle calling ``os.system`` fails to load,
    as a one-line WeightsError, and runs nothing."""
    import torch

    from weakclip.models.clip_weights import load_clip_state_dict

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    good = tmp_path / "good.pt"
    scripted.save(str(good))
    marker = tmp_path / "ran"
    bad = tmp_path / "ViT-B-16.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                buf = io.BytesIO()
                pickle.dump(_RunsCode(marker), buf, protocol=2)
                data = buf.getvalue()
            dst.writestr(item, data)
    with pytest.raises(WeakclipError) as info:
        load_clip_state_dict(bad)
    print(_one_line(info))
    assert not marker.exists()
