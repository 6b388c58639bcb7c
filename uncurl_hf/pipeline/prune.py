"""The pruning pipeline, orchestration only: resolve -> preflight -> load -> calibrate -> plan -> [dry run: write
the plan] -> apply -> write (validated; recipe, card, optionally evaluated, written inside the atomic write) ->
[push] -> result.

``prune(model, recipe, output_dir, options)``: the recipe says what is done (:mod:`uncurl_hf.recipe`), the options
how it runs (:mod:`uncurl_hf.options`); each stage is a function of :mod:`uncurl_hf.pipeline.source`,
:mod:`uncurl_hf.pipeline.planning` and :mod:`uncurl_hf.pipeline.output`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uncurl_hf._version import __version__
from uncurl_hf.calibration import distributed
from uncurl_hf.calibration.data import calibration_examples
from uncurl_hf.calibration.data import build_batches
from uncurl_hf.calibration.stats import check_coverage
from uncurl_hf.cards.model_card import hub_model_id, is_hub_id
from uncurl_hf.errors import HubError, UncurlError
from uncurl_hf.evaluation.tasks import get_task
from uncurl_hf.io.checkpoint import load_tokenizer, weights_size
from uncurl_hf.methods import get_method
from uncurl_hf.options import RunOptions
from uncurl_hf.pipeline import output as out
from uncurl_hf.pipeline.planning import calibrate_and_plan, calibrate_model
from uncurl_hf.pipeline.source import Source, load_saved_plan, load_source, load_source_model, preflight, resolve_source
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan
from uncurl_hf.recipe import IN_MEMORY, PruneRecipe
from uncurl_hf.surgery.budget import expert_budget, plan_bytes
from uncurl_hf.surgery.export import uniform_count

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a pruning run produced, with the numbers a user wants to see."""

    output_dir: Path
    plan: PruningPlan
    stats_summary: dict[str, Any]
    params_before: int
    params_after: int
    disk_bytes_before: int
    disk_bytes_after: int
    wall_time_s: float
    experts_before: dict[str, int] = field(default_factory=dict)
    experts_after: dict[str, int] = field(default_factory=dict)
    eval_original: Any = None  # uncurl_hf.evaluation.scoring.EvalResult with RunOptions(evaluate=True)
    eval_pruned: Any = None
    push: Any = None  # uncurl_hf.io.hub.PushResult with RunOptions(push_to_hub=True)
    dry_run: bool = False  # True: only the plan (and recipe) were written; sizes after are estimates

    def summary_table(self) -> str:
        """A short plain-text table: parameters, weight bytes, experts per layer, wall time."""
        rows = [("", "before", "after")]
        if not self.dry_run:
            rows.append(("parameters", f"{self.params_before:,}", f"{self.params_after:,}"))
        label = "weights MB (estimate)" if self.dry_run else "weights MB"
        rows.append((label, f"{self.disk_bytes_before / 1e6:.2f}", f"{self.disk_bytes_after / 1e6:.2f}"))
        rows += [
            (f"experts {name}", str(n), str(self.experts_after.get(name, "?")))
            for name, n in self.experts_before.items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        if self.dry_run:
            lines += [f"groups {layer.name}: {_groups_text(layer.groups)}" for layer in self.plan.layers]
        if self.eval_original is not None and self.eval_pruned is not None:
            lines.append(
                f"{self.eval_pruned.metric} on {self.eval_pruned.task} ({self.eval_pruned.split}, "
                f"{self.eval_pruned.num_examples} examples): {self.eval_original.score:.4f} -> "
                f"{self.eval_pruned.score:.4f}"
            )
        lines.append(f"method {self.plan.method}, factor {self.plan.factor}, seed {self.plan.seed}")
        what = "wrote the plan only (dry run) to" if self.dry_run else "wrote"
        lines.append(f"{what} {self.output_dir} in {self.wall_time_s:.1f} s")
        if self.push is not None:
            lines.append(f"pushed to {self.push.repo_url} ({self.push.commit_url})")
        return "\n".join(lines)


def as_recipe(recipe: PruneRecipe | Mapping[str, Any] | str | Path) -> PruneRecipe:
    """A validated copy of ``recipe``: a :class:`PruneRecipe`, its dict, or a YAML file (never the caller's object)."""
    if isinstance(recipe, PruneRecipe):
        return replace(recipe, calibration=replace(recipe.calibration), method_options=dict(recipe.method_options))
    if isinstance(recipe, Mapping):
        return PruneRecipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return PruneRecipe.load(recipe)
    raise UncurlError(f"recipe must be a PruneRecipe, a mapping or a YAML file path, got {type(recipe).__name__}.")


@distributed.launched  # under torchrun: calibration is shared across ranks and only rank 0 writes
def prune(
    model: str | Path,
    recipe: PruneRecipe | Mapping[str, Any] | str | Path,
    output_dir: str | Path,
    options: RunOptions | None = None,
) -> PruneResult:
    """Prune ``model`` (a folder, a zoo name or a Hub id) as ``recipe`` says and write it to ``output_dir``.

    Launched by ``torchrun``/``accelerate launch``, the ranks share the calibration batches
    (:mod:`uncurl_hf.calibration.distributed`; same statistics and plan as one process) and only rank 0 writes; the
    others return the same result once it is written. With ``options.dry_run`` only the plan and the recipe are
    written (sizes after are estimates from the plan).
    """
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    options = replace(options) if options is not None else RunOptions()
    source = resolve_source(model, options)
    saved_plan = load_saved_plan(recipe)
    method = get_method(recipe.method) if saved_plan is None else None
    family = preflight(source, saved_plan, recipe, options, output_dir)
    tokenizer, examples = None, []
    if saved_plan is None:  # the tokenizer is cheap and reading the data may need it (chat templates)
        recipe.calibration.require_one_source()
        tokenizer = load_tokenizer(source, trust_remote_code=options.trust_remote_code)
        examples = calibration_examples(recipe.calibration, tokenizer, causal=family.is_causal_lm())
    base_model_id = _base_model_id(options, source)
    if options.push_to_hub:
        from uncurl_hf.io.hub import preflight as hub_preflight

        if options.repo_id is None:
            raise HubError("push_to_hub needs a repo id (--repo-id namespace/name).")
        hub_preflight(options.repo_id, token=options.hub_token, exist_ok=options.hub_exist_ok)

    loaded = load_source(source, family, saved_plan, options, tokenizer)
    if saved_plan is not None:
        saved_plan.validate(loaded.sizes)  # layers and expert counts must be this model's
        plan, stats_summary = saved_plan, {}
    else:
        assert method is not None
        try:
            plan, stats_summary = _calibrate_and_plan(loaded, method, recipe, examples, options)
        except BaseException:
            loaded.close()
            raise
        plan.base_model = str(model)

    recalibrated = saved_plan is None and (options.device != "cpu" or options.dtype != "auto")
    if not options.dry_run and (loaded.offloaded is not None or recalibrated):
        # the surgery needs the weights as stored, on CPU: loaded again now, or read layer by layer when streaming
        loaded.close()
        loaded.model = None
        if not options.streaming:
            loaded.model = load_source_model(source, options, calibrating=False)
    group = distributed.current()
    if group is not None and not group.is_main:  # only rank 0 writes; the others return its result
        shared = distributed.await_main()
        return PruneResult(
            plan=plan, stats_summary=stats_summary, wall_time_s=time.perf_counter() - start,
            experts_before=loaded.sizes, experts_after=plan.counts, output_dir=Path(shared.pop("output_dir")),
            **shared,
        )
    if group is not None:
        distributed.arm_handoff(lambda result: {"output_dir": str(result.output_dir), **{
            key: getattr(result, key)
            for key in ("params_before", "params_after", "disk_bytes_before", "disk_bytes_after", "dry_run")
        }})
    if options.dry_run:
        return _dry_run(loaded, plan, recipe, output_dir, options, stats_summary, start)

    facts = out.card_facts(model, loaded, plan, recipe, options, saved_plan=saved_plan is not None,
                           num_examples=len(examples), base_model_id=base_model_id)
    output, facts, measured = out.write_output(loaded, plan, recipe, facts, output_dir, options)
    if options.plan_out is not None:
        plan.save(options.plan_out)
    result = PruneResult(
        output_dir=output, plan=plan, stats_summary=stats_summary, params_before=facts.params_before,
        params_after=facts.params_after, disk_bytes_before=facts.disk_bytes_before,
        disk_bytes_after=weights_size(output), wall_time_s=time.perf_counter() - start,
        experts_before=loaded.sizes, experts_after=plan.counts,
        eval_original=measured.eval_original if measured is not None else None,
        eval_pruned=measured.eval_pruned if measured is not None else None,
    )
    logger.info("done in %.1f s", result.wall_time_s)
    if options.push_to_hub:
        result.push = out.push(output, options)
    return result


def _calibrate_and_plan(
    loaded: Source, method: Any, recipe: PruneRecipe, examples: list[Any], options: RunOptions
) -> tuple[PruningPlan, dict[str, Any]]:
    """Calibrate on ``examples`` and plan with ``method``: ``(plan, stats summary)``.

    With ``max_drop``, the calibration statistics first drive the dev-split search for per-layer counts
    (:func:`uncurl_hf.pipeline.search.search_counts`), then the plan with the chosen counts: one calibration for both.
    """
    spec = recipe.calibration
    batches = build_batches(examples, loaded.tokenizer, batch_size=spec.batch_size, max_length=spec.max_length)
    initial_stats = auto_counts = None
    planning = recipe
    if recipe.max_drop is not None:
        from uncurl_hf.pipeline.search import search_counts

        logger.info("calibrating on %d examples", len(examples))
        initial_stats = calibrate_model(loaded.model, loaded.family, batches, recipe, options.progress)
        if method.needs_calibration:
            check_coverage(initial_stats)
        auto_counts = search_counts(loaded.model, loaded.tokenizer, loaded.family, initial_stats, recipe,
                                    get_task(spec.task), recipe.max_drop, progress=options.progress)
        planning = recipe.with_counts(auto_counts.counts)
    budget = expert_budget(loaded.sizes, planning.factor, planning.num_experts_per_layer)
    if isinstance(planning.num_experts_per_layer, list):  # positional counts (CLI) -> {layer: k} from here on
        planning = replace(planning, num_experts_per_layer={name: budget[name] for name in loaded.sizes})
    if recipe.export == "stock":
        uniform_count(budget, loaded.family)  # fail before calibration when the requested counts already differ
    if initial_stats is None:
        logger.info("calibrating on %d examples", len(examples))
    planned = calibrate_and_plan(  # the method's allocate() may re-split the budget's total across layers
        loaded.model, loaded.family, method, batches, budget, planning, sequential=recipe.sequential,
        offloaded=loaded.offloaded, progress=options.progress, initial_stats=initial_stats,
    )
    plan, stats = planned.plan, planned.stats
    plan.metadata.update(
        {
            "uncurl_hf_version": __version__,
            "budget": planned.budget,
            "calibration": {
                "task": spec.task,
                "calibration_file": spec.file if spec.data is None else IN_MEMORY,
                "num_examples": len(examples),
                "max_length": spec.max_length,
            },
            "stats": stats.summary(exact_only=True),  # integers only: identical for any thread count
        }
    )
    if auto_counts is not None:
        plan.metadata["max_drop"] = auto_counts.to_metadata()
    return plan, stats.summary()


def _dry_run(loaded: Source, plan: PruningPlan, recipe: PruneRecipe, output_dir: str | Path, options: RunOptions,
             stats_summary: dict[str, Any], start: float) -> PruneResult:
    """Write only the plan and the recipe; estimate the weight bytes after from the plan."""
    before = weights_size(loaded.path)
    removed = plan_bytes(loaded.model, loaded.family, plan) if loaded.model is not None else 0
    loaded.close()
    folder = out.write_plan_only(plan, recipe, output_dir, loaded.path, options)
    if options.plan_out is not None:
        plan.save(options.plan_out)
    logger.info("dry run: wrote %s", folder / PLAN_FILENAME)
    return PruneResult(
        output_dir=folder, plan=plan, stats_summary=stats_summary, params_before=0, params_after=0,
        disk_bytes_before=before, disk_bytes_after=max(before - removed, 0), wall_time_s=time.perf_counter() - start,
        experts_before=loaded.sizes, experts_after=plan.counts, dry_run=True,
    )


def _base_model_id(options: RunOptions, source: Path) -> str | None:
    if options.base_model_id is not None and not is_hub_id(options.base_model_id):
        raise UncurlError(f"base_model_id {options.base_model_id!r} is not a Hub model id; give it as namespace/name.")
    return options.base_model_id or hub_model_id(source)


def _groups_text(groups: list[list[int]]) -> str:
    return " ".join("+".join(str(e) for e in group) for group in groups)
