"""Window batches across scales, flips and images; batch size by free memory; out-of-memory back-off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weakclip.config import Config, PseudoMaskConfig, apply_overrides
from weakclip.errors import WeakclipError
from weakclip.inference import batching
from weakclip.inference.batching import CPU_AUTO_WINDOWS, WindowRunner, windows_for_memory
from weakclip.inference.sliding import (
    multiscale_inference,
    multiscale_inference_batch,
    scaled_size,
    window_grid,
)
from weakclip.models.weakclip import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), neck_channels=16, head_channels=16,
                      match_width=16, match_layers=1, drop_path_rate=0.0)
    return build_model(cfg, ["background", "cat", "dog"], pretrained_download=False).eval()


class Recorder(torch.nn.Module):
    """Wraps a model: records each forward pass's batch size; fails like a full GPU above ``fits``."""

    def __init__(self, model, fits: int | None = None):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.fits = fits
        self.batches: list[int] = []

    def forward(self, x):
        if self.fits is not None and x.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {x.shape[0]} windows > {self.fits})")
        self.batches.append(x.shape[0])
        return self.model(x)


IMAGES = [(60, 80), (80, 60), (60, 80)]
TTA = dict(scales=(1.0, 0.5), flip=True, crop=32, stride=21, base_scale=(80, 60), mean=(120, 110, 100),
           std=(60, 60, 60))


def _images():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGES]


def _expected_passes(window_batch: int) -> int:
    """Forward passes when windows of one size from any image, scale and flip share batches."""
    per_size: dict[tuple[int, int], int] = {}
    for h, w in IMAGES:
        for r in TTA["scales"]:
            sh, sw = scaled_size(h, w, r, TTA["base_scale"])
            for y1, y2, x1, x2 in window_grid(sh, sw, TTA["crop"], TTA["stride"]):
                key = (max(y2 - y1, 32), max(x2 - x1, 32))
                per_size[key] = per_size.get(key, 0) + 2  # and its flip
    return sum(math.ceil(n / window_batch) for n in per_size.values())


def test_windows_of_several_images_share_batches_with_the_same_result():
    model = tiny_model()
    images = _images()
    alone = [multiscale_inference(model, im, num_classes=3, **TTA) for im in images]  # the release's way
    rec = Recorder(model)
    together = multiscale_inference_batch(rec, images, num_classes=3, window_batch=12, **TTA)
    assert len(together) == 3
    for a, b, (h, w) in zip(alone, together, IMAGES):
        assert b.shape == (3, h, w)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.sum(0), torch.ones(h, w))
    assert len(rec.batches) == _expected_passes(12)
    # every window goes to the model at 32 x 32 here (the 0.5 scale's 30-px sides are padded): the 84
    # windows of 3 images, 2 scales and their flips fill 7 batches; one image alone (28) fills 2 and 1/3
    assert rec.batches == [12] * 7
    one_by_one = sum(_count_passes(model, im) for im in images)
    assert len(rec.batches) < one_by_one


def _count_passes(model, image) -> int:
    rec = Recorder(model)
    multiscale_inference(rec, image, num_classes=3, window_batch=12, **TTA)
    return len(rec.batches)


def test_one_window_at_a_time_is_bitwise_the_image_alone():
    """window_batch=1 (the release): running images together changes nothing at all."""
    model = tiny_model()
    images = _images()
    alone = [multiscale_inference(model, im, num_classes=3, **TTA) for im in images]
    together = multiscale_inference_batch(model, images, num_classes=3, window_batch=1, **TTA)
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result():
    model = tiny_model()
    images = _images()
    reference = multiscale_inference_batch(model, images, num_classes=3, window_batch=3, **TTA)
    rec = Recorder(model, fits=3)
    runner = WindowRunner(rec, 3, window_batch=16)
    got = multiscale_inference_batch(rec, images, num_classes=3, window_batch=runner, **TTA)
    for a, b in zip(reference, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert runner.limit == 2 and runner.halvings == 3  # 16 -> 8 -> 4 -> 2, then it fits
    assert max(rec.batches) <= 3
    # the runner keeps the lower limit for the next call: no more failures
    multiscale_inference_batch(rec, images[:1], num_classes=3, window_batch=runner, **TTA)
    assert runner.halvings == 3
    # a single window that does not fit is a real error
    with pytest.raises(torch.OutOfMemoryError):
        WindowRunner(Recorder(model, fits=0), 3, window_batch=4)(torch.zeros(2, 3, 32, 32))


def test_wrong_class_count_and_negative_batch_are_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="expected 2 x 5"):
        WindowRunner(model, 5, window_batch=2)(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=">= 0"):
        WindowRunner(model, 3, window_batch=-1)


def test_batch_size_from_free_memory():
    gib = 2 ** 30
    # 80% of 10 GiB, less 1 GiB fixed, in 0.5 GiB windows
    assert windows_for_memory(10 * gib, 1 * gib, gib / 2) == 14
    assert windows_for_memory(10 * gib, 1 * gib, gib / 2, fraction=0.5) == 8
    assert windows_for_memory(100 * gib, 0, gib / 100) == batching.MAX_AUTO_WINDOWS
    assert windows_for_memory(1 * gib, 2 * gib, gib) == 1  # never below one window
    with pytest.raises(ValueError):
        windows_for_memory(gib, 0, 1, fraction=0)
    # off CUDA, "auto" is a fixed small batch
    runner = WindowRunner(tiny_model(), 3, window_batch=batching.AUTO)
    assert runner.limit is None and runner.resolve(torch.device("cpu"), (512, 512)) == CPU_AUTO_WINDOWS


def test_auto_batch_on_cuda_is_measured_from_one_and_two_windows(monkeypatch):
    """The probe's arithmetic with the CUDA memory calls replaced: a batch of n windows peaks at
    300 + 200 n bytes, 5,000 bytes are free and 1,000 more are cached by torch."""
    state = {"allocated": 100, "peak": 100}

    class Fake(torch.nn.Module):
        num_classes = 3

        def forward(self, x):
            state["peak"] = state["allocated"] + 300 + 200 * x.shape[0]
            return torch.zeros(x.shape[0], 3, 8, 8)

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: state["allocated"] + 1000)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (5000, 10000))
    monkeypatch.setattr(torch, "zeros", _cpu_zeros(torch.zeros))
    runner = WindowRunner(Fake(), 3, window_batch=0)
    # per window 200, fixed 300, room 0.8 * (5000 + 1000) = 4800 -> (4800 - 300) // 200 = 22
    assert runner.resolve(torch.device("cuda", 0), (16, 16)) == 22 == windows_for_memory(6000, 300, 200)


def _cpu_zeros(zeros):
    def make(*size, device=None, **kw):
        return zeros(*size, **kw)
    return make


def test_pseudo_mask_settings_are_checked():
    for bad, words in [("pseudo.window_batch=-1", "window_batch must be >= 0"),
                       ("pseudo.image_batch=0", "image_batch must be >= 1")]:
        with pytest.raises(WeakclipError, match=words):
            apply_overrides(Config(), [bad])
    assert apply_overrides(Config(), ["pseudo.window_batch=0"]).pseudo.window_batch == 0
    assert PseudoMaskConfig().image_batch == 1 and PseudoMaskConfig().window_batch == 1  # the release
