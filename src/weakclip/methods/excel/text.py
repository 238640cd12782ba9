"""ExCEL's text side: class prompts and background words, the descriptors file, the k-means bank of descriptor
embeddings, Text Semantic Enrichment (attribute aggregation), and the patch-text maps (feature surgery).

What the release computes (datasets/clip_text.py, clip/clip.py ``encode_text_with_prompt_ensemble`` and
``clip_feature_surgery``, model/load_attr.py ``attr_clustering`` / ``attr_aggregate``):

- Prompts: 'a clean origami {}.' over the foreground class names (its synonym-extended lists, the same as
  CLIP-ES's: ``weakclip.seeds.names``) followed by background words (25 for VOC, 23 for COCO), each prompt
  encoded, L2-normalised, averaged over the one template and normalised again: the "integral" text features,
  (classes + background words) x embed_dim. The release picks VOC's or COCO's lists by the class count alone.
- Descriptors: a JSON object mapping each class name to a list of sentences (the authors publish GPT-4 files,
  ``attributes_text/descriptors_*_gpt4.0_cluster_a_photo_of4.json``). The sentences, lower-cased, are encoded
  class by class in the file's order and L2-normalised; scikit-learn's KMeans (random_state 0) clusters them
  (112 clusters for VOC, 224 for COCO). The bank is the cluster centres and, per class, a 0/1 flag of the
  clusters its sentences fall in (the flags are not used by the network).
- ``attr_aggregate`` with topK 0.9: each foreground text feature's dot products with the centres are sorted
  and the *lowest* ``int((1 - 0.9) * clusters)`` are set to -inf (it keeps the top 90%, not the top 10%: 101
  of 112 clusters for VOC, 202 of 224 for COCO), softmax over the clusters, the weighted centres are added to
  the class feature, background features appended unchanged, every row re-normalised: the enriched text
  features.
  With fewer than 11 clusters the release masks every cluster (``corr[:, -0:]``) and its softmax gives NaN:
  this module raises a one-line error there instead.
- ``clip_feature_surgery``: per image, the CLS token's softmax(2 x similarity) over the texts gives weights w;
  for every token and text, the channel products times w minus their mean over the texts, summed over the
  channels; min-max normalised over the tokens (CLS included). The release keeps the foreground columns of the
  patch tokens as its patch-text maps.

Departures and decisions (none changes VOC / COCO numbers):
- Class lists other than VOC's and COCO's (a folder dataset): the plain readable class names, and VOC's 25
  background words less any that is a class name or a word of one (the rule by which the release's COCO list
  drops 'keyboard' and 'sign' from VOC's); ``background=`` gives one's own list.
- Without a descriptors file there is no enrichment: the enriched features are the integral text features
  themselves (the release's commented-out alternative in ``ExCEL_model.forward``), with a one-line note.
- k-means: the release pinned scikit-learn 1.0.2, whose KMeans defaults were ``n_init=10`` and
  ``algorithm="elkan"`` for dense data (now ``n_init="auto"`` = 1 and ``"lloyd"``), and whose k-means++ drew
  the first centre with ``randint`` and summed distances in float64 (scikit-learn 1.3+ draws it with
  ``choice(p=...)``, so the same seed gives other centres). ``kmeans_seeding="sklearn-1.0.2"`` (the default)
  calls today's scikit-learn KMeans with n_init 10, elkan, random_state 0 and 1.0.2's seeding as its ``init``;
  ``"sklearn"`` uses today's own seeding.
- Descriptors are matched to classes by name in any spelling this package knows (``diningtable`` /
  ``dining table``, CLIP-ES's synonyms, COCO's ``motorbike`` / ``motorcycle``); the k-means runs over the
  sentences in the file's order (as the release), the flags are stored in class order.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakclip.data.classes import COCO_CLASSES, VOC_CLASSES, VOC_PROMPT_NAMES, prompt_names
from weakclip.errors import DataError, WeakclipError
from weakclip.methods.excel.clip_pass import block_self_attention
from weakclip.models.clip_text import CLIPTextTower
from weakclip.seeds.names import (
    BACKGROUND_COCO,
    BACKGROUND_VOC,
    COCO_ES_CLASSES,
    COCO_NAMES,
    VOC_NAMES,
    normalise_name,
    recognise_class_list,
)

__all__ = [
    "KMEANS_SEEDINGS",
    "PROMPT_TEMPLATE",
    "RELEASE_CLUSTERS",
    "RELEASE_TOP_K",
    "ExcelPrompts",
    "TextBank",
    "attr_aggregate",
    "build_text_bank",
    "check_descriptors",
    "cluster_descriptors",
    "cluster_flags",
    "encode_class_prompts",
    "encode_descriptors",
    "encode_texts",
    "excel_prompts",
    "feature_surgery",
    "kmeans_plusplus_sklearn_1_0",
    "match_descriptors",
    "note_to_stderr",
    "read_descriptors",
]

#: The release's prompt template (model/model_excel.py).
PROMPT_TEMPLATE = "a clean origami {}."
#: The release's k-means cluster counts (scripts/train_voc.py, train_coco.py ``--num_attri``).
RELEASE_CLUSTERS = {"voc": 112, "coco": 224}
#: ``attr_aggregate``'s ``topK`` (the share of clusters kept, see the module's docstring).
RELEASE_TOP_K = 0.9
#: ``"sklearn-1.0.2"``: the release's pinned scikit-learn's k-means++; ``"sklearn"``: the installed one's.
KMEANS_SEEDINGS = ("sklearn-1.0.2", "sklearn")
_DATASETS = ("voc", "coco", "folder")


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class ExcelPrompts:
    """The texts ExCEL encodes for a class list.

    class_names: the data's classes, background first. names: one prompt name per foreground class.
    background: the background words appended after them. class_list: "voc", "coco", "coco91" or None.
    spellings: per foreground class, the normalised names a descriptors file may use for it.
    note: a one-line note when the names or background words are not the release's, else None.
    """

    class_names: tuple[str, ...]
    names: tuple[str, ...]
    background: tuple[str, ...]
    class_list: str | None
    spellings: tuple[frozenset[str], ...] = field(repr=False, default=())
    note: str | None = None

    @property
    def n_foreground(self) -> int:
        return len(self.names)

    def texts(self, template: str = PROMPT_TEMPLATE) -> list[str]:
        return [template.format(n) for n in (*self.names, *self.background)]


def _words(name: str) -> set[str]:
    parts = str(name).replace(",", " ").replace("_", " ").split()
    return {w for w in (normalise_name(p) for p in parts) if w}


def _spellings(fg: Sequence[str], kind: str | None) -> tuple[frozenset[str], ...]:
    own = [{normalise_name(n), *(normalise_name(p) for p in prompt_names([n]))} for n in fg]
    if kind == "voc":
        for spell, names in zip(own, zip(VOC_CLASSES[1:], VOC_PROMPT_NAMES[1:], VOC_NAMES)):
            spell.update(normalise_name(n) for n in names)
    elif kind == "coco":
        for spell, names in zip(own, zip(COCO_CLASSES[1:], COCO_ES_CLASSES, COCO_NAMES)):
            spell.update(normalise_name(n) for n in names)
    elif kind == "coco91":
        from weakclip.data.classes import COCO_CATEGORY_IDS

        known = zip(COCO_CLASSES[1:], COCO_ES_CLASSES, COCO_NAMES)
        for pos, names in zip((i - 1 for i in COCO_CATEGORY_IDS), known):
            own[pos].update(normalise_name(n) for n in names)
    return tuple(frozenset(s) for s in own)


def excel_prompts(
    class_names: Sequence[str], dataset: str | None = None, background: Sequence[str] | None = None
) -> ExcelPrompts:
    """The release's prompt names and background words for ``class_names`` (background first).

    dataset: "voc" / "coco" (the release's lists; the class list must be that dataset's, in any spelling),
    "folder" (plain readable names whatever the list), or None (VOC's or COCO's lists when the class list is
    recognised as one, plain names otherwise). background: one's own background words (default: the
    release's for VOC / COCO; for other lists VOC's less the words that name a class or a word of one).
    """
    names = [str(c) for c in class_names]
    if len(names) < 2 or normalise_name(names[0]) != "background":
        raise WeakclipError(
            "ExCEL needs a class list that starts with 'background' and has a foreground class, "
            f"got {names[:3]}"
        )
    fg = names[1:]
    key = None if dataset is None else str(dataset).strip().lower()
    if key is not None and key not in _DATASETS:
        raise WeakclipError(f"dataset must be one of {', '.join(_DATASETS)} (or None), got {dataset!r}")
    kind = recognise_class_list(names)
    if key in ("voc", "coco") and not (kind == key or (key == "coco" and kind == "coco91")):
        raise DataError(f"the class list ({', '.join(fg[:4])}, ...) is not {key.upper()}'s")
    if key == "folder":
        kind = None
    note = None
    if kind == "voc":
        prompt = VOC_NAMES
        words = BACKGROUND_VOC
    elif kind in ("coco", "coco91"):
        prompt = COCO_NAMES
        if kind == "coco91":
            from weakclip.data.classes import COCO_CATEGORY_IDS

            own = prompt_names(fg)
            for pos, name in zip((i - 1 for i in COCO_CATEGORY_IDS), COCO_NAMES):
                own[pos] = name
            prompt = tuple(own)
        words = BACKGROUND_COCO
    else:
        prompt = tuple(prompt_names(fg))
        taken = set().union(*(_words(n) for n in fg)) | {normalise_name(n) for n in fg}
        words = tuple(w for w in BACKGROUND_VOC if normalise_name(w) not in taken)
        note = "the class list is neither VOC's nor COCO's: ExCEL's prompts use the plain class names"
    if background is not None:
        words = tuple(str(w) for w in background)
        if not words:
            raise WeakclipError("ExCEL needs at least one background word")
    return ExcelPrompts(tuple(names), tuple(prompt), tuple(words), kind, _spellings(fg, kind), note)


# --------------------------------------------------------------------------------------------------
# Text encoding, as the release's ``ExCEL_CLIP.encode_text`` (tokens first, PyTorch's multi-head attention)


def encode_texts(text_tower: CLIPTextTower, token_ids: Tensor) -> Tensor:
    """CLIP text features (K x embed_dim, not normalised) of K x L token ids on our text tower, computed as
    the release's ``encode_text`` does (tokens-first layout, ``multi_head_attention_forward`` with the causal
    mask), so that its numbers are the same."""
    with torch.no_grad():
        x = text_tower.token_embedding(token_ids)
        length = x.shape[1]
        x = x + text_tower.positional_embedding[:length].to(x.dtype)
        x = x.permute(1, 0, 2)
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in text_tower.transformer.resblocks:
            out, _ = block_self_attention(block, x, mask)
            x = x + block.ls_1(out)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = text_tower.ln_final(x.permute(1, 0, 2))
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        return x @ text_tower.text_projection


def encode_class_prompts(
    text_tower: CLIPTextTower, names: Sequence[str], templates: Sequence[str] = (PROMPT_TEMPLATE,)
) -> Tensor:
    """The release's ``encode_text_with_prompt_ensemble``: per name, every template's features normalised,
    averaged, normalised again. Returns K x embed_dim (a transposed view, as the release's)."""
    rows = []
    for name in names:
        ids = text_tower.tokenize([t.format(name) for t in templates])
        emb = encode_texts(text_tower, ids)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows, dim=1).t()


