"""ExCEL's presets hold the release's settings: every value of ``excel-voc`` / ``excel-coco`` is compared
with the authors' code, their scripts' argparse defaults (the parsers themselves, imported from the snapshot)
or the literal in their code (read with ``ast`` from the snapshot's files); plus the config's overrides,
one-line errors and ``method`` entry."""

from __future__ import annotations

import ast

import pytest

from excel_ref import excel_ref_root, excel_reference
from weakclip.data.classes import COCO_CLASSES, VOC_CLASSES
from weakclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from weakclip.errors import WeakclipError
from weakclip.methods import of_preset, of_record
from weakclip.methods.excel.config import (
    EXCEL_PRESETS,
    ExcelConfig,
    apply_excel_overrides,
    load_excel_preset,
)
from weakclip.models.clip_arch import get_arch

SCRIPTS = {"excel-voc": "scripts/train_voc.py", "excel-coco": "scripts/train_coco.py"}
INFER = {"excel-voc": "tools/infer_seg_voc.py", "excel-coco": "tools/infer_seg_coco.py"}


@pytest.fixture(scope="module")
def release_args():
    """The argparse defaults of the release's training, inference and training-free scripts."""
    with excel_reference() as ref:
        out = {name: ref.module(path[:-3].replace("/", ".")).parser.parse_args([])
               for name, path in {**SCRIPTS, **{f"{k}:infer": v for k, v in INFER.items()}}.items()}
        out["free"] = ref.module("tools.infer_lam").parser.parse_args([])
    return out


# ---------------------------------------------------------------------- reading the release's literals
def _tree(rel: str) -> ast.Module:
    root = excel_ref_root()
    if root is None:
        pytest.skip("the authors' ExCEL snapshot is not here")
    return ast.parse((root / rel).read_text(encoding="utf-8"))


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _callee(n) == name]


def _keyword(tree: ast.AST, func: str, key: str):
    """The literal value of keyword ``key`` in the one distinct value passed to ``func`` in the file."""
    values = {ast.unparse(k.value) for c in _calls(tree, func) for k in c.keywords if k.arg == key}
    assert len(values) == 1, (func, key, values)
    return ast.literal_eval(values.pop())


