"""The one planning step: calibration statistics + a per-layer budget + a method -> a validated plan.

``prune``, ``--sequential``, ``uncurl sweep`` and the ``--max-drop`` search all plan through :func:`plan_model`, so
what a plan is made of (the method's allocation of the budget across layers, its per-layer decisions, the checks
that it fits the model) is written once:

1. ``budget`` is the per-layer count the recipe asks for (a factor's ``floor(E / factor)``, explicit counts, or a
   search's candidate); the method's :meth:`~uncurl_hf.methods.base.PruningMethod.allocate` may re-split its total
   across layers (adaptive methods);
2. the method plans every sparse layer: in one go (joint methods), one layer at a time with only that layer's block
   in memory (offloaded calibration), or sequentially on partly pruned models (:mod:`uncurl_hf.pipeline.sequential`);
3. the plan is validated against the model's layers and the allocated counts.

:func:`calibrate_and_plan` is calibration followed by that step, for callers that start from batches.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from uncurl_hf.calibration.run import Batch, calibrate
from uncurl_hf.calibration.stats import CalibrationStats, check_coverage
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.io.checks import check_stats_finite
from uncurl_hf.io.memory import trim_heap
from uncurl_hf.methods.base import PruningMethod, make_plan
from uncurl_hf.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from uncurl_hf.calibration.offload import OffloadedModel
    from uncurl_hf.recipe import PruneRecipe

logger = logging.getLogger(__name__)


@dataclass
class PlanningResult:
    """A plan, the statistics each layer was planned from, and the per-layer counts the method chose."""

    plan: PruningPlan
    stats: CalibrationStats
    budget: dict[str, int]
    initial_stats: CalibrationStats  # of the unpruned model (== stats in one-shot mode)
    calibration_passes: int = 1


def plan_model(
    model: nn.Module,
    family: MoEFamily,
    method: PruningMethod,
    stats: CalibrationStats,
    budget: Mapping[str, int],
    recipe: "PruneRecipe",
    *,
    sequential: bool = False,
    batches: Sequence[Batch] = (),
    offloaded: "OffloadedModel | None" = None,
    progress: bool = False,
) -> PlanningResult:
    """Allocate ``budget`` with ``method``, plan every sparse layer of ``model`` and validate the plan.

    ``stats`` are the statistics of the unpruned model; ``sequential`` re-calibrates on ``batches`` before each
    layer (one pass per sparse layer); ``offloaded`` holds one block in memory while its layer is planned.
    """
    if sequential and offloaded is not None:
        raise UncurlError(
            "--sequential needs each intermediate (partly pruned) model in memory, so it cannot run with --offload; "
            "drop one of the two."
        )
    if method.needs_calibration:
        check_stats_finite(stats)  # overflowing activations: one error naming the layer, not garbage plans
        check_coverage(stats)
    allocated = method.allocate(stats, budget, recipe)
    logger.info("planning with %s%s (budget %s)", method.name, " sequentially" if sequential else "", allocated)
    if (sequential or offloaded is not None) and type(method).__call__ is not PruningMethod.__call__:
        raise UncurlError(
            f"Method {method.name!r} plans all layers jointly, so it cannot plan layer by layer as "
            f"{'--sequential' if sequential else '--offload'} does; drop that option for this method."
        )
    if sequential:
        from uncurl_hf.pipeline.sequential import plan_sequentially

        result = plan_sequentially(model, family, method, batches, stats, allocated, recipe, progress)
    elif offloaded is not None:
        layers = [
            plan_layer(method, layer.name, stats, model, family, allocated, recipe, offloaded)
            for layer in family.sparse_layers(model)
        ]
        result = PlanningResult(make_plan(model, family, method.name, layers, recipe), stats, allocated, stats)
    else:
        result = PlanningResult(method(stats, model, family, allocated, recipe), stats, allocated, stats)
    result.plan.validate(family.layer_sizes(model), result.budget)
    trim_heap()  # a merging method's scratch (features, similarities, repair products) before the surgery
    return result


def calibrate_and_plan(
    model: nn.Module,
    family: MoEFamily,
    method: PruningMethod,
    batches: Sequence[Batch],
    budget: Mapping[str, int],
    recipe: "PruneRecipe",
    *,
    sequential: bool = False,
    offloaded: "OffloadedModel | None" = None,
    progress: bool = True,
    initial_stats: CalibrationStats | None = None,
) -> PlanningResult:
    """Calibrate ``model`` on ``batches`` (unless ``initial_stats`` are given), then :func:`plan_model`."""
    stats = initial_stats if initial_stats is not None else calibrate_model(model, family, batches, recipe, progress)
    return plan_model(model, family, method, stats, budget, recipe, sequential=sequential, batches=batches,
                      offloaded=offloaded, progress=progress)


def calibrate_model(
    model: nn.Module, family: MoEFamily, batches: Sequence[Batch], recipe: "PruneRecipe", progress: bool,
    only: Collection[str] | None = None,
) -> CalibrationStats:
    """One calibration pass with the recipe's sample bound and seed (of the layers ``only`` names, default all)."""
    spec = recipe.calibration
    return calibrate(model, family, batches, spec.max_logit_samples, spec.seed, progress=progress, only=only)


def plan_layer(
    method: PruningMethod,
    name: str,
    stats: CalibrationStats,
    model: nn.Module,
    family: MoEFamily,
    budget: Mapping[str, int],
    recipe: Any,
    offloaded: "OffloadedModel | None" = None,
) -> LayerPlan:
    """The method's plan of one layer (with the layer's block materialized when the model is offloaded)."""
    layer = next(layer for layer in family.sparse_layers(model) if layer.name == name)
    holding = offloaded.materialized(layer.prefix) if offloaded is not None else nullcontext()
    with holding:
        return method.plan_layer(name, layer.num_experts, stats.get(name), budget[name], model, family, recipe)
