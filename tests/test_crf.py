"""Dense CRF: exact-kernel torch mean-field vs a float64 reference and vs pydensecrf2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakclip.crf import (
    COCO_CRF,
    TRAIN_CRF,
    VOC_CRF,
    DenseCRFParams,
    dense_crf_numpy,
    dense_crf_torch,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP barrier stalls on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_crf(probs: torch.Tensor, image: torch.Tensor, params: DenseCRFParams) -> torch.Tensor:
    """Plain float64 mean-field written from pydensecrf's definition (one image, K x h x w)."""
    k, h, w = probs.shape
    n = h * w
    ys = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    xs = torch.arange(w, dtype=torch.float64).repeat(h)
    pos_sq = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    rgb = image.double().reshape(3, n)
    col_sq = ((rgb[:, :, None] - rgb[:, None, :]) ** 2).sum(0)

    def sym_norm(kern):
        d = kern.sum(1).rsqrt()
        return kern * d[:, None] * d[None, :]

    gauss = sym_norm(torch.exp(-pos_sq / (2 * params.gaussian_sxy**2)))
    bilat = sym_norm(
        torch.exp(-pos_sq / (2 * params.bilateral_sxy**2) - col_sq / (2 * params.bilateral_srgb**2))
    )
    msg = params.gaussian_compat * gauss + params.bilateral_compat * bilat
    log_p = probs.double().clamp(1e-5, 1).log().reshape(k, n)
    q = log_p.softmax(0)
    for _ in range(params.iterations):
        q = (log_p + q @ msg).softmax(0)
    return q.reshape(k, h, w)


