"""``hcsmoe``: HC-SMoE (Chen et al., "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering",
arXiv 2410.08589).

Per sparse layer, uniform ``k = floor(E / factor)``:

* feature of expert ``e``: its mean output over the calibration tokens, ``o_e = 1/T sum_t E_e(x_t)``, i.e. every
  expert is run on every token, routed to it or not (the point of the paper: compare what experts *compute* on the
  task, not where the router sends tokens). The tokens are the seeded uniform sample of layer inputs recorded by
  calibration, cut to ``max_tokens`` (default 1024), so the cost is bounded: ``E * max_tokens`` expert calls;
* average-linkage agglomerative clustering of ``{o_e}`` on Euclidean distance into ``k`` clusters
  (``d(A, B) = mean_{a in A, b in B} ||o_a - o_b||``);
* merged expert ``sum_m u_m W_m / sum_m u_m`` with ``u_m`` the member's routing count (uniform for a never-routed
  group). No neuron alignment, as in the paper (``align=True`` turns it on for comparison).

The router gets one row per group (``router="weighted"``: usage-weighted member rows, default; or ``"anchor"``: the
most-used member's row), and merged experts are physically removed, unlike the reference code.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import MergingMethod, RouterRule, guard_setting, router_setting
from uncurl_hf.seeding import stable_seed
from uncurl_hf.settings import setting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HCSMoEOptions:
    """HC-SMoE's options (``uniform`` is accepted, and always true: the paper's counts are uniform)."""

    router: RouterRule = router_setting()
    guard: bool = guard_setting()
    max_tokens: int = setting(1024, help="sampled calibration tokens every expert is run on (cost: E x max_tokens)")
    align: bool = setting(False, help="align members' hidden neurons before merging (off in the paper)")
    uniform: bool = setting(True, help="accepted for --uniform; HC-SMoE always keeps floor(E / factor) per layer")


def token_subset(hidden: torch.Tensor, max_tokens: int, seed: int) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``hidden``, drawn without replacement with a seeded generator."""
    if hidden.shape[0] <= max_tokens:
        return hidden
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(hidden.shape[0], generator=generator)[:max_tokens].sort().values
    return hidden[keep]


@torch.no_grad()
def mean_expert_outputs(family: MoEFamily, layer: MoELayer, hidden: torch.Tensor) -> np.ndarray:
    """``[E, D]``: every expert's output averaged over the tokens ``hidden [T, D]`` (zeros when ``T == 0``)."""
    if hidden.shape[0] == 0:
        logger.warning("%s: no sampled calibration tokens; HC-SMoE features are all zero", layer.name)
        return np.zeros((layer.num_experts, hidden.shape[1]))
    weight = layer.router.weight
    inputs = hidden.to(device=weight.device, dtype=next(layer.experts[0].parameters()).dtype)
    means = [family.run_expert(layer, e, inputs).float().mean(dim=0).cpu() for e in range(layer.num_experts)]
    return torch.stack(means).double().numpy()


def average_linkage_groups(features: np.ndarray, k: int) -> list[list[int]]:
    """``k`` groups from average-linkage agglomerative clustering on Euclidean distance (deterministic)."""
    from sklearn.cluster import AgglomerativeClustering  # lazy: sklearn adds seconds to every `uncurl` start-up

    e = features.shape[0]
    if k >= e:
        return [[i] for i in range(e)]
    if k <= 1:
        return [list(range(e))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = AgglomerativeClustering(n_clusters=k, linkage="average", metric="euclidean").fit_predict(
            np.nan_to_num(features)
        )
    return [sorted(int(i) for i in np.flatnonzero(labels == label)) for label in np.unique(labels)]


@register_method
class HCSMoEMerging(MergingMethod):
    """HC-SMoE; the formula is in the module docstring."""

    name = "hcsmoe"
    description = (
        "HC-SMoE: average-linkage hierarchical clustering of experts' mean outputs on the task, usage-weighted merge."
    )
    citation = "@article{chen2024retraining, title={Retraining-Free Merging of Sparse {MoE} via Hierarchical Clustering}, author={Chen, I-Chun and Liu, Hsu-Shen and Sun, Wei-Fang and Chao, Chen-Hao and Hsu, Yen-Chang and Lee, Chun-Yi}, journal={arXiv preprint arXiv:2410.08589}, year={2024}}"
    Options = HCSMoEOptions
    adaptive_counts = False  # uniform k = floor(E / factor), as in the paper

    def check_options(self, options: HCSMoEOptions) -> None:
        if options.max_tokens < 1:
            raise UncurlError(f"hcsmoe option max_tokens must be >= 1, got {options.max_tokens}.")

    def group_experts(
        self, layer: MoELayer, stats: ExpertStats, k: int, family: MoEFamily, options: HCSMoEOptions, seed: int
    ) -> list[list[int]]:
        hidden = token_subset(stats.hidden_sample, options.max_tokens, stable_seed(seed, self.name, layer.name))
        return average_linkage_groups(mean_expert_outputs(family, layer, hidden), k)
