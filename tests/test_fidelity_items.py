"""Small fidelity items: MXNet V3 0-d arrays, our checkpoints under weights_only loading, the loss when
every label is ignored (docs/method.md)."""

import struct

import numpy as np
import pytest
import torch

from weakclip.errors import WeightsError
from weakclip.retrain.mxnet_params import read_ndarray_list

V2, V3 = 0xF993FAC9, 0xF993FACA


# ====================================================================== MXNet NDArray V3 (numpy semantics)
def _dense(magic: int, dims: tuple[int, ...], payload: bytes = b"", flag: int = 0, ndim: int | None = None):
    """One array as MXNet's NDArray::Save writes it: magic, storage type 0, int32 ndim + int64 dims, then
    (unless the array is "none") int32 device type/id, int32 type flag, raw data."""
    ndim = len(dims) if ndim is None else ndim
    out = struct.pack("<Iii", magic, 0, ndim) + struct.pack(f"<{len(dims)}q", *dims)
    if payload is None:
        return out
    return out + struct.pack("<iii", 1, 0, flag) + payload


def _list(arrays: list[bytes], names: list[str]) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(arrays)) + b"".join(arrays) + struct.pack("<Q", len(names))
    for n in names:
        out += struct.pack("<Q", len(n)) + n.encode()
    return out


def test_v3_zero_dim_array_is_a_scalar(tmp_path):
    block = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    raw = _list([
        _dense(V3, (), struct.pack("<f", 2.5)),  # 0-d: one element follows
        _dense(V3, (2, 3), block.tobytes()),
        _dense(V3, (0, 3), b"", flag=6),  # zero-size int64: context + type, no data
        _dense(V3, (4, -1), None),  # an unknown dim: "none", nothing follows
        _dense(V3, (), struct.pack("<q", -3), flag=6),
    ], ["arg:scale", "arg:w", "aux:empty", "aux:unknown", "aux:count"])
    (tmp_path / "v3.params").write_bytes(raw)
    got = read_ndarray_list(tmp_path / "v3.params")
    assert got["arg:scale"].shape == () and got["arg:scale"].dtype == np.float32 and got["arg:scale"] == 2.5
    np.testing.assert_array_equal(got["arg:w"], block)
    assert got["aux:empty"].shape == (0, 3) and got["aux:empty"].dtype == np.int64
    assert got["aux:unknown"].size == 0
    assert got["aux:count"].shape == () and int(got["aux:count"]) == -3


def test_v2_zero_dim_is_a_none_array_and_bad_ndim_is_refused(tmp_path):
    raw = _list([_dense(V2, (), None), _dense(V2, (3,), np.ones(3, np.float32).tobytes())], ["a", "b"])
    (tmp_path / "v2.params").write_bytes(raw)
    got = read_ndarray_list(tmp_path / "v2.params")
    assert got["a"].size == 0 and got["b"].tolist() == [1.0, 1.0, 1.0]
    (tmp_path / "bad.params").write_bytes(_list([_dense(V3, (), None, ndim=-1)], ["x"]))
    with pytest.raises(WeightsError, match="unknown number of dimensions") as info:
        read_ndarray_list(tmp_path / "bad.params")
    assert "\n" not in str(info.value)


# ====================================================================== our checkpoints under weights_only
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from weakclip.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=4, n_val=2, image_size=(40, 48),
                                  n_classes=3, seed=1)


def _assert_plain_checkpoint(path):
    raw = torch.load(path, map_location="cpu", weights_only=True)  # torch itself, no allow-list
    numpy_rng = raw["rng"][0]["numpy"]
    assert isinstance(numpy_rng, dict) and torch.is_tensor(numpy_rng["key"])
    assert raw["iteration"] >= 1 and all(torch.is_tensor(v) for v in raw["model"].values())
    return raw


def test_refinement_checkpoints_load_with_weights_only(synth, tmp_path, one_thread):
    from weakclip.config import apply_overrides, load_preset
    from weakclip.engine.trainer import train

    cfg = apply_overrides(load_preset("voc"), [
        "data.kind=folder", f"data.root={synth}", "data.split=train", "data.crop_size=32", "data.scale=48,32",
        "data.num_workers=0", "model.clip_arch=tiny", "model.out_blocks=1,2,3,4", "model.neck_channels=16",
        "model.head_channels=16", "model.match_width=16", "model.match_layers=1", "train.iters=1",
        "train.batch_size=2", "train.warmup_iters=0", "loss.loss_size=16", "classes=none"])
    summary = train(cfg, tmp_path / "refine", device="cpu", progress=False)
    _assert_plain_checkpoint(summary["checkpoint"])


def test_retraining_checkpoints_load_with_weights_only(synth, tmp_path, one_thread):
    from weakclip.retrain.deeplabv1 import build_deeplabv1, load_release_checkpoint
    from weakclip.retrain.train import apply_retrain_overrides, load_retrain_preset, retrain

    cfg = apply_retrain_overrides(load_retrain_preset("voc"), [
        "model.pretrained_backbone=false", "model.width_divisor=8", "data.kind=folder", f"data.root={synth}",
        "data.split=train", "data.val_split=val", "data.crop_size=32", "data.num_workers=0", "train.iters=1",
        "train.batch_size=2", "eval.scales=1.0", "eval.flip=false", "eval.crf=false"])
    work = tmp_path / "retrain"
    retrain(cfg, synth / "masks", workdir=work, progress=False, quiet=True)
    raw = _assert_plain_checkpoint(work / "checkpoints" / "iter_0000001.pth")
    own = build_deeplabv1(4, pretrained_backbone=False, width_divisor=8)  # what --eval-only --checkpoint does
    load_release_checkpoint(own, work / "checkpoints" / "iter_0000001.pth")
    assert all(torch.equal(v, raw["model"]["net." + k]) for k, v in own.net.state_dict().items())


# ====================================================================== every label ignored
def test_retraining_loss_with_every_pixel_ignored_is_zero_where_the_release_gives_nan():
    from weakclip.retrain.train import cross_entropy_step

    model = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 8, 8)
    target = torch.full((2, 8, 8), 255, dtype=torch.long)
    # the release's criterion (deeplabv1-resnet38 tools/train.py): nn.CrossEntropyLoss(ignore_index=255)
    assert torch.isnan(torch.nn.CrossEntropyLoss(ignore_index=255)(model(image), target))
    loss = cross_entropy_step(model, {"image": image, "seed": target}, 0)["loss"]
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    # with one labelled pixel it is the library's loss again
    target[0, 3, 4] = 2
    ours = cross_entropy_step(model, {"image": image, "seed": target}, 0)["loss"]
    torch.testing.assert_close(ours, torch.nn.CrossEntropyLoss(ignore_index=255)(model(image), target))


def test_refinement_losses_with_every_seed_unsure_are_zero_as_the_release():
    from weakclip.losses import identity_loss, seed_one_hot, seeding_loss, softmax_probs

    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    seeds = torch.full((2, 6, 6), 255)
    # the release's seeding loss divides by max(count, 1e-4) (dgcnutils.dgcn_cal_seeding_loss): 0 here
    assert seeding_loss(softmax_probs(logits), seed_one_hot(seeds, 3)).item() == 0.0
    # mmseg 0.19's cross-entropy averages over all pixels: 0 / N = 0; the -plus mean over valid pixels: 0 too
    for mean_over in ("all", "valid"):
        loss = identity_loss(logits, seeds, mean_over=mean_over)
        assert torch.isfinite(loss) and loss.item() == 0.0
