"""WeakCLIP losses: hand-computed values on tiny tensors, gradients, autocast, optimisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakclip.crf import TRAIN_CRF
from weakclip.losses import (
    WeakCLIPLoss,
    boundary_loss,
    identity_loss,
    resize_seeds,
    seed_one_hot,
    seeding_loss,
    softmax_probs,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP barrier stalls on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_probs() -> torch.Tensor:
    """1 x 3 x 2 x 2 distributions with easy logs."""
    p = torch.tensor(
        [
            [[0.5, 0.2], [0.7, 0.1]],  # background
            [[0.25, 0.6], [0.2, 0.3]],
            [[0.25, 0.2], [0.1, 0.6]],
        ]
    )
    return p[None]


def test_softmax_probs_eps_renormalised():
    logits = torch.tensor([[[[0.0]], [[100.0]]]])
    p = softmax_probs(logits, eps=1e-7)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 1, 1))
    assert p.min().item() == pytest.approx(1e-7 / (1 + 2e-7), rel=1e-3)


def test_seed_one_hot_ignores_unsure():
    seeds = torch.tensor([[[0, 1], [255, 2]]])
    onehot = seed_one_hot(seeds, 3)
    assert onehot.shape == (1, 3, 2, 2)
    assert onehot[0, :, 1, 0].sum() == 0
    assert onehot[0, 0, 0, 0] == 1 and onehot[0, 1, 0, 1] == 1 and onehot[0, 2, 1, 1] == 1
    assert onehot.sum() == 3


def test_resize_seeds_nearest():
    seeds = torch.tensor([[[0, 1], [255, 2]]])
    up = resize_seeds(seeds, (4, 4))
    assert up.dtype == torch.int64
    assert torch.equal(up[0], seeds[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    down = resize_seeds(up, (2, 2))
    assert torch.equal(down, seeds)


def test_seeding_loss_exact_value():
    probs = tiny_probs()
    seeds = torch.tensor([[[0, 1], [255, 2]]])
    value = seeding_loss(probs, seed_one_hot(seeds, 3))
    expected = -math.log(0.5) - (math.log(0.6) + math.log(0.6)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_seeding_loss_balanced_and_batch_mean():
    probs = torch.cat([tiny_probs(), tiny_probs()])
    # image 0: two bg seeds, one fg seed; image 1: background seeds only (fg term contributes 0).
    seeds = torch.tensor([[[0, 0], [255, 1]], [[0, 255], [0, 255]]])
    value = seeding_loss(probs, seed_one_hot(seeds, 3))
    img0 = -(math.log(0.5) + math.log(0.2)) / 2 - math.log(0.3)
    img1 = -(math.log(0.5) + math.log(0.7)) / 2
    assert value.item() == pytest.approx((img0 + img1) / 2, rel=1e-6)


def test_all_unsure_seeds_give_zero_not_nan():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    seeds = torch.full((2, 8, 8), 255)
    value = seeding_loss(softmax_probs(logits), seed_one_hot(seeds, 3))
    assert value.item() == 0.0
    ident = identity_loss(logits, seeds)
    assert ident.item() == 0.0
    (value + ident).backward()
    assert torch.isfinite(logits.grad).all()
    out = WeakCLIPLoss(loss_size=8)(logits, logits, seeds, torch.rand(2, 3, 8, 8) * 255)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["seeding"].item() == 0.0 and out["identity"].item() == 0.0


def test_boundary_loss_zero_when_q_equals_p():
    probs = tiny_probs()
    assert boundary_loss(probs, probs.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_boundary_loss_hand_value_with_ratio_clip():
    p = torch.tensor([0.5, 0.49, 0.01]).reshape(1, 3, 1, 1)
    q = torch.tensor([0.01, 0.49, 0.5]).reshape(1, 3, 1, 1)
    # ratios 0.02 -> clipped to 0.05, 1, 50 -> clipped to 20
    expected = 0.01 * math.log(0.05) + 0.49 * math.log(1.0) + 0.5 * math.log(20.0)
    assert boundary_loss(p, q).item() == pytest.approx(expected, rel=1e-6)


def test_boundary_gradient_flows_to_p_not_q():
    p = softmax_probs(torch.randn(1, 3, 4, 4)).requires_grad_(True)
    q = softmax_probs(torch.randn(1, 3, 4, 4)).requires_grad_(True)
    boundary_loss(p, q).backward()
    assert q.grad is None
    ratio = q.detach() / p.detach()
    inside = (ratio > 0.05) & (ratio < 20)
    expected = torch.where(inside, -q.detach() / p.detach(), torch.zeros_like(p)) / 16
    torch.testing.assert_close(p.grad, expected)


def test_identity_loss_ignores_255():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 2)
    seeds = torch.tensor([[[0, 2], [255, 1]]])
    value = identity_loss(logits, seeds, mean_over="valid")
    log_sm = logits.log_softmax(1)[0]
    expected = -(log_sm[0, 0, 0] + log_sm[2, 0, 1] + log_sm[1, 1, 1]) / 3
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[0, :, 1, 0] = torch.tensor([5.0, -3.0, 9.0])
    assert identity_loss(changed, seeds, mean_over="valid").item() == pytest.approx(value.item(), rel=1e-6)
    # the release (mmseg 0.19): the same sum over the 4 pixels, the unsure one counted as 0
    assert identity_loss(logits, seeds).item() == pytest.approx(expected.item() * 3 / 4, rel=1e-6)
    assert identity_loss(changed, seeds).item() == pytest.approx(expected.item() * 3 / 4, rel=1e-6)


def test_identity_loss_upsamples_bilinear_to_seed_size():
    logits = torch.randn(2, 4, 4, 4)
    seeds = torch.randint(0, 4, (2, 16, 16))
    seeds[:, :3] = 255
    expected = F.cross_entropy(
        F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False), seeds, ignore_index=255
    )
    assert identity_loss(logits, seeds, mean_over="valid").item() == pytest.approx(expected.item(), rel=1e-6)
    valid_fraction = (seeds != 255).float().mean().item()
    assert identity_loss(logits, seeds).item() == pytest.approx(expected.item() * valid_fraction, rel=1e-5)


def scene(b: int = 2, k: int = 3, size: int = 32):
    """Images with a bright square on a dark background, seeds with an unsure band."""
    images = torch.full((b, 3, size, size), 30.0)
    seeds = torch.zeros(b, size, size, dtype=torch.long)
    lo, hi = size // 4, 3 * size // 4
    for i in range(b):
        cls = 1 + i % (k - 1)
        images[i, :, lo:hi, lo:hi] = torch.tensor([220.0, 200.0, 60.0])[:, None, None]
        seeds[i, lo + 2 : hi - 2, lo + 2 : hi - 2] = cls
        seeds[i, lo - 2 : lo + 2, :] = 255
        seeds[i, hi - 2 : hi + 2, :] = 255
    return images, seeds


def test_weakclip_loss_composition_and_keys():
    images, seeds = scene()
    logits = torch.randn(2, 3, 16, 16)
    scores = torch.randn(2, 3, 8, 8)
    crit = WeakCLIPLoss(loss_size=16)
    out = crit(logits, scores, seeds, images)
    assert set(out) == {"loss", "seeding", "boundary", "identity"}
    assert all(v.dim() == 0 for v in out.values())
    total = out["seeding"] + out["boundary"] + 0.4 * out["identity"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    # The parts match the standalone functions at the loss resolution.
    probs = softmax_probs(logits)
    seeds16 = resize_seeds(seeds, (16, 16))
    assert out["seeding"].item() == pytest.approx(
        seeding_loss(probs, seed_one_hot(seeds16, 3)).item(), rel=1e-6
    )
    assert out["identity"].item() == pytest.approx(identity_loss(scores, seeds).item(), rel=1e-6)
    assert crit.crf_params == TRAIN_CRF and crit.loss_size == 16


def test_default_loss_size_64_resizes_logits_and_images():
    images, seeds = scene(b=1, size=128)
    logits = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = WeakCLIPLoss()(logits, torch.randn(1, 3, 8, 8), seeds, images)
    out["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.isfinite(out["boundary"]) and out["boundary"].item() > 0


def test_gradients_reach_logits_and_scores():
    images, seeds = scene()
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    scores = torch.randn(2, 3, 8, 8, requires_grad=True)
    crit = WeakCLIPLoss(loss_size=16)
    out = crit(logits, scores, seeds, images)
    out["boundary"].backward(retain_graph=True)
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert scores.grad is None
    out["identity"].backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # q itself is a constant: no graph behind the CRF target.
    q = crit.crf_target(softmax_probs(logits), images[:, :, ::2, ::2])
    assert not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(2, 16, 16))
    assert q.min().item() >= 1e-4 / (1 + 3e-4)


def test_total_loss_decreases_under_sgd():
    images, seeds = scene()
    # Not all-zero logits: a uniform prediction is a fixed point of the CRF (boundary = 0), and
    # the first step would raise the boundary term from exactly 0.
    logits = (0.5 * torch.randn(2, 3, 16, 16)).requires_grad_(True)
    scores = torch.zeros(2, 3, 8, 8, requires_grad=True)
    crit = WeakCLIPLoss(loss_size=16)
    # The balanced seeding loss averages over seed pixels: per-pixel gradients are ~1/count.
    opt = torch.optim.SGD([logits, scores], lr=50.0)
    history = []
    for _ in range(5):
        opt.zero_grad()
        out = crit(logits, scores, seeds, images)
        out["loss"].backward()
        opt.step()
        history.append(out["loss"].item())
    assert history[-1] < 0.75 * history[0], history
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:])), history


def test_bf16_autocast_inputs_work_in_fp32():
    images, seeds = scene()
    logits = torch.randn(2, 3, 16, 16)
    scores = torch.randn(2, 3, 8, 8)
    crit = WeakCLIPLoss(loss_size=16)
    ref = crit(logits.bfloat16().float(), scores.bfloat16().float(), seeds, images)
    leaf = logits.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(leaf, scores.bfloat16(), seeds, images.bfloat16())
    for key in out:
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(ref[key].item(), rel=2e-2, abs=2e-3)
    out["loss"].backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16
    assert torch.isfinite(leaf.grad.float()).all()