# --------------------------------------------------------------------------------------------------
# Descriptors


def read_descriptors(path: str | PathLike) -> dict[str, list[str]]:
    """A descriptors file: a JSON object mapping class names to lists of sentences, in the file's order.
    One-line DataError when it is missing, not JSON, or not of that shape."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"descriptors file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"descriptors file {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise DataError(f"descriptors file {path} is not JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise DataError(f"descriptors file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"descriptors file {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(
            f"descriptors file {path} must be a JSON object mapping class names to sentence lists"
        )
    out: dict[str, list[str]] = {}
    for name, sentences in data.items():
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise DataError(
                f"descriptors file {path}: class {name!r} must have a non-empty list of sentences"
            )
        out[str(name)] = list(sentences)
    return out


def match_descriptors(
    descriptors: Mapping[str, Sequence[str]], prompts: ExcelPrompts, path: str | PathLike = "descriptors"
) -> list[int]:
    """For each class of the file (in its order), the foreground index (0-based) of the data's class it names.
    One-line DataError naming the file and the class when the file names a class the data lacks, names one
    twice, or misses one."""
    fg = prompts.class_names[1:]
    owners: list[int] = []
    seen: dict[int, str] = {}
    for key in descriptors:
        spelled = normalise_name(key)
        found = [i for i, ok in enumerate(prompts.spellings) if spelled in ok]
        if not found:
            raise DataError(f"descriptors file {path} names class {key!r}, which the data does not have")
        index = found[0]
        if index in seen:
            raise DataError(
                f"descriptors file {path} names class {fg[index]!r} twice ({seen[index]!r} and {key!r})"
            )
        seen[index] = key
        owners.append(index)
    missing = [fg[i] for i in range(len(fg)) if i not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"descriptors file {path} has no descriptors for class {missing[0]!r}{more}")
    return owners


def check_descriptors(
    path: str | PathLike, class_names: Sequence[str], dataset: str | None = None,
    background: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """The checks :func:`build_text_bank` makes of a descriptors file, before any work: it exists, is JSON of
    the right shape (:func:`read_descriptors`) and describes every foreground class of ``class_names`` and
    no other (:func:`match_descriptors`, with the prompts of ``dataset`` / ``background`` as
    :func:`excel_prompts`). One-line DataError naming the file and the class; returns the table."""
    prompts = excel_prompts(class_names, dataset, background)
    table = read_descriptors(path)
    match_descriptors(table, prompts, path)
    return table


def encode_descriptors(
    text_tower: CLIPTextTower, descriptors: Mapping[str, Sequence[str]], path: str | PathLike = "descriptors"
) -> list[Tensor]:
    """Per class of the file (its order), its sentences lower-cased, encoded and L2-normalised (n_i x
    embed_dim), as the release's ``attr_clustering``."""
    out = []
    for name, sentences in descriptors.items():
        try:
            ids = text_tower.tokenize([s.lower() for s in sentences])
        except WeakclipError as exc:
            raise DataError(f"descriptors file {path}, class {name!r}: {exc}") from None
        out.append(F.normalize(encode_texts(text_tower, ids), p=2, dim=1).cpu())
    return out


