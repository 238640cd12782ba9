"""The seed stage reproduces CLIP-ES (github linyq2117/CLIP-ES) point by point: the softmax set, the
prompt names per dataset, the box rule, the resize, the normalisation, the uint8 threshold, the
precision, the VOC / COCO settings, and its two mask rules (background-power argmax, dense CRF)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.cli import main
from weakclip.data.classes import COCO_CLASSES, VOC_CLASSES
from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import WeakclipError
from weakclip.models.clip import build_clip, get_arch, make_open_clip_model
from weakclip.seeds.clip_es import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEsConfig,
    ClipEsSeeder,
    box_mask,
    encode_prompts,
    es_normalise,
    resize_image,
    seed_preset,
)
from weakclip.seeds.masks import MEAN_BGR, argmax_mask, background_scores, crf_image, crf_mask
from weakclip.seeds.names import BACKGROUND_COCO, BACKGROUND_VOC, COCO_NAMES, VOC_NAMES


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(11)
    return build_clip("tiny", pretrained_download=False)


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    return np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


def _np_scale(cam: np.ndarray) -> np.ndarray:
    """pytorch_grad_cam's ``scale_cam_image`` (no resize): (x - min) / (1e-7 + max), float32."""
    cam = cam - np.min(cam)
    return (cam / (np.float32(1e-7) + np.max(cam))).astype(np.float32)


def _reference_gradcam(tower, image: torch.Tensor, text: torch.Tensor, target: int, scale: float = 100.0
                       ) -> np.ndarray:
    """Grad-CAM as CLIP-ES computes it, written out with the tower's public steps (no seeder code):
    softmax over ``text`` rows, target row ``target``, activation = last block's ln_1 output."""
    depth = tower.num_blocks
    with torch.no_grad():
        x, (gh, gw) = tower.embed(image)
        for b in range(1, depth):
            x, _ = tower.run_block(b, x)
    act = tower.block_norm(depth, x).detach().requires_grad_(True)
    out, _ = tower.run_block(depth, x, normed=act)
    pooled = tower.visual.ln_post(out[:, 1:]).mean(dim=1) @ tower.visual.proj
    feat = pooled / pooled.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    probs = (scale * feat @ text.t()).softmax(dim=-1)
    (grad,) = torch.autograd.grad(probs[0, target], act)
    a = act.detach()[0, 1:].numpy()
    g = grad[0, 1:].numpy()
    cam = np.maximum((a * g.mean(axis=0)).sum(axis=-1), 0).astype(np.float32)
    return _np_scale(_np_scale(cam)).reshape(gh, gw)  # per layer, then after the layer mean


# ------------------------------------------------------------------------------------------------
# 1. softmax set


