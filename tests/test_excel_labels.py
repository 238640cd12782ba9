"""ExCEL's online pseudo labels, losses and learning rates against the authors' code, run here on CPU.

The release (../shared/refs/ExCEL-2cd7f51, see tests/excel_ref.py) and ours get the same random inputs: patch-
text maps min-max normalised over the tokens as its ``clip_feature_surgery`` makes them, softmaxed attention
weights (the last five layers summed over heads, as its surgery blocks return them), sigmoid affinity
predictions, normalised images of whole pixels (with zero-padded borders, as its random crop pads), 1-3
classes an image. Labels must be 100% equal; floats are compared with the tolerances stated at each test (the
code runs the same operations in the same order, so most differences measure 0).

The loop body of scripts/train_voc.py / train_coco.py cannot be imported (it is a script): ``_release_step``
replays its lines 180-215 with the release's own functions.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from excel_ref import excel_reference
from weakclip.errors import DataError, WeakclipError
from weakclip.methods.excel import labels as L
from weakclip.methods.excel import losses as LS
from weakclip.methods.excel import schedule as S
from weakclip.methods.excel.par import PAR

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor(L.IMAGENET_MEAN_255).view(1, 3, 1, 1)
STD = torch.tensor(L.IMAGENET_STD_255).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def ref():
    with excel_reference() as r:
        mods = argparse.Namespace(
            aff=r.module("utils.affutils"), cam=r.module("utils.camutils"), im=r.module("utils.imutils"),
            par=r.module("utils.PAR"), losses=r.module("model.losses"), optim=r.module("utils.optimizer"),
            engine=r.module("engine.optimizer_engine"),
        )
        yield mods


# ------------------------------------------------------------------------------------------ inputs


def _images(gen: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """Normalised images of whole pixels, a zero-padded border on some (the release pads with 0 before
    normalising)."""
    pixels = torch.randint(0, 256, (b, 3, h, w), generator=gen).float()
    pixels[0, :, : h // 4] = 0
    return ((pixels - MEAN) / STD).float()


def _attr_maps(gen: torch.Generator, b: int, gh: int, gw: int, c: int) -> torch.Tensor:
    """[B, N, C] maps in [0, 1]: smooth blobs plus noise, min-max normalised over CLS and patches, CLS
    dropped."""
    coarse = torch.rand(b, c, 3, 3, generator=gen)
    smooth = F.interpolate(coarse, size=(gh, gw), mode="bilinear", align_corners=False)
    sim = smooth + 0.3 * torch.rand(b, c, gh, gw, generator=gen)
    tokens = torch.cat([torch.rand(b, c, 1, generator=gen), sim.flatten(2)], dim=2).permute(0, 2, 1)
    lo, hi = tokens.min(1, keepdim=True)[0], tokens.max(1, keepdim=True)[0]
    return ((tokens - lo) / (hi - lo))[:, 1:]


def _attention(gen: torch.Generator, b: int, n: int, layers: int = 12) -> torch.Tensor:
    """[L, B, N + 1, N + 1] softmaxed weights; the last five layers summed over 4 heads."""
    weights = torch.randn(layers, b, n + 1, n + 1, generator=gen).mul(3).softmax(-1)
    weights[-5:] *= 4
    return weights


def _class_labels(gen: torch.Generator, b: int, c: int) -> torch.Tensor:
    out = torch.zeros(b, c)
    for i in range(b):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        out[i, torch.randperm(c, generator=gen)[:k]] = 1
    return out


def _outputs(seed: int, b: int, crop: int, c: int):
    gen = torch.Generator().manual_seed(seed)
    g = crop // 16
    n = g * g
    return argparse.Namespace(
        inputs=_images(gen, b, crop, crop), attr=_attr_maps(gen, b, g, g, c), attn=_attention(gen, b, n),
        attn_pred=torch.randn(b, n, n, generator=gen).sigmoid(), cls=_class_labels(gen, b, c),
        segs=torch.randn(b, c + 1, g, g, generator=gen), second=_attr_maps(gen, b, g, g, c),
        fts=torch.randn(b, 8, g, g, generator=gen),
    )


# ------------------------------------------------------------------------------------------ images, PAR


@pytest.mark.parametrize("seed", [0, 1])
def test_denormalised_images_equal_the_release(ref, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _images(gen, 2, 24, 40)
    assert torch.equal(L.denormalize_image_uint8(x), ref.im.denormalize_img(x.clone()))
    ours, theirs = L.denormalize_image(x), ref.im.denormalize_img2(x.clone())
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    # the truncation is real: some whole pixels come back one lower
    pixels = (x * STD + MEAN).round()
    assert (L.denormalize_image_uint8(x).float() < pixels).any()


@pytest.mark.parametrize(("seed", "img_size", "map_size", "c"), [
    (0, (24, 32), (24, 32), 3), (1, (12, 20), (24, 40), 2), (2, (40, 28), (40, 28), 4),
])
def test_par_equals_the_release_within_1e_5(ref, seed, img_size, map_size, c):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, *img_size, generator=gen)
    maps = torch.rand(2, c, *map_size, generator=gen).softmax(1)
    theirs = ref.par.PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])(images, maps)
    ours = PAR()(images, maps)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5  # measured: 0
    assert len(PAR().state_dict()) == 0


# ------------------------------------------------------------------------------------------ attention step


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thre", [0.79, 0.88])
def test_contour_boxes_equal_scoremap2bbox(ref, seed, thre):
    gen = torch.Generator().manual_seed(seed)
    score = _attr_maps(gen, 1, 7, 9, 1)[0, :, 0].numpy().reshape(7, 9)
    boxes, count = ref.aff.scoremap2bbox(scoremap=score, threshold=thre, multi_contour_eval=True)
    assert L.contour_boxes(score, thre) == [tuple(int(v) for v in box) for box in boxes]
    assert count == len(boxes)
    # a region touching the last row and column: the release's box loses them (x1 = min(x + w, width - 1))
    edge = np.zeros((5, 6), np.float32)
    edge[3:, 4:] = 1.0
    edge[0, 0] = 0.9
    assert L.contour_boxes(edge, thre) == [tuple(int(v) for v in box)
                                           for box in ref.aff.scoremap2bbox(edge, thre, True)[0]]
    assert (4, 3, 5, 4) in L.contour_boxes(edge, thre)
    # no contour at all (a map of zeros): one empty box, as the release
    zeros = np.zeros((4, 4), np.float32)
    assert L.contour_boxes(zeros, thre) == [tuple(ref.aff.scoremap2bbox(zeros, thre, True)[0][0])]


@pytest.mark.parametrize(("seed", "grid", "c"), [(0, (6, 6), 5), (1, (4, 7), 3), (2, (20, 20), 20)])
@pytest.mark.parametrize("gated", [False, True])
def test_attention_refinement_equals_refine_cams_with_aff(ref, seed, grid, c, gated):
    gen = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n = gh * gw
    attr = _attr_maps(gen, 1, gh, gw, c)[0]
    attn = _attention(gen, 1, n)[:, 0]
    cls = _class_labels(gen, 1, c)[0]
    pred = torch.rand(1, n, n, generator=gen) if gated else None
    theirs, their_cls = ref.aff.refine_cams_with_aff(attr, attn, cls, size=(gh * 16, gw * 16), seg_attn=pred,
                                                     caa_thre=0.79)
    ours, our_cls = L.refine_with_attention(attr, attn, cls, grid, caa_thre=0.79, predicted=pred)
    assert torch.equal(our_cls, their_cls)
    assert len(ours) == len(theirs) == int(cls.sum())
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the same operations in the same order


def test_attention_refinement_keeps_the_boxes_edge_quirk(ref):
    """A class whose strong region touches the grid's last row and column: the release's boxes leave them out
    of the propagation window."""
    gh, gw, n = 5, 6, 30
    attr = torch.zeros(n, 2)
    attr[:, 0] = 0.1
    grid = attr[:, 0].view(gh, gw)
    grid[3:, 4:] = 1.0
    gen = torch.Generator().manual_seed(0)
    attn = _attention(gen, 1, n)[:, 0]
    cls = torch.tensor([1.0, 0.0])
    theirs, _ = ref.aff.refine_cams_with_aff(attr, attn, cls, size=(gh * 16, gw * 16), caa_thre=0.79)
    ours, _ = L.refine_with_attention(attr, attn, cls, (gh, gw), caa_thre=0.79)
    assert torch.equal(ours[0], theirs[0])
    # only column 4 of rows 3 (not 4) feeds the propagation: the result is that one patch's column times 1.0
    transition = L.attention_transition(L.gated_attention(attn[:, 1:, 1:][-6:], None))
    assert torch.allclose(ours[0].flatten(), transition[:, 3 * gw + 4], atol=0, rtol=0)


@pytest.mark.parametrize(("seed", "size", "grid"), [
    (0, (48, 64), (3, 4)), (1, (64, 64), (4, 4)), (2, (40, 24), (5, 3)),
])
def test_background_step_equals_refine_cams_with_bkg_weclip(ref, seed, size, grid):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 4, (1,), generator=gen))
    maps = [torch.rand(*grid, generator=gen) for _ in range(k)]
    classes = torch.randperm(20, generator=gen)[:k].sort()[0]
    image = L.denormalize_image(_images(gen, 1, *size))[0]
    par_ref = ref.par.PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])
    theirs, their_cams = ref.aff.refine_cams_with_bkg_weclip(maps, image, classes, par_ref, size=size)
    ours, our_cams = L.refine_with_background(maps, image, classes, PAR(), size)
    assert ours.shape == theirs.shape == (1, *size)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)
    assert torch.equal(our_cams, their_cams)
    assert set(ours.unique().tolist()) <= {0, *(classes + 1).tolist()}


def test_an_image_without_classes_is_a_one_line_error():
    with pytest.raises(DataError, match="without any class"):
        L.refine_with_background([], torch.zeros(3, 16, 16), torch.zeros(0, dtype=torch.long), PAR(),
                                 (16, 16))


# ------------------------------------------------------------------------------------------ grid labels


def test_lam_to_label_equals_the_release_at_its_hard_coded_shape(ref):
    gen = torch.Generator().manual_seed(0)
    attr = _attr_maps(gen, 4, 20, 20, 20)
    cls = _class_labels(gen, 4, 20)
    # the release's loop: attr_maps_raw.permute(0, 2, 1).reshape(4, 20, 20, 20)
    _, theirs = ref.cam.lam_to_label(attr.permute(0, 2, 1).reshape(4, 20, 20, 20), cls, img_box=None,
                                     ignore_mid=False, bkg_thre=0.5, high_thre=0.7, low_thre=0.25,
                                     ignore_index=255)
    _, ours = L.lam_to_label(attr.permute(0, 2, 1).reshape(4, 20, 20, 20), cls)
    assert torch.equal(ours, theirs)
    assert (ours == 0).any() and (ours > 0).any()


@pytest.mark.parametrize(("seed", "b", "c", "grid"), [(1, 3, 5, (6, 4)), (2, 2, 80, (3, 3))])
@pytest.mark.parametrize("ignore_mid", [False, True])
@pytest.mark.parametrize("boxed", [False, True])
def test_lam_to_label_any_shape(ref, seed, b, c, grid, ignore_mid, boxed):
    gen = torch.Generator().manual_seed(seed)
    maps = _attr_maps(gen, b, *grid, c).permute(0, 2, 1).reshape(b, c, *grid)
    cls = _class_labels(gen, b, c)
    box = [(1, grid[0], 0, grid[1] - 1)] * b if boxed else None
    tv, theirs = ref.cam.lam_to_label(maps, cls, img_box=box, bkg_thre=0.5, high_thre=0.7, low_thre=0.25,
                                      ignore_mid=ignore_mid, ignore_index=255)
    ov, ours = L.lam_to_label(maps, cls, ignore_mid=ignore_mid, img_box=box)
    assert torch.equal(ours, theirs)
    assert torch.equal(ov, tv)


@pytest.mark.parametrize(("h", "w", "radius"), [(20, 20, 8), (5, 7, 2), (3, 3, 0), (4, 6, 10)])
def test_radius_mask_equals_get_mask_by_radius(ref, h, w, radius):
    theirs = ref.cam.get_mask_by_radius(h=h, w=w, radius=radius)
    assert torch.equal(L.radius_mask(h, w, radius), torch.from_numpy(theirs) == 1)


@pytest.mark.parametrize(("seed", "size", "with_ignored"), [(0, (320, 320), False), (1, (64, 96), True),
                                                            (2, (48, 48), True)])
def test_affinity_targets_equal_the_second_cams_to_affinity_label(ref, seed, size, with_ignored):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (3, *size), generator=gen)
    if with_ignored:
        labels[0, :16] = 255
    gh, gw = size[0] // 16, size[1] // 16
    mask = ref.cam.get_mask_by_radius(h=gh, w=gw, radius=2 if gh < 20 else 8)
    theirs = ref.cam.cams_to_affinity_label(labels, mask=mask)
    ours = L.affinity_targets(labels, L.radius_mask(gh, gw, 2 if gh < 20 else 8))
    assert torch.equal(ours, theirs)
    assert (ours.diagonal(dim1=1, dim2=2) != 255).any()  # the second definition keeps the diagonal
    assert torch.equal(L.affinity_targets(labels, None), ref.cam.cams_to_affinity_label(labels, mask=None))


@pytest.mark.parametrize("seed", [0, 1])
def test_flip_merge_equals_cure_attr_map_flip(ref, seed):
    gen = torch.Generator().manual_seed(seed)
    b, g, c = 2, 5, 4
    inputs = torch.randn(b, 3, g * 16, g * 16, generator=gen)
    maps = _attr_maps(gen, 2 * b, g, g, c)
    feats = torch.randn(2 * b, 8, g, g, generator=gen)
    calls = []

    def model(x, ex_feats=None):
        calls.append(ex_feats)
        return maps if ex_feats is not None else (None, feats)

    theirs = ref.cam.cure_attr_map_flip(model, inputs)
    assert calls[1] is feats
    ours = L.merge_flipped_attr_maps(maps, b, (g, g))
    assert (ours - theirs).abs().max().item() <= 1e-7  # measured: 0


# ------------------------------------------------------------------------------------------ a whole step


def _release_step(ref, out, n_iter: int, dataset: str, crop: int, num_classes: int, hard_coded: bool = False):
    """scripts/train_{voc,coco}.py lines 180-215 with the release's functions (DDP, logging left out).
    ``hard_coded``: VOC's ``reshape(4, 20, 20, 20)`` before lam_to_label; otherwise train_coco.py's
    ``reshape(spg, num_classes - 1, mask_size, mask_size)``, the same at any size."""
    voc = dataset == "voc"
    switch = 14000 if voc else 30000
    thre = 0.79 if voc else 0.88
    par = ref.par.PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])
    inputs = out.inputs.clone()
    inputs_denorm = ref.im.denormalize_img2(inputs.clone())
    segs = out.segs.clone().requires_grad_(True)
    attn_pred = out.attn_pred.clone().requires_grad_(True)
    attr_maps_raw, attn_weights = out.attr, out.attn

    def model(x, ex_feats=None):
        assert ex_feats is out.fts and x is inputs
        return out.second

    if n_iter >= switch:
        attr_maps_raw = ref.cam.cure_attr_map(model, inputs, ex_feats=out.fts)
    aff_pseudos = []
    for i, attr_map in enumerate(attr_maps_raw):
        seg_attn = attn_pred[i, ...].unsqueeze(0) if n_iter >= switch else None
        refined, cls_lst = ref.aff.refine_cams_with_aff(attr_map, attn_weights[:, i, ...], out.cls[i],
                                                        size=inputs.shape[2:], seg_attn=seg_attn,
                                                        caa_thre=thre)
        labels, _ = ref.aff.refine_cams_with_bkg_weclip(refined, inputs_denorm[i], cls_lst, par,
                                                        size=inputs.shape[2:])
        aff_pseudos.append(labels)
    aff_pseudos = torch.cat(aff_pseudos, dim=0)
    segs_up = F.interpolate(segs, size=aff_pseudos.shape[1:], mode="bilinear", align_corners=False)
    seg_loss = ref.losses.get_seg_loss(segs_up, aff_pseudos.type(torch.long), ignore_index=255)
    seg_pred = torch.argmax(segs_up.detach(), dim=1)
    mask_size = int(crop // 16)
    attn_mask = ref.cam.get_mask_by_radius(h=mask_size, w=mask_size, radius=8)
    if voc and n_iter >= 24000:
        aff_mask = ref.cam.cams_to_affinity_label(seg_pred, mask=attn_mask)
    else:
        aff_mask = ref.cam.cams_to_affinity_label(aff_pseudos, mask=attn_mask)
    b = inputs.shape[0]
    shape = (4, 20, 20, 20) if hard_coded else (b, num_classes - 1, mask_size, mask_size)
    _, lam = ref.cam.lam_to_label(attr_maps_raw.permute(0, 2, 1).reshape(*shape), out.cls, img_box=None,
                                  ignore_mid=False, bkg_thre=0.5, high_thre=0.7, low_thre=0.25,
                                  ignore_index=255)
    diver_loss, _, _ = ref.losses.get_aff_loss(attn_pred, aff_mask)
    loss = 1.0 * seg_loss + 0.1 * diver_loss
    loss.backward()
    return argparse.Namespace(pseudo=aff_pseudos, aff=aff_mask, lam=lam, seg_pred=seg_pred, loss=loss,
                              seg_loss=seg_loss, aff_loss=diver_loss, segs_grad=segs.grad,
                              attn_pred_grad=attn_pred.grad)


def _our_step(out, n_iter: int, settings: L.LabelSettings):
    segs = out.segs.clone().requires_grad_(True)
    attn_pred = out.attn_pred.clone().requires_grad_(True)
    images = L.denormalize_image(out.inputs)
    targets = L.training_targets(out.attr, out.attn, attn_pred, out.cls, images, n_iter, settings, PAR(),
                                 seg_logits=segs, second_pass=lambda: out.second)
    loss, seg, aff = LS.excel_loss(segs, targets.pseudo_labels, attn_pred, targets.affinity_targets)
    loss.backward()
    return targets, argparse.Namespace(loss=loss, seg_loss=seg, aff_loss=aff, segs_grad=segs.grad,
                                       attn_pred_grad=attn_pred.grad)


def _compare_steps(theirs, targets, ours):
    assert torch.equal(targets.pseudo_labels, theirs.pseudo)
    assert torch.equal(targets.affinity_targets, theirs.aff)
    assert torch.equal(targets.lam_labels, theirs.lam)
    assert torch.equal(targets.prediction, theirs.seg_pred)
    for name in ("loss", "seg_loss", "aff_loss"):
        assert abs(getattr(ours, name).item() - getattr(theirs, name).item()) <= 1e-6, name
    assert (ours.segs_grad - theirs.segs_grad).abs().max().item() <= 1e-6
    assert (ours.attn_pred_grad - theirs.attn_pred_grad).abs().max().item() <= 1e-6


@pytest.mark.parametrize(("dataset", "n_iter", "seed"), [
    ("voc", 0, 0), ("voc", 13999, 1), ("voc", 14000, 2), ("voc", 23999, 3), ("voc", 24000, 4),
    ("coco", 0, 5), ("coco", 29999, 6), ("coco", 30000, 7), ("coco", 40000, 8),
])
def test_training_step_small_equals_the_release(ref, dataset, n_iter, seed):
    """Batch 3, crop 96 (a 6 x 6 grid): the VOC loop's reshape (4, 20, 20, 20) cannot hold these maps, so
    lam_to_label gets train_coco.py's reshape; the release's own size is the next test."""
    c = 20 if dataset == "voc" else 80
    out = _outputs(seed, 3, 96, c)
    theirs = _release_step(ref, out, n_iter, dataset, 96, c + 1)
    targets, ours = _our_step(out, n_iter, L.VOC_LABELS if dataset == "voc" else L.COCO_LABELS)
    _compare_steps(theirs, targets, ours)
    assert (targets.pseudo_labels > 0).any() and (targets.pseudo_labels == 0).any()
    calibrated = n_iter >= (14000 if dataset == "voc" else 30000)
    assert torch.equal(targets.attr_maps, out.second if calibrated else out.attr)


def test_training_step_at_the_release_size_equals_the_release(ref):
    """Batch 4, 20 classes, crop 320 (its hard-coded reshape), past both VOC switches (24,000)."""
    out = _outputs(7, 4, 320, 20)
    theirs = _release_step(ref, out, 24000, "voc", 320, 21, hard_coded=True)
    targets, ours = _our_step(out, 24000, L.VOC_LABELS)
    _compare_steps(theirs, targets, ours)
    assert targets.pseudo_labels.shape == (4, 320, 320)
    assert targets.affinity_targets.shape == (4, 400, 400)


def test_the_switches_need_their_inputs():
    out = _outputs(0, 1, 32, 3)
    with pytest.raises(WeakclipError, match="second CLIP pass"):
        L.training_targets(out.attr, out.attn, out.attn_pred, out.cls, L.denormalize_image(out.inputs), 14000,
                           L.VOC_LABELS, PAR())
    with pytest.raises(WeakclipError, match="seg_logits"):
        L.training_targets(out.attr, out.attn, out.attn_pred, out.cls, L.denormalize_image(out.inputs), 24000,
                           L.VOC_LABELS, PAR(), second_pass=lambda: out.second)


# ------------------------------------------------------------------------------------------ losses


def _seg_case(seed: int, case: str):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 5, generator=gen)
    labels = torch.randint(0, 4, (2, 6, 5), generator=gen)
    labels[torch.rand(2, 6, 5, generator=gen) < 0.2] = 255
    if case == "no_background":
        labels[labels == 0] = 2
    elif case == "no_foreground":
        labels[(labels != 0) & (labels != 255)] = 0
    elif case == "all_ignored":
        labels[:] = 255
    return logits, labels


@pytest.mark.parametrize("case", ["mixed", "no_background", "no_foreground", "all_ignored"])
@pytest.mark.parametrize("seed", [0, 1])
def test_segmentation_loss_and_gradient_equal_get_seg_loss(ref, seed, case):
    logits, labels = _seg_case(seed, case)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = LS.segmentation_loss(a, labels)
    theirs = ref.losses.get_seg_loss(b, labels, ignore_index=255)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert (a.grad - b.grad).abs().max().item() <= 1e-6
    assert torch.isfinite(ours)
    if case == "all_ignored":
        assert ours.item() == 0.0 and not a.grad.any()


@pytest.mark.parametrize("case", ["mixed", "no_positive", "no_negative", "all_ignored"])
@pytest.mark.parametrize("seed", [0, 1])
def test_affinity_loss_and_gradient_equal_get_aff_loss(ref, seed, case):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, 16, 16, generator=gen).sigmoid()
    targets = torch.randint(0, 2, (2, 16, 16), generator=gen)
    targets[torch.rand(2, 16, 16, generator=gen) < 0.3] = 255
    if case == "no_positive":
        targets[targets == 1] = 0
    elif case == "no_negative":
        targets[targets == 0] = 1
    elif case == "all_ignored":
        targets[:] = 255
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    ours, op, on = LS.affinity_loss(a, targets)
    theirs, tp, tn = ref.losses.get_aff_loss(b, targets)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert (a.grad - b.grad).abs().max().item() <= 1e-6
    assert (op.item(), on.item()) == (tp.item(), tn.item())
    assert torch.isfinite(ours)


# ------------------------------------------------------------------------------------------ schedule


def _release_args(dataset: str) -> argparse.Namespace:
    """scripts/train_{voc,coco}.py's optimiser arguments (defaults)."""
    return argparse.Namespace(optimizer="PolyWarmupAdamW", lr=1e-4, wt_decay=1e-2, betas=(0.9, 0.999),
                              warmup_iters=50 if dataset == "voc" else 200,
                              max_iters=30000 if dataset == "voc" else 100000, warmup_lr=1e-6, power=1)


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((5, 3), (7,), (2, 2, 3))]


