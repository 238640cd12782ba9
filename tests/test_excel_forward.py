"""ExCEL's forward pass equals the authors' code (a snapshot of github zwyang6/ExCEL, run here on CPU with the
same random CLIP weights, the same descriptors and the same decoder weights): CLIP features and attention
weights of both passes, text features and the k-means bank, patch-text maps, decoder logits, fused features,
affinity prediction; and the descriptors file's errors, the prompts, the checkpoint payload.

Tolerances: the CLIP pass, the text side and the patch-text maps are compared to 1e-6 (they are computed with
the same library calls in the same order, and are equal bit for bit on the machines tried); decoder logits to
1e-4 of their scale, fused features and affinity to 1e-5.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sklearn.cluster
import torch
from threadpoolctl import threadpool_limits

from excel_ref import excel_reference, reference_clip_from_state_dict
from weakclip.data.classes import COCO_CLASSES, VOC_CLASSES
from weakclip.errors import DataError, WeakclipError
from weakclip.methods.excel import text as excel_text
from weakclip.methods.excel.clip_pass import ExcelClipPass, base_grid_for_mode
from weakclip.methods.excel.decoder import release_state_dict_to_ours
from weakclip.methods.excel.model import (
    PARAM_GROUP_LR_SCALES,
    ExcelNet,
    ExcelSettings,
    build_excel_net,
    rebuild_excel_net,
)
from weakclip.models.clip import CLIPImageTower, build_clip, get_arch, make_open_clip_model
from weakclip.seeds.names import BACKGROUND_VOC, VOC_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = 96  # the tiny-excel CLIP's grid is 4 x 4 at 64 px: a 96 crop makes the release resize it to 6 x 6
CLUSTERS = 16
EXACT = 1e-6
VOC_JSON = "descriptors_pascal_voc_gpt4.0_cluster_a_photo_of4.json"
COCO_JSON = "descriptors_ms_coco_gpt4.0_cluster_a_photo_of4.json"
_ATTRIBUTES = ("wings", "wheels", "feathers", "a sail", "a cap")


def _write_descriptors(path: Path, names, per_class: int = 4) -> Path:
    table = {n: [f"a clean origami {n}. it has {_ATTRIBUTES[(i + j) % len(_ATTRIBUTES)]} number {j}."
                 for j in range(per_class)] for i, n in enumerate(names)}
    path.write_text(json.dumps(table))
    return path


def _release_descriptors(ref, path: Path, per_class: int) -> Path:
    """The first sentences of each class of the authors' VOC file. (Quirk: the release's k-means step crashes
    in its debug print when two or more groups of classes share the same cluster flags, which invented
    sentences and few clusters make likely; its own sentences keep the classes apart.)"""
    table = json.loads((ref.root / "attributes_text" / VOC_JSON).read_text())
    path.write_text(json.dumps({name: sentences[:per_class] for name, sentences in table.items()}))
    return path


class _PinnedKMeans(sklearn.cluster.KMeans):
    """The release's ``KMeans(n_clusters, random_state=0)`` with its pinned scikit-learn 1.0.2's defaults
    (n_init 10, elkan); remembers the last fit so that its labels can be compared."""

    last = None

    def __init__(self, n_clusters=8, *, random_state=None):
        super().__init__(n_clusters=n_clusters, n_init=10, algorithm="elkan", random_state=random_state)

    def fit(self, *args, **kwargs):
        _PinnedKMeans.last = super().fit(*args, **kwargs)
        return _PinnedKMeans.last


@pytest.fixture(scope="module")
def ref():
    with excel_reference() as reference:
        yield reference


@pytest.fixture(scope="module")
def tiny(ref, tmp_path_factory):
    torch.manual_seed(3)
    state = make_open_clip_model(get_arch("tiny-excel")).state_dict()
    folder = tmp_path_factory.mktemp("excel_forward")
    torch.save(state, folder / "clip.pt")
    descriptors = _release_descriptors(ref, folder / "voc_descriptors.json", per_class=4)
    return {"state": state, "weights": folder / "clip.pt", "folder": folder, "descriptors": descriptors}


@contextlib.contextmanager
def _reference_setting(ref, state, folder: Path):
    """The release's ``clip.load`` returns a CLIP built from ``state`` (one per model), its KMeans is the
    pinned one, and its working folder has the ``attributes_text/`` where it caches the k-means bank."""
    clip = ref.module("clip")
    saved_load, saved_kmeans, saved_cwd = clip.load, sklearn.cluster.KMeans, os.getcwd()
    built = {}

    def load(*args, **kwargs):
        if "model" not in built:
            built["model"] = reference_clip_from_state_dict(ref, state)
        return built["model"], None

    (folder / "attributes_text").mkdir(exist_ok=True)
    clip.load, sklearn.cluster.KMeans = load, _PinnedKMeans
    os.chdir(folder)
    try:
        with threadpool_limits(1):
            yield
    finally:
        clip.load, sklearn.cluster.KMeans = saved_load, saved_kmeans
        os.chdir(saved_cwd)


def _reference_model(ref, state, folder: Path, descriptors: Path, *, mode: str, crop: int = CROP,
                     clusters: int = CLUSTERS, num_classes: int = 21):
    with _reference_setting(ref, state, folder):
        model = ref.module("model.model_excel").ExCEL_model(
            clip_model="ExCEL_ViT-B/16", embedding_dim=256, in_channels=state["visual.conv1.weight"].shape[0],
            dataset_name="pascal_voc", num_classes=num_classes, num_atrr_clusters=clusters,
            json_file=str(descriptors), img_size=crop, mode=mode, device="cpu",
        )
    return model.eval()


@pytest.fixture(scope="module")
def pair(ref, tiny, tmp_path_factory):
    """The release's model (training mode: positional grid from the crop) and ours, same weights."""
    folder = tmp_path_factory.mktemp("release_cwd")
    reference = _reference_model(ref, tiny["state"], folder, tiny["descriptors"], mode="train")
    labels = _PinnedKMeans.last.labels_.copy()
    with threadpool_limits(1):
        ours = build_excel_net("tiny-excel", tiny["weights"], VOC_CLASSES, descriptors=tiny["descriptors"],
                               clusters=CLUSTERS, crop=CROP, kmeans_seeding="sklearn", note=None)
    ours.load_trainable_state_dict(reference.state_dict(), release=True)
    bank_file = folder / "attributes_text" / f"pascal_voc_desc_clip_ViT-B-16_gpt4.0_cluster_{CLUSTERS}" \
        "_embedding_bank.pth"
    return {"ref": reference, "ours": ours.eval(), "labels": labels, "bank": torch.load(bank_file)}


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Text side