def test_softmax_set_is_the_image_labels_plus_background(tiny):
    image_tower, _ = tiny
    rng = torch.Generator().manual_seed(5)
    classes = ["background", "a", "b", "c", "d", "e"]
    fg = torch.randn(5, get_arch("tiny").embed_dim, generator=rng)
    bg = torch.randn(3, get_arch("tiny").embed_dim, generator=rng)
    image = _random_image(96, 128)
    x = ((resize_image(image, (96, 128)) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
         / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
    keys = [2, 4]
    labels_set = torch.cat([fg[[1, 3]], bg])  # CLIP-ES: the labels' prompts, then the background's
    all_set = torch.cat([fg, bg])
    scale = 5.0  # a random CLIP saturates the softmax at 100, where every set gives the same CAM
    cams = {}
    for over in ("labels", "all"):
        config = ClipEsConfig(softmax_over=over, refine=False, logit_scale=scale)
        seeder = ClipEsSeeder(image_tower, classes, config=config, class_embeddings=fg,
                              background_embeddings=bg)
        cams[over] = seeder.view_cams(x, keys).numpy()
    for j, key in enumerate(keys):
        ref_labels = _reference_gradcam(image_tower, x, labels_set, j, scale)
        ref_all = _reference_gradcam(image_tower, x, all_set, key - 1, scale)
        np.testing.assert_allclose(cams["labels"][j], ref_labels, atol=2e-4)
        np.testing.assert_allclose(cams["all"][j], ref_all, atol=2e-4)
        assert np.abs(ref_labels - ref_all).max() > 0.05  # the two sets give different CAMs here
    assert ClipEsConfig().softmax_over == "labels" and seed_preset("voc-plus").softmax_over == "all"


# ------------------------------------------------------------------------------------------------
# 2. names in the prompts


def test_prompt_names_per_dataset_and_their_embeddings(tiny):
    image_tower, text_tower = tiny
    voc = ClipEsSeeder(image_tower, VOC_CLASSES, text_tower=text_tower)
    assert voc.class_prompts == list(VOC_NAMES) and voc.clip_es_names
    assert voc.class_prompts[14] == "person with clothes,people,human"
    assert voc.class_prompts[19] == "tvmonitor screen" and voc.class_prompts[10] == "diningtable"
    assert voc.background_prompts == list(BACKGROUND_VOC) and len(BACKGROUND_VOC) == 25
    # the embedding of "person" is that of the prompt with CLIP-ES's name, not the plain one
    person = encode_prompts(text_tower, ["person with clothes,people,human"], ["a clean origami {}."])[0]
    plain = encode_prompts(text_tower, ["person"], ["a clean origami {}."])[0]
    assert torch.allclose(voc.class_embeddings[14], person, atol=1e-5)
    assert not torch.allclose(voc.class_embeddings[14], plain, atol=1e-3)

    coco = ClipEsSeeder(image_tower, COCO_CLASSES, text_tower=text_tower)
    assert coco.class_prompts == list(COCO_NAMES) and len(COCO_NAMES) == 80
    by_class = dict(zip(COCO_CLASSES[1:], coco.class_prompts))
    assert by_class["snowboard"] == "sknowboard" and by_class["tie"] == "necktie"
    assert by_class["hair drier"] == "hairdrier,blowdrier" and by_class["spoon"] == "dessertspoon"
    assert sum(a != b for a, b in zip(COCO_CLASSES[1:], COCO_NAMES)) == 18  # differ from our COCO names
    assert coco.background_prompts == list(BACKGROUND_COCO) and len(BACKGROUND_COCO) == 23
    assert coco.dropped_background == []

    plain_voc = ClipEsSeeder(image_tower, VOC_CLASSES, text_tower=text_tower,
                             config=ClipEsConfig(plain_names=True))
    assert plain_voc.class_prompts[14] == "person" and plain_voc.class_prompts[10] == "dining table"
    assert not plain_voc.clip_es_names
    other = ClipEsSeeder(image_tower, ["background", "cat_toy", "dog"], text_tower=text_tower)
    assert other.class_prompts == ["cat toy", "dog"] and not other.clip_es_names


# ------------------------------------------------------------------------------------------------
# 3-4. boxes: uint8 threshold, clipped exclusive end; VOC vs COCO threshold


def test_box_touching_the_border_loses_its_last_row_and_column():
    cam = torch.zeros(5, 7)
    cam[2:5, 4:7] = 1.0  # touches the bottom and right borders
    cam[0:2, 0:2] = 0.8  # touches the top and left borders: kept whole
    got = box_mask(cam, 0.4)
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[2:4, 4:6] = True  # end clipped to H-1 = 4 / W-1 = 6 and used as an exclusive end
    expected[0:2, 0:2] = True
    assert torch.equal(got, expected)
    inclusive = box_mask(cam, 0.4, inclusive=True)
    expected[2:5, 4:7] = True
    assert torch.equal(inclusive, expected)
    # a region ending one before the border keeps its box whole
    cam = torch.zeros(5, 7)
    cam[1:4, 2:6] = 1.0
    assert torch.equal(box_mask(cam, 0.4), cam > 0)
    # an L-shaped region gives its bounding box; two diagonal pixels are one (8-connected) region
    cam = torch.zeros(6, 6)
    cam[1, 1] = cam[2, 2] = cam[2, 3] = 1.0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:3, 1:4] = True
    assert torch.equal(box_mask(cam, 0.4), expected)


def _clip_es_box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """CLIP-ES's ``scoremap2bbox(multi_contour_eval=True)`` with OpenCV, then the mask its generate_cams
    scripts paint from the boxes (``aff_mask[y0:y1, x0:x1] = 1``)."""
    import cv2

    height, width = cam.shape
    u8 = np.expand_dims((cam * 255).astype(np.uint8), 2)
    _, thr = cv2.threshold(src=u8, thresh=int(threshold * np.max(u8)), maxval=255, type=cv2.THRESH_BINARY)
    contours = cv2.findContours(image=thr, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    boxes = [[0, 0, 0, 0]]
    if contours:
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("threshold", [0.4, 0.7])
def test_box_mask_equals_clip_es_scoremap2bbox_with_opencv(threshold):
    """On CAM-like maps made from real photos (several blobs, holes, regions on the borders)."""
    skimage_data = pytest.importorskip("skimage.data")
    for photo in (skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()):
        grey = photo.astype(np.float32).mean(axis=2)
        for h, w in ((32, 32), (29, 41)):
            small = torch.nn.functional.interpolate(torch.from_numpy(grey)[None, None], size=(h, w),
                                                    mode="area")[0, 0]
            cam = (small - small.min()) / (small.max() - small.min() + 1e-7)
            for c in (cam, 1 - cam, cam * (1 - cam) * 4):
                got = box_mask(c, threshold).numpy()
                np.testing.assert_array_equal(got, _clip_es_box_mask(c.numpy().astype(np.float32), threshold))


def test_box_threshold_is_on_the_uint8_cam():
    cam = torch.zeros(1, 9)
    cam[0, 0] = 1.0  # uint8 255; threshold int(0.4 * 255) = 102, strictly above
    cam[0, 2] = 0.401  # 102.25 -> 102: out, though above 0.4 as a float
    cam[0, 4] = 0.4039  # 102.99 -> 102: out
    cam[0, 6] = 0.40393  # 103.002 -> 103: in
    got = box_mask(cam, 0.4, inclusive=True)[0]
    assert got.tolist() == [True, False, False, False, False, False, True, False, False]
    # the maximum itself is uint8-scaled: a peak of 0.99999 is 254, threshold int(0.7 * 254) = 177
    cam = torch.tensor([[0.99999, 0.0, 0.698, 0.0, 0.6985]])  # 177.99 -> 177 out; 178.1 -> 178 in
    assert box_mask(cam, 0.7, inclusive=True)[0].tolist() == [True, False, False, False, True]
    assert not box_mask(torch.zeros(3, 3), 0.4).any()


def test_voc_and_coco_settings(tiny):
    image_tower, text_tower = tiny
    voc = ClipEsSeeder(image_tower, VOC_CLASSES, text_tower=text_tower)
    coco = ClipEsSeeder(image_tower, COCO_CLASSES, text_tower=text_tower)
    assert voc.config.box_threshold == 0.4 and coco.config.box_threshold == 0.7
    assert seed_preset("voc").box_threshold == 0.4 and seed_preset("coco").box_threshold == 0.7
    assert seed_preset("coco-plus").box_threshold == 0.7 and seed_preset("coco-plus").inclusive_boxes
    with pytest.raises(WeakclipError, match="unknown seed preset"):
        seed_preset("pascal")
    from weakclip.cli import build_parser
    from weakclip.commands.seeds import seed_config

    parser = build_parser()
    needed = ["--data-root", "d", "--clip-weights", "w.pt", "--out", "o"]
    args = parser.parse_args(["seeds", *needed])
    assert seed_config(args, "coco")[0] == "coco" and seed_config(args, "voc")[0] == "voc"
    assert seed_config(args, "folder")[1] == seed_preset("voc")
    args = parser.parse_args(["seeds", *needed, "--preset", "voc", "--inclusive-boxes", "--box-threshold",
                              "0.5", "--masks"])
    name, cfg = seed_config(args, "coco")
    assert name == "voc" and cfg.inclusive_boxes and cfg.box_threshold == 0.5 and cfg.masks == ()
    assert not cfg.float_resize and cfg.softmax_over == "labels"


# ------------------------------------------------------------------------------------------------
# 5-7. resize, normalisation, precision


def test_resize_is_pil_bicubic_of_the_uint8_image(tiny):
    image = _random_image(37, 53, seed=3)
    image[10:20, 10:30] = 255  # sharp edges, where float and uint8 bicubic differ most
    image[20:25, 10:30] = 0
    got = resize_image(image, (48, 64))
    pil = np.asarray(Image.fromarray(image).resize((64, 48), Image.BICUBIC)).astype(np.float32) / 255
    assert torch.equal(got[0], torch.from_numpy(pil).permute(2, 0, 1))
    floats = resize_image(image, (48, 64), float_resize=True)
    assert (floats - got).abs().max() > 2 / 255
    assert torch.equal(resize_image(image, (37, 53)), resize_image(image, (37, 53), float_resize=True))
    # the seeder's view: sides rounded up to the patch size, PIL-resized, normalised with CLIP's stats
    image_tower, text_tower = tiny
    seeder = ClipEsSeeder(image_tower, ["background", "x"], text_tower=text_tower)
    (view, flipped), = seeder._views(image)
    p = image_tower.patch_size
    assert view.shape[-2:] == (-(-37 // p) * p, -(-53 // p) * p) and not flipped
    expected = (resize_image(image, tuple(view.shape[-2:])) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(view, expected)


def test_normalisation_is_clip_es_with_1e7_twice():
    x = torch.tensor([[0.0, 1e-7, 2e-7], [3.0, 5.0, 7.0], [4.0, 4.0, 4.0]])
    once = es_normalise(x)
    np.testing.assert_allclose(once[0].numpy(), [0.0, 1 / 3, 2 / 3], rtol=1e-5)  # not [0, 0.5, 1]
    np.testing.assert_allclose(once[1].numpy(), _np_scale(np.float32([3.0, 5.0, 7.0])), rtol=0, atol=0)
    assert once[2].tolist() == [0.0, 0.0, 0.0]
    twice = es_normalise(once)
    np.testing.assert_allclose(twice[0].numpy(), _np_scale(_np_scale(np.float32([0.0, 1e-7, 2e-7]))),
                               rtol=1e-6)
    assert 0.9999 < float(twice[0, 2]) < 1.0
    # the peak stays under 1, so the uint8 maximum the boxes see is 254
    assert int((twice[1] * 255).to(torch.uint8).max()) == 254


def test_precision_switch(tiny):
    cfg = ClipEsConfig()
    assert cfg.dtype_on("cuda") == torch.float16 and cfg.dtype_on("cpu") == torch.float32
    assert ClipEsConfig(precision="fp32").dtype_on("cuda") == torch.float32
    assert seed_preset("voc-plus").dtype_on("cuda") == torch.float32
    with pytest.raises(WeakclipError, match="precision"):
        ClipEsConfig(precision="bf16")
    # fp16 runs the towers in half precision (forced here on CPU) and gives nearly the fp32 CAMs
    torch.manual_seed(2)
    half_img, half_txt = build_clip("tiny", pretrained_download=False)
    torch.manual_seed(2)
    full_img, full_txt = build_clip("tiny", pretrained_download=False)
    image = _random_image(96, 128, seed=4)
    names = ["background", "disk", "square"]
    # logit scale 5: a random CLIP saturates the softmax at 100, and fp16 gradients then underflow
    try:
        half = ClipEsSeeder(half_img, names, text_tower=half_txt,
                            config=ClipEsConfig(precision="fp16", logit_scale=5))
        cams16 = half.cams(image, [1, 2])
    except RuntimeError as exc:  # pragma: no cover - a CPU build without half kernels
        pytest.skip(f"no fp16 on this CPU: {exc}")
    assert next(half_img.parameters()).dtype == torch.float16 and half.dtype == torch.float16
    assert half.class_embeddings.dtype == torch.float16
    cams32 = ClipEsSeeder(full_img, names, text_tower=full_txt, config=ClipEsConfig(logit_scale=5)).cams(
        image, [1, 2])
    assert not np.array_equal(cams16, cams32)
    for a, b in zip(cams16, cams32):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


# ------------------------------------------------------------------------------------------------
# 8-9. CLIP-ES's masks


def test_background_power_argmax():
    cams = np.zeros((2, 2, 3), np.float32)
    cams[0] = [[0.9, 0.4, 0.1], [0.5, 0.3, 0.0]]
    cams[1] = [[0.2, 0.3, 0.7], [0.45, 0.35, 0.0]]
    # t = 1: background 1 - max = [[0.1, 0.6, 0.3], [0.5, 0.65, 1.0]]
    assert argmax_mask(cams, [3, 7], 1).tolist() == [[3, 0, 7], [0, 0, 0]]  # (1,0): tie 0.5 -> background
    # t = 2: background [[0.01, 0.36, 0.09], [0.25, 0.4225, 1.0]]
    assert argmax_mask(cams, [3, 7], 2).tolist() == [[3, 3, 7], [3, 0, 0]]
    scores = background_scores(cams, [3, 7], 2)
    assert scores.dtype == np.float16 and scores.shape == (3, 2, 3)
    assert argmax_mask(np.zeros((0, 2, 2)), [], 1).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError):
        argmax_mask(cams, [3], 1)


def test_crf_wraps_the_mean_subtracted_image():
    image = np.array([[[0, 0, 0], [255, 255, 255], [122, 116, 104], [130, 120, 110]]], np.uint8)
    got = crf_image(image)
    # BGR order; B - 104.008, G - 116.669, R - 122.675, truncated towards zero, wrapped modulo 256
    assert got[0].tolist() == [[152, 140, 134], [150, 138, 132], [0, 0, 0], [5, 3, 7]]
    assert np.array_equal(crf_image(image, fix_wrap=True), image[..., ::-1])
    if platform.machine().lower() in ("x86_64", "amd64"):  # numpy's own cast (undefined in C) on x86
        bgr = image[..., ::-1].astype(np.float32) - np.float32(MEAN_BGR)
        assert np.array_equal(got, bgr.astype(np.uint8))


def _pydensecrf_reference(image_rgb: np.ndarray, cams: np.ndarray, keys, wrap: bool = True) -> np.ndarray:
    """eval_cam_with_crf.py's steps, written against pydensecrf2 directly."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    bgr = image_rgb[..., ::-1].astype(np.float32)
    if wrap:
        bgr = bgr - np.float32(MEAN_BGR)
        crf_img = (np.trunc(bgr).astype(np.int64) % 256).astype(np.uint8)
    else:
        crf_img = bgr.astype(np.uint8)
    cams16 = cams.astype(np.float16)
    bg = np.power(1 - np.max(cams16, axis=0, keepdims=True), 1)
    prob = np.concatenate((bg, cams16), axis=0)
    c, h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(crf_img), compat=4)
    q = np.array(d.inference(10)).reshape((c, h, w))
    label = np.pad(np.asarray(keys), (1, 0))[np.argmax(q, axis=0)]
    label[np.max(q, axis=0) < 0.95] = 255
    return label.astype(np.uint8)


def test_crf_mask_equals_pydensecrf_run_as_clip_es():
    h, w = 24, 32
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = (30, 90, 40)  # dark: below the mean, so the wrap matters
    image[4:16, 6:20] = (200, 40, 40)
    image[14:22, 20:30] = (50, 60, 210)
    rng = np.random.default_rng(1)
    image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cams = np.stack([np.exp(-((yy - 10) ** 2 + (xx - 13) ** 2) / 40.0),
                     np.exp(-((yy - 18) ** 2 + (xx - 25) ** 2) / 25.0)]).astype(np.float32)
    keys = [5, 12]
    got = crf_mask(image, cams, keys)
    assert np.array_equal(got, _pydensecrf_reference(image, cams, keys))
    assert {0, 5, 12, 255} <= set(np.unique(got).tolist())  # classes, background and the 0.95 cut
    fixed = crf_mask(image, cams, keys, fix_wrap=True)
    assert np.array_equal(fixed, _pydensecrf_reference(image, cams, keys, wrap=False))
    assert not np.array_equal(fixed, got)
    loose = crf_mask(image, cams, keys, confidence=0.0)
    assert 255 not in loose and np.array_equal(loose[got != 255], got[got != 255])


# ------------------------------------------------------------------------------------------------
# 10. the runner writes seeds, CLIP-ES's masks and the CAM files together


def test_seeds_command_writes_clip_es_masks(tmp_path):
    torch.manual_seed(7)
    weights = tmp_path / "tiny.pt"
    torch.save(make_open_clip_model(get_arch("tiny")).state_dict(), weights)
    root = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=0, n_classes=3)
    out = tmp_path / "seeds"
    argv = ["seeds", "--data-root", str(root), "--split", "train", "--clip-weights", str(weights),
            "--arch", "tiny", "--out", str(out), "--device", "cpu", "--save-cams", "--quiet",
            "--bg-power", "2"]
    assert main(argv) == 0
    dataset = build_dataset("folder", root, split="train")
    for i, ident in enumerate(dataset.ids):
        image = np.asarray(Image.open(dataset.image_path(i)).convert("RGB"))
        npz = np.load(out / "cams" / f"{ident}.npz")
        cams, keys = npz["cams"], npz["keys"].tolist()
        assert cams.dtype == np.float16 and cams.shape == (len(keys), *image.shape[:2])
        arg = read_label_png(out / "argmax" / f"{ident}.png")
        assert np.array_equal(arg, argmax_mask(cams, keys, 2))
        crf = read_label_png(out / "crf" / f"{ident}.png")
        assert np.array_equal(crf, crf_mask(image, cams, keys, power=2))
        assert read_label_png(out / f"{ident}.png").shape == image.shape[:2]
    import json

    summary = json.loads((out / "seeds_summary.json").read_text())
    assert set(summary["masks_miou"]) == {"argmax", "crf", "crf_confident"}
    # a resumed run computes nothing; a missing mask makes its image computed again
    (out / "crf" / f"{dataset.ids[1]}.png").unlink()
    assert main(argv) == 0
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["written"] == 1 and summary["skipped_existing"] == 2
    assert (out / "crf" / f"{dataset.ids[1]}.png").is_file()


def test_config_checks():
    with pytest.raises(WeakclipError, match="mask kinds"):
        ClipEsConfig(masks=("argmax", "edges"))
    with pytest.raises(WeakclipError, match="bg_power"):
        ClipEsConfig(bg_power=0)
    assert ClipEsConfig(masks=("crf", "crf")).masks == ("crf",)
    resolved = ClipEsConfig().for_classes(VOC_CLASSES)
    assert resolved.background == BACKGROUND_VOC and resolved.box_threshold == 0.4
    assert ClipEsConfig(box_threshold=0.5).for_classes(COCO_CLASSES).box_threshold == 0.5
