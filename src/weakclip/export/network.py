"""What an exported file holds: the network in eval mode with its prompts fixed, and the input sizes it takes.

The network is the one :func:`weakclip.api.load` hands out (``Segmenter.network``): input
``B x 3 x H x W`` float32, normalised (``(pixel - mean) / std`` on the 0..255 scale, RGB); output
``B x K x H x W`` logits at the input's size, for one scale, no flip, no CRF, no windows. Whatever a
segmenter does around it (scales, flips, sliding windows, the dense CRF, restriction to labels) stays outside
the exported graph; the metadata file (:mod:`weakclip.export.metadata`) describes it.

Input sizes (:func:`size_rule_of`):

* CNNs (DeepLab-v1 ResNet-38, the torchvision DeepLab family): any ``H, W >= 32`` and any batch.
* A network that states its own rule (``network.export_size_rule()``), e.g. ExCEL's
  :class:`~weakclip.methods.excel.segmenter.ExcelLogits`: any ``H, W`` of at least two CLIP patches (32),
  CLIP's stored grid side (224 for ViT-B/16) not traced.
* The WeakCLIP refinement model: ``H`` and ``W`` multiples of twice the CLIP patch size (32 for ViT-B/16),
  at least 64, any batch. The pyramid levels are the patch grid x4, x2, x1 and /2 (a max-pool), and the
  Semantic-FPN head adds them after 2x upsamplings: on an odd grid PyTorch resizes the level that falls one
  pixel short, a branch on the sizes that an exported graph cannot keep (it is traced for even grids); and
  ``torch.export`` treats a dynamic size as at least 2 (units of 32). A window of another size is
  zero-padded bottom/right to the next multiple (zeros are the mean colour after normalisation: what
  ``pseudo.size_divisor: 32`` of the ``-plus`` presets does) and the padding cropped off the logits; the
  release (``size_divisor: 1``) runs such windows unpadded, so its masks are reproduced exactly only where
  every window already has such a size (the full 512 x 512 crops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SizeRule", "prepared_for_export", "size_rule_of"]

#: Smallest side every exported CNN is checked to take (a stride-8/16 network still has a few cells).
MIN_SIDE = 32


@dataclass(frozen=True)
class SizeRule:
    """Input sides the exported network takes: multiples of ``multiple_of``, at least ``min_side``.
    ``avoid``: sides the example traced must not have (the CLIP tower's stored positional grid: the network
    skips its resize there, which would fix that side in the graph). ``reason``: why sides must be
    multiples (said by ``weakclip export``)."""

    multiple_of: int
    min_side: int
    avoid: tuple[int, ...] = ()
    reason: str = ""

    def fits(self, height: int, width: int) -> bool:
        return all(s >= self.min_side and s % self.multiple_of == 0 for s in (height, width))

    def example_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Two small sizes the rule allows: the size traced and the size checked after export (the traced
        one transposed). Sides of at least 2 units of the multiple (an exporter specialises 0 and 1), two
        different ones (equal sides could be tied together), none in ``avoid``."""
        unit = self.multiple_of if self.multiple_of > 1 else 32
        sides = []
        k = 2
        while len(sides) < 2:
            side = k * unit
            if side >= self.min_side and side not in self.avoid:
                sides.append(side)
            k += 1
        a, b = sides
        return (a, b), (b, a)

    def describe(self) -> str:
        if self.multiple_of > 1:
            return f"H and W multiples of {self.multiple_of} (at least {self.min_side})"
        return f"any H and W of at least {self.min_side}"

    def to_dict(self) -> dict:
        return {"multiple_of": self.multiple_of, "min_side": self.min_side}


def _image_towers(network: nn.Module) -> list[nn.Module]:
    from weakclip.models.clip_image import CLIPImageTower

    return [m for m in network.modules() if isinstance(m, CLIPImageTower)]


def size_rule_of(network: nn.Module) -> SizeRule:
    """The input sizes an export of ``network`` takes (module docstring)."""
    own = getattr(network, "export_size_rule", None)
    if callable(own):
        rule = dict(own())
        return SizeRule(int(rule["multiple_of"]), int(rule["min_side"]),
                        tuple(sorted(int(s) for s in rule.get("avoid", ()))), str(rule.get("reason", "")))
    towers = _image_towers(network)
    if towers:
        unit = 2 * max(int(t.patch_size) for t in towers)
        stored = {int(side) * int(t.patch_size) for t in towers for side in t.native_grid}
        return SizeRule(unit, 2 * unit, tuple(sorted(stored)),
                        "its pyramid levels; odd patch grids need a resize a graph cannot follow")
    return SizeRule(1, MIN_SIDE)


@contextlib.contextmanager
def prepared_for_export(network: nn.Module) -> Iterator[None]:
    """Inside the block, every WeakCLIP refinement model in ``network`` is ready to be traced:

    * its text embeddings (K x D, computed once here from the learnt prompts and the frozen text tower) come
      back as a constant: the exported graph holds the K embeddings, not the text tower, whose output does
      not depend on the image;
    * its image tower's positional-embedding cache is off: the cache is keyed on the patch grid, which would
      fix the traced example's size in the graph. It caches only what no gradient flows through, so the
      stored embedding requires grad here, and the tower does not run under ``torch.no_grad()``
      (``cfg.frozen_no_grad`` off); the export itself runs with gradients on (nothing is trained).

    A module of ``network`` with its own ``prepared_for_export()`` context (another method's network, e.g.
    ExCEL's) is inside it too. Everything restored after."""
    from weakclip.models.weakclip import WeakCLIP

    models = [m for m in network.modules() if isinstance(m, WeakCLIP)]
    towers = _image_towers(network)
    saved_no_grad = [m.cfg.frozen_no_grad for m in models]
    saved_grad = [t.visual.positional_embedding.requires_grad for t in towers]
    own = [m.prepared_for_export for m in network.modules() if callable(getattr(m, "prepared_for_export",
                                                                                  None))]
    with contextlib.ExitStack() as stack:
        for prepare in own:
            stack.enter_context(prepare())
        with _weakclip_prepared(models, towers, saved_no_grad, saved_grad):
            yield


@contextlib.contextmanager
def _weakclip_prepared(models, towers, saved_no_grad, saved_grad) -> Iterator[None]:
    try:
        for model in models:
            with torch.no_grad():
                text = model.text_embeddings().detach().clone()
            model.text_embeddings = lambda text=text: text  # instance attribute shadows the method
            model.cfg.frozen_no_grad = False
        for tower in towers:
            tower._pos_cache.clear()
            tower.visual.positional_embedding.requires_grad_(True)
        yield
    finally:
        for model, no_grad in zip(models, saved_no_grad):
            model.__dict__.pop("text_embeddings", None)
            model.cfg.frozen_no_grad = no_grad
        for tower, grad in zip(towers, saved_grad):
            tower.visual.positional_embedding.requires_grad_(grad)
            tower._pos_cache.clear()
