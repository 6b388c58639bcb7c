"""Quality benchmark: every pruning method x factor x task, scored as % of the unpruned model, with planning time.

    OMP_NUM_THREADS=1 python benchmarks/quality.py                      # zoo model tiny-switch-8, all methods
    python benchmarks/quality.py --model path/to/ckpt --tasks sentiment --methods frequency,uncurl \\
        --factors 2,4 --limit 200 --json results.json

A method spec may carry options: ``uncurl:router=anchor,uniform=true`` (values parsed as JSON, as with
``uncurl prune --method-arg``), so variants of one method can be compared side by side.

Per task the model is calibrated ONCE (the same seeded draw of ``--num-calibration`` training examples that
``uncurl prune --task`` uses) and every method plans from those statistics; the pruned model is built in memory with
:func:`uncurl_hf.apply_plan` and scored on the test split with :func:`uncurl_hf.evaluation.scoring.label_distribution`. That is
``uncurl prune`` minus the checkpoint writing; ``--from-disk`` also writes every pruned model and scores the
reloaded checkpoint instead. "plan s" is the wall time of the method alone (calibration is shared and reported once).

``--sequential`` adds a row ``METHOD +seq`` per method and factor: the same method planned layer by layer, each
layer on statistics of the model whose earlier layers are already pruned (``uncurl prune --sequential``, see
:mod:`uncurl_hf.pipeline.sequential`); its "plan s" includes the extra calibration passes (one per sparse layer after the
first).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.quality")

DEFAULT_METHODS = ("random", "frequency", "reap", "msmoe", "hcsmoe", "uncurl", "uncurl:uniform=true")
DEFAULT_FACTORS = (2.0, 4.0, 8.0)


@dataclass
class Cell:
    """One (task, method spec, factor) measurement."""

    task: str
    method: str
    factor: float
    score: float
    baseline: float
    plan_s: float
    counts: dict[str, int] = field(default_factory=dict)
    agreement: float = float("nan")  # % of test examples where pruned and original predict the same label
    kl: float = float("nan")  # mean KL(original || pruned) of the label distribution, in nats

    @property
    def relative(self) -> float:
        """Score as a percentage of the unpruned model's score."""
        return 100.0 * self.score / self.baseline if self.baseline else float("nan")


@dataclass
class TaskInfo:
    """The unpruned reference of one task."""

    task: str
    metric: str
    baseline: float
    num_test: int
    num_calibration: int
    calibration_s: float


def run_task(
    model_dir: Path,
    task_name: str,
    methods: Sequence[str],
    factors: Sequence[float],
    limit: int | None,
    num_calibration: int,
    seed: int,
    from_disk: bool,
    sequential: bool = False,
) -> tuple[TaskInfo, list[Cell]]:
    """Calibrate once on ``task_name`` and score every method spec at every factor."""
    from uncurl_hf import CalibrationSpec, PruneRecipe, apply_plan, build_batches, calibrate, get_family, load_model
    from uncurl_hf.surgery.budget import expert_budget
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.errors import InvalidFactorError
    from uncurl_hf.experiments.sweep import parse_method_spec
    from uncurl_hf.evaluation.scoring import label_distribution
    from uncurl_hf.methods import get_method
    from uncurl_hf.pipeline.planning import plan_model
    from uncurl_hf.evaluation.tasks import get_task

    task = get_task(task_name)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    family = get_family(model)
    sizes = family.layer_sizes(model)
    test = task.load_split("test")[:limit] if limit else task.load_split("test")
    reference = label_distribution(model, tokenizer, task, test)
    baseline = _score(task, reference, test)
    defaults = CalibrationSpec(task=task_name, num_examples=num_calibration, seed=seed)  # batch/length defaults
    examples = task.calibration_examples(num_calibration, seed)
    start = time.perf_counter()
    batches = build_batches(examples, tokenizer, batch_size=defaults.batch_size, max_length=defaults.max_length)
    stats = calibrate(model, family, batches, defaults.max_logit_samples, seed, progress=False)
    info = TaskInfo(task_name, task.metric, baseline, len(test), len(examples), time.perf_counter() - start)
    logger.info("%s: unpruned %s %.4f on %d test examples", task_name, task.metric, baseline, len(test))

    cells = []
    for factor in factors:
        try:
            budget = expert_budget(sizes, factor)
        except InvalidFactorError as exc:
            logger.warning("%s: skipping factor %g (%s)", task_name, factor, exc)
            continue
        for spec in methods:
            name, kwargs = parse_method_spec(spec)
            method = get_method(name)
            recipe = PruneRecipe(method=name, factor=factor, method_options=kwargs, calibration=defaults)
            for mode in ("one-shot", "sequential") if sequential else ("one-shot",):
                start = time.perf_counter()
                plan = plan_model(model, family, method, stats, budget, recipe, sequential=mode == "sequential",
                                  batches=batches).plan  # the one planning step (allocate, plan, validate)
                plan_s = time.perf_counter() - start
                pruned = apply_plan(model, family, plan)
                if from_disk:
                    pruned = _reload(pruned, plan, model_dir)
                distribution = label_distribution(pruned, tokenizer, task, test)
                score = _score(task, distribution, test)
                agreement, kl = _divergence(reference, distribution)
                label = spec if mode == "one-shot" else f"{spec} +seq"
                cells.append(Cell(task_name, label, factor, score, baseline, plan_s, plan.counts, agreement, kl))
                logger.info(
                    "%s  %-24s x%g  %.4f (%.1f%%)  %.2f s", task_name, label, factor, score, cells[-1].relative, plan_s
                )
    return info, cells


