"""The pruning pipeline: load -> calibrate -> plan -> validate -> apply -> write (validated) -> result.

Cheap checks (factor, method, task, calibration file, output folder) run before the model is loaded, so a typo
fails in a second rather than after calibration.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uncurl_hf._version import __version__
from uncurl_hf.apply import apply_plan
from uncurl_hf.budget import expert_budget
from uncurl_hf.calibration import build_batches, calibrate, load_calibration_file
from uncurl_hf.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    check_output_dir,
    count_parameters,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    weights_size,
    write_checkpoint,
)
from uncurl_hf.config import PruningConfig
from uncurl_hf.errors import CalibrationDataError, CheckpointError
from uncurl_hf.families import get_family
from uncurl_hf.methods import get_method
from uncurl_hf.plan import PruningPlan
from uncurl_hf.tasks import Example, get_task

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
        lines.append(f"method {self.plan.method}, factor {self.plan.factor}, seed {self.plan.seed}")
        lines.append(f"wrote {self.output_dir} in {self.wall_time_s:.1f} s")
        return "\n".join(lines)


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
    num_experts_per_layer: dict[str, int] | None = None,
    method_kwargs: dict[str, Any] | None = None,
    config: PruningConfig | None = None,
    plan_out: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> PruneResult:
    """Prune the local checkpoint ``model`` for a task and write the result to ``output_dir``.

    Calibration data is exactly one of ``task`` (a registered task name, see :mod:`uncurl_hf.tasks`) or
    ``calibration_file`` (``.txt``/``.jsonl``). When ``config`` is given it supplies method, factor, counts,
    calibration size, batch size, max length, seed, sample bound and capacity scaling; the matching keyword
    arguments are then ignored.
    """
    start = time.perf_counter()
    if config is None:
        config = PruningConfig(
            method=method,
            factor=factor,
            num_experts_per_layer=num_experts_per_layer,
            num_calibration_examples=num_calibration_examples,
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            max_logit_samples=max_logit_samples,
            scale_expert_capacity=scale_expert_capacity,
            method_kwargs=dict(method_kwargs or {}),
        )
    else:
        config = replace(config)  # re-validate, never mutate the caller's object
    source = Path(model)
    pruning_method = get_method(config.method)
    inspect_checkpoint(source)
    check_output_dir(Path(output_dir).expanduser().resolve(), source.expanduser().resolve(), overwrite)
    examples = _calibration_examples(task, calibration_file, config)

    loaded = load_model(source)
    family = get_family(loaded)
    sizes = family.layer_sizes(loaded)
    budget = expert_budget(sizes, config.factor, config.num_experts_per_layer)
    tokenizer = load_tokenizer(source)

    logger.info("calibrating on %d examples", len(examples))
    batches = build_batches(examples, tokenizer, batch_size=config.batch_size, max_length=config.max_length)
    stats = calibrate(loaded, family, batches, config.max_logit_samples, config.seed, progress=progress)

    logger.info("planning with %s (budget %s)", pruning_method.name, budget)
    plan = pruning_method(stats, loaded, family, budget, config)
    plan.base_model = str(model)
    plan.metadata.update(
        {
            "uncurl_hf_version": __version__,
            "budget": budget,
            "calibration": {
                "task": task,
                "calibration_file": str(calibration_file) if calibration_file is not None else None,
                "num_examples": len(examples),
                "max_length": config.max_length,
            },
            "stats": stats.summary(),
        }
    )
    plan.validate(sizes, budget)

    logger.info("applying the plan")
    pruned = apply_plan(loaded, family, plan, scale_expert_capacity=config.scale_expert_capacity)
    output = write_checkpoint(
        pruned, output_dir, plan, source_dir=source, overwrite=overwrite, max_shard_size=max_shard_size
    )
    if plan_out is not None:
        plan.save(plan_out)
    result = PruneResult(
        output_dir=output,
        plan=plan,
        stats_summary=stats.summary(),
        params_before=count_parameters(loaded),
        params_after=count_parameters(pruned),
        disk_bytes_before=weights_size(source),
        disk_bytes_after=weights_size(output),
        wall_time_s=time.perf_counter() - start,
        experts_before=sizes,
        experts_after=plan.counts,
    )
    logger.info("done in %.1f s", result.wall_time_s)
    return result


def _calibration_examples(
    task: str | None, calibration_file: str | Path | None, config: PruningConfig
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
