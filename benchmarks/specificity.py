"""Task-specific pruning, made visible: prune the embedded decoder for ONE domain, measure EVERY domain.

    OMP_NUM_THREADS=2 python benchmarks/specificity.py                 # targets code, shakespeare, news; x2 x4 x8
    python benchmarks/specificity.py --targets code --methods frequency,uncurl --factors 2 --windows 8

The measurement is :mod:`uncurl_hf.experiments.specificity` (also behind the few lines ``uncurl demo-run`` prints):
seeded 128-token windows of each target domain's train-side text calibrate ``tiny-qwen3moe-64``, every method
plans from those statistics, and every domain's held-out perplexity is divided by the unpruned model's. ``target``
is the ratio on the calibration domain, ``others`` the geometric mean over the other five.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

logger = logging.getLogger("benchmarks.specificity")

DEFAULT_TARGETS = ("code", "shakespeare", "news")
DEFAULT_METHODS = ("frequency", "reap", "msmoe", "uncurl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen3moe-64")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="calibration domains")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--factors", default="2,4,8")
    parser.add_argument("--windows", type=int, default=32, help="held-out 128-token windows per domain")
    parser.add_argument("--num-calibration", type=int, default=256, help="calibration windows of the target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("uncurl_hf.experiments.specificity").setLevel(logging.WARNING if args.quiet else logging.INFO)
    import transformers

    from uncurl_hf.experiments.specificity import SpecificitySpec, format_specificity, run_specificity
    from uncurl_hf.experiments.sweep import split_methods  # method specs whose options hold commas

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    spec = SpecificitySpec(
        model=args.model, targets=tuple(args.targets.split(",")), methods=tuple(split_methods(args.methods)),
        factors=tuple(float(f) for f in args.factors.split(",")), windows=args.windows,
        num_calibration=args.num_calibration, seed=args.seed,
    )
    rows = run_specificity(spec)
    print("Perplexity on each domain's held-out text, pruned / unpruned (pruned for the target domain only)")
    print(format_specificity(rows))
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
