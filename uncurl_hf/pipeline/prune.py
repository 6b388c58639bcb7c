"""The pruning pipeline: load -> calibrate -> plan -> validate -> apply -> [stock export] -> write (validated; card,
optionally evaluated, written inside the atomic write) -> [push] -> result.

Cheap checks (factor, method, task, calibration file, output folder) run before the model is loaded, so a typo
fails in a second rather than after calibration.
"""

from __future__ import annotations

import gc
import logging
import random
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uncurl_hf._version import __version__
from uncurl_hf.surgery.apply import apply_plan
from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.cards.model_card import CardFacts, finalize_output, hub_model_id, is_hub_id, prune_command
from uncurl_hf.calibration.run import build_batches, calibrate, check_coverage, load_calibration_file
from uncurl_hf.pipeline.sequential import calibrate_and_plan
from uncurl_hf.io.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    check_output_dir,
    count_parameters,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    sweep_stale_temp_dirs,
    weights_size,
    write_checkpoint,
)
from uncurl_hf.recipe import PruningConfig
from uncurl_hf.errors import CalibrationDataError, HubError, InvalidPlanError, UncurlError
from uncurl_hf.surgery.export import check_export_format, to_stock, uniform_count
from uncurl_hf.calibration import distributed
from uncurl_hf.families import get_family
from uncurl_hf.methods import get_method
from uncurl_hf.plan import PruningPlan
from uncurl_hf.surgery.streaming import disk_layer_sizes, stored_parameters, stream_apply_plan
from uncurl_hf.evaluation.tasks import Example, get_task

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
    eval_original: Any = None  # uncurl_hf.evaluation.scoring.EvalResult when prune(evaluate=True)
    eval_pruned: Any = None
    push: Any = None  # uncurl_hf.io.hub.PushResult when prune(push_to_hub=True)

    def summary_table(self) -> str:
        """A short plain-text table: parameters, weight bytes, experts per layer, wall time."""
        rows = [
            ("", "before", "after"),
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}"),
            ("weights MB", f"{self.disk_bytes_before / 1e6:.2f}", f"{self.disk_bytes_after / 1e6:.2f}"),
        ]
        rows += [
            (f"experts {name}", str(n), str(self.experts_after.get(name, "?")))
            for name, n in self.experts_before.items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        if self.eval_original is not None and self.eval_pruned is not None:
            lines.append(
                f"{self.eval_pruned.metric} on {self.eval_pruned.task} ({self.eval_pruned.split}, "
                f"{self.eval_pruned.num_examples} examples): {self.eval_original.score:.4f} -> "
                f"{self.eval_pruned.score:.4f}"
            )
        lines.append(f"method {self.plan.method}, factor {self.plan.factor}, seed {self.plan.seed}")
        lines.append(f"wrote {self.output_dir} in {self.wall_time_s:.1f} s")
        if self.push is not None:
            lines.append(f"pushed to {self.push.repo_url} ({self.push.commit_url})")
        return "\n".join(lines)


@distributed.launched  # under torchrun: calibration is shared across ranks and only rank 0 writes
def prune(
    model: str | Path,
    *,
    output_dir: str | Path,
    factor: float | None = None,
    method: str = "frequency",
    task: str | None = None,
    calibration_file: str | Path | None = None,
    num_calibration_examples: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    batch_size: int = 16,
    max_length: int = 128,
    max_logit_samples: int = 4096,
    scale_expert_capacity: bool = True,
    num_experts_per_layer: dict[str, int] | list[int] | None = None,
    method_kwargs: dict[str, Any] | None = None,
    config: PruningConfig | None = None,
    plan: PruningPlan | str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    plan_out: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    evaluate: bool = False,
    eval_limit: int | None = None,
    card: bool = True,
    base_model_id: str | None = None,
    export: str = "pruned",
    push_to_hub: bool = False,
    repo_id: str | None = None,
    hub_token: str | None = None,
    private: bool = False,
    hub_exist_ok: bool = False,
    streaming: bool = False,
    max_drop: float | None = None,
    offload: bool = False,
    sequential: bool = False,
    fsync: bool = True,
) -> PruneResult:
    """Prune the local checkpoint ``model`` for a task and write the result to ``output_dir``.

    Calibration data is exactly one of ``task`` (a registered task name, see :mod:`uncurl_hf.evaluation.tasks`) or
    ``calibration_file`` (``.txt``/``.jsonl``). When ``config`` is given it supplies method, factor, counts,
    calibration size, batch size, max length, seed, sample bound and capacity scaling; the matching keyword
    arguments are then ignored.

    Outputs: ``card`` writes ``README.md`` (:mod:`uncurl_hf.cards.model_card`; ``base_model_id`` names the Hub id of the source
    when its folder does not tell). ``evaluate`` scores the original and the written pruned checkpoint on the task's
    test split (first ``eval_limit`` examples) before the folder is moved into place, and the card reports them.
    ``export="stock"`` writes a plain ``switch_transformers`` checkpoint (every layer must keep the same count).
    ``push_to_hub`` uploads the folder to ``repo_id`` (:func:`uncurl_hf.io.hub.push_folder`; token and Hub are checked
    before any heavy work, and a failed push keeps the local folder).

    ``plan`` (a :class:`PruningPlan` or its JSON file) applies a saved plan instead of running a method: no
    calibration data is needed (a ``task`` is still used by ``evaluate``), and factor / counts / ``config`` must not
    be given. A plan made for another model (other family, layers or expert counts) raises ``InvalidPlanError``.
    ``allow_pickle`` reads pickle-only checkpoints with ``torch.load(weights_only=True)``; ``trust_remote_code`` lets
    transformers run code shipped with the checkpoint (both off by default, see :mod:`uncurl_hf.io.checkpoint`).

    ``streaming`` writes the output out of core (:func:`uncurl_hf.surgery.streaming.stream_apply_plan`: one layer in memory at
    a time, same files as the in-memory writer). With a saved ``plan`` the model is never loaded; otherwise it is
    loaded for calibration and freed before writing. Not available with ``export="stock"``.

    ``max_drop`` (points, e.g. 1.0) replaces ``factor``/counts: :mod:`uncurl_hf.pipeline.search` searches the per-layer
    counts with the fewest experts whose score on the task's dev split stays within ``max_drop`` of the unpruned
    model (calibration on train, never test), records the search in ``plan.metadata["max_drop"]`` and prunes with them;
    one calibration serves both the search and the plan. The search scores candidates in memory, so not with
    ``offload``.

    ``offload`` calibrates with the weights left on disk, one transformer block in memory at a time
    (:mod:`uncurl_hf.calibration.offload`); the surgery then loads the model, unless ``streaming``. ``sequential`` plans layer
    ``l`` on statistics of the model whose earlier layers are already pruned (:mod:`uncurl_hf.pipeline.sequential`; one
    calibration pass per sparse layer). Launched by ``torchrun --nproc_per_node N -m uncurl_hf.cli prune ...``, the
    ranks share the calibration batches (:mod:`uncurl_hf.calibration.distributed`; same statistics and plan as one process) and
    only rank 0 writes; the others return the same result once it is written. ``fsync=False`` leaves the output's
    durability to the kernel (see :func:`uncurl_hf.io.checkpoint.write_atomically`).
    """
    start = time.perf_counter()
    if max_drop is not None:  # the counts come from a search on the task's dev split, after calibration
        from uncurl_hf.errors import MaxDropError
        from uncurl_hf.pipeline.search import check_max_drop

        check_max_drop(max_drop, task, calibration_file, factor, num_experts_per_layer, plan, config)
        if offload:
            raise MaxDropError(
                "--max-drop scores every candidate on the pruned model in memory, so it cannot run with --offload; "
                "drop one of the two."
            )
    saved_plan = _saved_plan(plan, factor, num_experts_per_layer, config)
    plan_source = plan  # the caller's plan argument (its file name goes into the card's command)
    settings = _settings(
        config, saved_plan, method=method, factor=factor, num_experts_per_layer=num_experts_per_layer,
        num_calibration_examples=num_calibration_examples, max_length=max_length, batch_size=batch_size, seed=seed,
        max_logit_samples=max_logit_samples, scale_expert_capacity=scale_expert_capacity,
        method_kwargs=method_kwargs, searched=max_drop is not None,
    )
    source = Path(model)
    pruning_method = get_method(settings.method) if saved_plan is None else None
    source_family = _preflight(
        source, saved_plan, output_dir=output_dir, overwrite=overwrite, export=export, streaming=streaming,
        evaluate=evaluate, task=task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
    )
    examples = _calibration_examples(task, calibration_file, settings) if saved_plan is None else []
    if base_model_id is not None and not is_hub_id(base_model_id):
        raise UncurlError(f"base_model_id {base_model_id!r} is not a Hub model id; give it as namespace/name.")
    base_model_id = base_model_id or hub_model_id(source)
    if push_to_hub:
        from uncurl_hf.io.hub import preflight

        if repo_id is None:
            raise HubError("push_to_hub needs a repo id (--repo-id namespace/name).")
        preflight(repo_id, token=hub_token, exist_ok=hub_exist_ok)

    loaded = _load_source(
        source, source_family, saved_plan, streaming=streaming, offload=offload, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    if saved_plan is not None:
        saved_plan.validate(loaded.sizes)  # layers and expert counts must be this model's
        plan, config, stats_summary = saved_plan, settings.config(num_experts_per_layer=saved_plan.counts), {}
    else:
        assert pruning_method is not None
        try:
            plan, config, stats_summary = _calibrate_and_plan(
                loaded, pruning_method, settings, examples, export=export, sequential=sequential, max_drop=max_drop,
                task=task, calibration_file=calibration_file, progress=progress,
            )
        except BaseException:
            if loaded.offloaded is not None:  # its hooks and open weight files go now, not at garbage collection
                loaded.offloaded.close()
            raise
        plan.base_model = str(model)

    if loaded.offloaded is not None:  # the surgery needs the weights: loaded now, or read layer by layer when streaming
        loaded.offloaded.close()
        loaded.offloaded = None
        loaded.model = None if streaming else load_model(
            source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
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
            for key in ("params_before", "params_after", "disk_bytes_before", "disk_bytes_after")
        }})

    facts = _card_facts(
        model, loaded, plan, config, plan_arg=plan_source, task=task, calibration_file=calibration_file,
        num_examples=len(examples), export=export, evaluate=evaluate, eval_limit=eval_limit,
        base_model_id=base_model_id, repo_id=repo_id if push_to_hub else None,
    )
    output, facts, measured = _write_output(
        loaded, plan, facts, output_dir, streaming=streaming, export=export, overwrite=overwrite,
        max_shard_size=max_shard_size, scale_expert_capacity=config.scale_expert_capacity,
        trust_remote_code=trust_remote_code, card=card, evaluate=evaluate, eval_limit=eval_limit, fsync=fsync,
        progress=progress,
    )
    if plan_out is not None:
        plan.save(plan_out)
    result = PruneResult(
        output_dir=output,
        plan=plan,
        stats_summary=stats_summary,
        params_before=facts.params_before,
        params_after=facts.params_after,
        disk_bytes_before=facts.disk_bytes_before,
        disk_bytes_after=weights_size(output),
        wall_time_s=time.perf_counter() - start,
        experts_before=loaded.sizes,
        experts_after=plan.counts,
        eval_original=measured.eval_original if measured is not None else None,
        eval_pruned=measured.eval_pruned if measured is not None else None,
    )
    logger.info("done in %.1f s", result.wall_time_s)
    if push_to_hub:
        assert repo_id is not None
        result.push = _push(output, repo_id, token=hub_token, private=private, exist_ok=hub_exist_ok)
    return result


