"""Factor sweeps: how much of the unpruned model's score each method keeps at each pruning factor, the largest
factor that stays within a tolerance (the *threshold*) with a bootstrap confidence interval, and a plot.

One sweep = one model x one task x methods x factors. The model is calibrated ONCE (the same seeded draw of
training examples that ``uncurl prune --task`` uses) and every (method, factor) point plans from those statistics
and is pruned in memory (:func:`uncurl_hf.apply_plan`): no checkpoint is written per point. Every point scores the
same evaluation examples and keeps its per-example score vector, so the bootstrap resamples examples without
running any model again, and the sweep's ``results.json`` holds everything needed to recompute thresholds for
another tolerance.

Definitions (the choices, and why):

* Scores are the task metric (``task.metric``, in ``[0, 1]``), computed as the mean of per-example scores
  (:func:`~uncurl_hf.evaluation.scoring.per_example_scores`: exact match for ``accuracy``; a metric without a registered per-example scorer is
  computed example by example with its ``evaluate`` module, and refused when that mean differs from the corpus
  metric, because the bootstrap needs a mean). A *point* of tolerance is 0.01 of the metric (1 accuracy point).
* Factor 1 is the unpruned model; it is always part of a sweep (the reference every threshold needs).
* A factor ``f`` keeps ``max(1, floor(E / f))`` experts per layer (:mod:`uncurl_hf.surgery.budget`'s rule, except that a
  factor larger than a layer's ``E`` is *clamped* to 1 expert there instead of refused: a sweep is about the
  curve, and the clamped layers plus the effective factor ``sum E / sum kept`` are recorded on the point).
* Threshold and bootstrap interval of a method: :mod:`uncurl_hf.experiments.thresholds` (definitions and why);
  the sweep's folder (``results.json``, ``results.csv``, ``plot.png``): :mod:`uncurl_hf.experiments.sweep_output`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from uncurl_hf.errors import SweepError
from uncurl_hf.evaluation.scoring import divergence, score_examples
from uncurl_hf.experiments.thresholds import CONFIDENCE, Threshold, compute_thresholds
from uncurl_hf.recipe import CalibrationSpec
from uncurl_hf.settings import from_mapping, to_mapping

logger = logging.getLogger(__name__)

SWEEP_FORMAT = "uncurl-sweep/2"  # 2: the calibration settings are the recipe's CalibrationSpec
DEFAULT_TOLERANCE = 1.0  # points = hundredths of the metric
DEFAULT_BOOTSTRAP = 1000


# ----------------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs: methods (specs ``name`` or ``name:key=value,...``) x factors on one task split.

    ``calibration`` is the recipe's :class:`~uncurl_hf.recipe.CalibrationSpec` (the task's train split; its seed
    also seeds the bootstrap), so a sweep point is planned exactly as ``uncurl prune`` with that spec would plan it.
    """

    model: str
    task: str
    methods: tuple[str, ...]
    factors: tuple[float, ...]
    split: str = "test"
    max_eval_examples: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    bootstrap: int = DEFAULT_BOOTSTRAP
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    @property
    def seed(self) -> int:
        return self.calibration.seed

    def __post_init__(self) -> None:
        from uncurl_hf.methods import get_method

        spec = self.calibration
        if isinstance(spec, Mapping):
            spec = from_mapping(CalibrationSpec, spec, "sweep calibration")
        if spec.task is None and spec.file is None and spec.data is None:
            spec = replace(spec, task=self.task)
        if spec.sources != ["task"] or spec.task != self.task:
            raise SweepError(f"A sweep calibrates on its task's train split; give calibration task {self.task!r} "
                             "(or none), not another source.")
        object.__setattr__(self, "calibration", spec)
        if not self.methods:
            raise SweepError("Give at least one method (--methods frequency,uncurl).")
        for spec in self.methods:
            get_method(parse_method_spec(spec)[0])  # UnknownMethodError names the registered ones
        if len(set(self.methods)) != len(self.methods):
            raise SweepError(f"Methods are listed twice in {list(self.methods)}; list each once.")
        bad = [f for f in self.factors if isinstance(f, bool) or not isinstance(f, (int, float))
               or not math.isfinite(f) or f < 1]
        if bad or not self.factors:
            raise SweepError(
                f"Sweep factors must be finite numbers >= 1 (1 is the unpruned model), got {list(self.factors)}."
            )
        object.__setattr__(self, "factors", tuple(sorted({1.0, *(float(f) for f in self.factors)})))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise SweepError(f"The tolerance is in points (>= 0; 1.0 = one accuracy point), got {self.tolerance!r}.")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise SweepError(f"--bootstrap is a number of resamples >= 0 (0 skips the CI), got {self.bootstrap!r}.")
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise SweepError(f"max_eval_examples must be >= 1 (or None for the whole split), got "
                             f"{self.max_eval_examples}.")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "methods": list(self.methods), "factors": list(self.factors),
                "calibration": to_mapping(self.calibration)}


