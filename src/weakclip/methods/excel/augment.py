"""ExCEL's training sample: what the release's dataset really makes of an image.

The release trains on ``datasets/voc.py`` ``VOC12ClsDataset`` (stage ``train``) and ``datasets/coco.py``
``CocoClsDataset`` (``aug=True``). Its training scripts pass ``aug=True``, ``resize_range=[512, 2048]``,
``rescale_range=[0.5, 2.0]``, ``crop_size=320``, ``img_fliplr=True``; what the classes do with them:

* ignored: ``resize_range`` (``random_resize`` is never called), ``aug`` (VOC's class never reads it) and the
  colour jitter (``PhotoMetricDistortion`` is built, never applied: VOC never calls it, COCO's call is
  commented out); ``img_fliplr`` too in VOC's class (it always flips at random);
* applied, in this order (``datasets/transforms.py``), to the uint8 RGB image as read:

  1. random rescale (``random_scaling``): ``r = random.uniform(0.5, 2.0)``, new size
     ``(int(r * w), int(r * h))``, Pillow ``Image.resize`` with ``BILINEAR`` for the image (Pillow widens the
     filter when shrinking, i.e. it antialiases) and ``NEAREST`` for the mask; the image comes back float32;
  2. horizontal flip when ``random.random() > 0.5`` (image and mask);
  3. random crop (``random_crop``, ``mean_rgb=[0, 0, 0]``): the image is padded up to at least
     ``crop x crop`` with zeros in pixel values (so the padding is ``-mean / std`` after normalisation, not 0)
     at an offset ``np.random.randint(H - h + 1)``, ``np.random.randint(W - w + 1)``; then a window
     ``random.randrange(H - crop + 1)``, ``random.randrange(W - crop + 1)``. VOC's class passes the
     ground-truth mask, and the window is redrawn (10 tries at most, the last one kept) until no class holds
     75% or more of the window's non-ignored pixels; COCO's class passes no mask and keeps the first window;
     the mask is padded with 255;
  4. ``normalize_img``: ``(x - mean) / std`` per channel in float32 with ImageNet's statistics in 0..255
     (:data:`IMAGE_MEAN`, :data:`IMAGE_STD`) -- not CLIP's, although the network is CLIP (the release's
     ``_transform_resize`` with CLIP's constants is built and never used); then HWC -> CHW.

  ``img_box`` is ``[top, bottom, left, right]`` (int16) of the image inside the crop, with the release's
  quirk kept: ``bottom`` and ``right`` are ``min(window end, pad offset + size)`` in the PADDED frame, so
  where the image was larger than the crop and the window does not start at 0 they exceed the crop size.
* images are read by ``imageio.v2.imread``; with the release's pinned imageio 2.26.0 that turns JPEGs upright
  by their EXIF orientation (imageio 2.38 no longer does): :data:`RELEASE_IMAGE_READING`, the package's Pillow
  reader with ``orientation="exif"``, gives the same pixels for all 8 orientations (checked against imageio
  2.26.0). VOC has no such tags; a few COCO photos have. Masks (PNG, no orientation) are read as stored;
* the image-level label is the foreground multi-hot from ``cls_labels_onehot.npy`` (20 numbers for VOC,
  float32); here it is the dataset's label vector without its background entry (:class:`ExcelTrainDataset`).

Random draws come, as in the release, from two streams: Python's ``random`` (scale, flip, window) and
NumPy's legacy ``np.random`` (pad offsets). :class:`Draws` holds the two; ``Draws.process_global()`` is the
release's own (the modules' global state), ``Draws.seeded(s)`` two private streams seeded as the release's
``setup_seed(s)`` seeds the global ones, so a test can feed both the same draws.

The mask-guided window (VOC) uses ground truth to place training crops; it is the release's behaviour and
the ``excel-voc`` preset keeps it (``mask_guided_crop=True``); ``mask_guided_crop=False`` is the departure
(COCO's rule) for anyone who wants training to see no ground truth at all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from weakclip.data.base import SegDataset
from weakclip.data.classes import IGNORE_INDEX
from weakclip.errors import DataError

__all__ = [
    "CROP_MAX_SHARE",
    "CROP_SIZE",
    "CROP_TRIES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "RELEASE_IMAGE_READING",
    "SCALE_RANGE",
    "AugmentedSample",
    "Draws",
    "ExcelAugment",
    "ExcelTrainDataset",
    "crop_with_box",
    "normalize_image",
    "random_flip",
    "rescale",
    "release_mask_guided",
]

#: ``normalize_img``'s statistics (ImageNet's, 0..255 scale, RGB order).
IMAGE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGE_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
#: The training scripts' ``rescale_range`` and ``crop_size``.
SCALE_RANGE: tuple[float, float] = (0.5, 2.0)
CROP_SIZE = 320
#: ``random_crop``'s window rule: at most this many windows, until no class holds this share or more.
CROP_TRIES = 10
CROP_MAX_SHARE = 0.75
#: ``(reader, orientation)`` for :meth:`weakclip.data.base.SegDataset.set_image_reading` that reads as the
#: release's ``imageio.v2.imread`` (imageio 2.26.0, its pin): Pillow, upright by EXIF (module docstring).
RELEASE_IMAGE_READING: tuple[str, str] = ("pil", "exif")


@dataclass
class Draws:
    """The two random streams of the release's dataset: ``py`` with ``uniform``, ``random`` and
    ``randrange`` (Python's ``random``), ``np`` with ``randint`` (NumPy's legacy ``RandomState``)."""

    py: Any
    np: Any

    @classmethod
    def seeded(cls, seed: int) -> Draws:
        """Private streams seeded as ``random.seed(seed)`` and ``np.random.seed(seed)`` seed the global
        ones."""
        return cls(random.Random(seed), np.random.RandomState(seed))

    @classmethod
    def process_global(cls) -> Draws:
        """The process-global streams, what the release's dataset consumes (in a DataLoader worker, the
        ones PyTorch seeds per worker)."""
        return cls(random, np.random)


def release_mask_guided(kind: str) -> bool:
    """Whether the release places the crop window with the mask for a dataset of ``kind``: VOC's class does
    (ground truth), COCO's does not; folder datasets (a user's data, whose masks are for evaluation) do
    not."""
    return str(kind).lower() == "voc"


# ------------------------------------------------------------------------------------------------ steps


def rescale(image: np.ndarray, mask: np.ndarray | None, ratio: float
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``random_scaling`` for a drawn ``ratio``: Pillow ``resize`` to ``(int(ratio * w), int(ratio * h))``,
    ``BILINEAR`` for the uint8 image (returned float32), ``NEAREST`` for the mask (its dtype kept).

    A side that would round to 0 (an image a few pixels wide; the release fails there) is kept at 1."""
    h, w = image.shape[:2]
    size = (max(1, int(ratio * w)), max(1, int(ratio * h)))
    pil = Image.fromarray(np.asarray(image).astype(np.uint8))
    out = np.asarray(pil.resize(size, resample=Image.BILINEAR)).astype(np.float32)
    if mask is None:
        return out, None
    return out, np.asarray(Image.fromarray(np.asarray(mask)).resize(size, resample=Image.NEAREST))


