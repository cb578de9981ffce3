"""Typed configs as data: build one from field values, replace fields by name, and carry it as JSON.

Every stage's settings are a frozen dataclass (IngestConfig, CaptionConfig, Stage1Config, ...) whose
`__post_init__` checks its values. A preset holds a typed partial config per stage (`field_values`:
{dotted field path: value of the field's type}, checked when the preset is built); a
`--set stage.field=value`, a flow's parameters file and the CLI's options replace fields of it by
name, and `build` / `replace_fields` make the config. A name is a field (`top_k`), a nested config
or a field of one found by its unique name (`num_captions` in a CaptionConfig is
`decoding.num_captions`; `decoding={...}` names several) or a dotted path (`decoding.seed`); from a
user also a command-line spelling of it (`top-k`), and an `Option` in the caller's table renames or
converts (`no-semantic-dedup` -> `dedup.semantic`, negated). An unknown name or a value of the wrong
type is a ConfigError naming the stage and the field. `to_json` / `from_json` carry a config to a
Ray job (flows/stage_job.py) and back, equal.

Imports nothing above the bottom floor, so any floor may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from capfilt.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """A name that is not the field's own: where its value goes, and how it is converted."""

    path: str  # dotted field path, e.g. "dedup.semantic"
    convert: Callable[[Any], Any] | None = None  # e.g. `negate` for --no-x flags of an x field


def negate(value: Any) -> bool:
    return not _to_bool(value, "flag")


SHAPE = "fields_of"  # field metadata: a dict field whose keys are the named dataclass's fields


def shaped(cls: type) -> dict:
    """A dict field holding `cls`'s field values by name (typed and checked like a nested config), for
    a config that is built later from them (e.g. a SelectConfig once its calibration is read)."""
    return dataclasses.field(default_factory=dict, metadata={SHAPE: cls})


# -- JSON -------------------------------------------------------------------------------------------

def to_data(obj: Any) -> Any:
    """A config as JSON-ready data: dataclasses as dicts of their fields, tuples as lists."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf": JSON has no infinity
    return obj


def from_data(cls: type, data: Mapping, where: str | None = None) -> Any:
    """`cls` from `to_data`'s output (its checks run again; errors start with `where`)."""
    return _assemble(cls, dict(data), where or cls.__name__)


def to_json(obj: Any) -> str:
    return json.dumps(to_data(obj), sort_keys=True)


def from_json(cls: type, text: str, where: str | None = None) -> Any:
    return from_data(cls, json.loads(text), where)


# -- build and replace --------------------------------------------------------------------------------

def at(where: str, message: object) -> str:
    """`message` prefixed with where it happened ("stage filter: ..."); a command run by hand, whose
    options are its own, says it without one (where = "")."""
    return f"{where}: {message}" if where else str(message)


def build(cls: type, values: Mapping[str, Any], where: str, options: Mapping[str, Option] | None = None):
    """`cls` from field values by name (see the module docstring); fields not named keep their default."""
    return _assemble(cls, _tree(cls, values, where, options or {}), where)


def replace_fields(config: Any, values: Mapping[str, Any], where: str, options: Mapping[str, Option] | None = None):
    """`config` with the named fields replaced (typed, checked again by its `__post_init__`).

    A field a config derives in `__post_init__` (a trainer's recipe rows) keeps its derived value:
    to change what it derives from (the recipe), `build` from the values instead, as flows do."""
    return _assemble(config, _tree(type(config), values, where, options or {}), where)


