"""The types of the sample dict every dataset yields (described in :mod:`weakclip.data.base`) and of a
transform from one sample to another."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Sample", "Transform"]

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]
