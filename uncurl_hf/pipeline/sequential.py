"""Sequential planning (llm-compressor's layer pipeline), the ``sequential`` branch of the one planning step
(:func:`uncurl_hf.pipeline.planning.plan_model`; one-shot planning calibrates the unpruned model once and plans every
layer from those statistics).

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
  so far (every later layer kept whole), with the run's capacity scaling; they share every unchanged tensor with the
  original (``only`` + ``share``), so an intermediate model costs its reduced layers, not a second copy of the model;
* the family's sparse-layer order must be the forward order (true for Switch: encoder then decoder, and for
  decoder-only stacks).

With an :class:`~uncurl_hf.calibration.offload.OffloadedModel`, planning holds the block of the layer being planned in memory
(merging methods read its expert weights); sequential mode needs the pruned intermediate models in memory, so it is
not available offloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.calibration.run import Batch
from uncurl_hf.calibration.stats import CalibrationStats
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.io.memory import trim_heap
from uncurl_hf.methods.base import PruningMethod, make_plan
from uncurl_hf.plan import LayerPlan, PruningPlan
from uncurl_hf.surgery.apply import apply_plan

if TYPE_CHECKING:
    from uncurl_hf.pipeline.planning import PlanningResult

logger = logging.getLogger(__name__)


def plan_sequentially(
    model: nn.Module,
    family: MoEFamily,
    method: PruningMethod,
    batches: Sequence[Batch],
    initial: CalibrationStats,
    budget: dict[str, int],
    recipe: Any,
    progress: bool,
) -> "PlanningResult":
    """Plan layer ``l`` on statistics of ``model`` with layers ``< l`` pruned by their plans (see the module doc)."""
    from uncurl_hf.pipeline.planning import PlanningResult, calibrate_model, plan_layer

    layers = family.sparse_layers(model)
    planned: list[LayerPlan] = []
    planned_from = {}
    current, stats, passes = model, initial, 1
    for index, layer in enumerate(tqdm(layers, desc="sequential", unit="layer", disable=not progress)):
        if index > 0:
            current = None  # the previous intermediate model (its reduced layers) goes before the next is built
            trim_heap()
            current = apply_plan(
                model, family, _partial_plan(model, family, method, planned, recipe),
                scale_expert_capacity=recipe.scale_expert_capacity, only={done.name for done in planned}, share=True,
            )
            remaining = {later.name for later in layers[index:]}  # the pruned layers need no statistics
            stats = calibrate_model(current, family, batches, recipe, progress=False, only=remaining)
            passes += 1
        planned_from[layer.name] = stats[layer.name]
        planned.append(plan_layer(method, layer.name, stats, current, family, budget, recipe))
        logger.info("sequential: %s -> %d experts", layer.name, planned[-1].num_output_experts)
    plan = make_plan(model, family, method.name, planned, recipe)
    plan.metadata["sequential"] = True
    result_stats = CalibrationStats(planned_from, num_sequences=initial.num_sequences)
    return PlanningResult(plan, result_stats, budget, initial, passes)


def _partial_plan(
    model: nn.Module, family: MoEFamily, method: PruningMethod, planned: list[LayerPlan], recipe: Any
) -> PruningPlan:
    """The layers planned so far, every other layer kept whole (identity groups)."""
    done = {layer.name: layer for layer in planned}
    layers = [
        done.get(layer.name) or LayerPlan.keep(layer.name, layer.num_experts, list(range(layer.num_experts)))
        for layer in family.sparse_layers(model)
    ]
    return make_plan(model, family, method.name, layers, recipe)