@dataclass
class SweepPoint:
    """One (method, factor) measurement. ``per_example`` is the score of every evaluation example."""

    method: str
    factor: float
    counts: dict[str, int]
    experts_kept: int
    experts_total: int
    score: float
    relative: float  # % of the unpruned score
    agreement: float | None = None  # % same label as the unpruned model (classification)
    kl: float | None = None  # mean KL(unpruned || pruned) of the label distribution, nats (classification)
    clamped: list[str] = field(default_factory=list)  # layers where the factor asked for 0 experts (kept 1)
    score_ci: tuple[float, float] | None = None
    per_example: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def effective_factor(self) -> float:
        """``sum E / sum kept``: the compression of the expert count actually realised."""
        return self.experts_total / self.experts_kept

    def to_dict(self, with_examples: bool = True) -> dict[str, Any]:
        data = {
            "method": self.method,
            "factor": self.factor,
            "effective_factor": _round(self.effective_factor),
            "counts": dict(self.counts),
            "experts_kept": self.experts_kept,
            "experts_total": self.experts_total,
            "clamped": list(self.clamped),
            "score": _round(self.score),
            "relative": _round(self.relative),
            "score_ci": None if self.score_ci is None else [_round(v) for v in self.score_ci],
            "agreement": _round(self.agreement),
            "kl": _round(self.kl),
        }
        if with_examples:
            data["per_example"] = [int(v) if float(v).is_integer() else _round(float(v)) for v in self.per_example]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepPoint:
        ci = data.get("score_ci")
        return cls(
            method=data["method"], factor=float(data["factor"]), counts=dict(data["counts"]),
            experts_kept=int(data["experts_kept"]), experts_total=int(data["experts_total"]),
            score=_float(data["score"]), relative=_float(data["relative"]), agreement=data.get("agreement"),
            kl=data.get("kl"), clamped=list(data.get("clamped", [])), score_ci=None if ci is None else tuple(ci),
            per_example=np.asarray(data.get("per_example", []), dtype=np.float64),
        )


