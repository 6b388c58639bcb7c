"""``uncurl prune --max-drop D``: choose per-layer expert counts automatically, as few experts in total as the task
allows, keeping the score within ``D`` points of the unpruned model on a HELD-OUT split.

Data: calibration uses the task's train split (as every ``--task`` prune), the search scores candidates on the
task's ``dev`` split, and the test split is never loaded, so a test score reported afterwards is not tuned on.

Search (deterministic; every candidate is planned by the chosen method from ONE calibration and pruned in memory):

1. uniform: factors 2, 4, 8, ... (``max(1, floor(E / f))`` experts per layer) in order, stopping at the first one
   whose dev score falls below ``unpruned - D / 100``; the last one that passed is the start (the full model when
   x2 fails). At most ``log2(max E)`` evaluations.
2. greedy per layer: from the start, every round tries, for each still-active layer, removing
   ``max(1, floor(k / 4))`` of its ``k`` experts (the method re-plans that layer at the new count); of the
   candidates within the budget the one with the highest dev score is taken (ties: more experts removed, then
   layer order). A layer whose reduction breaks the budget is retired (shrinking other layers rarely helps it
   again), as is a layer down to one expert. The search stops when no layer is active or after
   ``max_evaluations`` candidate scorings. Cost: at most ``active layers`` evaluations per round and one round per
   accepted move, each evaluation = plan + in-memory surgery + one pass over the dev split.

The result (chosen counts, dev scores, and every candidate tried) goes into the plan's metadata under
``"max_drop"``, and :func:`uncurl_hf.pipeline.prune.prune` plans and writes the model with those counts from the same
calibration statistics the search used (one calibration pass per run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from uncurl_hf.errors import MaxDropError

logger = logging.getLogger(__name__)

SEARCH_SPLIT = "dev"
DEFAULT_MAX_EVALUATIONS = 200
_SLACK = 1e-9



@dataclass
class SearchStep:
    """One scored candidate: its per-layer counts, dev score, and whether it was within budget / accepted."""

    phase: str  # "uniform" | "greedy"
    counts: dict[str, int]
    score: float
    feasible: bool
    accepted: bool = False
    factor: float | None = None  # uniform phase
    layer: str | None = None  # greedy phase: the layer reduced

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["score"] = round(self.score, 6)
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class AutoCounts:
    """What the search chose, and how."""

    max_drop: float
    split: str
    num_examples: int
    metric: str
    unpruned_score: float
    counts: dict[str, int]
    score: float
    experts_before: int
    trace: list[SearchStep] = field(default_factory=list)
    capped: bool = False  # stopped by max_evaluations
    seconds: float = 0.0  # not written (varies by run)

    @property
    def floor(self) -> float:
        return self.unpruned_score - self.max_drop / 100.0

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able record for the plan metadata (no timings: the plan file stays byte-identical run to run)."""
        return {
            "max_drop_points": self.max_drop,
            "split": self.split,
            "num_examples": self.num_examples,
            "metric": self.metric,
            "unpruned_score": round(self.unpruned_score, 6),
            "floor": round(self.floor, 6),
            "chosen_counts": dict(self.counts),
            "chosen_score": round(self.score, 6),
            "experts": {"before": self.experts_before, "after": sum(self.counts.values())},
            "evaluations": len(self.trace),
            "stopped_by_max_evaluations": self.capped,
            "search": "uniform factors 2,4,8,... to the first failure, then greedy per-layer reductions "
            "(uncurl_hf.pipeline.search)",
            "trace": [step.to_dict() for step in self.trace],
        }


def check_search_split(task_name: str | None) -> None:
    """The task must have the split the search scores on (never the test split); checked before any heavy work.
    (The recipe has already checked the value of ``max_drop`` and that it comes with a task.)"""
    from uncurl_hf.evaluation.tasks import get_task

    if task_name is None or SEARCH_SPLIT not in get_task(task_name).splits:
        raise MaxDropError(
            f"Task {task_name!r} has no {SEARCH_SPLIT!r} split to check the budget on (never the test split); give "
            "explicit --factor or --num-experts-per-layer instead."
        )


