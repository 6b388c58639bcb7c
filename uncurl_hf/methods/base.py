"""The contract of a pruning method: calibration stats + budget in, :class:`PruningPlan` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

from uncurl_hf.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from uncurl_hf.calibration import CalibrationStats
    from uncurl_hf.config import PruningConfig
    from uncurl_hf.families.base import MoEFamily


class PruningMethod(ABC):
    """A named way to decide, per layer, which experts survive (and which merge into which).

    Subclasses set ``name``/``description`` and implement :meth:`plan_layer` (per-layer decisions), or override
    :meth:`__call__` when layers must be decided jointly. ``budget[layer]`` is the number of output experts;
    methods must not exceed it. ``config.method_kwargs`` carries method-specific options.
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
        layers = [
            self.plan_layer(
                layer.name, layer.num_experts, stats.get(layer.name), budget[layer.name], model, family, config
            )
            for layer in family.sparse_layers(model)
        ]
        return make_plan(model, family, self.name, layers, config)

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

        ``stats`` is the layer's :class:`~uncurl_hf.calibration.ExpertStats` (``None`` without calibration).
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