def _score(task: Any, distribution: Any, examples: Sequence[Any]) -> float:
    """The task metric of the argmax predictions of an [N, L] label distribution (one forward pass serves both)."""
    from uncurl_hf.evaluation.scoring import metric_score

    return metric_score(task, [task.labels[i] for i in distribution.argmax(-1).tolist()], examples)


def _divergence(reference: Any, pruned: Any) -> tuple[float, float]:
    """(% same argmax, mean KL(reference || pruned)) of two [N, L] label log-probability tensors."""
    agreement = 100.0 * float((reference.argmax(-1) == pruned.argmax(-1)).double().mean())
    kl = float((reference.exp() * (reference - pruned)).sum(-1).mean())
    return agreement, kl


def _reload(pruned: Any, plan: Any, source: Path) -> Any:
    """Write ``pruned`` like `uncurl prune` does and load it back (scores the checkpoint users download)."""
    from uncurl_hf import load_model, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="uncurl-bench-") as tmp:
        out = write_checkpoint(pruned, Path(tmp) / "pruned", plan, source_dir=source)
        return load_model(out)


def format_table(infos: Sequence[TaskInfo], cells: Sequence[Cell]) -> str:
    """Rows: method x factor; per task: score as % of unpruned and the method's planning time."""
    tasks = [info.task for info in infos]
    by_key = {(c.method, c.factor, c.task): c for c in cells}
    rows = sorted({(c.method, c.factor) for c in cells}, key=lambda r: (r[1], _method_order(cells, r[0])))
    header = (
        ["method", "factor"]
        + [f"{t} %" for t in tasks]
        + [f"{t} agree %" for t in tasks]
        + [f"{t} KL e-3" for t in tasks]
        + [f"{t} plan s" for t in tasks]
    )
    lines = [header]
    for method, factor in rows:
        found = [by_key.get((method, factor, t)) for t in tasks]
        lines.append(
            [method, f"{factor:g}"]
            + [f"{c.relative:.1f}" if c else "-" for c in found]
            + [f"{c.agreement:.1f}" if c else "-" for c in found]
            + [f"{1000 * c.kl:.2f}" if c else "-" for c in found]
            + [f"{c.plan_s:.2f}" if c else "-" for c in found]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in lines
    ]
    text.insert(1, "-" * len(text[0]))
    notes = [
        f"{i.task}: unpruned {i.metric} = {i.baseline:.4f} on {i.num_test} test examples; "
        f"calibration {i.num_calibration} train examples in {i.calibration_s:.1f} s"
        for i in infos
    ]
    return "\n".join(text + [""] + notes)


def _method_order(cells: Sequence[Cell], method: str) -> int:
    return [c.method for c in cells].index(method)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-switch-8", help="zoo model name or checkpoint folder")
    parser.add_argument("--tasks", default="sentiment", help="comma-separated registered tasks")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method specs")
    parser.add_argument(
        "--factors", type=_floats, default=list(DEFAULT_FACTORS), help="comma-separated factors (default 2,4,8)"
    )
    parser.add_argument("--limit", type=int, help="score only the first N test examples")
    parser.add_argument("--num-calibration", type=int, default=256, help="calibration examples (as uncurl prune)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-disk", action="store_true", help="write + reload every pruned model before scoring")
    parser.add_argument(
        "--sequential", action="store_true",
        help="also plan every method layer by layer on the progressively pruned model (rows 'METHOD +seq')",
    )
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print the table")
    return parser


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs, where a spec's own options also use commas (``uncurl:a=1,b=2,frequency``)."""
    specs: list[str] = []
    for item in filter(None, text.split(",")):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from uncurl_hf.io.resolve import resolve_model

    model_dir = resolve_model(args.model)
    methods = split_methods(args.methods)
    infos: list[TaskInfo] = []
    cells: list[Cell] = []
    for task in filter(None, args.tasks.split(",")):
        info, task_cells = run_task(
            model_dir, task, methods, args.factors, args.limit, args.num_calibration, args.seed, args.from_disk,
            args.sequential,
        )
        infos.append(info)
        cells.extend(task_cells)
    print(f"model: {model_dir}")
    print(format_table(infos, cells))
    if args.json:
        payload = {
            "model": str(model_dir),
            "tasks": [asdict(i) for i in infos],
            "results": [{**asdict(c), "relative": c.relative} for c in cells],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
