"""Super-expert protection (Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models",
arXiv 2507.23279): experts whose activations show rare but extreme outliers are never dropped.

Su et al. find a handful of experts per model whose down-projection produces massive activations (orders of magnitude
above every other expert's) on a few tokens; those activations become the residual stream's massive activations and
the attention sinks, so pruning a handful of them degrades the model far more than pruning any other experts,
whatever a usage or norm criterion says about them. The detector here, per sparse layer:

    a_e = max over the sampled calibration tokens routed to e (e in the token's top-k) of max_i |h_e(x)_i|

with ``h_e`` the expert's down-projection output (``site="output"``, what the paper and REAP's reference code
record: the expert output before gate scaling) or its input (``site="input"``: the activated hidden neurons,
``act(gate x) * up x``); then, over the experts with at least one routed sampled token,

    protected = {e : a_e > m + z * s},   m = median(a),   s = max(1.4826 * MAD(a), 0.05 * m)

(``1.4826 * MAD`` estimates the standard deviation of a normal sample and ignores the outliers it looks for; the floor
at 5% of the median keeps a layer of near-identical experts, whose MAD is ~0, from flagging ordinary noise). Layers
with fewer than 3 measured experts flag nothing. Where this departs from the paper / REAP's reference code
(``get_super_expert_indices``): they use one model-wide threshold (the 99.5th percentile of every layer's ``a_e`` and
at least a tenth of the model's largest) and look at the first 75% of layers only; uncurl's methods plan one layer at a
time (``--offload``, ``--sequential``), so the threshold here is per layer, robust, and tunable with ``z``.

Cost: one expert call per routed sampled token (the tokens come from ``stats.hidden_sample``; calibration records no
activation maxima, so they are recomputed here by running the layer's experts, as HC-SMoE does).

Adding protection to another pruning method is one line in its ``plan_layer``, after it ranks the experts::

    kept = keep_protected(ranking, protected_for(options, find_layer(model, family, name), stats, family), k)

with the three ``SuperExpertOptions`` fields added to its ``Options`` (subclass it). Merging methods would need the
protected experts kept as singleton groups instead (REAP's ``singleton_super_experts``), which is not done here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.settings import setting

logger = logging.getLogger(__name__)

SITES = ("output", "input")
MIN_MEASURED = 3  # a median and a MAD of fewer experts say nothing about outliers
SCALE_FLOOR = 0.05  # s >= 5% of the median
MAD_TO_SIGMA = 1.4826
CITATION = "@article{su2025unveiling, title={Unveiling Super Experts in Mixture-of-Experts Large Language Models}, author={Su, Zunhai and Li, Qingyuan and Zhang, Hao and Qian, YuLei and Xie, Yuchen and Yuan, Kehong and others}, journal={arXiv preprint arXiv:2507.23279}, year={2025}}"  # cited by cards with protection on


@dataclass(frozen=True)
class SuperExpertOptions:
    """The options of a method that can protect super experts (subclass it to add them to a method's options)."""

    protect_super_experts: bool = setting(
        False, help="never drop experts with extreme activation outliers (super experts, Su et al. 2025)",
    )
    super_expert_z: float = setting(
        10.0, help="super expert: max |activation| > median + z * robust std (1.4826 MAD) of the layer's experts",
    )
    super_expert_site: Literal["output", "input"] = setting(
        "output", help="activation measured: the down projection's output (the paper's) or its input",
    )


def check_super_expert_options(options: Any, method: str) -> None:
    """Range checks of the :class:`SuperExpertOptions` fields (types are checked by the settings parser)."""
    if options.super_expert_z < 0:
        raise UncurlError(f"{method} option super_expert_z must be >= 0, got {options.super_expert_z}.")


class _DownInputCapture(TorchFunctionMode):
    """Records the other operand of the first matrix product that uses the down-projection weight ``weight``.

    Families compute the down projection in different ways (``nn.Linear`` for Switch, ``F.linear`` on a fused slice
    for Mixtral/Qwen/OLMoE, ``@`` for gpt-oss); all of them go through one of these functions, and the weight is
    recognised by its storage address, so no family code is duplicated here.
    """

    _PRODUCTS = {F.linear, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm}

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.address = weight.data_ptr()
        self.captured: torch.Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if self.captured is None and func in self._PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.data_ptr() == self.address for t in tensors):
                self.captured = next((t for t in tensors if t.data_ptr() != self.address), None)
        return func(*args, **(kwargs or {}))


