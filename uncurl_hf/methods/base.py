"""The contract of a pruning method: calibration stats + budget in, :class:`PruningPlan` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

from uncurl_hf.errors import UncurlError
from uncurl_hf.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from uncurl_hf.calibration.run import CalibrationStats
    from uncurl_hf.recipe import PruningConfig
    from uncurl_hf.families.base import MoEFamily


class PruningMethod(ABC):
    """A named way to decide, per layer, which experts survive (and which merge into which).

    Subclasses set ``name``/``description`` and implement :meth:`plan_layer` (per-layer decisions), or override
    :meth:`__call__` when layers must be decided jointly. ``budget[layer]`` is the number of output experts;
    methods must not exceed it (adaptive methods re-split the total across layers in :meth:`allocate` first).
    ``config.method_kwargs`` carries method-specific options, read with :func:`method_options`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    merges: ClassVar[bool] = False  # True when plans may merge experts (groups of several members)
    needs_calibration: ClassVar[bool] = True  # False: ``stats`` may be empty (e.g. random)

    def __call__(
        self,
        stats: "CalibrationStats",
        model: nn.Module,
        family: "MoEFamily",
        budget: Mapping[str, int],
        config: "PruningConfig",
    ) -> PruningPlan:
        budget = self.allocate(stats, budget, config)
        layers = [
            self.plan_layer(
                layer.name, layer.num_experts, stats.get(layer.name), budget[layer.name], model, family, config
            )
            for layer in family.sparse_layers(model)
        ]
        return make_plan(model, family, self.name, layers, config)

    def allocate(
        self, stats: "CalibrationStats", budget: Mapping[str, int], config: "PruningConfig"
    ) -> dict[str, int]:
        """The per-layer output counts this method produces, given the factor's per-layer ``budget``.

        The default keeps ``budget``. Adaptive methods re-split the same total across layers from the task
        statistics. The result must depend on ``budget`` only through its total, so that applying it to its own
        output changes nothing: :func:`uncurl_hf.pipeline.prune.prune` calls it to know the per-layer counts to validate.
        """
        return dict(budget)

    @abstractmethod
    def plan_layer(
        self,
        name: str,
        num_experts: int,
        stats: Any,
        k: int,
        model: nn.Module,
        family: "MoEFamily",
        config: "PruningConfig",
    ) -> LayerPlan:
        """The plan of one layer with ``num_experts`` experts reduced to ``k`` output experts.

        ``stats`` is the layer's :class:`~uncurl_hf.calibration.run.ExpertStats` (``None`` without calibration).
        """


def make_plan(
    model: nn.Module, family: "MoEFamily", method: str, layers: list[LayerPlan], config: "PruningConfig"
) -> PruningPlan:
    """Wrap layer plans with provenance taken from the model and the config."""
    return PruningPlan(
        model_type=str(model.config.model_type),
        family=family.name,
        method=method,
        layers=layers,
        factor=config.factor,
        seed=config.seed,
        base_model=getattr(model, "name_or_path", None) or None,
        metadata={"method_kwargs": dict(config.method_kwargs)} if config.method_kwargs else {},
    )


def method_options(config: "PruningConfig", method: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``config.method_kwargs`` over ``defaults``; an unknown key or a value of the wrong type is an error.

    Values arrive from the CLI parsed as JSON, so a default's type is the expected type (ints are accepted for
    floats). Failing here, before any weight is touched, turns a typo into a one-line error naming the options.
    """
    given = dict(config.method_kwargs or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
        raise UncurlError(f"Method {method!r} has no option(s) {unknown}; its options (with defaults) are: {known}.")
    options = dict(defaults)
    for key, value in given.items():
        expected = type(defaults[key])
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise UncurlError(
                f"Method {method!r} option {key!r} must be a {expected.__name__}, got {value!r}."
            )
        options[key] = value
    return options
