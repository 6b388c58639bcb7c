"""Weight surgery: turn a model + :class:`PruningPlan` into a new, smaller model (the input is not modified).

Per layer and per output group ``g`` with members ``m_1..m_n`` and weights ``w_1..w_n``:

* expert tensors: ``sum_i w_i * P_i(W_{m_i})`` where ``P_i`` optionally permutes the member's hidden neurons
  (``plan extras["permutations"]``) along the family's neuron axis; a singleton group is an exact copy; with the
  plan's ``extras["output_scales"]`` (one number or ``None`` per group) the group's output tensors (the family's
  ``output_keys``: its output projection and that projection's bias) are multiplied by the group's scale, so the
  output expert computes exactly ``s * E(x)`` (the merge methods' ``repair`` option);
* router rows: ``"weighted"`` -> ``sum_i w_i * row_{m_i}`` (bias likewise), ``"anchor"`` -> ``row_{m_1}``,
  ``"fitted"`` -> ``sum_i c_i * row_{m_i}`` with the plan's ``extras["router_coefficients"]``; ``"map"`` keeps every
  original row and records the plan's expert map (:attr:`ReducedLayer.expert_map`); the expert capacity is then
  unchanged, because the router still counts it per original expert.

Every computation on weights (weighted sums, permutations, router rows) runs in float32 and is stored in the source
dtype, so a bfloat16/float16 checkpoint comes out in its own dtype and the in-memory and streamed paths give the same
bytes: expert tensors in the dtype of the group's anchor, router rows in the dtype of the layer's expert weights.
Why not the router's own dtype: Switch Transformers' router upcasts its classifier to ``router_dtype`` (float32) *in
place* on every forward (``self.classifier = self.classifier.to(self.dtype)``), so after calibration the in-memory
router is float32 while the checkpoint stores it, like the experts, in the model dtype; every supported family
stores router and experts in one dtype (and ``from_pretrained`` loads a checkpoint in one dtype anyway).

Inputs and results are checked finite (:func:`uncurl_hf.io.checks.check_finite`): a NaN in an expert is named here
rather than surfacing as an assignment solver's "invalid numeric entries" or as a silently broken output.
Removed experts are physically absent from the result, so the written checkpoint shrinks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from uncurl_hf.errors import InvalidPlanError
from uncurl_hf.families.base import MoEFamily, MoELayer, ReducedLayer
from uncurl_hf.io.checks import check_finite
from uncurl_hf.plan import LayerPlan, PruningPlan

logger = logging.getLogger(__name__)

# ``expert(i)`` -> expert i's tensors, keyed like the family's ``neuron_axes``.
ExpertSource = Callable[[int], Mapping[str, torch.Tensor]]


def apply_plan(
    model: nn.Module,
    family: MoEFamily,
    plan: PruningPlan,
    *,
    scale_expert_capacity: bool = True,
    base_model: str | None = None,
    release_source: bool = False,
    only: Collection[str] | None = None,
    share: bool = False,
) -> nn.Module:
    """Return a new model in which every sparse layer holds the output experts described by ``plan``.

    ``plan`` is validated against ``model`` first (:class:`~uncurl_hf.errors.InvalidPlanError`). With
    ``scale_expert_capacity`` each layer's per-sequence expert capacity grows by ``E_old / E_new`` (rounded up),
    because the surviving experts now receive the tokens of the removed ones.

    ``release_source``: the one exception to "the input is not modified", for a caller that drops ``model`` next
    (the pipeline): as soon as a layer's output experts are computed (copies), the source layer's expert tensors are
    replaced by meta tensors of the same shapes, so the surgery holds the source minus the layers done plus the
    output, never both models in full; the reduced layers are handed over as the new model is assembled (a fused
    family repacks one layer at a time). The output is the same.

    ``only``: reduce just these layers; every other layer stays as it is, and its plan must say so
    (:attr:`LayerPlan.is_identity`, else :class:`~uncurl_hf.errors.InvalidPlanError`). ``share``: the
    new model holds the input's own tensors wherever nothing changed, instead of copies. Together they make
    sequential planning's intermediate models (forward passes only) cost the reduced layers, not a second model.
    """
    plan.validate(family.layer_sizes(model))
    if only is not None:
        changed = [layer.name for layer in plan.layers if layer.name not in only and not layer.is_identity]
        if changed:
            raise InvalidPlanError(
                f"apply_plan(only=...) keeps {changed[:3]} as they are, but the plan changes them; add them to only."
            )
    reduced: dict[str, ReducedLayer] = {}
    with torch.no_grad():
        for layer in family.sparse_layers(model):
            if only is not None and layer.name not in only:
                continue
            layer_plan = plan.layer(layer.name)
            reduced[layer.name] = reduce_layer(family, layer, layer_plan, scale_expert_capacity)
            logger.debug("%s: %d -> %d experts", layer.name, layer.num_experts, layer_plan.num_output_experts)
            if release_source:
                release_experts(layer)
        new_model = family.build_reduced_model(model, reduced, base_model=base_model or plan.base_model,
                                               consume=release_source, share=share)
    return new_model


def release_experts(layer: MoELayer) -> None:
    """Put meta tensors (same shapes and dtypes) in place of the expert parameters and buffers of ``layer``'s
    ``experts`` submodule, the tensors the reduced model replaces (``{prefix}.experts.*``), freeing their memory."""
    experts = getattr(layer.module, "experts", None)
    if not isinstance(experts, nn.Module):
        return
    for module in experts.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="meta")


def reduce_layer(
    family: MoEFamily, layer: MoELayer, plan: LayerPlan, scale_expert_capacity: bool = True
) -> ReducedLayer:
    """The experts and router rows of one layer after applying ``plan``."""
    return reduce_tensors(
        plan,
        lambda index: family.expert_tensors(layer, index),
        family.router_tensors(layer),
        family.neuron_axes,
        num_experts=layer.num_experts,
        capacity=family.expert_capacity(layer),
        scale_expert_capacity=scale_expert_capacity,
        output_keys=family.output_keys,
    )


def reduce_tensors(
    plan: LayerPlan,
    expert: ExpertSource,
    router: Mapping[str, torch.Tensor],
    neuron_axes: Mapping[str, int],
    *,
    num_experts: int,
    capacity: int | None = None,
    scale_expert_capacity: bool = True,
    copy: bool = True,
    output_keys: Sequence[str] = (),
) -> ReducedLayer:
    """The surgery of one layer on plain tensors: the one implementation behind in-memory and out-of-core apply.

    ``expert(i)`` returns expert ``i``'s tensors (keyed like ``neuron_axes``), so the caller decides where they come
    from: views of a loaded model (:func:`reduce_layer`) or reads from safetensors files
    (:mod:`uncurl_hf.surgery.streaming`). Each expert is asked for at most once, and experts no group uses never are, so an
    out-of-core caller reads only the experts that survive. ``router`` holds the router tensors whose first axis
    indexes experts; ``capacity`` is the layer's per-expert token capacity (``None`` when the family has none).
    ``copy=False`` lets a kept (singleton) expert be the very tensors ``expert(i)`` returned: right for a reader
    that returns fresh tensors, wrong for views of a live model (the default copies). ``output_keys``: the
    family's tensors that ``extras["output_scales"]`` multiply.
    """
    permutations = plan.extras.get("permutations") or [None] * len(plan.groups)
    scales = plan.extras.get("output_scales") or [None] * len(plan.groups)
    if any(scale is not None for scale in scales) and not output_keys:
        raise InvalidPlanError(
            f"layer {plan.name!r}: the plan scales expert outputs (extras['output_scales']) but this model family "
            "declares no output tensors to scale; remove 'output_scales' from the plan."
        )

    def checked_expert(index: int) -> Mapping[str, torch.Tensor]:
        tensors = expert(index)
        check_finite(tensors, f"layer {plan.name}, expert {index}")
        return tensors

    experts = []
    for position, (group, weights, perms, scale) in enumerate(zip(plan.groups, plan.weights, permutations, scales)):
        merged = merge_expert_tensors(checked_expert, neuron_axes, group, weights, perms, copy=copy,
                                      output_scale=scale, output_keys=output_keys)
        if len(group) > 1:
            check_finite(merged, f"layer {plan.name}, output expert {position} (group {list(group)})", computed=True)
        experts.append(merged)
    check_finite(router, f"layer {plan.name}, router")
    dtype = _expert_dtype(experts)
    if plan.router == "map":
        rows = {name: tensor.to(dtype or tensor.dtype, copy=True) for name, tensor in router.items()}
        return ReducedLayer(experts=experts, router=rows, expert_capacity=capacity, expert_map=plan.expert_map)
    coefficients = plan.extras["router_coefficients"] if plan.router == "fitted" else plan.weights
    router_rows = {
        name: torch.stack(
            [_router_row(tensor, g, c, plan.router, dtype or tensor.dtype) for g, c in zip(plan.groups, coefficients)]
        )
        for name, tensor in router.items()
    }
    check_finite(router_rows, f"layer {plan.name}, reduced router", computed=True)
    if capacity is not None and scale_expert_capacity:
        capacity = math.ceil(capacity * num_experts / plan.num_output_experts)
    return ReducedLayer(experts=experts, router=router_rows, expert_capacity=capacity)


def merge_experts(
    family: MoEFamily,
    layer: MoELayer,
    group: Sequence[int],
    weights: Sequence[float],
    permutations: Sequence[Sequence[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted average of the group's expert tensors (exact copy for a singleton group without permutation)."""
    return merge_expert_tensors(
        lambda index: family.expert_tensors(layer, index), family.neuron_axes, group, weights, permutations
    )


