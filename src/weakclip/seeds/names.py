"""Prompt vocabulary of CLIP-ES (Lin et al., CVPR 2023), as data: the synonym-extended class names
and the background words its VOC and COCO scripts put into the Grad-CAM softmax, and the rule that
recognises a class list as VOC's or COCO's whatever its spelling.

The names are CLIP-ES's, typos and run-together words included ("sknowboard", "pottedplant",
"tvmonitor screen"): the ``voc`` and ``coco`` seed presets reproduce its prompts exactly. The lists
follow the class order of :data:`~weakclip.data.classes.VOC_CLASSES` and
:data:`~weakclip.data.classes.COCO_CLASSES` (background excluded), which is CLIP-ES's order too.

Recognition (:func:`recognise_class_list`): every name is normalised (case folded; spaces,
underscores and hyphens removed) and the whole list is compared position by position, so class id
``k`` must be CLIP-ES's class ``k``. A position accepts our dataset name, our readable prompt name,
CLIP-ES's own class name (its COCO list spells "motorbike", "aeroplane", "sofa", "pottedplant",
"diningtable", "tvmonitor") and CLIP-ES's synonym name. ``background`` comes first, as in every class
list of this package, or is absent. The release's 91-id COCO list (category ids, 10 of them never
annotated) is recognised by its 80 annotated ids; the names at the 10 others are free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from weakclip.data.classes import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    VOC_CLASSES,
    VOC_PROMPT_NAMES,
    prompt_names,
)

__all__ = [
    "BACKGROUND_COCO",
    "BACKGROUND_VOC",
    "COCO_ES_CLASSES",
    "COCO_NAMES",
    "NAME_SOURCES",
    "VOC_NAMES",
    "PromptNames",
    "clip_es_background",
    "normalise_name",
    "prompt_vocabulary",
    "recognise_class_list",
]

#: The 20 VOC foreground classes as CLIP-ES prompts them (``new_class_names``).
VOC_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor screen",
)

#: The 80 COCO foreground classes as CLIP-ES spells them before the synonyms (``class_names_coco``:
#: VOC's words for six classes). Used only to recognise a class list written that way.
COCO_ES_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

#: The 80 COCO foreground classes as CLIP-ES prompts them (``new_class_names_coco``).
COCO_NAMES: tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird avian", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack,bag", "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee", "skis",
    "sknowboard", "sports ball", "kite", "baseball bat", "glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen", "laptop",
    "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)

#: CLIP-ES's background words of the VOC script (25).
BACKGROUND_VOC: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
    "street", "valley", "bridge", "sign",
)

#: CLIP-ES's background words of the COCO script (23: the VOC list without "keyboard" and "sign",
#: which are COCO classes or words of one).
BACKGROUND_COCO: tuple[str, ...] = tuple(b for b in BACKGROUND_VOC if b not in ("keyboard", "sign"))

#: The values of :attr:`PromptNames.source`.
NAME_SOURCES: tuple[str, ...] = ("clip-es voc", "clip-es coco", "plain")

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalise_name(name: str) -> str:
    """A class name reduced for comparison: case folded, spaces, underscores and hyphens removed."""
    return _SEPARATORS.sub("", str(name).casefold())


def _spellings(*lists: Sequence[str]) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(normalise_name(n) for n in names) for names in zip(*lists, strict=True))


_VOC_SPELLINGS = _spellings(VOC_CLASSES[1:], VOC_PROMPT_NAMES[1:], VOC_NAMES)
_COCO_SPELLINGS = _spellings(COCO_CLASSES[1:], COCO_ES_CLASSES, COCO_NAMES)
# foreground position (category id - 1) of each of the 80 annotated classes in the 91-id list
_COCO91_POSITIONS = tuple(i - 1 for i in COCO_CATEGORY_IDS)


def _foreground(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    return names[1:] if names and normalise_name(names[0]) == "background" else names


def _matches(names: Sequence[str], spellings: Sequence[frozenset[str]]) -> bool:
    return len(names) == len(spellings) and all(
        normalise_name(n) in ok for n, ok in zip(names, spellings)
    )


def recognise_class_list(classes: Sequence[str]) -> str | None:
    """``"voc"``, ``"coco"`` (80 classes) or ``"coco91"`` (the release's 91 ids) when ``classes`` is
    that dataset's class list in any spelling (see the module's docstring), else None.

    ``classes`` may start with ``background`` (as every class list here does) or leave it out."""
    fg = _foreground(classes)
    if _matches(fg, _VOC_SPELLINGS):
        return "voc"
    if _matches(fg, _COCO_SPELLINGS):
        return "coco"
    if len(fg) == 90 and _matches([fg[p] for p in _COCO91_POSITIONS], _COCO_SPELLINGS):
        return "coco91"
    return None


def clip_es_background(class_list: str | None) -> tuple[str, ...]:
    """CLIP-ES's background words for a recognised class list (:func:`recognise_class_list`): its COCO
    script's 23 for ``"coco"`` / ``"coco91"``, its VOC script's 25 otherwise."""
    return BACKGROUND_COCO if class_list in ("coco", "coco91") else BACKGROUND_VOC


@dataclass(frozen=True)
class PromptNames:
    """The names that fill the prompt templates for the foreground classes of a class list.

    names: one per foreground class, in class-id order.
    source: ``"clip-es voc"`` / ``"clip-es coco"`` (CLIP-ES's synonym-extended names) or ``"plain"``.
    class_list: what :func:`recognise_class_list` made of the list (None: neither VOC nor COCO).
    """

    names: tuple[str, ...]
    source: str
    class_list: str | None

    @property
    def clip_es(self) -> bool:
        """Whether the names are CLIP-ES's."""
        return self.source != "plain"

    @property
    def note(self) -> str | None:
        """A one-line note when CLIP-ES has no names for the class list, else None."""
        if self.class_list is None:
            return ("the class list is neither VOC's nor COCO's: CLIP-ES has no names for it, "
                    "plain class names are used")
        return None


def prompt_vocabulary(classes: Sequence[str], plain: bool = False) -> PromptNames:
    """The prompt names for the foreground ``classes[1:]`` (``classes`` starts with background).

    A class list recognised as VOC's or COCO's (in any spelling) gets CLIP-ES's names exactly, or
    with ``plain`` our readable names of that dataset (:data:`~weakclip.data.classes.VOC_PROMPT_NAMES`,
    :data:`~weakclip.data.classes.COCO_CLASSES`), so the spelling of the list never changes the
    prompts. In the 91-id COCO list the 10 ids without annotations have no CLIP-ES name: they get
    the list's own names, readable. Any other list gets the readable names of
    :func:`~weakclip.data.classes.prompt_names`.
    """
    classes = [str(c) for c in classes]
    fg = classes[1:]
    has_background = bool(classes) and normalise_name(classes[0]) == "background"
    kind = recognise_class_list(classes) if has_background else None
    if kind == "voc":
        names = VOC_PROMPT_NAMES[1:] if plain else VOC_NAMES
    elif kind == "coco":
        names = COCO_CLASSES[1:] if plain else COCO_NAMES
    elif kind == "coco91":
        own = prompt_names(fg)
        known = COCO_CLASSES[1:] if plain else COCO_NAMES
        for pos, name in zip(_COCO91_POSITIONS, known):
            own[pos] = name
        names = tuple(own)
    else:
        names = tuple(prompt_names(fg))
    source = "plain" if plain or kind is None else ("clip-es voc" if kind == "voc" else "clip-es coco")
    return PromptNames(tuple(names), source, kind)
