"""The one config loader: typed dataclasses filled from TOML tables and from ``--set path=value`` strings.

Every sparselm config (training: ``sparselm.config``; data pipeline: ``sparselm.pipeline.config``) is a tree of
dataclasses. This module fills and checks them with one rule per annotation and one error format, so a value
means the same in either config and in either place (a TOML file or ``--set``).

A value must already have its field's type; nothing is guessed from a string:

- ``bool``: true or false (not "yes", 1 or "true").  ``int``: an integer (an integral float such as 5e6 is accepted).
  ``float``: any number.  ``str``: a string.  ``Literal["a", "b"]``: one of the listed strings.
- ``list[X]``: an array of X (a lone X is an array of one).  ``dict[str, X]``: a table of X.
  A ``TypedDict``: a table with some of its keys.  A dataclass: a table of its fields.  ``X | None``: X.

``--set PATH=VALUE`` reads VALUE as a TOML value (``1e-3``, ``true``, ``"text"``, ``["a", "b"]``, ``{max = 3}``), so an
override means what the same text means in a file. Text that is not a TOML value is taken as an unquoted string,
and for a string (or choice) field the text is always the string, quotes optional: ``--set data.path=runs/x`` and
``--set model.norm=layernorm`` need no quotes, ``--set train.compile=yes`` is an error (write true). PATH is dotted:
``section.field``; an array of tables whose entries have a ``name`` is indexed by name (``source.c4.weight``); a
table of tables by key (``filters.word_count.max``, the entry is created if absent).

Unknown sections and keys are errors that suggest the closest known name. Every error is a ``ConfigError`` with one
line naming the field, e.g. ``train.max_steps: expected an integer, got 'ten'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from sparselm.errors import ConfigError

NAME_KEY = "toml"  # dataclasses.field(metadata={"toml": "source"}): the field's name in TOML, if not its own


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file, or a ConfigError for a missing, unreadable or invalid one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def choices(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` annotation (how PRECISIONS, FORMATS... are derived: one list each)."""
    if typing.get_origin(annotation) is not Literal:
        raise TypeError(f"{annotation!r} is not a Literal")
    return typing.get_args(annotation)


def fill(target: Any, table: Any, where: str = "") -> Any:
    """Set the fields of dataclass ``target`` from a TOML table; a nested section is filled in place."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of key = value pairs, got {table!r}")
    fields = _fields(type(target))
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(_unknown(where, key, fields))
        attr, annotation = fields[key]
        current = getattr(target, attr)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            fill(current, value, _join(where, key))
        else:
            setattr(target, attr, coerce(value, annotation, _join(where, key)))
    return target


def apply_overrides(root: Any, overrides: list[str]) -> Any:
    """Apply ``path.to.field=value`` strings (``--set``) to the dataclass tree ``root``, in order."""
    for item in overrides:
        dotted, sep, text = item.partition("=")
        path = [part.strip() for part in dotted.split(".")]
        if not sep or len(path) < 2 or not all(path):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _assign(root, type(root), path, text.strip(), "")
    return root


def check(target: Any, where: str = "") -> None:
    """Raise ConfigError if a field of ``target`` (recursively) does not hold its annotated type or choice: what the
    loader guarantees, re-checked for configs built or changed in code."""
    for key, (attr, annotation) in _fields(type(target)).items():
        coerce(getattr(target, attr), annotation, _join(where, key))


def parse_value(text: str, annotation: Any) -> Any:
    """A ``--set`` value: the TOML value ``text`` spells, or ``text`` itself (see the module docstring)."""
    if _is_text(annotation) and not text.startswith(('"', "'")):
        return text
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if len(parsed) == 1 else text


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the type ``annotation`` declares, or a ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only X | None is supported
        return coerce(value, inner, where)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected an array of tables (write [[{where}]] for each), got {value!r}")
        elif not isinstance(value, list):
            value = [value]
        return [coerce(v, item, _item_where(where, i, v)) for i, v in enumerate(value)]
    if origin is dict:
        _, item = args
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {key: coerce(v, item, _join(where, key)) for key, v in value.items()}
    if typing.is_typeddict(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        hints = typing.get_type_hints(annotation)
        for key in value:
            if key not in hints:
                raise ConfigError(_unknown(where, key, hints))
        return {key: coerce(v, hints[key], _join(where, key)) for key, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            check(value, where)
            return value
        return fill(annotation(), value, where)
    raise TypeError(f"{where}: the config loader does not support fields of type {annotation!r}")


# ---- internals -----------------------------------------------------------------------------------------------------


@functools.cache
def _fields(cls: type) -> dict[str, tuple[str, Any]]:
    """TOML name -> (attribute name, resolved annotation) for every field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.metadata.get(NAME_KEY, f.name): (f.name, hints[f.name]) for f in dataclasses.fields(cls)}


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _item_where(where: str, index: int, item: Any) -> str:
    """``source.c4`` for an entry named c4 (how --set addresses it), else ``source[0]``."""
    name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
    return f"{where}.{name}" if isinstance(name, str) and name else f"{where}[{index}]"


def _unknown(where: str, key: str, known: typing.Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    if not where:
        hint = f"did you mean [{close[0]}]?" if close else f"known: {', '.join(known)}"
        return f"unknown config section [{key}] ({hint})"
    hint = f"did you mean {_join(where, close[0])}?" if close else f"known: {', '.join(known)}"
    return f"unknown config key {_join(where, key)} ({hint})"


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        return all(_is_text(a) for a in args if a is not type(None))
    return False


def _assign(holder: Any, annotation: Any, path: list[str], text: str, where: str) -> None:
    """Set the value at ``path`` inside ``holder`` (of type ``annotation``) from the ``--set`` text."""
    key, rest = path[0], path[1:]
    here = _join(where, key)
    if dataclasses.is_dataclass(holder):
        fields = _fields(type(holder))
        if key not in fields:
            raise ConfigError(_unknown(where, key, fields))
        attr, child_annotation = fields[key]
        if rest:
            _assign(getattr(holder, attr), child_annotation, rest, text, here)
        else:
            setattr(holder, attr, coerce(parse_value(text, child_annotation), child_annotation, here))
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        names = [getattr(entry, "name", "") for entry in holder]
        if key not in names:
            raise ConfigError(f"{here}: no [[{where}]] named {key!r} (names: {', '.join(map(str, names)) or 'none'})")
        if not rest:
            raise ConfigError(f"--set {here}=...: expected {here}.FIELD=value (one field of the entry)")
        _assign(holder[names.index(key)], args[0], rest, text, here)
        return
    if origin is dict or typing.is_typeddict(annotation):
        if origin is dict:
            child_annotation = args[1]
        else:
            hints = typing.get_type_hints(annotation)
            if key not in hints:
                raise ConfigError(_unknown(where, key, hints))
            child_annotation = hints[key]
        if rest:
            if key not in holder:
                holder[key] = coerce({}, child_annotation, here)
            _assign(holder[key], child_annotation, rest, text, here)
        else:
            holder[key] = coerce(parse_value(text, child_annotation), child_annotation, here)
        return
    raise ConfigError(f"unknown config key {here} ({where} is a single value, not a table)")
