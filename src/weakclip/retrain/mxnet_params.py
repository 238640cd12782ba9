"""Reader of MXNet's NDArray-list files (``.params``), without MXNet.

The ImageNet ResNet-38 that the WSSS projects start from (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``,
Wu et al., "Wider or deeper", distributed by AffinityNet / SEAM and linked by the authors' DeepLab-v1
retraining) is an MXNet parameter file. Its layout (MXNet ``NDArray::Save`` of a list), all little-endian:

* list header: ``uint64`` magic ``0x112`` and a ``uint64`` reserved word;
* ``uint64`` count, then that many arrays, each:

  - ``uint32`` magic: ``0xF993FAC9`` (version 2, with a storage type) or ``0xF993FACA`` (version 3, numpy
    shape semantics, same layout): ``int32`` storage type (0 = dense; sparse arrays are refused here), then
    the shape; ``0xF993FAC8`` (version 1): the shape follows directly; any other value is the legacy form
    where this word already is ``ndim`` and the dims are ``uint32``;
  - shape (versions 1-3): ``int32`` ndim then ndim ``int64`` dims. In versions 1 and 2 (and legacy) ndim 0
    is a "none" array and nothing else follows. Version 3 has numpy semantics (MXNet's ``NDArray::Load``
    with ``is_np_shape``): ndim 0 is a 0-d array of ONE element, whose context, type and data follow; a
    dim of -1 (unknown) makes a "none" array with nothing after it; ndim -1 cannot be loaded (MXNet's
    ``Tuple::Load`` fails on it);
  - context: ``int32`` device type, ``int32`` device id (ignored: everything is read to the CPU);
  - ``int32`` type flag (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64);
  - the raw data, C order;

* ``uint64`` count of names, then each name as ``uint64`` length + bytes (UTF-8). Zero names (an unnamed
  list) or one per array.

Parameter files saved by ``Module.save_params``/``save_checkpoint`` name the arrays ``arg:<name>``
(learned parameters) and ``aux:<name>`` (auxiliary states: BatchNorm ``moving_mean`` / ``moving_var``).
:func:`resnet38_state_dict` turns those names into the PyTorch ResNet-38 layout of
:mod:`weakclip.retrain.resnet38` (``conv1a``, ``b2``, ``b2_1`` ... ``b7``, ``bn7``), the layout of the WSSS
projects' converted ``.pth`` files.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from weakclip.errors import WeightsError
from weakclip.safe_load import sniff_file

__all__ = [
    "LIST_MAGIC",
    "NDARRAY_V1_MAGIC",
    "NDARRAY_V2_MAGIC",
    "NDARRAY_V3_MAGIC",
    "read_ndarray_list",
    "resnet38_key",
    "resnet38_state_dict",
]

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
    5: np.dtype("i1"), 6: np.dtype("<i8"),
}


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WeightsError(f"{self.path} is not a complete MXNet NDArray file (truncated while reading "
                               f"{what} at byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _read_shape(r: _Reader, index: int, numpy_semantics: bool) -> tuple[int, ...] | None:
    """The shape, or None for a "none" array (nothing follows it)."""
    (ndim,) = r.unpack("<i", f"the shape of array {index}")
    if ndim < 0 or ndim > 32:
        raise WeightsError(f"{r.path}: array {index} has an unknown number of dimensions ({ndim})")
    if ndim == 0 and not numpy_semantics:
        return None
    dims = tuple(int(d) for d in r.unpack(f"<{ndim}q", f"the shape of array {index}"))
    if numpy_semantics and -1 in dims:
        return None
    return dims


def _read_array(r: _Reader, index: int) -> np.ndarray:
    (magic,) = r.unpack("<I", f"array {index}")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (stype,) = r.unpack("<i", f"the storage type of array {index}")
        if stype != 0:
            raise WeightsError(f"{r.path}: array {index} is sparse (storage type {stype}); only dense arrays "
                               f"are supported")
        shape = _read_shape(r, index, numpy_semantics=magic == NDARRAY_V3_MAGIC)
    elif magic == NDARRAY_V1_MAGIC:
        shape = _read_shape(r, index, numpy_semantics=False)
    else:  # legacy: the word was ndim, uint32 dims follow
        ndim = magic
        if ndim > 32:
            raise WeightsError(f"{r.path}: array {index} has an unknown header 0x{magic:08X} (not an MXNet "
                               f"NDArray)")
        shape = tuple(int(d) for d in r.unpack(f"<{ndim}I", f"the shape of array {index}")) if ndim else None
    if shape is None:
        return np.zeros((0,), np.float32)
    if shape and min(shape) < 0:
        raise WeightsError(f"{r.path}: array {index} has an unknown shape {shape}")
    r.unpack("<ii", f"the context of array {index}")
    (flag,) = r.unpack("<i", f"the type of array {index}")
    if flag not in DTYPES:
        raise WeightsError(f"{r.path}: array {index} has an unsupported MXNet type flag {flag}")
    dtype = DTYPES[flag]
    count = int(np.prod(shape, dtype=np.int64))
    raw = r.take(count * dtype.itemsize, f"the data of array {index}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def read_ndarray_list(path: str | Path) -> dict[str, np.ndarray] | list[np.ndarray]:
    """The arrays of an MXNet NDArray-list file: a dict by name (e.g. ``"arg:conv1a_weight"``) or, for an
    unnamed list, a list. Raises WeightsError (one line) on anything that is not such a file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"MXNet parameter file not found: {path}")
    sniffed = sniff_file(path)
    if sniffed is not None and not sniffed.startswith("starts with 12 01 00 00 "):
        raise WeightsError(f"MXNet parameter file {path} {sniffed.replace('not a PyTorch', 'not an MXNet')}")
    r = _Reader(path.read_bytes(), path)
    if len(r.data) < 16:
        raise WeightsError(f"{path} is not an MXNet NDArray file (only {len(r.data)} bytes)")
    magic, _reserved = r.unpack("<QQ", "the header")
    if magic != LIST_MAGIC:
        raise WeightsError(f"{path} is not an MXNet NDArray file (header 0x{magic:X}, expected 0x112)")
    (count,) = r.unpack("<Q", "the array count")
    if count > 1_000_000:
        raise WeightsError(f"{path} is not an MXNet NDArray file (claims {count} arrays)")
    arrays = [_read_array(r, i) for i in range(count)]
    (n_names,) = r.unpack("<Q", "the name count")
    if n_names not in (0, count):
        raise WeightsError(f"{path}: {n_names} names for {count} arrays")
    names = []
    for i in range(n_names):
        (length,) = r.unpack("<Q", f"the length of name {i}")
        names.append(r.take(length, f"name {i}").decode("utf-8", errors="replace"))
    if r.pos != len(r.data):
        raise WeightsError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the NDArray list")
    if not names:
        return arrays
    return dict(zip(names, arrays, strict=True))


