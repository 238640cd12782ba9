"""Dense-CRF parameters shared by every backend, the unary floor and the missing-backend error."""

from __future__ import annotations

from dataclasses import dataclass

from weakclip.errors import WeakclipError

__all__ = ["COCO_CRF", "TRAIN_CRF", "UNARY_CLIP", "VOC_CRF", "CRFUnavailableError", "DenseCRFParams"]

# Probability floor of the unary, as pydensecrf.utils.unary_from_softmax(clip=1e-5).
UNARY_CLIP = 1e-5


class CRFUnavailableError(WeakclipError, ImportError):
    """pydensecrf2 (module ``pydensecrf``) is not installed."""


@dataclass(frozen=True)
class DenseCRFParams:
    """Dense-CRF kernel parameters (pixel / RGB units) and the number of mean-field iterations."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10

    def __post_init__(self) -> None:
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DenseCRFParams.{name} must be > 0, got {getattr(self, name)}")
        if self.iterations < 0:
            raise ValueError(f"DenseCRFParams.iterations must be >= 0, got {self.iterations}")


# Boundary loss during training (spec "Losses").
TRAIN_CRF = DenseCRFParams(3.0, 3.0, 80.0, 13.0, 10.0, 10)
# Full-resolution post-processing (spec "Training and inference settings").
VOC_CRF = DenseCRFParams(3.0, 3.0, 83.0, 5.0, 3.0, 10)
COCO_CRF = DenseCRFParams(1.0, 3.0, 67.0, 3.0, 4.0, 10)
