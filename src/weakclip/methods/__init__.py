"""Methods as plug-ins: which method a preset, a work folder or a checkpoint belongs to.

A method is a subpackage (``weakclip.methods.excel``) or, for WeakCLIP, the package's original stages; this
module only names them, so that the pipeline, the commands, the report, ``predict``, ``export`` and
``weakclip.load`` can ask "which method made this?" without importing every method. It imports nothing of the
package but ``errors``; a method's own modules are imported by whoever runs it, from ``MethodInfo.package``.

Records name their method under the key ``"method"`` (``stage.json``, ``run.json``, ``config.yaml`` of a work
folder, and every checkpoint); a record without that key was written before there was a second method and is
WeakCLIP's.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError

DEFAULT_METHOD = "weakclip"
METHOD_KEY = "method"
#: The record at the top of a ``weakclip run`` work folder (its method, data, stages).
RUN_RECORD = "run.json"
#: The config a training work folder keeps beside its ``checkpoints/``.
TRAINING_CONFIG = "config.yaml"


@dataclass(frozen=True)
class StageInfo:
    """One stage of a method's ``weakclip run``: its folder name in the work folder, its title on the report,
    and whether it trains a network (its ``log.csv`` gives the report's training curves)."""

    name: str
    title: str
    trains: bool = False


@dataclass(frozen=True)
class MethodInfo:
    """A method's name (as written in records), its title, the presets that select it, the dotted name of the
    module that implements it, the stages of its ``weakclip run`` (in order), the stages of a run folder that
    hold a network (the final one last: ``weakclip.load(RUN)`` takes the last one present), and its entry
    points (``key -> "module:attribute"``, imported only when asked for, see :func:`entry`):

    - ``"pipeline"``: the class ``weakclip run`` runs (``cls(PipelineConfig, log=print)``, ``.run()``);
    - ``"load"``: ``load_segmenter(file, raw, *, where, device, clip_weights, classes) -> Segmenter`` for
      a checkpoint of the method (``raw``: what the file holds, already read);
    - ``"demo"``: ``run_demo(workdir, small, *, device, progress) -> report dict``;
    - ``"seeds"``: ``run_seeds(args, dataset_of, info) -> summary`` for ``weakclip seeds --method NAME``
      (``dataset_of(coco_kind)``: the command's dataset; ``info``: the process group); WeakCLIP's CLIP-ES
      seeds are the command's own;
    - ``"pseudo_masks"``: ``run_pseudo_masks(args, info) -> summary`` for ``weakclip pseudo-masks`` given a
      network of the method (WeakCLIP's is the command's own).
    - ``"train_config"``: ``config_with_overrides(preset, overrides) -> config`` (``weakclip train``: the
      preset or YAML file with ``section.key=value`` overrides; ``.data.kind``/``.root``/``.split``,
      ``.to_yaml()``);
    - ``"train"``: ``train_command(cfg, workdir, *, clip_weights, descriptors, resume, device,
      max_iters_this_run, progress) -> summary dict`` (``weakclip train``; WeakCLIP's is the command's own).

    The commands' entries (``seeds``, ``pseudo_masks``) print their summary on the first process and return
    it (``failures``, ``images``: the command's exit status).
    """

    name: str
    title: str
    presets: tuple[str, ...]
    package: str
    stages: tuple[StageInfo, ...] = ()
    network_stages: tuple[str, ...] = ()
    entries: tuple[tuple[str, str], ...] = ()

    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageInfo:
        for info in self.stages:
            if info.name == name:
                return info
        raise WeakclipError(f"{self.title} runs have no stage {name!r}; its stages: "
                            f"{', '.join(self.stage_names())}")


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    if info.name in _REGISTRY and _REGISTRY[info.name] != info:
        raise WeakclipError(f"method {info.name!r} is registered twice")
    _REGISTRY[info.name] = info
    return info


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> MethodInfo:
    info = _REGISTRY.get(str(name).strip().lower())
    if info is None:
        raise WeakclipError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}")
    return info


def all_network_stages() -> tuple[str, ...]:
    """Every stage name that holds a network in some method's ``weakclip run`` folder, in registry order
    (``--stage`` of predict and export)."""
    out: list[str] = []
    for info in _REGISTRY.values():
        out += [s for s in info.network_stages if s not in out]
    return tuple(out)


def of_preset(preset: str | Path) -> MethodInfo:
    """The method a packaged preset name belongs to, or the one a preset YAML file of one's own names (its
    ``"method"``, see ``of_record``); unknown names, and a file that names none or cannot be read, are
    WeakCLIP's, whose config loader then says what is wrong."""
    key = str(preset).strip().lower()
    for info in _REGISTRY.values():
        if key in info.presets:
            return info
    path = Path(str(preset))
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        from weakclip.sections import read_yaml

        try:
            record = read_yaml(path)
        except WeakclipError:
            record = None
        return of_record(record if isinstance(record, Mapping) else None)
    return _REGISTRY[DEFAULT_METHOD]