def test_text_bank_equals_release(pair, tiny):
    ours, reference = pair["ours"], pair["ref"]
    bank = ours.text_bank
    assert bank.names == list(VOC_NAMES) and len(bank.background) == 25
    assert _max_diff(bank.text_features, reference.integral_text_features) <= EXACT
    # the k-means bank: the release's cached file (centres embed x clusters, flags classes x clusters)
    centres, flags = pair["bank"]
    assert _max_diff(bank.centres, centres.t()) <= EXACT
    assert torch.equal(bank.flags, flags.float())
    assert torch.equal(reference.attr_flag.float(), bank.flags)
    # the labels of the k-means, recomputed from our descriptor embeddings
    table = excel_text.read_descriptors(tiny["descriptors"])
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    embedded = torch.cat(excel_text.encode_descriptors(text_tower, table))
    with threadpool_limits(1):
        our_centres, labels = excel_text.cluster_descriptors(embedded, CLUSTERS, seeding="sklearn")
    np.testing.assert_array_equal(labels, pair["labels"])
    assert _max_diff(our_centres, bank.centres) == 0.0
    assert _max_diff(bank.enriched, reference.text_attr.t()) <= EXACT
    assert bank.kmeans == {"clusters": CLUSTERS, "random_state": 0, "n_init": 10, "algorithm": "elkan",
                           "seeding": "sklearn"}


