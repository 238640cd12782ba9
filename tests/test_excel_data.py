"""ExCEL's training samples and test-time inference against the authors' own code (``datasets/voc.py``,
``datasets/coco.py``, ``tools/infer_seg_voc.py``, ``tools/infer_seg_coco.py``, ``utils/evaluate.py``), run
here on real photos (``skimage.data``) written into tiny VOC- and COCO-like folders that both sides read.

Tolerances: normalised images within 1e-5 (measured 0), averaged test logits within 1e-5 (measured 0 once
the test-time normalisation runs in float64 as the release's does on a uint8 image);
masks, boxes, class labels, argmax and CRF labels exactly equal.
"""

from __future__ import annotations

import contextlib
import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from excel_ref import excel_reference
from weakclip.data.datasets import COCODataset, FolderDataset, VOCDataset
from weakclip.errors import DataError, WeakclipError
from weakclip.methods.excel import augment as aug
from weakclip.methods.excel import infer
from weakclip.metrics import ConfusionMatrix

skdata = pytest.importorskip("skimage.data")

IMAGE_TOL = 1e-5
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with excel_reference() as reference:
        yield types.SimpleNamespace(
            voc=reference.module("datasets.voc"),
            coco=reference.module("datasets.coco"),
            infer_voc=reference.module("tools.infer_seg_voc"),
            infer_coco=reference.module("tools.infer_seg_coco"),
            evaluate=reference.module("utils.evaluate"),
        )


# ------------------------------------------------------------------------------------------------ data


def _photo(name: str, shrink: int) -> np.ndarray:
    """A real photo made ``shrink`` times smaller (fast tests)."""
    img = getattr(skdata, name)()
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // shrink, h // shrink), Image.BILINEAR))


def _photos() -> dict[str, np.ndarray]:
    """Real photos, halved -- varied sizes and aspect ratios."""
    return {name: _photo(name, 2) for name in ("astronaut", "chelsea", "coffee", "rocket")}


def _mask(img: np.ndarray, classes: list[int], band: int = 255) -> np.ndarray:
    """A label map following the photo's structure: grey levels in len(classes)+1 bins -> background and
    ``classes``, the pixels where the bin changes 255 (VOC-like boundaries)."""
    grey = img.astype(np.float32).mean(axis=2)
    edges = np.quantile(grey, np.linspace(0, 1, len(classes) + 2)[1:-1])
    bins = np.digitize(grey, edges)
    lut = np.asarray([0, *classes], dtype=np.uint8)
    mask = lut[bins]
    change = np.zeros_like(mask, dtype=bool)
    change[1:] |= bins[1:] != bins[:-1]
    change[:, 1:] |= bins[:, 1:] != bins[:, :-1]
    mask[change] = band
    return mask


# id -> (photo, foreground classes in VOC ids); "rocket" is mostly one class (windows redrawn)
VOC_ITEMS = {"2007_000001": ("astronaut", [15, 9]), "2007_000002": ("chelsea", [8]),
             "2007_000003": ("coffee", [5, 11, 16]), "2007_000004": ("rocket", [19])}
# the val split (inference): smaller photos, the CRF runs at full resolution
VOC_VAL = {"2008_000001": ("chelsea", [8, 12]), "2008_000002": ("coffee", [5, 11])}


def _onehot(classes: list[int], n: int) -> np.ndarray:
    v = np.zeros(n, dtype=np.float32)
    v[[c - 1 for c in classes]] = 1
    return v


