"""Tests of weakclip.data.datasets on tiny VOC-like and folder-layout datasets built in tmp_path."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from weakclip.data.classes import VOC_CLASSES, voc_palette
from weakclip.data.datasets import (
    FolderDataset,
    SegDataset,
    VOCDataset,
    build_dataset,
    collate_samples,
    detect_kind,
)
from weakclip.errors import DataError

H, W = 12, 16
PERSON, DOG, AERO, TV, CAT = (
    VOC_CLASSES.index(n) for n in ("person", "dog", "aeroplane", "tvmonitor", "cat")
)


def _image(path: Path, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def _voc_masks() -> dict[str, np.ndarray]:
    m1 = np.zeros((H, W), np.uint8)
    m1[2:6, 2:6] = PERSON
    m1[7:10, 8:14] = DOG
    m1[0, :] = 255
    m2 = np.full((H, W), AERO, np.uint8)
    m2[:3] = 0
    m3 = np.zeros((H, W), np.uint8)
    m3[5:7, 5:7] = TV
    m3[4, 4:8] = 255
    m4 = np.zeros((H, W), np.uint8)
    m4[1:4, 1:4] = CAT
    return {"2007_000001": m1, "2007_000002": m2, "2008_000003": m3, "2009_000004": m4}


@pytest.fixture
def voc(tmp_path) -> Path:
    """VOCdevkit/VOC2012 with 4 JPEGs, indexed Aug masks and a train_aug list."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    masks = _voc_masks()
    for k, (ident, m) in enumerate(masks.items()):
        _image(root / "JPEGImages" / f"{ident}.jpg", seed=k)
        _mask(root / "SegmentationClassAug" / f"{ident}.png", m)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    ids = list(masks)
    # one line in the DeepLab "image mask" format
    lines = [ids[0], ids[1], f"/JPEGImages/{ids[2]}.jpg /SegmentationClassAug/{ids[2]}.png", ids[3]]
    (lists / "train_aug.txt").write_text("\n".join(lines) + "\n")
    (lists / "val.txt").write_text(f"{ids[1]}\n{ids[3]}\n")
    return root


def _multi_hot(*classes: int, k: int = 21) -> np.ndarray:
    v = np.zeros(k, np.float32)
    v[0] = 1
    v[list(classes)] = 1
    return v


# ---------------------------------------------------------------------------- VOC
def test_voc_samples_and_labels_from_masks(voc):
    ds = VOCDataset(voc)
    assert isinstance(ds, SegDataset) and ds.kind == "voc"
    assert ds.classes == list(VOC_CLASSES) and ds.num_classes == 21
    assert ds.ids == ["2007_000001", "2007_000002", "2008_000003", "2009_000004"]
    assert len(ds) == 4 and ds.has_gt and not ds.has_seeds
    s = ds[0]
    assert set(s) == {"id", "image", "labels", "gt"}
    assert s["id"] == "2007_000001"
    assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
    assert s["image"].flags.writeable and s["gt"].flags.writeable  # transforms may work in place
    assert s["labels"].dtype == np.float32
    np.testing.assert_array_equal(s["labels"], _multi_hot(PERSON, DOG))
    np.testing.assert_array_equal(s["gt"], _voc_masks()["2007_000001"])
    np.testing.assert_array_equal(ds[2]["labels"], _multi_hot(TV))
    np.testing.assert_array_equal(ds[-1]["labels"], _multi_hot(CAT))
    with pytest.raises(IndexError):
        ds[4]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers need this
    np.testing.assert_array_equal(clone[1]["labels"], _multi_hot(AERO))


def test_voc_get_labels_does_not_read_the_image(voc):
    ds = VOCDataset(voc)
    shutil.rmtree(voc / "JPEGImages")
    np.testing.assert_array_equal(ds.get_labels(1), _multi_hot(AERO))
    v = ds.get_labels(0)
    v[:] = 0  # a copy: the cache is not affected
    np.testing.assert_array_equal(ds.get_labels(0), _multi_hot(PERSON, DOG))


def test_voc_root_variants_and_split_path(voc):
    ds = VOCDataset(voc.parent.parent, split="val")  # the folder holding VOCdevkit
    assert ds.ids == ["2007_000002", "2009_000004"]
    custom = voc.parent.parent / "mine.txt"
    custom.write_text("2008_000003\n\n# comment\n2008_000003\n")
    ds = VOCDataset(voc, split=str(custom))
    assert ds.ids == ["2008_000003"]
    assert any("repeats ids 2008_000003" in p for p in ds.validate())


