"""Recovery benchmark: how much of the score lost to pruning a short LoRA fine-tune (`uncurl recover`) wins back.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/recover.py                # zoo models found locally, x4 and x8
    python benchmarks/recover.py --models tiny-switch-8:sentiment --factors 4 --steps 50 --json recover.json

For every zoo model (``NAME:TASK``; study models default to the task in their name) and factor: prune with
``--method`` (frequency by default) on the task, exactly as ``uncurl prune --task`` does, then recover the pruned
folder with ``uncurl_hf.recover.train.recover`` (LoRA on attention + surviving experts, adapter kept, scores before and
after measured on dev and test). The table shows test accuracy of the original, pruned and recovered models, and
"won back" = (recovered - pruned) / (original - pruned), printed only when pruning lost at least ``--min-loss``
points (otherwise there is nothing to win back and the ratio is noise). The control column ``orig.+LoRA`` is the
unpruned model after the same LoRA budget: these tiny models are under-trained, so fine-tuning alone can lift them
above "original", and a recovered score should be read against both.

The default models are the embedded ``tiny-switch-8`` on sentiment (pruning barely hurts it) and, when they exist in
the cache (``uncurl study`` builds them), ``study-switch-16-topic`` and ``study-switch-32-topic``: on topic,
docs/study.md shows frequency pruning at x4/x8 losing 10-38 points. Models missing from the cache are skipped with a
note (never built here: that takes many minutes each).

The recovery budget (100 steps of batch 16, lr 3e-3, r 8) was chosen on the *dev* split of study-switch-32-topic x4
among lr {1e-3, 3e-3} at 100 steps; test scores play no part in choosing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger("benchmarks.recover")

DEFAULT_MODELS = ("tiny-switch-8:sentiment", "study-switch-16-topic", "study-switch-32-topic")
DEFAULT_FACTORS = (4.0, 8.0)


@dataclass
class Row:
    """One (model, factor) measurement; scores are the task metric in [0, 1]."""

    model: str
    task: str
    factor: float
    original_test: float
    pruned_test: float
    recovered_test: float
    original_dev: float
    control_test: float  # the unpruned model after the same LoRA budget
    pruned_dev: float
    recovered_dev: float
    test_examples: int
    trainable_params: int
    params: int
    prune_s: float
    train_s: float
    loss_first: float
    loss_last: float

    def won_back(self, min_loss: float) -> float | None:
        """Share of the lost test score that recovery won back; ``None`` when pruning lost < ``min_loss`` points."""
        lost = self.original_test - self.pruned_test
        if 100 * lost < min_loss:
            return None
        return (self.recovered_test - self.pruned_test) / lost


def parse_model(spec: str) -> tuple[str, str]:
    """``NAME:TASK``, or a study model name whose last part is its task."""
    if ":" in spec:
        name, task = spec.split(":", 1)
        return name, task
    from uncurl_hf.zoo.registry import STUDY_TASKS

    task = spec.rsplit("-", 1)[-1]
    if task not in STUDY_TASKS:
        raise SystemExit(f"give the task of {spec!r} as {spec}:TASK")
    return spec, task


def locate(name: str) -> Path | None:
    """The zoo model's folder if it is shipped or cached; ``None`` (skip) otherwise."""
    from uncurl_hf.errors import UncurlError
    from uncurl_hf.zoo.registry import zoo_path

    try:
        return zoo_path(name, build_if_missing=False)
    except UncurlError as exc:
        logger.warning("skipping %s: %s", name, exc)
        return None


def score(path: Path, task: str, split: str, limit: int | None) -> float:
    from uncurl_hf.io.checkpoint import load_model, load_tokenizer
    from uncurl_hf.evaluation.scoring import task_score
    from uncurl_hf.evaluation.tasks import get_task

    task_obj = get_task(task)
    examples = task_obj.load_split(split)
    return task_score(load_model(path), load_tokenizer(path), task_obj, examples[:limit] if limit else examples)


def lora_control(source: Path, task: str, args: argparse.Namespace) -> dict[str, float]:
    """Test and dev scores of the *unpruned* model after the same LoRA budget: how much of a gain above the
    original is recovery of what pruning lost, and how much is just more fine-tuning of an under-trained model."""
    from uncurl_hf.io.checkpoint import load_model, load_tokenizer
    from uncurl_hf.evaluation.scoring import task_score
    from uncurl_hf.recover.config import RecoverConfig
    from uncurl_hf.recover.lora import add_lora
    from uncurl_hf.recover.train import train_lora, training_batches
    from uncurl_hf.evaluation.tasks import get_task

    config = RecoverConfig(task=task, steps=args.steps, lr=args.lr, rank=args.rank, batch_size=args.batch_size,
                           seed=args.seed)
    from uncurl_hf.families import get_family
    from uncurl_hf.recover.targets import task_type_of

    task_obj = get_task(task)
    model, tokenizer = load_model(source), load_tokenizer(source)
    causal = task_type_of(get_family(model)) == "CAUSAL_LM"  # a decoder learns the task's prompt + label, as recover
    wrapped = add_lora(model, config)
    train_lora(wrapped, training_batches(tokenizer, task_obj.load_split("train"), config, causal=causal),
               steps=config.steps, lr=config.lr, warmup=config.warmup_steps, seed=config.seed,
               progress=not args.quiet)
    limit = args.limit
    return {split: task_score(wrapped, tokenizer, task_obj, task_obj.load_split(split)[:limit] if limit else
                              task_obj.load_split(split)) for split in ("test", "dev")}