@pytest.mark.parametrize(("dataset", "iterations"), [
    ("voc", (0, 1, 49, 50, 14000, 24000, 29999, 30000, 30001)),
    ("coco", (0, 1, 199, 200, 30000, 99999, 100000)),
])
def test_learning_rate_of_every_group_equals_poly_warmup_adamw(ref, dataset, iterations):
    args = _release_args(dataset)
    theirs = ref.engine.build_optimizer(args, [[], [], [], _params(0)])
    schedule = S.VOC_SCHEDULE if dataset == "voc" else S.COCO_SCHEDULE
    ours = S.build_optimizer(_params(0), schedule)
    for it in iterations:
        if it < args.max_iters:
            theirs.global_step = it  # the release's counter, as after `it` steps
        theirs.step()  # no gradients: AdamW leaves the parameters, the schedule sets the rates
        ours.iteration = it
        ours.step()
        rates = [g["lr"] for g in theirs.param_groups]
        assert S.group_learning_rates(schedule, it) == rates, it
        assert [g["lr"] for g in ours.param_groups] == rates, it
    assert S.group_learning_rates(S.VOC_SCHEDULE, 0)[3] == pytest.approx(1e-9, rel=1e-9)
    assert S.group_learning_rates(S.VOC_SCHEDULE, 0)[0] == pytest.approx(1e-10, rel=1e-9)