def test_prompt_lists_are_the_releases(ref):
    release = ref.module("datasets.clip_text")
    voc = excel_text.excel_prompts(VOC_CLASSES)
    assert list(voc.names) == release.new_class_names and list(voc.background) == release.BACKGROUND_CATEGORY
    assert voc.note is None and voc.texts()[0] == "a clean origami aeroplane."
    coco = excel_text.excel_prompts(COCO_CLASSES)
    assert list(coco.names) == release.new_class_names_coco
    assert list(coco.background) == release.BACKGROUND_CATEGORY_COCO
    # another list: plain names, VOC's background words less those that are a class or a word of one; the
    # rule gives the release's COCO list from its VOC one
    folder = excel_text.excel_prompts(["background", "stop sign", "Keyboard", "red_fox"])
    assert folder.names == ("stop sign", "Keyboard", "red fox") and folder.note
    assert list(folder.background) == release.BACKGROUND_CATEGORY_COCO
    assert excel_text.excel_prompts(VOC_CLASSES, dataset="folder").names[14] == "person"
    assert excel_text.excel_prompts(["background", "cat"], background=["sky"]).background == ("sky",)
    with pytest.raises(DataError, match="not VOC's"):
        excel_text.excel_prompts(["background", "cat", "dog"], dataset="voc")
    with pytest.raises(WeakclipError, match="starts with 'background'"):
        excel_text.excel_prompts(["cat", "dog"])


def test_tokens_and_descriptor_files_of_the_release(ref, tiny):
    """Our tokenizer gives the release's tokens for every prompt and every published descriptor, and both
    published descriptor files match our VOC and COCO class lists (COCO's spells motorbike, sofa, ...)."""
    clip = ref.module("clip")
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    for classes, name in ((VOC_CLASSES, VOC_JSON), (COCO_CLASSES, COCO_JSON)):
        path = ref.root / "attributes_text" / name
        table = excel_text.read_descriptors(path)
        prompts = excel_text.excel_prompts(classes)
        owners = excel_text.match_descriptors(table, prompts, path)
        assert owners == list(range(len(classes) - 1))
        sentences = [s.lower() for v in table.values() for s in v] + prompts.texts()
        assert torch.equal(text_tower.tokenize(sentences).long(), clip.tokenize(sentences).long())


def test_plain_prompts_without_descriptors(tiny):
    lines = []
    classes = ["background", "red fox", "kettle"]
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    bank = excel_text.build_text_bank(text_tower, classes, note=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0] and "no descriptors" in lines[0]
    assert bank.note == lines[0].removeprefix("note: ")
    assert torch.equal(bank.enriched, bank.text_features) and bank.centres.shape == (0, 64)
    assert bank.flags.shape == (2, 0) and not bank.enriched_by_descriptors
    assert bank.names == ["red fox", "kettle"] and "keyboard" in bank.background


def test_folder_class_list_with_descriptors(tiny, tmp_path):
    """A class list of one's own: plain names, the default cluster count (the release's VOC ratio of 112
    clusters to 400 sentences, at least 11), flags in class order whatever the file's order."""
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    path = _write_descriptors(tmp_path / "d.json", ["kettle", "red_fox"], per_class=20)
    lines = []
    with threadpool_limits(1):
        bank = excel_text.build_text_bank(text_tower, ["background", "red fox", "kettle"], descriptors=path,
                                          note=lines.append)
    assert bank.kmeans["clusters"] == 11 and bank.centres.shape == (11, 64) and bank.descriptors == "d.json"
    assert len(lines) == 1 and "plain class names" in lines[0]
    table = excel_text.read_descriptors(path)
    embedded = torch.cat(excel_text.encode_descriptors(text_tower, table))
    with threadpool_limits(1):
        _, labels = excel_text.cluster_descriptors(embedded, 11)
    assert torch.equal(bank.flags, excel_text.cluster_flags(labels, [1] * 20 + [0] * 20, 2, 11))
    assert not torch.equal(bank.enriched, bank.text_features)
    with pytest.raises(WeakclipError, match="width 512, the CLIP image tower's embedding is 64"):
        ExcelNet(build_clip("tiny-excel", weights=tiny["weights"])[0], excel_text.TextBank(
            class_names=["background", "a"], names=["a"], background=["sky"], template="{}",
            text_features=torch.zeros(2, 512), enriched=torch.zeros(2, 512), centres=torch.zeros(0, 512),
            flags=torch.zeros(1, 0)), ExcelSettings(arch="tiny-excel"))