# --------------------------------------------------------------------------------------------------
# k-means


def kmeans_plusplus_sklearn_1_0(
    x: np.ndarray, n_clusters: int, random_state: np.random.RandomState
) -> np.ndarray:
    """Greedy k-means++ seeding as scikit-learn 1.0.2 computes it (the release's pinned version): first centre
    ``random_state.randint(n)``, then ``2 + int(log(k))`` candidates per centre drawn by ``random_sample``
    against the float64 cumulative sum of the closest squared distances, the candidate that lowers the total
    most kept. Squared distances by scikit-learn's ``euclidean_distances`` (float64 chunks for float32 data).
    Used as KMeans's ``init`` callable, it receives the mean-centred data and KMeans's random state."""
    from sklearn.metrics.pairwise import euclidean_distances

    n_samples = x.shape[0]
    trials = 2 + int(np.log(n_clusters))
    centres = np.empty((n_clusters, x.shape[1]), dtype=x.dtype)
    first = random_state.randint(n_samples)
    centres[0] = x[first]
    closest = euclidean_distances(centres[0, np.newaxis], x, squared=True)
    potential = closest.sum()
    for c in range(1, n_clusters):
        draws = random_state.random_sample(trials) * potential
        candidates = np.searchsorted(np.cumsum(closest, dtype=np.float64), draws)
        np.clip(candidates, None, closest.size - 1, out=candidates)
        distances = euclidean_distances(x[candidates], x, squared=True)
        np.minimum(closest, distances, out=distances)
        potentials = distances.sum(axis=1)
        best = int(np.argmin(potentials))
        potential = potentials[best]
        closest = distances[best]
        centres[c] = x[candidates[best]]
    return centres


