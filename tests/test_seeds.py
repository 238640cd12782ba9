"""Built-in CLIP-ES style seeds: end to end on synthetic data, a hand-made CLIP with a known answer,
and the checker of external seed folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.cli import main
from weakclip.data.classes import COCO_CLASSES, prompt_names
from weakclip.data.datasets import build_dataset
from weakclip.data.io import read_label_png, write_label_png
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.errors import WeakclipError
from weakclip.models.clip import CLIPImageTower, build_clip, get_arch, make_open_clip_model
from weakclip.seeds.check import check_seeds
from weakclip.seeds.clip_es import (
    BACKGROUND_PROMPTS,
    ClipEsConfig,
    ClipEsSeeder,
    affinity_matrix,
    box_mask,
    encode_prompts,
    seed_from_cams,
    split_background,
)

# ------------------------------------------------------------------------------------------------
# 1. end to end with a tiny random CLIP


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(make_open_clip_model(get_arch("tiny")).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "config", [ClipEsConfig(), ClipEsConfig(scales=(0.75, 1.0), flip=True, softmax_over="labels")],
    ids=["default", "multiscale-flip-labels"])
def test_batched_cams_equal_one_image_at_a_time(tiny_weights, config):
    image_tower, text_tower = build_clip("tiny", tiny_weights)
    names = ["background", "disk", "square", "ring"]
    seeder = ClipEsSeeder(image_tower, names, text_tower=text_tower, config=config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    labels = [[1], [2, 3], [0], [1, 2, 3]]  # different class counts; one image with background only
    batched = seeder.cams_and_keys_batch(images, labels)
    for image, lab, (cams, keys) in zip(images, labels, batched):
        alone, alone_keys = seeder.cams_and_keys(image, lab)
        assert keys == alone_keys == sorted(set(lab) - {0})
        assert cams.shape == (len(keys), 48, 64)
        np.testing.assert_allclose(cams, alone, atol=1e-4)
    with pytest.raises(WeakclipError, match="one size"):
        seeder.cams_and_keys_batch([images[0], images[0][:40]], [[1], [1]])


def test_runner_batches_give_the_same_seeds(tmp_path, tiny_weights):
    from weakclip.seeds.run import generate_seeds

    root = make_synthetic_dataset(tmp_path / "data", n_train=7, n_val=0, n_classes=3,
                                  image_size=((64, 65), (96, 96)))  # two sizes: batches are split by size
    dataset = build_dataset("folder", root, split="train")
    assert len({Image.open(dataset.image_path(i)).size for i in range(len(dataset))}) == 2
    image_tower, text_tower = build_clip("tiny", tiny_weights)
    seeder = ClipEsSeeder(image_tower, dataset.classes, text_tower=text_tower)
    one = generate_seeds(dataset, seeder, tmp_path / "one", batch_size=1, progress=False)
    four = generate_seeds(dataset, seeder, tmp_path / "four", batch_size=4, progress=False)
    assert one["written"] == four["written"] == 7
    same = total = 0
    for ident in dataset.ids:
        a = read_label_png(tmp_path / "one" / f"{ident}.png")
        b = read_label_png(tmp_path / "four" / f"{ident}.png")
        same += int((a == b).sum())
        total += a.size
    assert same / total > 0.999  # equal up to float rounding at a threshold


def test_seeds_command_end_to_end_resume_and_corrupt_image(tmp_path, tiny_weights, capsys):
    root = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=0, n_classes=3)
    out = tmp_path / "seeds"
    argv = ["seeds", "--data-root", str(root), "--split", "train", "--clip-weights", str(tiny_weights),
            "--arch", "tiny", "--out", str(out), "--device", "cpu", "--save-cams", "--quiet",
            "--json", str(tmp_path / "summary.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mIoU (unsure as background)" in printed and "coverage" in printed

    dataset = build_dataset("folder", root, split="train")
    for i, ident in enumerate(dataset.ids):
        seed = read_label_png(out / f"{ident}.png")
        image = np.asarray(Image.open(dataset.image_path(i)))
        assert seed.shape == image.shape[:2]
        allowed = {0, 255} | {int(c) for c in np.nonzero(dataset.get_labels(i))[0]}
        assert set(np.unique(seed).tolist()) <= allowed
        cams = np.load(out / "cams" / f"{ident}.npz")
        assert cams["cams"].dtype == np.float16
        assert cams["cams"].shape == (len(cams["keys"]), *seed.shape)
        assert sorted(cams["keys"].tolist()) == sorted(allowed - {0, 255})
    def strict(constant):
        raise AssertionError(f"{constant} in a JSON file")

    summary = json.loads((out / "seeds_summary.json").read_text(), parse_constant=strict)
    assert summary == json.loads((tmp_path / "summary.json").read_text(), parse_constant=strict)
    assert summary["written"] == 6 and summary["failed"] == 0
    assert 0.0 <= summary["miou"] <= 1.0 and 0.0 <= summary["coverage"] <= 1.0

    # the seed folder passes the checker
    assert main(["seeds", "check", str(out), "--data-root", str(root), "--split", "train", "--quiet"]) == 0
    assert "coverage" in capsys.readouterr().out

    # a second run computes nothing
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(argv) == 0
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["written"] == 0 and summary["skipped_existing"] == 6
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    # a corrupt image is reported, skipped and listed; the others stay
    bad = dataset.ids[2]
    dataset.image_path(2).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (out / f"{bad}.png").unlink()
    capsys.readouterr()
    assert main(argv) == 1  # finished, one image failed
    captured = capsys.readouterr()
    assert bad in captured.err and "weakclip seeds: 1 failed (of 6 images)" in captured.err
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["failed"] == 1 and bad in summary["failures"] and summary["skipped_existing"] == 5
    assert not (out / f"{bad}.png").exists()
    assert main(["seeds", "check", str(out), "--data-root", str(root), "--split", "train", "--quiet"]) == 1


def test_generate_needs_weights_and_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # required options of `seeds [generate]`, refused by the parser
        main(["seeds", "--data-root", str(tmp_path)])
    assert exc.value.code == 2
    assert "required: --clip-weights, --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 2. a hand-made CLIP: patch tokens carry their colour, the text embeddings name colours


def _colour_clip() -> CLIPImageTower:
    """Tiny tower whose patch tokens are their mean colour (as +/- channel pairs, in both heads),
    whose attention links tokens of the same colour, and whose blocks otherwise pass tokens through.
    Projected embeddings: dims 0, 1, 2 = R, G, B direction; dim 3 = a constant shared by all tokens
    (as real CLIP embeddings share a large common part, which keeps the logits moderate)."""
    arch = get_arch("tiny")
    model = make_open_clip_model(arch).eval()
    v = model.visual
    width = arch.width
    with torch.no_grad():
        for p in v.parameters():
            p.zero_()
        area = arch.patch_size**2
        for c in range(3):
            for base in (0, width // 2):
                v.conv1.weight[base + 2 * c, c] = 1.0 / area
                v.conv1.weight[base + 2 * c + 1, c] = -1.0 / area
        eye = torch.eye(width)
        for index, block in enumerate(v.transformer.resblocks, start=1):
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
            block.attn.in_proj_weight.copy_(torch.cat([2.0 * eye, eye, eye]))
            if index == len(v.transformer.resblocks):
                block.attn.out_proj.weight.copy_(eye)
        for ln in (v.ln_pre, v.ln_post):
            ln.weight.fill_(1.0)
        v.ln_post.bias[width - 1] = 8.0
        for c in range(3):
            v.proj[2 * c, c] = 1.0
        v.proj[width - 1, 3] = 1.0
    return CLIPImageTower(v, arch).eval().requires_grad_(False)


def _colour_text(*rgb_signs: tuple[float, float, float]) -> torch.Tensor:
    out = torch.zeros(len(rgb_signs), get_arch("tiny").embed_dim)
    for i, signs in enumerate(rgb_signs):
        out[i, :3] = torch.tensor(signs) * 2.0
        out[i, 3] = 8.0
    return out


RED, GREEN, BLUE = (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)


def test_hand_made_clip_cam_peaks_on_the_named_object():
    rng = np.random.default_rng(0)
    image = np.empty((96, 128, 3), np.float64)
    image[:] = (40, 170, 60)  # green background
    image[32:64, 80:112] = (200, 30, 30)  # the red object: patch rows 2-3, columns 5-6
    image[16:48, 16:48] = (30, 30, 200)  # an unlabelled blue object
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    inside = np.zeros((96, 128), bool)
    inside[32:64, 80:112] = True

    tower = _colour_clip()
    for config in (ClipEsConfig(), ClipEsConfig(scales=(0.75, 1.0), flip=True), ClipEsConfig(refine=False)):
        seeder = ClipEsSeeder(tower, ["background", "red thing", "blue thing"], config=config,
                              class_embeddings=_colour_text(RED, BLUE),
                              background_embeddings=_colour_text(GREEN))
        cams, keys = seeder.cams_and_keys(image, np.array([1, 1, 0], np.float32))
        assert keys == [1] and cams.shape == (1, 96, 128)
        cam = cams[0]
        assert cam.min() >= 0.0 and cam.max() <= 1.0
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        assert inside[y, x], (config, y, x)
        assert cam[inside].mean() > cam[~inside].mean() + 0.4, config
        seed = seeder.seed_from(cams, keys)
        assert (seed[inside] == 1).mean() > 0.5
        assert (seed[~inside] == 1).mean() < 0.1
        assert set(np.unique(seed).tolist()) <= {0, 1, 255}

    # asked for the blue object instead, the CAM moves there
    seeder = ClipEsSeeder(tower, ["background", "red thing", "blue thing"],
                          class_embeddings=_colour_text(RED, BLUE), background_embeddings=_colour_text(GREEN))
    cam = seeder.cams(image, [2])[0]
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    assert 16 <= y < 48 and 16 <= x < 48
    seed = seeder.seed(image, torch.tensor([1.0, 0.0, 1.0]))
    assert (seed[16:48, 16:48] == 2).mean() > 0.5 and (seed[inside] == 0).mean() > 0.5


def test_building_blocks():
    cam = torch.zeros(6, 8)
    cam[1:3, 1:3] = 1.0
    cam[4, 6] = 0.9
    cam[0, 7] = 0.1  # below the threshold
    mask = box_mask(cam, 0.4)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1:3, 1:3] = True
    expected[4, 6] = True
    assert torch.equal(mask, expected)
    assert not box_mask(torch.zeros(3, 3), 0.4).any()

    attn = torch.rand(12, 12).softmax(dim=-1)
    t = affinity_matrix(attn, 3, 2)
    assert torch.allclose(t, t.t(), atol=1e-6)
    assert torch.allclose(t.sum(dim=1), torch.ones(12), atol=1e-2)

    cams = np.zeros((2, 2, 3), np.float32)
    cams[0] = [[0.9, 0.3, 0.1], [0.6, 0.0, 0.2]]
    cams[1] = [[0.2, 0.7, 0.1], [0.55, 0.4, 0.26]]
    seed = seed_from_cams(cams, [4, 7], lo=0.25, hi=0.5)
    assert seed.tolist() == [[4, 7, 0], [4, 255, 255]]
    assert seed_from_cams(np.zeros((0, 2, 2)), [], 0.25, 0.5).tolist() == [[0, 0], [0, 0]]

    kept, dropped = split_background(BACKGROUND_PROMPTS, prompt_names(COCO_CLASSES)[1:])
    assert dropped == ["keyboard", "sign"] and len(kept) == 23  # CLIP-ES's COCO list


def test_prompt_embeddings_batched_and_cut_equal_one_by_one():
    _, text = build_clip("tiny", pretrained_download=False)
    names = ["cat", "potted plant", "tv monitor screen"]
    templates = ["a clean origami {}.", "a photo of a {}"]
    expected = []
    for name in names:
        emb = text.encode(text.tokenize([t.format(name) for t in templates]))
        emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
        expected.append(torch.nn.functional.normalize(emb, dim=-1))
    assert torch.allclose(encode_prompts(text, names, templates), torch.stack(expected), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. the checker


def _folder_dataset(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\nbird\n")
    labels = {"a": ["cat"], "b": ["dog"], "c": ["cat", "dog"], "d": ["bird"], "e": ["cat"], "f": ["dog"]}
    (root / "labels.json").write_text(json.dumps(labels))
    for ident in labels:
        Image.fromarray(np.full((16, 20, 3), 90, np.uint8)).save(root / "images" / f"{ident}.png")


def test_check_catches_each_kind_of_bad_seed(tmp_path):
    root = tmp_path / "data"
    _folder_dataset(root)
    seeds = tmp_path / "external"
    seeds.mkdir()
    good = np.full((16, 20), 255, np.uint8)
    good[:6] = 0  # 120 background
    good[10:15] = 1  # 100 cat
    write_label_png(seeds / "a.png", good)
    # b missing
    write_label_png(seeds / "c.png", np.zeros((20, 16), np.uint8))  # transposed size
    write_label_png(seeds / "d.png", np.full((16, 20), 9, np.uint8))  # 9 is no class id (K = 4)
    off_label = np.full((16, 20), 255, np.uint8)
    off_label[0, :20] = 3  # bird in an image labelled cat
    write_label_png(seeds / "e.png", off_label)
    (seeds / "f.png").write_bytes(b"garbage")
    write_label_png(seeds / "zzz.png", good)  # belongs to no image

    report = check_seeds(seeds, build_dataset("folder", root))
    assert not report.ok
    assert report.missing == ["b"]
    assert [i for i, _ in report.wrong_size] == ["c"]
    assert [i for i, _ in report.bad_values] == ["d"] and "9" in report.bad_values[0][1]
    assert [i for i, _ in report.extra_classes] == ["e"] and "bird" in report.extra_classes[0][1]
    assert [i for i, _ in report.unreadable] == ["f"]
    assert report.extra_files == 1
    # coverage over the seeds that could be measured: a and e (640 pixels)
    assert report.total_pixels == 640 and report.labelled_pixels == 120 + 100 + 20
    assert report.coverage == pytest.approx(240 / 640)
    shares = report.class_coverage()
    assert shares["background"] == pytest.approx(120 / 640)
    assert shares["cat"] == pytest.approx(100 / 640)
    assert shares["bird"] == pytest.approx(20 / 640) and shares["dog"] == 0.0
    assert report.missed_labels == 1  # e is labelled cat but shows none
    text = report.format()
    for word in ("missing", "wrong size", "out of range", "not among the image labels", "unreadable"):
        assert word in text
    assert len(report.problems()) == 5

    # a clean folder passes
    clean = tmp_path / "clean"
    for ident in "abcdef":
        write_label_png(clean / f"{ident}.png", np.zeros((16, 20), np.uint8))
    assert check_seeds(clean, build_dataset("folder", root)).ok


def test_step_by_step_tower_equals_forward():
    tower, _ = build_clip("tiny", pretrained_download=False)
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tower(images, return_attn=True)
        x, grid = tower.embed(images)
        assert grid == (3, 5)
        for b in range(1, tower.num_blocks):
            x, _ = tower.run_block(b, x)
        last, weights = tower.run_block(tower.num_blocks, x, need_weights=True)
        again, _ = tower.run_block(tower.num_blocks, x, normed=tower.block_norm(tower.num_blocks, x))
    assert torch.allclose(tower.project(last)[:, 0], ref.global_embed, atol=1e-5)
    assert torch.allclose(weights, ref.attn, atol=1e-6)
    assert torch.allclose(again, last, atol=1e-6)


def _masks_and_seeds(root: Path, seeds: Path) -> Path:
    masks = root / "masks"
    for ident in "abcdef":
        write_label_png(seeds / f"{ident}.png", np.zeros((16, 20), np.uint8))
        write_label_png(masks / f"{ident}.png", np.zeros((16, 20), np.uint8))
    return masks


def test_check_also_checks_the_ground_truth_masks_it_can_see(tmp_path, capsys):
    # issue 27.6: `weakclip seeds check` passed a dataset whose masks were of the wrong size, out of range or
    # colour-coded
    root, seeds = tmp_path / "data", tmp_path / "seeds"
    _folder_dataset(root)
    masks = _masks_and_seeds(root, seeds)
    write_label_png(masks / "c.png", np.zeros((8, 10), np.uint8))  # half the image's size
    write_label_png(masks / "d.png", np.full((16, 20), 9, np.uint8))  # 9 is no class id (K = 4)
    Image.fromarray(np.dstack([np.full((16, 20), v, np.uint8) for v in (128, 0, 0)])).save(masks / "e.png")
    write_label_png(seeds / "b.png", np.zeros((20, 16), np.uint8))  # and one seed of the wrong size
    report = check_seeds(seeds, build_dataset("folder", root))
    assert not report.ok
    images = root / "images"
    assert report.wrong_size == [("b", f"seed {seeds / 'b.png'} is 16x20 but its image {images / 'b.png'} is "
                                       "20x16 (width x height)")]
    problems = dict(report.gt_problems)
    assert sorted(problems) == ["c", "d", "e"]
    assert problems["c"] == (f"mask {masks / 'c.png'} is 10x8 but its image {images / 'c.png'} is 20x16 "
                             "(width x height)")
    assert problems["d"].startswith(f"mask {masks / 'd.png'} has values [9] outside the 4 class ids")
    assert problems["e"].startswith(f"mask {masks / 'e.png'} is an RGB colour image")
    assert report.checked == 6 and len(report.problems()) == 4
    assert report.to_dict()["gt_problems"] == problems
    assert main(["seeds", "check", str(seeds), "--data-root", str(root), "--dataset", "folder",
                 "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "  ground-truth masks: 3" in out and f"c: mask {masks / 'c.png'} is 10x8" in out
    assert "4 problems" in err
    # --no-gt: the masks are not looked at
    assert main(["seeds", "check", str(seeds), "--data-root", str(root), "--dataset", "folder", "--quiet",
                 "--no-gt"]) == 1
    assert "ground-truth masks" not in capsys.readouterr().out


def test_run_with_external_seeds_names_the_mask_of_the_wrong_size_not_the_seed(tmp_path):
    # issue 27.6: "seed .../a.png is 20x16 but its image is 10x8" although image and seed are 20x16 and the
    # ground-truth mask is 10x8
    from weakclip.pipeline import Pipeline, PipelineConfig

    root, seeds = tmp_path / "data", tmp_path / "seeds"
    _folder_dataset(root)
    masks = _masks_and_seeds(root, seeds)
    write_label_png(masks / "a.png", np.zeros((8, 10), np.uint8))
    pipe = Pipeline(PipelineConfig(workdir=tmp_path / "w", data_root=root, dataset="folder", seeds=seeds,
                                   val_split="none", progress=False), log=lambda line: None)
    with pytest.raises(WeakclipError) as exc:
        pipe.run_seeds()
    message = str(exc.value)
    assert f"mask {masks / 'a.png'} is 10x8 but its image {root / 'images' / 'a.png'} is 20x16" in message
    assert f"seed {seeds / 'a.png'} is" not in message and "\n" not in message
