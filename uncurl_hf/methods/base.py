"""The contract of a pruning method: calibration stats + budget in, :class:`PruningPlan` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

from uncurl_hf.plan import LayerPlan, PruningPlan
from uncurl_hf.settings import from_mapping, setting

if TYPE_CHECKING:
    from uncurl_hf.calibration.stats import CalibrationStats, ExpertStats
    from uncurl_hf.families.base import MoEFamily
    from uncurl_hf.recipe import PruneRecipe


@dataclass(frozen=True)
class UniformOptions:
    """The options of a method that always keeps ``floor(E / factor)`` experts in every layer.

    ``uniform`` is accepted (and has no effect) so that ``uncurl prune --uniform`` works with every method.
    """

    uniform: bool = setting(True, help="accepted for --uniform; this method always keeps floor(E / factor) per layer")


class PruningMethod(ABC):
    """A named way to decide, per layer, which experts survive (and which merge into which).

    Subclasses set ``name``/``description``, declare their options as a frozen dataclass ``Options`` (fields made
    with :func:`uncurl_hf.settings.setting`: default, type, help) and implement :meth:`plan_layer` (per-layer
    decisions), or override :meth:`__call__` when layers must be decided jointly. ``budget[layer]`` is the number of
    output experts; methods must not exceed it (adaptive methods re-split the total across layers in
    :meth:`allocate` first). ``config`` is the run's :class:`~uncurl_hf.recipe.PruneRecipe`; :meth:`options` reads
    its ``method_options`` into an ``Options`` instance.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type] = UniformOptions
    merges: ClassVar[bool] = False  # True when plans may merge experts (groups of several members)
    needs_calibration: ClassVar[bool] = True  # False: ``stats`` may be empty (e.g. random)
    citation: ClassVar[str | None] = None  # BibTeX of the method's paper (model cards cite it); None: no paper

    def __call__(
        self,
        stats: "CalibrationStats",
        model: nn.Module,
        family: "MoEFamily",
        budget: Mapping[str, int],
        config: "PruneRecipe",
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
        self, stats: "CalibrationStats", budget: Mapping[str, int], config: "PruneRecipe"
    ) -> dict[str, int]:
        """The per-layer output counts this method produces, given the factor's per-layer ``budget``.

        The default keeps ``budget``. Adaptive methods re-split the same total across layers from the task
        statistics. The result must depend on ``budget`` only through its total, so that applying it to its own
        output changes nothing: :func:`uncurl_hf.pipeline.planning.plan_model` calls it to know the per-layer counts to validate.
        """
        return dict(budget)

    def parse_options(self, values: Mapping[str, Any] | None) -> Any:
        """``values`` (a recipe's ``method_options``, ``--method-arg`` pairs) as this method's ``Options``: an unknown
        key or a value of the wrong type is one error naming the options, before any weight is touched."""
        options = from_mapping(self.Options, values, where=f"Method {self.name!r} options")
        self.check_options(options)
        return options

    def check_options(self, options: Any) -> None:
        """Checks beyond the types (ranges, cross-field rules); the default has none."""

    def options(self, config: "PruneRecipe") -> Any:
        """The run's options for this method (``config.method_kwargs`` over the ``Options`` defaults)."""
        return self.parse_options(config.method_kwargs)

    @classmethod
    def option_lines(cls) -> list[str]:
        """``name (type, default): help`` per option, for ``uncurl methods``."""
        from typing import get_type_hints

        from uncurl_hf.settings import type_name

        hints = get_type_hints(cls.Options)
        return [
            f"{f.name} ({type_name(hints[f.name])}, default {f.default!r}): {f.metadata.get('help', '')}"
            for f in fields(cls.Options)
        ]

    @abstractmethod
    def plan_layer(
        self,
        name: str,
        num_experts: int,
        stats: Any,
        k: int,
        model: nn.Module,
        family: "MoEFamily",
        config: "PruneRecipe",
    ) -> LayerPlan:
        """The plan of one layer with ``num_experts`` experts reduced to ``k`` output experts.

        ``stats`` is the layer's :class:`~uncurl_hf.calibration.stats.ExpertStats` (``None`` without calibration).
        """


def rank_by_score(stats: "ExpertStats", scores: Any) -> list[int]:
    """Experts by ``scores`` (one value per expert), highest first; ties: routing count, gate mass, lower index.

    The tie-breaking every saliency method (REAP, EAN) shares, so a plan never depends on sort stability.
    """
    values = scores.tolist() if hasattr(scores, "tolist") else list(scores)
    counts = stats.counts.tolist()
    mass = stats.gate_mass.tolist()
    return sorted(range(stats.num_experts), key=lambda e: (-values[e], -counts[e], -mass[e], e))


def make_plan(
    model: nn.Module, family: "MoEFamily", method: str, layers: list[LayerPlan], config: "PruneRecipe"
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


def stable_value(value: float) -> float:
    """``value`` to 3 significant digits: what a plan stores of a statistic summed from float32 values (REAP scores
    as merge weights, output scales). Such sums differ by ~1e-7 relative with the thread count; stored unrounded they
    would make the checkpoint's bytes depend on it (tests/test_determinism.py). At 3 digits a value changes its
    rounding only within ~1e-7 of a boundary (about 1 value in 5,000), and a weight 0.05% off costs nothing
    measurable."""
    return float(f"{float(value):.3g}")
