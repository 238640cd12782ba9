"""ExCEL's online pseudo labels of a training step, and their affinity targets.

Each training step of the release (scripts/train_voc.py, train_coco.py, the loop body) turns the frozen CLIP's
patch-text maps ("attr maps") into pixel labels, image by image:

1. from the switch iteration (VOC 14,000, COCO 30,000) the maps come from a second CLIP pass that adds the
   decoder's features (``utils/camutils.py cure_attr_map``; here :func:`calibrated_attr_maps`, given the
   pass as a callable);
2. refinement by CLIP attention affinity (``utils/affutils.py refine_cams_with_aff``;
   :func:`refine_with_attention`): the last 6 layers' attention over the patches, averaged (or, from the
   switch iteration, a masked mean gated by the predicted affinity), made doubly stochastic, symmetric and
   squared; each class map is propagated over it, restricted to the boxes around the map's strong regions
   (OpenCV contours at ``caa_thre`` of its maximum);
3. the background step (``refine_cams_with_bkg_weclip``; :func:`refine_with_background`): each refined map
   min-max normalised and resized with OpenCV, background ``1 - max``, PAR on the de-normalised image,
   argmax, class ids;
4. the affinity target of the patch grid (``cams_to_affinity_label``, its second definition;
   :func:`affinity_targets`) from those labels or, VOC only from 24,000, from the network's prediction,
   within a radius-8 window (``get_mask_by_radius``; :func:`radius_mask`);
5. ``lam_to_label`` (:func:`lam_to_label`), whose labels the release only logs.

:func:`training_targets` is that loop body. Everything here is a function of tensors: no model is imported;
the functions run on their inputs' device. Where the release goes through NumPy or OpenCV (the contour boxes,
the resizing of the refined maps) this module calls the same libraries the same way, so the labels are equal,
not merely close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from weakclip.errors import DataError, WeakclipError

__all__ = [
    "COCO_LABELS",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "LabelSettings",
    "StepTargets",
    "VOC_LABELS",
    "affinity_targets",
    "attention_transition",
    "calibrated_attr_maps",
    "contour_boxes",
    "denormalize_image",
    "denormalize_image_uint8",
    "gated_attention",
    "lam_to_label",
    "merge_flipped_attr_maps",
    "radius_mask",
    "refine_image",
    "refine_with_attention",
    "refine_with_background",
    "resize_refined_maps",
    "training_targets",
]

#: utils/imutils.py ``denormalize_img`` (and datasets/transforms.py ``normalize_img``): ImageNet's, in 0-255
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class LabelSettings:
    """What the release's loop body fixes for the online labels (scripts/train_voc.py, train_coco.py).

    ``calibration_iter``: from this 0-based iteration the maps come from the second pass and the attention is
    gated by the predicted affinity (VOC 14,000, COCO 30,000). ``prediction_affinity_iter``: from this
    iteration the affinity target comes from the network's prediction instead of the pseudo labels (VOC
    24,000; COCO never: None)."""

    caa_thre: float = 0.79
    attn_layers: int = 6
    calibration_iter: int | None = 14000
    prediction_affinity_iter: int | None = 24000
    radius: int = 8
    bkg_thre: float = 0.5
    high_thre: float = 0.7
    low_thre: float = 0.25
    ignore_index: int = 255
    patch_size: int = 16

    def calibrated(self, iteration: int) -> bool:
        return self.calibration_iter is not None and iteration >= self.calibration_iter

    def affinity_from_prediction(self, iteration: int) -> bool:
        return self.prediction_affinity_iter is not None and iteration >= self.prediction_affinity_iter


VOC_LABELS = LabelSettings()
COCO_LABELS = LabelSettings(caa_thre=0.88, calibration_iter=30000, prediction_affinity_iter=None)


# ---------------------------------------------------------------------------------------------- images


def denormalize_image_uint8(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN_255,
                            std: Sequence[float] = IMAGENET_STD_255) -> torch.Tensor:
    """[B, 3, H, W] normalised -> uint8 pixels, as utils/imutils.py ``denormalize_img``: ``x * std + mean``
    per channel, then a cast to uint8 that truncates (a pixel of 100 that came back as 99.99999 is 99)."""
    out = torch.zeros_like(images)
    for c in range(3):
        out[:, c] = images[:, c] * std[c] + mean[c]
    return out.to(torch.uint8)


def denormalize_image(images: torch.Tensor) -> torch.Tensor:
    """The image PAR sees in training: ``denormalize_img2`` = the truncated uint8 pixels / 255.0 (float)."""
    return denormalize_image_uint8(images) / 255.0


# ----------------------------------------------------------------------------- attention-affinity step


def gated_attention(attn: torch.Tensor, predicted: torch.Tensor | None) -> torch.Tensor:
    """[L, N, N] patch attention (CLS dropped) -> [N, N], as ``refine_cams_with_aff`` combines the layers.

    Without ``predicted``: the mean over the layers. With the network's affinity prediction [N, N] (from the
    switch iteration): the layers whose summed ``predicted - attention`` is at most the mean of those sums are
    kept and averaged, dividing by ``count + 1e-5`` (release quirk: a mean slightly below the true one; a
    uniform scale that :func:`attention_transition` normalises away, up to rounding), then multiplied by
    ``predicted``."""
    if predicted is None:
        return attn.mean(dim=0).detach()
    predicted = predicted.reshape(attn.shape[-2:])
    diff = (predicted.unsqueeze(0) - attn).flatten(1).sum(dim=1)
    keep = torch.zeros_like(diff)
    keep[diff <= diff.mean()] = 1
    keep = keep.reshape(-1, 1, 1).expand_as(attn)
    merged = (keep * attn).sum(dim=0) / (keep.sum(dim=0) + 1e-5)
    return merged.detach() * predicted.detach()


def attention_transition(affinity: torch.Tensor) -> torch.Tensor:
    """[N, N] -> [N, N], the release's ``compute_trans_mat``: columns then rows normalised to sum 1, twice
    more, symmetrised, squared (one matrix product)."""
    t = affinity / affinity.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.transpose(1, 0)) / 2
    return torch.matmul(t, t).float()


def contour_boxes(score: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` around every contour of a [h, w] score map thresholded at ``threshold`` of
    its maximum, as ``utils/affutils.py scoremap2bbox(..., multi_contour_eval=True)`` computes them (OpenCV):

    the map is cast ``(score * 255).astype(uint8)`` (NumPy's cast: in-range values truncate); pixels strictly
    above ``int(threshold * max)`` are kept; ``cv2.findContours`` (RETR_TREE, so holes count as contours too,
    CHAIN_APPROX_SIMPLE); ``cv2.boundingRect``; ``x1 = min(x + w, width - 1)`` and likewise ``y1`` (release
    quirk: a box reaching the last column or row loses it, since the box is used as ``[y0:y1, x0:x1]``). No
    contour: one empty box ``(0, 0, 0, 0)``."""
    height, width = score.shape
    image = np.expand_dims((score * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[1] if cv2.__version__.split(".")[0] == "3" else found[0]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def refine_with_attention(attr_map: torch.Tensor, attn: torch.Tensor, cls_label: torch.Tensor,
                          grid: tuple[int, int], caa_thre: float = 0.79, attn_layers: int = 6,
                          predicted: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One image's maps refined by CLIP attention affinity (``refine_cams_with_aff``).

    ``attr_map`` [N, C] patch-text maps (N = gh * gw patches); ``attn`` [L, N + 1, N + 1] the layers'
    attention weights with the CLS token first; ``cls_label`` [C] (non-zero = present); ``predicted`` the
    network's affinity [N, N] or [1, N, N] (from the switch iteration) or None. Returns one [gh, gw] map per
    present class, and those classes' indices (CPU, int64)."""
    gh, gw = grid
    if attr_map.shape[0] != gh * gw:
        raise DataError(f"attr map has {attr_map.shape[0]} patches, the {gh}x{gw} grid needs {gh * gw}")
    patch_attn = attn[:, 1:, 1:][-attn_layers:]
    transition = attention_transition(gated_attention(patch_attn, predicted))
    classes = torch.where(cls_label)[0]
    maps = []
    for cls in classes.tolist():
        score = attr_map[:, cls].detach().cpu().numpy().reshape(gh, gw)
        window = torch.zeros((gh, gw), device=transition.device)
        for x0, y0, x1, y1 in contour_boxes(score, caa_thre):
            window[y0:y1, x0:x1] = 1
        masked = transition * window.view(1, gh * gw)
        column = torch.tensor(score, dtype=torch.float32, device=transition.device).view(-1, 1)
        maps.append(torch.matmul(masked, column).reshape(gh, gw))
    return maps, classes.detach().cpu()


# ------------------------------------------------------------------------------------ background step


def resize_refined_maps(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """[C] x [gh, gw] -> [C, H, W] float32 (CPU), as ``generate_cam_label`` / ``scale_cam_image``: each map
    in NumPy float32 minus its minimum, divided by ``1e-7 + max``, then ``cv2.resize`` (bilinear) to
    ``size`` = (H, W)."""
    height, width = size
    out = []
    for m in maps:
        a = m.detach().cpu().numpy().astype(np.float32)
        a = a - np.min(a)
        a = a / (1e-7 + np.max(a))
        out.append(torch.tensor(cv2.resize(a, (width, height)), dtype=torch.float32))
    if not out:
        raise DataError("an image without any class label has no pseudo label (the release fails there too)")
    return torch.stack(out, dim=0)


def refine_with_background(maps: Sequence[torch.Tensor], image: torch.Tensor, classes: torch.Tensor,
                           par: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The background step (``refine_cams_with_bkg_weclip``): the refined maps resized to ``size`` = (H, W)
    (:func:`resize_refined_maps`), a background map ``1 - max`` in front, PAR on ``image`` [3, h, w] (in
    training the de-normalised image; PAR resizes it to ``size``), argmax mapped to class ids (0 background,
    ``class + 1``). Returns the labels [1, H, W] (int64) and the [1 + C, H, W] maps before PAR."""
    device = image.device
    cams = resize_refined_maps(maps, size).to(device)
    background = torch.pow(1 - torch.max(cams, dim=0, keepdim=True)[0], 1.0)
    cams = torch.cat([background, cams], dim=0)
    keys = torch.from_numpy(np.pad(classes.cpu().numpy() + 1, (1, 0), mode="constant")).to(device)
    with torch.no_grad():
        refined = par(image.unsqueeze(0).float(), cams.unsqueeze(0).float())
        labels = keys[refined.argmax(dim=1)].squeeze(0)
    return labels.unsqueeze(0), cams


def refine_image(attr_map: torch.Tensor, attn: torch.Tensor, cls_label: torch.Tensor, image: torch.Tensor,
                 par: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], size: tuple[int, int],
                 caa_thre: float = 0.79, attn_layers: int = 6, predicted: torch.Tensor | None = None,
                 patch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 for one image whose crop is ``size`` = (H, W): labels [1, H, W] and the maps before
    PAR. The patch grid is ``(H // patch_size, W // patch_size)`` as the release's ``h // 16``."""
    grid = (size[0] // patch_size, size[1] // patch_size)
    maps, classes = refine_with_attention(attr_map, attn, cls_label, grid, caa_thre, attn_layers, predicted)
    return refine_with_background(maps, image, classes, par, size)


# ------------------------------------------------------------------------------------ grid labels


def lam_to_label(maps: torch.Tensor, cls_labels: torch.Tensor, bkg_thre: float = 0.5,
                 high_thre: float = 0.7, low_thre: float = 0.25, ignore_mid: bool = False,
                 ignore_index: int = 255, img_box: Sequence[Sequence[int]] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``utils/camutils.py lam_to_label``: maps [B, C, h, w] times the class labels [B, C]; label = argmax + 1
    where the best value is above ``bkg_thre`` (0 otherwise), or with ``ignore_mid``: ``ignore_index`` at
    most ``high_thre``, 0 at most ``low_thre``. With ``img_box`` [(top, bottom, left, right)] an image, pixels
    outside the box are ``ignore_index``. Returns (the masked maps, the labels [B, h, w]). The release's
    training loop reshapes its maps ``(4, 20, 20, 20)``; any batch, class count and grid works here."""
    h, w = maps.shape[-2:]
    valid = cls_labels.unsqueeze(-1).unsqueeze(-1).repeat([1, 1, h, w]) * maps
    value, labels = valid.max(dim=1, keepdim=False)
    labels += 1
    if ignore_mid:
        labels[value <= high_thre] = ignore_index
        labels[value <= low_thre] = 0
    else:
        labels[value <= bkg_thre] = 0
    if img_box is None:
        return valid, labels
    boxed = torch.ones_like(labels) * ignore_index
    for i, (top, bottom, left, right) in enumerate(img_box):
        boxed[i, top:bottom, left:right] = labels[i, top:bottom, left:right]
    return valid, boxed


def radius_mask(h: int, w: int, radius: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """[h * w, h * w] bool: patches within ``radius`` of each other in both directions (a square window), as
    ``utils/camutils.py get_mask_by_radius`` (which builds the same as a float64 NumPy array)."""
    rows = torch.arange(h * w, device=device) // w
    cols = torch.arange(h * w, device=device) % w
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def affinity_targets(labels: torch.Tensor, mask: torch.Tensor | None = None, ignore_index: int = 255,
                     patch_size: int = 16) -> torch.Tensor:
    """Pixel labels [B, H, W] -> patch-pair targets [B, N, N] (int64), as the *second* definition of
    ``cams_to_affinity_label`` in utils/camutils.py (the one Python keeps): labels resized (nearest) to the
    ``(H // 16, W // 16)`` grid; 1 where two patches share a label, 0 where not; ``ignore_index`` outside
    ``mask`` and on every row and column of an ignored patch. Unlike the first definition, the diagonal is
    not ignored."""
    b, h, w = labels.shape
    grid = F.interpolate(labels.unsqueeze(1).type(torch.float32), size=[h // patch_size, w // patch_size],
                         mode="nearest").reshape(b, 1, -1)
    n = grid.shape[-1]
    rows = grid.repeat([1, n, 1])
    targets = (rows == rows.permute(0, 2, 1)).type(torch.long)
    if mask is not None:
        outside = torch.as_tensor(mask, device=labels.device) == 0
    for i in range(b):
        if mask is not None:
            targets[i, outside] = ignore_index
        ignored = rows[i, 0, :] == ignore_index
        targets[i, :, ignored] = ignore_index
        targets[i, ignored, :] = ignore_index
    return targets


# ------------------------------------------------------------------------------- the second CLIP pass


def calibrated_attr_maps(second_pass: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``cure_attr_map``: the attr maps [B, N, C] of the CLIP pass that adds the decoder's features (the
    model called with ``ex_feats``), run without gradients. ``second_pass`` makes that call."""
    with torch.no_grad():
        return second_pass()


def merge_flipped_attr_maps(attr_maps: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """The flip merge of ``cure_attr_map_flip`` (tools/infer_lam.py): attr maps [2B, N, C] of images then
    their mirror images -> [B, N, C]: the maximum of each map and its mirror's flipped back, then min-max
    normalised per image and class (``x - min``, ``/ (max + 1e-5)``)."""
    gh, gw = grid
    maps = attr_maps.permute(0, 2, 1).reshape(batch * 2, -1, gh, gw)
    merged = torch.max(maps[:batch], maps[batch:].flip(-1))
    merged = merged + F.adaptive_max_pool2d(-merged, (1, 1))
    merged /= F.adaptive_max_pool2d(merged, (1, 1)) + 1e-5
    return merged.reshape(batch, -1, gh * gw).permute(0, 2, 1)


# ------------------------------------------------------------------------------------ the step


@dataclass
class StepTargets:
    """What :func:`training_targets` returns.

    ``pseudo_labels`` [B, H, W] int64 (the segmentation loss's target); ``affinity_targets`` [B, N, N] int64
    (the affinity loss's target); ``attr_maps`` [B, N, C] the maps used (after the second pass when
    calibrated); ``lam_labels`` [B, gh, gw] (``lam_to_label``'s output, which the release only logs);
    ``prediction`` [B, H, W] the argmax of the upsampled logits (None when no logits were given)."""

    pseudo_labels: torch.Tensor
    affinity_targets: torch.Tensor
    attr_maps: torch.Tensor
    lam_labels: torch.Tensor
    prediction: torch.Tensor | None


def training_targets(attr_maps: torch.Tensor, attn_weights: torch.Tensor, attn_pred: torch.Tensor,
                     cls_labels: torch.Tensor, images_denorm: torch.Tensor, iteration: int,
                     settings: LabelSettings, par: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     seg_logits: torch.Tensor | None = None,
                     second_pass: Callable[[], torch.Tensor] | None = None) -> StepTargets:
    """The release's loop body from the network's outputs to the loss targets.

    ``attr_maps`` [B, N, C] (first pass); ``attn_weights`` [L, B, N + 1, N + 1]; ``attn_pred`` [B, N, N];
    ``cls_labels`` [B, C]; ``images_denorm`` [B, 3, H, W] (:func:`denormalize_image` of the network's input);
    ``iteration`` the 0-based iteration about to run (the release's ``n_iter``); ``seg_logits`` [B, C + 1, h,
    w] the decoder's logits (needed from ``settings.prediction_affinity_iter``: their argmax at (H, W) is then
    the affinity source); ``second_pass`` the network's pass with the decoder features (needed from
    ``settings.calibration_iter``), see :func:`calibrated_attr_maps`."""
    b, _, height, width = images_denorm.shape
    size = (height, width)
    grid = (height // settings.patch_size, width // settings.patch_size)
    calibrated = settings.calibrated(iteration)
    if calibrated:
        if second_pass is None:
            raise WeakclipError(f"iteration {iteration} needs the second CLIP pass "
                                f"(from {settings.calibration_iter})")
        attr_maps = calibrated_attr_maps(second_pass)
    labels = []
    for i in range(b):
        predicted = attn_pred[i].unsqueeze(0) if calibrated else None
        image_labels, _ = refine_image(attr_maps[i], attn_weights[:, i], cls_labels[i], images_denorm[i], par,
                                       size, settings.caa_thre, settings.attn_layers, predicted,
                                       settings.patch_size)
        labels.append(image_labels)
    pseudo = torch.cat(labels, dim=0)

    prediction = None
    if seg_logits is not None:
        upsampled = F.interpolate(seg_logits.detach(), size=pseudo.shape[1:], mode="bilinear",
                                  align_corners=False)
        prediction = torch.argmax(upsampled, dim=1)
    from_prediction = settings.affinity_from_prediction(iteration)
    if from_prediction and prediction is None:
        raise WeakclipError(f"iteration {iteration} takes the affinity target from the prediction: "
                            "give seg_logits")
    mask = radius_mask(*grid, radius=settings.radius, device=pseudo.device)
    source = prediction if from_prediction else pseudo
    aff = affinity_targets(source, mask, settings.ignore_index, settings.patch_size)

    grid_maps = attr_maps.permute(0, 2, 1).reshape(b, -1, *grid)
    _, lam = lam_to_label(grid_maps, cls_labels, bkg_thre=settings.bkg_thre, high_thre=settings.high_thre,
                          low_thre=settings.low_thre, ignore_mid=False, ignore_index=settings.ignore_index)
    return StepTargets(pseudo, aff, attr_maps, lam, prediction)
