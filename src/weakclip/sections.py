"""Typed configuration sections shared by every stage's config: dataclass sections loaded from nested
dicts (YAML) with each value converted to its field's type, ``section.key=value`` overrides, YAML read and
written atomically, and one-line errors that name the closest known key. :class:`SectionedConfig` is the
base of the three configs (refinement, retraining, ExCEL): their YAML round trip, presets and overrides."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from weakclip.errors import WeakclipError

__all__ = [
    "SectionedConfig",
    "absolute_paths",
    "coerce",
    "dump_yaml",
    "field_types",
    "load_sections",
    "packaged_yaml",
    "plain",
    "override_keys",
    "read_yaml",
    "section_dict",
    "set_section_value",
    "split_override",
    "unknown_key_message",
]


def unknown_key_message(key: str, source: str, keys: list[str], example: str = "train.iters") -> str:
    """``source: unknown config key 'x'; did you mean ...?`` with the closest of ``keys``."""
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; keys look like {example}"
    return f"{source}: unknown config key {key!r}{hint}"


# ====================================================================== YAML (shared by the configs)
def dump_yaml(data: dict[str, Any], path: str | Path | None = None) -> str:
    """``data`` as YAML text (order kept, short lists inline); also written atomically to ``path``."""
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    if path is not None:
        from weakclip.data.io import write_text_atomic

        write_text_atomic(path, text)
    return text


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing or unreadable file is a one-line WeakclipError."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeakclipError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WeakclipError(f"cannot read config {path}: {' '.join(str(exc).split())}") from exc


def packaged_yaml(name: str) -> Any:
    """A preset shipped in ``weakclip/configs/``."""
    from importlib import resources

    return yaml.safe_load(resources.files("weakclip").joinpath("configs", name).read_text("utf-8"))


# ====================================================================== sections (shared by the configs)
def load_sections(cfg: Any, sections: dict[str, type], raw: Any, source: str, *, extra: tuple[str, ...],
                  keys: list[str]) -> dict[str, Any]:
    """Set each dataclass section of ``cfg`` from the nested dict ``raw`` (typed; fields left out keep their
    defaults); top-level names in ``extra`` are allowed and left to the caller; ``keys``: every settable key
    (an unknown one's error names the closest). Returns ``raw`` as a dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WeakclipError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(sections) - set(extra))
    if unknown:
        raise WeakclipError(f"{source}: unknown section(s) {', '.join(unknown)}; "
                            f"known: {', '.join([*sections, *extra])}")
    for name, section_cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise WeakclipError(f"{source}: section {name!r} must be a mapping")
        hints = field_types(section_cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise WeakclipError(unknown_key_message(f"{name}.{key}", source, keys))
            kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
        setattr(cfg, name, _rebuild(getattr(cfg, name), kwargs, source))
    return raw


def split_override(item: str) -> tuple[str, str]:
    """``"section.key=value"`` -> ``("section.key", "value")``."""
    if "=" not in item:
        raise WeakclipError(f"override {item!r} is not of the form section.key=value")
    key, value = (part.strip() for part in item.split("=", 1))
    return key, value


def override_keys(overrides) -> set[str]:
    """The config keys that ``key=value`` overrides name (an item without ``=`` counts as its key; it is
    refused where it is applied)."""
    return {item.split("=", 1)[0].strip() for item in overrides or ()}


def absolute_paths(cfg: Any, keys: tuple[str, ...]) -> None:
    """Make the ``section.field`` paths ``keys`` of ``cfg`` absolute, in place (``os.path.abspath``: against
    the working folder, symbolic links kept), so that what records them reads the same from any folder."""
    import os

    for key in keys:
        section, _, name = key.partition(".")
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value:
            absolute = os.path.abspath(os.path.expanduser(str(value)))
            setattr(cfg, section, dataclasses.replace(obj, **{name: absolute}))


def set_section_value(cfg: Any, sections: dict[str, type], key: str, value: Any, *, keys: list[str],
                      example: str) -> None:
    """Set ``section.field`` of ``cfg`` to ``value`` converted to the field's type (an unknown key's error
    names the closest of ``keys`` or shows ``example``)."""
    section, dot, name = key.partition(".")
    if not dot or section not in sections or name not in field_types(sections[section]):
        raise WeakclipError(unknown_key_message(key, "override", keys, example))
    converted = coerce(value, field_types(sections[section])[name], key)
    setattr(cfg, section, _rebuild(getattr(cfg, section), {name: converted}, f"override {key}"))


# ====================================================================== the configs' base
class SectionedConfig:
    """What every stage's config dataclass shares: one field per section (``SECTIONS``, in the YAML's order),
    top-level keys beside them (``EXTRA_KEYS``: ``classes``, the class list, is a field of the subclass;
    ``method`` is written first as ``METHOD`` and checked by :meth:`read_extra`), the YAML round trip,
    packaged presets (``PRESETS``, ``weakclip/configs/`` + ``PRESET_FILE``) and ``section.key=value``
    overrides. A subclass adds its own checks in :meth:`validate`."""

    SECTIONS: ClassVar[dict[str, type]] = {}
    #: top-level keys beside the sections, in the order an unknown section's error lists them
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ()
    #: written first as ``"method"`` by :meth:`to_dict` (None: no such key)
    METHOD: ClassVar[str | None] = None
    #: what an unknown override key's error says keys look like
    KEY_EXAMPLE: ClassVar[str] = "train.iters"
    PRESETS: ClassVar[tuple[str, ...]] = ()
    #: a preset's file name, its source in errors and the word for an unknown name (``{}``: the preset)
    PRESET_FILE: ClassVar[str] = "{}.yaml"
    PRESET_SOURCE: ClassVar[str] = "preset {}"
    PRESET_NOUN: ClassVar[str] = "preset"

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.METHOD is None else {"method": self.METHOD}
        out.update({name: section_dict(getattr(self, name)) for name in self.SECTIONS})
        if "classes" in self.EXTRA_KEYS:
            out["classes"] = None if self.classes is None else list(self.classes)
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config"):
        """Build a config from nested dicts; keys left out keep their defaults."""
        cfg = cls()
        raw = load_sections(cfg, cls.SECTIONS, raw, source, extra=cls.EXTRA_KEYS, keys=cls.all_keys())
        cfg.read_extra(raw, source)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path):
        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_preset(cls, name: str | Path):
        """A packaged preset (``PRESETS``, any case) or a YAML file (:meth:`is_config_file`)."""
        key = str(name).strip()
        if key.lower() in cls.PRESETS:
            return cls.from_dict(packaged_yaml(cls.PRESET_FILE.format(key.lower())),
                                 source=cls.PRESET_SOURCE.format(key.lower()))
        path = Path(key)
        if cls.is_config_file(path):
            return cls.from_yaml(path)
        raise WeakclipError(f"unknown {cls.PRESET_NOUN} {key!r}: expected {', '.join(cls.PRESETS)} or a "
                            f".yaml file")

    @staticmethod
    def is_config_file(path: Path) -> bool:
        """Whether a preset name that is not packaged is read as a YAML file (else: unknown preset)."""
        return path.suffix.lower() in (".yaml", ".yml") or path.exists()

    # ------------------------------------------------------------------ keys, overrides, checks
    @classmethod
    def all_keys(cls) -> list[str]:
        """Every settable key, ``section.field`` (and ``classes``)."""
        keys = [f"{s}.{f}" for s, c in cls.SECTIONS.items() for f in field_types(c)]
        return keys + ["classes"] if "classes" in cls.EXTRA_KEYS else keys

    def with_overrides(self, overrides: list[str] | tuple[str, ...]):
        """A copy with ``section.key=value`` overrides applied in order (typed, validated); ``classes=a,b,c``
        sets the class list."""
        cfg = type(self).from_dict(self.to_dict())  # a deep copy through the typed path
        for item in overrides:
            key, value = split_override(item)
            if key == "classes" and "classes" in self.EXTRA_KEYS:
                cfg.classes = coerce(value, list[str] | None, key)
            else:
                set_section_value(cfg, self.SECTIONS, key, value, keys=self.all_keys(),
                                  example=self.KEY_EXAMPLE)
        cfg.validate("override")
        return cfg

    def read_extra(self, raw: dict[str, Any], source: str) -> None:
        """Take the top-level keys beside the sections from ``raw`` (the class list)."""
        if "classes" in self.EXTRA_KEYS and raw.get("classes") is not None:
            self.classes = coerce(raw["classes"], list[str], "classes")

    def validate(self, source: str = "config") -> None:
        """The checks the types alone do not express (a subclass's); a one-line WeakclipError."""


# ====================================================================== typed conversion
def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def section_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        out[f.name] = plain(getattr(obj, f.name))
    return out


def plain(value: Any) -> Any:
    """Make a value YAML-safe: tuples -> lists, dataclasses -> dicts, paths -> str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return section_dict(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _rebuild(section: Any, changes: dict[str, Any], source: str) -> Any:
    """``dataclasses.replace`` (re-runs the section's own checks), errors as WeakclipError."""
    if not changes:
        return section
    try:
        return dataclasses.replace(section, **changes)
    except WeakclipError as exc:
        raise WeakclipError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise WeakclipError(f"{source}: {' '.join(str(exc).split())}") from None


_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "1", "on")
_FALSE_WORDS = ("false", "no", "0", "off")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _split_sequence(value: str) -> list[str]:
    text = value.strip()
    if text[:1] in "[(" and text[-1:] in "])":
        text = text[1:-1]
    if not text.strip():
        return []
    return [part.strip().strip("'\"") for part in text.split(",")]


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML value) to the type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = WeakclipError(f"{key}: cannot use {value!r} as {_type_name(tp)}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str)
                                                      and value.strip().lower() in _NONE_WORDS)):
            return None
        errors = []
        for arm in arms:
            try:
                return coerce(value, arm, key)
            except WeakclipError as exc:
                errors.append(exc)
        raise errors[-1] if len(arms) == 1 else bad
    if value is None:
        raise WeakclipError(f"{key}: a value is required (got none), expected {_type_name(tp)}")
    if origin is Literal:
        choices = args
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:
                if str(c).lower() == value.strip().lower():
                    return c
        raise WeakclipError(f"{key}: {value!r} is not one of {', '.join(str(c) for c in choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise WeakclipError(f"{key}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    f = float(text)  # "2e4"
                except ValueError:
                    raise WeakclipError(f"{key}: {value!r} is not an integer") from None
                if f.is_integer():
                    return int(f)
        raise WeakclipError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise WeakclipError(f"{key}: {value!r} is not a number") from None
        raise WeakclipError(f"{key}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad
    if origin in (tuple, list) or tp in (tuple, list):
        items = _split_sequence(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise WeakclipError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        elem = args[0] if args else Any
        converted = [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if (origin is tuple or tp is tuple) else converted
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise WeakclipError(f"{key}: is a section, set its fields ({key}.<field>=...)")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception:  # noqa: BLE001 - any failure of the constructor is a bad value
            raise bad from None
    return value
