"""CLIP towers and weight loading, on tiny models the tests build and save themselves (no network)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import convert_weights_to_lp

from weakclip.data.classes import VOC_PROMPT_NAMES
from weakclip.errors import WeakclipError, WeightsError
from weakclip.models.clip import (
    CLIP_ARCHS,
    ClipArch,
    build_clip,
    default_out_blocks,
    get_arch,
    make_open_clip_model,
)
from weakclip.models.clip_weights import (
    infer_arch,
    load_clip_state_dict,
    read_clip_weights,
)

ATOL = 1e-5
TEXTS = ["a photo of a cat.", "dog", "a diagram of a potted plant on a dining table"]


def _images(batch: int = 2, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_source():
    """A randomly initialised open_clip CLIP of the "tiny" shape: the reference model."""
    torch.manual_seed(123)
    return make_open_clip_model(get_arch("tiny")).eval()


@pytest.fixture(scope="module")
def tiny_pt(tiny_source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("openclip") / "tiny_open_clip.pt"
    torch.save(tiny_source.state_dict(), path)
    return path


def _assert_matches_open_clip(source, image_tower, text_tower) -> None:
    images = _images()
    ids = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.allclose(image_tower(images).global_embed, source.encode_image(images), atol=ATOL)
        assert torch.allclose(text_tower.encode(ids), source.encode_text(ids), atol=ATOL)


# ------------------------------------------------------------------------------------------------
# architectures


def test_arch_registry_and_aliases():
    b16 = CLIP_ARCHS["ViT-B/16"]
    assert (b16.image_size, b16.patch_size, b16.width, b16.layers, b16.heads, b16.embed_dim) == (
        224, 16, 768, 12, 12, 512,
    )
    assert (b16.text_width, b16.text_layers, b16.text_heads, b16.out_blocks) == (512, 12, 8, (4, 6, 8, 12))
    assert b16.quick_gelu and b16.context_length == 77 and b16.vocab_size == 49408
    for alias in ("ViT-B/16", "ViT-B-16", "vit_b_16", "vit-b/16"):
        assert get_arch(alias) is b16
    assert get_arch(b16) is b16
    tiny = get_arch("tiny")
    assert tiny.vocab_size == 49408 and tiny.out_blocks == tuple(range(1, tiny.layers + 1))
    with pytest.raises(WeakclipError, match="ViT-B/16") as info:
        get_arch("ViT-H/99")
    assert "tiny" in str(info.value)
    assert default_out_blocks(12) == (4, 6, 8, 12)
    with pytest.raises(WeakclipError):
        ClipArch("bad", 64, 16, 64, 4, 2, 32, 32, 2, 2, out_blocks=(5,))


# ------------------------------------------------------------------------------------------------
# the three weight formats


def test_open_clip_state_dict_pt(tiny_source, tiny_pt):
    state, fmt = load_clip_state_dict(tiny_pt)
    assert fmt == "open_clip" and "visual.conv1.weight" in state
    image_tower, text_tower = build_clip("tiny", weights=tiny_pt)
    _assert_matches_open_clip(tiny_source, image_tower, text_tower)


def test_open_clip_checkpoint_nested_with_module_prefix(tiny_source, tmp_path):
    path = tmp_path / "checkpoint.pth"
    nested = {f"module.{k}": v for k, v in tiny_source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": nested}, path)
    image_tower, text_tower = build_clip("tiny", weights=path)
    _assert_matches_open_clip(tiny_source, image_tower, text_tower)


def test_open_clip_safetensors(tiny_source, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_source.state_dict().items()}, str(path))
    assert load_clip_state_dict(path)[1] == "open_clip-safetensors"
    image_tower, text_tower = build_clip("tiny", weights=path)
    _assert_matches_open_clip(tiny_source, image_tower, text_tower)
    assert load_clip_state_dict(tmp_path)[1] == "open_clip-safetensors"  # an open_clip hub folder


def test_openai_torchscript_archive(tiny_source, tmp_path):
    """Saved like OpenAI's ViT-B-16.pt: a scripted CLIP, partly float16, with its extra entries."""
    half = copy.deepcopy(tiny_source)
    convert_weights_to_lp(half, dtype=torch.float16)
    del half.context_length, half.vocab_size  # plain ints in open_clip, tensors in OpenAI's archive
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        half.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(half)
        path = tmp_path / "ViT-tiny.pt"
        torch.jit.save(scripted, str(path))

    state, fmt = load_clip_state_dict(path)
    assert fmt == "openai-torchscript"
    assert "input_resolution" not in state and state["visual.proj"].dtype == torch.float16
    reference = copy.deepcopy(tiny_source)
    wanted = reference.state_dict()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items() if k in wanted})
    image_tower, text_tower = build_clip("tiny", weights=path)
    assert image_tower.visual.proj.dtype == torch.float32
    _assert_matches_open_clip(reference, image_tower, text_tower)
    assert build_clip("auto", weights=path)[0].arch is get_arch("tiny")