def test_voc_transform_applied_last(voc):
    def tf(sample):
        assert "gt" in sample and "labels" in sample
        sample["image"] = sample["image"][:4]
        sample["extra"] = sample["id"].upper()
        return sample

    s = VOCDataset(voc, transform=tf)[0]
    assert s["image"].shape == (4, W, 3) and s["extra"] == "2007_000001"


def test_voc_cls_labels(voc, tmp_path):
    table = {i: np.zeros(20, np.float32) for i in _voc_masks()}
    table["2007_000001"][[PERSON - 1, AERO - 1]] = 1  # deliberately not the mask's classes
    table["2007_000002"][AERO - 1] = 1
    table["2008_000003"][TV - 1] = 1
    table["2009_000004"][CAT - 1] = 1
    np.save(tmp_path / "cls_labels.npy", table)
    ds = VOCDataset(voc, cls_labels=tmp_path / "cls_labels.npy", with_gt=False)
    assert not ds.has_gt
    s = ds[0]
    assert "gt" not in s
    np.testing.assert_array_equal(s["labels"], _multi_hot(PERSON, AERO))
    # the mask shows a dog the cls_labels file does not give: validate says so
    problems = ds.validate()
    assert len(problems) == 1 and "['dog']" in problems[0] and "2007_000001" in problems[0]
    # without the mask folder the labels still come from the file
    shutil.rmtree(voc / "SegmentationClassAug")
    ds = VOCDataset(voc, cls_labels=tmp_path / "cls_labels.npy", with_gt=False)
    np.testing.assert_array_equal(ds.get_labels(3), _multi_hot(CAT))
    assert ds.validate() == []


def test_voc_cls_labels_irn_integer_keys(voc, tmp_path):
    table = {int(i.replace("_", "")): np.eye(20, dtype=np.float32)[k] for k, i in enumerate(_voc_masks())}
    np.save(tmp_path / "irn.npy", table)
    ds = VOCDataset(voc, cls_labels=tmp_path / "irn.npy")
    np.testing.assert_array_equal(ds.get_labels(2), _multi_hot(3))


def test_voc_cls_labels_errors(voc, tmp_path):
    np.save(tmp_path / "short.npy", {"2007_000001": np.ones(20)})
    with pytest.raises(DataError, match=r"no entry for 3 of the 4 ids .*2007_000002"):
        VOCDataset(voc, cls_labels=tmp_path / "short.npy")
    np.save(tmp_path / "len.npy", {i: np.ones(21) for i in _voc_masks()})
    with pytest.raises(DataError, match="has 21 values, expected 20"):
        VOCDataset(voc, cls_labels=tmp_path / "len.npy")
    np.save(tmp_path / "arr.npy", np.ones((4, 20)))
    with pytest.raises(DataError, match="must hold a dict"):
        VOCDataset(voc, cls_labels=tmp_path / "arr.npy")
    with pytest.raises(DataError, match="cls_labels file not found"):
        VOCDataset(voc, cls_labels=tmp_path / "none.npy")


def test_voc_missing_pieces(voc, tmp_path):
    with pytest.raises(DataError) as info:
        VOCDataset(voc, split="test")
    msg = str(info.value)
    assert "'test'" in msg and "ImageSets/Segmentation/test.txt" in msg and "SegmentationAug/test.txt" in msg
    with pytest.raises(DataError, match=r"VOC images not found: looked for .*JPEGImages"):
        VOCDataset(tmp_path / "elsewhere")
    # train_aug needs the Aug masks; train/val fall back to SegmentationClass
    (voc / "SegmentationClassAug").rename(voc / "SegmentationClass")
    with pytest.raises(DataError, match=r"masks for split 'train_aug' not found: .*SegmentationClassAug"):
        VOCDataset(voc)
    ds = VOCDataset(voc, split="val")
    assert ds.gt_path(0) == voc / "SegmentationClass" / "2007_000002.png"
    np.testing.assert_array_equal(ds[0]["labels"], _multi_hot(AERO))


def test_voc_seeds(voc, tmp_path):
    seeds = tmp_path / "seeds"
    for ident, m in _voc_masks().items():
        s = m.copy()
        s[-2:] = 255
        _mask(seeds / f"{ident}.png", s)
    ds = VOCDataset(voc, seed_dir=seeds)
    assert ds.has_seeds
    s = ds[1]
    assert s["seed"].dtype == np.uint8 and s["seed"].shape == (H, W)
    assert (s["seed"][-2:] == 255).all() and s["seed"][5, 5] == AERO
    (seeds / "2008_000003.png").unlink()
    with pytest.raises(DataError, match=r"seed for image '2008_000003' not found: .*2008_000003\.png"):
        ds[2]
    with pytest.raises(DataError, match="seed folder not found"):
        VOCDataset(voc, seed_dir=tmp_path / "nothing")


