"""Registry of supported MoE families: ``get_family(config_or_model)`` picks the adapter for a checkpoint."""

from __future__ import annotations

from typing import Any, TypeVar

from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families.base import DiskLayer, MoEFamily, MoELayer, ReducedLayer, TensorReader, model_type_of

_FAMILIES: dict[str, MoEFamily] = {}

F = TypeVar("F", bound=type[MoEFamily])


def register_family(cls: F) -> F:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name``."""
    _FAMILIES[cls.name] = cls()
    return cls


def available_families() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_FAMILIES)


def family_by_name(name: str) -> MoEFamily:
    """The registered family called ``name`` (``UnsupportedModelError`` naming the choices otherwise)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"Unknown model family {name!r}. Supported families: {_describe_supported()}."
        ) from None


def get_family(config_or_model: Any) -> MoEFamily:
    """The family adapter of a config, model, ``config.json`` dict or checkpoint folder.

    Raises :class:`UnsupportedModelError` naming the supported families when nothing matches (e.g. a dense
    T5 or BERT checkpoint).
    """
    for family in _FAMILIES.values():
        if family.matches(config_or_model):
            return family
    model_type = model_type_of(config_or_model)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a sparse mixture-of-experts architecture uncurl-hf can prune. "
        f"Supported families: {_describe_supported()}. Point uncurl at a checkpoint of one of these."
    )


def _describe_supported() -> str:
    return "; ".join(
        f"{name} (model_type {', '.join(_FAMILIES[name].model_types)})" for name in available_families()
    )


from uncurl_hf.families import switch_transformers as _switch_transformers  # noqa: E402,F401  (registers)
from uncurl_hf.families import mixtral as _mixtral  # noqa: E402,F401  (registers)
from uncurl_hf.families import qwen_moe as _qwen_moe  # noqa: E402,F401  (registers)
from uncurl_hf.families import olmoe as _olmoe  # noqa: E402,F401  (registers)
from uncurl_hf.families import gpt_oss as _gpt_oss  # noqa: E402,F401  (registers)

__all__ = [
    "DiskLayer",
    "MoEFamily",
    "MoELayer",
    "ReducedLayer",
    "TensorReader",
    "available_families",
    "family_by_name",
    "get_family",
    "model_type_of",
    "register_family",
]