@dataclass
class _Settings:
    """The run's calibration and method settings; the expert counts come later when a search chooses them."""

    method: str
    factor: float | None
    num_experts_per_layer: dict[str, int] | list[int] | None
    num_calibration_examples: int
    max_length: int
    batch_size: int
    seed: int
    max_logit_samples: int
    scale_expert_capacity: bool
    method_kwargs: dict[str, Any]
    fixed: PruningConfig | None = None  # a config the caller passed: used as it is

    def config(self, **counts: Any) -> PruningConfig:
        """The validated :class:`PruningConfig` (``counts`` override factor/counts, e.g. chosen by a search)."""
        if self.fixed is not None and not counts:
            return replace(self.fixed)  # re-validate, never mutate the caller's object
        values = {"factor": self.factor, "num_experts_per_layer": self.num_experts_per_layer}
        if counts:
            values = {"factor": None, "num_experts_per_layer": None, **counts}
        return PruningConfig(
            method=self.method, num_calibration_examples=self.num_calibration_examples, max_length=self.max_length,
            batch_size=self.batch_size, seed=self.seed, max_logit_samples=self.max_logit_samples,
            scale_expert_capacity=self.scale_expert_capacity, method_kwargs=dict(self.method_kwargs), **values,
        )


def _settings(config: PruningConfig | None, saved_plan: PruningPlan | None, *, searched: bool, **values: Any
              ) -> _Settings:
    """The settings of a run: from ``config`` when given, else from the keyword arguments (checked now, so a bad
    factor fails before the model is loaded; a searched run gets its counts later)."""
    values["method_kwargs"] = dict(values["method_kwargs"] or {})
    if config is not None:
        config = replace(config)
        return _Settings(**{name: getattr(config, name) for name in values}, fixed=config)
    settings = _Settings(**values)
    if saved_plan is None and not searched:
        settings.config()  # validates factor / counts / method now
    return settings


