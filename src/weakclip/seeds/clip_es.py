"""Training-free seeds from a frozen CLIP: CLIP-ES (Lin et al., CVPR 2023, github linyq2117/CLIP-ES).

The defaults reproduce CLIP-ES's scripts (``generate_cams_voc12.py`` / ``generate_cams_coco14.py``,
``eval_cam.py``, ``eval_cam_with_crf.py``); every departure is a named switch of :class:`ClipEsConfig`
(on in the ``-plus`` presets of :func:`seed_preset`). Per image and per labelled foreground class ``c``:

1. The uint8 image is resized with PIL bicubic to sides rounded up to multiples of the patch size
   (``float_resize``: torch bicubic on floats instead), scaled to [0, 1] and normalised; it runs
   through the image tower (fp16 on CUDA, as CLIP-ES; ``precision``), blocks 1..L-1 without
   gradients, collecting the head-averaged attention of the last ``affinity_blocks`` blocks.
2. Grad-CAM on the last block: the target is the softmax probability of ``c`` over the prompt
   embeddings of the image's labels plus the background prompts (``softmax_over="labels"``, CLIP-ES;
   ``"all"`` puts every class in the softmax), with logits ``logit_scale * cos(image, text)`` and the
   image embedding the mean over the patch tokens after ``ln_post``, projected. Prompts use CLIP-ES's
   synonym-extended class names for VOC and COCO, the class list recognised in any spelling
   (:mod:`weakclip.seeds.names`; ``plain_names``).
   The activation is the last block's attention input (``ln_1`` output), channel weights the
   patch-averaged gradients, ``cam = relu(sum_ch w_ch * A_ch)``, normalised twice as
   ``(x - min) / (max + 1e-7)`` (CLIP-ES's Grad-CAM library normalises per layer, then again after
   averaging its one layer). All labelled classes share one forward and one backward pass.
3. Class-aware attention affinity (CAA): the attention averaged over the blocks, patch-to-patch part,
   alternately column- and row-normalised ``sinkhorn_iters`` times, symmetrised, raised to the power
   ``affinity_power``, applied to the Grad-CAM masked to boxes (:func:`box_mask`: the CAM scaled to
   uint8, thresholded at ``int(box_threshold * max)``, the bounding boxes of its 8-connected regions,
   their end clipped to the last row / column and used as an exclusive end, as CLIP-ES's
   ``scoremap2bbox`` does; ``inclusive_boxes`` keeps the full box); normalised once more.
4. The per-view CAMs are resized (bilinear) to the image size and averaged over scales and flips.

Three label maps come from the CAMs (:mod:`weakclip.seeds.masks` has the two CLIP-ES rules):

* the seed (what refinement trains on): a labelled class where its CAM is the largest and at least
  ``hi``, background where every labelled class's CAM is below ``lo``, 255 (unsure) in between;
* CLIP-ES's mask: argmax over the CAMs and a background score ``(1 - max)^bg_power``;
* CLIP-ES's CRF pseudo mask: dense CRF on those scores, 255 where its confidence is under 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakclip.errors import WeakclipError
from weakclip.seeds.cam_ops import (
    affinity_matrix,
    box_mask,
    encode_prompts,
    es_normalise,
    resize_image,
    seed_from_cams,
    split_background,
)
from weakclip.seeds.names import prompt_vocabulary
from weakclip.seeds.settings import (
    BACKGROUND_PROMPTS,
    CLIP_MEAN,
    CLIP_STD,
    MASK_KINDS,
    PLUS_SWITCHES,
    SEED_PRESETS,
    ClipEsConfig,
    seed_preset,
)

# The seeder lives here; its settings (weakclip.seeds.settings) and building blocks (weakclip.seeds.cam_ops)
# are re-exported for the callers that import them from this module.
__all__ = [
    "BACKGROUND_PROMPTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "MASK_KINDS",
    "PLUS_SWITCHES",
    "SEED_PRESETS",
    "ClipEsConfig",
    "ClipEsSeeder",
    "affinity_matrix",
    "box_mask",
    "encode_prompts",
    "es_normalise",
    "resize_image",
    "seed_from_cams",
    "seed_preset",
    "split_background",
]

# --------------------------------------------------------------------------------------------------


class ClipEsSeeder:
    """CLIP-ES CAMs, seeds and masks for images with known image-level labels.

    Args:
        image_tower: a ``CLIPImageTower`` (frozen; its device is used). It is cast IN PLACE to the
            config's precision (fp16 on CUDA by default, as CLIP-ES runs its model).
        class_names: the dataset's classes, background first (``dataset.classes``); the foreground
            names in the prompts are CLIP-ES's for VOC and COCO in any spelling
            (:func:`~weakclip.seeds.names.prompt_vocabulary`).
        text_tower: a ``CLIPTextTower`` to embed the prompts once (cast in place like the image
            tower); may be omitted when both embeddings below are given.
        config: :class:`ClipEsConfig` (its dataset-dependent ``None`` fields are filled in from
            ``class_names``: ``self.config`` is the resolved one).
        class_embeddings: (K-1) x D text embeddings of the foreground classes (instead of the tower).
        background_embeddings: n_bg x D embeddings of the background prompts (instead of the tower).

    Attributes ``class_prompts`` / ``background_prompts`` list the names put into the templates
    (empty when the embeddings were given), ``dropped_background`` the background words left out
    because they name a class, ``vocabulary`` the :class:`~weakclip.seeds.names.PromptNames` chosen
    for the class list (``names_source``: "clip-es voc", "clip-es coco" or "plain"; ``clip_es_names``:
    whether they are CLIP-ES's). :meth:`names_record` gathers them for summaries.
    """

    def __init__(
        self,
        image_tower,
        class_names: Sequence[str],
        *,
        text_tower=None,
        config: ClipEsConfig | None = None,
        class_embeddings: Tensor | None = None,
        background_embeddings: Tensor | None = None,
    ) -> None:
        self.classes = list(class_names)
        self.config = (config or ClipEsConfig()).for_classes(self.classes)
        if len(self.classes) < 2:
            raise WeakclipError("the seeder needs background plus at least one object class")
        self.device = next(image_tower.parameters()).device
        self.dtype = self.config.dtype_on(self.device)
        self.image_tower = image_tower.to(self.dtype).eval()
        if (class_embeddings is None or background_embeddings is None) and text_tower is None:
            raise WeakclipError("ClipEsSeeder needs a text tower or precomputed text embeddings")
        if text_tower is not None:
            text_tower = text_tower.to(self.dtype)
        self.vocabulary = prompt_vocabulary(self.classes, plain=self.config.plain_names)
        names = list(self.vocabulary.names)
        self.names_source = self.vocabulary.source
        self.clip_es_names = self.vocabulary.clip_es
        self.class_prompts: list[str] = []
        if class_embeddings is None:
            self.class_prompts = names
            class_embeddings = encode_prompts(text_tower, names, self.config.templates)
        self.background_prompts: list[str] = []
        self.dropped_background: list[str] = []
        if background_embeddings is None:
            self.background_prompts, self.dropped_background = split_background(
                self.config.background, names
            )
            background_embeddings = encode_prompts(text_tower, self.background_prompts, self.config.templates)
        fg = F.normalize(torch.as_tensor(class_embeddings).to(self.dtype), dim=-1)
        bg = torch.as_tensor(background_embeddings).to(self.dtype).reshape(-1, fg.shape[-1])
        bg = F.normalize(bg, dim=-1)
        if fg.shape[0] != len(self.classes) - 1:
            raise WeakclipError(
                f"{fg.shape[0]} class embeddings for {len(self.classes) - 1} foreground classes"
            )
        self.class_embeddings = fg.to(self.device)
        self.background_embeddings = bg.to(self.device)

    def names_record(self) -> dict:
        """Which prompts the seeder uses, for summaries and stage records: ``names_source`` ("clip-es
        voc", "clip-es coco", "plain"; "given embeddings" when the class embeddings were passed in),
        ``class_list`` ("voc", "coco", "coco91" or None), ``names`` (one per foreground class),
        ``background`` (the background prompts), ``dropped_background`` and, for a class list CLIP-ES
        has no names for, ``names_note``."""
        record = {
            "names_source": self.names_source if self.class_prompts else "given embeddings",
            "class_list": self.vocabulary.class_list,
            "names": list(self.class_prompts),
            "background": list(self.background_prompts),
            "dropped_background": list(self.dropped_background),
        }
        if self.vocabulary.note and self.class_prompts:
            record["names_note"] = self.vocabulary.note
        return record

    # ------------------------------------------------------------------ inputs
    def label_ids(self, labels) -> list[int]:
        """Sorted foreground class ids from a multi-hot vector (float/bool array or tensor of length K)
        or from a sequence of class ids (ints; 0 ignored)."""
        if isinstance(labels, Tensor):
            labels = labels.detach().cpu().numpy()
        arr = np.asarray(labels)
        if arr.dtype.kind in "fb":
            if arr.shape != (len(self.classes),):
                raise WeakclipError(f"multi-hot labels must have length {len(self.classes)}, got {arr.shape}")
            ids = [int(i) for i in np.nonzero(arr > 0.5)[0]]
        else:
            ids = [int(i) for i in arr.reshape(-1)]
        bad = [i for i in ids if not 0 <= i < len(self.classes)]
        if bad:
            raise WeakclipError(f"label ids {bad} are outside 0..{len(self.classes) - 1}")
        return sorted({i for i in ids if i != 0})

    @staticmethod
    def _check_image(image: np.ndarray) -> None:
        ok = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
        if not ok or image.dtype != np.uint8:
            what = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise WeakclipError(f"image must be an H x W x 3 uint8 array, got {what}")

    def _views(self, image: np.ndarray) -> list[tuple[Tensor, bool]]:
        cfg = self.config
        h, w = image.shape[:2]
        base = 1.0 if cfg.input_size is None else cfg.input_size / min(h, w)
        p = self.image_tower.patch_size
        mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        views = []
        for s in cfg.scales:
            size = (
                max(p, math.ceil(s * base * h / p) * p),
                max(p, math.ceil(s * base * w / p) * p),
            )
            y = resize_image(image, size, float_resize=cfg.float_resize).to(self.device)
            y = ((y - mean) / std).to(self.dtype)
            views.append((y, False))
            if cfg.flip:
                views.append((y.flip(-1), True))
        return views

    # ------------------------------------------------------------------ one view
    def _text_rows(self, keys: list[int]) -> tuple[Tensor, Tensor]:
        if self.config.softmax_over == "all":
            text = torch.cat([self.class_embeddings, self.background_embeddings])
            target = torch.tensor([k - 1 for k in keys], device=self.device)
        else:
            text = torch.cat([self.class_embeddings[[k - 1 for k in keys]], self.background_embeddings])
            target = torch.arange(len(keys), device=self.device)
        return text, target

    def view_cams(self, image: Tensor, keys: list[int]) -> Tensor:
        """CAMs of the classes ``keys`` on one normalised 1 x 3 x h x w image: K x grid_h x grid_w."""
        return self.view_cams_batch(image, [keys])[0]

    def view_cams_batch(self, images: Tensor, keys_list: Sequence[list[int]]) -> list[Tensor]:
        """CAMs of B normalised images of one size (B x 3 x h x w), image ``i`` for the classes
        ``keys_list[i]`` (at least one each): a list of K_i x grid_h x grid_w tensors.

        One forward pass for the batch; the last block runs once per (image, class) row, and a single
        backward pass gives every row its Grad-CAM (each row's score depends on its own tokens only).
        """
        cfg = self.config
        tower = self.image_tower
        depth = tower.num_blocks
        first_attn = depth - min(cfg.affinity_blocks, depth) + 1
        if images.shape[0] != len(keys_list) or any(not keys for keys in keys_list):
            raise WeakclipError("view_cams_batch needs one non-empty class list per image")
        attn_sum = None
        with torch.no_grad():
            x, (gh, gw) = tower.embed(images)
            for b in range(1, depth):
                x, weights = tower.run_block(b, x, need_weights=cfg.refine and b >= first_attn)
                if weights is not None:
                    a = weights.float().mean(dim=1)  # B x N x N
                    attn_sum = a if attn_sum is None else attn_sum + a
            normed = tower.block_norm(depth, x)
        owner = [i for i, keys in enumerate(keys_list) for _ in keys]  # image of each row
        first_row = [owner.index(i) for i in range(len(keys_list))]
        rows = torch.tensor(owner, device=x.device)
        with torch.enable_grad():
            act = normed.detach()[rows].clone().requires_grad_(True)
            out, weights = tower.run_block(depth, x.detach()[rows], normed=act, need_weights=cfg.refine)
            # CLIP-ES: ln_post, mean over the patch tokens, projection, cosine logits, in the tower's dtype
            pooled = tower.visual.ln_post(out[:, 1:]).mean(dim=1) @ tower.visual.proj
            feat = pooled / pooled.norm(dim=-1, keepdim=True)
            score = feat.new_zeros(())
            for i, keys in enumerate(keys_list):
                text, target = self._text_rows(keys)
                mine = feat[first_row[i]:first_row[i] + len(keys)]
                probs = (cfg.logit_scale * mine @ text.t()).softmax(dim=-1)
                score = score + probs[torch.arange(len(keys), device=probs.device), target].sum()
            (grad,) = torch.autograd.grad(score, act)
        act, grad = act.detach()[:, 1:].float(), grad[:, 1:].float()
        cam = (act * grad.mean(dim=1, keepdim=True)).sum(dim=-1).clamp_min(0)  # rows x n
        cam = es_normalise(es_normalise(cam))  # twice, as CLIP-ES's Grad-CAM library
        result = []
        for i, keys in enumerate(keys_list):
            c = cam[first_row[i]:first_row[i] + len(keys)]
            if cfg.refine:
                a = weights[first_row[i]].detach().float().mean(dim=0)  # the same for all rows of image i
                attn = a if attn_sum is None else attn_sum[i] + a
                trans = affinity_matrix(attn[1:, 1:], cfg.sinkhorn_iters, cfg.affinity_power)
                masks = torch.stack([
                    box_mask(row.view(gh, gw), cfg.box_threshold, cfg.inclusive_boxes).flatten() for row in c
                ])
                c = es_normalise((c * masks) @ trans.t())
            result.append(c.view(len(keys), gh, gw))
        return result

    # ------------------------------------------------------------------ public
    def cams_and_keys(self, image: np.ndarray, labels) -> tuple[np.ndarray, list[int]]:
        """CAMs (K_labels x H x W float32 in [0, 1]) of the image's labelled foreground classes, and
        those class ids (ascending) in the order of the CAMs."""
        return self.cams_and_keys_batch([image], [labels])[0]

    def cams_and_keys_batch(self, images: Sequence[np.ndarray], labels_list: Sequence
                            ) -> list[tuple[np.ndarray, list[int]]]:
        """:meth:`cams_and_keys` of several images of ONE size (H x W x 3 uint8 each), computed as a batch
        (the same result as one at a time, up to float rounding)."""
        if len(images) != len(labels_list):
            raise WeakclipError(f"{len(images)} images but {len(labels_list)} label sets")
        for image in images:
            self._check_image(image)
        if len({image.shape for image in images}) > 1:
            raise WeakclipError("cams_and_keys_batch needs images of one size; group them by size")
        keys_list = [self.label_ids(labels) for labels in labels_list]
        results: list[tuple[np.ndarray, list[int]]] = []
        if not images:
            return results
        h, w = images[0].shape[:2]
        busy = [i for i, keys in enumerate(keys_list) if keys]
        totals = {i: torch.zeros(len(keys_list[i]), h, w, device=self.device) for i in busy}
        views_per_image = {i: self._views(images[i]) for i in busy}
        n_views = len(next(iter(views_per_image.values()))) if busy else 0
        for v in range(n_views):
            batch = torch.cat([views_per_image[i][v][0] for i in busy])
            flipped = views_per_image[busy[0]][v][1]
            cams = self.view_cams_batch(batch, [keys_list[i] for i in busy])
            for i, cam in zip(busy, cams):
                if flipped:
                    cam = cam.flip(-1)
                totals[i] += F.interpolate(cam[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        for i, keys in enumerate(keys_list):
            if not keys:
                results.append((np.zeros((0, h, w), np.float32), keys))
                continue
            total = totals[i] / n_views
            if n_views > 1:  # peak back at 1 so that the thresholds mean the same for any view count
                total /= total.flatten(1).max(dim=1).values.clamp_min(1e-7).view(-1, 1, 1)
            results.append((total.clamp_(0, 1).cpu().numpy().astype(np.float32), keys))
        return results

    def cams(self, image: np.ndarray, labels) -> np.ndarray:
        """K_labels x H x W CAMs in [0, 1], classes in ascending id order (see :meth:`label_ids`)."""
        return self.cams_and_keys(image, labels)[0]

    def seed_from(self, cams: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        return seed_from_cams(cams, keys, self.config.lo, self.config.hi)

    def seed(self, image: np.ndarray, labels) -> np.ndarray:
        """H x W uint8 seed: class id where confident, 0 = background, 255 = unsure."""
        cams, keys = self.cams_and_keys(image, labels)
        return self.seed_from(cams, keys)
