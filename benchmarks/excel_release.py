"""The release's ExCEL paths for ``suite.py``'s ExCEL rows: the authors' own code, run as the tests run it.

The authors' code is imported from its snapshot through ``tests/excel_ref.py`` (``excel_reference``: stand-ins
for the libraries it imports and never uses here, ``.cuda()`` a no-op on CPU); nothing of it is copied here.
Each path calls the release's own functions on the release's own model (``model/model_excel.py``
``ExCEL_model``, assembled from its parts as ``tests/test_excel_forward.py``'s full-size test does, so that no
text tower and no descriptors file are needed: the text features are given):

  training step    the body of ``scripts/train_voc.py``'s ``for n_iter`` loop, read from the snapshot with
                   ``ast`` and executed with its model, PAR and PolyWarmupAdamW (``build_optimizer``);
                   its one ``reshape(4, 20, 20, 20)`` gets ``train_coco.py``'s general arguments when the
                   batch, classes or crop are not the VOC script's (as tests/test_excel_train.py does)
  training-free    ``tools/infer_lam.py`` ``build_validation`` (``--training_free true``), its scores and
                   tables stubbed
  inference        ``tools/infer_seg_voc.py`` ``_validate`` (4 scales with flip, no CRF), its scores and
                   tables stubbed

``available()`` says why these paths cannot run (no snapshot, pytest missing) or returns None.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _excel_ref():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import excel_ref  # tests/excel_ref.py (imports pytest)

    return excel_ref


def available() -> str | None:
    """None when the release's paths can run here, else why not (one line)."""
    try:
        excel_ref = _excel_ref()
    except ImportError as exc:
        return f"tests/excel_ref.py cannot be imported ({exc})"
    if excel_ref.excel_ref_root() is None:
        return (f"the authors' ExCEL snapshot ({excel_ref.REF_FOLDER}) is not here: set WEAKCLIP_EXCEL_REF "
                "or WEAKCLIP_REFS (see tests/excel_ref.py)")
    return None


@contextlib.contextmanager
def release(device: torch.device) -> Iterator:
    """The snapshot importable (``excel_ref.excel_reference``); on CUDA ``.cuda()`` keeps its real meaning."""
    excel_ref = _excel_ref()
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    with excel_ref.excel_reference() as ref:
        if device.type == "cuda":
            torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda  # type: ignore[method-assign]
        yield ref


def release_model(ref, state_dict: dict, texts: torch.Tensor, width: int, size: int, mode: str,
                  device: torch.device, num_classes: int = 21):
    """The release's ``ExCEL_model`` on the CLIP of ``state_dict`` (its ``reload_self_attn(layers=6,
    feat_size=size // 16, mode)``), a fresh fusion head and decoder, ``texts`` (T x embed_dim) as its
    enriched text features; eval mode."""
    from excel_ref import reference_clip_from_state_dict

    cls = ref.module("model.model_excel").ExCEL_model
    model = torch.nn.Module.__new__(cls)
    torch.nn.Module.__init__(model)
    model.num_classes, model.embedding_dim, model.in_channels = num_classes, 256, width
    model.encoder = reference_clip_from_state_dict(ref, state_dict)
    model.encoder.visual.reload_self_attn(layers=6, feat_size=size // 16, mode=mode)
    model.decoder_fts_fuse = ref.module("model.segformer_head").SegFormerHead(
        in_channels=width, embedding_dim=256, num_classes=num_classes, index=12)
    model.decoder = ref.module("model.decoder.TransDecoder").DecoderTransformer(
        width=256, layers=3, heads=8, output_dim=num_classes)
    # the release's layout: embed_dim x texts, a transposed view as model/load_attr.py attr_aggregate returns
    # it (its patch-text maps permute it back: contiguous texts x embed_dim, which the matrix products see)
    model.text_attr = texts.t()
    return model.to(device).eval()


def release_par(ref, device: torch.device):
    return ref.module("utils.PAR").PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24]).to(device)


