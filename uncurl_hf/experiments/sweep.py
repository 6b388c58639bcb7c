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
  (:func:`per_example_scores`: exact match for ``accuracy``; a metric without a registered per-example scorer is
  computed example by example with its ``evaluate`` module, and refused when that mean differs from the corpus
  metric, because the bootstrap needs a mean). A *point* of tolerance is 0.01 of the metric (1 accuracy point).
* Factor 1 is the unpruned model; it is always part of a sweep (the reference every threshold needs).
* A factor ``f`` keeps ``max(1, floor(E / f))`` experts per layer (:mod:`uncurl_hf.surgery.budget`'s rule, except that a
  factor larger than a layer's ``E`` is *clamped* to 1 expert there instead of refused: a sweep is about the
  curve, and the clamped layers plus the effective factor ``sum E / sum kept`` are recorded on the point).
* Threshold of a method: the largest swept factor ``f`` such that ``score(g) >= score(1) - tol`` for EVERY swept
  factor ``g <= f`` ("largest factor before the first failure"). A non-monotone curve that dips below the budget
  at x4 and recovers at x8 has threshold x2, not x8: the recovery is most often evaluation noise, and a user who
  prunes at the threshold expects every milder factor to be safe too. Comparisons allow 1e-9 of float slack, so a
  drop of exactly ``tol`` passes.
* Bootstrap: ``B`` resamples (seeded) of the evaluation examples with replacement, the SAME resamples for every
  method and factor (paired, like the point estimate); the threshold is recomputed on each, and the interval is
  the 2.5th / 97.5th percentile (``inverted_cdf``, so the bounds are swept factors). Each point's score gets the
  same percentile interval.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from uncurl_hf.io.checkpoint import check_output_dir
from uncurl_hf.errors import SweepError, UncurlError

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PLOT_PNG = "plot.png"
SWEEP_FORMAT = "uncurl-sweep/1"
DEFAULT_TOLERANCE = 1.0  # points = hundredths of the metric
DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95
_SLACK = 1e-9  # float slack of the tolerance comparison: a drop of exactly ``tol`` passes

PerExampleScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]



# ----------------------------------------------------------------------------------------------- per-example scores


def _exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """1.0 where the prediction equals the reference (as strings), else 0.0: accuracy's per-example score."""
    return np.array([float(str(p) == str(r)) for p, r in zip(predictions, references)], dtype=np.float64)


_PER_EXAMPLE: dict[str, PerExampleScorer] = {"accuracy": _exact_match}


def register_per_example_metric(name: str, scorer: PerExampleScorer) -> None:
    """Register the per-example form of metric ``name`` (its mean must be the metric), e.g. a rouge-L per pair."""
    _PER_EXAMPLE[name] = scorer


