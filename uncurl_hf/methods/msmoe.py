"""``msmoe``: M-SMoE, the merging stage of MC-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy", ICLR 2024, arXiv 2310.01334).

Per sparse layer, on the task's calibration tokens:

* usage ``u_e`` = share of top-k routing decisions that picked expert ``e`` (normalized counts);
* dominant experts: ONE global usage threshold across all layers selects the ``sum_l floor(E_l / factor)`` most-used
  experts of the model (each layer keeping at least its most-used one), so per-layer counts differ by layer
  (``uniform=True`` keeps ``floor(E_l / factor)`` in every layer); the dominant experts are the group centres;
* similarity ``s(a, b) = (cos(L[:, a], L[:, b]) + 1) / 2`` of the experts' raw router-logit columns ``L [S, E]``;
  every non-dominant expert joins its most similar centre (ties: the more used centre);
* members' hidden neurons are aligned to the centre with ``linear_sum_assignment`` on ``Wi_c Wi_m^T + Wo_c^T Wo_m``;
* merged expert ``sum_m u_m P_m(W_m) / sum_m u_m`` (uniform for a never-routed group).

Unlike the reference implementation, which keeps the router and ties the merged slots to one module (the checkpoint
never shrinks), the group's experts are physically replaced by one expert and the router gets one row per group:
``router="weighted"`` (usage-weighted member rows, default, as for UNCURL) or ``"anchor"`` (the centre's row).
The compression stage of MC-SMoE (low-rank + pruning of the merged experts) is not part of this baseline.
"""

from __future__ import annotations

import numpy as np

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import MergeOptions, MergingMethod, cosine_affinity, logit_profiles
from uncurl_hf.methods.frequency import rank_by_frequency

def groups_around_centres(similarity: np.ndarray, centres: list[int]) -> list[list[int]]:
    """One group per centre; every other expert joins the centre it is most similar to (first centre on ties)."""
    groups = {c: [c] for c in centres}
    for expert in range(similarity.shape[0]):
        if expert in groups:
            continue
        best = max(centres, key=lambda c: (similarity[expert, c], -centres.index(c)))
        groups[best].append(expert)
    return [groups[c] for c in centres]


@register_method
class MSMoEMerging(MergingMethod):
    """M-SMoE; the formula is in the module docstring."""

    name = "msmoe"
    description = (
        "M-SMoE (MC-SMoE's merge): most-used experts are centres (one global usage threshold), the rest join the "
        "most similar centre by router logits; aligned, usage-weighted merge."
    )
    citation = "@article{li2023merge, title={Merge, Then Compress: Demystify Efficient {SMoE} with Hints from Its Routing Policy}, author={Li, Pingzhi and Zhang, Zhenyu and Yadav, Prateek and Sung, Yi-Lin and Cheng, Yu and Bansal, Mohit and Chen, Tianlong}, journal={arXiv preprint arXiv:2310.01334}, year={2023}}"
    Options = MergeOptions

    def group_experts(
        self, layer: MoELayer, stats: ExpertStats, k: int, family: MoEFamily, options: MergeOptions, seed: int
    ) -> list[list[int]]:
        similarity = cosine_affinity(logit_profiles(stats, layer.router.weight, "raw"))
        return groups_around_centres(similarity, rank_by_frequency(stats)[:k])
