"""The ``lattice`` backend: dense-CRF mean-field with a permutohedral-lattice filter in PyTorch.

The Gaussian filter ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` over N points with d-dimensional
features is approximated as in Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the
Permutohedral Lattice" (2010), with the conventions of Krähenbühl & Koltun's dense-CRF code that
pydensecrf2 wraps, so that both give nearly the same marginals:

* each feature vector is scaled per axis by ``sqrt(2/3) (d+1) / sqrt((i+1)(i+2))`` and embedded
  ("elevated") in the hyperplane ``sum = 0`` of R^(d+1);
* the enclosing simplex is found by rounding to the nearest multiple of d+1 (round half to even)
  and ranking the residuals; its d+1 vertices and the barycentric weights give the *splat*;
* the lattice points that receive any weight are made unique (here: keys packed into one int64
  per point, ``torch.unique``; points of different images get disjoint keys, so one lattice serves
  a whole batch);
* *blur*: along each of the d+1 lattice directions in turn, ``v <- v + (v[n-] + v[n+]) / 2``,
  a missing neighbour counting as zero;
* *slice*: the barycentric interpolation of the blurred values, times ``1 / (1 + 2^-d)``.

The lattice is built once per feature set and reused for the normalisation and every mean-field
iteration. Everything is tensor code: it runs on the features' device (CPU or CUDA), batched,
without a compiled extension.
"""

from __future__ import annotations

import math

import torch

from weakclip.crf.params import TRAIN_CRF, UNARY_CLIP, DenseCRFParams
from weakclip.errors import WeakclipError

__all__ = ["PermutohedralLattice", "dense_crf_lattice"]

# Packed lattice keys must fit a signed int64 with room to spare.
_KEY_BITS = 62


class PermutohedralLattice:
    """Splat / blur / slice operator for B point sets of N points each (features B x N x d).

    :meth:`filter` maps values (B*N) x C (rows in the order of the flattened features) to the
    approximate Gaussian filter of each point set separately.
    """

    def __init__(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.shape[-1] < 1:
            raise ValueError(f"expected features B×N×d, got {tuple(features.shape)}")
        b, n, d = features.shape
        device = features.device
        self.num_points, self.dim = b * n, d
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        dp1 = d + 1

        # Elevate: y = E f, with E's diagonal scaling (Adams et al., p. 5).
        inv_std = math.sqrt(2.0 / 3.0) * dp1
        scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)],
                             device=device, dtype=torch.float32)
        cf = features.reshape(b * n, d).float() * scale
        tail = torch.zeros(b * n, dp1, device=device, dtype=torch.float32)
        tail[:, :d] = cf.flip(-1).cumsum(-1).flip(-1)  # tail[j] = sum_{i >= j} cf[i]
        elevated = tail
        elevated[:, 1:] -= torch.arange(1, dp1, device=device, dtype=torch.float32) * cf

        # Nearest 0-coloured lattice point, then the rank of each residual (ties: later index first).
        rounded = torch.round(elevated / dp1)
        rem0 = rounded * dp1
        total = rounded.sum(-1, keepdim=True).long()
        resid = elevated - rem0
        ri, rj = resid[:, :, None], resid[:, None, :]
        idx = torch.arange(dp1, device=device)
        later, earlier = idx[None, :] > idx[:, None], idx[None, :] < idx[:, None]  # [i, j]: j > i, j < i
        rank = ((rj > ri) & later).sum(-1) + ((rj >= ri) & earlier).sum(-1)
        # Bring the point back onto the plane when the rounded coordinates do not sum to zero.
        rank = rank + total
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + dp1, torch.where(high, rank - dp1, rank))
        rem0 = torch.where(low, rem0 + dp1, torch.where(high, rem0 - dp1, rem0))

        # Barycentric weights of the d+1 simplex vertices (Adams et al., p. 10).
        v = (elevated - rem0) / dp1
        bary = torch.zeros(b * n, d + 2, device=device, dtype=torch.float32)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, :dp1].contiguous()  # (B*N) x (d+1)

        # Vertex keys: key_r[i] = rem0[i] + canonical[r][rank[i]] for i < d (the last coordinate is
        # implied by sum = 0). Packed into one int64 per vertex with each axis shifted to >= 0 and
        # padded by 2d+1 so that the blur's neighbours (+-1 on all axes, -+d on one) never alias.
        rem0_i = rem0[:, :d].long()
        lo = rem0_i.amin(0) - (2 * d + 1)
        span = rem0_i.amax(0) - lo + (2 * d + 2)
        spans = [int(s) for s in span.tolist()] + [b]
        if sum(math.log2(max(s, 1)) for s in spans) > _KEY_BITS:
            raise WeakclipError(
                f"permutohedral lattice keys overflow int64 (feature spans {spans[:-1]}, batch {b}): "
                "split the batch or use larger kernel widths"
            )
        strides, acc = [], 1
        for s in spans:
            strides.append(acc)
            acc *= s
        axis_strides = torch.tensor(strides[:d], device=device, dtype=torch.long)
        image_index = torch.arange(b, device=device, dtype=torch.long).repeat_interleave(n)
        base = ((rem0_i - lo) * axis_strides).sum(-1) + image_index * strides[d]
        canonical = torch.tensor(
            [[r if j <= d - r else r - dp1 for j in range(dp1)] for r in range(dp1)],
            device=device, dtype=torch.long,
        )
        rank_i = rank[:, :d]
        codes = torch.stack(
            [base + (canonical[r][rank_i] * axis_strides).sum(-1) for r in range(dp1)], dim=1
        )
        keys, inverse = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
        self.num_vertices = m = keys.numel()
        self.offsets = inverse.reshape(b * n, dp1)

        # Blur neighbours along each lattice direction; index m is an always-zero row.
        all_axes = int(axis_strides.sum())
        neighbours = []
        for j in range(dp1):
            delta = -all_axes + (dp1 * strides[j] if j < d else 0)
            pair = []
            for q in (keys + delta, keys - delta):
                pos = torch.searchsorted(keys, q).clamp_max_(m - 1)
                found = keys[pos] == q
                pair.append(torch.cat([torch.where(found, pos, m), pos.new_full((1,), m)]))
            neighbours.append(pair)
        self.neighbours = neighbours

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Approximate Gaussian filter of ``values`` (B*N) x C (fp32), including each point itself."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"expected values {self.num_points}×C, got {tuple(values.shape)}")
        c = values.shape[1]
        lattice = values.new_zeros(self.num_vertices + 1, c)
        for r in range(self.dim + 1):
            lattice.index_add_(0, self.offsets[:, r], values * self.weights[:, r, None])
        for n_minus, n_plus in self.neighbours:
            lattice = lattice + 0.5 * (lattice[n_minus] + lattice[n_plus])
        out = lattice[self.offsets[:, 0]] * self.weights[:, 0, None]
        for r in range(1, self.dim + 1):
            out.addcmul_(lattice[self.offsets[:, r]], self.weights[:, r, None])
        return out.mul_(self.alpha)


