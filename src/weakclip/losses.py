"""WeakCLIP training losses: balanced seeding + CRF boundary on the decode head, identity CE.

Spec "Losses": the decode-head logits are resized to 64x64 where the seeding loss (balanced
background / foreground cross-entropy on the seed pixels) and the boundary loss (KL-like
constraint towards the dense-CRF refinement of the prediction) are computed; the identity head's
score map is trained with cross-entropy on the seeds. Total = seeding + boundary + 0.4 * identity.

Seed labels are class ids in [0, K) with 0 = background; 255 (and any other value outside
[0, K)) means "unsure" and contributes to no loss. All computations run in fp32, also under
autocast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.crf import TRAIN_CRF, DenseCRFParams, dense_crf, dense_crf_numpy

__all__ = [
    "BOUNDARY_CRF_MODES",
    "IDENTITY_MEANS",
    "WeakCLIPLoss",
    "boundary_loss",
    "release_crf_image",
    "identity_loss",
    "resize_seeds",
    "seed_one_hot",
    "seeding_loss",
    "softmax_probs",
]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def softmax_probs(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """softmax over dim 1 (fp32), plus ``eps``, renormalised (spec: probs = softmax + 1e-7)."""
    p = torch.softmax(logits.float(), dim=1) + eps
    return p / p.sum(dim=1, keepdim=True)


def resize_seeds(seeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of B x H x W integer seeds to ``size`` (PyTorch 'nearest')."""
    if tuple(seeds.shape[-2:]) == tuple(size):
        return seeds.long()
    # float32 holds the label values 0..255 exactly.
    out = F.interpolate(seeds[:, None].float(), size=size, mode="nearest")
    return out[:, 0].round().long()


