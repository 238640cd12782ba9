"""A very large photo neither kills ``weakclip predict`` nor the images after it (issue 27, point 4).

Before: an 8000x6000 JPEG ended the whole command, the retrained network with a raw ``RuntimeError`` of
PyTorch's CPU allocator, the refinement model with pydensecrf2's C++ ``std::bad_alloc`` (an abort, exit 134).
Now a retrained network processes an image shrunk to ``max_side`` (the refinement model keeps its own
``base_scale`` rule for what the network sees and bounds its probabilities and CRF), masks come back at the
full size, pydensecrf2's memory is checked before it runs, and an image that still runs out of memory is
listed as failed in one line (its size and the ``--max-side`` to set) while the others are written.

No test here allocates much: the images are at most 128 px, the out-of-memory errors are PyTorch's own
message raised by a network wrapper above a pixel count, or a real ``std::bad_alloc`` under an address-space
limit (``ulimit -v``) in a subprocess. The 48 MP measurement is benchmarks/large_photo.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import weakclip
import weakclip.api
import weakclip.segmenters
from weakclip.cli import main
from weakclip.data.io import read_image, read_label_png

pytestmark = pytest.mark.usefixtures("one_thread")

#: What PyTorch's CPU allocator raises when a tensor does not fit (torch 2.x, Linux).
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
           "to allocate 31457280000 bytes. Error code 12 (Cannot allocate memory)")
SRC = Path(weakclip.__file__).resolve().parents[1]


def _photo(h: int, w: int, name: str = "astronaut") -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).resize((w, h), Image.BILINEAR))


class _Picky(nn.Module):
    """The network, failing as PyTorch does when memory runs out for inputs above ``limit`` pixels (batch
    included); records the input sizes it saw."""

    def __init__(self, net: nn.Module, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.seen = net, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.limit:
            raise RuntimeError(CPU_OOM)
        return self.net(x)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A retraining checkpoint (the narrow DeepLab-v1 ResNet-38 of the ``voc`` preset, random weights, its
    classifier x 50 so that masks follow the pixels; one scale + flip, CRF over the present classes) and a
    refinement checkpoint (tiny CLIP, one scale + flip, 64 px windows, base scale 64 x 48, the VOC CRF)."""
    from weakclip.config import Config, PseudoMaskConfig
    from weakclip.models import ModelConfig, build_model
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset
    from weakclip.retrain.train import build_model as build_retrained

    base = tmp_path_factory.mktemp("nets")
    cfg = apply_retrain_overrides(load_retrain_preset("voc"), [
        "model.width_divisor=8", "model.pretrained_backbone=false", "eval.scales=1.0"])
    torch.manual_seed(0)
    model = build_retrained(cfg, 21, pretrained=False)
    with torch.no_grad():
        model.net.cls_conv.weight.mul_(50.0)
    retrained = base / "retrained.pth"
    torch.save({"iteration": 1, "model": model.state_dict(), "config": cfg.to_dict()}, retrained)

    classes = ["background", "disk", "square", "triangle"]
    rcfg = Config()
    rcfg.model = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_width=32, match_heads=2,
                             match_layers=1, neck_channels=32, head_channels=32)
    rcfg.data.kind, rcfg.data.root, rcfg.classes = "folder", str(base), classes
    rcfg.pseudo = PseudoMaskConfig(scales=(1.0,), flip=True, crop=64, stride=43, base_scale=(64, 48),
                                   crf="voc", crf_backend="pydensecrf")
    torch.manual_seed(1)
    refine = base / "refine.pth"
    model = build_model(rcfg.model, classes, pretrained_download=False)
    torch.save({"iteration": 3, "model": model.state_dict(), "config": rcfg.to_dict(), "clip_weights": None},
               refine)
    return {"retrained": retrained, "refine": refine}


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Two small photos and one "large" (128 x 96) in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo(40, 48, "coffee")).save(folder / "a_small.png")
    Image.fromarray(_photo(96, 128)).save(folder / "b_large.png")
    Image.fromarray(_photo(40, 48, "chelsea")).save(folder / "c_small.png")
    return folder


