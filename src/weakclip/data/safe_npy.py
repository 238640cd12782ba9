"""Reading a pickled ``.npy`` (``np.save`` of a dict, as IRN and MCTformer ship ``cls_labels.npy``) without
running code.

``np.load(allow_pickle=True)`` unpickles whatever the file names: a ``cls_labels.npy`` carrying a pickled
``os.system`` call runs it. Here the ``.npy`` header is read as numpy does; an array of numbers is read
with ``allow_pickle=False``; an object array's pickle goes through an unpickler that rebuilds only numpy
arrays, dtypes and scalars and the plain containers the pickle opcodes make themselves (dict, list,
tuple, str, bytes, int, float, bool, None). Any other class or function the pickle names is refused, in
one line naming it, before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from weakclip.errors import DataError

__all__ = ["ALLOWED_GLOBALS", "load_npy_safely"]

#: (module, name) pairs a numpy object-array pickle needs: array and scalar rebuilding, dtypes, and the
#: ``_codecs.encode`` that Python 2-era pickles use for raw bytes
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _NumpyDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise _RefusedGlobal(module, name)
        return super().find_class(module, name)


def load_npy_safely(path: str | Path, what: str = "file") -> Any:
    """The object a ``.npy`` file holds: an ndarray, or for a 0-d object array (``np.save`` of a dict)
    the object itself, read without running code. A missing file, a file that is no ``.npy`` and a
    pickle naming anything beyond numpy data raise :class:`~weakclip.errors.DataError` (one line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(6)
        if head != b"\x93NUMPY":
            raise DataError(f"{what} {path} is not a .npy file (it starts with {head[:6]!r}, not numpy's "
                            f"'\\x93NUMPY' header)")
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = reader(fh)
        except ValueError as exc:
            raise DataError(f"{what} {path}: broken .npy header ({' '.join(str(exc).split())})") from exc
        if not dtype.hasobject:
            fh.seek(0)
            try:
                return np.load(fh, allow_pickle=False)
            except ValueError as exc:
                raise DataError(f"{what} {path} is cut short or damaged: {' '.join(str(exc).split())}"
                                ) from exc
        payload = fh.read()
    try:
        obj = _NumpyDataUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DataError(f"{what} {path} holds a pickled reference to {exc.qualified}, which is not numpy "
                        "data: refused without running it (weakclip reads only numbers, strings, dicts and "
                        "numpy arrays from a .npy)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{what} {path}: unreadable pickled data ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from exc
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == () and shape == ():
        return obj.item()
    return obj