def _symmetric_norm(lattice: PermutohedralLattice, device: torch.device) -> torch.Tensor:
    """``1 / sqrt(K 1)`` per point (pydensecrf's NORMALIZE_SYMMETRIC), shape (points, 1)."""
    ones = torch.ones(lattice.num_points, 1, device=device)
    return (lattice.filter(ones) + 1e-20).rsqrt_()


@torch.no_grad()
def dense_crf_lattice(
    probs: torch.Tensor,
    images: torch.Tensor,
    params: DenseCRFParams = TRAIN_CRF,
    *,
    unary_clip: float = UNARY_CLIP,
) -> torch.Tensor:
    """Mean-field dense CRF with permutohedral-lattice kernels; marginals B x K x h x w (fp32).

    Same model and arguments as :func:`weakclip.crf.exact.dense_crf_torch` (Potts, symmetric
    normalisation, Gaussian ``(x, y)/sxy`` and bilateral ``((x, y)/sxy, rgb/srgb)`` kernels,
    ``Q0 = softmax(-U)``), with the lattice approximation of the kernels that pydensecrf2 uses.
    Memory and time are O(B * h * w * K): fit for full-resolution images, batched, on any device.
    """
    b, k, h, w = probs.shape
    device = probs.device
    n = h * w
    with torch.autocast(device_type=device.type, enabled=False):
        log_p = probs.detach().float().clamp(unary_clip, 1.0).log().permute(0, 2, 3, 1).reshape(b * n, k)
        q = torch.softmax(log_p, dim=1)
        if params.iterations == 0 or b == 0:
            return q.reshape(b, h, w, k).permute(0, 3, 1, 2).contiguous()

        ys = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
        xs = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        position = torch.stack([xs, ys], dim=-1)  # (x, y) as pydensecrf: column first
        # The Gaussian kernel depends on positions only: one lattice for the whole batch, whose
        # images become extra value channels.
        gauss = PermutohedralLattice((position / params.gaussian_sxy)[None])
        rgb = images.detach().to(device=device, dtype=torch.float32).reshape(b, 3, n).transpose(1, 2)
        bilateral = PermutohedralLattice(torch.cat(
            [(position / params.bilateral_sxy).expand(b, n, 2), rgb / params.bilateral_srgb], dim=-1
        ))
        norm_g = _symmetric_norm(gauss, device)  # n x 1
        norm_b = _symmetric_norm(bilateral, device)  # (b*n) x 1
        scale_g = (norm_g * params.gaussian_compat).repeat(b, 1)
        scale_b = norm_b * params.bilateral_compat

        for _ in range(params.iterations):
            # Gaussian: values n x (b*k), one column per image and class.
            qg = (q.reshape(b, n, k) * norm_g).transpose(0, 1).reshape(n, b * k)
            msg_g = gauss.filter(qg).reshape(n, b, k).transpose(0, 1).reshape(b * n, k)
            msg = bilateral.filter(q * norm_b).mul_(scale_b)
            msg.addcmul_(msg_g, scale_g)
            q = torch.softmax(log_p + msg, dim=1)
        return q.reshape(b, h, w, k).permute(0, 3, 1, 2).contiguous()
