import json
import math

import numpy as np
import pytest
from PIL import Image

from weakclip.cli import main
from weakclip.errors import DataError
from weakclip.evaluate import evaluate_folders
from weakclip.metrics import ConfusionMatrix

CLASSES = ["background", "a", "b"]
# Hand-computed case. Valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (0,0) (2,2) (2,0); last pixel ignored.
GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 1]], dtype=np.uint8)
# class 0: TP 2, T 3, P 3 -> union 4; class 1: TP 2, T 2, P 3 -> union 3; class 2: TP 1, T 2, P 1 -> union 2
EXPECTED_IOU = [2 / 4, 2 / 3, 1 / 2]
EXPECTED_FP = [1 / 4, 1 / 3, 0.0]
EXPECTED_FN = [1 / 4, 0.0, 1 / 2]


def test_hand_computed_case():
    cm = ConfusionMatrix(CLASSES)
    cm.update(PRED, GT)
    s = cm.scores()
    np.testing.assert_allclose(s.iou, EXPECTED_IOU)
    np.testing.assert_allclose(s.fp, EXPECTED_FP)
    np.testing.assert_allclose(s.fn, EXPECTED_FN)
    assert s.miou == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert s.mean_fp == pytest.approx(sum(EXPECTED_FP) / 3)
    assert s.pixel_accuracy == pytest.approx(5 / 7)
    np.testing.assert_allclose(s.iou + s.fp + s.fn, 1.0)


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(CLASSES + ["never"])
    cm.update(PRED, GT)
    s = cm.scores()
    assert math.isnan(s.iou[3])
    assert s.miou == pytest.approx(sum(EXPECTED_IOU) / 3)
    d = s.to_dict()
    assert d["iou"]["never"] is None
    assert d["miou"] == pytest.approx(100 * sum(EXPECTED_IOU) / 3, abs=1e-3)


def test_class_predicted_but_absent_from_gt_scores_zero():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 2]], np.uint8)
    cm = ConfusionMatrix(CLASSES)
    cm.update(pred, gt)
    s = cm.scores()
    assert s.iou[2] == 0.0 and s.fp[2] == 1.0
    assert math.isnan(s.iou[1])
    assert s.miou == pytest.approx((3 / 4 + 0.0) / 2)


def test_streaming_and_merge_equal_one_shot():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 3, (5, 7)), rng.integers(0, 3, (5, 7))) for _ in range(6)]
    whole = ConfusionMatrix(CLASSES)
    whole.update(np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs]))
    a, b = ConfusionMatrix(CLASSES), ConfusionMatrix(CLASSES)
    for k, (p, g) in enumerate(pairs):
        (a if k % 2 else b).update(p, g)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.matrix.sum() == 6 * 35
    assert merged.all_reduce() is merged  # no process group: unchanged
    np.testing.assert_array_equal(merged.matrix, whole.matrix)


def test_unsure_pixels_modes():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 255, 255, 0]], np.uint8)
    bg = ConfusionMatrix(CLASSES, unsure="background")
    bg.update(pred, gt)
    # unsure as background: class 1 TP 1, T 2, P 1 -> 0.5; class 0 TP 2, T 2, P 3 -> 2/3
    np.testing.assert_allclose(bg.scores().iou[:2], [2 / 3, 1 / 2])
    assert bg.unsure_pixels == 2
    ign = ConfusionMatrix(CLASSES, unsure="ignore")
    ign.update(pred, gt)
    np.testing.assert_allclose(ign.scores().iou[:2], [1.0, 1.0])
    with pytest.raises(DataError, match="unsure"):
        ConfusionMatrix(CLASSES).update(pred, gt)


def test_bad_inputs_raise():
    cm = ConfusionMatrix(CLASSES)
    with pytest.raises(DataError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(DataError, match="outside"):
        cm.update(np.full((2, 2), 7), np.zeros((2, 2)))
    with pytest.raises(DataError, match="ground truth"):
        cm.update(np.zeros((2, 2)), np.full((2, 2), 9))
    with pytest.raises(ValueError):
        ConfusionMatrix(CLASSES, unsure="maybe")


def _write(folder, name, arr):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(folder / f"{name}.png")


def _folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write(gt, "img1", GT)
    _write(pred, "img1", PRED)
    _write(gt, "img2", np.zeros((3, 3), np.uint8))
    _write(pred, "img2", np.zeros((3, 3), np.uint8))
    classes = tmp_path / "classes.txt"
    classes.write_text("background\na\nb\n")
    return pred, gt, classes


def test_evaluate_folders_matches_in_memory(tmp_path):
    pred, gt, classes = _folders(tmp_path)
    scores, record = evaluate_folders(pred, gt, classes, progress=False)
    cm = ConfusionMatrix(CLASSES)
    cm.update(PRED, GT)
    cm.update(np.zeros((3, 3)), np.zeros((3, 3)))
    np.testing.assert_allclose(scores.iou, cm.scores().iou)
    assert record["images"] == 2


def test_evaluate_folders_errors(tmp_path):
    pred, gt, classes = _folders(tmp_path)
    _write(gt, "img3", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match="1 of 3 images have no prediction"):
        evaluate_folders(pred, gt, classes, progress=False)
    _write(pred, "img3", np.zeros((4, 3), np.uint8))
    with pytest.raises(DataError) as exc:  # the prediction named, and the ground truth it was compared with
        evaluate_folders(pred, gt, classes, progress=False)
    assert str(exc.value) == (f"prediction {pred / 'img3.png'} is 3x4 but its ground truth {gt / 'img3.png'} "
                              "is 3x3 (width x height)")
    with pytest.raises(DataError, match="not found"):
        evaluate_folders(tmp_path / "nope", gt, classes, progress=False)


def test_evaluate_command_writes_json(tmp_path, capsys):
    pred, gt, classes = _folders(tmp_path)
    out = tmp_path / "scores.json"
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--classes", str(classes),
               "--json", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "background" in printed
    data = json.loads(out.read_text())
    assert {"miou", "iou", "fp", "fn"} <= set(data)
    cm = ConfusionMatrix(CLASSES)
    cm.update(PRED, GT)
    cm.update(np.zeros((3, 3)), np.zeros((3, 3)))
    expected = cm.scores()
    assert data["miou"] == pytest.approx(100 * expected.miou, abs=1e-3)
    assert data["iou"]["a"] == pytest.approx(100 * expected.iou[1], abs=1e-3)
    assert data["fn"] == pytest.approx(100 * expected.mean_fn, abs=1e-3)


def test_evaluate_command_reports_errors_in_one_line(tmp_path, capsys):
    pred, gt, classes = _folders(tmp_path)
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--classes", str(tmp_path / "missing.txt")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "class list not found" in err


def test_evaluate_with_voc_classes(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    g = np.array([[0, 15, 15], [255, 15, 0]], np.uint8)
    _write(gt, "x", g)
    _write(pred, "x", np.array([[0, 15, 0], [0, 15, 0]], np.uint8))
    scores, _ = evaluate_folders(pred, gt, "voc", progress=False)
    assert scores.iou[0] == pytest.approx(2 / 3) and scores.iou[15] == pytest.approx(2 / 3)
    assert scores.miou == pytest.approx(2 / 3)
