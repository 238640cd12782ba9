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
  per point and one stable sort, instead of a hash table; points of different images get disjoint
  keys, so one lattice serves a whole batch); splat and slice are then CSR sparse matrices;
* *blur*: along each of the d+1 lattice directions in turn, ``v <- v + (v[n-] + v[n+]) / 2``,
  a missing neighbour counting as zero;
* *slice*: the barycentric interpolation of the blurred values, times ``1 / (1 + 2^-d)``.

The lattice is built once per feature set and reused for the normalisation and every mean-field
iteration. Everything is tensor code: it runs on the features' device (CPU or CUDA), batched,
without a compiled extension.
"""

from __future__ import annotations

import math
import warnings

import torch

from weakclip.crf.params import TRAIN_CRF, UNARY_CLIP, DenseCRFParams
from weakclip.errors import WeakclipError

__all__ = ["PermutohedralLattice", "dense_crf_lattice"]

# Packed lattice keys must fit a signed int64 with room to spare.
_KEY_BITS = 62


class PermutohedralLattice:
    """Splat / blur / slice operator over P points with d-dimensional features, in independent groups.

    Args:
        features: P x d, or B x N x d (B groups of N points, flattened in that order).
        groups: P group ids in 0..G-1 (P x d features only); points of different groups never
            interact (one lattice for a batch of images). Default: one group, or B for B x N x d.

    :meth:`filter` maps values P x C (rows in the order of the points) to the approximate Gaussian
    filter ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` within each group.
    """

    def __init__(self, features: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        device = features.device
        if features.dim() == 3 and groups is None:
            groups = torch.arange(features.shape[0], device=device).repeat_interleave(features.shape[1])
            features = features.reshape(-1, features.shape[-1])
        if features.dim() != 2 or features.shape[-1] < 1 or features.shape[0] < 1:
            raise ValueError(f"expected features P×d or B×N×d (P, d >= 1), got {tuple(features.shape)}")
        p, d = features.shape
        if groups is None:
            groups = torch.zeros(p, device=device, dtype=torch.long)
        if groups.shape != (p,):
            raise ValueError(f"expected {p} group ids, got shape {tuple(groups.shape)}")
        groups = groups.to(device=device, dtype=torch.long)
        b = int(groups.max()) + 1
        self.num_points, self.dim = p, d
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        dp1 = d + 1

        # Elevate: y = E f, with E's diagonal scaling (Adams et al., p. 5).
        inv_std = math.sqrt(2.0 / 3.0) * dp1
        scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)],
                             device=device, dtype=torch.float32)
        cf = features.float() * scale
        tail = torch.zeros(p, dp1, device=device, dtype=torch.float32)
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
        # The ranks of a point are a permutation of 0..d, so plain scatters (unique indices, no
        # atomics: deterministic on CUDA too) place +v at d - rank and -v at d - rank + 1.
        zeros = torch.zeros(p, d + 2, device=device, dtype=torch.float32)
        bary = zeros.scatter(1, d - rank, v) - zeros.scatter(1, d - rank + 1, v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        weights = bary[:, :dp1]  # P x (d+1)

        # Vertex keys: key_r[i] = rem0[i] + canonical[r][rank[i]] for i < d (the last coordinate is
        # implied by sum = 0). Packed into one int64 per vertex with each axis shifted to >= 0 and
        # padded by 2d+1 so that the blur's neighbours (+-1 on all axes, -+d on one) never alias.
        rem0_i = rem0[:, :d].long()
        lo = rem0_i.amin(0) - (2 * d + 1)
        span = rem0_i.amax(0) - lo + (2 * d + 2)
        spans = [int(s) for s in span.tolist()] + [b]
        if sum(math.log2(max(s, 1)) for s in spans) > _KEY_BITS:
            raise WeakclipError(
                f"permutohedral lattice keys overflow int64 (feature spans {spans[:-1]}, {b} groups): "
                "split the batch or use larger kernel widths"
            )
        strides, acc = [], 1
        for s in spans:
            strides.append(acc)
            acc *= s
        axis_strides = torch.tensor(strides[:d], device=device, dtype=torch.long)
        base = ((rem0_i - lo) * axis_strides).sum(-1) + groups * strides[d]
        canonical = torch.tensor(
            [[r if j <= d - r else r - dp1 for j in range(dp1)] for r in range(dp1)],
            device=device, dtype=torch.long,
        )
        rank_i = rank[:, :d]
        codes = torch.stack(
            [base + (canonical[r][rank_i] * axis_strides).sum(-1) for r in range(dp1)], dim=1
        )
        # Unique vertices by one stable sort: vertex ids follow the key order, and ``by_vertex``
        # lists the (point, remainder) entries vertex by vertex, points ascending (the splat's CSR).
        sorted_codes, by_vertex = codes.reshape(-1).sort(stable=True)
        is_new = torch.ones_like(sorted_codes, dtype=torch.bool)
        is_new[1:] = sorted_codes[1:] != sorted_codes[:-1]
        keys = sorted_codes[is_new]
        vertex_of_sorted = is_new.cumsum(0) - 1
        self.num_vertices = m = keys.numel()
        offsets = torch.empty_like(vertex_of_sorted).scatter_(0, by_vertex, vertex_of_sorted).reshape(p, dp1)
        # CSR row starts of the splat: where each vertex's run begins in the sorted entries (the
        # last row, vertex m, is the empty zero row).
        total = sorted_codes.new_full((2,), sorted_codes.numel())
        splat_rows = torch.cat([is_new.nonzero().flatten(), total])
        self._build_splat_and_slice(offsets, weights, m, by_vertex, splat_rows)

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

    def _build_splat_and_slice(self, offsets: torch.Tensor, weights: torch.Tensor, m: int,
                               by_vertex: torch.Tensor, splat_rows: torch.Tensor) -> None:
        """Splat (M+1) x P and slice P x (M+1) as CSR matrices (row M: the zero vertex).

        A sparse matrix product sums each output row without atomics: on CPU several times faster
        than ``index_add_`` over the d+1 vertices of each point.
        """
        device = offsets.device
        points, dp1 = offsets.shape
        flat_weights = weights.reshape(-1)
        offsets, order = offsets.sort(dim=1)  # sorted column indices in each row of the slice
        weights = weights.gather(1, order)
        flat = offsets.reshape(-1)
        # 32-bit indices when they fit (what the CPU and cuSPARSE kernels use without a copy).
        index = torch.int32 if points * dp1 < 2**31 - 1 else torch.int64
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            self._slice = torch.sparse_csr_tensor(
                torch.arange(0, points * dp1 + 1, dp1, device=device, dtype=index), flat.to(index),
                weights.reshape(-1) * self.alpha, size=(points, m + 1),
            )
            self._splat = torch.sparse_csr_tensor(
                splat_rows.to(index), (by_vertex // dp1).to(index), flat_weights[by_vertex],
                size=(m + 1, points),
            )

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Approximate Gaussian filter of ``values`` P x C (fp32), including each point itself."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"expected values {self.num_points}×C, got {tuple(values.shape)}")
        lattice = self._splat @ values.float()
        for n_minus, n_plus in self.neighbours:
            blurred = lattice.index_select(0, n_minus).add_(lattice.index_select(0, n_plus))
            lattice = blurred.mul_(0.5).add_(lattice)
        return self._slice @ lattice


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
        # Pixel-major layout: row i*b + j is pixel i of image j, so that the same tensor is a
        # (n*b) x k value matrix for the bilateral lattice and an n x (b*k) one for the Gaussian.
        log_p = probs.detach().float().clamp(unary_clip, 1.0).log().permute(2, 3, 0, 1).reshape(n * b, k)
        q = torch.softmax(log_p, dim=1)
        if params.iterations == 0 or b * n == 0:
            return q.reshape(h, w, b, k).permute(2, 3, 0, 1).contiguous()

        ys = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
        xs = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        position = torch.stack([xs, ys], dim=-1)  # (x, y) as pydensecrf: column first
        # The Gaussian kernel depends on positions only: one lattice for the whole batch, whose
        # images become extra value channels.
        gauss = PermutohedralLattice(position / params.gaussian_sxy)
        rgb = images.detach().to(device=device, dtype=torch.float32).permute(2, 3, 0, 1).reshape(n * b, 3)
        bilateral = PermutohedralLattice(
            torch.cat([(position / params.bilateral_sxy).repeat_interleave(b, dim=0),
                       rgb / params.bilateral_srgb], dim=-1),
            torch.arange(b, device=device).repeat(n),
        )
        norm_g = _symmetric_norm(gauss, device).repeat_interleave(b, dim=0)  # (n*b) x 1
        norm_b = _symmetric_norm(bilateral, device)
        scale_g, scale_b = norm_g * params.gaussian_compat, norm_b * params.bilateral_compat

        for _ in range(params.iterations):
            msg = bilateral.filter(q * norm_b).mul_(scale_b)
            msg_g = gauss.filter((q * norm_g).reshape(n, b * k)).reshape(n * b, k)
            msg.addcmul_(msg_g, scale_g)
            q = torch.softmax(msg.add_(log_p), dim=1)
        return q.reshape(h, w, b, k).permute(2, 3, 0, 1).contiguous()
