"""Quality benchmark: which method keeps a task's quality, on models where the methods differ, with paired intervals.

    OMP_NUM_THREADS=2 python benchmarks/quality.py                        # the suite below, 3 calibration seeds
    python benchmarks/quality.py --pairs tiny-switch-8:sentiment --seeds 0 --factors 2 --limit 50   # smoke row
    python benchmarks/quality.py --pairs study-switch-64-topic:topic --methods msmoe,uncurl,uncurl:router=fitted

The suite (``--pairs``, MODEL:TASK): the embedded 64-expert decoder ``tiny-qwen3moe-64`` (prompted labels) on topic
and sentiment, and the study zoo's Switch models with E = 16, 32, 64 on topic and hedge (``uncurl zoo build NAME``
makes them once; a pair whose model is not built is skipped with the command). tiny-switch-8 is a smoke row only:
every method keeps ~100% there.

Per pair and calibration seed the model is calibrated ONCE (the seeded draw of ``--num-calibration`` train examples
that ``uncurl prune --task`` uses) and every method plans from those statistics with the one planning step
(:func:`uncurl_hf.pipeline.planning.plan_model`); the pruned model is built in memory and every test example is
scored (argmax of the label log-likelihoods). Per cell the table shows the test accuracy as % of the unpruned
model (mean over seeds), the best method, and the paired bootstrap (``--bootstrap`` resamples of the test examples,
each example's correctness averaged over seeds) of UNCURL minus the best: ``ok`` when UNCURL is the best or the 95%
interval holds 0, ``worse`` otherwise. ``--reference`` names the spec compared (default ``uncurl``).

Diagnostics per plan (second table): ``replaced`` = share of the routing decisions whose expert is no longer in the
model as it was (dropped, or merged into another member's group anchor), mean over layers; for merges also the
plan's ``router_agreement`` (tokens whose top group is their top expert's group) from ``extras["diagnostics"]``;
``e`` = the layer-output error on held-out (dev) calibration tokens, mean over layers; ``k`` = KL(unpruned ||
pruned) of the label distributions on the first ``DEV_PROMPTS`` dev prompts, a whole-model proxy that needs no labels.

A method spec may carry options: ``uncurl:router=fitted,centres=usage`` (values parsed as JSON, as with
``uncurl prune --method-arg``). ``--sequential`` adds ``SPEC +seq`` rows: the same method planned layer by layer on
the progressively pruned model (``uncurl prune --sequential``); their plan time includes the extra calibration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uncurl_hf.experiments.tables import text_table

logger = logging.getLogger("benchmarks.quality")

DEFAULT_PAIRS = (
    "tiny-qwen3moe-64:topic", "tiny-qwen3moe-64:sentiment",
    "study-switch-16-topic:topic", "study-switch-32-topic:topic", "study-switch-64-topic:topic",
    "study-switch-16-hedge:hedge", "study-switch-32-hedge:hedge", "study-switch-64-hedge:hedge",
)
DEFAULT_METHODS = ("random", "frequency", "reap", "ean", "msmoe", "hcsmoe", "uncurl")
DEFAULT_FACTORS = (2.0, 4.0, 8.0)
DEV_PROMPTS = 200  # dev prompts the label KL to the unpruned model is measured on


@dataclass
class Cell:
    """One (model, task, method spec, factor, seed) measurement; ``correct`` is per test example (0/1)."""

    model: str
    task: str
    method: str
    factor: float
    seed: int
    score: float
    baseline: float
    plan_s: float
    replaced: float
    router_agreement: float
    counts: dict[str, int] = field(default_factory=dict)
    correct: list[int] = field(default_factory=list, repr=False)
    # mean over layers of the MoE block's relative output error on held-out (dev split) calibration tokens
    reconstruction: float = float("nan")
    # mean KL(unpruned || pruned) of the label distributions on dev prompts (no labels needed): a whole-model proxy
    label_kl: float = float("nan")

    @property
    def relative(self) -> float:
        """Accuracy as a percentage of the unpruned model's."""
        return 100.0 * self.score / self.baseline if self.baseline else float("nan")