# ====================================================================== ResNet-38 names
_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
# res2a / bn2b1 / res4b5 / res7a: stage digit, then "a" (the first block) or "b<k>" (the k-th repeat)
_BLOCK = re.compile(r"^(res|bn)(\d)(a|b(\d+))_(branch\w+?)_(weight|gamma|beta|moving_mean|moving_var)$")
_BN7 = re.compile(r"^bn7_(gamma|beta|moving_mean|moving_var)$")
_CLASSIFIER = ("linear1000_", "fc", "softmax")


def resnet38_key(name: str) -> str | None:
    """PyTorch key of an MXNet ResNet-38 parameter name (``arg:``/``aux:`` prefix optional); None for the
    ImageNet classifier (``linear1000``). Raises WeightsError for a name that is not ResNet-38's.

    ``conv1a_weight`` -> ``conv1a.weight``; ``res2a_branch2a_weight`` -> ``b2.conv_branch2a.weight``;
    ``bn4b3_branch2b1_gamma`` -> ``b4_3.bn_branch2b1.weight``; ``bn7_moving_var`` -> ``bn7.running_var``.
    """
    short = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if short == "conv1a_weight":
        return "conv1a.weight"
    if short.startswith(_CLASSIFIER):
        return None
    m = _BN7.match(short)
    if m:
        return f"bn7.{_BN_SUFFIX[m.group(1)]}"
    m = _BLOCK.match(short)
    if not m:
        raise WeightsError(f"MXNet parameter {name!r} is not a ResNet-38 parameter")
    kind, stage, _, repeat, branch, leaf = m.groups()
    block = f"b{stage}" if repeat is None else f"b{stage}_{repeat}"
    if kind == "res":
        if leaf != "weight":
            raise WeightsError(f"MXNet parameter {name!r} is not a ResNet-38 parameter")
        return f"{block}.conv_{branch}.weight"
    if leaf == "weight":
        raise WeightsError(f"MXNet parameter {name!r} is not a ResNet-38 parameter")
    return f"{block}.bn_{branch}.{_BN_SUFFIX[leaf]}"


def resnet38_state_dict(path: str | Path):
    """The ResNet-38 ImageNet weights of an MXNet ``.params`` file as a PyTorch state dict (float32 tensors,
    keys of :mod:`weakclip.retrain.resnet38`; the classifier dropped)."""
    import torch

    arrays = read_ndarray_list(path)
    if not isinstance(arrays, dict):
        raise WeightsError(f"{path} holds an unnamed NDArray list, not a parameter file")
    out: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        key = resnet38_key(name)
        if key is None:
            continue
        if key in out:
            raise WeightsError(f"{path}: two parameters map to {key}")
        out[key] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # 0-d arrays stay 0-d
    return out