@dataclass
class _Source:
    """The model being pruned as the pipeline holds it: its folder, family and expert counts per layer, and the
    module when it was loaded (``None`` for a streamed saved plan; meta-device while ``offloaded``)."""

    path: Path
    family: Any
    sizes: dict[str, int]
    model: Any = None
    offloaded: Any = None  # uncurl_hf.calibration.offload.OffloadedModel while calibration reads weights from disk
    tokenizer: Any = None


def _preflight(
    source: Path, saved_plan: PruningPlan | None, *, output_dir: str | Path, overwrite: bool, export: str,
    streaming: bool, evaluate: bool, task: str | None, allow_pickle: bool, trust_remote_code: bool,
) -> Any:
    """The cheap checks that need no weights (export format, model folder, plan family, output folder,
    evaluability); returns the source's family."""
    check_export_format(export)
    if streaming and export == "stock":
        raise UncurlError("--export stock is not available with --streaming; drop one of them.")
    family = inspect_checkpoint(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if saved_plan is not None and saved_plan.family != family.name:
        raise InvalidPlanError(
            f"The plan was made for a {saved_plan.family!r} model ({saved_plan.model_type!r}), but {source} is a "
            f"{family.name!r} model; compute a plan on this model (uncurl prune --plan-out PLAN ...)."
        )
    output = Path(output_dir).expanduser().resolve()
    if distributed.process_rank() == 0:  # one process cleans up leftovers of killed runs, before the check
        sweep_stale_temp_dirs(output)
    check_output_dir(output, source.expanduser().resolve(), overwrite)
    if evaluate:
        _check_evaluable(task)
        check_evaluable_family(family)
    return family


def _load_source(
    source: Path, family: Any, saved_plan: PruningPlan | None, *, streaming: bool, offload: bool,
    allow_pickle: bool, trust_remote_code: bool,
) -> _Source:
    """Load what the run needs: nothing but the layer sizes for a streamed saved plan, a meta-device model for
    offloaded calibration, else the model; plus the tokenizer when calibrating (cheap, and loaded first, so a missing
    one fails before the model is read)."""
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code) if saved_plan is None else None
    if streaming and saved_plan is not None:  # out of core: the model is never loaded
        return _Source(source, family, disk_layer_sizes(source, family))
    if offload and saved_plan is None:  # calibration reads one transformer block at a time from disk
        from uncurl_hf.calibration.offload import load_offloaded

        offloaded = load_offloaded(source, trust_remote_code=trust_remote_code)
        sizes = offloaded.family.layer_sizes(offloaded.model)
        return _Source(source, offloaded.family, sizes, offloaded.model, offloaded, tokenizer)
    model = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    family = get_family(model)
    return _Source(source, family, family.layer_sizes(model), model, None, tokenizer)