@dataclass
class PairInfo:
    """The unpruned reference of one (model, task) pair."""

    model: str
    task: str
    baseline: float
    num_test: int
    num_experts: int
    calibration_s: float


def replaced_share(plan: Any, stats: Any) -> float:
    """Mean over layers of the share of routing decisions whose expert is not kept as it was (see the docstring)."""
    shares = []
    for layer in plan.layers:
        counts = stats[layer.name].counts.double()
        total = float(counts.sum())
        if total <= 0:
            continue
        kept = sum(float(counts[max(g, key=lambda e: (float(counts[e]), -e))]) for g in layer.groups)
        shares.append(1.0 - kept / total)
    return float(np.mean(shares)) if shares else 0.0


def reconstruction_error(model: Any, family: Any, plan: Any, held_out: Any) -> float:
    """Mean over layers of ``||F - F_P|| / ||F||`` (:mod:`uncurl_hf.methods._guard`) on ``held_out`` statistics'
    sampled tokens: the plan's layers as the checkpoint computes them, against the original layers."""
    from uncurl_hf.methods._guard import GUARD_TOKENS, relative_errors
    from uncurl_hf.methods.hcsmoe import token_subset

    layers = {layer.name: layer for layer in family.sparse_layers(model)}
    errors = [
        relative_errors(family, layers[lp.name], [("plan", lp)],
                        token_subset(held_out[lp.name].hidden_sample, GUARD_TOKENS, 0))["plan"]
        for lp in plan.layers
    ]
    return float(np.nanmean(errors)) if errors else float("nan")


def label_kl(reference: Any, pruned: Any) -> float:
    """Mean over examples of KL(reference || pruned) between two ``[N, L]`` label log-distributions."""
    p, q = reference.double(), pruned.double()
    return float((p.exp() * (p - q)).sum(-1).mean())


def router_agreement(plan: Any) -> float:
    """Mean over merged layers of the plan's recorded router agreement (NaN for pure pruning)."""
    values = [layer.extras.get("diagnostics", {}).get("router_agreement") for layer in plan.layers]
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else float("nan")


