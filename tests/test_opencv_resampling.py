"""The retraining's resampling as the authors' DeepLab-v1 code does it, checked against OpenCV itself.

The release (github Yingyue-L/deeplabv1-resnet38, ``tools/datasets/transform.py``) evaluates with
``ImageNorm`` then ``Multiscale`` (``cv2.resize(image, None, fx=rate, fy=rate,
interpolation=cv2.INTER_CUBIC)`` of the float32 normalised image) and trains with ``RandomHSV``
(``cv2.cvtColor`` RGB <-> HSV on uint8), ``RandomFlip``, ``RandomScale`` (``cv2.resize(fx=s)``: cubic for the
uint8 image, nearest for the mask), ``ImageNorm``, ``RandomCrop``. The reference computations below are those
calls, written out here with OpenCV and the release's constants, on real photos (skimage.data) at odd sizes.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from weakclip.retrain.augment import ReleaseAugment, hsv_jitter
from weakclip.retrain.evaluate import RELEASE_SCALES, predict_probs
from weakclip.retrain.train import load_retrain_preset

skimage_data = pytest.importorskip("skimage.data")

# tools/config.py: DATA_MEAN, DATA_STD (0..1); our presets hold them on the 0..255 scale
RELEASE_MEAN, RELEASE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN255, STD255 = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SIZES = [(75, 94), (333, 500), (500, 375)]


def _photo(h: int, w: int) -> np.ndarray:
    """A real photo of exactly h x w (a crop of skimage's astronaut, tiled if needed)."""
    img = skimage_data.astronaut()
    img = np.tile(img, (1 + (37 + h) // img.shape[0], 1 + (51 + w) // img.shape[1], 1))
    out = np.ascontiguousarray(img[37:37 + h, 51:51 + w])
    assert out.shape == (h, w, 3)
    return out


def _release_image_norm(image: np.ndarray) -> np.ndarray:
    """``ImageNorm.__call__`` of the release, on a float32 copy."""
    x = image.astype(np.float32)
    for c in range(3):
        x[..., c] = (x[..., c] / 255 - RELEASE_MEAN[c]) / RELEASE_STD[c]
    return x


class _Recorder(nn.Module):
    """Logits = the first channels of the input (K = 3), and a copy of every input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(t.permute(1, 2, 0).numpy().copy() for t in x)
        return x[:, :3] * 1.0


@pytest.mark.parametrize("size", SIZES)
def test_test_time_scales_are_cv2_resize_of_the_normalised_image(size):
    image = _photo(*size)
    model = _Recorder()
    predict_probs(model, image, MEAN255, STD255, RELEASE_SCALES, flip=True, fuse="logits", resize="opencv",
                  align_corners=True)
    assert len(model.seen) == 2 * len(RELEASE_SCALES)
    normed = _release_image_norm(image)
    for i, rate in enumerate(RELEASE_SCALES):
        ref = cv2.resize(normed, None, fx=rate, fy=rate, interpolation=cv2.INTER_CUBIC)
        got, got_flip = model.seen[2 * i], model.seen[2 * i + 1]
        assert got.shape == ref.shape, (size, rate)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_flip, ref[:, ::-1], atol=1e-4, rtol=0)


def test_torch_bicubic_is_not_opencv():
    """The torch path (a named switch, faster on a GPU) rounds sizes and samples differently: the reason the
    release presets use OpenCV. At 75 x 94 and scale 0.75 OpenCV gives 56 x 70 and ``round(s * size)``
    56 x 71."""
    image = _photo(75, 94)
    shapes = {}
    for mode in ("opencv", "bicubic"):
        model = _Recorder()
        predict_probs(model, image, MEAN255, STD255, (0.75,), resize=mode)
        shapes[mode] = model.seen[0].shape[:2]
    assert shapes["opencv"] == cv2.resize(image, None, fx=0.75, fy=0.75).shape[:2] == (56, 70)
    assert shapes["bicubic"] == (56, 71)


def test_bad_resize_mode_is_refused():
    with pytest.raises(ValueError, match="opencv"):
        predict_probs(_Recorder(), _photo(20, 30), MEAN255, STD255, resize="lanczos")


def _release_hsv(image: np.ndarray, dh: int, ds: int, dv: int) -> np.ndarray:
    """``RandomHSV.__call__`` of the release with its three draws given."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    h = (hsv[:, :, 0].astype(np.int32) + dh) % 180
    s = hsv[:, :, 1].astype(np.int32) + ds
    s[s > 255] = 255
    s[s < 0] = 0
    v = hsv[:, :, 2].astype(np.int32) + dv
    v[v > 255] = 255
    v[v < 0] = 0
    return cv2.cvtColor(np.stack([h, s, v], axis=-1).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.uint8)


@pytest.mark.parametrize("shift", [(10, 0, 0), (-10, 10, -10), (7, -3, 9), (-1, 10, 10)])
def test_hsv_jitter_equals_opencv(shift):
    image = _photo(75, 94)
    np.testing.assert_array_equal(hsv_jitter(image, *shift), _release_hsv(image, *shift))
    # known values: pure red shifted by +10 (20 degrees) is (255, 85, 0); grey with value -10 is 118
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert hsv_jitter(red, 10, 0, 0).tolist() == [[[255, 85, 0]]]
    assert hsv_jitter(np.full((1, 1, 3), 128, np.uint8), 0, 0, -10).tolist() == [[[118, 118, 118]]]


def _release_augment(image, mask, g: np.random.Generator, crop: int):
    """The release's ``__weak_augment__`` (HSV, flip, scale, norm, crop) with OpenCV, drawing from ``g`` in
    the order ReleaseAugment draws (the release draws from Python's ``random``: same distributions)."""
    dh, ds, dv = (int(g.integers(-10, 11)) for _ in range(3))
    image = _release_hsv(image, dh, ds, dv)
    if g.random() < 0.5:
        image, mask = np.flip(image, axis=1), np.flip(mask, axis=1)
    s = g.uniform(0.5, 1.5)
    image = cv2.resize(np.ascontiguousarray(image), None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
    mask = cv2.resize(np.ascontiguousarray(mask), None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
    image = _release_image_norm(image)
    h, w = image.shape[:2]
    out_img = np.zeros((crop, crop, 3), np.float32)
    out_mask = np.full((crop, crop), 255.0, np.float32)
    offsets = []
    for size in (h, w):
        space = size - crop
        if space > 0:
            offsets.append((int(g.integers(0, space + 1)), 0))
        else:
            offsets.append((0, int(g.integers(0, -space + 1))))
    (ti, to), (li, lo) = offsets
    ch, cw = min(h, crop), min(w, crop)
    out_img[to:to + ch, lo:lo + cw] = image[ti:ti + ch, li:li + cw]
    out_mask[to:to + ch, lo:lo + cw] = mask[ti:ti + ch, li:li + cw]
    return out_img, out_mask


@pytest.mark.parametrize("size", SIZES)
def test_release_augment_equals_the_release_with_opencv(size):
    image = _photo(*size)
    mask = (image[..., 0] // 40).astype(np.uint8)
    mask[:5] = 255
    aug = ReleaseAugment(crop_size=448, scale_range=(0.5, 1.5), hsv=(10, 10, 10), flip_prob=0.5)
    for seed in range(4):
        out = aug({"image": image, "seed": mask}, rng=np.random.default_rng(seed))
        ref_img, ref_mask = _release_augment(image, mask, np.random.default_rng(seed), 448)
        got_img = out["image"].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got_img, ref_img, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out["seed"].numpy(), ref_mask.astype(np.int64))


def test_release_presets_resample_with_opencv():
    for name in ("voc", "coco"):
        cfg = load_retrain_preset(name)
        assert cfg.eval.resize == "opencv" and cfg.data.pipeline == "release"
    for name in ("voc-plus", "coco-plus"):
        assert load_retrain_preset(name).eval.resize != "opencv"


# ---------------------------------------------------------------------- the refinement stage (mmseg 0.19)
def _mmcv_rescale(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv 1.3's ``rescale_size`` for a (long, short) scale: the factor that fits both edges, then
    ``int(x * factor + 0.5)``; returns (h, w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize("size", SIZES)
def test_refinement_resize_is_cv2_linear_and_nearest(size):
    """mmseg's ``Resize`` (keep_ratio) calls ``mmcv.imrescale`` -> ``cv2.resize(img, (w, h), INTER_LINEAR)``
    for the image and ``INTER_NEAREST`` for the seed mask."""
    from weakclip.data.transforms import Resize

    image = _photo(*size)
    mask = (image[..., 1] // 50).astype(np.uint8)
    out = Resize((2048, 512), keep_ratio=True)({"id": "a", "image": image, "seed": mask})
    h, w = _mmcv_rescale(*size, (2048, 512))
    ref_img = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    ref_mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out["image"], ref_img)
    np.testing.assert_array_equal(out["seed"], ref_mask)


class _WindowRecorder(nn.Module):
    """A stand-in segmentation model for the sliding window: records each window it is given."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(t.clone() for t in x)
        return x[:, :3] * 1.0


@pytest.mark.parametrize("resize", ["opencv", "torch"])
def test_pseudo_mask_scales_are_cv2_resize_of_the_uint8_image(resize):
    """mmseg's test pipeline (``MultiScaleFlipAug`` + ``Resize(keep_ratio=True)``) rescales the uint8 image
    with ``cv2.resize(INTER_LINEAR)`` per ratio of (2048, 512), then normalises: ``pseudo.resize: opencv``
    gives the windows exactly that; ``torch`` (the -plus switch) stays within one grey level."""
    from weakclip.inference.sliding import multiscale_inference, scaled_size

    image = _photo(75, 94)
    model = _WindowRecorder()
    ratios = (0.5, 0.75)
    multiscale_inference(model, image, ratios, flip=False, crop=2048, stride=1365, mean=MEAN255, std=STD255,
                         device="cpu", resize=resize)
    assert len(model.seen) == len(ratios)
    m = torch.tensor(MEAN255).view(3, 1, 1)
    s = torch.tensor(STD255).view(3, 1, 1)
    for ratio, window in zip(ratios, model.seen):
        h, w = scaled_size(75, 94, ratio)
        assert window.shape[-2:] == (h, w)
        ref = torch.from_numpy(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
        grey = window * s + m  # back to 0..255
        diff = (grey - ref.float()).abs().max().item()
        assert diff < 1e-3 if resize == "opencv" else diff <= 1.0 + 1e-3, (ratio, diff)
