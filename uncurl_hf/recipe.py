"""``PruningConfig``: every knob of one pruning run, validated up front so errors come before any heavy work."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from uncurl_hf.errors import CalibrationDataError, InvalidFactorError, UncurlError


@dataclass
class PruningConfig:
    """How to prune.

    Exactly one of ``factor`` (every layer keeps ``floor(E / factor)`` experts, see
    :func:`uncurl_hf.surgery.budget.expert_budget`) or ``num_experts_per_layer`` (``{layer name: k}``, or a list of counts in
    the family's sparse-layer order, as the CLI's ``--num-experts-per-layer 4,4,2,2`` gives) must be given.
    ``factor`` must be > 1: a factor of 1 would prune nothing, so it is almost always a typo (e.g. for 0.1) and is
    refused; a run that keeps every expert on purpose (a baseline, a format conversion) gives the full counts.
    ``max_logit_samples`` bounds the router logits / hidden states kept per layer during calibration (a seeded
    uniform sample of real tokens), so memory does not grow with the calibration set.
    ``scale_expert_capacity`` raises each pruned layer's per-sequence expert capacity by ``E_old / E_new``
    (rounded up): the same tokens now share fewer experts, and keeping the old capacity would silently drop
    tokens the original model processed.
    """

    method: str = "frequency"
    factor: float | None = None
    num_experts_per_layer: dict[str, int] | list[int] | None = None
    num_calibration_examples: int = 256
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    max_logit_samples: int = 4096
    scale_expert_capacity: bool = True
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise an :class:`UncurlError` subclass whose message names the fix."""
        if self.factor is None and self.num_experts_per_layer is None:
            raise InvalidFactorError(
                "Give a pruning factor (e.g. --factor 2 keeps half of the experts of every layer) "
                "or explicit per-layer expert counts."
            )
        if self.factor is not None and self.num_experts_per_layer is not None:
            raise InvalidFactorError("Give either a pruning factor or per-layer expert counts, not both.")
        if self.factor is not None:
            if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
                raise InvalidFactorError(f"The pruning factor must be a number > 1, got {self.factor!r}.")
            if not math.isfinite(self.factor):
                raise InvalidFactorError(f"The pruning factor must be a finite number > 1, got {self.factor}.")
            if self.factor < 1:
                raise InvalidFactorError(
                    f"Pruning factor {self.factor:g} is below 1: the factor divides the number of experts "
                    "(2 keeps half of them). Use a factor > 1."
                )
            if self.factor == 1:
                raise InvalidFactorError(
                    "Pruning factor 1 keeps every expert, so nothing would be pruned. Use a factor > 1 (2 keeps "
                    "half of the experts); to rewrite a checkpoint unchanged on purpose, give the full per-layer "
                    "counts (--num-experts-per-layer)."
                )
            self.factor = float(self.factor)
        if self.num_experts_per_layer is not None:
            self.num_experts_per_layer = _checked_counts(self.num_experts_per_layer)
        _positive("num_calibration_examples", self.num_calibration_examples, CalibrationDataError)
        _positive("max_length", self.max_length, CalibrationDataError)
        _positive("batch_size", self.batch_size, CalibrationDataError)
        _positive("max_logit_samples", self.max_logit_samples, CalibrationDataError)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UncurlError(f"The seed must be an integer >= 0, got {self.seed!r}.")
        if not isinstance(self.method, str) or not self.method:
            raise UncurlError(f"The method must be a registered method name, got {self.method!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked_counts(counts: Any) -> dict[str, int] | list[int]:
    """Per-layer counts as ``{layer name: k}`` or ``[k, ...]`` (layer order), every ``k`` an integer >= 1.

    Counts are checked here, before any model is loaded; whether they fit the model (layer names, list length,
    ``k <= E``) is checked by :func:`uncurl_hf.surgery.budget.expert_budget` once the layers are known.
    """
    if isinstance(counts, Mapping):
        if not all(isinstance(name, str) for name in counts):
            raise InvalidFactorError(f"Per-layer expert counts must be keyed by layer name, got keys {list(counts)}.")
        values = list(counts.values())
    elif isinstance(counts, (list, tuple)):
        values = list(counts)
    else:
        raise InvalidFactorError(
            "Per-layer expert counts must be a {layer name: count} mapping or a list of counts in layer order "
            f"(--num-experts-per-layer 4,4,2,2), got {type(counts).__name__}."
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or not values:
        raise InvalidFactorError(
            "Per-layer expert counts must be integers >= 1 (every layer keeps at least one expert), "
            f"got {bad if values else 'no counts'}."
        )
    return dict(counts) if isinstance(counts, Mapping) else values


def _positive(name: str, value: Any, error: type[UncurlError]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be an integer >= 1, got {value!r}.")
