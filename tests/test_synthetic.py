import json

import numpy as np
import pytest
from PIL import Image

from weakclip.data.classes import read_class_file, voc_palette
from weakclip.data.synthetic import SHAPE_CLASSES, make_synthetic_dataset, render_sample


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data")


def _all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ids(root, split):
    return (root / "splits" / f"{split}.txt").read_text().split()


def _read(path):
    return np.array(Image.open(path))


def test_layout(synth):
    classes = read_class_file(synth / "classes.txt")
    assert classes == ["background", "disk", "square", "triangle", "ring"]
    train, val = _ids(synth, "train"), _ids(synth, "val")
    assert len(train) == 24 and len(val) == 8 and not set(train) & set(val)
    labels = json.loads((synth / "labels.json").read_text())
    assert set(labels) == set(train) | set(val)
    for sid in train + val:
        img = Image.open(synth / "images" / f"{sid}.png")
        assert img.mode == "RGB" and img.size == (128, 96)
        mask = Image.open(synth / "masks" / f"{sid}.png")
        assert mask.mode == "P" and mask.size == (128, 96)
        assert np.array_equal(np.array(mask.getpalette()[:30], np.uint8).reshape(10, 3), voc_palette(10))
    for sid in train:
        assert Image.open(synth / "seeds" / f"{sid}.png").mode == "P"
    assert sorted(p.stem for p in (synth / "seeds").iterdir()) == sorted(train)


def test_labels_match_ground_truth_and_seeds_use_only_image_labels(synth):
    classes = read_class_file(synth / "classes.txt")
    labels = json.loads((synth / "labels.json").read_text())
    for sid, names in labels.items():
        assert names and "background" not in names
        gt = _read(synth / "masks" / f"{sid}.png")
        assert {classes[c] for c in np.unique(gt) if c != 0} == set(names)
        assert 255 not in gt
        seed_path = synth / "seeds" / f"{sid}.png"
        if seed_path.exists():
            allowed = {0, 255} | {classes.index(n) for n in names}
            assert set(np.unique(_read(seed_path)).tolist()) <= allowed


def test_deterministic(tmp_path):
    kw = dict(n_train=4, n_val=2)
    a = _all_files(make_synthetic_dataset(tmp_path / "a", seed=3, **kw))
    b = _all_files(make_synthetic_dataset(tmp_path / "b", seed=3, **kw))
    c = _all_files(make_synthetic_dataset(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert set(a) == set(c)
    assert a["images/train_0000.png"] != c["images/train_0000.png"]


def _seed_stats(root, k):
    conf = np.zeros((k, k), np.int64)
    correct = confident = total = 0
    for sid in _ids(root, "train"):
        gt = _read(root / "masks" / f"{sid}.png").astype(np.int64)
        seed = _read(root / "seeds" / f"{sid}.png").astype(np.int64)
        sure = seed != 255
        correct += int((seed[sure] == gt[sure]).sum())
        confident += int(sure.sum())
        total += seed.size
        pred = np.where(sure, seed, 0)
        conf += np.bincount(gt.ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    miou = float(np.mean(inter[union > 0] / union[union > 0]))
    return miou, correct / confident, confident / total


def test_seed_quality_bands(synth):
    miou, precision, coverage = _seed_stats(synth, 5)
    assert 0.40 <= miou <= 0.65
    assert 0.85 <= precision <= 0.95
    assert 0.40 <= coverage <= 0.80


def test_seed_quality_knob(tmp_path):
    perfect = make_synthetic_dataset(tmp_path / "p", n_train=4, n_val=0, seed_quality=1.0)
    assert _seed_stats(perfect, 5) == (1.0, 1.0, 1.0)
    worse = make_synthetic_dataset(tmp_path / "w", n_train=16, n_val=0, seed_quality=0.1)
    better = make_synthetic_dataset(tmp_path / "b", n_train=16, n_val=0, seed_quality=0.8)
    assert _seed_stats(worse, 5)[0] < _seed_stats(better, 5)[0]


def test_render_sample_and_size_range(tmp_path):
    classes = ["background", *SHAPE_CLASSES]
    image, gt, seed = render_sample(np.random.default_rng(0), classes, (64, 80))
    assert image.shape == (64, 80, 3) and image.dtype == np.uint8
    assert gt.shape == seed.shape == (64, 80) and gt.dtype == seed.dtype == np.uint8
    assert gt.max() < len(classes)
    again = render_sample(np.random.default_rng(0), classes, (64, 80))
    assert all(np.array_equal(x, y) for x, y in zip((image, gt, seed), again))

    root = make_synthetic_dataset(tmp_path / "r", n_train=3, n_val=3, image_size=((60, 90), (70, 120)),
                                  n_classes=6, image_format="jpg")
    sizes = set()
    for sid in _ids(root, "train") + _ids(root, "val"):
        w, h = Image.open(root / "images" / f"{sid}.jpg").size
        assert 60 <= h <= 90 and 70 <= w <= 120
        assert _read(root / "masks" / f"{sid}.png").shape == (h, w)
        sizes.add((h, w))
    assert len(sizes) > 1
    assert len(read_class_file(root / "classes.txt")) == 7


def test_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    make_synthetic_dataset(tmp_path / "f", n_train=24, n_val=8)
    assert time.perf_counter() - t0 < 2.0
