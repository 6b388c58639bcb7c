"""The merge methods' ``repair`` option: give each merged expert back the output scale of the experts it replaces.

Averaging the weights of experts that compute different functions shrinks the result: the members' hidden neurons
respond to different directions, so the averaged expert's response to a token is weaker than any member's own
(the "variance collapse" of interpolated networks; REPAIR, Jordan et al., "REPAIR: REnormalizing Permuted Activations
for Interpolation Repair", ICLR 2023, restores the statistics of the endpoints). In an SMoE every slot of a merged
group then adds less to the residual stream than the experts it stands for: on the 64-expert top-8 decoder the
merges of every method lost the sentiment task at x4 (as if the label were guessed), where pruning kept it.

The repair is one scalar per merged group, measured on the sampled calibration tokens of the layer
(``stats.hidden_sample``, routed by their recorded router logits and the family's top-k). With ``E_g`` the merged
expert as the surgery builds it, and sums over the group's members ``m`` and the sampled tokens ``x`` routed to ``m``:

* ``"lsq"``: ``s_g = sum <E_g(x), E_m(x)> / sum ||E_g(x)||^2`` (at least 0), the scale that minimizes
  ``sum ||s E_g(x) - E_m(x)||^2``: the merged expert reconstructs its members' outputs on their own tokens at least as
  well as unscaled (``s = 1`` is a candidate);
* ``"norm"``: ``s_g = sum ||E_m(x)|| / sum ||E_g(x)||``, so that the merged expert's outputs have the members' mean
  norm (REPAIR's statistic matching; it can raise the error where the merge points elsewhere).

The surgery multiplies the group's output projection (and its bias; the family's ``output_keys``) by ``s_g``, which
scales the expert's output by exactly ``s_g``. Scales are rounded to 3 significant digits
(:func:`~uncurl_hf.methods.base.stable_value`, as the merge weights); groups without sampled tokens, and singletons,
keep ``None`` (no scaling). The scales are written to the plan (``extras["output_scales"]``).
"""

from __future__ import annotations

from typing import Literal

import torch

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods.base import stable_value
from uncurl_hf.plan import LayerPlan
from uncurl_hf.surgery.apply import merge_experts

RepairRule = Literal["lsq", "norm"]
# Sampled calibration tokens per layer the scales are measured on: the first ones of the layer's sample, which is in
# (sequence, position) order, i.e. the sampled tokens of the first calibration sequences (about half of the default
# 4096-token sample).
REPAIR_TOKENS = 2048


@torch.no_grad()
def output_scales(
    family: MoEFamily, layer: MoELayer, plan: LayerPlan, stats: ExpertStats, rule: RepairRule = "lsq"
) -> list[float | None]:
    """One scale per group of ``plan`` by ``rule`` (module docstring): ``None`` for a singleton or a group no
    sampled token reaches."""
    hidden, logits = stats.hidden_sample[:REPAIR_TOKENS], stats.logit_sample[:REPAIR_TOKENS]
    scales: list[float | None] = [None] * len(plan.groups)
    if hidden.shape[0] == 0 or all(len(group) == 1 for group in plan.groups):
        return scales
    hidden = family.expert_input(layer, hidden)
    _, selected = family.routing(logits.float(), stats.top_k)
    permutations = plan.extras.get("permutations") or [None] * len(plan.groups)
    for position, (group, weights, perms) in enumerate(zip(plan.groups, plan.weights, permutations)):
        if len(group) == 1:
            continue
        merged = merge_experts(family, layer, group, weights, perms)  # the surgery's merge of this group
        numerator = denominator = 0.0  # lsq: sum <E_g, E_m>, sum ||E_g||^2; norm: sum ||E_m||, sum ||E_g||
        for member in group:
            rows = torch.nonzero((selected == member).any(dim=-1)).flatten().to(hidden.device)
            if rows.numel() == 0:
                continue
            x = hidden.index_select(0, rows)
            target = family.run_expert(layer, member, x).double()
            out = family.run_expert_tensors(layer, merged, x).double()
            if rule == "lsq":
                numerator += float((out * target).sum())
                denominator += float((out * out).sum())
            else:
                numerator += float(torch.linalg.vector_norm(target, dim=-1).sum())
                denominator += float(torch.linalg.vector_norm(out, dim=-1).sum())
        if denominator > 0:
            scales[position] = stable_value(max(numerator, 0.0) / denominator)
    return scales