# ---------------------------------------------------------------------------------------------- training
def _loop_body(ref, general_reshape: bool):
    """``scripts/train_voc.py`` ``train()``'s ``for n_iter`` loop body, compiled from the snapshot's file."""
    module = ref.module("scripts.train_voc")
    path = Path(module.__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    train = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    loop = next(n for n in ast.walk(train)
                if isinstance(n, ast.For) and getattr(n.target, "id", "") == "n_iter")
    body = ast.Module(body=copy.deepcopy(loop.body), type_ignores=[])
    if general_reshape:
        coco = ast.parse((path.parent / "train_coco.py").read_text(encoding="utf-8"))
        (general,) = [n for n in ast.walk(coco) if isinstance(n, ast.Call)
                      and getattr(n.func, "attr", "") == "reshape" and "spg" in ast.unparse(n)]
        (fixed,) = [n for n in ast.walk(body) if isinstance(n, ast.Call) and getattr(n.func, "attr", "")
                    == "reshape" and len(n.args) == 4 and all(isinstance(a, ast.Constant) for a in n.args)]
        fixed.args = copy.deepcopy(general.args)
    return module, compile(ast.fix_missing_locations(body), str(path), "exec")


class ReleaseStep:
    """One iteration of the release's training loop body on its model, PAR and PolyWarmupAdamW."""

    def __init__(self, ref, model, crop: int, batch: int, device: torch.device) -> None:
        general = (batch, model.num_classes - 1, crop) != (4, 20, 320)
        self.module, self.code = _loop_body(ref, general)
        self.args = self.module.parser.parse_args(["--crop_size", str(crop), "--spg", str(batch)])
        self.model, self.device = model, device
        self.par = release_par(ref, device)
        self.pseudo_labels: torch.Tensor | None = None  # the last step's (its aff_pseudos)
        build_optimizer = ref.module("engine.optimizer_engine").build_optimizer
        self.optim = build_optimizer(self.args, model.get_param_groups())

    def __call__(self, images: torch.Tensor, cls_labels: torch.Tensor, n_iter: int) -> float:
        self.model.train()
        self.optim.global_step = n_iter
        gt = torch.zeros(images.shape[0], *images.shape[2:])
        data = (["img"] * len(images), images, cls_labels, None, gt)
        ns = dict(vars(self.module))
        ns.update(n_iter=n_iter, train_loader_iter=iter([data]), train_loader=None, device=self.device,
                  model=self.model, par=self.par, args=self.args, optim=self.optim,
                  avg_meter=self.module.AverageMeter(), time0=None, tb_logger=None)
        exec(self.code, ns)  # noqa: S102 - the release's own loop body
        self.pseudo_labels = ns["aff_pseudos"].detach().long().cpu()
        return float(ns["loss"].item())


# ------------------------------------------------------------------------------------ inference scripts
@contextlib.contextmanager
def _stubbed(module, keep: dict) -> Iterator[None]:
    """``module``'s scores and metric tables stubbed (``keep["preds"]``: the labels it was given), tqdm
    silent, ``torch.cuda.device`` a no-op without CUDA."""
    def scores(gts, preds, num_classes=21):
        keep["preds"] = preds
        return {}

    saved = module.evaluate, module.format_tabs_multi_metircs, torch.cuda.device, module.tqdm
    module.evaluate = types.SimpleNamespace(scores=scores)
    module.format_tabs_multi_metircs = lambda *args, **kwargs: ""
    if not torch.cuda.is_available():
        torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        module.evaluate, module.format_tabs_multi_metircs, torch.cuda.device, module.tqdm = saved


def _normalised(ref, rgb: np.ndarray) -> torch.Tensor:
    """The release's dataset item: ``datasets/transforms.py`` ``normalize_img``, channels first, batch 1."""
    normalize = ref.module("datasets.transforms").normalize_img
    return torch.from_numpy(normalize(rgb).transpose(2, 0, 1).copy())[None]


def release_training_free(ref, model, par, images: list[np.ndarray], labels: list[np.ndarray], size: int,
                          device: torch.device) -> list[np.ndarray]:
    """``tools/infer_lam.py`` ``build_validation`` with ``--training_free true`` on these images (each a
    batch of 1, normalised as its dataset does); its masks."""
    lam = ref.module("tools.infer_lam")
    args = lam.parser.parse_args(["--resize_size", str(size), "--training_free", "true"])
    loader = [([f"img{i}"], _normalised(ref, rgb), torch.zeros(1, *rgb.shape[:2]),
               torch.from_numpy(np.asarray(cls, np.float32))[None])
              for i, (rgb, cls) in enumerate(zip(images, labels))]
    keep: dict = {}
    with _stubbed(lam, keep):
        lam.build_validation(model=model, par=par, val_loader=loader, device=device, args=args)
    model.eval()  # its build_validation ends with model.train()
    return keep["preds"]


def release_inference(ref, model, images: list[np.ndarray], size: int = 320) -> list[np.ndarray]:
    """``tools/infer_seg_voc.py`` ``_validate`` (scales 0.7, 1.0, 1.2, 1.5 with flip, no CRF) on these images
    (each a batch of 1, normalised as its dataset does); its argmax labels."""
    module = ref.module("tools.infer_seg_voc")
    args = module.parser.parse_args(["--resize_size", str(size)])
    loader = [([f"img{i}"], _normalised(ref, rgb), torch.zeros(1, *rgb.shape[:2]), torch.zeros(1, 20))
              for i, rgb in enumerate(images)]
    keep: dict = {}
    with _stubbed(module, keep):
        module._validate(model=model, data_loader=loader, args=args)
    return keep["preds"]
