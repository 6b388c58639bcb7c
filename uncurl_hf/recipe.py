"""``PruneRecipe``: WHAT a pruning run does — every setting that changes the output's bytes.

A recipe names the method (with its typed options), how many experts each layer keeps (a factor, explicit
per-layer counts, a quality budget ``max_drop`` searched on the task's dev split, or a saved plan to apply), the
calibration data (:class:`CalibrationSpec`), whether planning is sequential, and the export format. Everything about
HOW the run executes (device, streaming, shards, fsync, Hub push, ...) is in :class:`uncurl_hf.options.RunOptions`
and never changes the bytes.

Recipes round-trip through YAML (``PruneRecipe.load``/``save``); every output folder carries the recipe that made it
as ``uncurl_recipe.yaml``, and its model card quotes it with the command that reruns it. Validation happens when a
recipe is built, before any model is loaded, so a typo costs a second, not a calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from uncurl_hf.errors import CalibrationDataError, InvalidFactorError, InvalidPlanError, UncurlError
from uncurl_hf.settings import from_mapping, setting, to_mapping

RECIPE_FILENAME = "uncurl_recipe.yaml"
RECIPE_FORMAT = "uncurl-recipe/1"
EXPORT_FORMATS = ("pruned", "stock")
DEFAULT_METHOD = "frequency"
IN_MEMORY = "<in-memory data given in Python>"


@dataclass
class CalibrationSpec:
    """The calibration data and how it is batched: exactly one of ``task``, ``file`` or (Python only) ``data``.

    ``file`` is a ``.txt`` (one example per line), ``.jsonl`` (``text`` [+ ``target``], ``messages`` rendered with
    the tokenizer's chat template, or ``prompt``/``completion``), a ``.parquet``/``.arrow``/``.csv`` file, or a
    folder written by ``datasets.Dataset.save_to_disk`` (see :mod:`uncurl_hf.calibration.data`); ``column`` /
    ``target_column`` pick the fields of tabular sources and ``split`` the split of a saved ``DatasetDict``.
    ``num_examples`` are drawn with ``seed`` (seeded, without replacement) when the source holds more.
    ``max_logit_samples`` bounds the router logits / hidden states kept per layer (a seeded uniform sample of real
    tokens), so memory does not grow with the calibration set. ``seed`` also seeds the method (clustering, random).
    """

    task: str | None = setting(None, "--task", help="registered task to calibrate on (its train split)")
    file: str | None = setting(
        None, "--calibration-file", metavar="PATH",
        help=".txt, .jsonl (text[+target] | messages | prompt/completion), .parquet/.arrow/.csv, or a datasets folder",
    )
    column: str | None = setting(None, "--calibration-column", metavar="NAME",
                                 help="text column of a tabular/datasets source (default: text, messages or prompt)")
    target_column: str | None = setting(None, "--calibration-target-column", metavar="NAME",
                                        help="target column of a tabular/datasets source (default: target/completion)")
    split: str | None = setting(None, "--calibration-split", metavar="NAME",
                                help="split of a saved DatasetDict folder (default: train)")
    num_examples: int = setting(256, "--num-calibration", help="calibration examples (default 256)")
    max_length: int = setting(128, "--max-length", help="max tokens per calibration example (default 128)")
    batch_size: int = setting(16, "--batch-size", help="calibration batch size (default 16)")
    seed: int = setting(0, "--seed", help="seed of the example sample, the token sample and the method (default 0)")
    max_logit_samples: int = setting(4096, "--max-logit-samples", metavar="N",
                                     help="router-logit / hidden-state tokens kept per layer (default 4096)")
    data: Any = setting(None, help="Python only: a list of texts / dicts, or a datasets.Dataset", yaml=False)

    def __post_init__(self) -> None:
        for name in ("num_examples", "max_length", "batch_size", "max_logit_samples"):
            _positive(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UncurlError(f"The seed must be an integer >= 0, got {self.seed!r}.")
        if self.file is not None:
            self.file = str(self.file)
            if self.file == IN_MEMORY:
                raise CalibrationDataError(
                    "This recipe was written by a run calibrated on data given in Python; give the data again "
                    "(CalibrationSpec(data=...)) or a file (--calibration-file)."
                )

    @property
    def sources(self) -> list[str]:
        """The names of the sources given (the run needs exactly one, unless a saved plan is applied)."""
        return [name for name in ("task", "file", "data") if getattr(self, name) is not None]

    def require_one_source(self) -> None:
        """A run that calibrates needs exactly one source (checked by ``prune``; a recipe may leave it open, e.g. a
        recipe file whose data comes from the command line, or a planning config in a test)."""
        if len(self.sources) != 1:
            raise CalibrationDataError(
                "Give exactly one source of calibration data: a task (--task NAME) or a file (--calibration-file F)"
                + (f"; got {' and '.join(self.sources)}." if self.sources else ".")
            )


@dataclass
class PruneRecipe:
    """What to do to a model. Exactly one of ``factor``, ``num_experts_per_layer``, ``max_drop`` or ``plan``.

    ``factor`` (> 1): every layer keeps ``floor(E / factor)`` experts (adaptive methods re-split that total across
    layers). ``num_experts_per_layer``: ``{layer: k}`` or a list in the family's sparse-layer order. ``max_drop``
    (points): the fewest experts whose dev-split score stays within that many points of the unpruned model (needs
    ``calibration.task``). ``plan``: apply a saved ``uncurl_plan.json`` (no method, no calibration).
    ``method_options`` are checked against the method's ``Options`` dataclass (``uncurl methods`` lists them).
    ``scale_expert_capacity`` raises each pruned Switch layer's per-expert token capacity by ``E_old / E_new``, so
    tokens the original model processed are not silently dropped.
    """

    method: str | None = setting(None, "--method", help=f"pruning method (default {DEFAULT_METHOD}; `uncurl methods`)")
    method_options: dict[str, Any] = setting(
        default_factory=dict, help="the method's options (KEY=VALUE, repeatable; `uncurl methods` lists them)",
    )
    factor: float | None = setting(None, "--factor", metavar="F", help="keep floor(E / F) experts per layer (F > 1)")
    num_experts_per_layer: dict[str, int] | list[int] | None = setting(
        None, "--num-experts-per-layer", metavar="K,K,...",
        help="explicit counts: one per sparse layer in order (4,4,2,2) or LAYER=K pairs",
    )
    max_drop: float | None = setting(
        None, "--max-drop", metavar="POINTS",
        help="the fewest experts whose dev-split score stays within POINTS of the unpruned model (needs --task)",
    )
    plan: str | None = setting(None, "--plan", metavar="PLAN.json",
                               help="apply a saved plan (uncurl_plan.json) instead of running a method")
    calibration: CalibrationSpec = setting(default_factory=CalibrationSpec, help="the calibration data")
    sequential: bool = setting(False, "--sequential", action="store_true",
                               help="plan layer by layer, each on statistics of the model with earlier layers pruned")
    export: Literal["pruned", "stock"] = setting(
        "pruned", "--export", choices=EXPORT_FORMATS,
        help="pruned: per-layer counts (Pruned* classes); stock: the stock family config (equal counts only)",
    )
    scale_expert_capacity: bool = setting(
        True, "--keep-expert-capacity", action="store_false",
        help="do not raise the per-expert token capacity of pruned Switch layers by E_old/E_new",
    )

    def __post_init__(self) -> None:
        if isinstance(self.calibration, Mapping):
            self.calibration = from_mapping(CalibrationSpec, self.calibration, "calibration")
        if not isinstance(self.calibration, CalibrationSpec):
            raise UncurlError(f"calibration must be a CalibrationSpec or a mapping, got {self.calibration!r}.")
        if is_options(self.method_options):
            self.method_options = to_mapping(self.method_options)
        self.method_options = dict(self.method_options or {})
        if self.export not in EXPORT_FORMATS:
            raise UncurlError(f"Unknown export format {self.export!r}; use one of {', '.join(EXPORT_FORMATS)}.")
        chosen = [name for name in ("factor", "num_experts_per_layer", "max_drop", "plan") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise InvalidFactorError(
                f"Give one of --factor, --num-experts-per-layer, --max-drop or --plan, not {' and '.join(chosen)}: "
                "each of them decides how many experts every layer keeps."
            )
        if not chosen:
            raise InvalidFactorError(
                "Give a pruning factor (e.g. --factor 2 keeps half of the experts of every layer), explicit "
                "per-layer counts (--num-experts-per-layer), a quality budget (--max-drop) or a saved --plan."
            )
        if self.factor is not None:
            self.factor = _checked_factor(self.factor)
        if self.num_experts_per_layer is not None:
            self.num_experts_per_layer = checked_counts(self.num_experts_per_layer)
        if self.max_drop is not None:
            self._check_max_drop()
        if self.plan is not None:
            self.plan = str(self.plan)
            if self.method is not None or self.method_options:
                raise InvalidPlanError("--plan applies a saved plan, so there is no method to run; drop --method.")
        else:
            self.method = DEFAULT_METHOD if self.method is None else self.method
            if not isinstance(self.method, str):
                raise UncurlError(f"The method must be a registered method name, got {self.method!r}.")
            from uncurl_hf.methods import get_method

            get_method(self.method).parse_options(self.method_options)  # unknown keys / wrong types fail now
        if len(self.calibration.sources) > 1:
            self.calibration.require_one_source()

    # -- what the rest of the pipeline reads -------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The run's seed (one seed: the calibration sample, the token sample and the method)."""
        return self.calibration.seed

    @property
    def method_kwargs(self) -> dict[str, Any]:
        """The options as given (what plans record in ``metadata.method_kwargs``)."""
        return dict(self.method_options)

    def options(self) -> Any:
        """The method's typed ``Options`` instance (defaults filled in)."""
        from uncurl_hf.methods import get_method

        return get_method(self.method).parse_options(self.method_options)

    def with_counts(self, counts: Mapping[str, int]) -> "PruneRecipe":
        """This recipe with explicit per-layer counts in place of its factor / budget (a copy)."""
        return replace(self, factor=None, max_drop=None, num_experts_per_layer=dict(counts),
                       calibration=replace(self.calibration))

    # -- files -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every setting, YAML-safe: ``from_dict(to_dict())`` equals the recipe. A Python ``data`` source cannot be
        written; the written recipe then says so (``calibration.file: <in-memory ...>``) and cannot be rerun as is."""
        data = {"format": RECIPE_FORMAT, **to_mapping(self)}
        if self.calibration.data is not None:
            data["calibration"]["file"] = IN_MEMORY
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> "PruneRecipe":
        data = dict(data)
        version = data.pop("format", RECIPE_FORMAT)
        if version != RECIPE_FORMAT:
            raise UncurlError(f"{where}: format {version!r} is not {RECIPE_FORMAT!r}; this uncurl-hf cannot read it.")
        return from_mapping(cls, data, where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(dump_yaml(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PruneRecipe":
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UncurlError(f"Recipe file {path} does not exist; check the path.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UncurlError(f"Cannot read recipe file {path}: {exc}.") from None
        except yaml.YAMLError as exc:
            raise UncurlError(f"Recipe file {path} is not valid YAML ({exc}).") from None
        if not isinstance(data, Mapping):
            raise UncurlError(f"Recipe file {path} must hold a mapping of settings (method, factor, calibration...).")
        return cls.from_dict(data, where=f"recipe {path.name}")

    def _check_max_drop(self) -> None:
        from uncurl_hf.errors import MaxDropError

        value = self.max_drop
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MaxDropError(f"--max-drop is a number of points >= 0 (1.0 = one accuracy point), got {value!r}.")
        self.max_drop = float(value)
        if self.calibration.task is None or self.calibration.sources != ["task"]:
            raise MaxDropError(
                "--max-drop needs --task (not --calibration-file): it calibrates on the task's train split and "
                "checks the quality budget on its dev split."
            )


def dump_yaml(data: Mapping[str, Any]) -> str:
    """Block-style YAML in the dict's own key order (what recipes and sweep configs are written as)."""
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def is_options(value: Any) -> bool:
    from dataclasses import is_dataclass

    return is_dataclass(value) and not isinstance(value, type)


def _checked_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise InvalidFactorError(f"The pruning factor must be a number > 1, got {factor!r}.")
    if not math.isfinite(factor):
        raise InvalidFactorError(f"The pruning factor must be a finite number > 1, got {factor}.")
    if factor < 1:
        raise InvalidFactorError(
            f"Pruning factor {factor:g} is below 1: the factor divides the number of experts (2 keeps half of "
            "them). Use a factor > 1."
        )
    if factor == 1:
        raise InvalidFactorError(
            "Pruning factor 1 keeps every expert, so nothing would be pruned. Use a factor > 1 (2 keeps half of "
            "the experts); to rewrite a checkpoint unchanged on purpose, give the full per-layer counts "
            "(--num-experts-per-layer)."
        )
    return float(factor)


def checked_counts(counts: Any) -> dict[str, int] | list[int]:
    """Per-layer counts as ``{layer name: k}`` or ``[k, ...]`` (layer order), every ``k`` an integer >= 1.

    Whether they fit the model (layer names, list length, ``k <= E``) is checked by
    :func:`uncurl_hf.surgery.budget.expert_budget` once the layers are known.
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


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationDataError(f"{name} must be an integer >= 1, got {value!r}.")


