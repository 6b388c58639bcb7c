"""Declaring a setting once: a dataclass field carries its default, type, help and CLI flag.

The recipe (:mod:`uncurl_hf.recipe`), the run options (:mod:`uncurl_hf.options`), every method's ``Options`` and the
sweep/study configs are dataclasses whose fields are made with :func:`setting`. From that one declaration:

* :func:`from_mapping` builds the dataclass from a dict (a YAML file, ``--method-arg`` pairs), checking every key
  and every value's type, so a typo is one readable error naming the valid keys;
* :func:`to_mapping` writes it back (YAML-safe values only), so ``load(save(x)) == x``;
* :mod:`uncurl_hf.cli.arguments` adds one argparse flag per field, so flags cannot drift from the fields.

This module knows nothing about pruning; it is the small reflection layer the settings share.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from uncurl_hf.errors import UncurlError

T = TypeVar("T")


def setting(
    default: Any = MISSING,
    *flags: str,
    help: str,
    default_factory: Any = MISSING,
    yaml: bool = True,
    **argparse: Any,
) -> Any:
    """A dataclass field with its CLI ``flags`` (none: not on the command line), ``help`` and argparse extras
    (``action``, ``metavar``, ``choices``, ``type``...). ``yaml=False``: Python-only (never written to a file)."""
    metadata = {"flags": tuple(flags), "help": help, "argparse": argparse, "yaml": yaml}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def settings_of(cls: type) -> list[Field]:
    """The dataclass fields of ``cls`` in declaration order."""
    return list(fields(cls))


_NAMES = {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list", type(None): "null"}


def type_name(tp: Any) -> str:
    """How a message names a type: ``"a number or null"``, ``"one of 'weighted', 'anchor'"``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    base = origin or tp
    return _NAMES.get(base, f"a {getattr(base, '__name__', str(base))}")


def check_value(tp: Any, value: Any) -> Any:
    """``value`` converted to ``tp`` where that is lossless (int -> float, list -> tuple), else ``TypeError``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return check_value(option, value)
            except TypeError:
                continue
        raise TypeError(type_name(tp))
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in get_args(tp)):
            return value
        raise TypeError(type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("str")
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError("mapping")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {check_value(key_tp, k): check_value(value_tp, v) for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError("list")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [check_value(item_tp, v) for v in value]
        return tuple(items) if (origin or tp) is tuple else items
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_mapping(tp, value)
        raise TypeError(tp.__name__)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError(tp.__name__)
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str | None = None) -> T:
    """``cls(**data)`` with every key known and every value of its field's type; errors name the valid keys."""
    where = where or cls.__name__
    data = dict(data or {})
    if not isinstance(data, dict):
        raise UncurlError(f"{where} must be a mapping of settings, got {type(data).__name__}.")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        listed = ", ".join(f"{name}={_default_text(f)}" for name, f in known.items()) or "(none)"
        raise UncurlError(f"{where} has no setting(s) {unknown}; its settings (with defaults) are: {listed}.")
    values: dict[str, Any] = {}
    for name, value in data.items():
        try:
            values[name] = check_value(hints[name], value)
        except TypeError:
            raise UncurlError(f"{where}: {name} must be {type_name(hints[name])}, got {value!r}.") from None
    return cls(**values)


def _default_text(f: Field) -> str:
    if f.default is not MISSING:
        return repr(f.default)
    if f.default_factory is not MISSING:
        return repr(f.default_factory())
    return "(required)"


def to_mapping(obj: Any) -> dict[str, Any]:
    """The YAML-safe dict of a settings dataclass (nested ones included; ``yaml=False`` fields left out)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        if not f.metadata.get("yaml", True):
            continue
        out[f.name] = _plain(getattr(obj, f.name))
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return to_mapping(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def replace_settings(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation (``__post_init__``) on a copy; the original is untouched."""
    return dataclasses.replace(obj, **changes)


__all__ = ["check_value", "from_mapping", "replace_settings", "setting", "settings_of", "to_mapping"]
