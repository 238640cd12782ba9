"""The command-line language every sub-command shares: one spelling per setting, one rule per value.

* ``--device``: ``cpu``, ``cuda`` or ``cuda:N``, checked by :func:`device_arg` wherever a device is taken;
* ``--dataset``: :data:`DATASET_KINDS` wherever a dataset is read;
* ``--crf``: :data:`CRF_CHOICES` (``none`` = off); ``--amp``: :data:`AMP_CHOICES` (``none`` = float32);
* renamed flags stay for a release as hidden aliases (:func:`add_renamed`) that print a one-line note.

Nothing here imports torch or the models: ``weakclip --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys

#: Dataset layouts (``weakclip.config.DATASET_KINDS``; a test keeps them equal).
DATASET_KINDS: tuple[str, ...] = ("voc", "coco", "coco91", "folder")
#: Packaged presets of refinement and retraining (``weakclip.config.PRESETS``; a test keeps them equal).
PRESET_NAMES: tuple[str, ...] = ("voc", "coco", "voc-plus", "coco-plus")
CRF_CHOICES: tuple[str, ...] = ("auto", "voc", "coco", "none")
AMP_CHOICES: tuple[str, ...] = ("bf16", "fp16", "none")

DATASET_HELP = ("dataset layout: voc, coco (81 classes), coco91 (COCO's 91 category ids, the release's), "
                "folder (your own data)")
PRESET_HELP = ", ".join(PRESET_NAMES)

_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def device_arg(value: str) -> str:
    """The argparse type of every ``--device``: ``cpu``, ``cuda`` or ``cuda:N``."""
    text = value.strip().lower()
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: expected cpu, cuda or cuda:N (N = "
                                         f"0, 1, ...)")
    return text


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_arg, default=None, metavar="{cpu,cuda,cuda:N}",
                   help="where to run: cpu, cuda or cuda:N (default: cuda when available; under torchrun "
                        "each "
                        "process takes the GPU of its local rank)")


def add_classes(p: argparse.ArgumentParser) -> None:
    """``--classes``: the class names of a network whose checkpoint does not store them (predict, export,
    pseudo-masks)."""
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="the class list the network was trained with (one name per line, background first; "
                        "or voc, coco, coco91), for checkpoints written before checkpoints stored their "
                        "class names, whose dataset is not where it was; replaces the stored names "
                        "(default: the names the checkpoint stores)")


def add_stage(p: argparse.ArgumentParser) -> None:
    """``--stage``: the network of a ``weakclip run`` work folder (predict, export)."""
    from weakclip.methods import all_network_stages

    p.add_argument("--stage", choices=list(all_network_stages()), default=None,
                   help="network of a `weakclip run` work folder: WeakCLIP refine or retrain, ExCEL train or "
                        "retrain (default: the last that holds a checkpoint, the final network)")


def add_dataset(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--dataset", choices=DATASET_KINDS, default=None,
                   help=f"{DATASET_HELP} (default: {default})")


def note(message: str) -> None:
    """A one-line note on stderr (a renamed flag, a flag without effect)."""
    print(f"note: {message}", file=sys.stderr)


class _Renamed(argparse.Action):
    """A hidden old spelling: notes the new one on stderr, then stores as the new flag would."""

    def __init__(self, option_strings, dest, new: str, store=None, **kwargs):
        self.new = new
        self.store = store  # a callable: the old flag's value -> the new flag's value
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        note(f"{option_string} is renamed {self.new} (the old spelling goes in a later release)")
        setattr(namespace, self.dest, self.store(values) if self.store else values)


def add_renamed(p: argparse.ArgumentParser, old: str, new: str, dest: str, *, value=None, **kwargs) -> None:
    """Keep ``old`` as a hidden alias of the flag ``new`` (its ``dest``). ``value``: for an old switch (no
    argument), what it stores; otherwise the old flag takes arguments as given in ``kwargs`` (nargs, type)."""
    if value is not None:
        p.add_argument(old, action=_Renamed, dest=dest, new=new, nargs=0, store=lambda _: value)
    else:
        p.add_argument(old, action=_Renamed, dest=dest, new=new, **kwargs)


class _OptionalValue(argparse.Action):
    """``--flag VALUE``, where the bare ``--flag`` of an earlier release still works as ``--flag bare``
    (with a note)."""

    def __init__(self, option_strings, dest, bare: str, **kwargs):
        self.bare = bare
        super().__init__(option_strings, dest, nargs="?", const=None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            note(f"{option_string} without a value is deprecated: it means {option_string} {self.bare}")
            values = self.bare
        setattr(namespace, self.dest, values)


def _add_choice(p: argparse.ArgumentParser, flag: str, choices: tuple[str, ...], help: str,
                bare: str | None) -> None:
    """``flag {choices}``; ``bare``: what the value-less flag of an earlier release meant (then still
    accepted, with a note)."""
    if bare is None:
        p.add_argument(flag, choices=choices, default=None, help=help)
    else:
        p.add_argument(flag, action=_OptionalValue, bare=bare, choices=choices, default=None,
                       metavar="{" + ",".join(choices) + "}", help=help)


def add_amp(p: argparse.ArgumentParser, help: str, *, bare: str | None = None) -> None:
    """``--amp {bf16,fp16,none}``."""
    _add_choice(p, "--amp", AMP_CHOICES, help, bare)


def add_crf(p: argparse.ArgumentParser, help: str, *, bare: str | None = None) -> None:
    """``--crf {auto,voc,coco,none}``."""
    _add_choice(p, "--crf", CRF_CHOICES, help, bare)


def add_training_data(p: argparse.ArgumentParser) -> None:
    """``--dataset`` and the training ``--split`` of the commands that train (``train``, ``retrain``,
    ``run``)."""
    add_dataset(p, "the preset's: voc for voc and voc-plus, coco91 for coco, coco for coco-plus")
    p.add_argument("--split", default=None,
                   help="training split or id-list file (default: the preset's, e.g. train_aug; folder "
                        "datasets: splits/train.txt when present, else every labelled image)")


class WeakclipParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose sub-actions may have a default: with ``default_action="generate"``,
    ``weakclip seeds --data-root ...`` reads as ``weakclip seeds generate --data-root ...``."""

    def __init__(self, *args, default_action: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_action = default_action

    def parse_known_args(self, args=None, namespace=None):
        if self.default_action is not None:
            args = list(sys.argv[1:] if args is None else args)
            subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            actions = subs[0].choices if subs else {}
            if not args or (args[0] not in actions and args[0] not in ("-h", "--help")):
                args.insert(0, self.default_action)
        return super().parse_known_args(args, namespace)
