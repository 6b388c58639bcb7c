"""Building blocks shared by the merging methods (UNCURL, M-SMoE, HC-SMoE).

* usage and merge weights from routing counts;
* router-logit profiles of experts and their cosine affinity;
* neuron alignment of a group's members to its anchor (:mod:`uncurl_hf.methods._alignment`);
* turning groups of expert indices into a :class:`LayerPlan` (anchor first, weights, permutations);
* adaptive budgets: one global usage threshold across layers (M-SMoE's rule), or a split proportional to each
  layer's effective number of experts;
* :class:`MergingMethod`, the base class of the three: validated options and the ``plan_layer`` around a method's
  own grouping rule, so each method module holds only what makes it that method.

Everything here is deterministic: ties are broken by gate mass and then by expert index, never by hash order.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods._alignment import align_groups
from uncurl_hf.methods._repair import output_scales
from uncurl_hf.methods.base import PruningMethod, rank_by_score, stable_value
from uncurl_hf.methods._router_fit import fit_router_coefficients, merge_diagnostics
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.plan import LayerPlan
from uncurl_hf.seeding import stable_seed
from uncurl_hf.settings import setting

if TYPE_CHECKING:
    from uncurl_hf.calibration.stats import CalibrationStats
    from uncurl_hf.recipe import PruneRecipe

logger = logging.getLogger(__name__)


def find_layer(model: nn.Module, family: MoEFamily, name: str) -> MoELayer:
    """The sparse layer called ``name`` (methods get names; weight access needs the layer record)."""
    for layer in family.sparse_layers(model):
        if layer.name == name:
            return layer
    raise KeyError(f"the model has no sparse layer named {name!r}")


def usage(stats: ExpertStats) -> np.ndarray:
    """Share of the layer's routing decisions each expert received (sums to 1 when tokens were seen).

    Without routed tokens it falls back to the gate-mass share, then to uniform, so a layer the calibration data
    never reached still gets a usable distribution.
    """
    for values in (stats.counts.double(), stats.gate_mass.double()):
        total = float(values.sum())
        if total > 0:
            return (values / total).numpy()
    return np.full(stats.num_experts, 1.0 / stats.num_experts)


def merge_weights(stats: ExpertStats, group: Sequence[int]) -> list[float]:
    """Members' routing counts normalized over the group; uniform when none of them was ever routed."""
    counts = [float(stats.counts[i]) for i in group]
    total = sum(counts)
    if total <= 0:
        return [1.0 / len(group)] * len(group)
    return [c / total for c in counts]


def order_by_usage(stats: ExpertStats, group: Sequence[int]) -> list[int]:
    """``group`` sorted most-routed first: the first member is the group's anchor."""
    rank = {e: r for r, e in enumerate(rank_by_frequency(stats))}
    return sorted(group, key=rank.__getitem__)


PROFILES = ("raw", "centered", "pearson")


def logit_profiles(stats: ExpertStats, router_weight: torch.Tensor, kind: str = "centered") -> np.ndarray:
    """``[E, S]``: each expert's router logit on each sampled calibration token, normalized as ``kind`` says.

    * ``"raw"``: the logits as the router computes them (M-SMoE);
    * ``"centered"``: minus every token's mean logit over experts. Softmax routing is blind to that shared offset,
      which otherwise makes every pair of experts look alike;
    * ``"pearson"``: centred per token, then minus each expert's mean over tokens, so the cosine is the Pearson
      correlation of two experts' (routing-relevant) preferences across tokens: how *interchangeable* the router
      finds them, regardless of how popular each one is overall.

    A layer with no sampled tokens falls back to the router rows themselves (the profile over isotropic inputs).
    """
    if kind not in PROFILES:
        raise UncurlError(f"Unknown logit profile {kind!r}; use one of {', '.join(PROFILES)}.")
    logits = stats.logit_sample.double()
    if logits.numel() == 0:
        logger.warning("%s: no sampled calibration tokens; comparing experts by their router rows", stats.layer)
        logits = router_weight.detach().double().cpu().T  # [D, E]: "tokens" = input dimensions
    if kind in ("centered", "pearson"):
        logits = logits - logits.mean(dim=1, keepdim=True)
    if kind == "pearson":
        logits = logits - logits.mean(dim=0, keepdim=True)
    return logits.T.numpy()


