"""CLIP-ES's prompt names for VOC and COCO class lists in any spelling, and the record of which names and
background words a seed run used (summary, printed report, the pipeline's stage.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weakclip.cli import build_parser, main
from weakclip.commands.seeds import preset_mismatch, seed_config
from weakclip.data.classes import (
    COCO91_CLASSES,
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCO_UNANNOTATED,
    VOC_CLASSES,
    VOC_PROMPT_NAMES,
    read_class_file,
)
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.models.clip import build_clip
from weakclip.seeds.clip_es import ClipEsConfig, ClipEsSeeder, seed_preset
from weakclip.seeds.names import (
    BACKGROUND_COCO,
    BACKGROUND_VOC,
    COCO_ES_CLASSES,
    COCO_NAMES,
    VOC_NAMES,
    normalise_name,
    prompt_vocabulary,
    recognise_class_list,
)

# the spellings a class list may come in; each keeps "background" first as every class list here does
SPELLINGS = {
    "as is": lambda n: n,
    "upper case": str.upper,
    "title case": str.title,
    "underscores": lambda n: n.replace(" ", "_"),
    "hyphens": lambda n: n.replace(" ", "-"),
    "extra spaces": lambda n: "  " + n.replace(" ", "   ") + " ",
}

# the same class ids under different words: ours, readable, CLIP-ES's own, CLIP-ES's synonym names
VOC_LISTS = {
    "raw": VOC_CLASSES,
    "readable": VOC_PROMPT_NAMES,
    "clip-es synonyms": ("background", *VOC_NAMES),
}
COCO_LISTS = {
    "ours": COCO_CLASSES,
    "clip-es raw": ("background", *COCO_ES_CLASSES),
    "clip-es synonyms": ("background", *COCO_NAMES),
}


def _spelled(names, how: str) -> list[str]:
    return [SPELLINGS[how](n) for n in names]


# ------------------------------------------------------------------------------------------------
# the matching rule


def test_normalise_name():
    assert normalise_name("  Dining_Table ") == normalise_name("dining-table") == "diningtable"
    assert normalise_name("TV Monitor") == normalise_name("tvmonitor") == "tvmonitor"
    assert normalise_name("person with clothes, people, human") == "personwithclothes,people,human"
    assert normalise_name("dining tables") != normalise_name("dining table")


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("words", VOC_LISTS)
def test_voc_in_any_spelling_gets_clip_es_voc_names(words, how):
    classes = _spelled(VOC_LISTS[words], how)
    assert recognise_class_list(classes) == "voc"
    vocab = prompt_vocabulary(classes)
    assert vocab.names == VOC_NAMES and vocab.source == "clip-es voc" and vocab.note is None
    resolved = ClipEsConfig().for_classes(classes)
    assert resolved.background == BACKGROUND_VOC and resolved.box_threshold == 0.4
    # the -plus presets' plain names are our readable VOC names whatever the spelling
    plain = prompt_vocabulary(classes, plain=True)
    assert plain.names == VOC_PROMPT_NAMES[1:] and plain.source == "plain" and plain.note is None


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("words", COCO_LISTS)
def test_coco80_in_any_spelling_gets_clip_es_coco_names(words, how):
    classes = _spelled(COCO_LISTS[words], how)
    assert recognise_class_list(classes) == "coco"
    vocab = prompt_vocabulary(classes)
    assert vocab.names == COCO_NAMES and vocab.source == "clip-es coco"
    resolved = ClipEsConfig().for_classes(classes)
    assert resolved.background == BACKGROUND_COCO and resolved.box_threshold == 0.7
    assert prompt_vocabulary(classes, plain=True).names == COCO_CLASSES[1:]


def _coco91(words: tuple[str, ...], unannotated=None) -> list[str]:
    """A 91-id list: ``words`` (80 foreground names) at their category ids, the COCO paper's names or
    ``unannotated(id)`` at the 10 ids without annotations."""
    by_id = dict(zip(COCO_CATEGORY_IDS, words[1:]))
    for i, name in COCO_UNANNOTATED.items():
        by_id[i] = unannotated(i) if unannotated else name
    return ["background", *(by_id[i] for i in range(1, 91))]


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("words", COCO_LISTS)
def test_coco91_in_any_spelling_gets_clip_es_coco_names(words, how):
    classes = _spelled(_coco91(COCO_LISTS[words]), how)
    assert recognise_class_list(classes) == "coco91"
    vocab = prompt_vocabulary(classes)
    assert vocab.source == "clip-es coco" and len(vocab.names) == 90
    assert [vocab.names[i - 1] for i in COCO_CATEGORY_IDS] == list(COCO_NAMES)
    for i, name in COCO_UNANNOTATED.items():  # no CLIP-ES name: the list's own, readable
        assert vocab.names[i - 1] == SPELLINGS[how](name).replace("_", " ")
    resolved = ClipEsConfig().for_classes(classes)
    assert resolved.background == BACKGROUND_COCO and resolved.box_threshold == 0.7
    assert _coco91(COCO_CLASSES) == list(COCO91_CLASSES)


def test_coco91_ids_without_annotations_may_have_any_name():
    classes = _coco91(COCO_CLASSES, unannotated=lambda i: f"unused_{i}")
    vocab = prompt_vocabulary(classes)
    assert vocab.source == "clip-es coco" and vocab.names[11] == "unused 12"


def test_background_may_be_absent_for_recognition_but_names_need_it():
    assert recognise_class_list(VOC_PROMPT_NAMES[1:]) == "voc"
    assert recognise_class_list(COCO_CLASSES[1:]) == "coco"
    # prompt names are for classes[1:]: without background first the list is not taken for VOC's
    assert prompt_vocabulary(VOC_PROMPT_NAMES[1:]).source == "plain"


@pytest.mark.parametrize("classes", [
    ["background", "cat_toy", "dog"],
    [*VOC_CLASSES[:11], *VOC_CLASSES[12:]],  # one class missing
    [*VOC_CLASSES, "extra"],  # one class too many
    ["background", *VOC_CLASSES[2:], VOC_CLASSES[1]],  # order changed: ids would not map
    [*VOC_PROMPT_NAMES[:11], "dining tables", *VOC_PROMPT_NAMES[12:]],  # another word
    [*VOC_CLASSES[:5], "ship", *VOC_CLASSES[6:]],  # a synonym that is not CLIP-ES's
    ["background", *(("airplane" if c == "aeroplane" else c) for c in VOC_CLASSES[1:])],  # COCO's word
    [*COCO_CLASSES[:-1], "hair dryer"],
    _coco91(COCO_CLASSES)[:-1],
], ids=["foreign", "missing", "extra", "order", "plural", "synonym", "coco-word-in-voc", "coco-typo",
        "coco91-short"])
def test_other_lists_get_plain_names_and_a_note(classes):
    assert recognise_class_list(classes) is None
    vocab = prompt_vocabulary(classes)
    assert vocab.source == "plain" and len(vocab.names) == len(classes) - 1
    assert vocab.names[0] == classes[1].replace("_", " ")
    assert "CLIP-ES has no names" in vocab.note and "\n" not in vocab.note
    assert ClipEsConfig().for_classes(classes).background == BACKGROUND_VOC


def test_class_file_in_readable_spelling_is_voc(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("BACKGROUND\n" + "\n".join(n.replace(" ", "_").title() for n in VOC_PROMPT_NAMES[1:]))
    classes = read_class_file(path)
    assert classes[11] == "Dining_Table" and prompt_vocabulary(classes).names == VOC_NAMES


# ------------------------------------------------------------------------------------------------
# the seeder and what it records


@pytest.fixture(scope="module")
def tiny():
    return build_clip("tiny", pretrained_download=False)


@pytest.mark.parametrize(("classes", "preset", "names", "background", "source"), [
    (list(VOC_PROMPT_NAMES), "voc", VOC_NAMES, BACKGROUND_VOC, "clip-es voc"),
    (_spelled(COCO_ES_CLASSES, "hyphens"), "coco", COCO_NAMES, BACKGROUND_COCO, "clip-es coco"),
], ids=["voc-readable", "coco-hyphens"])
def test_seeder_prompts_and_record(tiny, classes, preset, names, background, source):
    image_tower, text_tower = tiny
    if classes[0] != "background":
        classes = ["background", *classes]
    seeder = ClipEsSeeder(image_tower, classes, text_tower=text_tower, config=seed_preset(preset))
    assert seeder.class_prompts == list(names) and seeder.background_prompts == list(background)
    assert seeder.clip_es_names and seeder.names_source == source
    record = seeder.names_record()
    assert record == {"names_source": source, "class_list": preset, "names": list(names),
                      "background": list(background), "dropped_background": []}
    # the -plus preset prompts our readable names
    plus = ClipEsSeeder(image_tower, classes, text_tower=text_tower, config=seed_preset(f"{preset}-plus"))
    readable = VOC_PROMPT_NAMES[1:] if preset == "voc" else COCO_CLASSES[1:]
    assert plus.class_prompts == list(readable) and plus.names_record()["names_source"] == "plain"
    assert "names_note" not in plus.names_record()


def test_seeder_record_of_a_foreign_list_and_of_given_embeddings(tiny):
    import torch

    image_tower, text_tower = tiny
    classes = ["background", "cat_toy", "dog"]
    record = ClipEsSeeder(image_tower, classes, text_tower=text_tower).names_record()
    assert record["names_source"] == "plain" and record["names"] == ["cat toy", "dog"]
    assert record["class_list"] is None and "plain class names" in record["names_note"]
    d = text_tower.embed_dim
    given = ClipEsSeeder(image_tower, classes, class_embeddings=torch.randn(2, d),
                         background_embeddings=torch.randn(3, d)).names_record()
    assert given["names_source"] == "given embeddings" and given["names"] == []
    assert "names_note" not in given


_NEEDED = ["--data-root", "d", "--clip-weights", "w.pt", "--out", "o"]  # what seeds generate requires


def test_default_preset_follows_the_recognised_class_list():
    args = build_parser().parse_args(["seeds", *_NEEDED])
    coco = _spelled(COCO_CLASSES, "underscores")
    assert seed_config(args, "folder", coco)[0] == "coco"
    assert seed_config(args, "folder", _coco91(COCO_CLASSES))[0] == "coco"
    assert seed_config(args, "folder", list(VOC_PROMPT_NAMES))[0] == "voc"
    assert seed_config(args, "coco", ["background", "cat"])[0] == "coco"
    assert seed_config(args, "folder", ["background", "cat"])[0] == "voc"
    chosen = build_parser().parse_args(["seeds", *_NEEDED, "--preset", "voc"])
    assert seed_config(chosen, "folder", coco)[0] == "voc"
    assert preset_mismatch("voc", "coco").startswith("note: the class list is COCO's")
    assert preset_mismatch("coco-plus", "voc") is not None
    assert preset_mismatch("voc-plus", "voc") is None and preset_mismatch("coco", None) is None


# ------------------------------------------------------------------------------------------------
# end to end: `weakclip seeds` and the pipeline's seed stage on a folder dataset


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from weakclip.demo import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny.pt")


def _relabelled(root: Path, classes: list[str]) -> Path:
    """The synthetic folder dataset at ``root`` (3 shape classes) with ``classes`` as its class list: the
    shapes' ids 1..3 become ``classes[1:4]`` (labels.json renamed; the masks keep their ids)."""
    make_synthetic_dataset(root, n_train=3, n_val=1, n_classes=3, image_size=(48, 64))
    shapes = read_class_file(root / "classes.txt")
    rename = dict(zip(shapes[1:], classes[1:4]))
    labels = json.loads((root / "labels.json").read_text())
    (root / "labels.json").write_text(json.dumps({k: [rename[n] for n in v] for k, v in labels.items()}))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _seeds(root: Path, out: Path, weights: Path, *extra: str) -> dict:
    argv = ["seeds", "--data-root", str(root), "--split", "train", "--clip-weights", str(weights),
            "--arch", "tiny-p8", "--out", str(out), "--device", "cpu", "--masks", *extra]
    assert main(argv) == 0
    return json.loads((out / "seeds_summary.json").read_text())