def cluster_descriptors(
    embeddings: Tensor | np.ndarray, n_clusters: int, seeding: str = "sklearn-1.0.2"
) -> tuple[Tensor, np.ndarray]:
    """scikit-learn KMeans of the descriptor embeddings (M x embed_dim, float32) as the release runs it
    (random_state 0; n_init 10 and elkan as its pinned 1.0.2). Returns the centres (n_clusters x embed_dim,
    float32) and each embedding's cluster label."""
    from sklearn.cluster import KMeans

    if seeding not in KMEANS_SEEDINGS:
        raise WeakclipError(f"kmeans_seeding must be one of {', '.join(KMEANS_SEEDINGS)}, got {seeding!r}")
    data = embeddings.numpy() if isinstance(embeddings, Tensor) else np.asarray(embeddings)
    if not 1 <= n_clusters <= data.shape[0]:
        raise DataError(
            f"{n_clusters} k-means clusters need at least as many descriptors, there are {data.shape[0]}"
        )
    init = kmeans_plusplus_sklearn_1_0 if seeding == "sklearn-1.0.2" else "k-means++"
    kmeans = KMeans(n_clusters=n_clusters, init=init, n_init=10, algorithm="elkan", random_state=0)
    with warnings.catch_warnings():
        # duplicate descriptors give fewer distinct clusters than asked, as in the release: no warning
        warnings.simplefilter("ignore")
        kmeans.fit(data)
    return torch.tensor(kmeans.cluster_centers_), np.asarray(kmeans.labels_)


