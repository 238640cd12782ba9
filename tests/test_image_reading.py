"""Image reading per stage (reader, EXIF orientation) against OpenCV and Pillow themselves, and the rule
that keeps masks aligned with images turned upright (docs/method.md, "Image reading")."""

import json
import warnings

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from weakclip.config import load_preset
from weakclip.data.datasets import build_dataset
from weakclip.data.io import (
    OrientationWarning,
    fit_label_to_image,
    image_geometry,
    orient_array,
    read_image,
    resolve_orientation,
)
from weakclip.errors import DataError
from weakclip.retrain.train import load_retrain_preset


def _tagged_jpeg(path, rgb: np.ndarray, orientation: int = 6, **save):
    """A real photo saved by Pillow as a JPEG carrying an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif, **save)
    return path


@pytest.fixture(scope="module")
def chelsea_tagged(tmp_path_factory):
    """scikit-image's chelsea (451 x 300, not square) with orientation 6 ("rotate 90 CW to display")."""
    return _tagged_jpeg(tmp_path_factory.mktemp("photo") / "chelsea.jpg", skimage.data.chelsea(), quality=90)


# ====================================================================== against the libraries
def test_opencv_reader_is_cv2_imread_and_imdecode(chelsea_tagged):
    path = chelsea_tagged
    imread = cv2.imread(str(path))  # what the retraining's VOCDataset / COCOSegDataset call
    imdecode = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)  # mmcv.imfrombytes, cv2 backend
    # OpenCV turns the photo upright in both calls: the release's refinement and retraining see 300 x 451
    assert imread.shape == imdecode.shape == (451, 300, 3)
    ours = read_image(path, "opencv", "exif")
    assert np.array_equal(ours, cv2.cvtColor(imread, cv2.COLOR_BGR2RGB))
    assert np.array_equal(ours, imdecode[:, :, ::-1])
    stored = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored.shape == (300, 451, 3)
    assert np.array_equal(read_image(path, "opencv", "ignore"), stored[:, :, ::-1])


def test_pil_reader_is_image_open_and_exif_transpose(chelsea_tagged):
    path = chelsea_tagged
    with Image.open(path) as im:
        as_stored = np.asarray(im.convert("RGB"))  # CLIP-ES: Image.open(...) + convert("RGB"), no rotation
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert as_stored.shape == (300, 451, 3) and upright.shape == (451, 300, 3)
    assert np.array_equal(read_image(path, "pil", "ignore"), as_stored)
    assert np.array_equal(read_image(path), as_stored)  # the default: Pillow, stored pixels
    assert np.array_equal(read_image(path, "pil", "exif"), upright)
    # Pillow and OpenCV decode this JPEG to the same pixels here (both bundle libjpeg-turbo), and turn it
    # the same way
    assert np.array_equal(read_image(path, "pil", "exif"), read_image(path, "opencv", "exif"))


