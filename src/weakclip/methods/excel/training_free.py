"""ExCEL's pseudo masks without training, as the release's ``tools/infer_lam.py --training_free true``.

What its ``build_validation`` computes for one image (batch 1; the input is the whole uint8 image through
``normalize_img``, :func:`weakclip.methods.excel.augment.normalize_image`):

1. the image resized (``F.interpolate``, bilinear, ``align_corners=False``) to a ``size`` x ``size`` square
   (320, whatever its aspect);
2. the network's forward: the patch-text maps of the frozen CLIP with the enriched text features and CLIP's
   attention weights (the decoder runs too; training-free, its outputs are not used);
3. the attention-affinity refinement of each labelled class's map (``refine_cams_with_aff``, caa_thre 0.79,
   the last 6 layers' attention averaged: :func:`~weakclip.methods.excel.labels.refine_with_attention`);
4. the background step with PAR (``refine_cams_with_bkg_weclip``: the refined maps min-max normalised and
   resized with OpenCV to the IMAGE's size, background ``1 - max``, PAR, argmax to class ids:
   :func:`~weakclip.methods.excel.labels.refine_with_background`). Quirk kept: infer_lam hands PAR the
   network's NORMALISED input (``inputs[i]``) where training hands it the de-normalised crop
   (``denormalize_img2``); PAR resizes it (bilinear, ``align_corners=True``) from the square to the image's
   size. ``par_image="denormalized"`` (:class:`FreeSettings`) is the departure that gives PAR what training
   gives it.

With ``calibrated=True`` it is infer_lam's other mode (``--training_free false``, a trained network): the
maps of ``cure_attr_map_flip`` (a forward of the image and its flip for the decoder's features, the second
CLIP pass with them, the flipped maps merged by maximum, min-max normalised) and the attention gated by the
predicted affinity of the first forward (:func:`~weakclip.methods.excel.labels.gated_attention`).

``tools/training_free_attr.py`` is the release's other training-free script; at commit 2cd7f51 it cannot run
(it imports ``build_clip_grad``, which its ``engine`` package does not define, unpacks four outputs of a
forward that returns five and calls ``refine_cams_with_aff`` / ``refine_cams_with_bkg_weclip`` with
signatures they no longer have); it also hands PAR the normalised image. The package follows
``tools/infer_lam.py``.

Images are processed one at a time as the release does (the network's batch-wide means make a batch of
several give other maps in the calibrated mode). The network runs in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.errors import DataError, WeakclipError

__all__ = ["FreeMaps", "FreeSettings", "free_settings", "training_free_maps", "training_free_mask"]


@dataclass(frozen=True)
class FreeSettings:
    """``size``: the square the image is resized to (infer_lam ``--resize_size`` 320); ``caa_thre`` and
    ``attn_layers``: the attention refinement's (0.79, 6); ``par_iters`` / ``par_dilations``: PAR's (20;
    1, 2, 4, 8, 12, 24); ``par_image``: ``normalized`` (infer_lam) or ``denormalized`` (as training)."""

    size: int = 320
    caa_thre: float = 0.79
    attn_layers: int = 6
    par_iters: int = 20
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_image: str = "normalized"

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise WeakclipError(f"training-free size must be a positive number of pixels, got {self.size}")
        if self.par_image not in ("normalized", "denormalized"):
            raise WeakclipError(f"par_image must be normalized or denormalized, got {self.par_image!r}")


def free_settings(cfg) -> FreeSettings:
    """The settings of an :class:`~weakclip.methods.excel.config.ExcelConfig` (its ``free`` section, PAR and
    the attention layers from ``labels``)."""
    return FreeSettings(size=cfg.free.size, caa_thre=cfg.free.caa_threshold,
                        attn_layers=cfg.labels.attn_layers, par_iters=cfg.labels.par_iters,
                        par_dilations=tuple(cfg.labels.par_dilations), par_image=cfg.free.par_image)


def _calibrated_maps(net, x: torch.Tensor) -> torch.Tensor:
    """``cure_attr_map_flip(model, inputs)`` (flip and decoder features on): the image and its flip through
    the network for the decoder's features, the second pass with them, the flips merged."""
    from weakclip.methods.excel.labels import merge_flipped_attr_maps

    batch = x.shape[0]
    both = torch.cat([x, x.flip(-1)], dim=0)
    with torch.no_grad():
        features = net(both).features
        maps = net.attr_maps_from_features(both, features)
    grid = (x.shape[-2] // net.clip_pass.patch_size, x.shape[-1] // net.clip_pass.patch_size)
    return merge_flipped_attr_maps(maps, batch, grid)


@dataclass
class FreeMaps:
    """One image's training-free result: ``mask`` H x W uint8 class ids (what :func:`training_free_mask`
    returns); ``maps`` C x H x W float32 (CPU): the labelled classes' attention-refined maps, each min-max
    normalised and resized to the image (the maps the background step and PAR start from,
    :func:`~weakclip.methods.excel.labels.resize_refined_maps`); ``classes`` their foreground indices
    (0-based, int64; class id ``index + 1``)."""

    mask: np.ndarray
    maps: torch.Tensor
    classes: torch.Tensor


def training_free_maps(net, image: np.ndarray | torch.Tensor, cls_label: Sequence[float] | torch.Tensor,
                       settings: FreeSettings = FreeSettings(), *, par=None, calibrated: bool = False,
                       ) -> FreeMaps:
    """:func:`training_free_mask` with the class maps it was made from (:class:`FreeMaps`); the mask is the
    same array, computed the same way."""
    from weakclip.methods.excel.augment import normalize_image
    from weakclip.methods.excel.labels import denormalize_image, refine_with_attention, refine_with_background
    from weakclip.methods.excel.par import PAR

    device = next(net.decoder.parameters()).device
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"training-free masks take H x W x 3 RGB images, got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(normalize_image(image).transpose(2, 0, 1)))[None]
    else:
        x = image if image.dim() == 4 else image.unsqueeze(0)
    if x.shape[0] != 1:
        raise WeakclipError(f"training-free masks are made one image at a time, got a batch of {x.shape[0]}")
    height, width = x.shape[-2:]
    labels = torch.as_tensor(np.asarray(cls_label, dtype=np.float32) if not torch.is_tensor(cls_label)
                             else cls_label).to(device).reshape(-1)
    if labels.numel() != net.n_foreground:
        raise DataError(f"the class label has {labels.numel()} entries, the network {net.n_foreground} "
                        "foreground classes")
    if not bool((labels != 0).any()):
        raise DataError("an image without any class label has no training-free mask (the release fails there "
                        "too)")
    par = par if par is not None else PAR(settings.par_dilations, settings.par_iters).to(device)
    was_training = net.training
    net.eval()
    try:
        x = F.interpolate(x.to(device).float(), size=[settings.size, settings.size], mode="bilinear",
                          align_corners=False)
        with torch.no_grad():
            out = net(x)
            maps = _calibrated_maps(net, x) if calibrated else out.attr_maps
            predicted = out.affinity[0].unsqueeze(0) if calibrated else None
            grid = (x.shape[-2] // net.clip_pass.patch_size, x.shape[-1] // net.clip_pass.patch_size)
            refined, classes = refine_with_attention(maps[0], out.attn[:, 0], labels, grid, settings.caa_thre,
                                                     settings.attn_layers, predicted)
            par_input = x[0] if settings.par_image == "normalized" else denormalize_image(x)[0]
            mask, cams = refine_with_background(refined, par_input, classes, par, (int(height), int(width)))
    finally:
        net.train(was_training)
    return FreeMaps(mask[0].to(torch.uint8).cpu().numpy(), cams[1:].float().cpu(), classes)


def training_free_mask(net, image: np.ndarray | torch.Tensor, cls_label: Sequence[float] | torch.Tensor,
                       settings: FreeSettings = FreeSettings(), *, par=None, calibrated: bool = False,
                       ) -> np.ndarray:
    """One image's pseudo mask (module docstring): ``image`` H x W x 3 uint8 RGB (normalised here as the
    release's dataset does) or a normalised 1 x 3 x H x W / 3 x H x W float tensor; ``cls_label`` the
    foreground classes' multi-hot (the release's 20 numbers for VOC; the background entry left out).
    Returns H x W uint8 class ids (0 background). ``par``: a :class:`~weakclip.methods.excel.par.PAR` to reuse
    (built from ``settings`` when None). :func:`training_free_maps` also gives the class maps."""
    return training_free_maps(net, image, cls_label, settings, par=par, calibrated=calibrated).mask
