"""Output formats of a pruned model: ``pruned`` (custom ``pruned_<family>`` model type) or ``stock``.

A pruned layer may keep any number of experts, which an upstream config (``SwitchTransformersConfig``,
``MixtralConfig``, ...) cannot express (one ``num_experts`` / ``num_local_experts`` for every layer), hence the custom
model types. When every sparse layer keeps the same number ``k``, nothing custom is needed: the state-dict keys of
the pruned model are the upstream ones, so a plain ``SwitchTransformersConfig(num_experts=k)`` checkpoint loads in
stock transformers with no remote code — the most portable output (inference servers, older transformers, users who
cannot run ``trust_remote_code``). The decoder families write equal counts in the stock format by themselves.

Expert capacity: the pruned config has one capacity per layer (pruning raises it by ``E_old / E_new``); with equal
counts they are normally equal, and the stock config takes their maximum otherwise — a larger capacity never drops
a token the pruned model kept, and equals it exactly whenever no layer overflows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from uncurl_hf.errors import ExportError
from uncurl_hf.families.switch_transformers import DERIVED_CONFIG_KEYS

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("pruned", "stock")
# Config keys that belong to the pruned type (or are derived/set by transformers) and must not reach a stock config.
_NOT_STOCK_KEYS = DERIVED_CONFIG_KEYS + (
    "num_experts_per_encoder_layer",
    "num_experts_per_decoder_layer",
    "expert_capacity_per_encoder_layer",
    "expert_capacity_per_decoder_layer",
    "uncurl_base_model",
)


def check_export_format(export: str) -> str:
    """Return ``export`` if it is a known format, else raise :class:`ExportError` naming the choices."""
    if export not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {export!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    return export


def stock_config_name(family: Any | None) -> str:
    """How a refusal names the stock config of ``family`` (``MixtralConfig``), generically without a family."""
    if family is None:
        return "stock transformers config"
    getter = getattr(family, "stock_config_class", None)  # the decoder families
    if callable(getter):
        try:
            return getter().__name__
        except Exception:  # noqa: BLE001 - a model type this transformers does not know
            pass
    return "SwitchTransformersConfig" if family.name == "switch_transformers" else f"{family.name} config"


def uniform_count(counts: Mapping[str, int], family: Any | None = None) -> int:
    """The common expert count of all layers, or :class:`ExportError` explaining how to get one (naming the stock
    config of ``family`` when it is given)."""
    values = set(counts.values())
    if len(values) == 1:
        return values.pop()
    detail = ", ".join(f"{name}: {k}" for name, k in counts.items())
    raise ExportError(
        f"--export stock needs the same number of experts in every sparse layer, but this run keeps {detail}. "
        f"A {stock_config_name(family)} has a single expert count for all layers. Prune with --factor and "
        "--uniform (adaptive methods then keep floor(E / factor) experts everywhere) or equal per-layer counts, or "
        "keep the default --export pruned (loads with `import uncurl_hf` or trust_remote_code=True)."
    )


def refuse_expert_maps(mapped: bool) -> None:
    """:class:`ExportError` when the output is a logical merge (``mapped``: the ``"map"`` router rule): a stock config
    has one router row per expert and no expert map, so that checkpoint has no stock form."""
    if mapped:
        raise ExportError(
            "--export stock cannot hold a logical merge: router=map keeps every original router row plus an expert "
            "map, which a stock config has no field for. Keep the default --export pruned, or merge with another "
            "router rule (--method-arg router=weighted)."
        )


def stock_config(config: Any) -> Any:
    """A ``SwitchTransformersConfig`` equivalent to a ``PrunedSwitchTransformersConfig`` with equal counts."""
    from transformers import SwitchTransformersConfig

    if config.model_type == "switch_transformers":
        return config
    counts = config.experts_per_layer(False) + config.experts_per_layer(True)
    names = [f"layer {i}" for i in range(len(counts))]
    from uncurl_hf.families import family_by_name

    k = uniform_count(dict(zip(names, counts)), family_by_name("switch_transformers"))
    capacities = config.capacity_per_layer(False) + config.capacity_per_layer(True)
    capacity = max(capacities) if capacities else config.expert_capacity
    if len(set(capacities)) > 1:
        logger.warning("per-layer expert capacities %s differ; the stock config uses their maximum %d",
                       capacities, capacity)
    values = {key: value for key, value in config.to_dict().items() if key not in _NOT_STOCK_KEYS}
    values.update(num_experts=k, expert_capacity=capacity)
    return SwitchTransformersConfig(**values)


@torch.no_grad()
def to_stock(model: nn.Module) -> nn.Module:
    """The stock ``SwitchTransformersForConditionalGeneration`` computing exactly what ``model`` computes.

    Parameters are shared with ``model`` (no copy: a pruned model is about to be written and dropped, and copying
    would double peak memory). The result is checked on a dummy batch; a mismatch is a bug and raises
    :class:`ExportError` rather than writing a model that differs from the pruned one.
    """
    from transformers import SwitchTransformersForConditionalGeneration

    from uncurl_hf.families import get_family

    if not str(model.config.model_type).startswith("pruned_"):
        return model  # already stock: Switch itself, or a decoder family pruned to equal counts (written stock)
    if model.config.model_type != "pruned_switch_transformers" or not hasattr(model, "lm_head"):
        family_type = str(model.config.model_type)[len("pruned_"):]
        raise ExportError(
            f"--export stock cannot convert {type(model).__name__} ({model.config.model_type}): a {family_type} "
            "model pruned to equal counts is already written as a stock checkpoint, and unequal counts have no "
            f"stock {family_type} form. Prune to equal counts, or use --export pruned."
        )
    config = stock_config(model.config)
    with torch.device("meta"):
        stock = SwitchTransformersForConditionalGeneration(config)
    stock.load_state_dict(model.state_dict(), strict=True, assign=True)
    stock.tie_weights()
    stock.generation_config = model.generation_config
    stock.train(model.training)

    family = get_family(model)
    inputs = family.dummy_inputs(model)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    stock.eval()
    try:
        expected, actual = model(**inputs).logits, stock(**inputs).logits
    finally:
        model.train(was_training)
        stock.train(was_training)
    if not torch.equal(expected, actual):
        raise ExportError("The stock export does not reproduce the pruned model's outputs; please report this bug.")
    logger.info("stock export: switch_transformers with %d experts per layer", config.num_experts)
    return stock


__all__ = ["EXPORT_FORMATS", "check_export_format", "refuse_expert_maps", "stock_config", "stock_config_name",
           "to_stock", "uniform_count"]
