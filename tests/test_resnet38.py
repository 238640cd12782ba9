"""The authors' retraining network: ResNet-38 and its weights (MXNet .params without MXNet, converted .pth),
DeepLab-v1, its optimiser groups and schedule, BatchNorm handling, checkpoints, the release augmentation and
evaluation, and ``weakclip retrain --eval-only``."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from weakclip.errors import WeakclipError, WeightsError
from weakclip.retrain.augment import ReleaseAugment
from weakclip.retrain.deeplabv1 import (
    DeepLabV1Segmenter,
    ReleasePolySchedule,
    build_deeplabv1,
    load_release_checkpoint,
)
from weakclip.retrain.mxnet_params import read_ndarray_list, resnet38_key
from weakclip.retrain.resnet38 import ResNet38, load_resnet38_weights
from weakclip.retrain.train import apply_retrain_overrides, build_optimizer, load_retrain_preset

#: Width divisor of the networks of the quick tests (the layout of the authors' network at 1/64 of the
#: parameters); the full-size network is built in the slow forward/backward test and on the meta device.
W = 8


@pytest.fixture(autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ====================================================================== an MXNet writer (the test's own)
_FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2, np.dtype("uint8"): 3,
          np.dtype("int32"): 4, np.dtype("int8"): 5, np.dtype("int64"): 6}


def _mx_array(a: np.ndarray, version: str) -> bytes:
    a = np.ascontiguousarray(a)
    if version == "legacy":  # uint32 ndim (no magic), uint32 dims
        head = struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape)
    else:
        shape = struct.pack(f"<i{a.ndim}q", a.ndim, *a.shape)
        if version == "v1":
            head = struct.pack("<I", 0xF993FAC8) + shape
        else:
            head = struct.pack("<Ii", 0xF993FAC9, 0) + shape  # v2: dense storage type 0
    ctx = struct.pack("<ii", 1, 0)  # cpu(0)
    return head + ctx + struct.pack("<i", _FLAGS[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def write_mxnet_params(path: Path, arrays: dict[str, np.ndarray], version: str = "v2") -> Path:
    """MXNet's NDArray-list layout: uint64 0x112, uint64 0, uint64 n + arrays, uint64 n + (uint64 len,
    bytes)."""
    parts = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    parts += [_mx_array(a, version) for a in arrays.values()]
    parts.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        raw = name.encode()
        parts += [struct.pack("<Q", len(raw)), raw]
    path.write_bytes(b"".join(parts))
    return path


_BN_MX = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def mxnet_name(key: str) -> str:
    """The MXNet name of a ResNet-38 key (the inverse of the WSSS converter): b4_3.bn_branch2b1.weight ->
    arg:bn4b3_branch2b1_gamma; running statistics are aux: states."""
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if key.startswith("bn7."):
        leaf = key.split(".")[1]
        return f"{'aux' if leaf.startswith('running') else 'arg'}:bn7_{_BN_MX[leaf]}"
    block, layer, leaf = key.split(".")
    m = re.fullmatch(r"b(\d)(?:_(\d+))?", block)
    unit = f"{m.group(1)}a" if m.group(2) is None else f"{m.group(1)}b{m.group(2)}"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{unit}_{branch}_weight"
    return f"{'aux' if leaf.startswith('running') else 'arg'}:bn{unit}_{branch}_{_BN_MX[leaf]}"


def random_resnet38(seed: int = 0) -> ResNet38:
    torch.manual_seed(seed)
    net = ResNet38(width_divisor=W)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and t.ndim == 1):
                t.normal_(0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return net


# ====================================================================== MXNet format
@pytest.mark.parametrize("version", ["v2", "v1", "legacy"])
def test_mxnet_list_written_and_read_back(tmp_path, version):
    rng = np.random.default_rng(0)
    arrays = {"arg:conv_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "aux:bn_moving_var": rng.random(7).astype(np.float64),
              "arg:half": rng.standard_normal((2, 5)).astype(np.float16),
              "arg:ids": np.arange(6, dtype=np.int64).reshape(3, 2)}
    got = read_ndarray_list(write_mxnet_params(tmp_path / "x.params", arrays, version))
    assert list(got) == list(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_mxnet_reader_rejects_bad_files(tmp_path):
    good = write_mxnet_params(tmp_path / "g.params", {"arg:a": np.ones((2, 2), np.float32)}).read_bytes()
    cases = {"magic": b"\x13" + good[1:], "truncated": good[:-9], "trailing": good + b"\0",
             "tiny": good[:8]}
    for name, raw in cases.items():
        (tmp_path / f"{name}.params").write_bytes(raw)
        with pytest.raises(WeightsError) as info:
            read_ndarray_list(tmp_path / f"{name}.params")
        assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        read_ndarray_list(tmp_path / "none.params")


def test_mxnet_names_to_wsss_keys():
    assert resnet38_key("arg:conv1a_weight") == "conv1a.weight"
    assert resnet38_key("arg:res2a_branch1_weight") == "b2.conv_branch1.weight"
    assert resnet38_key("arg:res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
    assert resnet38_key("arg:bn3b2_branch2a_gamma") == "b3_2.bn_branch2a.weight"
    assert resnet38_key("aux:bn6a_branch2b2_moving_var") == "b6.bn_branch2b2.running_var"
    assert resnet38_key("aux:bn7_moving_mean") == "bn7.running_mean"
    assert resnet38_key("arg:linear1000_weight") is None
    with pytest.raises(WeightsError, match="not a ResNet-38 parameter"):
        resnet38_key("arg:stage1_conv_weight")


def test_resnet38_loads_mxnet_params_and_converted_pth(tmp_path):
    src = random_resnet38(1)
    state = src.state_dict()
    arrays = {mxnet_name(k): v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(arrays) == len({resnet38_key(n) for n in arrays})  # the two directions agree, no collisions
    arrays["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)[:2]  # classifier: dropped
    arrays["arg:linear1000_bias"] = np.zeros(2, np.float32)
    params = write_mxnet_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", arrays)
    # the WSSS projects' converted .pth: the same keys, optionally under module.
    pth = tmp_path / "res38.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, pth)
    x = torch.randn(1, 3, 40, 40)
    src.eval()
    want = src(x)
    for path in (params, pth):
        net = ResNet38(width_divisor=W)
        load_resnet38_weights(net, path)
        for k, v in state.items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(net.state_dict()[k], v), k
        net.eval()
        assert torch.equal(net(x), want)
    assert want.shape == (1, 4096 // W, 5, 5)  # output stride 8


def test_full_size_layout_names_and_shapes():
    """The authors' full-size network (on the meta device: shapes only): every key has an MXNet name that
    maps back to it, and the release checkpoint's keys are the network's."""
    with torch.device("meta"):
        backbone = ResNet38()
        model = build_deeplabv1(21, pretrained_backbone=False)
    keys = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 43 + 4 * 37  # 43 convolutions (no bias), 37 BatchNorms (weight, bias, mean, var)
    assert len(model.net.state_dict()) == 242  # + num_batches_tracked, + the head's 14 tensors
    assert all(resnet38_key(mxnet_name(k)) == k for k in keys)
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert shapes["conv1a.weight"] == (64, 3, 3, 3)
    assert shapes["b7.conv_branch2b2.weight"] == (4096, 2048, 1, 1)
    assert shapes["b5.conv_branch2a.weight"] == (512, 512, 3, 3) and shapes["bn7.running_var"] == (4096,)
    n = sum(p.numel() for p in model.parameters())
    assert 120e6 < n < 130e6  # ResNet-38 (~105M) + LargeFOV head (~19M)


def test_resnet38_weights_errors(tmp_path):
    state = random_resnet38(2).state_dict()
    del state["b4_2.conv_branch2a.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"1 missing.*b4_2.conv_branch2a.weight") as info:
        load_resnet38_weights(ResNet38(width_divisor=W), tmp_path / "partial.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="ilsvrc-cls_rna-a1_cls1000_ep-0001.params") as info:
        build_deeplabv1(21)  # no file: no download exists
    assert "\n" not in str(info.value) and "--backbone-weights" in str(info.value)


# ====================================================================== the network
@pytest.mark.slow
def test_full_network_forward_backward_at_448():
    torch.manual_seed(0)
    model = build_deeplabv1(21, pretrained_backbone=False)
    model.train()
    x = torch.randn(1, 3, 448, 448)
    target = torch.randint(0, 21, (1, 448, 448))
    logits = model(x)
    assert logits.shape == (1, 21, 448, 448)
    nn.functional.cross_entropy(logits, target).backward()
    for name in ("backbone.conv1a.weight", "backbone.b7.conv_branch2b2.weight", "conv_fov.weight",
                 "cls_conv.bias"):
        grad = dict(model.net.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_head_layout_and_release_keys():
    torch.manual_seed(0)
    model = build_deeplabv1(5, pretrained_backbone=False, width_divisor=W)
    net = model.net
    assert net.conv_fov.dilation == (12, 12) and net.conv_fov.padding == (12, 12)
    assert net.conv_fov.bias is None
    assert net.conv_fov2.kernel_size == (1, 1) and net.cls_conv.out_channels == 5
    keys = set(net.state_dict())
    assert {"backbone.conv1a.weight", "backbone.b4_5.bn_branch2b1.running_var", "backbone.bn7.weight",
            "conv_fov.weight", "bn_fov.running_mean", "bn_fov2.weight", "cls_conv.weight",
            "cls_conv.bias"} <= keys
    assert all(m.momentum == 3e-4 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    model.eval()
    x = torch.randn(1, 3, 35, 45)
    y = model(x)
    assert y.shape == (1, 5, 35, 45)
    # the logits are upsampled with align_corners=True: corners equal the low-resolution corners
    low = net.cls_conv(net.dropout1(torch.relu(net.bn_fov2(net.conv_fov2(torch.relu(net.bn_fov(
        net.conv_fov(net.backbone(x)))))))))
    assert torch.allclose(y[..., 0, 0], low[..., 0, 0], atol=1e-5)
    assert torch.allclose(y[..., -1, -1], low[..., -1, -1], atol=1e-5)


def _release_cfg(*extra: str):
    return apply_retrain_overrides(load_retrain_preset("voc"), ["model.pretrained_backbone=false", *extra])


def test_param_groups_and_learning_rates():
    torch.manual_seed(0)
    model = build_deeplabv1(21, pretrained_backbone=False, width_divisor=W)
    cfg = _release_cfg("train.lr=0.01", "train.iters=100", "train.batch_size=10")
    optimizer, schedule = build_optimizer(model, cfg, train_size=250)  # an epoch = 25 iterations
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone_weight", "backbone_bias", "head_weight", "head_bias", "stem"]
    net = model.net
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in groups["backbone_weight"]["params"]} == {id(m.weight) for m in convs[1:]}
    assert groups["backbone_bias"]["params"] == []  # ResNet-38 convolutions have no bias
    head = {id(net.conv_fov.weight), id(net.conv_fov2.weight), id(net.cls_conv.weight)}
    assert {id(p) for p in groups["head_weight"]["params"]} == head
    assert [id(p) for p in groups["head_bias"]["params"]] == [id(net.cls_conv.bias)]
    assert groups["stem"]["params"][0] is net.backbone.conv1a.weight
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    bn_params = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn_params and not any(id(p) in in_groups for p in bn_params)
    assert groups["head_bias"]["weight_decay"] == 0.0 and groups["backbone_bias"]["weight_decay"] == 0.0
    assert groups["head_weight"]["weight_decay"] == pytest.approx(5e-4)  # the optimizer's
    for it in (0, 10, 60, 100):
        schedule.set_iteration(it)
        base = 0.01 * (1 - it / 101) ** 0.9
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["backbone_weight"] == pytest.approx(base)
        assert lrs["backbone_bias"] == pytest.approx(2 * base)
        assert lrs["head_weight"] == pytest.approx(10 * base)
        assert lrs["head_bias"] == pytest.approx(20 * base)
        assert lrs["stem"] == (pytest.approx(base) if it < 25 else 0.0)
    assert schedule.lr_at(100) > 0  # the "+ 1": the last iteration still moves
    assert ReleasePolySchedule(optimizer, 1.0, 9, 1.0).lr_at(9) == pytest.approx(0.1)


def test_bn_affine_fixed_and_running_stats_with_momentum():
    torch.manual_seed(0)
    model = build_deeplabv1(3, pretrained_backbone=False, width_divisor=W)
    cfg = _release_cfg("train.lr=0.1")
    optimizer, schedule = build_optimizer(model, cfg, train_size=100)
    schedule.set_iteration(0)
    net = model.net
    bn = net.backbone.b3.bn_branch2a
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 40, 40)
    model.train()
    # the batch statistics the first BN of b3 sees, computed with a hook during the same forward
    seen = {}

    def keep_input(module, inputs, output) -> None:  # returns None: the output is left as it is
        seen["x"] = inputs[0].detach().clone()

    hook = bn.register_forward_hook(keep_input)
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (2, 40, 40)))
    hook.remove()
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
            assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"]), name
    assert not torch.equal(after["conv_fov.weight"], before["conv_fov.weight"])
    conv = "backbone.b2.conv_branch2a.weight"
    assert not torch.equal(after[conv], before[conv])
    xin = seen["x"]
    n = xin.numel() / xin.shape[1]
    mean, var = xin.mean(dim=(0, 2, 3)), xin.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
    m = 3e-4
    prev = "backbone.b3.bn_branch2a"
    old_mean, old_var = before[f"{prev}.running_mean"], before[f"{prev}.running_var"]
    torch.testing.assert_close(after[f"{prev}.running_mean"], (1 - m) * old_mean + m * mean)
    torch.testing.assert_close(after[f"{prev}.running_var"], (1 - m) * old_var + m * var)


# ====================================================================== checkpoints
def test_release_checkpoint_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    src = build_deeplabv1(4, pretrained_backbone=False, width_divisor=W)
    with torch.no_grad():
        for k, v in src.net.state_dict().items():
            if k.endswith("running_mean"):
                v.normal_(0, 0.1)
    src.eval()
    x = torch.randn(1, 3, 48, 40)
    want = src(x)
    # the release: torch.save(net.module.state_dict()) (no prefix); a DataParallel save would add module.
    plain, prefixed = tmp_path / "deeplabv1_resnet38_VOCDataset_itr40000_all.pth", tmp_path / "dp.pth"
    torch.save(src.net.state_dict(), plain)
    torch.save({f"module.{k}": v for k, v in src.net.state_dict().items()}, prefixed)
    for path in (plain, prefixed):
        torch.manual_seed(1)
        dst = build_deeplabv1(4, pretrained_backbone=False, width_divisor=W)
        load_release_checkpoint(dst, path)
        dst.eval()
        assert torch.equal(dst(x), want)
    # another class count: one line naming cls_conv
    other = build_deeplabv1(6, pretrained_backbone=False, width_divisor=W)
    with pytest.raises(WeightsError, match="cls_conv") as info:
        load_release_checkpoint(other, plain)
    assert "\n" not in str(info.value)


def test_checkpoint_needing_pickles_is_refused(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    model = build_deeplabv1(3, pretrained_backbone=False, width_divisor=W)
    with pytest.raises(WeightsError, match="arbitrary pickled objects") as info:
        load_release_checkpoint(model, path)
    assert "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(WeightsError):
        load_release_checkpoint(model, tmp_path / "junk.pth")


# ====================================================================== augmentation
def test_release_augment_crop_padding_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    seed = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    aug = ReleaseAugment(crop_size=64, scale_range=(1.0, 1.0), hsv=(0, 0, 0), flip_prob=0.0)
    out = aug({"image": image, "seed": seed, "id": "a"}, rng=np.random.default_rng(3))
    img, mask = out["image"], out["seed"]
    assert img.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    inside = mask != 255
    assert int(inside.sum()) == 30 * 40  # the whole image is inside, the rest ignored
    assert torch.all(img[:, ~inside] == 0)  # padding is 0 after normalisation (the mean colour)
    rows, cols = torch.nonzero(inside, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    assert torch.equal(mask[top:top + 30, left:left + 40], torch.from_numpy(seed.astype(np.int64)))
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    expect = (image.astype(np.float32) - mean) / std
    window = img[:, top:top + 30, left:left + 40].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(window, expect, atol=1e-5)
    full = ReleaseAugment(crop_size=24)
    a = full({"image": image, "seed": seed}, rng=np.random.default_rng(7))
    b = full({"image": image, "seed": seed}, rng=np.random.default_rng(7))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["seed"], b["seed"])
    assert set(torch.unique(a["seed"]).tolist()) <= {0, 1, 2, 3, 255}


# ====================================================================== presets, eval-only
def test_release_presets():
    voc, coco = load_retrain_preset("voc"), load_retrain_preset("coco")
    for cfg in (voc, coco):
        assert cfg.model.name == "deeplabv1_resnet38" and cfg.model.bn_momentum == 3e-4
        d, t = cfg.data, cfg.train
        assert (d.crop_size, d.scale_range, d.hsv_jitter) == (448, (0.5, 1.5), (10, 10, 10))
        assert (d.pipeline, t.schedule, t.batch_size) == ("release", "poly_release", 10)
        assert (cfg.train.weight_decay, cfg.train.amp) == (5e-4, "none")
        assert cfg.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5) and cfg.eval.flip and cfg.eval.crf
        assert (cfg.eval.fuse, cfg.eval.resize, cfg.eval.align_corners, cfg.eval.crf_classes) == (
            "logits", "opencv", True, "present")
    assert (voc.train.lr, voc.train.iters, voc.eval.crf_params) == (1e-3, 40000, "release_voc")
    assert (coco.train.lr, coco.train.iters, coco.eval.crf_params) == (1.5e-3, 160000, "release_coco")
    with pytest.raises(WeakclipError, match="voc-plus"):
        load_retrain_preset("voc-pls")


def test_eval_only_on_synthetic_data(tmp_path, capsys):
    from weakclip.cli import main
    from weakclip.data.datasets import build_dataset
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.retrain.evaluate import evaluate_segmenter

    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=2, image_size=(40, 48), n_classes=4,
                                  seed=0)
    val = build_dataset("folder", root, split="val", with_gt=True)
    torch.manual_seed(0)
    model = build_deeplabv1(val.num_classes, pretrained_backbone=False, width_divisor=W)
    ckpt = tmp_path / "released.pth"
    torch.save(model.net.state_dict(), ckpt)
    work = tmp_path / "w"
    args = ["retrain", "--preset", "voc", "--eval-only", "--checkpoint", str(ckpt), "--data-root", str(root),
            "--dataset", "folder", "--val-split", "val", "--workdir", str(work), "--quiet", "--set",
            "eval.scales=1.0,0.75", "--set", "data.num_workers=0", "--set", f"model.width_divisor={W}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out  # the per-class table and the summary line, then the JSON
    printed = json.loads(out[out.index("{"):])
    record = json.loads((work / "eval.json").read_text())
    assert record["images"] == 2 and record["flip"] is True and record["crf_classes"] == "present"
    assert record["crf"]["bilateral_sxy"] == 112.0 and record["fuse"] == "logits"
    assert printed["val_miou"] == record["miou"]
    model.eval()
    scores, _ = evaluate_segmenter(model, val, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                                   scales=(1.0, 0.75), flip=True, crf=None, progress=False, fuse="logits",
                                   resize="opencv", align_corners=True)
    # same network, same probabilities: without the CRF the CLI gives the direct evaluation's mIoU
    assert main(args + ["--set", "eval.crf=false"]) == 0
    capsys.readouterr()
    assert json.loads((work / "eval.json").read_text())["miou"] == pytest.approx(100 * scores.miou, abs=1e-4)
    # errors: no checkpoint; a checkpoint of another class count
    assert main(args[:4] + args[6:]) == 2
    assert "--eval-only needs --checkpoint" in capsys.readouterr().err
    other = build_deeplabv1(7, pretrained_backbone=False, width_divisor=W)
    torch.save(other.net.state_dict(), tmp_path / "other.pth")
    assert main([*args[:5], str(tmp_path / "other.pth"), *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "cls_conv" in err and f"{val.num_classes} classes" in err and "\n" not in err.strip()


def test_model_is_a_segmenter_with_the_dataset_class_count():
    model = build_deeplabv1(91, pretrained_backbone=False, width_divisor=W)
    assert isinstance(model, DeepLabV1Segmenter) and model.num_classes == 91
    assert model.net.cls_conv.out_channels == 91


def test_release_training_run_on_synthetic_data(tmp_path):
    """The voc preset end to end (narrow network): release augmentation, groups, schedule, conv1a frozen
    after the first epoch, BN affine never updated, then the release evaluation with the CRF."""
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.retrain.train import retrain

    root = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=2, image_size=(40, 48), n_classes=3,
                                  seed=1)
    cfg = _release_cfg("data.kind=folder", f"data.root={root}", "data.split=train", "data.val_split=val",
                       f"model.width_divisor={W}", "data.crop_size=32", "data.num_workers=0", "train.iters=4",
                       "train.batch_size=2", "train.checkpoint_every=1", "train.keep_checkpoints=4",
                       "train.lr=0.01", "eval.scales=1.0")
    work = tmp_path / "w"
    summary = retrain(cfg, root / "masks", workdir=work, progress=False, quiet=True)
    assert summary["finished"] and summary["end_iter"] == 4
    record = json.loads((work / "eval.json").read_text())
    assert record["crf_classes"] == "present" and record["crf"]["bilateral_srgb"] == 2.0
    states = [torch.load(work / "checkpoints" / f"iter_{i:07d}.pth", weights_only=False)["model"]
              for i in (1, 2, 3, 4)]
    # our own checkpoints load under weights_only too (RNG states stored as plain values): --eval-only
    own = build_deeplabv1(4, pretrained_backbone=False, width_divisor=W)
    load_release_checkpoint(own, work / "checkpoints" / "iter_0000004.pth")
    assert all(torch.equal(v, states[3]["net." + k]) for k, v in own.net.state_dict().items())
    stem = "net.backbone.conv1a.weight"
    assert not torch.equal(states[0][stem], states[1][stem])  # iterations 0-1: the first epoch (4 // 2)
    assert torch.equal(states[1][stem], states[2][stem]) and torch.equal(states[2][stem], states[3][stem])
    conv = "net.backbone.b3.conv_branch2a.weight"
    assert not torch.equal(states[2][conv], states[3][conv])
    for k, v in states[3].items():
        if ".bn" in k and k.endswith(".weight"):
            assert torch.all(v == 1), k
        elif ".bn" in k and k.endswith(".bias"):
            assert torch.all(v == 0), k


def test_missing_resnet38_weights_stop_before_any_work(tmp_path, capsys):
    from weakclip.cli import main
    from weakclip.retrain.train import check_backbone_weights

    voc = load_retrain_preset("voc")
    with pytest.raises(WeightsError, match="ilsvrc-cls_rna-a1_cls1000_ep-0001.params"):
        check_backbone_weights(voc)
    with pytest.raises(WeightsError, match="not found"):
        missing = tmp_path / "x.params"
        check_backbone_weights(apply_retrain_overrides(voc, [f"model.backbone_weights={missing}"]))
    check_backbone_weights(apply_retrain_overrides(voc, ["model.pretrained_backbone=false"]))
    (tmp_path / "masks").mkdir()
    (tmp_path / "data").mkdir()
    assert main(["retrain", "--preset", "coco", "--masks", str(tmp_path / "masks"), "--data-root",
                 str(tmp_path / "data"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()