def test_seeds_command_on_a_readable_voc_class_list(tmp_path, tiny_weights, capsys):
    root = _relabelled(tmp_path / "data", list(VOC_PROMPT_NAMES))
    summary = _seeds(root, tmp_path / "seeds", tiny_weights, "--quiet")
    assert summary["written"] == 3 and 0.0 <= summary["miou"] <= 1.0
    assert summary["names_source"] == "clip-es voc" and summary["class_list"] == "voc"
    assert summary["names"] == list(VOC_NAMES) and summary["background"] == list(BACKGROUND_VOC)
    assert "names_note" not in summary
    printed = capsys.readouterr().out
    assert "class names (clip-es voc): aeroplane; bicycle; bird avian; " in printed
    assert "person with clothes,people,human; pottedplant;" in printed
    assert f"background prompts (25): {'; '.join(BACKGROUND_VOC)}" in printed


def test_seeds_command_on_a_coco_list_and_a_foreign_list(tmp_path, tiny_weights, capsys):
    coco = _relabelled(tmp_path / "coco", ["background", *_spelled(COCO_CLASSES[1:], "hyphens")])
    summary = _seeds(coco, tmp_path / "coco_seeds", tiny_weights)
    printed = capsys.readouterr().out
    assert "seed preset coco: class names clip-es coco" in printed and "box threshold 0.7" in printed
    assert summary["names"] == list(COCO_NAMES) and summary["background"] == list(BACKGROUND_COCO)

    foreign = _relabelled(tmp_path / "foreign", ["background", "cat_toy", "dog", "bird_feeder"])
    summary = _seeds(foreign, tmp_path / "foreign_seeds", tiny_weights, "--quiet")
    assert summary["names_source"] == "plain" and summary["names"] == ["cat toy", "dog", "bird feeder"]
    assert summary["background"] == list(BACKGROUND_VOC)
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "CLIP-ES has no names" in ln]
    assert notes == [f"note: {summary['names_note']}"]