@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory):
    """``VOCdevkit/VOC2012`` for the package and a list folder (train/val.txt, cls_labels_onehot.npy) for the
    release, over the same files."""
    base = tmp_path_factory.mktemp("excel_voc")
    root = base / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    lists = base / "lists"
    lists.mkdir()
    photos = _photos()
    table = {}
    items = {**VOC_ITEMS, **VOC_VAL}
    for ident, (photo, classes) in items.items():
        img = photos[photo] if ident in VOC_ITEMS else _photo(photo, 4)
        Image.fromarray(img).save(root / "JPEGImages" / f"{ident}.jpg", quality=90)
        mask = _mask(img, classes)
        if photo == "rocket":  # mostly background: most windows hold one class
            mask[: int(0.8 * mask.shape[0])] = 0
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{ident}.png")
        table[ident] = _onehot(classes, 20)
    for split, ids in (("train", VOC_ITEMS), ("val", VOC_VAL)):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    np.save(lists / "cls_labels_onehot.npy", table)
    return types.SimpleNamespace(root=root, lists=lists, cls=lists / "cls_labels_onehot.npy")


COCO_ITEMS = {"000000000011": ("astronaut", ["person", "tie"]), "000000000012": ("camera", ["person"]),
              "000000000013": ("coffee", ["cup", "spoon"])}


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
    """The release's COCO layout (``JPEGImages/<split>``, ``SegmentationClass/<split>``, full names in the
    lists) and the package's (``prepare_coco``'s output, and a folder dataset) over the same JPEG files;
    ``camera`` is a greyscale JPEG."""
    from weakclip.data.classes import COCO_CLASSES

    base = tmp_path_factory.mktemp("excel_coco")
    rel, pkg, folder = base / "release", base / "package", base / "folder"
    for d in (rel / "JPEGImages/train", rel / "JPEGImages/val", rel / "SegmentationClass/train",
              rel / "SegmentationClass/val", rel / "lists", pkg / "ImageSets", pkg / "images/train2014",
              pkg / "images/val2014", pkg / "SegmentationClass/train2014", pkg / "SegmentationClass/val2014",
              folder / "images"):
        d.mkdir(parents=True)
    table, labels, names = {}, {}, {"train": [], "val": []}
    for num, (photo, cls_names) in COCO_ITEMS.items():
        ids = [COCO_CLASSES.index(c) for c in cls_names]
        for split, year, shrink in (("train", "train2014", 2), ("val", "val2014", 4)):
            img = _photo(photo, shrink)
            mask = _mask(np.dstack([img] * 3) if img.ndim == 2 else img, ids)
            full = f"COCO_{year}_{num}"
            Image.fromarray(img).save(rel / "JPEGImages" / split / f"{full}.jpg", quality=90)
            Image.fromarray(mask).save(rel / "SegmentationClass" / split / f"{num}.png")
            (pkg / "images" / year / f"{full}.jpg").write_bytes((rel / "JPEGImages" / split / f"{full}.jpg")
                                                                 .read_bytes())
            Image.fromarray(mask).save(pkg / "SegmentationClass" / year / f"{full}.png")
            table[full] = _onehot(ids, 80)
            labels.setdefault(year, {})[full] = cls_names
            names[split].append(full)
        (folder / "images" / f"COCO_train2014_{num}.jpg").write_bytes(
            (rel / "JPEGImages/train" / f"COCO_train2014_{num}.jpg").read_bytes())
    for split, year in (("train", "train2014"), ("val", "val2014")):
        (rel / "lists" / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
        (pkg / "ImageSets" / f"{year}.txt").write_text("\n".join(names[split]) + "\n")
        (pkg / f"labels_{year}.json").write_text(json.dumps(labels[year]))
    np.save(rel / "lists" / "cls_labels_onehot.npy", table)
    (folder / "classes.txt").write_text("\n".join(COCO_CLASSES) + "\n")
    (folder / "labels.json").write_text(json.dumps(labels["train2014"]))
    return types.SimpleNamespace(release=rel, lists=rel / "lists", package=pkg, folder=folder)


class _CountingRandom:
    """Python ``random`` stand-in that counts ``randrange`` calls (windows drawn)."""

    def __init__(self, inner):
        self.inner, self.windows = inner, 0

    def uniform(self, a, b):
        return self.inner.uniform(a, b)

    def random(self):
        return self.inner.random()

    def randrange(self, *args):
        self.windows += 1
        return self.inner.randrange(*args)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def _compare_samples(theirs, ours, with_mask: bool) -> float:
    name, image, cls_label, img_box = theirs[:4]
    assert ours["id"].endswith(name)
    diff = float(np.abs(np.asarray(image) - ours["image"]).max())
    assert image.shape == ours["image"].shape and diff <= IMAGE_TOL
    assert np.array_equal(cls_label, ours["cls_label"]) and ours["cls_label"].dtype == np.float32
    assert img_box.dtype == ours["img_box"].dtype == np.int16 and np.array_equal(img_box, ours["img_box"])
    if with_mask:
        assert np.array_equal(theirs[4], ours["mask"].astype(np.float32))
    return diff


# ------------------------------------------------------------------------------------------------ augment


@pytest.mark.parametrize("crop", [320, 96])
def test_voc_training_samples_equal_the_release(ref, voc_folder, crop):
    theirs_ds = ref.voc.VOC12ClsDataset(
        root_dir=str(voc_folder.root), name_list_dir=str(voc_folder.lists), split="train", stage="train",
        aug=True, resize_range=[512, 2048], rescale_range=[0.5, 2.0], crop_size=crop, img_fliplr=True,
        ignore_index=255, num_classes=21)
    base = VOCDataset(voc_folder.root, "train", cls_labels=voc_folder.cls)
    ours_ds = aug.ExcelTrainDataset(base, aug.ExcelAugment(crop_size=crop))
    assert ours_ds.augment.mask_guided_crop  # VOC: the release's mask-guided window
    order = [0, 1, 2, 3, 3, 2, 1, 0, 3, 0, 2, 1]
    _seed_globals(7)
    theirs = [theirs_ds[i] for i in order]
    _seed_globals(7)
    ours_global = [ours_ds[i] for i in order]  # seed=None: the process-global streams, as the release
    counting = _CountingRandom(random.Random(7))
    draws = aug.Draws(counting, np.random.RandomState(7))
    windows, ours_private = [], []
    for i in order:
        before = counting.windows
        ours_private.append(ours_ds.sample(i, draws))
        windows.append(counting.windows - before)
    worst = 0.0
    for t, g, p in zip(theirs, ours_global, ours_private):
        worst = max(worst, _compare_samples(t, g, True), _compare_samples(t, p, True))
    assert worst == 0.0  # the same float32 operations
    assert any(w > 2 for w in windows) and all(w % 2 == 0 and w <= 20 for w in windows)  # windows redrawn
    boxes = np.stack([s["img_box"] for s in ours_private])
    if crop == 320:
        assert (boxes[:, 0] > 0).any() or (boxes[:, 2] > 0).any()  # padded samples
    else:
        assert (boxes[:, 1] > crop).any() or (boxes[:, 3] > crop).any()  # the release's padded-frame ends


def test_coco_and_folder_training_samples_equal_the_release(ref, coco_folder):
    theirs_ds = ref.coco.CocoClsDataset(
        root_dir=str(coco_folder.release), name_list_dir=str(coco_folder.lists), split="train",
        stage="train", aug=True, resize_range=[512, 2048], rescale_range=[0.5, 2.0], crop_size=128,
        img_fliplr=True, ignore_index=255, num_classes=81)
    coco = aug.ExcelTrainDataset(COCODataset(coco_folder.package, "train2014"), seed=None)
    folder = aug.ExcelTrainDataset(FolderDataset(coco_folder.folder), seed=None)
    assert not coco.augment.mask_guided_crop and not folder.augment.mask_guided_crop
    coco = aug.ExcelTrainDataset(coco.dataset, aug.ExcelAugment(crop_size=128, mask_guided_crop=False))
    folder = aug.ExcelTrainDataset(folder.dataset, aug.ExcelAugment(crop_size=128, mask_guided_crop=False))
    order = [0, 1, 2, 2, 1, 0, 1]
    _seed_globals(3)
    theirs = [theirs_ds[i] for i in order]
    for ours_ds in (coco, folder):
        _seed_globals(3)
        ours = [ours_ds[i] for i in order]
        assert max(_compare_samples(t, o, False) for t, o in zip(theirs, ours)) == 0.0
    assert all(np.all(s["mask"] == 255) for s in ours)  # the folder dataset has no masks


def test_augment_steps_call_pillow_and_numpy_as_the_release(ref):
    transforms = ref.voc.transforms
    img = _photos()["chelsea"]
    mask = _mask(img, [8])
    for ratio in (0.5, 0.731, 1.37, 2.0):
        t_img, t_mask = transforms._img_rescaling(img, mask, scale=ratio)
        o_img, o_mask = aug.rescale(img, mask, ratio)
        assert t_img.dtype == o_img.dtype == np.float32
        assert np.array_equal(t_img, o_img) and np.array_equal(t_mask, o_mask)
        size = (int(ratio * img.shape[1]), int(ratio * img.shape[0]))
        pil = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)).astype(np.float32)
        assert np.array_equal(o_img, pil)
    for x in (img, img.astype(np.float32)):  # float64 arithmetic for uint8, float32 for float32 (numpy's)
        assert np.array_equal(transforms.normalize_img(x), aug.normalize_image(x))
    assert not np.array_equal(aug.normalize_image(img), aug.normalize_image(img.astype(np.float32)))


