"""Calibration + planning, one-shot or sequential (llm-compressor's layer pipeline), in memory or offloaded.

One-shot (default): calibrate the unpruned model once; every layer is planned from those statistics.

Sequential: walk the sparse layers in forward order; layer ``l`` is planned from statistics measured on the model
whose layers ``< l`` are already pruned, so later layers are planned on the hidden states they will actually see
(after the earlier reductions), as llm-compressor's sequential pipeline does for quantization/pruning. Costs one
calibration pass per sparse layer. Details:

* the per-layer expert counts are decided ONCE, by the method's :meth:`~uncurl_hf.methods.base.PruningMethod.allocate`
  on the statistics of the unpruned model (adaptive methods split a total across layers; re-splitting after each
  layer would let the total drift), then each layer gets its own fresh statistics for *which* experts to keep/merge;
* layer ``l``'s plan indexes the original experts of layer ``l`` (earlier layers never change later layers'
  experts), so the union of the per-layer plans applied to the original model equals the sequentially pruned model:
  the written plan is an ordinary :class:`~uncurl_hf.plan.PruningPlan` (``metadata["sequential"] = True``);
* the intermediate models are built with :func:`uncurl_hf.surgery.apply.apply_plan` from the original model and the plans
  so far (every later layer kept whole), with the run's capacity scaling;
* the family's sparse-layer order must be the forward order (true for Switch: encoder then decoder, and for
  decoder-only stacks).

With an :class:`~uncurl_hf.calibration.offload.OffloadedModel`, planning holds the block of the layer being planned in memory
(merging methods read its expert weights); sequential mode needs the pruned intermediate models in memory, so it is
not available offloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.surgery.apply import apply_plan
from uncurl_hf.calibration.run import Batch, CalibrationStats, calibrate, check_coverage
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.methods.base import PruningMethod, make_plan
from uncurl_hf.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from uncurl_hf.recipe import PruningConfig
    from uncurl_hf.calibration.offload import OffloadedModel

logger = logging.getLogger(__name__)


@dataclass
class PlanningResult:
    """A plan, the statistics each layer was planned from, and the per-layer counts the method chose."""

    plan: PruningPlan
    stats: CalibrationStats
    budget: dict[str, int]
    initial_stats: CalibrationStats  # of the unpruned model (== stats in one-shot mode)
    calibration_passes: int = 1


def calibrate_and_plan(
    model: nn.Module,
    family: MoEFamily,
    method: PruningMethod,
    batches: Sequence[Batch],
    budget: Mapping[str, int],
    config: "PruningConfig",
    *,
    sequential: bool = False,
    offloaded: "OffloadedModel | None" = None,
    scale_expert_capacity: bool = True,
    progress: bool = True,
    initial_stats: CalibrationStats | None = None,
) -> PlanningResult:
    """Calibrate ``model`` on ``batches`` and plan every sparse layer with ``method`` (one-shot or sequential).

    ``budget`` is the factor's per-layer count; the method's ``allocate`` may re-split it (adaptive methods).
    ``initial_stats``: statistics of ``model`` on ``batches`` already measured (saves the first calibration pass,
    e.g. when a benchmark compares several methods).
    """
    if sequential and offloaded is not None:
        raise UncurlError(
            "--sequential needs each intermediate (partly pruned) model in memory, so it cannot run with --offload; "
            "drop one of the two."
        )
    stats = initial_stats if initial_stats is not None else _calibrate(model, family, batches, config, progress)
    if method.needs_calibration:
        check_coverage(stats)
    budget = method.allocate(stats, budget, config)
    logger.info("planning with %s%s (budget %s)", method.name, " sequentially" if sequential else "", budget)
    if not sequential and offloaded is None:
        return PlanningResult(method(stats, model, family, budget, config), stats, budget, stats)
    if type(method).__call__ is not PruningMethod.__call__:
        raise UncurlError(
            f"Method {method.name!r} plans all layers jointly, so it cannot plan layer by layer as "
            f"{'--sequential' if sequential else '--offload'} does; drop that option for this method."
        )
    if sequential:
        return _plan_sequentially(model, family, method, batches, stats, budget, config, scale_expert_capacity,
                                  progress)
    layers = [
        _plan_layer(method, layer.name, stats, model, family, budget, config, offloaded)
        for layer in family.sparse_layers(model)
    ]
    return PlanningResult(make_plan(model, family, method.name, layers, config), stats, budget, stats)


def _calibrate(model: nn.Module, family: MoEFamily, batches: Sequence[Batch], config: Any, progress: bool
               ) -> CalibrationStats:
    return calibrate(model, family, batches, config.max_logit_samples, config.seed, progress=progress)


def _plan_layer(
    method: PruningMethod,
    name: str,
    stats: CalibrationStats,
    model: nn.Module,
    family: MoEFamily,
    budget: Mapping[str, int],
    config: Any,
    offloaded: "OffloadedModel | None" = None,
) -> LayerPlan:
    layer = next(layer for layer in family.sparse_layers(model) if layer.name == name)
    holding = offloaded.materialized(layer.prefix) if offloaded is not None else nullcontext()
    with holding:
        return method.plan_layer(name, layer.num_experts, stats.get(name), budget[name], model, family, config)


def _plan_sequentially(
    model: nn.Module,
    family: MoEFamily,
    method: PruningMethod,
    batches: Sequence[Batch],
    initial: CalibrationStats,
    budget: dict[str, int],
    config: Any,
    scale_expert_capacity: bool,
    progress: bool,
) -> PlanningResult:
    if type(method).__call__ is not PruningMethod.__call__:
        raise UncurlError(f"Method {method.name!r} plans all layers jointly; it has no sequential mode.")
    layers = family.sparse_layers(model)
    planned: list[LayerPlan] = []
    planned_from = {}
    current, stats, passes = model, initial, 1
    for index, layer in enumerate(tqdm(layers, desc="sequential", unit="layer", disable=not progress)):
        if index > 0:
            current = apply_plan(
                model, family, _partial_plan(model, family, method, planned, config),
                scale_expert_capacity=scale_expert_capacity,
            )
            stats = _calibrate(current, family, batches, config, progress=False)
            passes += 1
        planned_from[layer.name] = stats[layer.name]
        planned.append(_plan_layer(method, layer.name, stats, current, family, budget, config))
        logger.info("sequential: %s -> %d experts", layer.name, planned[-1].num_output_experts)
    plan = make_plan(model, family, method.name, planned, config)
    plan.metadata["sequential"] = True
    result_stats = CalibrationStats(planned_from, num_sequences=initial.num_sequences)
    return PlanningResult(plan, result_stats, budget, initial, passes)


def _partial_plan(
    model: nn.Module, family: MoEFamily, method: PruningMethod, planned: list[LayerPlan], config: Any
) -> PruningPlan:
    """The layers planned so far, every other layer kept whole (identity groups)."""
    done = {layer.name: layer for layer in planned}
    layers = [
        done.get(layer.name) or LayerPlan.keep(layer.name, layer.num_experts, list(range(layer.num_experts)))
        for layer in family.sparse_layers(model)
    ]
    return make_plan(model, family, method.name, layers, replace(config))
