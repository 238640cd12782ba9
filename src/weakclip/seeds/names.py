"""Prompt vocabulary of CLIP-ES (Lin et al., CVPR 2023), as data: the synonym-extended class names
and the background words its VOC and COCO scripts put into the Grad-CAM softmax.

The names are CLIP-ES's, typos and run-together words included ("sknowboard", "pottedplant",
"tvmonitor screen"): the ``voc`` and ``coco`` seed presets reproduce its prompts exactly. The lists
follow the class order of :data:`~weakclip.data.classes.VOC_CLASSES` and
:data:`~weakclip.data.classes.COCO_CLASSES` (background excluded), which is CLIP-ES's order too.
"""

from __future__ import annotations

from collections.abc import Sequence

from weakclip.data.classes import COCO91_CLASSES, COCO_CLASSES, VOC_CLASSES, prompt_names

__all__ = [
    "BACKGROUND_COCO",
    "BACKGROUND_VOC",
    "COCO_NAMES",
    "VOC_NAMES",
    "class_prompt_names",
]

#: The 20 VOC foreground classes as CLIP-ES prompts them (``new_class_names``).
VOC_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor screen",
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



def class_prompt_names(classes: Sequence[str], plain: bool = False) -> tuple[list[str], bool]:
    """The names that fill the prompt templates for the foreground ``classes[1:]``.

    CLIP-ES's synonym-extended names when the class list is VOC's or COCO's (and not ``plain``);
    otherwise the readable plain names of :func:`~weakclip.data.classes.prompt_names` (CLIP-ES has
    names for those two datasets only). Returns the names and whether they are CLIP-ES's.
    """
    classes = tuple(classes)
    if not plain:
        if classes == VOC_CLASSES:
            return list(VOC_NAMES), True
        if classes == COCO_CLASSES:
            return list(COCO_NAMES), True
        if classes == COCO91_CLASSES:  # the release's 91 ids: CLIP-ES's names where COCO has annotations
            es = dict(zip(COCO_CLASSES[1:], COCO_NAMES))
            return [es.get(c, c) for c in classes[1:]], True
    return prompt_names(list(classes))[1:], False