def random_flip(image: np.ndarray, mask: np.ndarray | None, draws: Draws
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``random_fliplr``: left-right flip of the image (and mask) when ``random.random() > 0.5``."""
    if draws.py.random() > 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    return image, mask


def _window(mask: np.ndarray | None, span_h: int, span_w: int, crop: int, draws: Draws,
            ignore_index: int) -> tuple[int, int]:
    """The crop window's top-left corner in the padded frame (``random_crop``'s inner loop).

    The release tests the UNPADDED mask sliced with padded-frame coordinates; along each axis either the
    pad offset or the window start is 0 and the window covers the whole mask, so this sees exactly the
    mask's pixels the window holds (the padding is ignore anyway)."""
    top = left = 0
    for _ in range(CROP_TRIES):
        top = draws.py.randrange(0, span_h - crop + 1, 1)
        left = draws.py.randrange(0, span_w - crop + 1, 1)
        if mask is None:
            break
        values, counts = np.unique(mask[top:top + crop, left:left + crop], return_counts=True)
        counts = counts[values != ignore_index]
        # The release writes ``len(cnt > 1)``, i.e. "any class at all": a window of one class is redrawn by
        # the share test, one of only ignored pixels by this one.
        if counts.size and counts.max() / counts.sum() < CROP_MAX_SHARE:
            break
    return top, left


