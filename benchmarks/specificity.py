"""Task-specific pruning, made visible: prune the embedded decoder for ONE domain, measure EVERY domain.

    OMP_NUM_THREADS=2 python benchmarks/specificity.py                 # targets code, shakespeare, news; x2 x4 x8
    python benchmarks/specificity.py --targets code --methods frequency,uncurl --factors 2 --windows 8

The mission's premise is that one task uses a few experts, so pruning for it keeps it and gives up the rest. On
``tiny-qwen3moe-64`` (six pretraining domains, 64 experts top-8) each target domain's train-side documents are the
calibration data (``CalibrationSpec(data=texts)``, the first ``--num-calibration`` documents cut to 128 tokens, as
``uncurl prune --calibration-file`` would read them), every method plans from those statistics with the one planning
step, and the pruned model's perplexity on every domain's held-out windows (never trained on) is divided by the
unpruned model's. ``target`` is the ratio on the calibration domain, ``others`` the geometric mean over the other
five; the expected shape is ``target`` near 1 and ``others`` much larger.

The domains' text is read from the package archives the zoo build fetched (``uncurl zoo build tiny-qwen3moe-64``
caches them; a fresh machine fetches them from PyPI once).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence

logger = logging.getLogger("benchmarks.specificity")

DEFAULT_TARGETS = ("code", "shakespeare", "news")
DEFAULT_METHODS = ("frequency", "reap", "msmoe", "uncurl")


def run(
    model_name: str, targets: Sequence[str], methods: Sequence[str], factors: Sequence[float], windows: int,
    num_calibration: int, seed: int,
) -> list[dict]:
    from uncurl_hf import CalibrationSpec, PruneRecipe, apply_plan, build_batches, calibrate, get_family, load_model
    from uncurl_hf.calibration.data import calibration_examples
    from uncurl_hf.experiments.sweep import parse_method_spec
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.io.resolve import resolve_model
    from uncurl_hf.methods import get_method
    from uncurl_hf.pipeline.planning import plan_model
    from uncurl_hf.surgery.budget import expert_budget
    from uncurl_hf.zoo import domains
    from uncurl_hf.zoo.decoder_report import heldout_windows, model_nll

    folder = resolve_model(model_name)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    family = get_family(model)
    sizes = family.layer_sizes(model)
    held = {d: heldout_windows(tokenizer, d, windows) for d in domains.DOMAINS}
    base = {d: model_nll(model, w) for d, w in held.items()}
    rows = []
    for target in targets:
        spec = CalibrationSpec(data=list(domains.domain_splits(target)["train"]), num_examples=num_calibration,
                               seed=seed, max_length=128)
        batches = build_batches(calibration_examples(spec, tokenizer), tokenizer, batch_size=spec.batch_size,
                                max_length=spec.max_length)
        stats = calibrate(model, family, batches, spec.max_logit_samples, seed, progress=False)
        for factor in factors:
            budget = expert_budget(sizes, factor)
            for method_spec in methods:
                name, kwargs = parse_method_spec(method_spec)
                recipe = PruneRecipe(method=name, factor=factor, method_options=kwargs, calibration=spec)
                plan = plan_model(model, family, get_method(name), stats, budget, recipe).plan
                pruned = apply_plan(model, family, plan)
                ratios = {d: math.exp(model_nll(pruned, w) - base[d]) for d, w in held.items()}
                others = [r for d, r in ratios.items() if d != target]
                rows.append({"target": target, "method": method_spec, "factor": factor, "ratios": ratios,
                             "others": math.exp(sum(map(math.log, others)) / len(others))})
                logger.info("%s %s x%g: target %.3f others %.3f", target, method_spec, factor, ratios[target],
                            rows[-1]["others"])
    return rows


def format_table(rows: Sequence[dict]) -> str:
    from quality import text_table  # benchmarks/quality.py, beside this script

    from uncurl_hf.zoo import domains

    header = ["target", "method", "factor", "target ppl x", "others ppl x", *domains.DOMAINS]
    lines = [header]
    for r in rows:
        lines.append([r["target"], r["method"], f"x{r['factor']:g}", f"{r['ratios'][r['target']]:.3f}",
                      f"{r['others']:.3f}", *[f"{r['ratios'][d]:.3f}" for d in domains.DOMAINS]])
    return text_table(lines, left=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen3moe-64")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="calibration domains")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--factors", default="2,4,8")
    parser.add_argument("--windows", type=int, default=32, help="held-out 128-token windows per domain")
    parser.add_argument("--num-calibration", type=int, default=256, help="calibration documents of the target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    import transformers
    from quality import split_methods  # benchmarks/quality.py: method specs whose options hold commas

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    rows = run(args.model, args.targets.split(","), split_methods(args.methods),
               [float(f) for f in args.factors.split(",")], args.windows, args.num_calibration, args.seed)
    print("Perplexity on each domain's held-out text, pruned / unpruned (pruned for the target domain only)")
    print(format_table(rows))
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