def test_private_streams_are_per_item_and_epoch(voc_folder):
    ds = aug.ExcelTrainDataset(VOCDataset(voc_folder.root, "train", cls_labels=voc_folder.cls),
                               aug.ExcelAugment(crop_size=64), seed=5)
    a, b = ds[1], ds[1]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["img_box"], b["img_box"])
    ds.set_epoch(1)
    c = ds[1]
    assert a["image"].shape == c["image"].shape == (3, 64, 64) and a["mask"].shape == (64, 64)
    assert not np.array_equal(a["image"], c["image"])
    assert ds.dataset.orientation == "exif"  # read upright, as the release's pinned imageio 2.26 does
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["cls_label"].shape == (2, 20)


def test_bad_augment_settings_are_one_line_errors(voc_folder):
    with pytest.raises(DataError, match="crop size"):
        aug.ExcelAugment(crop_size=0)
    with pytest.raises(DataError, match="rescale range"):
        aug.ExcelAugment(scale_range=(2.0, 0.5))
    with pytest.raises(DataError, match="without a transform"):
        aug.ExcelTrainDataset(VOCDataset(voc_folder.root, "train", transform=lambda s: s))


# ------------------------------------------------------------------------------------------------ inference


class _SegNet(nn.Module):
    """A small random net with the release network's traits that matter here: logits at 1/16, a tuple out,
    not flip-equivariant, and a batch-wide mean (so its output for an image depends on its batch)."""

    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(11)
        self.patch = nn.Conv2d(3, 16, 16, stride=16)
        self.head = nn.Conv2d(16, classes, 3, padding=1)

    def forward(self, x):
        f = self.patch(x)
        f = torch.relu(f - 0.5 * f.mean())
        return (self.head(f) * 3.0, None)


