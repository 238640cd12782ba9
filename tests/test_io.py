"""Tests of weakclip.data.io: image and label-map reading, atomic writes."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from weakclip.data.classes import voc_palette
from weakclip.data.io import (
    read_image,
    read_json,
    read_label_png,
    write_json_atomic,
    write_label_png,
    write_text_atomic,
)
from weakclip.errors import DataError


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _indexed_png(path, arr: np.ndarray, palette: np.ndarray | None = None) -> None:
    im = Image.fromarray(arr.astype(np.uint8))
    pal = voc_palette() if palette is None else palette
    im.putpalette(pal.reshape(-1).tolist())
    assert im.mode == "P"
    im.save(path)


# ---------------------------------------------------------------------------- read_image
def test_read_image_png_rgb_exact(tmp_path):
    arr = _noise(7, 9)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, arr)


def test_read_image_converts_modes(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, colour kept
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (2, 2, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()

    idx = np.array([[1, 2], [15, 0]], dtype=np.uint8)
    _indexed_png(tmp_path / "p.png", idx)
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, voc_palette()[idx])  # palette images give colours

    wide = np.array([[0, 65535], [257 * 10, 257 * 200]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    out = read_image(tmp_path / "w.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [10, 200]])


def test_read_image_missing(tmp_path):
    with pytest.raises(DataError, match=r"^image not found: .*nope\.jpg$"):
        read_image(tmp_path / "nope.jpg")


def test_read_image_corrupt(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=r"^cannot read image .*bad\.jpg: "):
        read_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_read_image_truncated(tmp_path, fmt):
    path = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(_noise(64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # the header is intact, so only a full decode notices
    with Image.open(path) as im:
        assert im.size == (64, 64)
    with pytest.raises(DataError, match=r"^cannot read image .*t\.\w+: .+"):
        read_image(path)


def test_read_image_message_is_one_line(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "bad.png")
    assert "\n" not in str(info.value)


def test_read_image_ignores_exif_orientation(tmp_path):
    arr = _noise(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (10, 20, 3)  # stored grid, as the masks are


# ---------------------------------------------------------------------------- read_label_png
def test_read_label_png_palette_gives_indices(tmp_path):
    idx = np.array([[0, 1, 2], [15, 255, 20]], dtype=np.uint8)
    _indexed_png(tmp_path / "m.png", idx)
    out = read_label_png(tmp_path / "m.png", expected_hw=(2, 3), num_classes=21)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, idx)


def test_read_label_png_palette_with_odd_colours(tmp_path):
    # indices are what counts, whatever colours the palette assigns
    idx = np.array([[3, 3], [0, 1]], dtype=np.uint8)
    pal = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    _indexed_png(tmp_path / "m.png", idx, palette=pal)
    np.testing.assert_array_equal(read_label_png(tmp_path / "m.png"), idx)


def test_read_label_png_greyscale_and_grey_rgb(tmp_path):
    idx = np.array([[0, 4], [255, 2]], dtype=np.uint8)
    Image.fromarray(idx).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png", num_classes=5), idx)
    Image.fromarray(np.repeat(idx[:, :, None], 3, axis=2)).save(tmp_path / "rgb_grey.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "rgb_grey.png"), idx)


def test_read_label_png_rejects_colour_mask(tmp_path):
    colour = voc_palette()[np.array([[0, 1], [15, 12]])]
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(DataError, match=r"^mask .*c\.png is an RGB colour image.*indexed 'P'"):
        read_label_png(tmp_path / "c.png")


def test_read_label_png_rejects_jpeg(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(DataError, match="is a JPEG"):
        read_label_png(tmp_path / "m.jpg")


def test_read_label_png_size_mismatch(tmp_path):
    _indexed_png(tmp_path / "m.png", np.zeros((200, 300), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        read_label_png(tmp_path / "m.png", expected_hw=(375, 500))
    assert str(info.value).startswith(f"mask {tmp_path / 'm.png'} is 300x200 but its image is 500x375")


def test_read_label_png_values_out_of_range(tmp_path):
    idx = np.array([[0, 3, 7], [255, 21, 4]], dtype=np.uint8)
    _indexed_png(tmp_path / "s.png", idx)
    with pytest.raises(DataError) as info:
        read_label_png(tmp_path / "s.png", num_classes=5, what="seed")
    msg = str(info.value)
    assert msg.startswith(f"seed {tmp_path / 's.png'} has values [7, 21] outside")
    assert "255" in msg  # says 255 is allowed
    # 255 and values < num_classes are fine
    ok = np.array([[0, 4], [255, 1]], dtype=np.uint8)
    _indexed_png(tmp_path / "ok.png", ok)
    np.testing.assert_array_equal(read_label_png(tmp_path / "ok.png", num_classes=5), ok)


def test_read_label_png_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"^seed not found: "):
        read_label_png(tmp_path / "x.png", what="seed")
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^cannot read mask .*x\.png: "):
        read_label_png(tmp_path / "x.png")


def test_read_label_png_16bit(tmp_path):
    small = np.array([[0, 3], [255, 1]], dtype=np.uint16)
    Image.fromarray(small).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "a.png"), small.astype(np.uint8))
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="values up to 300"):
        read_label_png(tmp_path / "b.png")


# ---------------------------------------------------------------------------- writing
def test_write_label_png_roundtrip_palette(tmp_path):
    arr = np.array([[0, 1, 2], [20, 255, 7]], dtype=np.int64)
    out = write_label_png(tmp_path / "sub" / "m.png", arr)
    assert out == tmp_path / "sub" / "m.png"
    with Image.open(out) as im:
        assert im.mode == "P"
        pal = np.array(im.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal, voc_palette())
    np.testing.assert_array_equal(read_label_png(out), arr)
    assert os.listdir(tmp_path / "sub") == ["m.png"]


def test_write_label_png_greyscale(tmp_path):
    arr = np.array([[0, 9], [255, 3]], dtype=np.uint8)
    write_label_png(tmp_path / "m.png", arr, palette=False)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "L"
    np.testing.assert_array_equal(read_label_png(tmp_path / "m.png"), arr)


def test_write_label_png_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_label_png(tmp_path / "a.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="outside 0..255"):
        write_label_png(tmp_path / "a.png", np.array([[0, 256]]))
    with pytest.raises(ValueError, match="integers"):
        write_label_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.float32))
    assert os.listdir(tmp_path) == []


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.png"
    write_label_png(target, np.ones((3, 3), dtype=np.uint8))
    before = target.read_bytes()

    def boom(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_label_png(target, np.zeros((3, 3), dtype=np.uint8))
    assert target.read_bytes() == before  # old file untouched
    assert os.listdir(tmp_path) == ["m.png"]  # temp file removed


def test_write_overwrites_and_leaves_no_temp(tmp_path):
    for v in range(3):
        write_label_png(tmp_path / "m.png", np.full((2, 2), v, dtype=np.uint8))
        write_json_atomic(tmp_path / "x.json", {"v": v})
    assert sorted(os.listdir(tmp_path)) == ["m.png", "x.json"]
    assert read_label_png(tmp_path / "m.png")[0, 0] == 2
    assert read_json(tmp_path / "x.json") == {"v": 2}


def test_write_json_atomic_roundtrip_and_permissions(tmp_path):
    obj = {"2007_000032": ["aeroplane", "person"], "é": []}
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "d" / "labels.json", obj)
    finally:
        os.umask(old)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # like open(), not tempfile's 0o600
    write_text_atomic(tmp_path / "d" / "ids.txt", "a\nb\n")
    assert (tmp_path / "d" / "ids.txt").read_text() == "a\nb\n"
    assert sorted(os.listdir(tmp_path / "d")) == ["ids.txt", "labels.json"]


def test_read_json_errors(tmp_path):
    with pytest.raises(DataError, match="labels file not found"):
        read_json(tmp_path / "l.json", "labels file")
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(DataError, match=r"^cannot parse labels file .*l\.json: "):
        read_json(tmp_path / "l.json", "labels file")
