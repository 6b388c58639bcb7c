"""CLI flags generated from the settings dataclasses, so a flag cannot drift from the field it sets.

Every field of :class:`~uncurl_hf.recipe.PruneRecipe`, :class:`~uncurl_hf.recipe.CalibrationSpec` and
:class:`~uncurl_hf.options.RunOptions` declared with flags (:func:`uncurl_hf.settings.setting`) becomes one argparse
flag whose destination names the field (``CalibrationSpec.num_examples``) and whose default is "not given", so
:func:`given` returns only what the user typed: those values override a ``--recipe`` file field by field.
Values whose errors should read like the rest of uncurl-hf's (factor, counts) are parsed after argparse, into
:class:`~uncurl_hf.errors.UncurlError` subclasses.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

from uncurl_hf.errors import InvalidFactorError, UncurlError


def parse_factor(text: str) -> float:
    """``--factor`` as a float; a typo is an ``InvalidFactorError`` like the rest of the factor checks."""
    try:
        return float(text)
    except ValueError:
        raise InvalidFactorError(
            f"--factor expects a number > 1 (2 keeps half of the experts of every layer), got {text!r}."
        ) from None


def parse_counts(text: str) -> list[int] | dict[str, int]:
    """``--num-experts-per-layer``: ``4,4,2,2`` (one count per sparse layer, in order) or ``LAYER=K,...``."""
    items = [item.strip() for item in text.split(",")]
    named = ["=" in item for item in items]
    try:
        if all(named):
            return {name.strip(): int(k) for name, k in (item.split("=", 1) for item in items)}
        if not any(named):
            return [int(item) for item in items]
    except ValueError:
        pass
    raise InvalidFactorError(
        f"--num-experts-per-layer expects integers, one per sparse layer in order (e.g. 4,4,2,2) or "
        f"LAYER=K pairs (e.g. encoder.block.1=4,decoder.block.3=2), got {text!r}."
    )


def parse_number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UncurlError(f"{flag} expects a number, got {text!r}.") from None


def parse_int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UncurlError(f"{flag} expects an integer, got {text!r}.") from None


def method_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (numbers, true/false, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# fields whose text is parsed after argparse (UncurlError messages instead of argparse's usage errors)
_PARSERS: dict[str, Callable[[str], Any]] = {"factor": parse_factor, "num_experts_per_layer": parse_counts}


def _converter(name: str, tp: Any, flag: str) -> Callable[[str], Any]:
    if name in _PARSERS:
        return _PARSERS[name]
    options = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) is not None else [tp]
    base = options[0] if len(options) == 1 else str
    if base is int:
        return lambda text: parse_int(text, flag)
    if base is float:
        return lambda text: parse_number(text, flag)
    return str


def add_settings(parser: argparse.ArgumentParser | Any, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` that declares flags (``only``: just these fields); ``dest`` is
    ``ClassName.field``, unset when not given."""
    for f in fields(cls):
        flags = f.metadata.get("flags")
        if not flags or (only is not None and f.name not in only):
            continue
        kwargs: dict[str, Any] = {"help": f.metadata["help"], **f.metadata["argparse"]}
        kwargs["dest"] = f"{cls.__name__}.{f.name}"
        kwargs["default"] = argparse.SUPPRESS
        if kwargs.get("action") not in ("store_true", "store_false"):
            kwargs.setdefault("metavar", f.name.upper() if "choices" not in kwargs else None)
            if "choices" not in kwargs:
                kwargs["dest"] = f"{cls.__name__}.{f.name}:raw"  # converted by given()
        parser.add_argument(*flags, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line, converted to the field types."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        owner, _, name = key.partition(".")
        if owner != cls.__name__:
            continue
        name, _, raw = name.partition(":")
        if raw:
            flag = next(f.metadata["flags"][0] for f in fields(cls) if f.name == name)
            value = _converter(name, hints[name], flag)(value)
        values[name] = value
    return values


def flags_of(cls: type) -> dict[str, tuple[str, ...]]:
    """``{field: flags}`` of ``cls`` (the fields a test checks against the parser)."""
    return {f.name: tuple(f.metadata.get("flags") or ()) for f in fields(cls)}