def crop_with_box(image: np.ndarray, mask: np.ndarray | None, crop: int, draws: Draws, *,
                  mask_guided: bool = True, ignore_index: int = IGNORE_INDEX
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``random_crop`` with ``mean_rgb=[0, 0, 0]``: pad (zeros; mask ``ignore_index``) at a random offset up
    to ``crop``, take a random ``crop x crop`` window (mask-guided when ``mask_guided`` and a mask is
    given), return the float32 image window, the mask window (uint8) and ``img_box`` (int16
    ``[top, bottom, left, right]``, the release's padded-frame ends; module docstring)."""
    h, w = image.shape[:2]
    span_h, span_w = max(crop, h), max(crop, w)
    pad_top = int(draws.np.randint(span_h - h + 1))
    pad_left = int(draws.np.randint(span_w - w + 1))
    padded = np.zeros((span_h, span_w, 3), dtype=np.float32)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = _window(mask if mask_guided else None, span_h, span_w, crop, draws, ignore_index)
    box = np.asarray([max(pad_top - top, 0), min(top + crop, pad_top + h),
                      max(pad_left - left, 0), min(left + crop, pad_left + w)], dtype=np.int16)
    window = padded[top:top + crop, left:left + crop]
    if mask is None:
        return window, None, box
    padded_mask = np.full((span_h, span_w), ignore_index, dtype=np.uint8)
    padded_mask[pad_top:pad_top + h, pad_left:pad_left + w] = mask
    return window, padded_mask[top:top + crop, left:left + crop], box


def normalize_image(image: np.ndarray) -> np.ndarray:
    """``normalize_img``: ``(x - mean) / std`` per channel (:data:`IMAGE_MEAN`, :data:`IMAGE_STD`) with Python
    floats, stored as float32, ``H x W x 3`` in and out.

    As in the release the arithmetic follows the input's dtype: a float32 image (the training crop) is
    computed in float32, a uint8 image (the test-time input: ``VOC12SegDataset`` without ``aug`` gives the
    image as read through this alone) in float64 and then rounded to float32; the two differ by an ulp."""
    x = np.asarray(image)
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(3):
        out[..., c] = (x[..., c] - IMAGE_MEAN[c]) / IMAGE_STD[c]
    return out


# ------------------------------------------------------------------------------------------------ augment


@dataclass
class AugmentedSample:
    """One training sample: ``image`` 3 x crop x crop float32 (normalised), ``mask`` crop x crop uint8 (255
    where unknown or padded; None when no mask went in), ``img_box`` int16 ``[top, bottom, left, right]``."""

    image: np.ndarray
    mask: np.ndarray | None
    img_box: np.ndarray


@dataclass(frozen=True)
class ExcelAugment:
    """The release's training augmentation (module docstring), any crop size.

    Args:
        crop_size: side of the square crop (the presets: 320).
        scale_range: ``(low, high)`` of the random rescale ratio (0.5, 2.0).
        mask_guided_crop: place the window with the mask as VOC's class does (``excel-voc``: True;
            ``excel-coco``: False, as COCO's class); without a mask the first window is kept either way.
        ignore_index: the mask's ignore value (255).
    """

    crop_size: int = CROP_SIZE
    scale_range: tuple[float, float] = SCALE_RANGE
    mask_guided_crop: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if int(self.crop_size) < 1:
            raise DataError(f"ExCEL crop size must be a positive number of pixels, got {self.crop_size}")
        low, high = (float(v) for v in self.scale_range)
        if not 0 < low <= high:
            raise DataError(f"ExCEL rescale range must be 0 < low <= high, got {tuple(self.scale_range)}")

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, draws: Draws) -> AugmentedSample:
        """Augment one ``H x W x 3`` uint8 RGB image (and its ``H x W`` mask, or None), drawing from
        ``draws`` in the release's order: scale, flip, pad offsets, windows."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"ExCEL augmentation takes H x W x 3 RGB images, got shape {image.shape}")
        if mask is not None and np.asarray(mask).shape != image.shape[:2]:
            raise DataError(f"mask {np.asarray(mask).shape} does not match its image {image.shape[:2]}")
        low, high = self.scale_range
        ratio = draws.py.uniform(float(low), float(high))
        image, mask = rescale(image, mask, ratio)
        image, mask = random_flip(image, mask, draws)
        image, mask, box = crop_with_box(image, mask, int(self.crop_size), draws,
                                         mask_guided=self.mask_guided_crop, ignore_index=self.ignore_index)
        chw = np.ascontiguousarray(normalize_image(image).transpose(2, 0, 1))
        return AugmentedSample(chw, mask, box)


class ExcelTrainDataset(Dataset):
    """The release's training dataset over any of the package's datasets (VOC, COCO, folder).

    Each item is a dict (the release's tuple ``(name, image, cls_label, img_box, label)`` by name):
      ``"id"``        the image id;
      ``"image"``     3 x crop x crop float32, normalised (:class:`ExcelAugment`);
      ``"cls_label"`` float32 multi-hot over the foreground classes (the dataset's labels without background;
                      the release's ``cls_labels_onehot.npy`` entry);
      ``"img_box"``   int16 ``[top, bottom, left, right]``;
      ``"mask"``      crop x crop uint8 ground truth (255 = ignore or padding; all 255 when the dataset has no
                      masks). The release returns it as float32 with the same values; it uses it for its
                      logs only.

    Randomness: ``seed=None`` draws from the process-global ``random`` / ``np.random`` as the release does
    (one stream per DataLoader worker, seeded by PyTorch); an integer seed gives every item its own streams
    from ``(seed, epoch, index)`` (:meth:`draws_for`), so a sample does not depend on workers, order or
    resumption; :meth:`set_epoch` changes the epoch. :meth:`sample` takes the draws explicitly.

    The wrapped dataset's own ``transform`` must be None (this class makes the sample). ``image_reading``
    (default :data:`RELEASE_IMAGE_READING`) is set on it (``set_image_reading``); None keeps its own.
    """

    def __init__(self, dataset: SegDataset, augment: ExcelAugment | None = None, *,
                 seed: int | None = None, image_reading: tuple[str, str] | None = RELEASE_IMAGE_READING
                 ) -> None:
        super().__init__()
        if getattr(dataset, "transform", None) is not None:
            raise DataError("ExcelTrainDataset makes its own samples: build the dataset without a transform")
        if image_reading is not None:
            dataset.set_image_reading(*image_reading)
        self.dataset = dataset
        if augment is None:
            augment = ExcelAugment(mask_guided_crop=release_mask_guided(getattr(dataset, "kind", "")))
        self.augment = augment
        self.seed = None if seed is None else int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draws_for(self, index: int, epoch: int | None = None) -> Draws:
        """The streams item ``index`` draws from (module and class docstrings)."""
        if self.seed is None:
            return Draws.process_global()
        epoch = self.epoch if epoch is None else int(epoch)
        state = np.random.SeedSequence([self.seed, epoch, int(index)]).generate_state(4, dtype=np.uint32)
        return Draws(random.Random(int(state[0]) << 32 | int(state[1])), np.random.RandomState(state[2:]))

    def sample(self, index: int, draws: Draws) -> dict[str, Any]:
        """Item ``index`` augmented with ``draws``."""
        base = self.dataset[index]
        image = base["image"]
        out = self.augment(image, base.get("gt"), draws)
        mask = out.mask
        if mask is None:  # no ground truth: first window (COCO), an all-ignore mask keeps batches uniform
            mask = np.full(out.image.shape[1:], self.augment.ignore_index, dtype=np.uint8)
        labels = np.asarray(base["labels"], dtype=np.float32)
        return {"id": base["id"], "image": out.image, "cls_label": labels[1:].copy(), "img_box": out.img_box,
                "mask": mask}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, self.draws_for(index))

    @property
    def classes(self) -> Sequence[str]:
        return self.dataset.classes