def test_kmeans_seeding_of_scikit_learn_1_0_2():
    """``kmeans_plusplus_sklearn_1_0`` draws the centres scikit-learn 1.0.2's ``_kmeans_plusplus`` drew: the
    indices below were produced by 1.0.2's own source (its wheel's Python code, with its float64
    ``stable_cumsum`` and ``_euclidean_distances``) on these data, three seedings from one RandomState(0)
    as KMeans's n_init loop makes them. Today's scikit-learn draws others from the same seed."""
    data = np.random.RandomState(7).rand(60, 16).astype(np.float32)
    data -= data.mean(0)
    expected = [[44, 51, 3, 48, 19, 57, 45, 39, 6, 18, 26, 34],
                [38, 12, 59, 37, 15, 36, 21, 57, 2, 18, 41, 16],
                [10, 39, 24, 36, 45, 54, 41, 22, 57, 34, 42, 44]]
    state = np.random.RandomState(0)
    for indices in expected:
        np.testing.assert_array_equal(excel_text.kmeans_plusplus_sklearn_1_0(data, 12, state), data[indices])
    from sklearn.cluster import kmeans_plusplus

    _, today = kmeans_plusplus(data, 12, random_state=0)
    assert list(today) != expected[0]
    with threadpool_limits(1):
        centres, labels = excel_text.cluster_descriptors(torch.from_numpy(data), 12)
        pinned = sklearn.cluster.KMeans(12, init=excel_text.kmeans_plusplus_sklearn_1_0, n_init=10,
                                        algorithm="elkan", random_state=0).fit(data)
    np.testing.assert_array_equal(labels, pinned.labels_)
    assert centres.dtype == torch.float32 and torch.equal(centres, torch.from_numpy(pinned.cluster_centers_))


def test_too_few_clusters_is_a_one_line_error(tiny):
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    with pytest.raises(WeakclipError, match="at least 11") as err:
        excel_text.build_text_bank(text_tower, VOC_CLASSES, descriptors=tiny["descriptors"], clusters=10,
                                   note=None)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="need at least as many descriptors"):
        excel_text.cluster_descriptors(torch.zeros(5, 4), 6)


# --------------------------------------------------------------------------------------------------
# Descriptors file errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"is not JSON: .* at line 1"),
        ("[1, 2]", "must be a JSON object"),
        ('{"cat": "a cat."}', "class 'cat' must have a non-empty list"),
        ('{"cat": []}', "class 'cat' must have a non-empty list"),
        (b"\xff\xfe\x00", "not JSON"),
    ],
)
def test_unreadable_descriptor_files(tmp_path, content, message):
    path = tmp_path / "d.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        excel_text.read_descriptors(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        excel_text.read_descriptors(tmp_path / "missing.json")


def test_descriptor_classes_must_be_the_datas(tmp_path):
    prompts = excel_text.excel_prompts(["background", "cat", "dining table"])
    good = {"Cat": ["x"], "diningtable": ["y"]}
    assert excel_text.match_descriptors(good, prompts, "f.json") == [0, 1]
    assert excel_text.match_descriptors({"dining_table": ["y"], "cat": ["x"]}, prompts) == [1, 0]
    cases = [
        ({"cat": ["x"]}, "f.json has no descriptors for class 'dining table'"),
        ({"cat": ["x"], "dining table": ["y"], "dog": ["z"]},
         "f.json names class 'dog', which the data does not"),
        ({"cat": ["x"], "Cat": ["w"], "dining table": ["y"]}, "names class 'cat' twice"),
    ]
    for table, message in cases:
        with pytest.raises(DataError, match=message) as err:
            excel_text.match_descriptors(table, prompts, "f.json")
        assert "\n" not in str(err.value)
    voc = excel_text.excel_prompts(VOC_CLASSES)  # VOC's list accepts its other spellings
    table = {n: ["x"] for n in VOC_NAMES}
    assert excel_text.match_descriptors(table, voc) == list(range(20))