@dataclass
class SweepResult:
    """Everything a sweep measured; ``to_dict`` is ``results.json`` (timings are left out: they vary by run)."""

    config: SweepConfig
    model_name: str
    metric: str
    num_examples: int
    experts_per_layer: dict[str, int]
    unpruned_score: float
    points: list[SweepPoint]
    thresholds: dict[str, Threshold]
    num_calibration: int = 0
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def num_experts(self) -> str:
        """``"8"`` when every sparse layer has 8 experts, else ``"8/16"`` (for titles)."""
        return "/".join(str(v) for v in sorted(set(self.experts_per_layer.values())))

    def point(self, method: str, factor: float) -> SweepPoint:
        for p in self.points:
            if p.method == method and p.factor == factor:
                return p
        raise KeyError((method, factor))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SWEEP_FORMAT,
            "config": self.config.to_dict(),
            "model_name": self.model_name,
            "metric": self.metric,
            "num_examples": self.num_examples,
            "num_calibration": self.num_calibration,
            "experts_per_layer": dict(self.experts_per_layer),
            "unpruned_score": _round(self.unpruned_score),
            "threshold_definition": (
                "largest swept factor f with score(g) >= score(1) - tolerance/100 for every swept g <= f; "
                f"CI: {CONFIDENCE:.0%} percentile interval over bootstrap resamples of the evaluation examples"
            ),
            "thresholds": {name: t.to_dict() for name, t in self.thresholds.items()},
            "notes": list(self.notes),
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        if data.get("format") != SWEEP_FORMAT:
            raise SweepError(f"Not an uncurl sweep file (format {data.get('format')!r}, expected {SWEEP_FORMAT!r}).")
        return cls(
            config=SweepConfig(**{**data["config"], "methods": tuple(data["config"]["methods"]),
                                  "factors": tuple(data["config"]["factors"])}),
            model_name=data["model_name"], metric=data["metric"], num_examples=int(data["num_examples"]),
            experts_per_layer=dict(data["experts_per_layer"]), unpruned_score=_float(data["unpruned_score"]),
            points=[SweepPoint.from_dict(p) for p in data["points"]],
            thresholds={name: Threshold(**t) for name, t in data["thresholds"].items()},
            num_calibration=int(data.get("num_calibration", 0)), notes=list(data.get("notes", [])),
        )

    def format_table(self) -> str:
        """Plain-text table: % of the unpruned score per method x factor, then threshold and CI."""
        factors = self.config.factors
        header = ["method", *[f"x{f:g}" for f in factors], "threshold", f"{CONFIDENCE:.0%} CI"]
        rows = [header]
        for method in self.config.methods:
            t = self.thresholds[method]
            ci = "-" if t.ci_low is None else f"[x{t.ci_low:g}, x{t.ci_high:g}]"
            label = f"x{t.factor:g}" + ("+" if t.censored else "")
            rows.append([method, *[f"{self.point(method, f).relative:.1f}" for f in factors], label, ci])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        tol = self.config.tolerance
        lines += [
            "",
            (f"{self.model_name} (E={self.num_experts}) on {self.config.task} ({self.config.split}, "
             f"{self.num_examples} examples): unpruned {self.metric} {self.unpruned_score:.4f}; cells are % of it."),
            (f"threshold = largest factor whose score and every milder factor's stay within {tol:g} point(s) "
             f"(>= {self.unpruned_score - tol / 100:.4f}); CI from {self.config.bootstrap} bootstrap resamples."),
            *(["x<f>+: no swept factor failed, so the threshold is at least the largest one swept."]
              if any(t.censored for t in self.thresholds.values()) else []),
            *self.notes,
        ]
        return "\n".join(lines)


def _round(value: float | None, digits: int = 6) -> float | None:
    """Six significant digits (None for None/NaN): stable JSON/CSV across runs, NaN-free JSON."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``("name", {key: value})`` with JSON-parsed values."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"Method option {item!r} in {spec!r} is not KEY=VALUE (e.g. uncurl:uniform=true).")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    return name, kwargs


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs, where a spec's own options also use commas (``uncurl:a=1,b=2,frequency``)."""
    specs: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def sweep_budget(layer_sizes: Mapping[str, int], factor: float) -> tuple[dict[str, int], list[str]]:
    """``({layer: max(1, floor(E / factor))}, [clamped layers])``: the budget rule, clamped at one expert."""
    from uncurl_hf.surgery.budget import experts_to_keep

    raw = {name: experts_to_keep(size, factor) for name, size in layer_sizes.items()}
    return {name: max(1, k) for name, k in raw.items()}, [name for name, k in raw.items() if k < 1]


# ------------------------------------------------------------------------------------------------------- the sweep