def test_pipeline_seed_stage_records_the_names(tmp_path, tiny_weights):
    from weakclip.pipeline import Pipeline, PipelineConfig

    root = _relabelled(tmp_path / "data", [n.replace(" ", "_").upper() for n in VOC_PROMPT_NAMES])
    lines: list[str] = []
    cfg = PipelineConfig(workdir=tmp_path / "w", data_root=root, dataset="folder", train_split="train",
                         clip_weights=tiny_weights,
                         refine_overrides=["model.clip_arch=tiny-p8"], progress=False)
    Pipeline(cfg, log=lines.append).run(stages=("seeds",))
    settings = json.loads((tmp_path / "w" / "seeds" / "stage.json").read_text())["settings"]
    assert settings["names_source"] == "clip-es voc" and settings["names"] == list(VOC_NAMES)
    assert settings["background"] == list(BACKGROUND_VOC) and settings["box_threshold"] == 0.4
    assert any(line.startswith("seeds: class names (clip-es voc): aeroplane;") for line in lines)
    assert settings["plain_names"] is False and settings["softmax_over"] != "all"


def test_pipeline_plus_preset_switches_on_the_seed_departures(tmp_path, tiny_weights):
    """`weakclip run --preset voc-plus` seeds with the -plus seed switches, as `weakclip seeds --preset
    voc-plus`; the background words and box threshold still follow the class list."""
    from weakclip.pipeline import Pipeline, PipelineConfig
    from weakclip.seeds.clip_es import PLUS_SWITCHES

    root = _relabelled(tmp_path / "data", list(VOC_PROMPT_NAMES))
    cfg = PipelineConfig(workdir=tmp_path / "w", data_root=root, preset="voc-plus", dataset="folder",
                         train_split="train", clip_weights=tiny_weights,
                         refine_overrides=["model.clip_arch=tiny-p8"], progress=False)
    Pipeline(cfg, log=lambda line: None).run(stages=("seeds",))
    settings = json.loads((tmp_path / "w" / "seeds" / "stage.json").read_text())["settings"]
    for key, value in PLUS_SWITCHES.items():
        assert settings[key] == value, key
    assert settings["background"] == list(BACKGROUND_VOC) and settings["box_threshold"] == 0.4
