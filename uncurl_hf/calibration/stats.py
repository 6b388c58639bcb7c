"""What calibration measures: per sparse layer, how the router uses each expert on *this task* — the evidence every
pruning method decides from (:class:`ExpertStats`), and the check that there is enough of it (:func:`check_coverage`).

Counts are exact integers; float statistics are float64 sums on the CPU, added in global batch order
(:class:`LayerPartial` keeps one partial per batch), so they do not depend on how batches were split across
processes (:mod:`uncurl_hf.calibration.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from uncurl_hf.calibration.sampling import TokenSample
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.families.base import MoELayer


@dataclass
class ExpertStats:
    """Routing statistics of one sparse layer over the calibration tokens (``E`` experts, ``S`` sampled tokens)."""

    layer: str
    num_experts: int
    top_k: int
    num_tokens: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    gate_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    output_norm_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    weighted_output_norm_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    # sum of (gate the model applies) * ||expert(x)||: the softmax probability, or the renormalized top-k one
    applied_output_norm_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    logit_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    hidden_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    # [S, 2] int64: (global sequence index, position among the sequence's real tokens) of each sampled token
    sample_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))

    @classmethod
    def empty(cls, layer: MoELayer, hidden_size: int) -> "ExpertStats":
        e = layer.num_experts
        return cls(
            layer=layer.name,
            num_experts=e,
            top_k=layer.top_k,
            counts=torch.zeros(e, dtype=torch.long),
            gate_mass=torch.zeros(e, dtype=torch.float64),
            output_norm_sum=torch.zeros(e, dtype=torch.float64),
            weighted_output_norm_sum=torch.zeros(e, dtype=torch.float64),
            applied_output_norm_sum=torch.zeros(e, dtype=torch.float64),
            logit_sample=torch.zeros(0, e),
            hidden_sample=torch.zeros(0, hidden_size),
        )

    @property
    def frequency(self) -> torch.Tensor:
        """Share of routing decisions that picked each expert (sums to 1 over experts when tokens were seen)."""
        total = self.counts.sum().clamp(min=1)
        return self.counts.double() / total

    @property
    def mean_output_norm(self) -> torch.Tensor:
        """Mean ``||expert(x)||`` over the tokens routed to the expert (0 for unused experts)."""
        return self.output_norm_sum / self.counts.double().clamp(min=1)

    @property
    def mean_weighted_output_norm(self) -> torch.Tensor:
        """Mean ``softmax probability * ||expert(x)||`` over routed tokens."""
        return self.weighted_output_norm_sum / self.counts.double().clamp(min=1)

    @property
    def mean_applied_output_norm(self) -> torch.Tensor:
        """Mean ``applied gate * ||expert(x)||`` over routed tokens: REAP's router-weighted activation norm with the
        gate the model really scales the expert by (renormalized top-k probabilities where the family does so)."""
        return self.applied_output_norm_sum / self.counts.double().clamp(min=1)

    def summary(self, exact_only: bool = False) -> dict[str, Any]:
        """JSON-able digest (counts and gate mass), e.g. for plan metadata and the CLI.

        ``exact_only`` leaves out the float gate mass. Integer counts are the same with any number of torch threads,
        but float statistics are not bit-stable across thread counts (some CPU GEMM kernels, e.g. MKL's for matrices
        of a few rows, round differently with 1 and 2 threads), and a rounded float still flips its last printed
        digit when it sits near a rounding boundary. The plan file stores only the exact digest, so that it is
        byte-identical whatever the thread count; rounding would only move the flip points, not remove them.
        """
        digest: dict[str, Any] = {"num_tokens": int(self.num_tokens), "counts": [int(c) for c in self.counts.tolist()]}
        if not exact_only:
            digest["gate_mass"] = [round(float(g), 6) for g in self.gate_mass.tolist()]
        return digest


@dataclass
class CalibrationStats(Mapping[str, ExpertStats]):
    """``{layer name: ExpertStats}`` plus how much data produced them."""

    layers: dict[str, ExpertStats]
    num_sequences: int = 0

    def __getitem__(self, name: str) -> ExpertStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def summary(self, exact_only: bool = False) -> dict[str, Any]:
        return {name: stats.summary(exact_only) for name, stats in self.layers.items()}


@dataclass
class LayerPartial:
    """What one process measured on one layer: exact integers, float64 partial sums per batch, the token sample.

    ``sums`` holds one ``[4, E]`` float64 tensor per batch (gate mass, output norms, softmax-weighted and
    applied-gate-weighted output norms),
    keyed by the batch's global index, so the final sums can be added in global batch order wherever the batches
    were forwarded (:mod:`uncurl_hf.calibration.distributed`).
    """

    num_tokens: int
    counts: torch.Tensor
    sums: dict[int, torch.Tensor]
    sample: TokenSample


def layer_stats(layer: MoELayer, hidden_size: int, partial: LayerPartial) -> ExpertStats:
    """:class:`ExpertStats` of a (merged) partial: float sums added in global batch order, sample in token order."""
    stats = ExpertStats.empty(layer, hidden_size)
    stats.num_tokens = partial.num_tokens
    stats.counts = partial.counts.clone()
    total = torch.zeros(4, layer.num_experts, dtype=torch.float64)
    for batch_index in sorted(partial.sums):
        total += partial.sums[batch_index]
    stats.gate_mass, stats.output_norm_sum, stats.weighted_output_norm_sum, stats.applied_output_norm_sum = total
    sample = partial.sample.in_token_order()
    stats.logit_sample, stats.hidden_sample = sample.logits, sample.hidden
    stats.sample_tokens = torch.stack([sample.sequence, sample.position], dim=1)
    return stats


def check_coverage(stats: CalibrationStats, min_tokens_per_expert: float = 1.0) -> None:
    """Refuse statistics too thin to rank experts: every layer must see ``min_tokens_per_expert * E`` tokens.

    With fewer routed tokens than experts, most experts are never seen and every method ranks them by noise (ties),
    so the "task-specific" plan would be arbitrary. Decoder layers see only target tokens (or just the start token
    when the data has no targets), so they run out first.
    """
    thin = {
        name: (s.num_tokens, s.num_experts)
        for name, s in stats.items()
        if s.num_tokens < min_tokens_per_expert * s.num_experts
    }
    if thin:
        name, (tokens, experts) = next(iter(thin.items()))
        raise CalibrationDataError(
            f"Calibration data too small: layer {name} saw {tokens} token(s) for {experts} experts "
            f"({len(thin)} layer(s) below {min_tokens_per_expert:g} token per expert). Give more examples "
            "(--num-calibration, a longer file), or a .jsonl file with 'target' fields so decoder layers see "
            "target tokens."
        )