def run_sweep(
    config: SweepConfig,
    *,
    progress: bool = True,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Sweep ``config.methods`` x ``config.factors`` and, with ``output_dir``, write ``results.json``,
    ``results.csv`` and ``plot.png`` there (atomically). The model folder is never modified."""
    from uncurl_hf.experiments.sweep_output import check_sweep_output, write_sweep  # imports this module

    if output_dir is not None:
        check_sweep_output(Path(output_dir).expanduser().resolve(), overwrite)  # before any heavy work
    result = _measure(config, progress)
    if output_dir is not None:
        result.output_dir = write_sweep(result, output_dir, overwrite=overwrite)
    return result


def _measure(config: SweepConfig, progress: bool) -> SweepResult:
    from uncurl_hf.surgery.apply import apply_plan
    from uncurl_hf.calibration.data import build_batches, calibration_examples
    from uncurl_hf.calibration.run import calibrate
    from uncurl_hf.calibration.stats import check_coverage
    from uncurl_hf.io.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from uncurl_hf.pipeline.planning import plan_model
    from uncurl_hf.recipe import PruneRecipe
    from uncurl_hf.families import get_family
    from uncurl_hf.methods import get_method
    from uncurl_hf.evaluation.tasks import get_task

    task = get_task(config.task)
    if config.split not in task.splits:
        raise SweepError(f"Task {task.name!r} has no split {config.split!r}; use one of {', '.join(task.splits)}.")
    source = Path(config.model)
    inspect_checkpoint(source)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    family = get_family(model)
    sizes = family.layer_sizes(model)
    examples = task.load_split(config.split)[: config.max_eval_examples]
    if not examples:
        raise SweepError(f"Task {task.name!r} has no {config.split} examples to score.")
    reference = score_examples(model, tokenizer, task, examples, progress=progress)
    timings["unpruned_eval_s"] = time.perf_counter() - start
    logger.info("unpruned %s on %d %s examples: %.4f", task.metric, len(examples), config.split, reference.score)

    start = time.perf_counter()
    calibration_spec = config.calibration
    calibration = calibration_examples(calibration_spec, tokenizer, causal=family.is_causal_lm())  # train split
    batches = build_batches(calibration, tokenizer, batch_size=calibration_spec.batch_size,
                            max_length=calibration_spec.max_length)
    stats = calibrate(model, family, batches, calibration_spec.max_logit_samples, calibration_spec.seed,
                      progress=progress)
    specs = [(spec, *parse_method_spec(spec)) for spec in config.methods]
    if any(get_method(name).needs_calibration for _, name, _ in specs):
        check_coverage(stats)
    timings["calibration_s"] = time.perf_counter() - start

    total = sum(sizes.values())
    labelled = reference.distribution is not None
    points = [  # factor 1 is the unpruned model itself, shared by every method
        SweepPoint(spec, 1.0, dict(sizes), total, total, reference.score, 100.0, 100.0 if labelled else None,
                   0.0 if labelled else None, per_example=reference.per_example)
        for spec, _, _ in specs
    ]
    notes: list[str] = []
    grid = [(f, spec, name, kwargs) for f in config.factors[1:] for spec, name, kwargs in specs]
    start = time.perf_counter()
    for factor, spec, name, kwargs in tqdm(grid, desc="sweep", unit="point", disable=not progress):
        budget, clamped = sweep_budget(sizes, factor)
        if clamped and spec == specs[0][0]:
            notes.append(f"x{factor:g}: {len(clamped)} layer(s) have fewer than {factor:g} experts and keep 1 "
                         f"({', '.join(clamped)}); the point records its effective factor.")
        recipe = PruneRecipe(method=name, factor=factor, method_options=kwargs, calibration=calibration_spec)
        plan = plan_model(model, family, get_method(name), stats, budget, recipe).plan  # allocate, plan, validate
        pruned = apply_plan(model, family, plan)
        scored = score_examples(pruned, tokenizer, task, examples)
        del pruned
        agreement, kl = (divergence(reference.distribution, scored.distribution)
                         if reference.distribution is not None and scored.distribution is not None else (None, None))
        points.append(SweepPoint(
            spec, factor, plan.counts, sum(plan.counts.values()), total, scored.score,
            100.0 * scored.score / reference.score if reference.score else float("nan"), agreement, kl, clamped,
            per_example=scored.per_example,
        ))
        logger.info("%-20s x%-4g %.4f (%.1f%%)", spec, factor, scored.score, points[-1].relative)
    timings["points_s"] = time.perf_counter() - start
    points.sort(key=lambda p: (config.methods.index(p.method), p.factor))
    result = SweepResult(
        config=config, model_name=source.expanduser().resolve().name, metric=task.metric,
        num_examples=len(examples), experts_per_layer=dict(sizes), unpruned_score=reference.score, points=points,
        thresholds={}, num_calibration=len(calibration), notes=notes, timings=timings,
    )
    compute_thresholds(result)
    return result
