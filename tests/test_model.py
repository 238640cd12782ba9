"""The WeakCLIP refinement model: full-size ViT-B/16 check plus fast tiny-arch unit tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weakclip.data.classes import VOC_CLASSES
from weakclip.errors import WeakclipError
from weakclip.models import (
    CoAttentionMatching,
    FPNNeck,
    ModelConfig,
    PromptLearner,
    PyramidAdapter,
    SemanticFPNHead,
    WeakCLIP,
    build_clip,
    build_model,
)

K = len(VOC_CLASSES)  # 21
TINY = dict(clip_arch="tiny", out_blocks=(1, 2, 3, 4))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_model(**overrides) -> WeakCLIP:
    cfg = ModelConfig(**{**TINY, **overrides})
    return build_model(cfg, VOC_CLASSES, pretrained_download=False)


# ------------------------------------------------------------------------------------ full size

# Trainable parameters of the ViT-B/16 VOC model (width 768, embed 512, text width 512, K = 21),
# counted by hand from the spec:
#   adapter:   4 GroupNorm(1, 768)                    4 * 2*768              =     6,144
#              L1: ConvT(768,768,2) x2 + BN(768)       2*(768*768*4 + 768) + 2*768 = 4,721,664
#              L2: ConvT(768,768,2)                   768*768*4 + 768        = 2,360,064
#                                                                      total  = 7,087,872
#   prompts:   8 context vectors x 512                                        =     4,096
#   matching:  visual proj LN(512) + Linear(512,256) + LN(256) = 1,024 + 131,328 + 512 = 132,864
#              text proj   LN(512) + Linear(512,256)           = 1,024 + 131,328       = 132,352
#              decoder layer: self-attn q,k,v 3*256*256 (no bias, as the release) + proj 256*256+256
#                               = 262,400; cross-attn the same 262,400; 3 LN(256) 1,536;
#                               MLP 256*1024+1024 + 1024*256+256 = 525,568 -> 1,051,904 per layer
#              2 decoders x 3 layers = 6 * 1,051,904                               = 6,311,424
#              2 out proj LN(256) + Linear(256,512) = 2 * (512 + 131,584)          =   264,192
#              gamma 512 + beta 512                                                 =     1,024
#                                                                      total  = 6,841,856
#   neck:      4 lateral Conv1x1(789 -> 256) = 4 * (789*256 + 256)       =   808,960
#              4 output Conv3x3(256 -> 256)  = 4 * (256*256*9 + 256)     = 2,360,320
#                                                                      total  = 3,169,280
#   head:      1 + 1 + 2 + 3 = 7 x [Conv3x3(256,256, no bias) + BN(256)] = 7 * 590,336 = 4,132,352
#              classifier Conv1x1(256 -> 21) = 256*21 + 21                 =     5,397
#                                                                      total  = 4,137,749
#   sum: 7,087,872 + 4,096 + 6,841,856 + 3,169,280 + 4,137,749 = 21,240,853
VITB16_VOC_TRAINABLE = 21_240_853


@pytest.mark.slow
def test_full_size_vitb16_forward_backward():
    # the -plus model (frozen towers, chained matching): the hand count above is its trainable part
    plus = build_model(ModelConfig(freeze_towers=True, match_mode="chain"), VOC_CLASSES,
                       pretrained_download=False)
    assert plus.num_trainable_parameters() == VITB16_VOC_TRAINABLE
    del plus
    # the release's model (the defaults): the towers train too (in the lr_mult=0 group), random CLIP weights
    model = build_model(ModelConfig(), VOC_CLASSES, pretrained_download=False)
    assert model.num_classes == K
    towers = n_params(model.image_tower) + n_params(model.text_tower)
    assert model.num_trainable_parameters() == VITB16_VOC_TRAINABLE + towers
    assert n_params(model.adapter) == 7_087_872
    assert n_params(model.prompts) == 4_096
    assert n_params(model.matching) == 6_841_856
    assert n_params(model.neck) == 3_169_280
    assert n_params(model.head) == 4_137_749
    assert "image_tower" in model.parameter_summary()

    model.train()
    assert model.image_tower.training and not model.text_tower.training
    out = model(torch.randn(1, 3, 512, 512))
    assert out["logits"].shape == (1, K, 128, 128)
    assert out["score_map"].shape == (1, K, 32, 32)
    assert out["score_logits"].shape == (1, K, 32, 32)
    (out["logits"].logsumexp(1).mean() + out["score_logits"].logsumexp(1).mean()).backward()

    # the release: only the last matching layer of each decoder runs; the text tower's logit_scale is unused
    unused = ("matching.text_decoder.layers.0.", "matching.text_decoder.layers.1.",
              "matching.visual_decoder.layers.0.", "matching.visual_decoder.layers.1.",
              "text_tower.logit_scale")
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        if name.startswith(unused):
            assert p.grad is None, f"unused {name} got a gradient"
        else:
            assert p.grad is not None, f"trainable {name} got no gradient"
    assert model.image_tower.visual.conv1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ modules


def test_adapter_levels_and_strides():
    adapter = PyramidAdapter(64)
    feats = [torch.randn(2, 64, 4, 6) for _ in range(4)]
    shapes = [tuple(x.shape) for x in adapter(feats)]
    assert shapes == [(2, 64, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    c = 64
    expected = 4 * 2 * c + 3 * (c * c * 4 + c) + 2 * c  # 4 GN, 3 ConvT, 1 BN
    assert n_params(adapter) == expected
    with pytest.raises(WeakclipError):
        adapter(feats[:3])


@pytest.fixture(scope="module")
def tiny_towers():
    return build_clip("tiny", pretrained_download=False)


def test_prompt_learner(tiny_towers):
    _, text = tiny_towers
    prompts = PromptLearner(["background", "dining table", "cat"], text)
    assert prompts.context.shape == (8, text.width)
    # the release's init: trunc-normal, std 1, cut at +-2 (the std of that truncated law is about 0.88)
    assert prompts.context.abs().max() <= 2.0
    assert 0.7 < prompts.context.std().item() < 1.05
    small = PromptLearner(["cat"], text, ctx_init_std=0.02)
    assert small.context.abs().max() <= 0.04 + 1e-6
    assert prompts.name_token_ids.shape == (3, 5)
    assert prompts.total_length == 13
    emb = prompts(text)
    assert emb.shape == (3, text.embed_dim)
    emb.sum().backward()
    assert prompts.context.grad is not None and prompts.context.grad.abs().sum() > 0
    with pytest.raises(WeakclipError):
        PromptLearner(["a very long class name that cannot fit"], text)
    assert PromptLearner(["a very long class name"], text, truncate_names=True).name_token_ids.shape == (1, 5)


def test_matching_shapes_and_gamma_beta_init():
    matching = CoAttentionMatching(32, 64, 4, 2, 0.1)
    assert torch.equal(matching.gamma, torch.full((32,), 0.1))
    assert torch.equal(matching.beta, torch.full((32,), 0.1))
    text, visual = torch.randn(5, 32), torch.randn(2, 17, 32)
    t, v = matching(text, visual)
    assert t.shape == (2, 5, 32) and v.shape == (2, 17, 32)
    with pytest.raises(WeakclipError):
        matching(text, torch.randn(2, 17, 31))
    with pytest.raises(WeakclipError):
        CoAttentionMatching(32, mode="bogus")


def test_matching_zero_gamma_beta_is_identity():
    matching = CoAttentionMatching(32, 64, 4, 2, 0.1, gamma_init=0.0)
    text, visual = torch.randn(2, 5, 32), torch.randn(2, 17, 32)
    t, v = matching(text, visual)
    assert torch.equal(t, text) and torch.equal(v, visual)
    with torch.no_grad():
        matching.gamma.fill_(0.1)
    t, _ = matching(text, visual)
    assert not torch.allclose(t, text)


def test_matching_release_vs_chain():
    chain = CoAttentionMatching(32, 64, 4, 3, 0.1, mode="chain").eval()
    release = CoAttentionMatching(32, 64, 4, 3, 0.1, mode="release").eval()
    release.load_state_dict(chain.state_dict())  # same parameters, same names
    assert n_params(chain) == n_params(release)
    assert not chain.has_unused_parameters and chain.unused_parameter_names() == []
    assert release.has_unused_parameters

    text, visual = torch.randn(2, 5, 32), torch.randn(2, 17, 32)
    t_chain, v_chain = chain(text, visual)
    t_rel, v_rel = release(text, visual)
    assert not torch.allclose(t_chain, t_rel) and not torch.allclose(v_chain, v_rel)

    # release == the last layer on the projected input
    with torch.no_grad():
        vt, tt = release.visual_proj(visual), release.text_proj(text)
        t_ref = text + release.gamma * release.text_out(release.text_decoder.layers[-1](tt, vt))
        v_ref = visual + release.beta * release.visual_out(release.visual_decoder.layers[-1](vt, tt))
    torch.testing.assert_close(t_rel, t_ref)
    torch.testing.assert_close(v_rel, v_ref)

    (t_rel.sum() + v_rel.sum()).backward()
    no_grad = {n for n, p in release.named_parameters() if p.grad is None}
    assert no_grad == set(release.unused_parameter_names()) and no_grad
    (t_chain.sum() + v_chain.sum()).backward()
    assert all(p.grad is not None for p in chain.parameters())


def test_neck_and_head_shapes():
    feats = [torch.randn(2, 40, s, s) for s in (16, 8, 4, 2)]
    neck = FPNNeck([40] * 4, 32)
    outs = neck(feats)
    assert [tuple(x.shape) for x in outs] == [(2, 32, s, s) for s in (16, 8, 4, 2)]
    head = SemanticFPNHead(32, 7, 24)
    convs = [sum(isinstance(m, nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
    assert convs == [1, 1, 2, 3]
    assert head(outs).shape == (2, 7, 16, 16)


# ------------------------------------------------------------------------------------ model


def test_tiny_model_non_square_and_outputs():
    model = tiny_model().eval()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["logits"].shape == (2, K, 16, 24)
    assert out["score_map"].shape == (2, K, 4, 6)
    torch.testing.assert_close(out["score_logits"], out["score_map"] / 0.07)
    score = out["score_map"]
    assert score.min() >= -1 - 1e-5 and score.max() <= 1 + 1e-5
    assert score.abs().max() > 0


def test_score_map_is_cosine():
    model = tiny_model(gamma_init=0.0).eval()  # matching is then the identity
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        dense = model.image_tower(images, model.cfg.out_blocks).dense_embed
        text = model.text_embeddings()
    ref = torch.nn.functional.cosine_similarity(dense[:, None], text[None, :, :, None, None], dim=2)
    torch.testing.assert_close(out["score_map"], ref, atol=1e-5, rtol=1e-4)


def test_bn_eval_keeps_running_stats():
    model = tiny_model(bn_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    model(torch.randn(2, 3, 64, 64))
    for m, (mean, var) in zip(bns, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)

    moving = tiny_model(bn_eval=False).train()
    bn = next(m for m in moving.modules() if isinstance(m, nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    moving(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, mean)


def test_train_mode_policy():
    model = tiny_model()
    model.train()
    assert model.training and model.matching.training and model.head.training
    assert model.image_tower.training  # drop path 0.1 acts during training
    assert not model.text_tower.training
    assert not any(m.training for m in model.text_tower.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    no_drop = build_model(
        ModelConfig(**TINY, drop_path_rate=0.0), VOC_CLASSES, pretrained_download=False
    ).train()
    assert not no_drop.image_tower.training


def test_frozen_towers_not_updated_by_optimizer_step():
    model = tiny_model(freeze_towers=True).train()
    towers = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("image_", "text_"))}
    head_w = model.head.classifier.weight.detach().clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    (out["logits"].logsumexp(1).mean() + out["score_logits"].logsumexp(1).mean()).backward()
    opt.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in towers.items())
    assert not torch.equal(model.head.classifier.weight, head_w)
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(p.grad is None for p in model.text_tower.parameters())


def test_frozen_no_grad_flag_and_input_gradients():
    torch.manual_seed(1)
    a = tiny_model().eval()
    b = tiny_model(frozen_no_grad=False).eval()
    b.load_state_dict(a.state_dict())
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a(images)["logits"], b(images)["logits"])
    images.requires_grad_(True)  # a gradient w.r.t. the input must still flow through the tower
    a(images)["logits"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_summary_state_dict_and_names():
    model = tiny_model(freeze_towers=True, readable_names=True)
    summary = model.parameter_summary()
    for name in ("image_tower", "text_tower", "adapter", "prompts", "matching", "neck", "head", "total"):
        assert name in summary
    assert f"{model.num_trainable_parameters():,}" in summary
    keys = model.trainable_state_dict().keys()
    assert keys and not any(k.startswith(("image_tower.", "text_tower.")) for k in keys)
    assert "dining table" in model.class_names and "diningtable" not in model.class_names
    release = tiny_model()  # the release: raw names, and the trainable towers belong to the state
    assert "diningtable" in release.class_names and "dining table" not in release.class_names
    assert any(k.startswith("image_tower.") for k in release.trainable_state_dict())


def test_config_validation_and_tower_checks(tiny_towers):
    with pytest.raises(WeakclipError):
        ModelConfig(match_mode="bogus")
    with pytest.raises(WeakclipError):
        ModelConfig(out_blocks=(4, 6, 8))
    with pytest.raises(WeakclipError):
        ModelConfig.from_dict({"nope": 1})
    cfg = ModelConfig.from_dict({"out_blocks": [1, 2, 3, 4], "clip_arch": "tiny"})
    assert cfg.out_blocks == (1, 2, 3, 4)
    image, text = tiny_towers
    with pytest.raises(WeakclipError):  # arch mismatch: default config is ViT-B/16
        build_model(ModelConfig(), VOC_CLASSES, image_tower=image, text_tower=text)
    with pytest.raises(WeakclipError):
        build_model(ModelConfig(**TINY), VOC_CLASSES, image_tower=image)
    with pytest.warns(UserWarning, match="stochastic depth"):
        build_model(ModelConfig(**TINY), VOC_CLASSES, image_tower=image, text_tower=text)
    with pytest.raises(WeakclipError):
        build_model(ModelConfig(clip_arch="tiny"), VOC_CLASSES, pretrained_download=False)  # block 12 > 4


def test_release_mode_model_has_unused_parameters():
    assert tiny_model(match_mode="release", freeze_towers=True).has_unused_parameters
    assert tiny_model(match_mode="chain").has_unused_parameters  # trainable towers: unused logit_scale
    assert not tiny_model(match_mode="chain", freeze_towers=True).has_unused_parameters


def test_text_embeddings_cached_without_autograd():
    model = tiny_model().eval()
    with torch.no_grad():
        first = model.text_embeddings()
        assert model.text_embeddings() is first  # reused
        model.prompts.context.add_(0.5)  # an update (optimizer step, checkpoint load) invalidates it
        second = model.text_embeddings()
    assert second is not first and not torch.allclose(first, second)
    with torch.inference_mode():
        inf = model.text_embeddings()
        assert model.text_embeddings() is inf
    with torch.no_grad():
        assert not model.text_embeddings().is_inference()
    live = model.text_embeddings()  # with autograd: recomputed, with a graph to the context
    assert live.requires_grad
    torch.testing.assert_close(live.detach(), second)


# ------------------------------------------------------------------------------------ initialisation


def test_release_init_of_neck_classifier_and_matching():
    torch.manual_seed(0)
    neck = FPNNeck([64] * 4, 256, init="release")
    lateral, output = neck.lateral_convs[0].weight, neck.output_convs[0].weight
    # Kaiming-normal, fan_out, relu: std sqrt(2 / (256 * k * k)), zero bias
    assert lateral.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)
    assert output.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    assert not neck.lateral_convs[0].bias.any()
    mmseg_neck = FPNNeck([64] * 4, 256, init="mmseg")  # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert mmseg_neck.lateral_convs[0].weight.abs().max() <= (6 / (64 + 256)) ** 0.5

    head = SemanticFPNHead(256, 21, 256, init="release")
    bound = 1 / 256 ** 0.5  # PyTorch's default conv init: uniform within 1/sqrt(fan_in), bias too
    w, b = head.classifier.weight, head.classifier.bias
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    assert b.abs().max() <= bound and b.abs().max() > 0
    mmseg_head = SemanticFPNHead(256, 21, 256, init="mmseg")
    assert mmseg_head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert not mmseg_head.classifier.bias.any()
    stage = head.scale_heads[1][0].weight  # head stages: Kaiming-normal fan_out in both schemes
    assert stage.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)

    release = CoAttentionMatching(512, 256, 4, 1, init="release")
    mmseg = CoAttentionMatching(512, 256, 4, 1, init="mmseg")
    for matching, cut in ((release, False), (mmseg, True)):
        w = matching.text_decoder.layers[0].mlp[0].weight  # 1024 x 256 samples of N(0, 0.02)
        assert w.std().item() == pytest.approx(0.02, rel=0.05 if not cut else 0.15)
        # release: timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. nowhere: ~4.6% lie beyond 2 std
        assert (w.abs().max() > 0.04) is not cut and w.abs().max() <= 0.04 + (0 if cut else 2)
    assert torch.equal(release.gamma, torch.full((512,), 0.1)) and torch.equal(release.beta, release.gamma)
    with pytest.raises(WeakclipError, match="init"):
        FPNNeck([8], 8, init="xavier")


def test_model_config_fidelity_switches():
    cfg = ModelConfig()
    release = (True, 512, "token", "release")
    assert (cfg.double_cls, cfg.pos_embed_size, cfg.drop_path_mode, cfg.init_scheme) == release
    model = tiny_model()
    assert model.image_tower.double_cls and model.image_tower.drop_path_mode == "token"
    assert model.image_tower.native_grid == (32, 32)  # 512 px / patch 16, resized at build
    with torch.no_grad():  # any size: the last 70 mod 16 = 6 rows are left out, as the release's ViT does
        assert model(torch.randn(1, 3, 70, 64))["logits"].shape == (1, K, 16, 16)
    plus = tiny_model(double_cls=False, pos_embed_size=0, drop_path_mode="sample", init_scheme="mmseg",
                      partial_patches="error")
    assert not plus.image_tower.double_cls and plus.image_tower.native_grid == (4, 4)
    assert plus.image_tower.drop_path_mode == "sample"
    with pytest.raises(WeakclipError, match="divisible"):
        plus(torch.randn(1, 3, 70, 64))
    assert not plus.head.classifier.bias.any()
    for bad in (dict(drop_path_mode="pixel"), dict(init_scheme="xavier"), dict(pos_embed_size=-1)):
        with pytest.raises(WeakclipError):
            ModelConfig(**bad)