def _tiny_hf_model(hidden_act: str):
    transformers = pytest.importorskip("transformers")
    vision = dict(
        hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
        image_size=64, patch_size=16, hidden_act=hidden_act,
    )
    text = dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, vocab_size=49408, hidden_act=hidden_act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(7)
    return transformers.CLIPModel(config).eval()


def _assert_matches_hf(hf, image_tower, text_tower) -> None:
    images = _images()
    ids = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=images)
        hf_text = hf.get_text_features(input_ids=ids)
        hf_image = getattr(hf_image, "pooler_output", hf_image)
        hf_text = getattr(hf_text, "pooler_output", hf_text)
        assert torch.allclose(image_tower(images).global_embed, hf_image, atol=ATOL)
        assert torch.allclose(text_tower.encode(ids), hf_text, atol=ATOL)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_hugging_face_folder(tmp_path, hidden_act):
    hf = _tiny_hf_model(hidden_act)
    folder = tmp_path / "clip-tiny"
    hf.save_pretrained(folder)
    weights = read_clip_weights(folder)
    assert weights.format == "huggingface"
    quick = hidden_act == "quick_gelu"
    assert (weights.vision_heads, weights.text_heads, weights.quick_gelu) == (3, 2, quick)

    image_tower, text_tower = build_clip("auto", weights=folder)
    arch = image_tower.arch
    assert (arch.width, arch.layers, arch.heads, arch.patch_size, arch.embed_dim) == (48, 2, 3, 16, 24)
    assert (arch.text_width, arch.text_layers, arch.text_heads) == (32, 2, 2)
    assert arch.quick_gelu == (hidden_act == "quick_gelu")
    _assert_matches_hf(hf, image_tower, text_tower)

    # the same arch given explicitly, and the weights file named instead of the folder
    explicit = ClipArch("hf-tiny", 64, 16, 48, 2, 3, 24, 32, 2, 2, out_blocks=(1, 2))
    weights_file = next(p for p in folder.iterdir() if p.name in ("model.safetensors", "pytorch_model.bin"))
    _assert_matches_hf(hf, *build_clip(explicit, weights=weights_file))


def test_hugging_face_pytorch_model_bin(tmp_path):
    hf = _tiny_hf_model("quick_gelu")
    folder = tmp_path / "clip-bin"
    hf.save_pretrained(folder)
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    assert load_clip_state_dict(folder)[1] == "huggingface"
    _assert_matches_hf(hf, *build_clip("auto", weights=folder / "config.json"))


# ------------------------------------------------------------------------------------------------
# image tower