@pytest.mark.parametrize(("dataset", "start"), [("voc", 0), ("voc", 49), ("voc", 14000), ("coco", 199)])
def test_two_optimizer_steps_equal_poly_warmup_adamw(ref, dataset, start):
    args = _release_args(dataset)
    mine, theirs_params = _params(1), _params(1)
    theirs = ref.engine.build_optimizer(args, [[], [], [], theirs_params])
    ours = S.build_optimizer(mine, S.VOC_SCHEDULE if dataset == "voc" else S.COCO_SCHEDULE)
    theirs.global_step = ours.iteration = start
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for a, b in zip(mine, theirs_params):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        theirs.step()
        ours.step()
    for a, b in zip(mine, theirs_params):
        assert torch.equal(a, b)
    assert ours.iteration == theirs.global_step == start + 2
    assert [g["weight_decay"] for g in ours.param_groups] == [g["weight_decay"] for g in theirs.param_groups]
    assert [g["betas"] for g in ours.param_groups] == [tuple(g["betas"]) for g in theirs.param_groups]
    assert [g["eps"] for g in ours.param_groups] == [g["eps"] for g in theirs.param_groups]


def test_optimizer_resumes_exactly(tmp_path):
    def grads(step: int, params):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    straight = _params(3)
    opt = S.build_optimizer(straight, S.PolyWarmup(warmup_iters=2, max_iters=4))
    for step in range(5):
        grads(step, straight)
        opt.step()

    resumed = _params(3)
    first = S.build_optimizer(resumed, S.PolyWarmup(warmup_iters=2, max_iters=4))
    for step in range(3):
        grads(step, resumed)
        first.step()
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = S.build_optimizer(resumed, S.PolyWarmup(warmup_iters=2, max_iters=4))
    second.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert second.iteration == 3
    for step in range(3, 5):
        grads(step, resumed)
        second.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert [g["lr"] for g in second.param_groups] == [g["lr"] for g in opt.param_groups]
