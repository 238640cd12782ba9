"""Tests of COCO preparation (weakclip.data.coco) and COCODataset on a tiny instances JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from weakclip.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from weakclip.data.coco import coco_label_map, decode_segmentation, prepare_coco
from weakclip.data.datasets import COCODataset, build_dataset, detect_kind
from weakclip.data.io import read_label_png
from weakclip.errors import DataError

PERSON, CAR, DOG, GIRAFFE, BIRD = (COCO_CLASSES.index(n) for n in ("person", "car", "dog", "giraffe", "bird"))
A, B, C = "COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030"
SIZES = {A: (20, 30), B: (10, 12), C: (6, 8)}  # (height, width)


def _cat(name: str) -> int:
    return COCO_CATEGORY_IDS[COCO_CLASSES.index(name) - 1]


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


def _instances() -> dict:
    ha, wa = SIZES[A]
    hb, wb = SIZES[B]
    anns = [
        # small dog on a big person, listed first: painting by area, not by order, keeps it visible
        {"id": 101, "image_id": 9, "category_id": _cat("dog"), "iscrowd": 0, "area": 25,
         "segmentation": _compressed_rle(_rect(ha, wa, 5, 10, 5, 10))},
        {"id": 102, "image_id": 9, "category_id": _cat("person"), "iscrowd": 0, "area": 300,
         "segmentation": [[0, 0, 20, 0, 20, 15, 0, 15]]},
        # a crowd of cars: 255 except where the person covers it
        {"id": 103, "image_id": 9, "category_id": _cat("car"), "iscrowd": 1, "area": 150,
         "segmentation": _uncompressed_rle(_rect(ha, wa, 10, 20, 15, 30))},
        {"id": 201, "image_id": 25, "category_id": _cat("giraffe"), "iscrowd": 0, "area": 48,
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 202, "image_id": 25, "category_id": _cat("bird"), "iscrowd": 0, "area": 4,
         "segmentation": _uncompressed_rle(_rect(hb, wb, 0, 2, 0, 2))},
    ]
    images = [  # unsorted on purpose; C has no annotation
        {"id": 30, "file_name": f"{C}.jpg", "height": SIZES[C][0], "width": SIZES[C][1]},
        {"id": 9, "file_name": f"{A}.jpg", "height": ha, "width": wa},
        {"id": 25, "file_name": f"{B}.jpg", "height": hb, "width": wb},
    ]
    cats = [{"id": cid, "name": COCO_CLASSES[k + 1]} for k, cid in enumerate(COCO_CATEGORY_IDS)]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco_root(root: Path, data: dict | None = None, images: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(data or _instances()))
    if images:
        for k, (ident, (h, w)) in enumerate(SIZES.items()):
            d = root / "images" / "train2014"
            d.mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{ident}.jpg")
    return root


@pytest.fixture
def prepared(tmp_path) -> Path:
    root = _coco_root(tmp_path / "coco")
    summary = prepare_coco(root, root, splits=("train2014",), workers=0, progress=False)
    assert summary == {"train2014": {"images": 3, "written": 3, "skipped": 0}}
    return root


def test_prepare_coco_masks(prepared):
    png = prepared / "SegmentationClass" / "train2014"
    assert sorted(os.listdir(png)) == [f"{A}.png", f"{B}.png", f"{C}.png"]  # no temp files left
    a = read_label_png(png / f"{A}.png", expected_hw=SIZES[A], num_classes=81)
    assert a[7, 7] == DOG  # small object on top of the larger one
    assert a[2, 2] == PERSON and a[12, 17] == PERSON  # person over the crowd region
    assert a[17, 25] == 255 and a[11, 28] == 255  # crowd only
    assert a[18, 2] == 0 and a[2, 25] == 0  # background
    assert set(np.unique(a)) == {0, PERSON, DOG, 255}  # no car pixel: the car is a crowd
    b = read_label_png(png / f"{B}.png", expected_hw=SIZES[B])
    assert b[5, 5] == GIRAFFE and b[0, 0] == BIRD and b[1, 1] == BIRD and b[9, 11] == 0
    c = read_label_png(png / f"{C}.png", expected_hw=SIZES[C])
    assert (c == 0).all()
    with Image.open(png / f"{A}.png") as im:
        assert im.mode == "P"


def test_prepare_coco_lists_and_labels(prepared):
    assert (prepared / "ImageSets" / "train2014.txt").read_text().split() == [A, B, C]
    labels = json.loads((prepared / "labels_train2014.json").read_text())
    assert labels == {A: ["person", "car", "dog"], B: ["bird", "giraffe"], C: []}


def test_prepare_coco_resumes(prepared):
    png = prepared / "SegmentationClass" / "train2014"
    mtimes = {p.name: p.stat().st_mtime_ns for p in png.iterdir()}
    original_b = (png / f"{B}.png").read_bytes()
    (png / f"{B}.png").unlink()
    summary = prepare_coco(prepared, prepared, splits=("train2014",), workers=0, progress=False)
    assert summary["train2014"] == {"images": 3, "written": 1, "skipped": 2}
    assert (png / f"{A}.png").stat().st_mtime_ns == mtimes[f"{A}.png"]
    assert (png / f"{C}.png").stat().st_mtime_ns == mtimes[f"{C}.png"]
    assert (png / f"{B}.png").read_bytes() == original_b
    summary = prepare_coco(prepared, prepared, splits="train2014", workers=0, progress=False)
    assert summary["train2014"]["written"] == 0


def test_prepare_coco_worker_pool_matches(prepared, tmp_path):
    out = tmp_path / "out"
    prepare_coco(prepared, out, splits=("train2014",), workers=2, progress=False)
    for ident in (A, B, C):
        a = read_label_png(out / "SegmentationClass" / "train2014" / f"{ident}.png")
        b = read_label_png(prepared / "SegmentationClass" / "train2014" / f"{ident}.png")
        np.testing.assert_array_equal(a, b)
    assert (out / "ImageSets" / "train2014.txt").is_file() and (out / "labels_train2014.json").is_file()


def test_prepare_coco_errors(tmp_path):
    with pytest.raises(DataError, match=r"COCO annotations not found: .*instances_val2014\.json"):
        prepare_coco(tmp_path, tmp_path / "o", splits=("val2014",), workers=0, progress=False)
    data = _instances()
    data["annotations"][0]["category_id"] = 12  # a gap in COCO's ids
    root = _coco_root(tmp_path / "c1", data, images=False)
    with pytest.raises(DataError, match="annotation 101 has unknown category id 12"):
        prepare_coco(root, root, splits=("train2014",), workers=0, progress=False)
    data = _instances()
    data["categories"][0]["name"] = "human"
    root = _coco_root(tmp_path / "c2", data, images=False)
    with pytest.raises(DataError, match="category id 1 is named 'human', expected 'person'"):
        prepare_coco(root, root, splits=("train2014",), workers=0, progress=False)
    data = _instances()
    data["annotations"][3]["segmentation"] = {"size": [3, 3], "counts": [9]}
    root = _coco_root(tmp_path / "c3", data, images=False)
    with pytest.raises(DataError, match=rf"{B}\).*annotation 201: bad segmentation: RLE of size 3x3"):
        prepare_coco(root, root, splits=("train2014",), workers=0, progress=False)
    data = _instances()
    data["annotations"][0]["image_id"] = 77
    root = _coco_root(tmp_path / "c4", data, images=False)
    with pytest.raises(DataError, match="unknown image id 77"):
        prepare_coco(root, root, splits=("train2014",), workers=0, progress=False)


def test_decode_and_paint_helpers():
    m = decode_segmentation([[1, 1, 5, 1, 5, 4, 1, 4], [0, 0, 1]], 6, 7)  # a too-short polygon is skipped
    assert m.shape == (6, 7) and m[2, 3] and not m[5, 6]
    assert not decode_segmentation([], 3, 3).any()
    with pytest.raises(ValueError, match="unrecognised"):
        decode_segmentation("nope", 3, 3)
    big = _compressed_rle(_rect(4, 4, 0, 4, 0, 4))
    small = _uncompressed_rle(_rect(4, 4, 1, 2, 1, 2))
    # equal order both ways: the area rule decides
    for anns in ([(big, 2, False, 1), (small, 5, False, 2)], [(small, 5, False, 2), (big, 2, False, 1)]):
        out = coco_label_map(4, 4, anns)
        assert out[1, 1] == 5 and out[0, 0] == 2 and out[3, 3] == 2


def test_coco_dataset(prepared, tmp_path):
    ds = COCODataset(prepared, split="train2014")
    assert ds.kind == "coco" and ds.num_classes == 81 and ds.ids == [A, B, C]
    s = ds[0]
    assert s["id"] == A and s["image"].shape == (20, 30, 3)
    expected = np.zeros(81, np.float32)
    expected[[0, PERSON, CAR, DOG]] = 1
    np.testing.assert_array_equal(s["labels"], expected)
    assert s["gt"][7, 7] == DOG and s["gt"][17, 25] == 255
    np.testing.assert_array_equal(ds.get_labels(2), np.eye(81, dtype=np.float32)[0])
    assert ds.validate() == []
    assert detect_kind(prepared) == "coco"
    assert isinstance(build_dataset("coco", prepared, with_gt=False), COCODataset)

    seeds = tmp_path / "seeds"
    seeds.mkdir()
    Image.fromarray(np.full(SIZES[A], PERSON, np.uint8)).save(seeds / f"{A}.png")
    ds = COCODataset(prepared, seed_dir=seeds, with_gt=False)
    assert "gt" not in ds[0] and (ds[0]["seed"] == PERSON).all()
    with pytest.raises(DataError, match=f"seed for image '{B}' not found"):
        ds[1]


def test_coco_dataset_layouts_and_errors(prepared, tmp_path):
    # images in <root>/<split>/ instead of <root>/images/<split>/
    (prepared / "images" / "train2014").rename(prepared / "train2014")
    assert COCODataset(prepared).image_path(0) == prepared / "train2014" / f"{A}.jpg"
    # images elsewhere, via image_root
    elsewhere = tmp_path / "pics"
    (prepared / "train2014").rename(elsewhere)
    ds = COCODataset(prepared, image_root=elsewhere)
    assert ds[1]["image"].shape == (10, 12, 3)
    with pytest.raises(DataError, match=r"COCO train2014 images not found: looked for"):
        COCODataset(prepared)
    with pytest.raises(DataError, match=r"COCO id list not found: .*val2014\.txt \(run prepare_coco"):
        COCODataset(prepared, split="val2014")
    subset = tmp_path / "val5k.txt"
    subset.write_text(f"{B}\n")
    ds = COCODataset(prepared, image_root=elsewhere, ids_file=subset)
    assert ds.ids == [B]
    labels = json.loads((prepared / "labels_train2014.json").read_text())
    labels[B] = ["girafe"]
    (prepared / "labels_train2014.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match=rf"image '{B}' has unknown class 'girafe' \(did you mean 'giraffe'"):
        COCODataset(prepared, image_root=elsewhere)
