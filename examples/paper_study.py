"""The UNCURL paper's study at tiny scale, from Python (the same as ``uncurl study [--small]``).

Trains the study zoo that is not built yet (Switch SMoEs with E = 1..64 experts, same per-expert size and token
budget, fine-tuned on sentiment / topic / hedge), sweeps pruning factors 1..E for UNCURL and the baselines, and writes
docs/study.md: Table 1 (threshold factor per E and task, with bootstrap intervals), Table 2 (pruned from E to E/k
experts vs trained from scratch with E/k), and the sweep figure.

    python examples/paper_study.py --small   # E in {8, 16}, sentiment: ~1 min once the three models exist
    python examples/paper_study.py           # everything: hours on a 2-core CPU the first time, cached afterwards
"""

from __future__ import annotations

import argparse
import logging

from uncurl_hf.experiments.study import SMALL, StudyConfig, run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="E in {8,16}, one task")
    parser.add_argument("--output", default="docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = SMALL if args.small else StudyConfig()
    name = "study_small" if args.small else "study"
    report = run_study(config, output=args.output, name=name,
                       command="python examples/paper_study.py" + (" --small" if args.small else ""))
    for row in report.table1:
        print(f"{row['task']:<10} E={row['experts']:<3} {row['method']:<10} threshold x{row['threshold']:g} "
              f"CI {row['ci']}")


if __name__ == "__main__":
    main()