def per_example_scores(task: Any, predictions: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
    """``[N]`` per-example scores whose mean is ``task.metric`` on these examples.

    A registered scorer (:func:`register_per_example_metric`) is used when there is one; otherwise the metric's
    ``evaluate`` module is run on each (prediction, reference) pair and its mean is checked against the corpus
    metric (:class:`SweepError` when they differ: a corpus-level metric such as macro-F1 cannot be bootstrapped
    from per-example values).
    """
    references = [e.target for e in examples]
    scorer = _PER_EXAMPLE.get(task.metric)
    if scorer is not None:
        return np.asarray(scorer(list(predictions), references), dtype=np.float64)
    from uncurl_hf.evaluation.scoring import metric_score
    from uncurl_hf.evaluation.metrics import load_metric

    metric = load_metric(task.metric)
    values = np.array(
        [float(metric.compute(predictions=[p], references=[r])[task.metric]) for p, r in zip(predictions, references)],
        dtype=np.float64,
    )
    corpus = metric_score(task, predictions, examples)
    if values.size and abs(float(values.mean()) - corpus) > 1e-6:
        raise SweepError(
            f"Metric {task.metric!r} is not the mean of its per-example values ({values.mean():.6f} vs "
            f"{corpus:.6f}), so a sweep cannot bootstrap it; register its per-example form with "
            "uncurl_hf.experiments.sweep.register_per_example_metric, or sweep a task with a mean metric."
        )
    return values


@dataclass
class ScoredExamples:
    """One model's predictions on the evaluation examples, their per-example scores and (classification) the
    ``[N, L]`` label log-distribution used for agreement and KL."""

    predictions: list[str]
    per_example: np.ndarray
    distribution: torch.Tensor | None = None

    @property
    def score(self) -> float:
        return float(self.per_example.mean()) if self.per_example.size else float("nan")


@torch.no_grad()
def generate_predictions(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 32, progress: bool = False
) -> list[str]:
    """Greedy generations for a generation task (``task.labels`` empty), decoded without special tokens.

    ``task.max_target_tokens`` (when the task defines it) bounds the generated length; 64 otherwise.
    """
    max_new = int(getattr(task, "max_target_tokens", 64))
    model.eval()
    outputs: list[str] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"generate {task.name}", disable=not progress,
                      leave=False):
        chunk = examples[start : start + batch_size]
        enc = tokenizer([e.source for e in chunk], padding=True, truncation=True, max_length=task.max_source_tokens,
                        return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1)
        outputs += [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return outputs


def score_examples(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 64, progress: bool = False
) -> ScoredExamples:
    """Score ``model`` on ``examples``: label likelihood for classification tasks, greedy generation otherwise."""
    if task.labels:
        from uncurl_hf.evaluation.scoring import label_distribution

        distribution = label_distribution(model, tokenizer, task, examples, batch_size, progress)
        predictions = [task.labels[i] for i in distribution.argmax(-1).tolist()]
    else:
        distribution = None
        predictions = generate_predictions(model, tokenizer, task, examples, progress=progress)
    return ScoredExamples(predictions, per_example_scores(task, predictions, examples), distribution)


def divergence(reference: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """(% of examples with the same argmax, mean KL(reference || pruned) in nats) of two ``[N, L]`` log-dists."""
    agreement = 100.0 * float((reference.argmax(-1) == pruned.argmax(-1)).double().mean())
    kl = float((reference.double().exp() * (reference.double() - pruned.double())).sum(-1).mean())
    return agreement, max(kl, 0.0)


# ------------------------------------------------------------------------------------------------ threshold logic


def threshold_factor(factors: Sequence[float], scores: Sequence[float], tolerance: float) -> float:
    """The largest factor ``f`` with ``scores[g] >= scores[0] - tolerance`` for every ``g <= f``.

    ``factors`` ascend and start at 1 (``scores[0]`` is the unpruned score); ``tolerance`` is in metric units.
    """
    _check_factor_grid(factors, len(scores))
    floor = scores[0] - tolerance - _SLACK
    chosen = factors[0]
    for factor, score in zip(factors, scores):
        if not score >= floor:  # also stops at NaN
            break
        chosen = factor
    return float(chosen)


def bootstrap_weights(num_examples: int, num_resamples: int, seed: int) -> np.ndarray:
    """``[B, N]`` how often each example is drawn in each of ``B`` seeded resamples with replacement."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((num_resamples, num_examples), dtype=np.float64)
    for b in range(num_resamples):
        weights[b] = np.bincount(rng.integers(0, num_examples, num_examples), minlength=num_examples)
    return weights


def bootstrap_thresholds(
    factors: Sequence[float], per_example: np.ndarray, tolerance: float, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds ``[B]`` and scores ``[B, F]`` of every resample (rows of ``weights``) of a method's ``[F, N]``
    per-example matrix (row 0 = factor 1)."""
    _check_factor_grid(factors, per_example.shape[0])
    scores = weights @ per_example.T / per_example.shape[1]  # [B, F]
    ok = scores >= scores[:, :1] - tolerance - _SLACK
    passed = np.cumprod(ok, axis=1).sum(axis=1)  # factors before the first failure (>= 1: factor 1 passes)
    return np.asarray(factors, dtype=np.float64)[passed - 1], scores


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The (lower, upper) percentile interval; ``inverted_cdf`` keeps the bounds on observed values."""
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf", axis=0)
    return float(low), float(high)


def _check_factor_grid(factors: Sequence[float], n: int) -> None:
    if len(factors) != n or not factors or factors[0] != 1 or any(b <= a for a, b in itertools.pairwise(factors)):
        raise SweepError(f"Factors must ascend from 1 with one score each; got {list(factors)} for {n} scores.")


# ----------------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs: methods (specs ``name`` or ``name:key=value,...``) x factors on one task split."""

    model: str
    task: str
    methods: tuple[str, ...]
    factors: tuple[float, ...]
    split: str = "test"
    num_calibration_examples: int = 256
    seed: int = 0
    max_eval_examples: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    bootstrap: int = DEFAULT_BOOTSTRAP
    batch_size: int = 16
    max_length: int = 128
    max_logit_samples: int = 4096

    def __post_init__(self) -> None:
        from uncurl_hf.methods import get_method

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
        return {**asdict(self), "methods": list(self.methods), "factors": list(self.factors)}


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
class Threshold:
    """A method's threshold factor, with its bootstrap interval (``None`` when ``bootstrap == 0``)."""

    method: str
    factor: float
    ci_low: float | None
    ci_high: float | None
    tolerance: float  # points
    bootstrap: int
    effective_factor: float
    censored: bool = False  # no swept factor failed: the true threshold is this factor or larger

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    model: str | Path,
    task: str,
    methods: Sequence[str],
    factors: Sequence[float],
    split: str = "test",
    num_calibration_examples: int = 256,
    seed: int = 0,
    max_eval_examples: int | None = None,
    progress: bool = True,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Sweep ``methods`` x ``factors`` on ``model`` for ``task`` and, with ``output_dir``, write ``results.json``,
    ``results.csv`` and ``plot.png`` there (atomically). The model folder is never modified."""
    config = SweepConfig(
        model=str(model), task=task, methods=tuple(methods), factors=tuple(factors), split=split,
        num_calibration_examples=num_calibration_examples, seed=seed, max_eval_examples=max_eval_examples,
        tolerance=tolerance, bootstrap=bootstrap,
    )
    if output_dir is not None:
        _check_output(Path(output_dir).expanduser().resolve(), overwrite)  # before any heavy work
    result = _measure(config, progress)
    if output_dir is not None:
        result.output_dir = write_sweep(result, output_dir, overwrite=overwrite)
    return result


def _measure(config: SweepConfig, progress: bool) -> SweepResult:
    from uncurl_hf.surgery.apply import apply_plan
    from uncurl_hf.calibration.run import build_batches, calibrate, check_coverage
    from uncurl_hf.io.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from uncurl_hf.recipe import PruningConfig
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
    calibration = task.calibration_examples(config.num_calibration_examples, config.seed)  # train split
    batches = build_batches(calibration, tokenizer, batch_size=config.batch_size, max_length=config.max_length)
    stats = calibrate(model, family, batches, config.max_logit_samples, config.seed, progress=progress)
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
        method = get_method(name)
        pconfig = PruningConfig(method=name, factor=factor, seed=config.seed, method_kwargs=kwargs,
                                num_calibration_examples=config.num_calibration_examples)
        budget = method.allocate(stats, budget, pconfig)
        plan = method(stats, model, family, budget, pconfig)
        plan.validate(sizes, budget)
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


def compute_thresholds(result: SweepResult) -> dict[str, Threshold]:
    """Fill ``result.thresholds`` (point estimate + bootstrap CI per method) and each point's score CI."""
    config = result.config
    tol = config.tolerance / 100.0
    factors = list(config.factors)
    weights = (bootstrap_weights(result.num_examples, config.bootstrap, config.seed)
               if config.bootstrap else None)
    thresholds: dict[str, Threshold] = {}
    for method in config.methods:
        row = [result.point(method, f) for f in factors]
        factor = threshold_factor(factors, [p.score for p in row], tol)
        low = high = None
        if weights is not None:
            resampled, scores = bootstrap_thresholds(factors, np.stack([p.per_example for p in row]), tol, weights)
            low, high = percentile_interval(resampled)
            for i, p in enumerate(row):
                p.score_ci = percentile_interval(scores[:, i])
        chosen = result.point(method, factor)
        thresholds[method] = Threshold(method, factor, low, high, config.tolerance, config.bootstrap,
                                       round(chosen.effective_factor, 6), censored=factor == factors[-1])
    result.thresholds = thresholds
    return thresholds


# ------------------------------------------------------------------------------------------------------- outputs


def results_json(result: SweepResult) -> str:
    """``results.json``: indented, except each point's per-example list, which stays on one line."""
    data = result.to_dict()
    inline = {}
    for i, point in enumerate(data["points"]):
        key = f"@per_example_{i}@"
        inline[json.dumps(key)] = json.dumps(point["per_example"], separators=(",", ":"))
        point["per_example"] = key
    text = json.dumps(data, indent=1)
    for key, value in inline.items():
        text = text.replace(key, value)
    return text + "\n"


def results_csv(result: SweepResult) -> str:
    """One row per (method, factor); counts as ``layer=k;...``."""
    out = io.StringIO()
    columns = ["model", "task", "split", "metric", "method", "factor", "effective_factor", "experts_kept",
               "experts_total", "counts", "clamped", "score", "relative", "score_ci_low", "score_ci_high",
               "agreement", "kl", "num_examples"]
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for p in result.points:
        data = p.to_dict(with_examples=False)
        ci = data.pop("score_ci") or [None, None]
        writer.writerow({
            **data, "model": result.model_name, "task": result.config.task, "split": result.config.split,
            "metric": result.metric, "counts": ";".join(f"{k}={v}" for k, v in p.counts.items()),
            "clamped": ";".join(p.clamped), "score_ci_low": ci[0], "score_ci_high": ci[1],
            "num_examples": result.num_examples,
        })
    return out.getvalue()


def plot_sweeps(results: Sequence[SweepResult | str | Path], path: str | Path) -> Path:
    """One panel per sweep (model / E / task): % of the unpruned score vs factor (log2 axis), one line per method,
    the tolerance band shaded, each method's threshold marked. Accepts results or ``results.json`` paths/folders.

    Uses matplotlib's object API (``Figure`` + Agg canvas), never pyplot's global state; PNG metadata carries no
    software version, so the same results give the same bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loaded = [r if isinstance(r, SweepResult) else load_sweep(r) for r in results]
    if not loaded:
        raise SweepError("Nothing to plot: give at least one sweep result.")
    fig = Figure(figsize=(5.0 * len(loaded), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(loaded), squeeze=False)[0]
    for ax, result in zip(axes, loaded):
        draw_panel(ax, result)
    path = Path(path)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def draw_panel(ax: Any, result: SweepResult) -> None:
    """Draw one sweep on a matplotlib Axes (used by plot_sweeps and by the study's task x E grid)."""
    from matplotlib.ticker import NullLocator

    factors = list(result.config.factors)
    floor = 100.0 * (result.unpruned_score - result.config.tolerance / 100.0) / result.unpruned_score \
        if result.unpruned_score else 0.0
    ax.axhspan(floor, 100.0, color="tab:green", alpha=0.12, label=f"within {result.config.tolerance:g} pt")
    ax.axhline(100.0, color="grey", linewidth=0.8)
    for i, method in enumerate(result.config.methods):
        color = f"C{i % 10}"
        ys = [result.point(method, f).relative for f in factors]
        ax.plot(factors, ys, marker="o", color=color, label=method)
        t = result.thresholds.get(method)
        if t is not None:
            ax.plot([t.factor], [result.point(method, t.factor).relative], marker="*", markersize=13, color=color,
                    linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_xticks(factors, labels=[f"x{f:g}" for f in factors])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("pruning factor (log2; star = threshold)")
    ax.set_ylabel(f"{result.metric}, % of unpruned")
    ax.set_title(f"{result.model_name} (E={result.num_experts}) - {result.config.task}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def load_sweep(path: str | Path) -> SweepResult:
    """Read a sweep's ``results.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(f"Cannot read sweep results {path} ({exc}); give a folder written by `uncurl sweep`.") from exc
    result = SweepResult.from_dict(data)
    result.output_dir = path.parent
    return result


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, and never replace a folder that is not a sweep's."""
    check_output_dir(output, None, overwrite, markers=(RESULTS_JSON,), kind="sweep folder")


def write_sweep(result: SweepResult, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``results.csv`` and ``plot.png`` into a temporary sibling, then rename it into place
    (an interrupted write leaves no partial folder; the next write cleans it up)."""
    from uncurl_hf.io.checkpoint import TEMP_PREFIX, _move_into_place, sweep_stale_temp_dirs
    from uncurl_hf.io.manifest import fsync_dir

    output = Path(output_dir).expanduser().resolve()
    sweep_stale_temp_dirs(output)
    _check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o777 & ~umask)
        (temp / RESULTS_JSON).write_text(results_json(result), encoding="utf-8")
        (temp / RESULTS_CSV).write_text(results_csv(result), encoding="utf-8")
        plot_sweeps([result], temp / PLOT_PNG)
        _move_into_place(temp, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    logger.info("wrote %s", output)
    return output


def resolve_model(name_or_path: str) -> Path:
    """A checkpoint folder as given, or the folder of a built zoo model (``tiny-switch-8``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from uncurl_hf.zoo.registry import available_models, zoo_path

    if name_or_path in available_models():
        return zoo_path(name_or_path, build_if_missing=False)
    return path  # inspect_checkpoint names the problem