def _one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


# ====================================================================== the command: one image fails, not all
def test_an_image_out_of_memory_is_listed_and_the_others_written(nets, photos, tmp_path, monkeypatch, capsys):
    """Before: PyTorch's RuntimeError ended ``weakclip predict`` with a traceback, the images after the large
    one never written."""
    seg = weakclip.load(nets["retrained"], "cpu")
    picky = _Picky(seg.network, limit=2 * 60 * 60)  # flip doubles the batch: a 48 x 40 image passes
    seg.network = picky
    monkeypatch.setattr(weakclip.api, "load", lambda *args, **kwargs: seg)
    out = tmp_path / "out"
    argv = ["predict", str(photos), "--checkpoint", str(nets["retrained"]), "--out", str(out), "--quiet",
            "--json", str(tmp_path / "shares.json")]
    assert main(argv) == 1  # the default max side is larger than this "large" photo
    captured = capsys.readouterr()
    err = _one_line(captured.err)
    large = photos / "b_large.png"
    assert err.startswith(f"weakclip predict: 1 failed (of 3 images): {large}: out of memory for a 128x96 "
                          "image processed at its full size (max side 768) on cpu: 29.3 GiB could not be "
                          "allocated; set a smaller max side, e.g. --max-side 64")
    assert f"wrote 2 masks and overlays to {out}; 1 image(s) ran out of memory: {large}" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a_small.png", "a_small_overlay.png", "c_small.png",
                                                     "c_small_overlay.png"]
    record = json.loads((tmp_path / "shares.json").read_text())
    assert list(record["failures"]) == [str(large)] and record["settings"]["max_side"] == 768
    # as the message says: a smaller max side, and the large photo is written at its full size
    picky.seen.clear()
    assert main([*argv, "--max-side", "48"]) == 0
    assert "wrote 1 masks and overlays" in capsys.readouterr().out  # the two others were there
    assert max(max(shape[-2:]) for shape in picky.seen) == 48  # the network saw it shrunk
    mask = read_label_png(out / "b_large.png", expected_hw=(96, 128))
    assert Image.open(out / "b_large_overlay.png").size == (3 * 128, 96)
    assert json.loads((tmp_path / "shares.json").read_text())["settings"]["max_side"] == 48
    seg.configure(max_side=48)
    np.testing.assert_array_equal(mask, seg.predict(read_image(large)))


def test_a_batch_out_of_memory_is_run_one_image_at_a_time(nets, tmp_path, monkeypatch, capsys):
    seg = weakclip.load(nets["retrained"], "cpu")
    seg.network = _Picky(seg.network, limit=2 * 48 * 40)  # one image of 48 x 40 with its flip, not two
    monkeypatch.setattr(weakclip.api, "load", lambda *args, **kwargs: seg)
    folder = tmp_path / "p"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(_photo(40, 48, name)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--checkpoint", "x", "--out", str(out), "--quiet",
                 "--batch-size", "2"]) == 0
    assert "wrote 3 masks" in capsys.readouterr().out
    seg.network = seg.network.net
    for name in ("astronaut", "coffee", "chelsea"):
        np.testing.assert_array_equal(read_label_png(out / f"{name}.png"),
                                      seg.predict(read_image(folder / f"{name}.png")))