def run_one(
    name: str, source: Path, task: str, factor: float, original: dict[str, float], args: argparse.Namespace,
    workdir: Path,
) -> Row:
    """Prune ``source`` at ``factor``, recover it, and compare with the original's scores (``original[split]``)."""
    import uncurl_hf
    from uncurl_hf.recover.config import RecoverConfig
    from uncurl_hf.recover.train import recover

    pruned_dir = workdir / f"{name}-x{factor:g}"
    t0 = time.perf_counter()
    recipe = uncurl_hf.PruneRecipe(
        method=args.method, factor=factor,
        calibration=uncurl_hf.CalibrationSpec(task=task, num_examples=args.num_calibration, seed=args.seed),
    )
    uncurl_hf.prune(str(source), recipe, pruned_dir, uncurl_hf.RunOptions(overwrite=True, progress=False))
    prune_s = time.perf_counter() - t0
    config = RecoverConfig(
        task=task, steps=args.steps, lr=args.lr, rank=args.rank, batch_size=args.batch_size, seed=args.seed,
        eval_test=True, eval_limit=args.limit,
    )
    result = recover(pruned_dir, workdir / f"{name}-x{factor:g}-lora", config, overwrite=True, progress=not args.quiet)
    return Row(
        model=name, task=task, factor=factor,
        original_test=original["test"], pruned_test=result.scores["test"].before,
        recovered_test=result.scores["test"].after,
        original_dev=original["dev"], control_test=original["control_test"], pruned_dev=result.scores["dev"].before,
        recovered_dev=result.scores["dev"].after,
        test_examples=result.scores["test"].num_examples, trainable_params=result.trainable_params,
        params=result.total_params, prune_s=prune_s, train_s=result.train_time_s,
        loss_first=result.losses[0], loss_last=result.losses[-1],
    )


def format_table(rows: Sequence[Row], min_loss: float) -> str:
    header = ("model", "task", "factor", "original", "orig.+LoRA", "pruned", "recovered", "won back", "dev pruned",
              "dev recov.", "LoRA params", "train s")
    lines = []
    for r in rows:
        won = r.won_back(min_loss)
        lines.append((
            r.model, r.task, f"x{r.factor:g}", f"{100 * r.original_test:.1f}", f"{100 * r.control_test:.1f}",
            f"{100 * r.pruned_test:.1f}",
            f"{100 * r.recovered_test:.1f}", f"{100 * won:.0f}%" if won is not None else "no loss",
            f"{100 * r.pruned_dev:.1f}", f"{100 * r.recovered_dev:.1f}",
            f"{r.trainable_params:,} ({100 * r.trainable_params / r.params:.1f}%)", f"{r.train_s:.0f}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(f"{h:<{w}}" if i < 3 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("-" * len(out[0]))
    out += ["  ".join(f"{v:<{w}}" if i < 3 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated NAME[:TASK] zoo models")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in DEFAULT_FACTORS))
    parser.add_argument("--method", default="frequency", help="pruning method")
    parser.add_argument("--steps", type=int, default=100, help="LoRA steps per recovery")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-calibration", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="score only the first N examples of dev and test")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control run (LoRA on the unpruned model, column orig.+LoRA)")
    parser.add_argument("--min-loss", type=float, default=1.0, help="points lost below which 'won back' is not shown")
    parser.add_argument("--workdir", help="keep pruned and recovered folders here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    factors = [float(f) for f in args.factors.split(",") if f.strip()]
    models = [parse_model(spec.strip()) for spec in args.models.split(",") if spec.strip()]
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="uncurl-recover-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, task in models:
            source = locate(name)
            if source is None:
                continue
            original = {split: score(source, task, split, args.limit) for split in ("test", "dev")}
            if args.control:
                original["control_test"] = lora_control(source, task, args)["test"]
            else:
                original["control_test"] = float("nan")
            for factor in factors:
                rows.append(run_one(name, source, task, factor, original, args, workdir))
                logger.info("%s x%g: test %.4f -> %.4f -> %.4f", name, factor, rows[-1].original_test,
                            rows[-1].pruned_test, rows[-1].recovered_test)
    print(format_table(rows, args.min_loss))
    print(f"\n{args.method} pruning; LoRA r={args.rank}, {args.steps} steps of batch {args.batch_size}, "
          f"lr {args.lr:g}; "
          f"test accuracy in %; 'won back' = (recovered - pruned) / (original - pruned); "
          f"{time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
