"""Where a training run starts: the checkpoint it resumes (:func:`resume_checkpoint`) and the check,
before any weight is loaded, that the work folder holds the network this run asks for
(:func:`check_resume_network`: one line naming the preset or network the folder holds)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from weakclip.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from weakclip.errors import WeakclipError
from weakclip.methods import check_same, of_checkpoint, of_record

__all__ = ["check_resume_network", "config_differences", "resume_checkpoint"]


def resume_checkpoint(workdir: str | Path, resume: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint a run starts from: with ``resume`` the latest in ``workdir`` (None when there is none:
    a fresh start); without, None, and a WeakclipError when ``workdir`` already holds checkpoints."""
    workdir = Path(workdir)
    if resume:
        path = latest_checkpoint(workdir)
        if path is None:
            log(f"no checkpoint in {workdir}: starting from iteration 0")
            return None
        ckpt = load_checkpoint(path)
        log(f"resuming from {path} (iteration {ckpt['iteration']})")
        return ckpt
    if list_checkpoints(workdir):
        raise WeakclipError(f"{workdir} already holds checkpoints: pass --resume to continue, or use another "
                            "--workdir")
    return None



def _preset_of(model: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], int]:
    """The packaged presets closest to a model section and how many of its settings differ from them."""
    counts = {n: sum(1 for k, v in model.items() if k in m and m[k] != v) for n, m in presets.items()}
    if not counts:
        return [], 0
    fewest = min(counts.values())
    return [n for n, c in counts.items() if c == fewest], fewest


def _network_label(model: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]], name_key: str | None,
                   preset_word: str) -> str:
    """``deeplabv1_resnet38 (retrain preset voc)``, ``preset voc``, ``preset voc with 3 settings changed``."""
    names, changed = _preset_of(model, presets)
    which = f"{preset_word} {' / '.join(names)}" if names else "model settings of its own"
    if names and changed:
        which += f" with {changed} setting{'s' if changed > 1 else ''} changed"
    if name_key and model.get(name_key):
        return f"{model[name_key]} ({which})"
    return which


def check_resume_network(ckpt: Mapping[str, Any] | None, config: Mapping[str, Any], workdir: str | Path, *,
                         kind: str, presets: Mapping[str, Mapping[str, Any]], name_key: str | None = None,
                         preset_flag: str = "--preset", preset_word: str = "preset",
                         ignore: Sequence[str] = ()) -> None:
    """Before any weight is loaded: WeakclipError (one line) when ``ckpt`` (a resumed checkpoint) was trained
    with other model settings than ``config``'s (another preset or network): it names what the folder holds,
    which differ, and what to do. ``presets``: name -> model section of each packaged preset (to name it);
    ``name_key``: the model section's network name (retraining: ``name``). Keys one of the two configs lacks
    (an older version's checkpoint) and ``ignore`` (settings of the start only, e.g. a weights file's path)
    are not compared."""
    if ckpt is None:
        return
    # another method's work folder (WeakCLIP's given to ExCEL or the reverse): one line, before the settings
    check_same(of_checkpoint(ckpt), of_record(config), str(workdir), "start in another work folder")
    old = (ckpt.get("config") or {}).get("model")
    new = config.get("model")
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return
    common = [k for k in old if k in new and k not in ignore]
    diffs = config_differences({k: old[k] for k in common}, {k: new[k] for k in common}, "model.")
    if not diffs:
        return
    held = _network_label(old, presets, name_key, preset_word)
    given = _network_label(new, presets, name_key, preset_word)
    names, changed = _preset_of(old, presets)
    hint = (f"resume with {preset_flag} {names[0]}" if names and not changed
            else f"resume with the settings of {workdir}/config.yaml")
    raise WeakclipError(f"{workdir} holds a {kind} of {held}, this run asks for {given} "
                        f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}): {hint}, or start in "
                        "another work folder")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