def test_an_overlay_out_of_memory_fails_that_image_only(nets, photos, tmp_path, monkeypatch, capsys):
    import weakclip.inference.predict as overlays

    real = overlays.overlay_image

    def picky_overlay(image, mask, *args):
        if mask.shape[1] > 100:
            raise MemoryError()  # what NumPy raises
        return real(image, mask, *args)

    monkeypatch.setattr(overlays, "overlay_image", picky_overlay)
    out = tmp_path / "out"
    argv = ["predict", str(photos), "--checkpoint", str(nets["retrained"]), "--out", str(out), "--quiet"]
    assert main(argv) == 1
    err = _one_line(capsys.readouterr().err)
    assert (f"1 failed (of 3 images): {photos / 'b_large.png'}: out of memory for the mask and the 384x96 "
            "overlay of a 128x96 image: MemoryError") in err
    assert not (out / "b_large_overlay.png").exists() and (out / "c_small_overlay.png").is_file()
    monkeypatch.undo()
    assert main(argv) == 0  # a rerun writes what is missing
    assert "wrote 1 masks and overlays" in capsys.readouterr().out
    assert (out / "b_large_overlay.png").is_file()


def test_the_api_raises_one_line_memory_error(nets, monkeypatch):
    from weakclip.errors import OutOfMemory, WeakclipError

    seg = weakclip.load(nets["retrained"], "cpu").configure(max_side=96)
    seg.network = _Picky(seg.network, limit=2 * 60 * 60)
    with pytest.raises(OutOfMemory) as info:
        seg.predict(_photo(96, 128))
    assert isinstance(info.value, MemoryError) and isinstance(info.value, WeakclipError)
    assert _one_line(str(info.value)) == (
        "out of memory for a 128x96 image processed at 96x72 (max side 96) on cpu: 29.3 GiB could not be "
        "allocated; set a smaller max side, e.g. --max-side 64 (Python: configure(max_side=64))")
    assert info.value.__context__ is None  # the failed attempt (and its tensors) is not held on to
    with pytest.raises(OutOfMemory, match="2 images together .*--batch-size 1"):
        seg.predict_batch([_photo(96, 128)] * 2)
    seg.network = seg.network.net
    # the probabilities at a large image's full size (predict_proba) may not fit where its mask does
    def no_room(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(weakclip.segmenters, "F", types.SimpleNamespace(interpolate=no_room))
    assert seg.predict(_photo(96, 128)).shape == (96, 128)
    with pytest.raises(OutOfMemory) as info:
        seg.predict_proba(_photo(96, 128))
    assert _one_line(str(info.value)) == (
        "out of memory for the probabilities of a 128x96 image at its full size (21 classes, 1008.0 KiB): "
        "29.3 GiB could not be allocated; predict() gives its mask without them")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="boom"):  # other errors are not turned into memory errors

        class Broken(nn.Module):
            def forward(self, x):
                raise ValueError("boom")

        seg.network = Broken()
        seg.predict(_photo(40, 48))