def cluster_flags(labels: np.ndarray, owners: Sequence[int], n_classes: int, n_clusters: int) -> Tensor:
    """Per class, 1 for every cluster one of its sentences falls in (the release's ``ground_truth``), float32.
    ``owners``: the class (0-based) of each sentence, in the order of ``labels``."""
    flags = np.zeros((n_classes, n_clusters))
    owners = np.asarray(owners)
    for c in range(n_classes):
        flags[c, np.unique(labels[owners == c])] = 1
    return torch.tensor(flags).float()


# --------------------------------------------------------------------------------------------------
# Enrichment and patch-text maps


def _dropped_clusters(n_clusters: int, top_k: float) -> int:
    """How many clusters ``attr_aggregate`` masks: the release's ``int((1 - topK) * clusters)``; a one-line
    error where that is 0 (the release then masks them all and its softmax gives NaN)."""
    if not 0.0 <= top_k < 1.0:
        raise WeakclipError(f"top_k must lie in [0, 1), got {top_k}")
    dropped = int((1 - top_k) * n_clusters)
    if dropped < 1:
        fewest = next(n for n in range(1, 10**6) if int((1 - top_k) * n) >= 1)
        raise WeakclipError(
            f"{n_clusters} k-means clusters leave ExCEL's attribute aggregation (top_k {top_k}) no cluster "
            f"to drop, where the release gives NaN; use at least {fewest}"
        )
    return dropped


def attr_aggregate(
    text_features: Tensor, centres: Tensor, n_foreground: int, top_k: float = RELEASE_TOP_K
) -> Tensor:
    """The release's ``attr_aggregate``: enriched text features, (classes + background) x embed_dim, unit
    rows.

    text_features: integral text features, foreground classes first; centres: n_clusters x embed_dim."""
    dropped = _dropped_clusters(centres.shape[0], top_k)
    bank = centres.t().contiguous().to(text_features.device)  # the release's layout: embed_dim x clusters
    fg = text_features[:n_foreground]
    bg = text_features[n_foreground:]
    logits = fg @ bank
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    ordered[:, -dropped:] = float("-inf")
    weights = torch.zeros_like(ordered).scatter_(-1, order, ordered).softmax(dim=-1)
    enriched = torch.cat([weights @ bank.t() + fg, bg], dim=0)
    return enriched / enriched.norm(dim=1, keepdim=True)