def test_image_tower_outputs(tiny_source, tiny_pt):
    image_tower, _ = build_clip("tiny", weights=tiny_pt)
    images = _images()
    with torch.no_grad():
        out = image_tower(images)
        reference = tiny_source.encode_image(images)
    assert torch.allclose(out.global_embed, reference, atol=ATOL)
    assert out.out_blocks == (1, 2, 3, 4) and len(out.features) == 4
    assert all(f.shape == (2, 64, 4, 4) for f in out.features)
    assert out.dense_embed.shape == (2, 32, 4, 4)
    assert out.attn is None and out.attn_mean is None

    # dense embedding = ln_post + proj on every token: check it on the last block's tokens
    with torch.no_grad():
        tokens = out.features[-1].flatten(2).transpose(1, 2)
        dense = image_tower.visual.ln_post(tokens) @ image_tower.visual.proj
    assert torch.allclose(out.dense_embed.flatten(2).transpose(1, 2), dense, atol=ATOL)

    with torch.no_grad():
        some = image_tower(images, out_blocks=[3, 1])
        with_attn = image_tower(images, return_attn=True)
    assert some.out_blocks == (1, 3) and torch.equal(some.features[1], out.features[2])
    assert with_attn.attn.shape == (2, 2, 17, 17)
    assert torch.allclose(with_attn.attn.sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    assert with_attn.attn_mean.shape == (2, 17, 17)
    assert torch.allclose(with_attn.global_embed, out.global_embed, atol=ATOL)

    with pytest.raises(WeakclipError, match="divisible"):
        image_tower(torch.zeros(1, 3, 64, 70))
    with pytest.raises(WeakclipError, match="out_blocks"):
        image_tower(images, out_blocks=[0])


def test_positional_embedding_resize(tiny_pt):
    image_tower, _ = build_clip("tiny", weights=tiny_pt)
    native = image_tower.visual.positional_embedding
    assert image_tower.native_grid == (4, 4)
    assert image_tower.positional_embedding(4, 4) is native  # the native grid is left alone

    resized = image_tower.positional_embedding(3, 5)
    assert resized.shape == (1 + 15, 64)
    assert torch.equal(resized[0], native[0])  # CLS position kept
    assert image_tower.positional_embedding(3, 5) is resized  # cached per grid
    with torch.inference_mode():
        assert image_tower.positional_embedding(2, 2).is_inference()
    assert not image_tower.positional_embedding(2, 2).is_inference()
    out = image_tower(_images(1, 48, 80))
    assert out.dense_embed.shape == (1, 32, 3, 5) and out.features[0].shape == (1, 64, 3, 5)

    # orientation: channel 0 holds the row, channel 1 the column of each stored position
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    with torch.no_grad():
        native[1:, 0] = rows.flatten()
        native[1:, 1] = cols.flatten()
    assert not torch.equal(image_tower.positional_embedding(3, 5), resized)  # cache refreshed after the edit
    grid = image_tower.positional_embedding(2, 8)[1:].reshape(2, 8, 64)
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0].expand(2, 8))  # rows constant along a row
    assert torch.allclose(grid[:, :, 1], grid[:1, :, 1].expand(2, 8))
    assert grid[1, 0, 0] > grid[0, 0, 0] and bool((grid[0, 1:, 1] >= grid[0, :-1, 1]).all())
    assert torch.allclose(grid[:, :, :2].mean(dim=(0, 1)), torch.tensor([1.5, 1.5]))


def test_stochastic_depth_and_freezing(tiny_pt):
    image_tower, text_tower = build_clip("tiny", weights=tiny_pt, drop_path_rate=0.5)
    assert image_tower.drop_path_rates == pytest.approx((0.0, 1 / 6, 2 / 6, 0.5))
    assert not any(p.requires_grad for p in image_tower.parameters())
    assert not any(p.requires_grad for p in text_tower.parameters())
    assert not image_tower.training
    images = _images()
    with torch.no_grad():
        first, second = image_tower(images).global_embed, image_tower(images).global_embed
        assert torch.equal(first, second)  # eval: no drop path
        image_tower.train()
        dropped = [image_tower(images).global_embed for _ in range(4)]
    assert any(not torch.allclose(d, first) for d in dropped)

    trainable, _ = build_clip("tiny", weights=tiny_pt, frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())
    trainable(images).global_embed.sum().backward()  # not cached: the graph reaches the resized pos embedding
    trainable(_images(1, 32, 48)).global_embed.sum().backward()
    assert trainable.visual.positional_embedding.grad is not None


# ------------------------------------------------------------------------------------------------
# text tower


def test_text_tower_context_prompts(tiny_pt):
    _, text_tower = build_clip("tiny", weights=tiny_pt)
    names = text_tower.tokenize(["cat", "potted plant", "tv monitor"], context_length=5)
    assert names.shape == (3, 5)
    context = torch.randn(8, text_tower.width, requires_grad=True)
    out = text_tower.forward_with_context(names, context)
    assert out.shape == (3, text_tower.embed_dim)
    out.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_tower.parameters())

    batched = text_tower.forward_with_context(names, torch.stack([context.detach()] * 2))
    assert batched.shape == (2, 3, text_tower.embed_dim)
    assert torch.allclose(batched[1], out.detach(), atol=ATOL)

    with pytest.raises(WeakclipError, match="tokens"):
        text_tower.tokenize(["a very long class name that cannot fit"], context_length=5)
    assert text_tower.tokenize("x" * 40, context_length=5, truncate=True)[0, -1] == 49407