def seed_one_hot(seeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x H x W labels -> B x K x H x W float one-hot; unsure / out-of-range pixels are all zero."""
    valid = (seeds >= 0) & (seeds < num_classes)
    labels = torch.where(valid, seeds, torch.zeros_like(seeds))
    onehot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return onehot * valid[:, None].float()


def seeding_loss(probs: torch.Tensor, seeds_onehot: torch.Tensor) -> torch.Tensor:
    """Balanced seeding loss, averaged over the batch.

    Per image: ``-(sum_{bg seeds} log p_0) / n_bg - (sum_{fg seeds} log p_c) / n_fg``, where a term
    whose count is 0 contributes 0. ``probs`` B x K x h x w (already eps-smoothed), ``seeds_onehot``
    B x K x h x w (class 0 = background; unsure pixels all zero).
    """
    log_p = probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    onehot = seeds_onehot.float()
    picked = (onehot * log_p).sum(dim=(2, 3))  # B x K: sum of log p_c over the seeds of class c
    counts = onehot.sum(dim=(2, 3))  # B x K
    bg_sum, bg_count = picked[:, 0], counts[:, 0]
    fg_sum, fg_count = picked[:, 1:].sum(1), counts[:, 1:].sum(1)
    bg = -bg_sum / bg_count.clamp_min(1.0)
    fg = -fg_sum / fg_count.clamp_min(1.0)
    return (bg + fg).mean()


def boundary_loss(
    probs: torch.Tensor, q: torch.Tensor, ratio_clip: tuple[float, float] = (0.05, 20.0)
) -> torch.Tensor:
    """``mean over pixels of sum_c q * log(clip(q / p, lo, hi))``; ``q`` is treated as a constant.

    ``probs`` and ``q`` are B x K x h x w distributions (q: the clamped, renormalised CRF output).
    """
    q = q.detach().float()
    ratio = (q / probs.float()).clamp(ratio_clip[0], ratio_clip[1])
    return (q * ratio.log()).sum(dim=1).mean()


BOUNDARY_CRF_MODES = ("release", "fast")
IDENTITY_MEANS = ("all", "valid")


def identity_loss(score_logits: torch.Tensor, seeds: torch.Tensor, ignore_index: int = 255,
                  mean_over: str = "all") -> torch.Tensor:
    """Cross-entropy of ``score_logits`` (B x K x h' x w', bilinearly upsampled to the seeds' size)
    against ``seeds`` (B x H x W); unsure pixels (``ignore_index`` or outside [0, K)) get no loss.

    ``mean_over="valid"`` averages over the valid pixels (returns 0, with a gradient path, when there is
    none); ``"all"`` averages over ALL pixels, unsure ones included as zeros, as mmseg <= 0.22's
    cross-entropy (the release) does: the effective weight is then scaled by the valid-pixel fraction."""
    if mean_over not in IDENTITY_MEANS:
        raise ValueError(f"mean_over must be one of {IDENTITY_MEANS}, got {mean_over!r}")
    logits = score_logits.float()
    size = tuple(seeds.shape[-2:])
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    num_classes = logits.shape[1]
    seeds = seeds.long()
    valid = (seeds >= 0) & (seeds < num_classes) & (seeds != ignore_index)
    target = torch.where(valid, seeds, torch.full_like(seeds, ignore_index))
    if mean_over == "all":
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").mean()
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def _channel_values(values) -> np.ndarray:
    """Per-channel constants (a sequence or a tensor of 3 values) as float32 1 x 1 x 1 x 3."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, np.float32).reshape(1, 1, 1, 3)


def release_crf_image(images: torch.Tensor, size: tuple[int, int], mean=None, std=None) -> np.ndarray:
    """The image the release's boundary loss gives its CRF: B x h x w x 3 uint8.

    ``scipy.ndimage.zoom`` (order 1: corner-aligned bilinear) of the batch to ``size``, then, when ``mean``
    and ``std`` are given (``images`` is then the normalised network input, as in the release), the
    normalisation undone, then a plain cast to uint8 (truncation). Without them ``images`` is taken as RGB
    0..255 already."""
    from scipy.ndimage import zoom

    arr = images.detach().float().cpu().numpy()
    h, w = arr.shape[-2:]
    small = zoom(arr, (1.0, 1.0, size[0] / h, size[1] / w), order=1)
    small = np.transpose(small, (0, 2, 3, 1))
    if mean is not None and std is not None:
        small = small * _channel_values(std)
        small = small + _channel_values(mean)
    return np.ascontiguousarray(small, dtype=np.uint8)


class WeakCLIPLoss(nn.Module):
    """Seeding + boundary (decode head, at ``loss_size``) + ``identity_weight`` * identity CE.

    Args:
        loss_size: side of the square map the decode-head losses are computed at (64).
        identity_weight: weight of the identity-head cross-entropy (0.4).
        crf_params: dense-CRF parameters of the boundary loss (``TRAIN_CRF``).
        ignore_index: "unsure" seed label (255).
        eps: added to the softmax before renormalising (1e-7).
        q_clamp: floor of the CRF marginals before renormalising (1e-4).
        ratio_clip: clip range of q / p inside the boundary loss's log ((0.05, 20)).
        boundary_crf: how the CRF target q is made. ``"release"``: as the release, the image is resized with
            ``scipy.ndimage.zoom`` (corner-aligned) and cast to uint8 (:func:`release_crf_image`), the
            probabilities are floored at ``q_clamp`` before the CRF, and pydensecrf's lattice CRF runs per
            image on the CPU. ``"fast"``: half-pixel bilinear float image, :func:`~weakclip.crf.dense_crf` on
            the tensors' device (batched lattice on a GPU; unary floor 1e-5).
        identity_mean: ``"all"`` (the release: mmseg's CE averages over all pixels, unsure ones included) or
            ``"valid"`` (over the valid seed pixels); see :func:`identity_loss`.
    """

    def __init__(
        self,
        loss_size: int = 64,
        identity_weight: float = 0.4,
        crf_params: DenseCRFParams = TRAIN_CRF,
        ignore_index: int = 255,
        eps: float = 1e-7,
        q_clamp: float = 1e-4,
        ratio_clip: tuple[float, float] = (0.05, 20.0),
        boundary_crf: str = "release",
        identity_mean: str = "all",
    ) -> None:
        super().__init__()
        if boundary_crf not in BOUNDARY_CRF_MODES:
            raise ValueError(f"boundary_crf must be one of {BOUNDARY_CRF_MODES}, got {boundary_crf!r}")
        if identity_mean not in IDENTITY_MEANS:
            raise ValueError(f"identity_mean must be one of {IDENTITY_MEANS}, got {identity_mean!r}")
        self.loss_size = int(loss_size)
        self.identity_weight = float(identity_weight)
        self.crf_params = crf_params
        self.ignore_index = int(ignore_index)
        self.eps = float(eps)
        self.q_clamp = float(q_clamp)
        self.ratio_clip = (float(ratio_clip[0]), float(ratio_clip[1]))
        self.boundary_crf = boundary_crf
        self.identity_mean = identity_mean

    @torch.no_grad()
    def crf_target(self, probs: torch.Tensor, images_small: torch.Tensor) -> torch.Tensor:
        """q of the ``"fast"`` mode: :func:`~weakclip.crf.dense_crf` (auto backend: our lattice on a GPU,
        pydensecrf2 on the CPU) of ``probs`` on the (already resized, float RGB) images, clamped at
        ``q_clamp`` and renormalised."""
        q = dense_crf(probs.detach(), images_small, self.crf_params).clamp_min(self.q_clamp)
        return q / q.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def crf_target_release(self, probs: torch.Tensor, images_uint8: np.ndarray) -> torch.Tensor:
        """q of the ``"release"`` mode: ``probs`` floored at ``q_clamp`` (not renormalised), pydensecrf per
        image on ``images_uint8`` (B x h x w x 3, :func:`release_crf_image`), floored at ``q_clamp`` again and
        renormalised; on the device of ``probs``, float32."""
        p = probs.detach().float().clamp_min(self.q_clamp).cpu().numpy()
        q = np.stack([dense_crf_numpy(images_uint8[b], p[b], self.crf_params) for b in range(p.shape[0])])
        q = np.maximum(q.astype(np.float64), self.q_clamp)
        q = q / q.sum(axis=1, keepdims=True)
        return torch.from_numpy(q).float().to(probs.device)

    def forward(
        self,
        logits: torch.Tensor,
        score_logits: torch.Tensor,
        seeds: torch.Tensor,
        images_rgb: torch.Tensor,
        *,
        images_norm: torch.Tensor | None = None,
        mean=None,
        std=None,
    ) -> dict[str, torch.Tensor]:
        """Args: decode-head ``logits`` B x K x h x w, identity ``score_logits`` B x K x h' x w',
        ``seeds`` B x H x W int (255 unsure), ``images_rgb`` B x 3 x H x W float RGB 0..255
        (un-normalised). ``images_norm`` with its ``mean`` and ``std`` (per channel, 0..255 units): the
        normalised network input, which the ``"release"`` CRF resizes before undoing the normalisation, as
        the release does (otherwise it resizes ``images_rgb``). Returns scalar tensors ``loss``,
        ``seeding``, ``boundary``, ``identity``."""
        size = (self.loss_size, self.loss_size)
        with _no_autocast(logits.device):
            small = logits.float()
            if tuple(small.shape[-2:]) != size:
                small = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
            probs = softmax_probs(small, self.eps)
            seeds_small = resize_seeds(seeds, size)
            seeding = seeding_loss(probs, seed_one_hot(seeds_small, probs.shape[1]))

            if self.boundary_crf == "release":
                if images_norm is not None and mean is not None and std is not None:
                    image_u8 = release_crf_image(images_norm, size, mean, std)
                else:
                    image_u8 = release_crf_image(images_rgb, size)
                q = self.crf_target_release(probs, image_u8)
            else:
                images_small = images_rgb.detach().float()
                if tuple(images_small.shape[-2:]) != size:
                    images_small = F.interpolate(images_small, size=size, mode="bilinear",
                                                 align_corners=False)
                q = self.crf_target(probs, images_small)
            boundary = boundary_loss(probs, q, self.ratio_clip)

            identity = identity_loss(score_logits, seeds, self.ignore_index, self.identity_mean)
            loss = seeding + boundary + self.identity_weight * identity
        return {"loss": loss, "seeding": seeding, "boundary": boundary, "identity": identity}