def _calibrate_and_plan(
    loaded: _Source, method: Any, settings: _Settings, examples: list[Example], *, export: str, sequential: bool,
    max_drop: float | None, task: str | None, calibration_file: str | Path | None, progress: bool,
) -> tuple[PruningPlan, PruningConfig, dict[str, Any]]:
    """Calibrate on ``examples`` and plan with ``method``: ``(plan, config, stats summary)``.

    With ``max_drop``, the calibration statistics first drive the dev-split search for per-layer counts
    (:func:`uncurl_hf.pipeline.search.search_counts`), then plan with the chosen counts: one calibration for both.
    """
    batches = build_batches(examples, loaded.tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    initial_stats = auto_counts = None
    if max_drop is not None:
        from uncurl_hf.pipeline.search import search_counts

        assert task is not None
        logger.info("calibrating on %d examples", len(examples))
        initial_stats = calibrate(
            loaded.model, loaded.family, batches, settings.max_logit_samples, settings.seed, progress=progress
        )
        if method.needs_calibration:
            check_coverage(initial_stats)
        auto_counts = search_counts(
            loaded.model, loaded.tokenizer, loaded.family, initial_stats, settings.method, get_task(task), max_drop,
            seed=settings.seed, method_kwargs=settings.method_kwargs, progress=progress,
        )
        config = settings.config(num_experts_per_layer=auto_counts.counts)
    else:
        config = settings.config()
    budget = expert_budget(loaded.sizes, config.factor, config.num_experts_per_layer)
    if isinstance(config.num_experts_per_layer, list):  # positional counts (CLI) -> {layer: k} from here on
        config = replace(config, num_experts_per_layer={name: budget[name] for name in loaded.sizes})
    if export == "stock":
        uniform_count(budget)  # fail before calibration when the requested counts already differ
    if initial_stats is None:
        logger.info("calibrating on %d examples", len(examples))
    planned = calibrate_and_plan(  # the method's allocate() may re-split the budget's total across layers
        loaded.model, loaded.family, method, batches, budget, config, sequential=sequential,
        offloaded=loaded.offloaded, scale_expert_capacity=config.scale_expert_capacity, progress=progress,
        initial_stats=initial_stats,
    )
    plan, stats = planned.plan, planned.stats
    plan.metadata.update(
        {
            "uncurl_hf_version": __version__,
            "budget": planned.budget,
            "calibration": {
                "task": task,
                "calibration_file": str(calibration_file) if calibration_file is not None else None,
                "num_examples": len(examples),
                "max_length": config.max_length,
            },
            "stats": stats.summary(exact_only=True),  # integers only: identical for any thread count
        }
    )
    if auto_counts is not None:
        plan.metadata["max_drop"] = auto_counts.to_metadata()
    plan.validate(loaded.sizes, planned.budget)
    return plan, config, stats.summary()


def _card_facts(
    model: str | Path, loaded: _Source, plan: PruningPlan, config: PruningConfig, *,
    plan_arg: PruningPlan | str | Path | None, task: str | None, calibration_file: str | Path | None,
    num_examples: int, export: str, evaluate: bool, eval_limit: int | None, base_model_id: str | None,
    repo_id: str | None,
) -> CardFacts:
    """What the model card records, known before writing (parameter counts and sizes are filled in later)."""
    if plan_arg is None:  # calibrated in this run
        command = prune_command(
            model, config=config, task=task, calibration_file=calibration_file, export=export, evaluate=evaluate,
            eval_limit=eval_limit,
        )
        calibration = dict(
            task=task,
            calibration_file=Path(calibration_file).name if calibration_file is not None else None,
            calibration_size=num_examples,
            max_length=config.max_length,
        )
    else:
        command = _plan_command(model, plan_arg=plan_arg, export=export)
        calibration = _plan_calibration_facts(plan, task)
    return CardFacts(
        plan=plan,
        experts_before=loaded.sizes,
        experts_after=plan.counts,
        params_before=0,  # counted by _write_output
        params_after=0,
        disk_bytes_before=weights_size(loaded.path),
        disk_bytes_after=0,  # measured on the written files by finalize_output
        command=command,
        source_name=loaded.path.expanduser().resolve().name,
        **calibration,
        export=export,
        base_model_id=base_model_id,
        repo_id=repo_id,
    )


def _write_output(
    loaded: _Source, plan: PruningPlan, facts: CardFacts, output_dir: str | Path, *, streaming: bool, export: str,
    overwrite: bool, max_shard_size: int | str, scale_expert_capacity: bool, trust_remote_code: bool, card: bool,
    evaluate: bool, eval_limit: int | None, fsync: bool, progress: bool,
) -> tuple[Path, CardFacts, CardFacts | None]:
    """Apply ``plan`` and write the output folder atomically (card and evaluation inside the atomic write):
    ``(output, facts with parameter counts, facts as measured by the card step or None)``."""
    measured: list[CardFacts] = []

    def finalize(folder: Path) -> None:
        written = replace(facts, params_after=stored_parameters(folder)) if streaming else facts
        measured.append(
            finalize_output(
                folder, written, source=loaded.path, evaluate=evaluate, eval_limit=eval_limit, write=card,
                progress=progress,
            )
        )

    if streaming:
        if loaded.model is not None:  # free the calibrated model: the streaming writer holds one layer at a time
            params_before = count_parameters(loaded.model)
            loaded.model = None
            gc.collect()
        else:
            params_before = stored_parameters(loaded.path)
        facts = replace(facts, params_before=params_before)
        output = stream_apply_plan(
            loaded.path, plan, output_dir, family=loaded.family, max_shard_size=max_shard_size, overwrite=overwrite,
            scale_expert_capacity=scale_expert_capacity, trust_remote_code=trust_remote_code,
            finalize=finalize if (card or evaluate) else None, progress=progress, sync=fsync,
        )
        facts = replace(facts, params_after=stored_parameters(output))
    else:
        logger.info("applying the plan")
        pruned = apply_plan(loaded.model, loaded.family, plan, scale_expert_capacity=scale_expert_capacity)
        if export == "stock":
            uniform_count(plan.counts)
            pruned = to_stock(pruned)
        facts = replace(facts, params_before=count_parameters(loaded.model), params_after=count_parameters(pruned))
        output = write_checkpoint(
            pruned, output_dir, plan, source_dir=loaded.path, overwrite=overwrite, max_shard_size=max_shard_size,
            finalize=finalize if (card or evaluate) else None, sync=fsync,
        )
    return output, facts, measured[0] if measured else None


def _push(output: Path, repo_id: str, *, token: str | None, private: bool, exist_ok: bool) -> Any:
    """Upload the written folder; a failed push keeps it and says how to push it later."""
    from uncurl_hf.io.hub import push_folder

    try:
        return push_folder(output, repo_id, token=token, private=private, exist_ok=exist_ok)
    except HubError as exc:
        raise type(exc)(
            f"{exc} The pruned model is saved in {output}; push it later with "
            f"`uncurl push {output} --repo-id {repo_id}`."
        ) from exc


def _saved_plan(
    plan: PruningPlan | str | Path | None,
    factor: float | None,
    num_experts_per_layer: Any,
    config: PruningConfig | None,
) -> PruningPlan | None:
    """The plan to apply instead of running a method (loaded and checked layer by layer), or ``None``."""
    if plan is None:
        return None
    if factor is not None or num_experts_per_layer is not None or config is not None:
        raise InvalidPlanError(
            "A saved plan already fixes the experts of every layer; drop --factor / --num-experts-per-layer "
            "(factor, num_experts_per_layer, config) when you pass --plan."
        )
    loaded = PruningPlan.load(plan) if isinstance(plan, (str, Path)) else replace(plan)
    if not loaded.layers:
        raise InvalidPlanError("The plan lists no layers; recompute it with `uncurl prune --plan-out PLAN ...`.")
    for layer in loaded.layers:
        layer.validate()
    return loaded


def _plan_command(model: str | Path, plan_arg: PruningPlan | str | Path | None, export: str) -> str:
    """The ``uncurl prune --plan`` command of a run that applied a saved plan (file names only, no paths)."""
    plan_name = Path(plan_arg).name if isinstance(plan_arg, (str, Path)) else "PLAN.json"
    args = ["uncurl", "prune", Path(model).name or str(model), "--plan", plan_name, "-o", "OUTPUT_DIR"]
    if export != "pruned":
        args += ["--export", export]
    return shlex.join(args)


def _plan_calibration_facts(plan: PruningPlan, task: str | None) -> dict[str, Any]:
    """Card facts about the data a saved plan was calibrated on, from its metadata (only well-typed values)."""
    calibration = plan.metadata.get("calibration") if isinstance(plan.metadata, dict) else None
    calibration = calibration if isinstance(calibration, dict) else {}

    def typed(key: str, kind: type) -> Any:
        value = calibration.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    task = task or typed("task", str)
    file = typed("calibration_file", str)
    return {
        "task": task,
        "calibration_file": Path(file).name if file else None if task else "unknown (saved plan)",
        "calibration_size": typed("num_examples", int),
        "max_length": typed("max_length", int),
    }


def _check_evaluable(task: str | None) -> None:
    """Evaluation scores a registered classification task; say so before any heavy work."""
    if task is None:
        raise UncurlError(
            "--evaluate needs --task: a calibration file has no test split to score. Evaluate the output "
            "afterwards with `uncurl eval OUT --task TASK`, or drop --evaluate."
        )
    if not get_task(task).labels:
        raise UncurlError(
            f"--evaluate is only implemented for classification tasks; {task!r} is a generation task. "
            "Drop --evaluate."
        )


def check_evaluable_family(family: Any) -> None:
    """Task evaluation scores label sequences with an encoder-decoder; refuse decoder-only families clearly."""
    if family.auto_model_class().__name__ != "AutoModelForSeq2SeqLM":
        raise UncurlError(
            f"Task evaluation (`uncurl eval`, `prune --evaluate`) is implemented for encoder-decoder models only; "
            f"{family.name} is a decoder-only (causal LM) family. Score it with your own harness (it loads with "
            "AutoModelForCausalLM); with `uncurl prune`, drop --evaluate."
        )


def _calibration_examples(
    task: str | None, calibration_file: str | Path | None, config: PruningConfig | _Settings
) -> list[Example]:
    """Examples from a task or a file (seeded sample of ``num_calibration_examples`` when there are more)."""
    if (task is None) == (calibration_file is None):
        raise CalibrationDataError(
            "Give exactly one source of calibration data: a task (--task NAME) or a file (--calibration-file F)."
        )
    n = config.num_calibration_examples
    if task is not None:
        examples = get_task(task).calibration_examples(n, config.seed)
        if not examples:
            raise CalibrationDataError(f"Task {task!r} returned no calibration examples.")
        return examples
    examples = load_calibration_file(calibration_file)
    if len(examples) > n:
        examples = random.Random(config.seed).sample(examples, n)
    return examples