def test_context_of_real_words_equals_full_sentence(tiny_pt):
    """Context = the token embeddings of "a photo of a": must equal encoding "a photo of a <name>."."""
    _, text_tower = build_clip("tiny", weights=tiny_pt)
    prefix = text_tower.tokenize("a photo of a", context_length=6)[0, 1:5]  # without SOT/EOT
    with torch.no_grad():
        context = text_tower.token_embedding(prefix)
        names = text_tower.tokenize(["cat.", "dining table", "tv"], context_length=5)
        prompted = text_tower.forward_with_context(names, context)
        sentences = ["a photo of a cat.", "a photo of a dining table", "a photo of a tv"]
        full = text_tower.encode(text_tower.tokenize(sentences))  # 77 long: padding never matters
        short = text_tower.encode(text_tower.tokenize(sentences, context_length=9))
    assert torch.allclose(prompted, full, atol=ATOL)
    assert torch.allclose(prompted, short, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# errors


def test_wrong_architecture_names_both(tiny_pt):
    with pytest.raises(WeightsError) as info:
        build_clip("ViT-B/16", weights=tiny_pt)
    message = str(info.value)
    assert "\n" not in message and str(tiny_pt) in message
    assert "tiny-like" in message and "width 64" in message
    assert "expected ViT-B/16 (width 768, 12 blocks, patch 16, embed 512" in message


def test_infer_arch_of_unregistered_size(tiny_source):
    dropped = "visual.transformer.resblocks.3."
    state = {k: v for k, v in tiny_source.state_dict().items() if not k.startswith(dropped)}
    arch = infer_arch(state)
    assert arch.name != "tiny" and arch.layers == 3 and arch.heads == 1 and arch.out_blocks == (1, 2, 3)


def test_corrupt_and_unrelated_files(tiny_pt, tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_pt.read_bytes()[: tiny_pt.stat().st_size // 2])
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    unrelated = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), unrelated)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    expected = {random_bytes: "CLIP weights file .* starts with .*, not a PyTorch file",
                truncated: "CLIP weights file .* is truncated or damaged",
                bad_safetensors: "CLIP weights file .* is truncated or damaged",
                unrelated: "cannot read CLIP weights from .*: no CLIP ViT keys",
                tensor_only: "cannot read CLIP weights from .*: it holds a Tensor"}
    for path, pattern in expected.items():
        with pytest.raises(WeightsError, match=pattern) as info:
            build_clip("tiny", weights=path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert "weights_only" not in str(info.value)
    with pytest.raises(WeightsError, match="does not exist") as info:
        build_clip("tiny", weights=tmp_path / "missing.pt")
    assert "missing.pt" in str(info.value)
    with pytest.raises(WeightsError, match="config.json"):
        build_clip("tiny", weights=tmp_path)


def test_no_weights_offline(monkeypatch):
    monkeypatch.setenv("WEAKCLIP_OFFLINE", "1")
    with pytest.raises(WeightsError, match="pass --clip-weights") as info:
        build_clip("ViT-B/16")
    assert "ViT-B-16.pt" in str(info.value) and "openai/clip-vit-base-patch16" in str(info.value)

    def failing_download(arch):
        raise OSError("network unreachable")

    with pytest.raises(WeightsError) as info:
        build_clip("ViT-B/16", downloader=failing_download)
    assert str(info.value) == (
        "no CLIP weights given and download failed (offline?): pass --clip-weights with OpenAI's "
        "ViT-B-16.pt (TorchScript, from the openai/CLIP release), an open_clip state dict for ViT-B-16, "
        "or a Hugging Face openai/clip-vit-base-patch16 folder"
    )
    with pytest.raises(WeakclipError, match="auto"):
        build_clip("auto")


def test_downloader_result_is_loaded(tiny_source, tiny_pt):
    fake_b16 = ClipArch("ViT-B/16", 64, 16, 64, 4, 2, 32, 32, 2, 2)  # a release name, tiny shapes
    image_tower, text_tower = build_clip(fake_b16, downloader=lambda arch: tiny_pt)
    _assert_matches_open_clip(tiny_source, image_tower, text_tower)


# ------------------------------------------------------------------------------------------------
# real size


@pytest.mark.slow
def test_real_size_vit_b16_random_weights():
    image_tower, text_tower = build_clip("ViT-B/16", pretrained_download=False)
    with torch.inference_mode():
        for height, width in ((224, 224), (160, 192)):
            out = image_tower(torch.randn(1, 3, height, width))
            h, w = height // 16, width // 16
            assert [tuple(f.shape) for f in out.features] == [(1, 768, h, w)] * 4
            assert out.global_embed.shape == (1, 512)
            assert out.dense_embed.shape == (1, 512, h, w)
        names = text_tower.tokenize(list(VOC_PROMPT_NAMES), context_length=5)
        context = torch.nn.init.trunc_normal_(torch.empty(8, 512), std=0.02)
        assert text_tower.forward_with_context(names, context).shape == (21, 512)


def test_weights_command_describes_each_format(tiny_pt, tmp_path, capsys):
    from weakclip.cli import main

    assert main(["weights", str(tiny_pt)]) == 0
    out = capsys.readouterr().out
    assert "open_clip" in out and "tiny (width 64, 4 blocks, patch 16, embed 32)" in out
    hf = _tiny_hf_model("gelu")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["weights", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "huggingface" in out and "width 48, 2 blocks" in out and "GELU" in out and "QuickGELU" not in out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert main(["weights", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "junk.pt" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------
# the release's tower variants (ModelConfig switches)


def test_double_cls_token_equals_manual_computation(tiny_pt):
    single, _ = build_clip("tiny", weights=tiny_pt)
    double, _ = build_clip("tiny", weights=tiny_pt, double_cls=True)
    images = _images(1)
    visual = double.visual
    with torch.no_grad():
        tokens, grid = double.embed(images)
        patches = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding + (visual.positional_embedding[0] + visual.class_embedding)
        manual = visual.ln_pre(torch.cat([cls.view(1, 1, -1), patches + visual.positional_embedding[1:]], 1))
        once, _ = single.embed(images)
    assert grid == (4, 4)
    assert torch.allclose(tokens, manual, atol=1e-6)
    assert torch.allclose(tokens[:, 1:], once[:, 1:]) and not torch.allclose(tokens[:, 0], once[:, 0])


def test_stored_grid_is_resized_once_and_other_sizes_come_from_it(tiny_pt):
    tower, _ = build_clip("tiny", weights=tiny_pt)
    native = tower.visual.positional_embedding.detach().clone()  # 4 x 4 grid + CLS

    def bilinear(pos, side_from, size):
        grid = pos[1:].reshape(1, side_from[0], side_from[1], -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)])

    tower.resize_stored_grid(32, 32)  # the release: 512 px / patch 16
    stored = tower.visual.positional_embedding
    assert tower.native_grid == (32, 32) and stored.shape == (1 + 32 * 32, 64)
    assert torch.allclose(stored, bilinear(native, (4, 4), (32, 32)), atol=1e-6)
    assert tower.positional_embedding(32, 32) is stored
    with torch.no_grad():
        got = tower.positional_embedding(20, 20)
    assert torch.allclose(got, bilinear(stored.detach(), (32, 32), (20, 20)), atol=1e-6)
    # not resized from CLIP's grid: the two paths differ between the stored grid's samples
    assert (got - bilinear(native, (4, 4), (20, 20))).abs().max() > 1e-2
    assert tower(_images(1, 48, 80)).dense_embed.shape == (1, 32, 3, 5)
    with pytest.raises(WeakclipError, match="positive"):
        tower.resize_stored_grid(0, 4)


def test_drop_path_per_token_mask_is_shared_by_batch_and_channels():
    from weakclip.models.clip import _drop_path

    torch.manual_seed(0)
    x = torch.ones(4, 50, 8)
    out = _drop_path(x, 0.5, True, "token")
    mask = out[0, :, 0]
    assert set(mask.unique().tolist()) <= {0.0, 2.0} and 0 < int((mask == 0).sum()) < 50  # scaled by 1/keep
    assert torch.equal(out, mask.view(1, 50, 1).expand(4, 50, 8))  # same draw for every sample and channel
    per_sample = _drop_path(torch.ones(16, 5, 8), 0.5, True, "sample")
    assert torch.equal(per_sample, per_sample[:, :1, :1].expand(16, 5, 8))  # one draw per sample
    assert len(per_sample[:, 0, 0].unique()) == 2
    assert torch.equal(_drop_path(x, 0.5, False, "token"), x)  # eval: identity
    with pytest.raises(WeakclipError, match="drop_path_mode"):
        build_clip("tiny", pretrained_download=False, drop_path_mode="pixel")
