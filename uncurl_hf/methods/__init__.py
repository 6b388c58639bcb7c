"""Registry of pruning methods. A new method is one module defining a :class:`PruningMethod` subclass decorated
with :func:`register_method`, plus one import line at the bottom of this file."""

from __future__ import annotations

from typing import TypeVar

from uncurl_hf.errors import UnknownMethodError
from uncurl_hf.methods.base import PruningMethod, make_plan

_METHODS: dict[str, PruningMethod] = {}

M = TypeVar("M", bound=type[PruningMethod])


def register_method(cls: M) -> M:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name``."""
    _METHODS[cls.name] = cls()
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> PruningMethod:
    """The method called ``name``, or :class:`UnknownMethodError` listing the registered ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"Unknown pruning method {name!r}. Available methods: {', '.join(available_methods())} "
            "(`uncurl methods` describes them)."
        ) from None


from uncurl_hf.methods import ean as _ean  # noqa: E402,F401
from uncurl_hf.methods import frequency as _frequency  # noqa: E402,F401
from uncurl_hf.methods import hcsmoe as _hcsmoe  # noqa: E402,F401
from uncurl_hf.methods import msmoe as _msmoe  # noqa: E402,F401
from uncurl_hf.methods import naee as _naee  # noqa: E402,F401
from uncurl_hf.methods import random as _random  # noqa: E402,F401
from uncurl_hf.methods import reap as _reap  # noqa: E402,F401
from uncurl_hf.methods import uncurl as _uncurl  # noqa: E402,F401

__all__ = ["PruningMethod", "available_methods", "get_method", "make_plan", "register_method"]