def down_projection_input(family: MoEFamily, layer: MoELayer, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """``[N, n]``: the input of expert ``index``'s down projection on ``hidden [N, D]`` (its activated neurons)."""
    tensors = family.expert_tensors(layer, index)
    weight = tensors.get("down", tensors.get("wo"))
    if weight is None:
        raise UncurlError(
            f"super_expert_site='input' does not know the down projection of the {family.name} family "
            "(no 'down' or 'wo' expert tensor); use super_expert_site='output'."
        )
    capture = _DownInputCapture(weight)
    with capture:
        family.run_expert(layer, index, hidden)
    if capture.captured is None:
        raise UncurlError(
            f"super_expert_site='input': the {family.name} experts never multiplied by their down projection; "
            "use super_expert_site='output'."
        )
    return capture.captured


@torch.no_grad()
def max_activations(layer: MoELayer, stats: ExpertStats, family: MoEFamily, site: str = "output") -> torch.Tensor:
    """``[E]`` float64: each expert's largest ``|activation|`` at ``site`` over the sampled tokens routed to it
    (NaN for an expert no sampled token is routed to)."""
    if site not in SITES:
        raise UncurlError(f"super_expert_site must be one of {', '.join(SITES)}, got {site!r}.")
    values = torch.full((layer.num_experts,), float("nan"), dtype=torch.float64)
    hidden = stats.hidden_sample
    if hidden.shape[0] == 0:
        return values
    weight = layer.router.weight
    inputs = hidden.to(device=weight.device, dtype=next(layer.experts[0].parameters()).dtype)
    _, selected = family.routing(family.router_logits(layer, inputs).cpu(), layer.top_k)
    for expert in range(layer.num_experts):
        rows = (selected == expert).any(dim=-1)
        if not bool(rows.any()):
            continue
        x = inputs[rows.to(inputs.device)]
        if site == "output":
            out = family.run_expert(layer, expert, x)
        else:
            out = down_projection_input(family, layer, expert, x)
        values[expert] = float(out.float().abs().max())
    return values


def outliers(values: torch.Tensor, z: float) -> set[int]:
    """Indices whose value exceeds ``median + z * s`` over the non-NaN values (module docstring)."""
    measured = [(i, float(v)) for i, v in enumerate(values.tolist()) if not np.isnan(v)]
    if len(measured) < MIN_MEASURED:
        return set()
    a = np.array([v for _, v in measured])
    median = float(np.median(a))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(a - median))), SCALE_FLOOR * median)
    threshold = median + z * scale
    return {i for i, v in measured if v > threshold}


def protected_experts(
    layer: MoELayer, stats: ExpertStats | None, family: MoEFamily, z: float = 10.0, site: str = "output"
) -> set[int]:
    """The layer's super experts: experts whose max ``|activation|`` is an outlier among the layer's experts."""
    if stats is None:
        return set()
    values = max_activations(layer, stats, family, site)
    found = outliers(values, z)
    if found:
        logger.info(
            "%s: super experts %s (max |activation| %s; layer median %.4g)", layer.name, sorted(found),
            [round(float(values[e]), 4) for e in sorted(found)], float(np.nanmedian(values.numpy())),
        )
    return found


def protected_for(options: Any, layer: MoELayer, stats: ExpertStats | None, family: MoEFamily) -> set[int]:
    """:func:`protected_experts` with a method's :class:`SuperExpertOptions`; empty when protection is off."""
    if not options.protect_super_experts:
        return set()
    return protected_experts(layer, stats, family, options.super_expert_z, options.super_expert_site)


def keep_protected(ranking: Sequence[int], protected: set[int], k: int, layer: str = "") -> list[int]:
    """The ``k`` experts to keep: every protected one (best ranked first), then the best-ranked others.

    With more protected experts than ``k`` only the ``k`` best ranked of them survive (and a warning says so): the
    budget is never exceeded.
    """
    first = [e for e in ranking if e in protected]
    if len(first) > k:
        logger.warning("%s: %d super experts for a budget of %d; keeping the %d best ranked", layer, len(first), k, k)
        first = first[:k]
    return first + [e for e in ranking if e not in protected][: k - len(first)]