def of_record(record: Mapping[str, Any] | None) -> MethodInfo:
    """The method a record (``run.json``, ``stage.json``, a checkpoint's dict) names; WeakCLIP without one."""
    name = record.get(METHOD_KEY) if isinstance(record, Mapping) else None
    return get(name) if name else _REGISTRY[DEFAULT_METHOD]


def of_checkpoint(state: Mapping[str, Any] | None) -> MethodInfo:
    """The method a training checkpoint belongs to: its own ``"method"`` entry, else its config's, else
    WeakCLIP (checkpoints written before there was a second method)."""
    if isinstance(state, Mapping) and state.get(METHOD_KEY):
        return of_record(state)
    config = state.get("config") if isinstance(state, Mapping) else None
    return of_record(config if isinstance(config, Mapping) else None)


def of_folder(path: str | Path, *, tolerant: bool = False) -> MethodInfo | None:
    """The method a work folder names: a ``weakclip run`` folder's ``run.json``, else a training work folder's
    ``config.yaml`` (a record without ``"method"`` is WeakCLIP's); None when it holds neither. An unreadable
    record is its reader's one-line error; with ``tolerant`` it counts as absent, as does one that is not a
    mapping (the caller then asks the checkpoint)."""
    from weakclip.data.io import read_json
    from weakclip.sections import read_yaml

    readers = ((RUN_RECORD, lambda file: read_json(file, "run record")), (TRAINING_CONFIG, read_yaml))
    for name, read in readers:
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            record = read(file)
        except WeakclipError:
            if tolerant:
                continue
            raise
        if isinstance(record, Mapping):
            return of_record(record)
        if not tolerant:
            return of_record(None)
    return None


def entry(info: MethodInfo | str, key: str) -> Any:
    """The method's entry point ``key`` (see :class:`MethodInfo`), imported now; one line when the method has
    none (e.g. a method without a demo)."""
    info = info if isinstance(info, MethodInfo) else get(info)
    target = dict(info.entries).get(key)
    if target is None:
        raise WeakclipError(f"{info.title} has no {key!r} entry point")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_same(found: MethodInfo | str, wanted: MethodInfo | str, where: str, hint: str = "") -> None:
    """One-line error when ``where`` (a work folder, a checkpoint) belongs to another method than asked."""
    found_info = found if isinstance(found, MethodInfo) else get(found)
    wanted_info = wanted if isinstance(wanted, MethodInfo) else get(wanted)
    if found_info.name != wanted_info.name:
        tail = f"; {hint}" if hint else ""
        article = "an" if found_info.title[:1].upper() in "AEIOU" else "a"
        raise WeakclipError(
            f"{where} holds {article} {found_info.title} result, but this asks for {wanted_info.title}{tail}"
        )


register(MethodInfo(
    "weakclip", "WeakCLIP", ("voc", "coco", "voc-plus", "coco-plus"), "weakclip.pipeline",
    stages=(StageInfo("seeds", "seeds"), StageInfo("refine", "refinement (training)", trains=True),
            StageInfo("pseudo_masks", "pseudo masks"), StageInfo("retrain", "retraining", trains=True)),
    network_stages=("refine", "retrain"),
    entries=(("pipeline", "weakclip.pipeline:Pipeline"), ("demo", "weakclip.demo:run_method_demo"))))
register(MethodInfo(
    "excel", "ExCEL", ("excel-voc", "excel-coco"), "weakclip.methods.excel",
    stages=(StageInfo("seeds", "training-free masks"), StageInfo("train", "ExCEL training", trains=True),
            StageInfo("pseudo_masks", "pseudo masks (trained network)"),
            StageInfo("evaluate", "ExCEL network (val)"),
            StageInfo("retrain", "retraining (optional)", trains=True)),
    network_stages=("train", "retrain"),
    entries=(("pipeline", "weakclip.methods.excel.pipeline:ExcelPipeline"),
             ("load", "weakclip.methods.excel.segmenter:load_segmenter"),
             ("demo", "weakclip.methods.excel.demo:run_demo"),
             ("seeds", "weakclip.methods.excel.commands:run_seeds"),
             ("pseudo_masks", "weakclip.methods.excel.commands:run_pseudo_masks"),
             ("train_config", "weakclip.methods.excel.config:config_with_overrides"),
             ("train", "weakclip.methods.excel.train:train_command"))))