def test_voc_item_errors_raise(voc):
    ds = VOCDataset(voc)
    (voc / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(DataError, match=r"^image not found: .*2007_000001\.jpg"):
        ds[0]
    (voc / "JPEGImages" / "2007_000002.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"^cannot read image .*2007_000002\.jpg"):
        ds[1]
    _mask(voc / "SegmentationClassAug" / "2008_000003.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DataError, match=rf"2008_000003.png is {W + 1}x{H} but its image \S+/JPEGImages/"
                                        rf"2008_000003.jpg is {W}x{H}"):
        ds[2]


def test_validate_collects_every_problem(voc, tmp_path):
    jpg = voc / "JPEGImages"
    aug = voc / "SegmentationClassAug"
    seeds = tmp_path / "seeds"
    for ident, m in _voc_masks().items():
        _mask(seeds / f"{ident}.png", m)
    ds = VOCDataset(voc, seed_dir=seeds)
    assert ds.validate() == []

    (jpg / "2007_000001.jpg").unlink()  # missing image
    data = (jpg / "2007_000002.jpg").read_bytes()  # truncated JPEG
    (jpg / "2007_000002.jpg").write_bytes(data[: len(data) // 2])
    bad = _voc_masks()["2008_000003"]
    bad[0, 0] = 42  # value out of range
    _mask(aug / "2008_000003.png", bad)
    Image.fromarray(voc_palette()[_voc_masks()["2009_000004"]]).save(aug / "2009_000004.png")  # RGB mask
    (seeds / "2008_000003.png").unlink()  # missing seed
    _mask(seeds / "2007_000002.png", np.full((H, W), DOG, np.uint8))  # seed class not in labels

    ds = VOCDataset(voc, seed_dir=seeds)
    problems = ds.validate()
    text = "\n".join(problems)
    assert all("\n" not in p for p in problems)
    assert "image not found: " in text and "2007_000001.jpg" in text
    assert "cannot read image" in text and "2007_000002.jpg" in text
    assert "2008_000003.png has values [42] outside" in text
    assert "2009_000004.png is an RGB colour image" in text
    assert "seed for image '2008_000003' not found" in text
    assert "has classes ['dog'] that are not among the labels of image '2007_000002'" in text
    assert len(problems) == 6


def test_dataloader_with_collate(voc):
    ds = VOCDataset(voc)
    loader = DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["id"] == ["2007_000001", "2007_000002", "2008_000003"]
    assert isinstance(b["image"], torch.Tensor) and b["image"].shape == (3, H, W, 3)
    assert b["image"].dtype == torch.uint8
    assert b["labels"].shape == (3, 21) and b["labels"].dtype == torch.float32
    assert b["gt"].shape == (3, H, W)
    np.testing.assert_array_equal(b["labels"][2].numpy(), _multi_hot(TV))


def test_collate_samples_shapes_and_keys():
    a = {"id": "a", "image": np.zeros((2, 3, 3), np.uint8), "labels": np.ones(4, np.float32), "n": 1}
    b = {"id": "b", "image": np.zeros((5, 3, 3), np.uint8), "labels": np.ones(4, np.float32), "n": 2}
    out = collate_samples([a, b])
    assert out["id"] == ["a", "b"]
    assert isinstance(out["image"], list) and [t.shape for t in out["image"]] == [(2, 3, 3), (5, 3, 3)]
    assert isinstance(out["image"][0], torch.Tensor)
    assert out["labels"].shape == (2, 4)
    assert out["n"].tolist() == [1, 2]
    c = dict(b, seed=np.zeros((5, 3), np.uint8))
    with pytest.raises(DataError, match=r"key 'seed' is in 1 of 2 samples .*ids a"):
        collate_samples([a, c])
    t = collate_samples([dict(a, meta={"x": 1}), dict(a, meta={"x": 2})])
    assert t["meta"] == [{"x": 1}, {"x": 2}]
    assert collate_samples([]) == {}


# ---------------------------------------------------------------------------- folder layout
FOLDER_CLASSES = ["background", "cat", "dog", "bird"]


def _folder(root: Path, labels_format: str = "json", masks: bool = True, seeds: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    labels = {"a": ["cat"], "b": ["dog", "bird"], "c": []}
    exts = {"a": "jpg", "b": "png", "c": "JPEG"}
    for k, ident in enumerate(labels):
        _image(root / "images" / f"{ident}.{exts[ident]}", h=8 + k, w=10, seed=k)
        m = np.zeros((8 + k, 10), np.uint8)
        for c in labels[ident]:
            m[FOLDER_CLASSES.index(c) * 2, :] = FOLDER_CLASSES.index(c)
        if masks:
            _mask(root / "masks" / f"{ident}.png", m)
        if seeds:
            s = m.copy()
            s[-1] = 255
            _mask(root / "seeds" / f"{ident}.png", s)
    if labels_format == "json":
        (root / "labels.json").write_text(json.dumps(labels))
    else:
        rows = ["image,labels"] + [f"{i}.jpg,{';'.join(v)}" for i, v in labels.items()]
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("b\na\n")
    (root / "splits" / "val.txt").write_text("c\n")
    return root


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_folder_dataset(tmp_path, fmt):
    root = _folder(tmp_path / "ds", labels_format=fmt)
    ds = FolderDataset(root)
    assert ds.classes == FOLDER_CLASSES and ds.ids == ["a", "b", "c"]
    assert ds.has_gt and not ds.has_seeds
    np.testing.assert_array_equal(ds.get_labels(0), [1, 1, 0, 0])
    np.testing.assert_array_equal(ds.get_labels(1), [1, 0, 1, 1])
    np.testing.assert_array_equal(ds.get_labels(2), [1, 0, 0, 0])
    s = ds[1]
    assert s["image"].shape == (9, 10, 3) and s["gt"][4, 0] == 2 and s["gt"][6, 3] == 3
    assert ds.image_path(2).name == "c.JPEG"
    assert ds.validate() == []
    train = FolderDataset(root, split="train")
    assert train.ids == ["b", "a"]
    np.testing.assert_array_equal(train[0]["labels"], [1, 0, 1, 1])


def test_folder_seeds_and_no_gt(tmp_path):
    root = _folder(tmp_path / "ds", masks=False, seeds=True)
    ds = FolderDataset(root)
    assert ds.has_seeds and not ds.has_gt and ds.seed_dir == root / "seeds"
    s = ds[0]
    assert "gt" not in s and (s["seed"][-1] == 255).all() and s["seed"][2, 0] == 1
    other = tmp_path / "cam"
    for ident in ("a", "b", "c"):
        _mask(other / f"{ident}.png", np.zeros((8 + "abc".index(ident), 10), np.uint8))
    ds = FolderDataset(root, seed_dir=other)
    assert ds.seed_path(0) == other / "a.png" and (ds[0]["seed"] == 0).all()
    masked = _folder(tmp_path / "ds2", masks=True)
    assert not FolderDataset(masked, with_gt=False).has_gt


def test_folder_seeds_for_some_splits_only(tmp_path):
    # like the synthetic generator: seeds for the train ids only
    root = _folder(tmp_path / "ds", seeds=True)
    (root / "seeds" / "c.png").unlink()
    assert FolderDataset(root, split="train").has_seeds
    val = FolderDataset(root, split="val")
    assert not val.has_seeds and "seed" not in val[0] and val.validate() == []
    every = FolderDataset(root)
    assert not every.has_seeds
    assert every.validate() == [
        f"seed folder {root / 'seeds'} covers only 2 of the 3 ids, so it is not used "
        "(pass seed_dir= to require it)"
    ]
    with pytest.raises(DataError, match="seed for image 'c' not found"):
        FolderDataset(root, seed_dir=root / "seeds")[2]


def test_folder_unknown_class_name(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dgo"], "c": ["horse"]}))
    with pytest.raises(DataError) as info:
        FolderDataset(root)
    msg = str(info.value)
    assert "image 'b' has unknown class 'dgo' (did you mean 'dog'?)" in msg
    assert "labels.json" in msg and "classes.txt" in msg and "(1 more images with bad labels" in msg
    assert "\n" not in msg


def test_folder_layout_errors(tmp_path):
    root = _folder(tmp_path / "ds")
    _image(root / "images" / "a.png")
    with pytest.raises(DataError, match=r"image id 'a' has several files .*a\.jpg, a\.png"):
        FolderDataset(root)
    (root / "images" / "a.png").unlink()
    with pytest.raises(DataError, match=r"split list not found: .*test\.txt \(available: train, val\)"):
        FolderDataset(root, split="test")
    (root / "splits" / "bad.txt").write_text("a\nzzz\n")
    with pytest.raises(DataError, match=r"1 ids have no labels in .*labels\.json: zzz"):
        FolderDataset(root, split="bad")
    (root / "labels.csv").write_text("image,labels\na,cat\n")
    with pytest.raises(DataError, match="keep one labels file"):
        FolderDataset(root)
    (root / "labels.csv").unlink()
    (root / "labels.json").unlink()
    with pytest.raises(DataError, match="expected labels.json or labels.csv"):
        FolderDataset(root)
    (root / "labels.csv").write_text("file,classes\na,cat\n")
    with pytest.raises(DataError, match="needs the header 'image,labels'"):
        FolderDataset(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="class list not found"):
        FolderDataset(root)


def test_folder_validate(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "images" / "a.jpg").unlink()
    m = np.zeros((9, 10), np.uint8)
    m[0, 0] = 1  # a cat the labels do not mention
    _mask(root / "masks" / "b.png", m)
    (root / "masks" / "c.png").unlink()
    ds = FolderDataset(root)
    problems = ds.validate()
    assert len(problems) == 3
    assert problems[0].startswith("image not found: ") and "a.<jpg|jpeg|png|bmp|webp>" in problems[0]
    assert "b.png shows classes ['cat'] that are not among the labels of image 'b'" in problems[1]
    assert problems[2].startswith("mask not found: ") and problems[2].endswith("c.png")


# ---------------------------------------------------------------------------- build_dataset
def test_build_dataset(voc, tmp_path):
    ds = build_dataset("voc", voc, split="val", seed_dir=None)
    assert isinstance(ds, VOCDataset) and len(ds) == 2
    assert isinstance(build_dataset(voc), VOCDataset)
    root = _folder(tmp_path / "ds")
    assert detect_kind(root) == "folder"
    ds = build_dataset(root, split="train")
    assert isinstance(ds, FolderDataset) and ds.ids == ["b", "a"]
    assert isinstance(build_dataset("FOLDER", root), FolderDataset)
    with pytest.raises(DataError, match="cls_labels do not apply to folder"):
        build_dataset("folder", root, cls_labels="x.npy")
    with pytest.raises(DataError, match="needs the dataset root"):
        build_dataset("voc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        build_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="dataset folder not found"):
        build_dataset(tmp_path / "nope")


def test_a_wrong_size_names_the_file_that_differs_and_what_it_was_compared_with(tmp_path):
    # issue 27.6: a ground-truth mask of the wrong size was blamed on the seed ("seed .../a.png is 10x8 but
    # its image is 5x4") because the seed was compared with the mask, and the mask with nothing
    root = _folder(tmp_path / "ds", seeds=True)
    gt = root / "masks" / "a.png"
    _mask(gt, np.zeros((4, 5), np.uint8))  # image a and its seed are 10x8
    ds = FolderDataset(root, split="train")
    assert ds.has_gt and ds.has_seeds
    i = ds.ids.index("a")
    expected = f"mask {gt} is 5x4 but its image {root / 'images' / 'a.jpg'} is 10x8 (width x height)"
    with pytest.raises(DataError) as exc:
        ds.read_gt(i)  # today: read without a check
    assert str(exc.value) == expected
    with pytest.raises(DataError) as exc:
        ds[i]  # today: "... but its image is 10x8", the image not named
    assert str(exc.value) == expected
    assert ds.read_seed(i).shape == (8, 10)  # the seed is right
    assert ds.validate() == [expected]
    # compared with another file than the image, that file is named
    _mask(gt, np.zeros((8, 10), np.uint8))
    seed = root / "seeds" / "a.png"
    _mask(seed, np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError) as exc:
        ds.read_seed(i, expected_hw=(8, 10), reference=f"its ground-truth mask {gt}")
    assert str(exc.value) == f"seed {seed} is 9x8 but its ground-truth mask {gt} is 10x8 (width x height)"


def test_a_class_file_is_checked_as_a_stored_class_list(tmp_path):
    """read_class_file and check_class_names apply one rule: background first, no duplicate, at most 255, each
    error one line naming the file."""
    from weakclip.data.classes import read_class_file

    cases = {"cat\nbackground\n": "the first class must be 'background', found 'cat'",
             "background\ncat\ncat\n": "duplicate class names ['cat']",
             "background\n" + "".join(f"c{i}\n" for i in range(255)): "256 classes; at most 255",
             "# only a comment\n": "class list is empty"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"classes{i}.txt"
        path.write_text(text)
        with pytest.raises(DataError, match=re.escape(message)) as info:
            read_class_file(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "ok.txt").write_text("background\n# a comment\ncat\n\ndog\n")
    assert read_class_file(tmp_path / "ok.txt") == ["background", "cat", "dog"]
