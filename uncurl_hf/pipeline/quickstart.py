"""`uncurl demo-run`: the README's main command on the embedded default.

Gets ``tiny-switch-8`` (shipped with the package), calibrates on the sentiment task's train split,
prunes it with the chosen method and factor, writes the checkpoint, evaluates original and pruned on the
test split, and prints one table (metric, params, disk MB, ms/example at batch 1 and batched). The command then
prints the task-specificity lines of the embedded decoder (:mod:`uncurl_hf.experiments.specificity`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from uncurl_hf.evaluation.scoring import EvalResult, evaluate_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    original: EvalResult
    pruned: EvalResult
    output_dir: Path
    prune_seconds: float


def run_demo(
    model: str = "tiny-switch-8",
    task: str = "sentiment",
    method: str = "frequency",
    factor: float = 2.0,
    output_dir: str | Path = "outputs/tiny-switch-8-sentiment",
    num_calibration_examples: int = 256,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Prune the zoo model ``model`` on ``task`` and evaluate original vs pruned on the test split."""
    import time

    from uncurl_hf.options import RunOptions
    from uncurl_hf.pipeline.prune import prune
    from uncurl_hf.recipe import CalibrationSpec, PruneRecipe
    from uncurl_hf.zoo.registry import zoo_path

    src = zoo_path(model, progress=progress)
    t0 = time.perf_counter()
    recipe = PruneRecipe(
        method=method, factor=factor,
        calibration=CalibrationSpec(task=task, num_examples=num_calibration_examples, seed=seed),
    )
    result = prune(str(src), recipe, output_dir, RunOptions(overwrite=True, progress=progress))
    seconds = time.perf_counter() - t0
    original = evaluate_checkpoint(src, task, limit=limit, progress=progress)
    pruned = evaluate_checkpoint(result.output_dir, task, limit=limit, progress=progress)
    return DemoResult(original, pruned, Path(result.output_dir), seconds)


def format_table(original: EvalResult, pruned: EvalResult) -> str:
    """Original vs pruned side by side, with the pruned/original ratio."""
    rows = [
        (f"{original.metric} ({original.split}, n={original.num_examples})", original.score, pruned.score, "{:.4f}"),
        ("params", original.params, pruned.params, "{:,}"),
        ("disk MB", original.disk_mb, pruned.disk_mb, "{:.2f}"),
        ("ms/example (batch 1)", original.ms_per_example_batch1, pruned.ms_per_example_batch1, "{:.2f}"),
        (
            f"ms/example (batch {original.batch_size})",
            original.ms_per_example_batched,
            pruned.ms_per_example_batched,
            "{:.2f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'original':>12}  {'pruned':>12}  {'ratio':>7}"]
    for name, a, b, fmt in rows:
        ratio = b / a if a else float("nan")
        lines.append(f"{name:<{width}}  {fmt.format(a):>12}  {fmt.format(b):>12}  {ratio:>7.3f}")
    return "\n".join(lines)