def test_decoders_agree_on_jpeg_variants(tmp_path):
    """Subsampling, quality, progressive and OpenCV-written JPEGs of real photos: Pillow == OpenCV."""
    for name in ("astronaut", "coffee"):
        rgb = getattr(skimage.data, name)()
        variants = [dict(quality=75), dict(quality=95, subsampling=0), dict(quality=85, progressive=True)]
        for k, kw in enumerate(variants):
            path = tmp_path / f"{name}{k}.jpg"
            Image.fromarray(rgb).save(path, **kw)
            assert np.array_equal(read_image(path, "pil"), read_image(path, "opencv")), (name, kw)
        path = tmp_path / f"{name}_cv.jpg"
        cv2.imwrite(str(path), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert np.array_equal(read_image(path, "pil"), read_image(path, "opencv"))


def test_orient_array_is_exif_transpose_for_every_orientation(tmp_path):
    label = (np.arange(5 * 7) % 23).astype(np.uint8).reshape(5, 7)
    for tag in range(1, 9):
        im = Image.fromarray(label)
        exif = im.getexif()
        exif[0x0112] = tag
        im.save(tmp_path / f"o{tag}.png", exif=exif)
        with Image.open(tmp_path / f"o{tag}.png") as im:
            expected = np.asarray(ImageOps.exif_transpose(im))
        assert np.array_equal(orient_array(label, tag), expected), tag
        assert image_geometry(tmp_path / f"o{tag}.png").orientation == tag
    with pytest.raises(ValueError):
        orient_array(label, 9)


def test_opencv_reader_errors_are_one_line(tmp_path, chelsea_tagged):
    raw = chelsea_tagged.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    for name in ("cut.jpg", "junk.jpg", "missing.jpg"):
        with pytest.raises(DataError) as info:
            read_image(tmp_path / name, "opencv")
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(ValueError):
        read_image(chelsea_tagged, "cv2")


def test_orientation_rule():
    assert resolve_orientation("auto", "pil", "folder") == "exif"
    assert resolve_orientation("auto", "opencv", "folder") == "exif"
    assert resolve_orientation("auto", "pil", "voc") == "ignore"  # Image.open does not turn
    assert resolve_orientation("auto", "opencv", "coco91") == "exif"  # IMREAD_COLOR does
    assert resolve_orientation("ignore", "opencv", "folder") == "ignore"
    with pytest.raises(ValueError):
        resolve_orientation("upright", "pil", "voc")


# ====================================================================== stages and presets
def test_presets_choose_each_references_reader():
    for name in ("voc", "coco", "voc-plus", "coco-plus"):
        d = load_preset(name).data
        assert (d.image_reader, d.image_orientation) == ("opencv", "auto"), name
        d = load_retrain_preset(name).data
        assert (d.image_reader, d.image_orientation) == ("opencv", "auto"), name


def test_stages_read_with_their_sections_reader(tmp_path):
    from weakclip.config import apply_overrides
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.engine.trainer import build_train_data
    from weakclip.retrain.train import _train_dataset, apply_retrain_overrides

    root = make_synthetic_dataset(tmp_path / "syn", n_train=2, n_val=0, image_size=(32, 40))
    base = ["data.kind=folder", f"data.root={root}", "data.split=train"]
    dataset, _ = build_train_data(apply_overrides(load_preset("voc"), base))
    assert (dataset.image_reader, dataset.orientation) == ("opencv", "exif")
    dataset, _ = build_train_data(apply_overrides(load_preset("voc"), [*base, "data.image_reader=pil",
                                                                       "data.image_orientation=ignore"]))
    assert (dataset.image_reader, dataset.orientation) == ("pil", "ignore")
    cfg = apply_retrain_overrides(load_retrain_preset("voc"), [*base, "data.image_reader=pil"])
    assert _train_dataset(cfg, root / "seeds", {}).image_reader == "pil"
    # the seed stage's dataset keeps the default: Pillow (CLIP-ES's Image.open)
    assert build_dataset("folder", root, split="train").image_reader == "pil"
    with pytest.raises(Exception, match="image_reader"):
        apply_overrides(load_preset("voc"), ["data.image_reader=cv2"])


# ====================================================================== masks of photos turned upright
def _folder(root, images: dict, masks: dict):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\ncat\n")
    (root / "labels.json").write_text(json.dumps({k: ["cat"] for k in images}))
    for ident, (rgb, tag) in images.items():
        _tagged_jpeg(root / "images" / f"{ident}.jpg", rgb, tag, quality=95)
    for ident, mask in masks.items():
        Image.fromarray(mask).save(root / "masks" / f"{ident}.png")
    return root


def test_folder_masks_follow_the_upright_photo(tmp_path):
    photo = skimage.data.chelsea()  # stored 300 x 451 (H x W)
    stored_mask = (photo.mean(2) > 120).astype(np.uint8)  # drawn on the stored pixels
    upright_mask = orient_array(stored_mask, 6)  # drawn on the photo as a viewer shows it
    root = _folder(tmp_path / "ds", {"stored": (photo, 6), "upright": (photo, 6), "odd": (photo, 6)},
                   {"stored": stored_mask, "upright": upright_mask, "odd": np.zeros((300, 300), np.uint8)})
    ds = build_dataset("folder", root)
    assert ds.orientation == "exif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = ds[0]
        ds[0]  # read again: no second warning for the same file
    assert [w.category for w in caught] == [OrientationWarning]
    message = str(caught[0].message)
    assert "stored.png" in message and "orientation 6" in message and "\n" not in message
    with Image.open(root / "images" / "stored.jpg") as im:
        assert np.array_equal(sample["image"], np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    assert np.array_equal(sample["gt"], upright_mask)  # turned with the image: still on the same pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an upright mask is taken as it is, silently
        other = ds[1]
    assert np.array_equal(other["gt"], upright_mask)
    with pytest.raises(DataError, match=r"odd.png is 300x300 but its image \S+odd.jpg is 300x451"):
        ds[2]
    assert ds.label_fits(0, stored_mask.shape) and ds.label_fits(0, upright_mask.shape)
    assert not ds.label_fits(2, (300, 300)) and ds.image_hw(0) == (451, 300)


def test_stored_pixel_readers_refuse_upright_masks_with_a_hint(tmp_path):
    photo = skimage.data.chelsea()
    root = _folder(tmp_path / "ds", {"a": (photo, 6)}, {"a": orient_array(np.ones((300, 451), np.uint8), 6)})
    ds = build_dataset("folder", root, image_reader="pil", image_orientation="ignore")
    assert ds.orientation == "ignore" and ds.read_image(0).shape == (300, 451, 3)
    with pytest.raises(DataError, match="fits the image turned by its EXIF orientation 6") as info:
        ds[0]
    assert "\n" not in str(info.value)
    assert any("EXIF orientation 6" in p for p in ds.validate())


def test_fit_label_keeps_untagged_and_size_keeping_orientations(tmp_path):
    photo = skimage.data.astronaut()[:200, :300]
    for tag in (1, 3):  # 180 degrees keeps the size: masks are taken as drawn on the upright image
        path = _tagged_jpeg(tmp_path / f"p{tag}.jpg", photo, tag)
        mask = np.zeros((200, 300), np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fit_label_to_image(mask, tmp_path / "m.png", path, "exif", expected_hw=(200, 300))
        assert out is mask