class _Capture:
    """``utils.evaluate`` with ``scores`` recording its inputs."""

    def __init__(self, evaluate):
        self.evaluate, self.calls = evaluate, []

    def scores(self, gts, preds, num_classes=21):
        self.calls.append(([np.asarray(g) for g in gts], [np.asarray(p) for p in preds]))
        return self.evaluate.scores(gts, preds, num_classes=num_classes)


def _sequential_joblib():
    def parallel(**kwargs):
        return lambda jobs: [f(*a, **k) for f, a, k in jobs]

    import joblib

    return types.SimpleNamespace(Parallel=parallel, delayed=joblib.delayed)


def _run_release(monkeypatch, module, ref, args, dataset):
    capture = _Capture(ref.evaluate)
    monkeypatch.setattr(module, "evaluate", capture)
    monkeypatch.setattr(module, "format_tabs_multi_metircs", lambda *a, **k: "")
    monkeypatch.setattr(module, "joblib", _sequential_joblib())
    monkeypatch.setattr(module, "args", args, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    net = _SegNet(args.num_classes)
    module._validate(model=net, data_loader=loader, args=args)
    module.crf_proc()
    return net, capture


def _release_args(tmp: Path, **kw):
    ns = types.SimpleNamespace(resize_size=320, scales=[0.7, 1.0, 1.2, 1.5], crf_post=True, infer_set="val",
                               logits_dir=str(tmp / "logits"), segs_dir=str(tmp / "segs"),
                               segs_rgb_dir=str(tmp / "rgb"), **kw)
    for d in (ns.logits_dir, ns.segs_dir, ns.segs_rgb_dir):
        Path(d).mkdir(parents=True)
    return ns


def _check_against_release(net, capture, args, items, settings, logits_name, seg_name):
    """items: (id, rgb, gt) in the loader's order."""
    import imageio.v2 as imageio

    (gts, preds), (crf_gts, crf_preds) = capture.calls
    matrix = ConfusionMatrix([str(k) for k in range(args.num_classes)])
    worst, changed = 0.0, 0
    for k, (ident, rgb, gt) in enumerate(items):
        ours = infer.infer_image(net, rgb, settings, out_size=gt.shape)
        theirs = np.load(Path(args.logits_dir) / f"{logits_name(ident)}.npy", allow_pickle=True).item()
        theirs = torch.from_numpy(theirs["msc_seg"])
        assert theirs.shape == ours.logits.shape
        worst = max(worst, float((theirs - ours.logits).abs().max()))
        assert np.array_equal(preds[k], ours.labels)  # argmax, 100% equal
        crf = np.asarray(imageio.imread(Path(args.segs_dir) / f"{seg_name(ident)}.png"))
        assert np.array_equal(crf, ours.crf) and np.array_equal(crf_preds[k], ours.crf)
        changed += int((ours.crf != ours.labels).sum())
        matrix.update(ours.labels, gt)
    assert worst <= LOGIT_TOL
    assert changed > 0  # the CRF changes some labels
    theirs_miou = capture.evaluate.scores(gts, preds, num_classes=args.num_classes)["miou"]
    assert infer.release_miou(matrix.matrix) == pytest.approx(theirs_miou, abs=1e-12)
    return worst


def test_voc_inference_equals_the_release(ref, voc_folder, tmp_path, monkeypatch):
    args = _release_args(tmp_path, num_classes=21, data_folder=str(voc_folder.root),
                         list_folder=str(voc_folder.lists))
    dataset = ref.voc.VOC12SegDataset(root_dir=str(voc_folder.root), name_list_dir=str(voc_folder.lists),
                                      split="val", stage="val", aug=False, ignore_index=255, num_classes=21)
    net, capture = _run_release(monkeypatch, ref.infer_voc, ref, args, dataset)
    ds = VOCDataset(voc_folder.root, "val")
    items = [(ds.ids[i], ds.read_image(i), ds.read_gt(i)) for i in range(len(ds))]
    settings = infer.InferenceSettings(crf=True)  # VOC's script with --crf_post true
    _check_against_release(net, capture, args, items, settings, lambda i: i, lambda i: i)
    # the discarded flip at scale 1.0 matters: keeping it changes the logits
    image = torch.from_numpy(aug.normalize_image(items[0][1]).transpose(2, 0, 1).copy())
    kept = infer.multiscale_logits(net, image, infer.InferenceSettings(flip_at_base=True))
    assert not torch.allclose(kept, infer.infer_image(net, items[0][1]).logits)


def test_coco_inference_equals_the_release(ref, coco_folder, tmp_path, monkeypatch):
    args = _release_args(tmp_path, num_classes=81, data_folder=str(coco_folder.release),
                         list_folder=str(coco_folder.lists))
    dataset = ref.coco.CocoSegDataset(root_dir=str(coco_folder.release), name_list_dir=str(coco_folder.lists),
                                      split="val", stage="val", aug=False, ignore_index=255, num_classes=81)
    net, capture = _run_release(monkeypatch, ref.infer_coco, ref, args, dataset)
    ds = COCODataset(coco_folder.package, "val2014")
    items = [(ds.ids[i], ds.read_image(i), ds.read_gt(i)) for i in range(len(ds))]
    _check_against_release(net, capture, args, items, infer.COCO_INFERENCE, lambda i: i[13:], lambda i: i)


def test_release_miou_and_the_package_metric(ref):
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (20, 30)).astype(np.int16) for _ in range(3)]
    gts[0][:2] = 255
    preds = [np.where(rng.random(g.shape) < 0.7, np.where(g == 255, 0, g), rng.integers(0, 6, g.shape))
             .astype(np.int16) for g in gts]  # classes 4 and 5 predicted, absent from the ground truth
    theirs = ref.evaluate.scores(gts, preds, num_classes=6)["miou"]
    matrix = ConfusionMatrix([str(k) for k in range(6)])
    for g, p in zip(gts, preds):
        matrix.update(p, g)
    assert infer.release_miou(matrix.matrix) == pytest.approx(theirs, abs=1e-12)
    assert matrix.scores().miou < theirs - 1e-3  # the package counts the predicted-only classes as IoU 0
    full = [g for g in gts]
    for g in full:
        g[0, 4:6] = (4, 5)  # every class in the ground truth: both agree
    matrix = ConfusionMatrix([str(k) for k in range(6)])
    for g, p in zip(full, preds):
        matrix.update(p, g)
    assert matrix.scores().miou == pytest.approx(ref.evaluate.scores(full, preds, num_classes=6)["miou"],
                                                 abs=1e-12)