def test_build_reports_a_descriptor_file_of_other_classes(tiny, tmp_path):
    _, text_tower = build_clip("tiny-excel", weights=tiny["weights"])
    path = _write_descriptors(tmp_path / "d.json", ["cat", "dog"])
    with pytest.raises(DataError, match=r"d.json has no descriptors for class 'kettle'"):
        excel_text.build_text_bank(text_tower, ["background", "cat", "dog", "kettle"], descriptors=path,
                                   clusters=11, note=None)


# --------------------------------------------------------------------------------------------------
# CLIP pass


@pytest.mark.parametrize(("mode", "size", "batch"), [("train", 96, 2), ("train", 128, 1), ("train", 64, 2),
                                                     ("val", 96, 1), ("val", 128, 2)])
def test_clip_pass_equals_release(ref, tiny, mode, size, batch):
    """Both passes (plain, and with decoder features), positional grid from the crop ("train") or from CLIP's
    own grid ("val"), at the crop and at other sizes."""
    clip = ref.module("clip")
    reference = reference_clip_from_state_dict(ref, tiny["state"])
    reference.visual.reload_self_attn(layers=6, feat_size=CROP // 16, mode=mode)
    tower, _ = build_clip("tiny-excel", weights=tiny["weights"])
    ours = ExcelClipPass(tower, 6, base_grid_for_mode(mode, CROP))
    images = _images(batch, size, seed=size + batch)
    ex_feats = torch.randn(batch, 32, size // 16, size // 16)
    for extra in (None, ex_feats):
        features, attn, tokens = clip.generate_clip_fts(
            images, reference, return_weights=True, ex_feats=extra
        )
        out = ours(images, extra)
        assert out.grid == (size // 16, size // 16)
        assert _max_diff(out.image_features, features) <= EXACT
        assert _max_diff(out.attn, attn) <= EXACT
        assert _max_diff(out.tokens, tokens) <= EXACT
    # the quirks themselves: 5 blocks changed (heads summed there: rows add up to the head count), layer 6's
    # stored tokens are the final surgery-path tokens
    heads = tower.visual.transformer.resblocks[0].attn.num_heads
    rows = out.attn.sum(-1)
    assert torch.allclose(rows[:7], torch.ones_like(rows[:7]), atol=1e-5)
    assert torch.allclose(rows[7:], torch.full_like(rows[7:], float(heads)), atol=1e-5)
    assert torch.allclose(out.image_features.norm(dim=1), torch.ones(batch, out.image_features.shape[-1]))


def test_clip_pass_other_grids_and_errors(tiny):
    tower, _ = build_clip("tiny-excel", weights=tiny["weights"])
    ours = ExcelClipPass(tower, 6, (6, 6))
    out = ours(torch.randn(1, 3, 96, 64))  # non-square: the grid is resized to its own shape
    assert out.grid == (6, 4) and out.tokens.shape == (12, 1, 25, 128) and out.attn.shape == (12, 1, 25, 25)
    with pytest.raises(WeakclipError, match="ex_feats must be B x D x 6 x 4"):
        ours(torch.randn(1, 3, 96, 64), torch.randn(1, 8, 6, 6))
    with pytest.raises(WeakclipError, match="surgery_layers must lie in 2..13"):
        ExcelClipPass(tower, 1)


# --------------------------------------------------------------------------------------------------
# The network


def _compare_forward(reference, ours, images):
    ref_out = reference(images)
    out = ours(images)
    scale = ref_out[0].abs().max().item()
    assert _max_diff(out.seg, ref_out[0]) <= 1e-4 * scale
    assert _max_diff(out.features, ref_out[1]) <= 1e-5
    assert _max_diff(out.attr_maps, ref_out[2]) <= EXACT
    assert _max_diff(out.attn, ref_out[3]) <= EXACT
    assert _max_diff(out.affinity, ref_out[4]) <= 1e-5
    assert not out.features.requires_grad
    # the second pass, with the fused features as the release feeds them back
    second = ours.attr_maps_from_features(images, out.features)
    assert _max_diff(second, reference(images, ex_feats=ref_out[1])) <= EXACT
    return out


@pytest.mark.parametrize(("size", "batch"), [(96, 1), (96, 2), (128, 2)])
def test_forward_equals_release(pair, size, batch):
    reference, ours = pair["ref"], pair["ours"]
    with torch.no_grad():
        out = _compare_forward(reference, ours, _images(batch, size, seed=10 * size + batch))
    grid = size // 16
    assert out.seg.shape == (batch, 21, grid, grid) and out.attr_maps.shape == (batch, grid * grid, 20)
    assert out.affinity.shape == (batch, grid * grid, grid * grid)


def test_forward_in_training_mode_equals_release(pair):
    """Dropout2d of the fusion active: the same draws with the same seed; gradients reach every trained
    parameter and no CLIP one."""
    reference, ours = pair["ref"], pair["ours"]
    reference.train()
    ours.train()
    try:
        assert not ours.clip_pass.training and not ours.clip_pass.tower.training
        images = _images(2, CROP, seed=5)
        torch.manual_seed(21)
        ref_out = reference(images)
        torch.manual_seed(21)
        out = ours(images)
        assert _max_diff(out.seg, ref_out[0]) <= 1e-4 * ref_out[0].abs().max().item()
        assert _max_diff(out.affinity, ref_out[4]) <= 1e-5
        assert (out.features == 0).all(dim=(2, 3)).any()  # whole channels dropped
        (out.seg.mean() + out.affinity.mean()).backward()
    finally:
        reference.eval()
        ours.eval()
    trained = [p for group in ours.param_groups() for p in group]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None and not p.requires_grad for p in ours.clip_pass.parameters())
    for p in trained:
        p.grad = None


def test_batch_dependence_is_the_releases(pair):
    """The affinity prediction and the second pass subtract a mean over the whole batch: an image's outputs
    change with its batch, in the release and here alike."""
    reference, ours = pair["ref"], pair["ours"]
    images = _images(2, CROP, seed=8)
    with torch.no_grad():
        alone, both = ours(images[:1]), ours(images)
        assert _max_diff(alone.affinity[0], both.affinity[0]) > 1e-3
        assert _max_diff(alone.seg[0], both.seg[0]) < 1e-5  # the logits are per image
        second_alone = ours.attr_maps_from_features(images[:1], both.features[:1])
        second_both = ours.attr_maps_from_features(images, both.features)
        assert _max_diff(second_alone[0], second_both[0]) > 1e-4
        assert _max_diff(second_alone, reference(images[:1], ex_feats=both.features[:1])) <= EXACT


def test_param_groups_and_release_keys(pair):
    reference, ours = pair["ref"], pair["ours"]
    groups = ours.param_groups()
    assert [len(g) for g in groups[:3]] == [0, 0, 0] and len(PARAM_GROUP_LR_SCALES) == 4
    assert PARAM_GROUP_LR_SCALES[3] == 10.0
    ref_groups = reference.get_param_groups()
    assert len(groups[3]) == len(ref_groups[3])
    for mine, theirs in zip(groups[3], ref_groups[3]):  # same order, same tensors after the key map
        assert torch.equal(mine.detach(), theirs.detach())
    mapped = release_state_dict_to_ours({f"module.{k}": v for k, v in reference.state_dict().items()})
    assert set(mapped) == set(ours.trainable_state_dict())
    with pytest.raises(WeakclipError, match="'decoder.extra' is not a parameter"):
        release_state_dict_to_ours({"decoder.extra": torch.zeros(1)})
    with pytest.raises(WeakclipError, match="missing"):
        ours.load_trainable_state_dict({k: v for k, v in mapped.items() if "fusion.fuse" not in k})


def test_payload_rebuilds_the_network(pair, tiny, tmp_path):
    ours = pair["ours"]
    path = tmp_path / "excel.pt"
    torch.save(ours.payload(), path)
    payload = torch.load(path, weights_only=True)
    again = rebuild_excel_net(payload, tiny["weights"])
    assert again.class_names == list(VOC_CLASSES) and again.settings == ours.settings
    images = _images(1, CROP, seed=2)
    with torch.no_grad():
        first, second = ours(images), again(images)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(WeakclipError, match="holds no ExCEL network"):
        rebuild_excel_net({"decoder": {}}, tiny["weights"])
    broken = dict(payload, text_bank={k: v for k, v in payload["text_bank"].items() if k != "enriched"})
    with pytest.raises(WeakclipError, match="missing enriched"):
        rebuild_excel_net(broken, tiny["weights"])


def test_position_mode_of_the_release_test_models(ref, tiny, tmp_path):
    """The release's val / test models resize positional embeddings from CLIP's grid (mode "val"): our
    "clip" position mode equals them at the inference sizes (here the crop and 1.5 x)."""
    reference = _reference_model(ref, tiny["state"], tmp_path, tiny["descriptors"], mode="val")
    with threadpool_limits(1):
        ours = build_excel_net("tiny-excel", tiny["weights"], VOC_CLASSES, descriptors=tiny["descriptors"],
                               clusters=CLUSTERS, crop=CROP, position_mode="clip", kmeans_seeding="sklearn",
                               note=None)
    ours.load_trainable_state_dict(reference.state_dict(), release=True)
    ours.eval()
    with torch.no_grad():
        for size in (CROP, CROP * 3 // 2):
            _compare_forward(reference, ours, _images(2, size, seed=size))
    ours.set_position_mode("crop")
    assert ours.clip_pass.base_grid == (CROP // 16, CROP // 16)


@pytest.mark.slow
def test_full_size_vit_b16_equals_release(ref):
    """The real architecture (random weights): one 320 px image through the release's model and ours. The text
    side is compared on the tiny CLIP above; here both models get the same random enriched text features (the
    release's ``ExCEL_model`` is assembled from its own parts, without its text-encoding constructor)."""
    torch.manual_seed(0)
    arch = get_arch("ViT-B/16")
    model = make_open_clip_model(arch).eval().requires_grad_(False)
    tower = CLIPImageTower(model.visual, arch).eval()
    release = ref.module("model.model_excel").ExCEL_model
    reference = torch.nn.Module.__new__(release)
    torch.nn.Module.__init__(reference)
    reference.num_classes, reference.embedding_dim, reference.in_channels = 21, 256, arch.width
    reference.encoder = reference_clip_from_state_dict(ref, model.state_dict())
    reference.encoder.visual.reload_self_attn(layers=6, feat_size=320 // 16, mode="train")
    reference.decoder_fts_fuse = ref.module("model.segformer_head").SegFormerHead(
        in_channels=arch.width, embedding_dim=256, num_classes=21, index=12)
    reference.decoder = ref.module("model.decoder.TransDecoder").DecoderTransformer(
        width=256, layers=3, heads=8, output_dim=21)
    texts = torch.nn.functional.normalize(torch.randn(45, arch.embed_dim), dim=1)
    reference.text_attr = texts.t()  # the release's layout: embed_dim x texts
    reference.eval()
    bank = excel_text.TextBank(
        class_names=list(VOC_CLASSES), names=list(VOC_NAMES), background=list(BACKGROUND_VOC),
        template=excel_text.PROMPT_TEMPLATE, text_features=texts, enriched=texts,
        centres=torch.zeros(0, arch.embed_dim), flags=torch.zeros(20, 0),
    )
    ours = ExcelNet(tower, bank, ExcelSettings(arch="ViT-B/16", crop=320)).eval()
    ours.load_trainable_state_dict(reference.state_dict(), release=True)
    with torch.no_grad():
        out = _compare_forward(reference, ours, _images(1, 320, seed=1))
    assert out.seg.shape == (1, 21, 20, 20) and out.attn.shape == (12, 1, 401, 401)
