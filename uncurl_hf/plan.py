"""Pruning plans: which original experts become each output expert, with what merge weights.

A plan is the complete, JSON-serialisable description of the surgery, separate from how it was found (methods)
and from how it is executed (:mod:`uncurl_hf.surgery.apply`). Every output expert is a *group* of original experts:

* pruning keeps expert ``j`` as the singleton group ``[j]`` (weight ``[1.0]``);
* merging averages the members' weights with ``weights[g]`` (summing to 1); the first member is the *anchor*.

``router`` says how a merged group's router row is built: ``"weighted"`` (weighted sum of the member rows with
the group's weights), ``"anchor"`` (the anchor's row) or ``"fitted"`` (sum of the member rows with the coefficients
``extras["router_coefficients"]``, per group per member, fitted on calibration logits by
:mod:`uncurl_hf.methods._router_fit`; singleton groups are scaled by theirs too) or ``"map"`` (the references'
*logical merge*: every original router row is kept and the checkpoint records, per layer, which output expert each
original expert's tokens go to; routing is then exactly the original model's, so the groups must cover every
original expert). ``extras`` carries method-specific, JSON-able data; the two :mod:`uncurl_hf.surgery.apply`
understands are ``extras["output_scales"]`` (per group, ``None`` or a number >= 0 that multiplies the output expert's
output: its output projection is scaled) and ``extras["permutations"]``: per group, per member, either ``None`` or a
permutation ``p`` of the expert's hidden neurons, applied as ``W[p]`` along the family's neuron axis before averaging
(neuron alignment à la weight matching / M-SMoE).
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from uncurl_hf.errors import InvalidPlanError

PLAN_FORMAT_VERSION = 1
PLAN_FILENAME = "uncurl_plan.json"
ROUTER_RULES = ("weighted", "anchor", "fitted", "map")
_WEIGHT_TOLERANCE = 1e-6


@dataclass
class LayerPlan:
    """The output experts of one sparse layer, as groups of original expert indices."""

    name: str
    num_experts: int
    groups: list[list[int]]
    weights: list[list[float]] = field(default_factory=list)
    router: str = "weighted"
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Plans come from JSON files users edit or download: check every field's type here, so any malformed plan
        # is an InvalidPlanError naming the field rather than a TypeError deep inside validate() or apply_plan().
        where = f"layer {self.name!r}"
        if not isinstance(self.name, str):
            raise InvalidPlanError(f"A layer plan's name must be a string, got {self.name!r}.")
        if not _is_int(self.num_experts) or self.num_experts < 0:
            raise InvalidPlanError(f"{where}: num_experts must be an integer >= 0, got {self.num_experts!r}.")
        self.num_experts = int(self.num_experts)
        if not isinstance(self.router, str) or not isinstance(self.extras, dict):
            raise InvalidPlanError(f"{where}: router must be a string and extras an object.")
        if not _is_list_of_lists(self.groups, _is_int_like):
            raise InvalidPlanError(f"{where}: groups must be a list of lists of expert indices, got {self.groups!r}.")
        self.groups = [[int(i) for i in group] for group in self.groups]
        if not self.weights:
            self.weights = [[1.0 / len(group)] * len(group) if group else [] for group in self.groups]
        if not _is_list_of_lists(self.weights, _is_number):
            raise InvalidPlanError(f"{where}: weights must be a list of lists of numbers, got {self.weights!r}.")
        self.weights = [[float(w) for w in ws] for ws in self.weights]
        permutations = self.extras.get("permutations")
        if permutations is not None and not (
            isinstance(permutations, list)
            and all(perms is None or _is_list_of_lists(perms, _is_int_like, allow_none=True) for perms in permutations)
        ):
            raise InvalidPlanError(f"{where}: extras['permutations'] must be a list (per group) of lists (per member).")

    @classmethod
    def keep(cls, name: str, num_experts: int, kept: list[int]) -> "LayerPlan":
        """Plain pruning: keep the experts ``kept`` (output order = sorted original order)."""
        return cls(name=name, num_experts=num_experts, groups=[[int(i)] for i in sorted(kept)])

    @property
    def num_output_experts(self) -> int:
        return len(self.groups)

    @property
    def is_pure_pruning(self) -> bool:
        """True when every output expert is a single original expert (no merging)."""
        return all(len(group) == 1 for group in self.groups)

    @property
    def is_identity(self) -> bool:
        """True when applying the plan gives the layer back as it is: every expert alone, in order, unpermuted,
        unscaled, its router row its own (``"fitted"`` rescales even a singleton's row)."""
        return (
            self.groups == [[i] for i in range(self.num_experts)]
            and self.router != "fitted"
            and not any(perm is not None for perms in self.extras.get("permutations") or [] for perm in perms or [])
            and not any(scale is not None for scale in self.extras.get("output_scales") or [])
        )

    @property
    def expert_map(self) -> list[int] | None:
        """For the ``"map"`` router: output expert of each original expert (``None`` for the other rules)."""
        if self.router != "map":
            return None
        owner = {i: g for g, group in enumerate(self.groups) for i in group}
        return [owner[i] for i in range(self.num_experts)]

    @property
    def used(self) -> list[int]:
        """Original experts that contribute to some output expert, sorted."""
        return sorted(i for group in self.groups for i in group)

    @property
    def dropped(self) -> list[int]:
        """Original experts removed without contributing."""
        used = set(self.used)
        return [i for i in range(self.num_experts) if i not in used]

    def validate(self, num_experts: int | None = None, budget: int | None = None) -> None:
        """Raise :class:`InvalidPlanError` naming the first problem found."""
        where = f"layer {self.name!r}"
        expected = self.num_experts if num_experts is None else num_experts
        if num_experts is not None and self.num_experts != num_experts:
            raise InvalidPlanError(
                f"{where}: the plan was made for {self.num_experts} experts but the model layer has {num_experts}; "
                "recompute the plan on this model."
            )
        if not self.groups:
            raise InvalidPlanError(f"{where}: no output experts; every layer must keep at least 1 expert.")
        if budget is not None and len(self.groups) > budget:
            raise InvalidPlanError(f"{where}: {len(self.groups)} output experts exceed the budget of {budget}.")
        seen: set[int] = set()
        for g, group in enumerate(self.groups):
            if not group:
                raise InvalidPlanError(f"{where}: group {g} is empty; remove it or give it a member.")
            for i in group:
                if not 0 <= i < expected:
                    raise InvalidPlanError(f"{where}: expert index {i} out of range 0..{expected - 1}.")
                if i in seen:
                    raise InvalidPlanError(f"{where}: expert {i} appears in more than one group (or twice).")
                seen.add(i)
        if len(self.weights) != len(self.groups):
            raise InvalidPlanError(f"{where}: {len(self.weights)} weight lists for {len(self.groups)} groups.")
        for g, (group, weights) in enumerate(zip(self.groups, self.weights)):
            if len(weights) != len(group):
                raise InvalidPlanError(f"{where}: group {g} has {len(group)} members but {len(weights)} weights.")
            if any(not math.isfinite(w) or w < 0 for w in weights):
                raise InvalidPlanError(f"{where}: group {g} weights must be finite and >= 0, got {weights}.")
            if abs(sum(weights) - 1.0) > _WEIGHT_TOLERANCE:
                raise InvalidPlanError(f"{where}: group {g} weights sum to {sum(weights):.6g}, they must sum to 1.")
        if self.router not in ROUTER_RULES:
            raise InvalidPlanError(f"{where}: router rule {self.router!r} unknown; use one of {ROUTER_RULES}.")
        if self.router == "map" and len(seen) != expected:
            raise InvalidPlanError(
                f"{where}: router rule 'map' keeps every original router row, so every expert needs a group; "
                f"{expected - len(seen)} of {expected} are in none (add them to a group, or use router 'weighted')."
            )
        coefficients = self.extras.get("router_coefficients")
        if self.router == "fitted" and not (
            isinstance(coefficients, list)
            and len(coefficients) == len(self.groups)
            and all(
                isinstance(row, list) and len(row) == len(group) and all(_is_number(c) and math.isfinite(c) for c in row)
                for row, group in zip(coefficients, self.groups)
            )
        ):
            raise InvalidPlanError(
                f"{where}: router rule 'fitted' needs extras['router_coefficients']: one finite number per group member."
            )
        permutations = self.extras.get("permutations")
        if permutations is not None:
            if len(permutations) != len(self.groups) or any(
                perms is not None and len(perms) != len(group) for perms, group in zip(permutations, self.groups)
            ):
                raise InvalidPlanError(f"{where}: extras['permutations'] must give one entry per group member.")
        scales = self.extras.get("output_scales")
        if scales is not None and not (
            isinstance(scales, list) and len(scales) == len(self.groups)
            and all(s is None or (_is_number(s) and math.isfinite(s) and s >= 0) for s in scales)
        ):
            raise InvalidPlanError(
                f"{where}: extras['output_scales'] must give one finite number >= 0 (or null) per group."
            )


@dataclass
class PruningPlan:
    """Plans of every sparse layer of one model, plus provenance."""

    model_type: str
    family: str
    method: str
    layers: list[LayerPlan]
    factor: float | None = None
    seed: int = 0
    base_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        for key in ("model_type", "family", "method"):
            if not isinstance(getattr(self, key), str):
                raise InvalidPlanError(f"The plan's {key} must be a string, got {getattr(self, key)!r}.")
        if not isinstance(self.layers, list) or not all(isinstance(layer, LayerPlan) for layer in self.layers):
            raise InvalidPlanError("The plan's layers must be a list of layer plans.")
        if self.factor is not None and (not _is_number(self.factor) or not math.isfinite(float(self.factor))):
            raise InvalidPlanError(f"The plan's factor must be a finite number or null, got {self.factor!r}.")
        if not _is_int(self.seed) or not _is_int(self.format_version):
            raise InvalidPlanError(f"The plan's seed and format_version must be integers, got {self.seed!r}.")
        self.seed, self.format_version = int(self.seed), int(self.format_version)
        self.factor = None if self.factor is None else float(self.factor)
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise InvalidPlanError(f"The plan's base_model must be a string or null, got {self.base_model!r}.")
        if not isinstance(self.metadata, dict):
            raise InvalidPlanError("The plan's metadata must be an object.")

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def has_expert_maps(self) -> bool:
        """Whether some layer is a logical merge (router rule ``"map"``): no stock checkpoint can hold it."""
        return any(layer.router == "map" for layer in self.layers)

    @property
    def counts(self) -> dict[str, int]:
        """``{layer: number of output experts}``."""
        return {layer.name: layer.num_output_experts for layer in self.layers}

    def validate(self, target: Any, budget: Mapping[str, int] | None = None) -> None:
        """Check the plan against a model (or ``{layer name: num_experts}``) and an optional budget.

        Every sparse layer of the target must have exactly one plan, and no plan may name a layer the target
        lacks. Raises :class:`InvalidPlanError` naming the problem.
        """
        sizes = _layer_sizes(target)
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidPlanError(f"The plan lists layers {duplicates} more than once.")
        unknown = sorted(set(names) - set(sizes))
        if unknown:
            raise InvalidPlanError(
                f"The plan names layers {unknown} that the model does not have (model layers: {sorted(sizes)}); "
                "it was made for another model: recompute the plan on this one."
            )
        missing = sorted(set(sizes) - set(names))
        if missing:
            raise InvalidPlanError(
                f"The plan has no entry for layers {missing}; give every sparse layer a LayerPlan "
                "(LayerPlan.keep(name, E, range(E)) keeps a layer unchanged)."
            )
        for layer in self.layers:
            layer.validate(sizes[layer.name], None if budget is None else budget.get(layer.name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, short lists on one line) so identical plans give identical files."""
        return _dumps(self.to_dict()) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningPlan":
        try:
            version = data.get("format_version", PLAN_FORMAT_VERSION)
            if not _is_int(version):
                raise InvalidPlanError(f"The plan's format_version must be an integer, got {version!r}.")
            if version > PLAN_FORMAT_VERSION:
                raise InvalidPlanError(
                    f"Plan format version {version} is newer than this uncurl-hf understands "
                    f"({PLAN_FORMAT_VERSION}); upgrade uncurl-hf."
                )
            if not isinstance(data["layers"], list) or not all(isinstance(layer, dict) for layer in data["layers"]):
                raise InvalidPlanError("The plan's layers must be a list of objects (name, num_experts, groups, ...).")
            layers = [LayerPlan(**layer) for layer in data["layers"]]
            fields = {k: v for k, v in data.items() if k not in {"layers", "format_version"}}
            return cls(layers=layers, format_version=version, **fields)
        except InvalidPlanError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidPlanError(
                f"Malformed pruning plan ({type(exc).__name__}: {exc}); write plans with `uncurl prune --plan-out`."
            ) from exc

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidPlanError(
                f"The pruning plan is not valid JSON: {exc}. Use an uncurl_plan.json written by `uncurl prune` "
                "(in its output folder, or --plan-out)."
            ) from exc
        if not isinstance(data, dict):
            raise InvalidPlanError(
                "A pruning plan must be a JSON object (an uncurl_plan.json written by `uncurl prune`), not "
                f"a JSON {type(data).__name__}."
            )
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidPlanError(
                f"Cannot read the pruning plan {path}: {exc.strerror or exc}. Check the path (a plan file, or an "
                "output folder holding uncurl_plan.json)."
            ) from exc
        return cls.from_json(text)


def _dumps(value: Any, indent: int = 0, width: int = 100) -> str:
    """Pretty JSON with sorted keys where lists of scalars/short lists stay on one line (readable groups)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}  {json.dumps(str(k))}: {_dumps(value[k], indent + 2, width)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        flat = json.dumps(value, sort_keys=True)
        if len(flat) + indent <= width and "{" not in flat:
            return flat
        items = [f"{pad}  {_dumps(v, indent + 2, width)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)


def _is_int(value: Any) -> bool:
    """A true integer: ``int``, numpy/torch integer scalars (anything with ``__index__``), never ``bool``."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_int_like(value: Any) -> bool:
    """An integer, or a float with an integral value (JSON writers may emit 3.0 for 3)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


def _is_number(value: Any) -> bool:
    """A real number (Python, numpy or torch scalar); not ``bool``, not a string."""
    if isinstance(value, (bool, str, bytes)):
        return False
    return isinstance(value, numbers.Real) or hasattr(value, "__float__")


def _is_list_of_lists(value: Any, item_ok: Any, allow_none: bool = False) -> bool:
    """``value`` is a list whose entries are lists (or ``None`` when allowed) of items passing ``item_ok``."""
    if not isinstance(value, (list, tuple)):
        return False
    for row in value:
        if row is None and allow_none:
            continue
        if not isinstance(row, (list, tuple)) or not all(item_ok(item) for item in row):
            return False
    return True


def _layer_sizes(target: Any) -> dict[str, int]:
    if isinstance(target, Mapping):
        return {str(k): int(v) for k, v in target.items()}
    from uncurl_hf.families import get_family

    return get_family(target).layer_sizes(target)