def synthetic_case(seed: int, h: int, w: int, k: int, noise: float = 0.8, hard: bool = False):
    """Image with k coloured regions (disc, corner block) and noisy, shifted, blurred unaries.

    ``hard``: low-contrast colours and strong pixel noise, so the CRF cannot just recover the
    ground truth and the two implementations' differences show.

    Returns image H x W x 3 (float, integer-valued 0..255), probs K x H x W, ground truth H x W.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    gt = torch.zeros(h, w, dtype=torch.long)
    gt[(yy - h * 0.45) ** 2 + (xx - w * 0.4) ** 2 < (min(h, w) * 0.28) ** 2] = 1
    if k == 3:
        gt[(yy > h * 0.6) & (xx > w * 0.55)] = 2
    if hard:
        colours = torch.tensor([[100.0, 110.0, 130.0], [125.0, 120.0, 105.0], [95.0, 130.0, 110.0]])[:k]
    else:
        colours = torch.tensor([[40.0, 60.0, 200.0], [220.0, 180.0, 40.0], [30.0, 200.0, 80.0]])[:k]
    image_noise = 25.0 if hard else 8.0
    image = (colours[gt] + image_noise * torch.randn(h, w, 3, generator=g)).clamp(0, 255).round()
    onehot = F.one_hot(gt, k).permute(2, 0, 1).float()[None]
    shifted = torch.roll(onehot, shifts=(2, -2), dims=(2, 3))
    blurred = F.avg_pool2d(shifted, 5, 1, 2, count_include_pad=False)
    logits = 3 * blurred + noise * torch.randn(1, k, h, w, generator=g)
    return image, logits.softmax(1)[0], gt


# (seed, h, w, K, hard)
CASES = [
    (0, 24, 24, 2, False),
    (1, 32, 40, 3, False),
    (2, 40, 32, 3, False),
    (3, 40, 40, 2, False),
    (4, 32, 32, 3, True),
    (5, 40, 40, 2, True),
]


@pytest.mark.parametrize("params", [TRAIN_CRF, VOC_CRF, COCO_CRF], ids=["train", "voc", "coco"])
def test_matches_float64_reference(params):
    image, probs, _ = synthetic_case(5, 16, 20, 3)
    ours = dense_crf_torch(probs[None], image.permute(2, 0, 1)[None], params)[0]
    ref = reference_crf(probs, image.permute(2, 0, 1), params)
    # fp32 kernels (matmul-expanded exponent): ~1e-5 typical, 1e-4 bound.
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [TRAIN_CRF, VOC_CRF], ids=["train", "voc"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}k{c[3]}{'hard' if c[4] else ''}" for c in CASES])
def test_agrees_with_pydensecrf(case, params):
    pytest.importorskip("pydensecrf.densecrf")
    seed, h, w, k, hard = case
    image, probs, gt = synthetic_case(seed, h, w, k, hard=hard)
    ours = dense_crf_torch(probs[None], image.permute(2, 0, 1)[None], params)[0]
    theirs = torch.from_numpy(dense_crf_numpy(image.numpy().astype(np.uint8), probs.numpy(), params))
    agreement = (ours.argmax(0) == theirs.argmax(0)).float().mean().item()
    assert agreement >= 0.98, agreement
    assert (ours - theirs).abs().mean().item() < 0.015
    if not hard:  # with clear colour edges both refine the noisy unary towards the ground truth
        before = (probs.argmax(0) == gt).float().mean().item()
        assert (ours.argmax(0) == gt).float().mean().item() > before


def test_marginals_sum_to_one_and_shape():
    probs = torch.rand(3, 5, 12, 10).softmax(1)
    images = torch.rand(3, 3, 12, 10) * 255
    q = dense_crf_torch(probs, images, TRAIN_CRF)
    assert q.shape == probs.shape and q.dtype == torch.float32
    assert not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(3, 12, 10))
    assert bool((q >= 0).all())


def test_batch_composition_invariance():
    probs = torch.rand(5, 4, 14, 14).softmax(1)
    images = torch.rand(5, 3, 14, 14) * 255
    batched = dense_crf_torch(probs, images, TRAIN_CRF)
    chunked = dense_crf_torch(probs, images, TRAIN_CRF, max_kernel_elements=2 * 196 * 196)
    for i in range(5):
        alone = dense_crf_torch(probs[i : i + 1], images[i : i + 1], TRAIN_CRF)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked[i : i + 1], alone, atol=1e-5, rtol=0)


def test_uniform_image_keeps_confident_unary():
    probs = torch.full((1, 3, 16, 16), 0.05)
    probs[:, 1] = 0.9
    images = torch.full((1, 3, 16, 16), 128.0)
    q = dense_crf_torch(probs, images, TRAIN_CRF)
    assert bool((q.argmax(1) == 1).all())
    assert q[:, 1].min().item() > 0.9


def test_snaps_label_edge_to_colour_edge():
    h, w, edge, label_edge = 16, 24, 12, 9
    images = torch.zeros(1, 3, h, w)
    images[:, :, :, :edge] = torch.tensor([200.0, 40.0, 40.0])[:, None, None]
    images[:, :, :, edge:] = torch.tensor([40.0, 40.0, 200.0])[:, None, None]
    probs = torch.empty(1, 2, h, w)
    probs[:, 0, :, :label_edge] = 0.65
    probs[:, 0, :, label_edge:] = 0.35
    probs[:, 1] = 1 - probs[:, 0]
    q = dense_crf_torch(probs, images, TRAIN_CRF)
    expected = (torch.arange(w) >= edge).long().expand(1, h, w)
    assert bool((probs.argmax(1) != expected).any())  # the unary alone is off by 3 columns
    assert torch.equal(q.argmax(1), expected)


def test_zero_iterations_returns_clipped_unary():
    probs = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.5]]]])
    q = dense_crf_torch(probs, torch.zeros(1, 3, 1, 2), DenseCRFParams(iterations=0))
    torch.testing.assert_close(q[0, :, 0, 0], torch.tensor([1 / (1 + 1e-5), 1e-5 / (1 + 1e-5)]))
    torch.testing.assert_close(q[0, :, 0, 1], torch.tensor([0.5, 0.5]))


def test_fp32_inside_under_autocast():
    probs = torch.rand(2, 3, 10, 10).softmax(1)
    images = torch.rand(2, 3, 10, 10) * 255
    expected = dense_crf_torch(probs, images, TRAIN_CRF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = dense_crf_torch(probs, images, TRAIN_CRF)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, expected)
    q16 = dense_crf_torch(probs.bfloat16(), images.bfloat16(), TRAIN_CRF)
    assert q16.dtype == torch.float32
    assert (q16.argmax(1) == expected.argmax(1)).float().mean() > 0.95


def test_shape_errors():
    with pytest.raises(ValueError):
        dense_crf_torch(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError):
        dense_crf_torch(torch.rand(2, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError):
        DenseCRFParams(gaussian_sxy=0)


def test_presets():
    assert (TRAIN_CRF.gaussian_sxy, TRAIN_CRF.gaussian_compat) == (3, 3)
    assert (TRAIN_CRF.bilateral_sxy, TRAIN_CRF.bilateral_srgb, TRAIN_CRF.bilateral_compat) == (80, 13, 10)
    assert (VOC_CRF.bilateral_sxy, VOC_CRF.bilateral_srgb, VOC_CRF.bilateral_compat) == (83, 5, 3)
    assert (COCO_CRF.gaussian_sxy, COCO_CRF.bilateral_sxy, COCO_CRF.bilateral_srgb) == (1, 67, 3)
    assert COCO_CRF.bilateral_compat == 4
    assert TRAIN_CRF.iterations == VOC_CRF.iterations == COCO_CRF.iterations == 10


def test_dense_crf_numpy_output():
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, _ = synthetic_case(7, 20, 30, 3)
    q = dense_crf_numpy(image.numpy().astype(np.uint8), probs.numpy(), VOC_CRF)
    assert q.shape == (3, 20, 30) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        dense_crf_numpy(image.numpy().astype(np.uint8), probs.numpy()[:, :10], VOC_CRF)


def test_fast_and_exact_kernel_paths_agree(monkeypatch):
    from weakclip.crf import exact as crf

    feats = torch.cat([torch.rand(2, 150, 2) * 3, torch.rand(2, 150, 3) * 15], dim=-1)
    fast = crf._normalised_kernels(feats, 2.5)
    monkeypatch.setattr(crf, "_EXPANSION_LIMIT", -1.0)
    exact = crf._normalised_kernels(feats, 2.5)
    torch.testing.assert_close(fast, exact, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(exact, exact.transpose(1, 2))


def test_missing_pydensecrf_gives_clear_error(monkeypatch):
    import sys

    from weakclip.crf import CRFUnavailableError
    from weakclip.errors import WeakclipError

    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CRFUnavailableError, match="pip install pydensecrf2") as info:
        dense_crf_numpy(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))
    assert isinstance(info.value, WeakclipError) and isinstance(info.value, ImportError)
