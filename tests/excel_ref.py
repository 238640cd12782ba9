"""The authors' ExCEL code (a snapshot of github zwyang6/ExCEL), imported inside tests and run on CPU.

Where the snapshot is looked for, first match wins:
  1. ``WEAKCLIP_EXCEL_REF``: a checkout of the authors' repository (the folder with ``model/``, ``utils/``);
  2. ``WEAKCLIP_REFS``: a folder of snapshots holding ``ExCEL-2cd7f51/``;
  3. ``../shared/refs/ExCEL-2cd7f51`` beside the project's root (where CI has it).
Without one the tests that need it skip, saying why.

``excel_reference()`` (a context manager; the module-scoped fixture ``excel_ref`` in a test module uses it)
makes the release importable on a CPU-only machine with current libraries, without editing it:
  - ``Tensor.cuda`` and ``Module.cuda`` return the object itself (the release calls them everywhere);
  - stand-ins for what it imports but never uses on the paths compared here, only where the real package is
    not installed: ``mmcv`` (``mmcv.cnn.ConvModule`` is imported by the SegFormer head and never built;
    ``mmcv.bgr2hsv``/``hsv2bgr`` serve the colour jitter its dataset never applies: they raise),
    ``texttable`` (log tables), ``omegaconf``, ``pkg_resources.packaging`` (its version check),
    ``numpy.lib.utils.deprecate`` (gone in numpy 2; imported and unused by its datasets),
    ``torch.utils.tensorboard`` writer;
  - the snapshot's folder first on ``sys.path``; its top-level packages (``clip``, ``model``, ``utils``,
    ``datasets``, ``engine``) are removed from ``sys.modules`` on exit, so nothing leaks into other tests.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

REF_FOLDER = "ExCEL-2cd7f51"
PROJECT = Path(__file__).resolve().parents[1]
_TOP_LEVEL = ("clip", "model", "utils", "datasets", "engine", "tools", "scripts")


def excel_ref_root() -> Path | None:
    """The snapshot's folder, or None when none is found."""
    direct = os.environ.get("WEAKCLIP_EXCEL_REF")
    candidates = [Path(direct)] if direct else []
    refs = os.environ.get("WEAKCLIP_REFS")
    if refs:
        candidates.append(Path(refs) / REF_FOLDER)
    candidates.append(PROJECT.parent / "shared" / "refs" / REF_FOLDER)
    for path in candidates:
        if (path / "model" / "model_excel.py").is_file() and (path / "utils" / "camutils.py").is_file():
            return path
    return None


def require_excel_ref() -> Path:
    root = excel_ref_root()
    if root is None:
        pytest.skip(
            "the authors' ExCEL code is not here: set WEAKCLIP_EXCEL_REF to a checkout of github "
            f"zwyang6/ExCEL (commit 2cd7f51) or WEAKCLIP_REFS to a folder holding {REF_FOLDER}/ "
            "(CI has ../shared/refs)"
        )
    return root


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def _unused(what: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"test stand-in: {what} is not available here (unused on the paths compared)")

    return fail


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules the release imports, served only where the real one does not import."""
    mods: dict[str, types.ModuleType] = {}
    if not _importable("mmcv"):
        cnn = _module("mmcv.cnn", ConvModule=_unused("mmcv.cnn.ConvModule"))
        mods["mmcv"] = _module("mmcv", cnn=cnn, bgr2hsv=_unused("mmcv.bgr2hsv"),
                               hsv2bgr=_unused("mmcv.hsv2bgr"))
        mods["mmcv.cnn"] = cnn
    if not _importable("texttable"):
        mods["texttable"] = _module("texttable", Texttable=_unused("texttable.Texttable"))
    if not _importable("omegaconf"):
        mods["omegaconf"] = _module("omegaconf", OmegaConf=_unused("omegaconf.OmegaConf"))
    try:
        from pkg_resources import packaging  # noqa: F401
    except Exception:
        import packaging.version  # noqa: F401 (the attribute the release reads: packaging.version.parse)

        mods["pkg_resources"] = _module("pkg_resources", packaging=sys.modules["packaging"])
    try:
        from numpy.lib.utils import deprecate  # noqa: F401
    except Exception:
        mods["numpy.lib.utils"] = _module("numpy.lib.utils", deprecate=_unused("numpy.lib.utils.deprecate"))
    if not _importable("torch.utils.tensorboard"):
        mods["torch.utils.tensorboard"] = _module("torch.utils.tensorboard",
                                                  SummaryWriter=_unused("torch.utils.tensorboard.SummaryWriter"))
    return mods


class Reference:
    """Imports modules of the snapshot by their own dotted names: ``ref.module("utils.camutils")``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)


def _drop_reference_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _TOP_LEVEL:
            del sys.modules[name]


@contextlib.contextmanager
def excel_reference():
    """The release importable on CPU (see the module's docstring); skips the test when it is absent."""
    root = require_excel_ref()
    saved_tensor_cuda, saved_module_cuda = torch.Tensor.cuda, nn.Module.cuda
    stand_ins = _stand_ins()
    saved_modules = {name: sys.modules.get(name) for name in stand_ins}
    _drop_reference_modules()  # e.g. a ``utils`` module of another project imported before
    sys.modules.update(stand_ins)
    sys.path.insert(0, str(root))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield Reference(root)
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved_tensor_cuda, saved_module_cuda  # type: ignore[method-assign]
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))
        _drop_reference_modules()
        for name, mod in saved_modules.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def reference_clip_from_state_dict(ref: Reference, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The release's ``ExCEL_CLIP`` built from an OpenAI-layout state dict (what its ``clip.load`` does with
    OpenAI's archive, without the TorchScript file): eval mode, fp32."""
    build = ref.module("clip.build_model").build_model
    return build("ExCEL_ViT-B/16", {k: v.clone() for k, v in state_dict.items()}).float().eval()
