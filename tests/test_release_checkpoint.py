"""The authors' released checkpoints (mmseg layout): key mapping both ways, loading without CLIP weights,
and safe (weights-only) loading of every checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from weakclip.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from weakclip.errors import WeakclipError
from weakclip.inference.loading import load_trained_model
from weakclip.models import ModelConfig, build_model
from weakclip.models.release_checkpoint import (
    RELEASE_COCO_CLASSES,
    RELEASE_VOC_CLASSES,
    from_release_state_dict,
    save_release_checkpoint,
    to_release_state_dict,
)

TINY = dict(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_mode="release")


def _tiny(classes, **overrides):
    model = build_model(ModelConfig(**{**TINY, **overrides}), list(classes), pretrained_download=False)
    with torch.no_grad():  # BN statistics away from (0, 1), so that the test sees them
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


def _images(h=64, w=96):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_release_key_names_and_exact_round_trip():
    model = _tiny(RELEASE_VOC_CLASSES)
    ours = model.state_dict()
    release = to_release_state_dict(ours, text_length=13)
    for key in ("backbone.conv1.weight", "backbone.fpn1.2.running_var", "backbone.fpn1.4.weight",
                "backbone.fpn3.weight", "backbone.fpn4.0.bias", "text_encoder.token_embedding.weight",
                "context_decoder.memory_proj.2.weight",
                "context_decoder.anti_decoder.2.cross_attn.k_proj.weight",
                "context_decoder.anti_out_proj.1.bias", "neck.lateral_convs.3.conv.weight",
                "neck.fpn_convs.0.conv.bias", "decode_head.scale_heads.3.4.bn.running_mean",
                "decode_head.scale_heads.2.2.conv.weight", "decode_head.conv_seg.weight", "gamma", "beta"):
        assert key in release, key
    assert not any(k.startswith(("image_tower", "adapter", "matching", "head.", "prompts")) for k in release)
    assert "text_encoder.logit_scale" not in release
    assert release["contexts"].shape == (1, 8, 32)
    assert release["text_encoder.positional_embedding"].shape == (13, 32)
    assert release["backbone.positional_embedding"].shape == (1 + 32 * 32, 64)  # the stored 32 x 32 grid
    assert torch.equal(release["decode_head.scale_heads.3.4.bn.running_mean"],
                       ours["head.scale_heads.3.9.running_mean"])  # stage 2 of level 3: conv 8, BN 9

    back = from_release_state_dict(release, text_context_length=77)
    assert set(back) == set(ours)
    for key, value in ours.items():
        if key == "text_tower.positional_embedding":  # the release keeps 13 rows; the rest are zeros
            assert torch.equal(back[key][:13], value[:13]) and not back[key][13:].any()
        elif key != "text_tower.logit_scale":
            assert torch.equal(back[key], value), key
    with pytest.raises(WeakclipError, match="does not have"):
        from_release_state_dict({**release, "auxiliary_head.conv_seg.weight": torch.zeros(1)})


@pytest.mark.parametrize("classes", [RELEASE_VOC_CLASSES, RELEASE_COCO_CLASSES], ids=["voc21", "coco91"])
def test_release_file_loads_with_identical_logits_and_no_clip_file(tmp_path, classes):
    model = _tiny(classes)
    path = save_release_checkpoint(tmp_path / "train_iter_8000.pth", model)  # meta CLASSES: the model's
    loaded, cfg = load_trained_model(path)  # no --clip-weights: the file holds the towers
    assert loaded.num_classes == len(classes) and loaded.class_names == model.class_names
    assert cfg.classes == model.class_names and cfg.data.normalize == "imagenet"
    assert cfg.model.match_mode == "release" and cfg.model.double_cls and cfg.model.pos_embed_size == 512
    assert not loaded.training
    for size in ((64, 96), (48, 48)):
        with torch.no_grad():
            expected = model(_images(*size))["logits"]
            got = loaded(_images(*size))["logits"]
        assert got.shape == (2, len(classes), size[0] // 4, size[1] // 4)
        assert torch.equal(got, expected)


def test_release_classes_default_to_the_raw_voc_names(tmp_path):
    model = _tiny(RELEASE_VOC_CLASSES)
    path = save_release_checkpoint(tmp_path / "r.pth", model, meta={"CLASSES": None})
    loaded, _ = load_trained_model(path)
    assert loaded.class_names[11] == "diningtable" and loaded.class_names[20] == "tvmonitor"  # prompted raw
    state = torch.load(path, weights_only=True)
    state["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(7, 256, 1, 1)
    state["state_dict"]["decode_head.conv_seg.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "seven.pth")
    with pytest.raises(WeakclipError, match="7 classes"):
        load_trained_model(tmp_path / "seven.pth")


_RAN = []


def _side_effect(marker):
    _RAN.append(marker)
    return marker


class _Payload:
    def __reduce__(self):
        return (_side_effect, ("ran",))


def test_a_file_needing_other_types_is_refused_without_running_it(tmp_path):
    model = _tiny(RELEASE_VOC_CLASSES)
    path = save_release_checkpoint(tmp_path / "evil.pth", model)
    state = torch.load(path, weights_only=True)
    state["meta"]["hook"] = _Payload()
    torch.save(state, path)
    with pytest.raises(WeakclipError) as err:
        load_trained_model(path)
    message = str(err.value)
    assert "\n" not in message and "allow-list" in message and "_side_effect" in message
    assert _RAN == []  # the pickled call never ran


def test_engine_checkpoints_load_weights_only_and_rng_restores_exactly(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    state = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    content = {"iteration": 3, "model": {}, "rng": [state], "config": {"a": [1, 2]}}
    path = save_checkpoint(tmp_path, content, 3)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert raw["iteration"] == 3
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(load_checkpoint(path)["rng"][0])
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_an_old_pickled_numpy_state_is_refused(tmp_path):
    path = tmp_path / "checkpoints" / "iter_0000001.pth"
    path.parent.mkdir()
    torch.save({"iteration": 1, "model": {}, "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(WeakclipError, match="allow-list"):
        load_checkpoint(path)


@pytest.mark.slow
def test_real_size_release_layout_round_trip():
    from weakclip.models.release_checkpoint import build_release_model

    model = _tiny(RELEASE_VOC_CLASSES, clip_arch="ViT-B/16", out_blocks=(4, 6, 8, 12))
    release = to_release_state_dict(model.state_dict(), text_length=13)
    assert len(release) == 521  # the key count of the release's segmentor at ViT-B/16 (checked side by side)
    assert release["backbone.positional_embedding"].shape == (1025, 768)
    assert release["text_encoder.positional_embedding"].shape == (13, 512)
    assert release["contexts"].shape == (1, 8, 512)
    assert release["neck.lateral_convs.0.conv.weight"].shape == (256, 768 + 21, 1, 1)
    loaded = build_release_model(release, model.class_names)
    assert loaded.cfg.clip_arch == "ViT-B/16" and loaded.cfg.pos_embed_size == 512
    image = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(image)["logits"], model(image)["logits"])
