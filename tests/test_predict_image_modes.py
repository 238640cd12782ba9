"""``Segmenter.predict`` reads every image ``weakclip predict`` reads, the same way (issue 27, point 7): the
API and the CLI share one conversion (:func:`weakclip.data.io.pil_to_rgb`), so each PIL mode that the CLI's
formats decode to (PNG: 1, L, LA, P, P with transparency, RGB, RGBA, 16-bit grey I;16; JPEG: L, RGB, CMYK;
BMP; WebP) gives the same pixels and the same mask through both. Before, a 16-bit grey image given to
``seg.predict`` was clipped white by ``convert("RGB")`` while the CLI scaled it to 8 bits.

The network: the narrow DeepLab-v1 ResNet-38 (random weights, width / 8) of the ``voc`` preset, saved as a
retraining checkpoint (its classifier's weights x 50, so that the masks follow the pixels), with its own
evaluation settings but one scale (flip and the CRF over the present classes kept)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import weakclip
from weakclip.cli import main
from weakclip.data.io import read_image, read_label_png
from weakclip.errors import WeakclipError
from weakclip.segmenters import as_rgb_array

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(h: int = 40, w: int = 48) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR))


def _grey16(rgb: np.ndarray) -> Image.Image:
    """A 16-bit greyscale image whose values use the whole 0..65535 range (as a scanner's or a camera's)."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey)  # mode I;16


def _palette_with_transparency(rgb: np.ndarray) -> Image.Image:
    im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 3
    return im


#: (file name, mode the file opens in, how to make it from an RGB photo)
CASES = [
    ("bilevel.png", "1", lambda rgb: Image.fromarray(rgb).convert("1")),
    ("grey.png", "L", lambda rgb: Image.fromarray(rgb).convert("L")),
    ("grey_alpha.png", "LA", lambda rgb: Image.fromarray(rgb).convert("LA")),
    ("palette.png", "P", lambda rgb: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)),
    ("palette_transparent.png", "P", _palette_with_transparency),
    ("rgb.png", "RGB", Image.fromarray),
    ("rgba.png", "RGBA", lambda rgb: Image.fromarray(rgb).convert("RGBA")),
    ("grey16.png", "I;16", _grey16),
    ("grey_jpeg.jpg", "L", lambda rgb: Image.fromarray(rgb).convert("L")),
    ("rgb_jpeg.jpg", "RGB", Image.fromarray),
    ("cmyk.jpg", "CMYK", lambda rgb: Image.fromarray(rgb).convert("CMYK")),
    ("palette_bmp.bmp", "P", lambda rgb: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)),
    ("rgb_bmp.bmp", "RGB", Image.fromarray),
    ("rgb_webp.webp", "RGB", Image.fromarray),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread) -> Path:
    from weakclip.retrain.train import apply_retrain_overrides, build_model, load_retrain_preset

    cfg = apply_retrain_overrides(load_retrain_preset("voc"), [
        "model.width_divisor=8", "model.pretrained_backbone=false", "eval.scales=1.0"])
    torch.manual_seed(0)
    model = build_model(cfg, 21, pretrained=False)
    with torch.no_grad():  # sharper logits: random weights give near-uniform ones, which the CRF flattens
        model.net.cls_conv.weight.mul_(50.0)
    path = tmp_path_factory.mktemp("net") / "iter_0000001.pth"
    torch.save({"iteration": 1, "model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("modes")
    rgb = _photo()
    for name, mode, make in CASES:
        make(rgb).save(folder / name)
        with Image.open(folder / name) as im:
            assert im.mode == mode, (name, im.mode)  # the file really holds that mode
    return folder


def test_pil_images_convert_as_the_cli_reads_their_files(files):
    for name, mode, _ in CASES:
        with Image.open(files / name) as im:
            assert im.mode == mode
            api = as_rgb_array(im)
        cli = read_image(files / name, orientation="exif")  # what weakclip predict reads
        assert api.dtype == np.uint8 and api.shape == (40, 48, 3) and api.flags.writeable
        np.testing.assert_array_equal(api, cli, err_msg=name)


def test_16_bit_grey_is_scaled_not_clipped_white(files):
    """The failure of before: ``convert("RGB")`` clipped every 16-bit value above 255 to white."""
    with Image.open(files / "grey16.png") as im:
        values = np.asarray(im)
        api = as_rgb_array(im)
    assert values.max() > 255 * 100  # a real 16-bit image
    clipped = np.asarray(Image.open(files / "grey16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what Pillow alone makes of it
    expected = np.clip(np.rint(values.astype(np.float64) * 255.0 / 65535.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(api, np.repeat(expected[:, :, None], 3, axis=2))
    assert (api == 255).mean() < 0.2


def test_in_memory_modes_of_the_api():
    """Modes a Python caller may hold (not from the CLI's files): 32-bit integer and float greyscale scale
    as 16-bit does; a mode Pillow cannot turn into RGB is one line."""
    from weakclip.data.io import pil_to_rgb

    grey = np.arange(40 * 48, dtype=np.int32).reshape(40, 48) * 30  # up to ~57,000
    wide = as_rgb_array(Image.fromarray(grey, mode="I"))
    np.testing.assert_array_equal(wide[..., 0], np.rint(grey * 255.0 / 65535.0).astype(np.uint8))
    unit = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    floats = as_rgb_array(Image.fromarray(unit, mode="F"))
    np.testing.assert_array_equal(floats[..., 1], np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    np.testing.assert_array_equal(as_rgb_array(Image.fromarray(grey, mode="I")), pil_to_rgb(
        Image.fromarray(grey, mode="I")))
    odd = Image.new("LAB", (4, 3))
    try:
        odd.convert("RGB")
    except ValueError:
        with pytest.raises(WeakclipError, match="mode 'LAB'") as info:
            as_rgb_array(odd)
        assert "\n" not in str(info.value)


def test_every_mode_gives_the_same_mask_through_the_api_and_the_cli(checkpoint, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(files), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]) == 0
    assert f"wrote {len(CASES)} masks" in capsys.readouterr().out
    seg = weakclip.load(checkpoint, "cpu")
    classes_seen = set()
    for name, mode, _ in CASES:
        with Image.open(files / name) as im:
            mask = seg.predict(im)
        cli = read_label_png(out / f"{Path(name).stem}.png")
        np.testing.assert_array_equal(mask, cli, err_msg=f"{name} ({mode})")
        classes_seen |= set(np.unique(mask).tolist())
    assert len(classes_seen) > 1  # the masks say something about the pixels (not one class everywhere)