def feature_surgery(image_features: Tensor, text_features: Tensor) -> Tensor:
    """The release's ``clip_feature_surgery`` (without redundant features): B x (1 + N) x E image features and
    K x E texts -> B x (1 + N) x K maps, min-max normalised over the tokens (CLS included), detached."""
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    weight = prob / prob.mean(-1, keepdim=True)
    batch, tokens, width = image_features.shape
    products = image_features.reshape(batch, tokens, 1, width) * text_features.reshape(1, 1, -1, width)
    # the release's ``products * weight`` and ``products - mean``, in place on this B x (1 + N) x K x E buffer
    products = products.mul_(weight.unsqueeze(-1))
    products = products.sub_(products.mean(2, keepdim=True))
    similarity = products.sum(-1)
    low = similarity.min(1, keepdim=True)[0]
    high = similarity.max(1, keepdim=True)[0]
    return ((similarity - low) / (high - low)).detach()


# --------------------------------------------------------------------------------------------------
# The text bank


_PAYLOAD_TENSORS = ("text_features", "enriched", "centres", "flags")


@dataclass
class TextBank:
    """What ExCEL's network needs of the text side, savable in a checkpoint (plain tensors, lists, strings).

    class_names: the data's classes, background first (the decoder's outputs). names / background: the prompt
    names of the foreground classes and the background words. text_features: the integral text features,
    (foreground + background) x E. enriched: the enriched features the patch-text maps use, same shape (the
    integral ones without descriptors). centres: n_clusters x E k-means centres (0 x E without descriptors).
    flags: foreground classes x n_clusters, 0/1. descriptors: the descriptors file's name, or None.
    kmeans: the k-means settings used. note: the one-line note given when building, or None.
    """

    class_names: list[str]
    names: list[str]
    background: list[str]
    template: str
    text_features: Tensor
    enriched: Tensor
    centres: Tensor
    flags: Tensor
    top_k: float = RELEASE_TOP_K
    descriptors: str | None = None
    kmeans: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    @property
    def n_foreground(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def enriched_by_descriptors(self) -> bool:
        return self.centres.shape[0] > 0

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors (CPU), lists and strings, for a checkpoint."""
        out: dict[str, Any] = {
            "class_names": list(self.class_names), "names": list(self.names),
            "background": list(self.background),
            "template": self.template, "top_k": float(self.top_k), "descriptors": self.descriptors,
            "kmeans": dict(self.kmeans), "note": self.note,
        }
        out.update({k: getattr(self, k).detach().cpu().clone() for k in _PAYLOAD_TENSORS})
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], where: str = "checkpoint") -> TextBank:
        """The bank back from ``to_payload``'s dict; one-line WeakclipError when it is not one."""
        needed = ("class_names", "names", "background", "template", *_PAYLOAD_TENSORS)
        if not isinstance(payload, Mapping) or any(k not in payload for k in needed):
            missing = [k for k in needed if not isinstance(payload, Mapping) or k not in payload]
            raise WeakclipError(f"{where} has no usable ExCEL text bank (missing {', '.join(missing)})")
        tensors = {k: payload[k] for k in _PAYLOAD_TENSORS}
        if not all(isinstance(t, Tensor) for t in tensors.values()):
            raise WeakclipError(f"{where}: the ExCEL text bank's features are not tensors")
        bank = cls(
            class_names=[str(c) for c in payload["class_names"]], names=[str(n) for n in payload["names"]],
            background=[str(b) for b in payload["background"]], template=str(payload["template"]),
            top_k=float(payload.get("top_k", RELEASE_TOP_K)), descriptors=payload.get("descriptors"),
            kmeans=dict(payload.get("kmeans") or {}), note=payload.get("note"),
            **{k: t.float() for k, t in tensors.items()},
        )
        bank.check(where)
        return bank

    def check(self, where: str = "text bank") -> None:
        n_fg, n_texts = len(self.names), len(self.names) + len(self.background)
        dim = self.text_features.shape[-1] if self.text_features.ndim == 2 else -1
        ok = (
            len(self.class_names) == n_fg + 1 and self.text_features.shape == (n_texts, dim)
            and self.enriched.shape == (n_texts, dim)
            and self.centres.ndim == 2 and self.centres.shape[1] == dim
            and self.flags.shape == (n_fg, self.centres.shape[0])
        )
        if not ok:
            raise WeakclipError(
                f"{where}: inconsistent ExCEL text bank ({len(self.class_names)} classes, {n_fg} names, "
                f"{len(self.background)} background words, features {tuple(self.text_features.shape)}, "
                f"enriched {tuple(self.enriched.shape)}, centres {tuple(self.centres.shape)}, "
                f"flags {tuple(self.flags.shape)})"
            )


def _default_clusters(kind: str | None, n_descriptors: int) -> int:
    if kind == "voc":
        return RELEASE_CLUSTERS["voc"]
    if kind in ("coco", "coco91"):
        return RELEASE_CLUSTERS["coco"]
    # another class list: the release's VOC ratio (112 clusters for 400 sentences), at least 11 (see
    # attr_aggregate), at most the number of sentences
    return min(n_descriptors, max(11, round(n_descriptors * RELEASE_CLUSTERS["voc"] / 400)))


def note_to_stderr(line: str) -> None:
    """The default way notes are given: one line on standard error."""
    print(line, file=sys.stderr, flush=True)


def build_text_bank(
    text_tower: CLIPTextTower,
    class_names: Sequence[str],
    *,
    dataset: str | None = None,
    descriptors: str | PathLike | None = None,
    clusters: int | None = None,
    background: Sequence[str] | None = None,
    top_k: float = RELEASE_TOP_K,
    kmeans_seeding: str = "sklearn-1.0.2",
    template: str = PROMPT_TEMPLATE,
    note: Callable[[str], None] | None = note_to_stderr,
) -> TextBank:
    """The release's text side for ``class_names`` (background first): integral text features, and with a
    descriptors file the k-means bank and the enriched features (module docstring).

    clusters: k-means clusters (None: 112 for VOC, 224 for COCO, else the VOC ratio of the sentence count).
    note: called with the one-line note (no descriptors, or a class list that is not VOC's / COCO's); None:
    silent. The note is kept in the bank either way.
    """
    prompts = excel_prompts(class_names, dataset, background)
    texts = [*prompts.names, *prompts.background]
    integral = encode_class_prompts(text_tower, texts, (template,))
    dim = integral.shape[1]
    notes = [prompts.note] if prompts.note else []
    if descriptors is None:
        notes.append("no descriptors file: ExCEL runs with plain class prompts (no Text Semantic Enrichment)")
        enriched = integral.contiguous()
        centres, flags, kmeans = integral.new_zeros(0, dim), integral.new_zeros(prompts.n_foreground, 0), {}
        name = None
    else:
        path = Path(descriptors)
        table = read_descriptors(path)
        owners = match_descriptors(table, prompts, path)
        embedded = encode_descriptors(text_tower, table, path)
        owner_of_row = np.concatenate([np.full(len(e), o) for e, o in zip(embedded, owners)])
        n_rows = len(owner_of_row)
        n_clusters = int(clusters) if clusters is not None else _default_clusters(prompts.class_list, n_rows)
        _dropped_clusters(n_clusters, top_k)  # a one-line error before the k-means where it would give NaN
        centres, labels = cluster_descriptors(torch.cat(embedded, dim=0), n_clusters, kmeans_seeding)
        flags = cluster_flags(labels, owner_of_row, prompts.n_foreground, n_clusters)
        enriched = attr_aggregate(integral, centres.to(integral.device), prompts.n_foreground, top_k)
        kmeans = {"clusters": n_clusters, "random_state": 0, "n_init": 10, "algorithm": "elkan",
                  "seeding": kmeans_seeding}
        name = path.name
    line = "; ".join(notes) if notes else None
    if line and note is not None:
        note(f"note: {line}")
    bank = TextBank(
        class_names=list(prompts.class_names), names=list(prompts.names), background=list(prompts.background),
        template=template, text_features=integral.contiguous().cpu(), enriched=enriched.cpu(),
        centres=centres.float().cpu(), flags=flags.cpu(), top_k=float(top_k), descriptors=name, kmeans=kmeans,
        note=line,
    )
    bank.check()
    return bank