def field_names(cls: type, options: Mapping[str, Option] | None = None) -> list[str]:
    """Every name `build` accepts for `cls`: its fields, nested configs' unique fields, the options."""
    names = set(options or {})
    for path in _leaves(cls):
        names.add(path)
        names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def field_values(cls: type, values: Mapping[str, Any], where: str, options: Mapping[str, Option] | None = None,
                 cli: bool = True) -> dict[str, Any]:
    """A typed partial `cls`: {dotted field path: value of that field's type} from values by name, each
    name found in `cls` and each value checked against its field's type; a nested config given as a
    mapping of its fields is checked field by field. Merge two with `{**a, **b}` (the later wins field
    by field) and `build` a `cls` from the result. `cli=False` takes only the fields' own names (a
    preset's, in Python spelling): no `top-k`, no `--no-x`, no entry of `options`."""
    out: dict[str, Any] = {}
    for name, path, value in _resolved(cls, values, where, options or {}, cli):
        hint, sub = _field_at(cls, path)
        if sub is not None and isinstance(value, Mapping):
            out |= {f"{path}.{p}": v for p, v in field_values(sub, value, where, cli=cli).items()}
        else:
            out[path] = _coerce(value, hint, path.rsplit(".", 1)[-1], where, cli)
    return out


def _tree(cls: type, values: Mapping[str, Any], where: str, options: Mapping[str, Option]) -> dict:
    """{"a.b": 1, "c": 2} by resolved path -> {"a": {"b": 1}, "c": 2}."""
    tree: dict = {}
    for _, path, value in _resolved(cls, values, where, options, cli=True):
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _resolved(cls: type, values: Mapping[str, Any], where: str, options: Mapping[str, Option], cli: bool):
    """(name, dotted field path, value) of each named value, an option's conversion applied."""
    for name, value in values.items():
        if not cli:
            yield name, _resolve(cls, str(name), name, where, {}, cli), value
            continue
        key = str(name).replace("-", "_").lstrip("_")
        option = options.get(key)
        if option is not None:
            path = option.path
            if option.convert is not None:
                try:
                    value = option.convert(value)
                except ConfigError as exc:
                    raise ConfigError(at(where, f"{exc}")) from None
                except (TypeError, ValueError) as exc:
                    raise ConfigError(at(where, f"{name}={value!r}: {exc}")) from None
        elif key.startswith("no_") and _is_flag(cls, key[3:]):  # --no-augment: augment, negated
            path, value = _resolve(cls, key[3:], name, where, options), negate(value)
        else:
            path = _resolve(cls, key, name, where, options)
        yield name, path, value