def run_pair(
    pair: str, methods: Sequence[str], factors: Sequence[float], seeds: Sequence[int], limit: int | None,
    num_calibration: int, sequential: bool = False,
) -> tuple[PairInfo, list[Cell]]:
    """Calibrate once per seed and score every method spec at every factor on the pair's test split (and, with
    ``sequential``, each spec planned layer by layer too: rows ``SPEC +seq``)."""
    from uncurl_hf import CalibrationSpec, PruneRecipe, apply_plan, build_batches, calibrate, get_family, load_model
    from uncurl_hf.calibration.data import calibration_examples
    from uncurl_hf.errors import InvalidFactorError
    from uncurl_hf.evaluation.scoring import label_distribution
    from uncurl_hf.evaluation.tasks import get_task
    from uncurl_hf.experiments.sweep import parse_method_spec
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.io.resolve import resolve_model
    from uncurl_hf.methods import get_method
    from uncurl_hf.pipeline.planning import plan_model
    from uncurl_hf.surgery.budget import expert_budget

    model_name, task_name = pair.rsplit(":", 1)
    model_dir = resolve_model(model_name)
    task = get_task(task_name)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    family = get_family(model)
    sizes = family.layer_sizes(model)
    test = task.load_split("test")[:limit] if limit else task.load_split("test")
    targets = np.array([task.labels.index(e.target) for e in test])
    reference = label_distribution(model, tokenizer, task, test).argmax(-1).numpy()
    dev = task.load_split("dev")[:DEV_PROMPTS]
    dev_reference = label_distribution(model, tokenizer, task, dev)
    baseline = float((reference == targets).mean())
    cells: list[Cell] = []
    held_out_spec = CalibrationSpec(task=task_name, split="dev", num_examples=num_calibration, seed=0)
    held_out_examples = calibration_examples(held_out_spec, tokenizer, causal=family.is_causal_lm())
    held_out = calibrate(model, family, build_batches(held_out_examples, tokenizer, batch_size=held_out_spec.batch_size,
                                                      max_length=held_out_spec.max_length),
                         held_out_spec.max_logit_samples, 0, progress=False)
    calibration_s = 0.0
    modes = ("one-shot", "seq") if sequential else ("one-shot",)
    for seed in seeds:
        spec = CalibrationSpec(task=task_name, num_examples=num_calibration, seed=seed)
        start = time.perf_counter()
        examples = calibration_examples(spec, tokenizer, causal=family.is_causal_lm())  # the decoder's prompt
        batches = build_batches(examples, tokenizer, batch_size=spec.batch_size, max_length=spec.max_length)
        stats = calibrate(model, family, batches, spec.max_logit_samples, seed, progress=False)
        calibration_s += time.perf_counter() - start
        for factor in factors:
            try:
                budget = expert_budget(sizes, factor)
            except InvalidFactorError as exc:
                logger.warning("%s: skipping factor %g (%s)", pair, factor, exc)
                continue
            for method_spec, mode in [(m, mode) for m in methods for mode in modes]:
                name, kwargs = parse_method_spec(method_spec)
                recipe = PruneRecipe(method=name, factor=factor, method_options=kwargs, calibration=spec)
                start = time.perf_counter()
                plan = plan_model(model, family, get_method(name), stats, budget, recipe, sequential=mode == "seq",
                                  batches=batches).plan
                plan_s = time.perf_counter() - start
                method_spec = f"{method_spec} +seq" if mode == "seq" else method_spec
                pruned = apply_plan(model, family, plan)
                predicted = label_distribution(pruned, tokenizer, task, test).argmax(-1).numpy()
                correct = (predicted == targets).astype(int)
                cells.append(Cell(
                    model_name, task_name, method_spec, factor, seed, float(correct.mean()), baseline, plan_s,
                    replaced_share(plan, stats), router_agreement(plan), plan.counts, correct.tolist(),
                    reconstruction_error(model, family, plan, held_out),
                    label_kl(dev_reference, label_distribution(pruned, tokenizer, task, dev)),
                ))
                logger.info("%s seed %d  %-32s x%g  %.1f%%  replaced %.1f%%  error %.3f  dev KL %.4f  %.1f s", pair,
                            seed, method_spec, factor, cells[-1].relative, 100 * cells[-1].replaced,
                            cells[-1].reconstruction, cells[-1].label_kl, plan_s)
    info = PairInfo(model_name, task_name, baseline, len(test), max(sizes.values()), calibration_s / len(seeds))
    return info, cells


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` (per-example values) and its 95% percentile-bootstrap interval over examples."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


@dataclass
class Verdict:
    """One (pair, factor) row of the summary."""

    model: str
    task: str
    factor: float
    relative: dict[str, float]
    best: str
    difference: tuple[float, float, float]  # reference - best, in accuracy points: mean, low, high
    ok: bool


def summarize(infos: Sequence[PairInfo], cells: Sequence[Cell], reference: str, resamples: int) -> list[Verdict]:
    """Per (pair, factor): mean relative score per method, the best method, reference minus best with its interval."""
    verdicts = []
    for info in infos:
        mine = [c for c in cells if (c.model, c.task) == (info.model, info.task)]
        for factor in sorted({c.factor for c in mine}):
            at = [c for c in mine if c.factor == factor]
            methods = list(dict.fromkeys(c.method for c in at))
            per_example = {m: np.mean([c.correct for c in at if c.method == m], axis=0) for m in methods}
            relative = {m: float(np.mean([c.relative for c in at if c.method == m])) for m in methods}
            best = max(methods, key=lambda m: (relative[m], m == reference))
            if reference not in per_example:
                verdicts.append(Verdict(info.model, info.task, factor, relative, best, (np.nan,) * 3, False))
                continue
            diff = paired_interval(per_example[reference], per_example[best], resamples)
            diff = tuple(100 * v for v in diff)
            ok = best == reference or diff[2] >= 0
            verdicts.append(Verdict(info.model, info.task, factor, relative, best, diff, ok))
    return verdicts


def format_summary(verdicts: Sequence[Verdict], reference: str) -> str:
    methods = list(dict.fromkeys(m for v in verdicts for m in v.relative))
    rows = [["model", "task", "factor", *methods, "best", f"{reference} - best [95% CI]", "verdict"]]
    for v in verdicts:
        low, high = v.difference[1], v.difference[2]
        rows.append([v.model, v.task, f"x{v.factor:g}", *[f"{v.relative.get(m, float('nan')):.1f}" for m in methods],
                     v.best, f"{v.difference[0]:+.1f} [{low:+.1f}, {high:+.1f}]", "ok" if v.ok else "worse"])
    return text_table(rows)


def format_diagnostics(cells: Sequence[Cell]) -> str:
    """Replaced routing share (and router agreement for merges) and held-out layer-output error per method and
    factor, mean over seeds."""
    keys = list(dict.fromkeys((c.model, c.task, c.factor) for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    rows = [["model", "task", "factor", *methods]]
    for model, task, factor in keys:
        values = []
        for m in methods:
            at = [c for c in cells if (c.model, c.task, c.factor, c.method) == (model, task, factor, m)]
            if not at:
                values.append("-")
                continue
            text = f"{100 * np.mean([c.replaced for c in at]):.1f}"
            agreement = np.mean([c.router_agreement for c in at])
            text = text if np.isnan(agreement) else f"{text}/{100 * agreement:.0f}"
            values.append(f"{text} e{np.mean([c.reconstruction for c in at]):.2f} "
                          f"k{np.mean([c.label_kl for c in at]):.3f}")
        rows.append([model, task, f"x{factor:g}", *values])
    return text_table(rows)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help="comma-separated MODEL:TASK pairs")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method specs")
    parser.add_argument("--factors", type=_floats, default=list(DEFAULT_FACTORS), help="comma-separated factors")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (default 0,1,2)")
    parser.add_argument("--limit", type=int, help="score only the first N test examples")
    parser.add_argument("--num-calibration", type=int, default=256, help="calibration examples (as uncurl prune)")
    parser.add_argument("--reference", default="uncurl", help="the method spec compared with the best (default uncurl)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--sequential", action="store_true",
                        help="also plan every method layer by layer on the progressively pruned model ('SPEC +seq')")
    parser.add_argument("--json", help="also write every cell (with per-example correctness) as JSON here")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print the tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    import transformers

    from uncurl_hf.errors import ZooModelNotBuiltError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from uncurl_hf.experiments.sweep import split_methods

    methods = split_methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    start = time.perf_counter()
    infos: list[PairInfo] = []
    cells: list[Cell] = []
    for pair in filter(None, args.pairs.split(",")):
        try:
            info, pair_cells = run_pair(pair, methods, args.factors, seeds, args.limit, args.num_calibration,
                                         args.sequential)
        except ZooModelNotBuiltError as exc:
            logger.warning("skipping %s: %s", pair, exc)
            continue
        infos.append(info)
        cells.extend(pair_cells)
    verdicts = summarize(infos, cells, args.reference, args.bootstrap)
    print("Test accuracy, % of the unpruned model (mean over seeds "
          f"{','.join(map(str, seeds))}); {args.reference} - best in accuracy points, paired bootstrap")
    print(format_summary(verdicts, args.reference))
    print("\nReplaced routing share % (merges: / router agreement %), e = layer-output error on held-out dev tokens"
          " (mean over layers) and k = label KL(unpruned || pruned) on dev prompts, mean over seeds")
    print(format_diagnostics(cells))
    print()
    for info in infos:
        print(f"{info.model} {info.task}: unpruned {100 * info.baseline:.1f}% on {info.num_test} test examples, "
              f"E={info.num_experts}, calibration {info.calibration_s:.1f} s per seed")
    print(f"{sum(v.ok for v in verdicts)}/{len(verdicts)} cells ok for {args.reference}; "
          f"wall {time.perf_counter() - start:.0f} s")
    if args.json:
        payload = {"pairs": [asdict(i) for i in infos], "verdicts": [asdict(v) for v in verdicts],
                   "results": [{**asdict(c), "relative": c.relative} for c in cells]}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