def test_training_validation_is_one_unflipped_pass(voc_folder):
    """engine/validatation_engine.py: F.interpolate to 320 x 320, model(batch of 1)[0], bilinear to the mask's
    size, argmax (the release function needs the whole network's outputs: its formula is checked here)."""
    ds = VOCDataset(voc_folder.root, "val")
    rgb, gt = ds.read_image(0), ds.read_gt(0)
    net = _SegNet(21)
    x = torch.from_numpy(aug.normalize_image(rgb).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        seg = net(F.interpolate(x, size=[320, 320], mode="bilinear", align_corners=False))[0]
        want = torch.argmax(F.interpolate(seg, size=gt.shape, mode="bilinear", align_corners=False), dim=1)[0]
    ours = infer.infer_image(net, rgb, infer.TRAINING_VALIDATION, out_size=gt.shape)
    assert np.array_equal(ours.labels, want.numpy())
    assert not np.array_equal(ours.labels, infer.infer_image(net, rgb, out_size=gt.shape).labels)


def test_inference_settings_and_inputs_are_checked():
    with pytest.raises(WeakclipError, match="fraction"):
        infer.InferenceSettings(logits_fraction=0)
    with pytest.raises(WeakclipError, match="scales"):
        infer.InferenceSettings(scales=(0.0,))
    with pytest.raises(WeakclipError, match="one RGB image"):
        infer.multiscale_logits(_SegNet(3), torch.zeros(2, 3, 32, 32))
    with pytest.raises(WeakclipError, match="logits"):
        infer.multiscale_logits(lambda x: x[:1], torch.zeros(3, 32, 32))
    assert infer.COCO_INFERENCE.crf and infer.COCO_INFERENCE.flip_at_base and not infer.VOC_INFERENCE.crf
    from weakclip.crf import COCO_CRF

    assert infer.EXCEL_CRF == COCO_CRF