def cosine_similarity(profiles: np.ndarray) -> np.ndarray:
    """``[E, E]`` cosine similarity of the rows; a zero row has similarity 0 to others and 1 to itself."""
    profiles = np.nan_to_num(np.asarray(profiles, dtype=np.float64))
    norms = np.linalg.norm(profiles, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = profiles / safe[:, None]
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def cosine_affinity(profiles: np.ndarray) -> np.ndarray:
    """``(cos + 1) / 2`` in ``[0, 1]``: M-SMoE's similarity, usable as a spectral-clustering affinity."""
    return (cosine_similarity(profiles) + 1.0) / 2.0


def knn_affinity(profiles: np.ndarray, neighbours: int = 7) -> np.ndarray:
    """A sparse, locally scaled affinity (Zelnik-Manor and Perona, "Self-Tuning Spectral Clustering", NIPS 2004).

    With ``d = 1 - cos`` between profiles, ``sigma_i`` = ``d`` from expert ``i`` to its ``neighbours``-th nearest other
    expert, ``A[i, j] = exp(-d_ij^2 / (sigma_i sigma_j))`` where ``j`` is among ``i``'s ``neighbours`` nearest or
    ``i`` among ``j``'s, 0 elsewhere, unit diagonal. Why: the dense ``(cos + 1) / 2`` of many little-used experts
    is nearly flat (off-diagonal sd 0.05-0.08), so the embedding separates little; the kNN graph keeps only the
    near pairs and the local scale adapts to dense and sparse regions. Ties in the neighbour order go to the lower
    index (a stable sort), so the result is deterministic.
    """
    distance = 1.0 - cosine_similarity(profiles)
    e = distance.shape[0]
    if e <= 2:
        return np.ones((e, e))
    k = max(1, min(neighbours, e - 1))
    others = distance + np.diag(np.full(e, np.inf))
    order = np.argsort(others, axis=1, kind="stable")[:, :k]
    sigma = np.maximum(others[np.arange(e), order[:, -1]], 1e-12)
    kernel = np.exp(-(distance**2) / (sigma[:, None] * sigma[None, :]))
    near = np.zeros((e, e), dtype=bool)
    near[np.arange(e)[:, None], order] = True
    affinity = np.where(near | near.T, kernel, 0.0)
    np.fill_diagonal(affinity, 1.0)
    return affinity


def merged_layer_plan(
    name: str,
    num_experts: int,
    groups: Sequence[Sequence[int]],
    stats: ExpertStats,
    router: str,
    family: MoEFamily | None = None,
    layer: MoELayer | None = None,
    extras: Mapping[str, object] | None = None,
    scores: Sequence[float] | None = None,
) -> LayerPlan:
    """A :class:`LayerPlan` from groups: anchor (most routed) first, usage weights, optional neuron alignment.

    Neurons are aligned when ``family`` and ``layer`` are given. Groups are ordered by their anchor's index, so the
    plan does not depend on the label order a clustering algorithm happened to produce. With ``scores`` (one
    saliency per expert) the anchor is the member with the highest score and the weights are the members' scores
    normalized over the group (uniform when all are 0) instead of their routing counts.
    """
    if scores is None:
        ordered = sorted((order_by_usage(stats, g) for g in groups if g), key=lambda g: g[0])
        weights = [merge_weights(stats, g) for g in ordered]
    else:
        rank = {e: r for r, e in enumerate(rank_by_score(stats, scores))}
        ordered = sorted((sorted(g, key=rank.__getitem__) for g in groups if g), key=lambda g: g[0])
        weights = [_normalized([stable_value(scores[e]) for e in g]) for g in ordered]
    plan_extras = dict(extras or {})
    logits = stats.logit_sample.double().numpy()
    if router == "fitted":
        plan_extras["router_coefficients"] = fit_router_coefficients(logits, ordered, weights, stats.top_k)
    rows = {"weighted": weights, "anchor": [[1.0] + [0.0] * (len(g) - 1) for g in ordered], "map": None}
    coefficients = rows[router] if router in rows else plan_extras["router_coefficients"]
    plan_extras["diagnostics"] = merge_diagnostics(stats, ordered, logits, coefficients)
    if family is not None and layer is not None and any(len(g) > 1 for g in ordered):
        plan_extras["permutations"] = align_groups(family, layer, ordered, weights)
    return LayerPlan(
        name=name,
        num_experts=num_experts,
        groups=[list(g) for g in ordered],
        weights=weights,
        router=router,
        extras=plan_extras,
    )


def _normalized(values: Sequence[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)


def allocate_by_pooled_usage(stats: "CalibrationStats", total: int, names: Sequence[str]) -> dict[str, int]:
    """Per-layer counts from ONE usage threshold across layers (M-SMoE): the ``total`` most-used experts of the
    whole model, pooled over layers by their per-layer usage share, with at least one expert per layer.

    Every layer first gets its most-used expert; the remaining ``total - L`` seats go to the experts with the largest
    usage share anywhere (ties: gate-mass share, then layer order, then expert rank). This maximizes the routing
    mass kept by the centres summed over layers: a layer whose task tokens go to a few experts keeps all of them,
    while a layer spreading its tokens thinly gives up experts that each carry little of its traffic.
    """
    if total < len(names):
        raise ValueError(f"a budget of {total} experts cannot give {len(names)} layers one expert each")
    counts = dict.fromkeys(names, 1)
    candidates: list[tuple[float, float, int, int]] = []
    for li, name in enumerate(names):
        layer_stats = stats[name]
        share = usage(layer_stats)
        mass = layer_stats.gate_mass.double()
        gate = (mass / mass.sum()).numpy() if float(mass.sum()) > 0 else share
        for rank, expert in enumerate(rank_by_frequency(layer_stats)[1:], start=1):
            candidates.append((-float(share[expert]), -float(gate[expert]), li, rank))
    candidates.sort()
    for _, _, li, _ in candidates[: total - len(names)]:
        counts[names[li]] += 1
    return counts


def effective_experts(stats: ExpertStats) -> float:
    """``exp(H(u))`` of the layer's usage distribution: how many experts the task really uses (1 to E)."""
    share = usage(stats)
    share = share[share > 0]
    return float(np.exp(-(share * np.log(share)).sum()))


def allocate_by_effective_experts(stats: "CalibrationStats", total: int, names: Sequence[str]) -> dict[str, int]:
    """Per-layer counts proportional to each layer's effective number of experts, ``1 <= k_l <= E_l``.

    Target ``t_l = total * n_l / sum n``; seats are handed out one at a time to the layer furthest below its target
    (ties: layer order), never above ``E_l``. A layer that spreads its tokens over many experts keeps more groups.
    """
    if total < len(names):
        raise ValueError(f"a budget of {total} experts cannot give {len(names)} layers one expert each")
    sizes = {name: stats[name].num_experts for name in names}
    if total > sum(sizes.values()):
        raise ValueError(f"a budget of {total} experts exceeds the {sum(sizes.values())} experts of the model")
    need = {name: effective_experts(stats[name]) for name in names}
    targets = {name: total * need[name] / sum(need.values()) for name in names}
    counts = dict.fromkeys(names, 1)
    for _ in range(total - len(names)):
        open_layers = [name for name in names if counts[name] < sizes[name]]
        best = max(open_layers, key=lambda n: (targets[n] - counts[n], -names.index(n)))
        counts[best] += 1
    return counts


ALLOCATION_RULES = {"usage": allocate_by_pooled_usage, "entropy": allocate_by_effective_experts}


def adaptive_budget(
    stats: "CalibrationStats", budget: Mapping[str, int], config: "PruneRecipe", uniform: bool, rule: str = "usage"
) -> dict[str, int]:
    """The per-layer counts of an adaptive method: ``rule`` re-splits the total of ``budget`` across layers.

    ``rule`` is ``"usage"`` (:func:`allocate_by_pooled_usage`) or ``"entropy"`` (:func:`allocate_by_effective_experts`).
    Explicit per-layer counts (``config.num_experts_per_layer``), ``uniform``, or missing statistics keep ``budget``.
    """
    if rule not in ALLOCATION_RULES:
        raise UncurlError(f"Unknown adaptive rule {rule!r}; use one of {', '.join(ALLOCATION_RULES)}.")
    if uniform or config.num_experts_per_layer is not None or not stats:
        return dict(budget)
    counts = ALLOCATION_RULES[rule](stats, sum(budget.values()), list(budget))
    logger.info("adaptive per-layer expert counts (%s): %s", rule, counts)
    return counts


RouterRule = Literal["weighted", "anchor", "fitted", "map"]  # plan.ROUTER_RULES, the rules surgery knows


def router_setting(default: str = "weighted") -> Any:
    """The ``router`` option of a merging method (one declaration, shared by every method's Options)."""
    return setting(
        default, help="router row of a merged group: usage-weighted member rows, the anchor's row, member rows "
        "combined with coefficients fitted so calibration tokens keep their routing mass per group, or map (keep "
        "every original row plus an expert map: routing exactly as before, the references' logical merge)",
    )


RepairSetting = Literal["off", "lsq", "norm"]


def repair_setting(default: str = "off") -> Any:
    """The ``repair`` option of a merging method (one declaration, shared by every method's Options)."""
    return setting(
        default, help="scale each merged expert's output, measured on the sampled calibration tokens routed to its "
        "members: the least-squares fit to the members' outputs (lsq), or their mean norm (norm); undoes the "
        "shrinking of averaged weights",
    )


def guard_setting() -> Any:
    """The ``guard`` option of a merging method (one declaration, shared by every method's Options)."""
    return setting(
        False, help="per layer, keep the merge or the same groups pruned (each group's highest-REAP member alone), "
        "whichever reconstructs the layer's output better on sampled calibration tokens",
    )


@dataclass(frozen=True)
class MergeOptions:
    """Options every merging method has."""

    router: RouterRule = router_setting()
    guard: bool = guard_setting()
    uniform: bool = setting(False, help="keep floor(E / factor) experts in every layer (no adaptive counts)")
    repair: RepairSetting = repair_setting()



class MergingMethod(PruningMethod):
    """What UNCURL, M-SMoE and HC-SMoE share; a subclass says only how it groups one layer's experts.

    Subclasses declare ``Options`` (a :class:`MergeOptions` subclass: ``router`` and ``uniform`` among them) and implement
    :meth:`group_experts`. :meth:`plan_layer` validates the options on every layer (so a bad option fails before
    any layer is planned, even one that keeps every expert), keeps all experts when ``k >= E``, and otherwise turns
    the groups into a merged plan (:func:`merged_layer_plan`): neurons are aligned to each group's anchor unless the
    method has an ``align`` option set to false.
    """

    merges = True
    Options: ClassVar[type] = MergeOptions
    # False: always ``floor(E_l / factor)`` per layer (the ``uniform`` option is then accepted but has no effect)
    adaptive_counts: ClassVar[bool] = True

    def allocate(
        self, stats: "CalibrationStats", budget: Mapping[str, int], config: "PruneRecipe"
    ) -> dict[str, int]:
        """The budget's total re-split across layers by :func:`adaptive_budget` unless ``uniform`` is set; the rule
        is the ``adaptive`` option, or M-SMoE's pooled usage for a method without one."""
        if not self.adaptive_counts:
            return dict(budget)
        options = self.options(config)
        return adaptive_budget(
            stats, budget, config, uniform=options.uniform, rule=getattr(options, "adaptive", "usage")
        )

    @abstractmethod
    def group_experts(
        self,
        layer: MoELayer,
        stats: ExpertStats,
        k: int,
        family: MoEFamily,
        options: Any,
        seed: int,
    ) -> list[list[int]]:
        """``k`` groups (``1 <= k < E``) of the layer's expert indices; ``seed`` is the run's seed."""

    def plan_layer(
        self,
        name: str,
        num_experts: int,
        stats: ExpertStats,
        k: int,
        model: nn.Module,
        family: MoEFamily,
        config: "PruneRecipe",
    ) -> LayerPlan:
        options = self.options(config)
        if k >= num_experts:
            return LayerPlan.keep(name, num_experts, range(num_experts))
        layer = find_layer(model, family, name)
        groups = self.group_experts(layer, stats, k, family, options, config.seed)
        logger.debug("%s (%s): groups %s", name, self.name, groups)
        aligned = (family, layer) if getattr(options, "align", True) else (None, None)
        plan = merged_layer_plan(name, num_experts, groups, stats, options.router, *aligned,
                                 scores=self.merge_scores(stats, options))
        if getattr(options, "repair", "off") != "off":
            plan.extras["output_scales"] = output_scales(family, layer, plan, stats, options.repair)
        if getattr(options, "guard", False):
            from uncurl_hf.methods._guard import guarded_plan  # here: _guard needs hcsmoe, which needs this module

            plan = guarded_plan(family, layer, plan, stats, stable_seed(config.seed, "guard", name))
        return plan

    def merge_scores(self, stats: ExpertStats, options: Any) -> Sequence[float] | None:
        """Per-expert saliency that orders and weights a group's members (``None``: routing counts, the default)."""
        return None