def _default(tree: ast.AST, func: str, arg: str):
    """The default of argument ``arg`` of function ``func`` defined in the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            names = [a.arg for a in node.args.args]
            defaults = dict(zip(names[len(names) - len(node.args.defaults):], node.args.defaults))
            return ast.literal_eval(defaults[arg])
    raise AssertionError(f"{func} not found")


def _iteration_switches(tree: ast.AST) -> list[int]:
    """The constants ``n_iter`` is compared with (``n_iter >= C``), in order."""
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "n_iter"
                and isinstance(node.ops[0], ast.GtE) and isinstance(node.comparators[0], ast.Constant)):
            out.append((node.lineno, node.comparators[0].value))
    return [v for _, v in sorted(out)]


def _assigned(tree: ast.AST, target: str) -> ast.expr:
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == target for t in n.targets)]
    assert len(found) == 1, target
    return found[0]


# ---------------------------------------------------------------------- the presets against the release
@pytest.mark.parametrize("preset", EXCEL_PRESETS)
def test_preset_equals_the_release_scripts_arguments(preset, release_args):
    cfg = load_excel_preset(preset)
    a = release_args[preset]
    assert a.model == f"ExCEL_{cfg.model.clip_arch}"
    assert a.in_channels == get_arch(cfg.model.clip_arch).width
    assert a.embedding_dim == cfg.model.embedding_dim
    assert a.num_attri == cfg.text.num_clusters
    assert a.radius == cfg.labels.radius
    assert (a.high_thre, a.low_thre, a.bkg_thre) == (cfg.labels.high_thre, cfg.labels.low_thre,
                                                     cfg.labels.bkg_thre)
    assert a.ignore_index == cfg.labels.ignore_index
    assert a.w_diver == cfg.train.aff_weight and a.w_seg == cfg.train.seg_weight
    assert a.max_iters == cfg.train.iters
    assert a.warmup_iters == cfg.train.warmup_iters
    assert a.warmup_lr == cfg.train.warmup_ratio
    assert a.lr == cfg.train.lr and a.wt_decay == cfg.train.weight_decay and a.power == cfg.train.power
    assert tuple(a.betas) == cfg.train.betas
    assert a.optimizer == "PolyWarmupAdamW"
    assert a.spg == cfg.train.batch_size  # one GPU (run_train.sh: nproc_per_node=1)
    assert a.seed == cfg.train.seed and a.log_iters == cfg.train.log_every
    assert a.crop_size == cfg.data.crop_size
    classes = VOC_CLASSES if cfg.data.kind == "voc" else COCO_CLASSES
    assert a.num_classes == len(classes)
    assert a.train_set == ("train_aug" if cfg.data.kind == "voc" else "train")
    assert cfg.data.split == ("train_aug" if cfg.data.kind == "voc" else "train2014")
    # the descriptors file is the user's (the authors publish it; the package does not ship it)
    assert cfg.text.descriptors is None and a.attr_json.endswith("_gpt4.0_cluster_a_photo_of4.json")
    if preset == "excel-voc":
        assert a.eval_iters == cfg.train.checkpoint_every


@pytest.mark.parametrize("preset", EXCEL_PRESETS)
def test_preset_equals_the_release_training_loop_literals(preset):
    cfg = load_excel_preset(preset)
    script = _tree(SCRIPTS[preset])
    switches = _iteration_switches(script)
    # the second CLIP pass and the predicted-affinity gate share one switch iteration
    assert switches[0] == switches[1] == cfg.labels.switch_iter
    aff_mask = _assigned(script, "aff_mask")
    if isinstance(aff_mask, ast.IfExp):  # VOC: cams_to_affinity_label(seg_pred) from an iteration on
        assert ast.literal_eval(aff_mask.test.comparators[0]) == cfg.labels.aff_from_pred_iter
        assert "seg_pred" in ast.unparse(aff_mask.body) and "aff_pseudos" in ast.unparse(aff_mask.orelse)
        assert switches == [cfg.labels.switch_iter] * 2 + [cfg.labels.aff_from_pred_iter]
    else:
        assert cfg.labels.aff_from_pred_iter is None and len(switches) == 2
    assert _keyword(script, "refine_cams_with_aff", "caa_thre") == cfg.labels.caa_threshold
    assert _keyword(script, "PAR", "num_iter") == cfg.labels.par_iters
    assert tuple(_keyword(script, "PAR", "dilations")) == cfg.labels.par_dilations
    dataset_cls = "VOC12ClsDataset" if cfg.data.kind == "voc" else "CocoClsDataset"
    assert tuple(_keyword(script, dataset_cls, "rescale_range")) == cfg.data.scale_range
    assert _keyword(script, dataset_cls, "img_fliplr") is cfg.data.flip
    # the crop window judged on the ground-truth mask: VOC's class passes it to random_crop, COCO's does not
    module = _tree("datasets/voc.py" if cfg.data.kind == "voc" else "datasets/coco.py")
    dataset = next(n for n in ast.walk(module) if isinstance(n, ast.ClassDef) and n.name == dataset_cls)
    (crop,) = _calls(dataset, "random_crop")
    assert (len(crop.args) == 2) is cfg.data.mask_guided_crop
    loss = _assigned(script, "loss")  # loss = 1.0 * seg_loss + args.w_diver * diver_loss
    assert ast.literal_eval(loss.left.left) == cfg.train.seg_weight and loss.right.left.attr == "w_diver"
    # utils/optimizer.py, engine/optimizer_engine.py: eps and the decoder groups' x10
    optim = _tree("utils/optimizer.py")
    poly = next(n for n in ast.walk(optim) if isinstance(n, ast.ClassDef) and n.name == "PolyWarmupAdamW")
    assert _keyword(poly, "__init__", "eps") == cfg.train.eps
    engine = _tree("engine/optimizer_engine.py")
    group_lrs = [ast.unparse(v) for d in ast.walk(engine) if isinstance(d, ast.Dict)
                 for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant) and k.value == "lr"]
    # four groups: the first two (empty in ExCEL) at lr, the decoder's two at lr * 10
    assert group_lrs == ["args.lr", "args.lr", f"args.lr * {cfg.train.decoder_lr_mult:g}",
                         f"args.lr * {cfg.train.decoder_lr_mult:g}"]


@pytest.mark.parametrize("preset", EXCEL_PRESETS)
def test_preset_equals_the_release_model_literals(preset):
    cfg = load_excel_preset(preset)
    model = _tree("model/model_excel.py")
    assert _keyword(model, "reload_self_attn", "layers") == cfg.model.surgery_layers
    assert _keyword(model, "DecoderTransformer", "layers") == cfg.model.decoder_layers
    assert _keyword(model, "DecoderTransformer", "heads") == cfg.model.decoder_heads
    assert _keyword(model, "encode_text_with_prompt_ensemble", "prompt_templates") == [cfg.text.prompt]
    head = _tree("model/segformer_head.py")
    assert {ast.literal_eval(c.args[0]) for c in _calls(head, "Dropout2d")} == {cfg.model.fuse_dropout}
    attr = _tree("model/load_attr.py")
    # KMeans(n_clusters, random_state=0) and nothing else: the defaults of the pinned scikit-learn 1.0.2
    # (n_init 10, elkan), which "sklearn-1.0.2" seeding reproduces with today's scikit-learn
    assert {k.arg for c in _calls(attr, "KMeans") for k in c.keywords} == {"n_clusters", "random_state"}
    assert _keyword(attr, "KMeans", "random_state") == 0
    root = excel_ref_root()
    assert "scikit-learn==1.0.2" in (root / "requirements.txt").read_text()
    assert cfg.text.kmeans_seeding == "sklearn-1.0.2"
    assert _default(attr, "attr_aggregate", "topK") == cfg.text.top_k
    affutils = _tree("utils/affutils.py")
    assert _default(affutils, "refine_cams_with_aff", "attn_layers") == cfg.labels.attn_layers
    transforms = _tree("datasets/transforms.py")
    assert tuple(_default(transforms, "normalize_img", "mean")) == IMAGENET_MEAN
    assert tuple(_default(transforms, "normalize_img", "std")) == IMAGENET_STD
    assert cfg.data.normalize == "imagenet"
    # how the release's datasets read images and place crops, as tests/test_excel_data.py established them
    from weakclip.methods.excel.augment import RELEASE_IMAGE_READING, release_mask_guided

    assert (cfg.data.image_reader, cfg.data.image_orientation) == RELEASE_IMAGE_READING
    assert cfg.data.mask_guided_crop is release_mask_guided(cfg.data.kind)
    assert cfg.text.background is None  # the release's list for the class list (text.excel_prompts)


@pytest.mark.parametrize("preset", EXCEL_PRESETS)
def test_preset_equals_the_release_inference_and_training_free(preset, release_args):
    cfg = load_excel_preset(preset)
    a = release_args[f"{preset}:infer"]
    assert a.resize_size == cfg.infer.size
    assert tuple(a.scales) == cfg.infer.scales
    assert a.crf_post is cfg.infer.crf
    script = _tree(INFER[preset])
    averaged = [n for n in ast.walk(script) if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == "seg"
                and ast.unparse(n.value) == "(segs[:1, ...] + segs[1:, ...].flip(-1)) / 2"]
    assert len(averaged) == (2 if cfg.infer.flip_at_base else 1)  # the scales' passes always average
    fractions = [ast.literal_eval(n.value.args[0].left) for n in ast.walk(script) if isinstance(n, ast.Assign)
                 and ast.unparse(n.targets[0]) in ("h", "w") and ast.unparse(n.value).startswith("int(")]
    assert fractions == ([] if cfg.infer.logits_fraction == 1.0 else [cfg.infer.logits_fraction] * 2)
    assert cfg.infer.flip and cfg.infer.settings().flip_at_base is cfg.infer.flip_at_base
    free = release_args["free"]
    assert free.training_free is True and free.resize_size == cfg.free.size
    lam = _tree("tools/infer_lam.py")
    assert _keyword(lam, "refine_cams_with_aff", "caa_thre") == cfg.free.caa_threshold
    # its pixel refinement gets the network's (normalised) input, not a de-normalised image
    (call,) = _calls(lam, "refine_cams_with_bkg_weclip")
    assert ast.unparse(call.args[1]) == "inputs[i]" and cfg.free.par_image == "normalized"


# ---------------------------------------------------------------------- the config itself
def test_presets_name_their_method_and_round_trip(tmp_path):
    for preset in EXCEL_PRESETS:
        cfg = load_excel_preset(preset)
        assert of_preset(preset).name == "excel"
        raw = cfg.to_dict()
        assert raw["method"] == "excel" and of_record(raw).name == "excel"
        path = tmp_path / f"{preset}.yaml"
        cfg.to_yaml(path)
        again = ExcelConfig.from_yaml(path)
        assert again == cfg and "method: excel" in path.read_text()


def test_overrides_are_typed_and_validated():
    cfg = load_excel_preset("excel-voc")
    out = apply_excel_overrides(cfg, ["labels.switch_iter=none", "train.betas=0.8,0.95", "train.iters=2e3",
                                      "labels.par_dilations=[1, 2]", "classes=background,cat,dog"])
    assert out.labels.switch_iter is None and out.train.betas == (0.8, 0.95) and out.train.iters == 2000
    assert out.labels.par_dilations == (1, 2) and out.classes == ["background", "cat", "dog"]
    assert cfg.labels.switch_iter == 14000  # the original is untouched


@pytest.mark.parametrize("override, words", [
    ("labels.radiuss=3", "unknown config key 'labels.radius"),
    ("train.iters=0", "train.iters must be positive"),
    ("labels.low_thre=0.9", "labels.low_thre and labels.high_thre"),
    ("model.decoder_heads=7", "model.decoder_heads must divide"),
    ("text.prompt=a photo", "text.prompt must hold '{}'"),
    ("free.par_image=raw", "free.par_image: 'raw' is not one of"),
    ("train.lr=fast", "train.lr: 'fast' is not a number"),
])
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(WeakclipError) as err:
        apply_excel_overrides(load_excel_preset("excel-voc"), [override])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_another_methods_config_is_refused_in_one_line(tmp_path):
    from weakclip.config import load_preset

    raw = load_preset("voc").to_dict()
    raw["method"] = "weakclip"
    with pytest.raises(WeakclipError) as err:
        ExcelConfig.from_dict({"method": "weakclip"}, source="w/config.yaml")
    assert str(err.value) == "w/config.yaml holds a WeakCLIP result, but this asks for ExCEL"
    with pytest.raises(WeakclipError, match="unknown preset|unknown ExCEL preset"):
        load_excel_preset("voc")


def test_train_config_of_a_folder_dataset_takes_its_own_cluster_count():
    """``weakclip train --preset excel-voc --dataset folder``: the presets' 112 clusters are VOC's; a folder
    dataset's class list takes VOC's ratio (none), as ``weakclip run`` does, unless --set says otherwise."""
    from weakclip.methods.excel.config import config_with_overrides

    assert config_with_overrides("excel-voc", []).text.num_clusters == 112
    assert config_with_overrides("excel-voc", ["data.kind=folder"]).text.num_clusters is None
    own = config_with_overrides("excel-voc", ["data.kind=folder", "text.num_clusters=20"])
    assert own.text.num_clusters == 20