# ====================================================================== processing at a bounded size
def test_processing_size_and_the_enlarged_labels():
    from weakclip.segmenters import enlarge_labels, processing_size, shrink_image

    assert processing_size(6000, 8000, 1024) == (768, 1024)
    assert processing_size(8000, 6000, 1024) == (1024, 768)
    assert processing_size(375, 500, 1024) == (375, 500)  # VOC: unchanged
    assert processing_size(6000, 8000, None) == (6000, 8000)
    assert processing_size(10, 5000, 1024) == (2, 1024)
    # each pixel takes the label of the small pixel its centre falls in, floor((i + 1/2) * h / H) exactly;
    # Pillow's NEAREST is the same rule in floats, equal wherever a centre does not fall on a border
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for (h, w), (big_h, big_w) in [((3, 4), (96, 128)), ((36, 48), (90, 121)), ((7, 5), (7, 5))]:
        small = rng.integers(0, 21, (h, w), dtype=np.uint8)
        rows = [int((Fraction(2 * i + 1, 2) * h) // big_h) for i in range(big_h)]
        cols = [int((Fraction(2 * j + 1, 2) * w) // big_w) for j in range(big_w)]
        ours = enlarge_labels(small, (big_h, big_w))
        np.testing.assert_array_equal(ours, small[np.ix_(rows, cols)])
        pil = np.asarray(Image.fromarray(small).resize((big_w, big_h), Image.NEAREST))
        inside_r = [i for i in range(big_h) if (2 * i + 1) * h % (2 * big_h)]
        inside_c = [j for j in range(big_w) if (2 * j + 1) * w % (2 * big_w)]
        np.testing.assert_array_equal(ours[np.ix_(inside_r, inside_c)], pil[np.ix_(inside_r, inside_c)])
    import cv2

    image = _photo(96, 128)
    np.testing.assert_array_equal(shrink_image(image, (36, 48)),
                                  cv2.resize(image, (48, 36), interpolation=cv2.INTER_AREA))
    assert shrink_image(image, (96, 128)) is image


def test_a_retrained_network_runs_on_the_shrunk_image(nets):
    from weakclip.segmenters import enlarge_labels, shrink_image

    seg = weakclip.load(nets["retrained"], "cpu")
    assert seg.settings["max_side"] == seg.max_side == weakclip.segmenters.DEFAULT_MAX_SIDE
    image = _photo(96, 128)
    full = seg.configure(max_side=None).predict(image)
    small = shrink_image(image, (36, 48))
    expected = enlarge_labels(seg.predict(small), (96, 128))
    assert len(np.unique(expected)) > 1
    seg.configure(max_side=48)
    np.testing.assert_array_equal(seg.predict(image), expected)
    assert not np.array_equal(full, expected)  # the bound changes what the network sees
    probs = seg.predict_proba(image)
    assert probs.shape == (21, 96, 128) and np.allclose(probs.sum(0), 1, atol=1e-5)
    small_probs = seg.predict_proba(small)
    expected_probs = torch.nn.functional.interpolate(torch.from_numpy(small_probs)[None], size=(96, 128),
                                                     mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(probs, expected_probs, atol=1e-6)
    [(batch_probs, batch_mask)] = seg.predict_batch([image])
    np.testing.assert_array_equal(batch_mask, expected)
    assert batch_probs.shape == (21, 96, 128)
    assert seg.predict_batch([image], probabilities=False)[0][0] is None
    # an image within the bound: exactly as without one
    np.testing.assert_array_equal(seg.configure(max_side=128).predict(image), full)


def test_the_refinement_model_keeps_its_windows_and_bounds_probabilities_and_crf(nets, monkeypatch):
    """The network's own rule (each scale resized from the full image to fit the base scale) is kept: its
    windows are the same with and without a bound; the probabilities and the CRF are at the bound."""
    import weakclip.crf.dispatch as dispatch
    from weakclip.segmenters import enlarge_labels, shrink_image

    seg = weakclip.load(nets["refine"], "cpu")
    windows: list[torch.Tensor] = []
    handle = seg._model.register_forward_pre_hook(lambda module, args: windows.append(args[0].clone()))
    crf_inputs = []
    real_crf = dispatch.dense_crf

    def spy(probs, images, params, backend="auto"):
        crf_inputs.append((tuple(probs.shape), images.clone()))
        return real_crf(probs, images, params, backend)

    monkeypatch.setattr(dispatch, "dense_crf", spy)
    image = _photo(96, 128)
    try:
        full = seg.configure(max_side=None).predict(image)
        full_windows, windows[:] = list(windows), []
        bounded = seg.configure(max_side=40).predict(image)
    finally:
        handle.remove()
    assert len(windows) == len(full_windows) > 0
    for a, b in zip(windows, full_windows):
        assert torch.equal(a, b)  # the network saw the same windows
    assert crf_inputs[0][1].shape == (1, 3, 96, 128)
    shape, rgb = crf_inputs[1]
    assert shape[-2:] == (30, 40) and rgb.shape == (1, 3, 30, 40)
    small = shrink_image(image, (30, 40))
    assert torch.equal(rgb[0].permute(1, 2, 0), torch.from_numpy(small).float())
    assert bounded.shape == (96, 128) and full.shape == (96, 128)
    probs = seg.predict_proba(image)
    assert probs.shape == (4, 96, 128) and np.allclose(probs.sum(0), 1, atol=1e-5)
    # the bounded mask is the CRF's labels at 40 x 30, enlarged: read back at a pixel inside each small one
    rows, cols = np.arange(30) * 96 // 30 + 1, np.arange(40) * 128 // 40 + 1
    small_mask = bounded[rows[:, None], cols[None, :]]
    np.testing.assert_array_equal(enlarge_labels(small_mask, (96, 128)), bounded)


def test_probabilities_at_a_bounded_size_are_the_passes_resized_to_it():
    """multiscale_inference_batch's ``out_sizes``: each pass resized to the bound instead of the image."""
    import torch.nn.functional as F

    from weakclip.inference.sliding import multiscale_inference_batch

    class Net(nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    net = Net().eval()
    image = _photo(60, 80)
    kwargs = dict(scales=(1.0,), flip=False, crop=64, stride=43, base_scale=(64, 48), num_classes=3)
    [bounded] = multiscale_inference_batch(net, [image], out_sizes=[(30, 40)], **kwargs)
    [scaled] = multiscale_inference_batch(net, [image], out_sizes=[(48, 64)], **kwargs)  # the scale's size
    expected = F.interpolate(scaled.log()[None], size=(30, 40), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(bounded.numpy(), expected.softmax(1)[0].numpy(), atol=1e-5)
    [full] = multiscale_inference_batch(net, [image], **kwargs)
    assert full.shape == (3, 60, 80) and bounded.shape == (3, 30, 40)
    with pytest.raises(ValueError, match="2 sizes for 1 images"):
        multiscale_inference_batch(net, [image], out_sizes=[(30, 40)] * 2, **kwargs)


def test_max_side_is_a_checked_setting(nets, tmp_path, capsys):
    from weakclip.errors import WeakclipError

    seg = weakclip.load(nets["retrained"], "cpu")
    for bad in (-1, 16, "big", True, 1.5):
        with pytest.raises(WeakclipError, match="max_side must be a whole number of pixels >= 32") as info:
            seg.configure(max_side=bad)
        _one_line(str(info.value))
    assert seg.configure(max_side=0).settings["max_side"] is None
    with pytest.raises(WeakclipError, match="unknown test-time setting"):
        seg.configure(max_side=64, colour="red")
    assert seg.max_side is None  # nothing changed by a call that failed
    assert seg.configure(max_side=64, flip=False).settings["max_side"] == 64
    photo = tmp_path / "p.png"
    Image.fromarray(_photo(40, 48)).save(photo)
    assert main(["predict", str(photo), "--checkpoint", str(nets["retrained"]), "--out", str(tmp_path / "o"),
                 "--max-side", "8"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "max_side must be a whole number of pixels >= 32, or 0 / None" in err


# ================================================================== the dense CRF: checked, never an abort
def test_pydensecrf_is_checked_before_it_would_abort():
    """pydensecrf2 under an address-space limit of 300 MB above the process: before, its ``std::bad_alloc``
    aborted Python (exit 134); now it is a MemoryError raised before it runs."""
    code = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        sys.path.insert(0, {str(SRC)!r})
        from weakclip.crf import VOC_CRF, dense_crf_numpy

        def vmsize():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (750, 1000, 3), dtype=np.uint8)
        probs = rng.random((21, 750, 1000), dtype=np.float32)
        probs /= probs.sum(0, keepdims=True)
        limit = vmsize() + 300 * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            dense_crf_numpy(image, probs, VOC_CRF)
            print("ran")
        except MemoryError as exc:
            print(type(exc).__name__, exc)
    """)
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert run.stdout.startswith("OutOfMemory the dense CRF (pydensecrf2) of 1000x750 pixels and 21 classes "
                                 "may need 1.6 GiB, "), run.stdout


def test_pydensecrf_memory_check(monkeypatch):
    from weakclip import memory
    from weakclip.crf import VOC_CRF, dense_crf_numpy
    from weakclip.crf.pydensecrf_backend import pydensecrf_bytes
    from weakclip.errors import OutOfMemory

    assert pydensecrf_bytes(750, 1000, 21) == 750 * 1000 * (600 + 80 * 21)
    image = _photo(40, 48)
    probs = np.full((2, 40, 48), 0.5, dtype=np.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda: float(pydensecrf_bytes(40, 48, 2) - 1))
    with pytest.raises(OutOfMemory, match="48x40 pixels and 2 classes may need 1.4 MiB, 1.4 MiB is free"):
        dense_crf_numpy(image, probs, VOC_CRF)
    monkeypatch.setattr(memory, "available_bytes", lambda: float(pydensecrf_bytes(40, 48, 2)))
    assert dense_crf_numpy(image, probs, VOC_CRF).shape == (2, 40, 48)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # not measurable: not checked
    assert dense_crf_numpy(image, probs, VOC_CRF).shape == (2, 40, 48)


def test_the_refinement_crf_out_of_memory_fails_that_image_only(nets, photos, tmp_path, monkeypatch, capsys):
    """Before: the refinement model's CRF aborted the process on the large photo (exit 134)."""
    from weakclip import memory
    from weakclip.crf.pydensecrf_backend import pydensecrf_bytes

    monkeypatch.setattr(memory, "available_bytes", lambda: float(pydensecrf_bytes(40, 48, 4)))
    out = tmp_path / "out"
    argv = ["predict", str(photos), "--checkpoint", str(nets["refine"]), "--out", str(out), "--quiet"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert _one_line(captured.err).startswith(
        f"weakclip predict: 1 failed (of 3 images): {photos / 'b_large.png'}: out of memory for a 128x96 "
        "image processed at its full size (max side 768) on cpu: the dense CRF (pydensecrf2) of 128x96 "
        "pixels and ")
    assert "set a smaller max side, e.g. --max-side 64" in captured.err
    assert sorted(p.name for p in out.glob("*.png")) == ["a_small.png", "a_small_overlay.png", "c_small.png",
                                                         "c_small_overlay.png"]
    assert main([*argv, "--max-side", "48"]) == 0
    assert read_label_png(out / "b_large.png").shape == (96, 128)


# ====================================================================== pieces
def test_out_of_memory_errors_are_recognised():
    from weakclip.errors import OutOfMemory
    from weakclip.memory import available_bytes, human_bytes, is_out_of_memory, oom_reason

    assert is_out_of_memory(RuntimeError(CPU_OOM)) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(OutOfMemory("x"))
    assert not is_out_of_memory(RuntimeError("shapes do not match")) and not is_out_of_memory(ValueError())
    assert oom_reason(RuntimeError(CPU_OOM)) == "29.3 GiB could not be allocated"
    assert oom_reason(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")
                      ) == "2.00 GiB could not be allocated"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2 ** 30) == "3.0 GiB"
    room = available_bytes()
    assert room is None or 0 <= room < 2 ** 50


def test_the_overlay_is_computed_in_strips_with_the_same_values():
    from weakclip.data.classes import voc_palette
    from weakclip.inference.predict import overlay_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 7000, 3), dtype=np.uint8)  # more rows than one strip of 2 MB
    mask = rng.integers(0, 4, (300, 7000), dtype=np.uint8)
    mask[:5] = 255
    for alpha in (0.5, 0.3):
        canvas = np.asarray(overlay_image(image, mask, ["bg", "a", "b", "c"], alpha=alpha))
        colours = voc_palette(256)[mask].astype(np.float32)
        blend = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
        plain = (mask == 0) | (mask == 255)
        expected = np.where(plain[..., None], image, np.clip(np.rint(blend), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(canvas[:, 7000:14000], expected)
        np.testing.assert_array_equal(canvas[:, :7000], image)