def search_counts(
    model: Any,
    tokenizer: Any,
    family: Any,
    stats: Any,
    recipe: Any,
    task: Any,
    max_drop: float,
    *,
    limit: int | None = None,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    progress: bool = False,
) -> AutoCounts:
    """Per-layer counts with the fewest experts whose ``task`` dev score stays >= unpruned - ``max_drop`` points.

    ``recipe`` gives the method, its options and the seed; each candidate is planned by the one planning step
    (:func:`uncurl_hf.pipeline.planning.plan_model`) with the candidate's counts."""
    from uncurl_hf.evaluation.scoring import score_examples
    from uncurl_hf.experiments.sweep import sweep_budget

    start = time.perf_counter()
    dev = task.load_split(SEARCH_SPLIT)[:limit]
    if not dev:
        raise MaxDropError(f"Task {task.name!r} has no {SEARCH_SPLIT} examples to check the budget on.")
    sizes = family.layer_sizes(model)
    unpruned = score_examples(model, tokenizer, task, dev, progress=progress).score
    floor = unpruned - max_drop / 100.0 - _SLACK
    trace: list[SearchStep] = []
    scorer = _CandidateScorer(model, tokenizer, family, stats, recipe, task, dev)

    best, best_score = dict(sizes), unpruned
    factor = 2.0
    while len(trace) < max_evaluations:
        counts = sweep_budget(sizes, factor)[0]
        if counts == best:
            break
        score = scorer(counts)
        trace.append(SearchStep("uniform", counts, score, score >= floor, score >= floor, factor=factor))
        if score < floor:
            break
        best, best_score = counts, score
        if all(k == 1 for k in counts.values()):
            break
        factor *= 2

    active = [name for name in sizes if best[name] > 1]
    while active and len(trace) < max_evaluations:
        candidates = []
        for name in list(active):
            if len(trace) >= max_evaluations:
                break
            counts = {**best, name: best[name] - max(1, best[name] // 4)}
            score = scorer(counts)
            trace.append(SearchStep("greedy", counts, score, score >= floor, layer=name))
            if score >= floor:
                candidates.append((score, best[name] - counts[name], -list(sizes).index(name), len(trace) - 1))
            else:
                active.remove(name)  # retired: its reduction breaks the budget
        if not candidates:
            break
        _, _, _, index = max(candidates)
        step = trace[index]
        step.accepted = True
        best, best_score = dict(step.counts), step.score
        active = [name for name in active if best[name] > 1]
        logger.info("max-drop: %s -> %d experts (dev %.4f)", step.layer, best[step.layer], best_score)
    capped = len(trace) >= max_evaluations
    if capped:
        logger.warning("max-drop search stopped after %d evaluations (max_evaluations)", len(trace))
    result = AutoCounts(max_drop=float(max_drop), split=SEARCH_SPLIT, num_examples=len(dev), metric=task.metric,
                        unpruned_score=unpruned, counts=best, score=best_score, experts_before=sum(sizes.values()),
                        trace=trace, capped=capped, seconds=time.perf_counter() - start)
    logger.info("max-drop %.2g: %s (%d -> %d experts), dev %.4f vs unpruned %.4f, %d evaluations in %.1f s",
                max_drop, best, result.experts_before, sum(best.values()), best_score, unpruned, len(trace),
                result.seconds)
    return result


class _CandidateScorer:
    """Dev score of the model pruned to given per-layer counts (plan + in-memory surgery), cached per counts."""

    def __init__(self, model: Any, tokenizer: Any, family: Any, stats: Any, recipe: Any, task: Any,
                 examples: list[Any]) -> None:
        from uncurl_hf.methods import get_method

        self.model, self.tokenizer, self.family, self.stats = model, tokenizer, family, stats
        self.method, self.recipe = get_method(recipe.method), recipe
        self.task, self.examples = task, examples
        self.cache: dict[tuple[tuple[str, int], ...], float] = {}

    def __call__(self, counts: dict[str, int]) -> float:
        from uncurl_hf.evaluation.scoring import score_examples
        from uncurl_hf.pipeline.planning import plan_model
        from uncurl_hf.surgery.apply import apply_plan

        key = tuple(sorted(counts.items()))
        if key not in self.cache:
            # explicit counts: adaptive methods keep them (they only re-split a factor's total)
            candidate = self.recipe.with_counts(counts)
            plan = plan_model(self.model, self.family, self.method, self.stats, counts, candidate).plan
            pruned = apply_plan(self.model, self.family, plan)
            self.cache[key] = score_examples(pruned, self.tokenizer, self.task, self.examples).score
            logger.debug("max-drop candidate %s: %.4f", counts, self.cache[key])
        return self.cache[key]