def merge_expert_tensors(
    expert: ExpertSource,
    neuron_axes: Mapping[str, int],
    group: Sequence[int],
    weights: Sequence[float],
    permutations: Sequence[Sequence[int] | None] | None = None,
    *,
    copy: bool = True,
    output_scale: float | None = None,
    output_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """:func:`merge_experts` on tensors given by ``expert(i)``; each member is read once.

    The merge runs in float32 and is cast back to the anchor's dtype, so a singleton group (an exact copy) and a
    merged group come out in the checkpoint's dtype. ``output_scale`` (``None``: 1) multiplies the ``output_keys``
    tensors of the result, in the same float32 pass.
    """
    permutations = permutations or [None] * len(group)
    if len(group) == 1 and permutations[0] is None and output_scale is None:
        return {name: t.clone() if copy else t for name, t in expert(group[0]).items()}
    merged: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for member, weight, perm in zip(group, weights, permutations):
        for name, tensor in expert(member).items():
            dtypes.setdefault(name, tensor.dtype)  # the anchor's (first member's) dtype
            value = tensor.float()
            if perm is not None and name in neuron_axes:  # no neuron axis (an output bias): averaged as it is
                index = torch.as_tensor(perm, dtype=torch.long, device=value.device)
                value = value.index_select(neuron_axes[name], index)
            merged[name] = merged[name] + weight * value if name in merged else weight * value
    if output_scale is not None:
        for name in output_keys:
            if name in merged:
                merged[name] = merged[name] * float(output_scale)
    return {name: value.to(dtypes[name]) for name, value in merged.items()}


def _expert_dtype(experts: Sequence[Mapping[str, torch.Tensor]]) -> torch.dtype | None:
    """The floating dtype the layer's experts are stored in (router rows are stored in it: see the module docstring)."""
    for tensors in experts:
        for tensor in tensors.values():
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def _router_row(
    tensor: torch.Tensor, group: Sequence[int], weights: Sequence[float], rule: str, dtype: torch.dtype
) -> torch.Tensor:
    """One output router row (or bias entry) in ``dtype``: the anchor's, or the float32 weighted sum of the members'
    (``"fitted"``: with the fitted coefficients, which also scale a singleton group's row)."""
    if rule == "anchor" or (len(group) == 1 and rule != "fitted"):
        return tensor[group[0]].to(dtype, copy=True)
    rows = tensor[list(group)].float()
    scale = torch.tensor(weights, dtype=torch.float32, device=rows.device).reshape(-1, *[1] * (rows.dim() - 1))
    return (scale * rows).sum(dim=0).to(dtype)
