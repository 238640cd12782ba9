"""ExCEL's losses: balanced segmentation cross-entropy and the affinity loss (the release's model/losses.py),
combined as its training loop combines them.

Edge cases, as the release computes them (no NaN from the targets alone):
  * segmentation, no background (or no foreground) pixel: that half is ``0 / (0 + 1e-6) = 0``, so the loss is
    half the other half's mean; all pixels ignored: 0 (with a zero gradient);
  * affinity, no positive (or no negative) pair: the counts are ``count + 1``, so that half is 0;
  * NaN only from NaN or infinite logits / predictions.
Both losses sum in float32; the counts are exact integers, ``+ 1e-6`` is added in float32 (so it vanishes
beside a count of 32 or more; the release's quirk, kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RELEASE_AFF_WEIGHT", "RELEASE_SEG_WEIGHT", "affinity_loss", "excel_loss", "segmentation_loss"]

#: scripts/train_voc.py: ``loss = 1.0 * seg_loss + args.w_diver * diver_loss`` with ``w_diver = 0.1``; its
#: ``--w_seg`` argument is never read (the 1.0 is written in the loop).
RELEASE_SEG_WEIGHT = 1.0
RELEASE_AFF_WEIGHT = 0.1


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``get_seg_loss``: [B, K, H, W] logits, [B, H, W] labels (0 = background). The mean cross-entropy over
    the background pixels and the mean over the foreground pixels, averaged; each mean is ``sum / (count +
    1e-6)``; ``ignore_index`` pixels count in neither."""
    background = labels.clone()
    background[labels != 0] = ignore_index
    foreground = labels.clone()
    foreground[labels == 0] = ignore_index
    halves = []
    for target in (background, foreground):
        count = (target != ignore_index).long().sum()
        ce = F.cross_entropy(logits, target.type(torch.long), ignore_index=ignore_index, reduction="none")
        halves.append(ce.sum() / (count + 1e-6))
    return (halves[0] + halves[1]) * 0.5


def affinity_loss(pred: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``get_aff_loss``: predicted affinities (in [0, 1]) against targets of 1 (same label), 0 (different) or
    anything else (ignored): ``0.5 * sum_pos(1 - p) / (n_pos + 1) + 0.5 * sum_neg(p) / (n_neg + 1)``. Returns
    (the loss, ``n_pos + 1``, ``n_neg + 1``) as the release does."""
    positive = (targets == 1).type(torch.int16)
    negative = (targets == 0).type(torch.int16)
    pos_count = positive.sum() + 1
    neg_count = negative.sum() + 1
    pos_loss = torch.sum(positive * (1 - pred)) / pos_count
    neg_loss = torch.sum(negative * pred) / neg_count
    return 0.5 * pos_loss + 0.5 * neg_loss, pos_count, neg_count


def excel_loss(seg_logits: torch.Tensor, pseudo_labels: torch.Tensor, attn_pred: torch.Tensor,
               affinity_targets: torch.Tensor, aff_weight: float = RELEASE_AFF_WEIGHT,
               seg_weight: float = RELEASE_SEG_WEIGHT, ignore_index: int = 255,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training step's loss as the release's loop makes it: the decoder's logits upsampled (bilinear,
    ``align_corners=False``) to the pseudo labels' size, :func:`segmentation_loss`, plus ``aff_weight`` x
    :func:`affinity_loss` of the predicted affinity. Returns (total, segmentation, affinity)."""
    upsampled = F.interpolate(seg_logits, size=pseudo_labels.shape[1:], mode="bilinear", align_corners=False)
    seg = segmentation_loss(upsampled, pseudo_labels.type(torch.long), ignore_index=ignore_index)
    aff, _, _ = affinity_loss(attn_pred, affinity_targets)
    return seg_weight * seg + aff_weight * aff, seg, aff