def _resolve(cls: type, key: str, name: str, where: str, options: Mapping[str, Option], cli: bool = True) -> str:
    paths = _leaves(cls, nodes=True)
    if key in paths:
        return key
    matches = [path for path in paths if path.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(at(where, f"{name!r} is ambiguous; name one of {', '.join(matches)}."))
    spell = (lambda n: n.replace("_", "-")) if cli else (lambda n: n)
    names = [spell(n) for n in field_names(cls, options) if "." not in n]
    close = difflib.get_close_matches(spell(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(at(where, f"unknown field {name!r}{hint}; known fields: {', '.join(names)}."))


def _is_flag(cls: type, key: str) -> bool:
    """`key` names exactly one true/false field of `cls` (or of a config nested in it)."""
    matches = [path for path in _leaves(cls) if path == key or path.rsplit(".", 1)[-1] == key]
    return len(matches) == 1 and _field_at(cls, matches[0])[0] is bool


def _field_at(cls: type, path: str) -> tuple[Any, type | None]:
    """The type hint of the field at a dotted path, and the config class it holds (or whose fields a
    shaped dict holds), else None."""
    *parents, leaf = path.split(".")
    for part in parents:
        cls = _nested(cls, part)
    return _hints(cls)[leaf], _nested(cls, leaf)


def _nested(cls: type, name: str) -> type | None:
    f = next(f for f in fields(cls) if f.name == name)
    return _config_type(_hints(cls)[name]) or f.metadata.get(SHAPE)


def _leaves(cls: type, prefix: str = "", nodes: bool = False) -> list[str]:
    """Dotted paths of every non-config field, nested configs (and shaped dicts) walked into; with
    `nodes` the nested configs' own paths too."""
    out = []
    for f in fields(cls):
        sub = _nested(cls, f.name)
        if sub is not None:
            out += [prefix + f.name] if nodes else []
            out += _leaves(sub, f"{prefix}{f.name}.", nodes)
        else:
            out.append(prefix + f.name)
    return out


def _assemble(base: Any, tree: dict, where: str) -> Any:
    """Instantiate `base` (a class, or an instance whose values are the starting point) from `tree`."""
    cls = base if isinstance(base, type) else type(base)
    hints = _hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    current = {} if isinstance(base, type) else {f.name: getattr(base, f.name) for f in fields(cls) if f.init}
    for name, value in tree.items():
        if name not in by_name:
            raise ConfigError(at(where, f"unknown field {name!r} of {cls.__name__}."))
        sub = _config_type(hints[name])
        shape = by_name[name].metadata.get(SHAPE)
        if sub is not None and isinstance(value, dict):
            start = current.get(name)
            current[name] = _assemble(start if start is not None else sub, value, where)
        elif shape is not None and isinstance(value, dict):
            kept = dict(current.get(name) or {})
            shape_hints = _hints(shape)
            for key, item in value.items():
                if key not in shape_hints:
                    raise ConfigError(at(where, f"unknown field {key!r} of {shape.__name__}."))
                kept[key] = _coerce(item, shape_hints[key], key, where)
            current[name] = kept
        else:
            current[name] = _coerce(value, hints[name], name, where)
    missing = []
    for f in fields(cls):
        if f.init and f.name not in current and f.default is MISSING and f.default_factory is MISSING:
            sub = _config_type(hints[f.name])
            if sub is None:
                missing.append(f.name.replace("_", "-"))
            else:  # a nested config nobody named: its own required fields are what is missing
                current[f.name] = _assemble(sub, {}, where)
    if missing:
        raise ConfigError(at(where, f"missing {', '.join(missing)}: a required field with no default."))
    try:
        return cls(**current)
    except ConfigError as exc:
        raise ConfigError(at(where, f"{exc}")) from None


# -- types ----------------------------------------------------------------------------------------------

_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _config_type(hint: Any) -> type | None:
    """The dataclass a field holds (also when Optional), else None."""
    for arg in _union_args(hint):
        if isinstance(arg, type) and is_dataclass(arg):
            return arg
    return None


def _union_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint: Any, name: str, where: str, cli: bool = True) -> Any:
    """`value` as the field's type; strings (a `--set` value JSON could not read) are parsed."""
    try:
        return _convert(value, hint)
    except (TypeError, ValueError) as exc:
        label = name.replace("_", "-") if cli else name
        raise ConfigError(at(where, f"{label}={value!r} is not {_describe(hint)} ({exc}).")) from None


def _convert(value: Any, hint: Any) -> Any:
    if hint is Any or hint is object:
        return value
    args = _union_args(hint)
    if len(args) > 1:  # Optional[X] / X | Y: None (JSON null; the text "none" may be a value), or the first type that takes it
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        item_types = typing.get_args(hint)
        if len(item_types) == 2 and item_types[1] is Ellipsis:
            return tuple(_convert(v, item_types[0]) for v in items)
        if item_types and len(items) != len(item_types):
            raise ValueError(f"expected {len(item_types)} values, got {len(items)}")
        return tuple(_convert(v, t) for v, t in zip(items, item_types)) if item_types else tuple(items)
    if origin in (list, dict) or hint in (list, dict):
        want = origin or hint
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, want):
            raise TypeError(f"expected a {want.__name__}, got {type(value).__name__}")
        return value
    if hint is bool:
        return _to_bool(value, "value")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise TypeError("expected a number, got a boolean")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise TypeError(f"expected text, got {type(value).__name__}")
        return str(value)  # --set caption.prompt=123: JSON read a number
    if isinstance(hint, type) and is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_data(hint, value)
        raise TypeError(f"expected a {hint.__name__}")
    return value


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    args = [a for a in _union_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in names:
        return names[args[0]] + (" or null" if len(args) < len(_union_args(hint)) else "")
    return f"a {getattr(hint, '__name__', str(hint))}"
