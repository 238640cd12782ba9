"""The ``exact`` backend: dense-CRF mean-field with exact N x N kernels in PyTorch (the reference).

:func:`dense_crf_torch` runs batched mean-field with *exact* Gaussian and bilateral kernels over all
pixel pairs, on the tensors' device. Memory and time are O((h w)^2) per image: fit for small maps
(64x64: N = 4096) and for the tests, where it is the reference for the lattice backends.

It reproduces pydensecrf's semantics (``DenseCRF2D`` with ``addPairwiseGaussian`` /
``addPairwiseBilateral`` defaults: ``DIAG_KERNEL``, ``NORMALIZE_SYMMETRIC``):

* features: Gaussian ``(x/sxy, y/sxy)``; bilateral ``(x/sxy, y/sxy, r/srgb, g/srgb, b/srgb)``, with
  x the column and y the row index; kernel ``k(i, j) = exp(-|f_i - f_j|^2 / 2)``;
* the filter includes the pixel itself (``k(i, i) = 1``), as the lattice's splat/blur/slice does;
* symmetric normalisation: ``D^-1/2 K D^-1/2`` with ``D = diag(K 1)`` (self included);
* Potts compatibility applied as pydensecrf does (``-w Q``), i.e. each iteration
  ``Q <- softmax(-U + sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q)`` (equal, after the softmax, to penalising
  the other labels by ``w``), starting from ``Q = softmax(-U)``;
* unary ``U = -log(clip(p, 1e-5, 1))`` like ``pydensecrf.utils.unary_from_softmax``.

Only the lattice's approximation error separates it from pydensecrf2 (see ``tests/test_crf.py``).
"""

from __future__ import annotations

import torch

from weakclip.crf.params import TRAIN_CRF, UNARY_CLIP, DenseCRFParams

__all__ = ["dense_crf_torch"]

# Largest squared feature norm (after centring) for which the kernel exponent is expanded as a
# matmul (fp32 cancellation: <= ~3e-4 absolute on the exponent); beyond it, exact differences.
# 2048 keeps TRAIN_CRF (srgb=13: |f|^2 <= 3 * (255/13)^2 ~ 1154) on the fast path.
_EXPANSION_LIMIT = 2048.0


def _pixel_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (y) and column (x) index of each pixel in row-major order, float32, shape (h*w,)."""
    ys = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    xs = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return ys, xs


def _normalised_kernels(
    features: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * D^-1/2 K D^-1/2`` for K = exp(-|f_i - f_j|^2 / 2), B x N x N from features B x N x F.

    Fast path: the exponent f_i.f_j - |f_i|^2/2 - |f_j|^2/2 is one batched matmul of augmented
    features [f_i, -|f_i|^2/2, 1] . [f_j, 1, -|f_j|^2/2], written straight into ``out``. Its fp32
    rounding error grows with |f|^2, so features are centred first, and when some |f|^2 still
    exceeds ``_EXPANSION_LIMIT`` (small srgb: the VOC / COCO presets) the exponent is computed
    from exact differences instead (``cdist`` without the matmul trick; ~2x slower on CPU).
    """
    features = features - features.mean(dim=1, keepdim=True)
    sq_norm = features.square().sum(-1, keepdim=True)
    if float(sq_norm.max()) <= _EXPANSION_LIMIT:
        half_sq = -0.5 * sq_norm
        ones = torch.ones_like(half_sq)
        left = torch.cat([features, half_sq, ones], dim=-1)
        right = torch.cat([features, ones, half_sq], dim=-1).transpose(1, 2)
        k = torch.bmm(left, right, out=out) if out is not None else torch.bmm(left, right)
        k.clamp_max_(0.0)
    else:
        k = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
        k.square_().mul_(-0.5)
    k.exp_()
    inv_sqrt = (k.sum(-1) + 1e-20).rsqrt_()
    return k.mul_((inv_sqrt * scale).unsqueeze(-1)).mul_(inv_sqrt.unsqueeze(-2))


@torch.no_grad()
def dense_crf_torch(
    probs: torch.Tensor,
    images: torch.Tensor,
    params: DenseCRFParams = TRAIN_CRF,
    *,
    max_kernel_elements: int = 1 << 26,
    unary_clip: float = UNARY_CLIP,
) -> torch.Tensor:
    """Mean-field dense CRF with exact kernels; returns marginals B x K x h x w (fp32, sum to 1).

    Args:
        probs: class probabilities B x K x h x w (any float dtype); unary = -log(clip(p, unary_clip)).
        images: RGB images B x 3 x h x w, float in 0..255, at the same resolution as ``probs``.
        params: kernel parameters and the iteration count.
        max_kernel_elements: images are processed in chunks whose N x N kernels hold at most this
            many elements in total (at least one image a chunk), to bound memory (2**26 fp32 =
            256 MiB: 4 images of 64x64).
        unary_clip: probability floor of the unary (1e-5, pydensecrf's ``unary_from_softmax``).

    Memory and time are O(B * (h*w)^2): meant for small maps (64x64 in the boundary loss).
    The kernel of each image is built once and reused over the iterations. Runs without autograd
    and in fp32 even under autocast.
    """
    if probs.dim() != 4 or images.dim() != 4:
        raise ValueError(
            f"expected probs B×K×h×w and images B×3×h×w, got {tuple(probs.shape)} and {tuple(images.shape)}"
        )
    b, k, h, w = probs.shape
    if images.shape[0] != b or images.shape[1] != 3 or images.shape[2:] != probs.shape[2:]:
        raise ValueError(f"images {tuple(images.shape)} do not match probs {tuple(probs.shape)}")
    device = probs.device
    n = h * w
    with torch.autocast(device_type=device.type, enabled=False):
        log_p = probs.detach().float().clamp(unary_clip, 1.0).log().reshape(b, k, n)
        q = torch.softmax(log_p, dim=1)  # Q0 = softmax(-U), as pydensecrf starts inference
        if params.iterations == 0 or b == 0:
            return q.reshape(b, k, h, w)

        rgb = images.detach().to(device=device, dtype=torch.float32).reshape(b, 3, n)
        ys, xs = _pixel_grid(h, w, device)
        position = torch.stack([xs, ys], dim=-1)  # N x 2, (x, y) as pydensecrf
        gauss = _normalised_kernels((position / params.gaussian_sxy)[None], params.gaussian_compat)[0]
        position = position / params.bilateral_sxy

        chunk = min(b, max(1, max_kernel_elements // (n * n)))
        buffer = torch.empty(chunk, n, n, device=device, dtype=torch.float32)
        out = torch.empty_like(q)
        for start in range(0, b, chunk):
            sl = slice(start, min(b, start + chunk))
            colour = rgb[sl].transpose(1, 2) / params.bilateral_srgb
            feats = torch.cat([position.expand(colour.shape[0], n, 2), colour], dim=-1)
            # Message matrix W = w_g Ng + w_b Nb (symmetric), built once per image, reused below.
            msg = _normalised_kernels(feats, params.bilateral_compat, out=buffer[: colour.shape[0]])
            msg.add_(gauss)
            unary_logit = log_p[sl]
            qc = q[sl]
            for _ in range(params.iterations):
                # (K x N) @ (N x N): W is symmetric, so Q W == (W Q^T)^T.
                qc = torch.softmax(unary_logit + torch.bmm(qc, msg), dim=1)
            out[sl] = qc
        del buffer
        return out.reshape(b, k, h, w)
