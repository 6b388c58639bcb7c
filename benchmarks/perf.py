"""Performance benchmark: what calibration costs over a plain forward, and what pruning buys on CPU.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/perf.py                       # tiny-switch-8, x2/x4/x8
    python benchmarks/perf.py --model DIR --task sentiment --factors 2,4 --repeats 9 --json perf.json

1. Calibration-hook overhead: the same calibration batches (``--num-calibration`` task examples, ``uncurl prune``'s
   batch size and max length) forwarded plainly (``family.forward_inputs`` + ``model(**inputs)``, eval, no grad) and
   through :func:`uncurl_hf.calibrate` (hooks on every sparse block, router and expert, the token sample, float64
   sums), ``--overhead-repeats`` times in alternating order (plain first, then calibrate first, ...) after a
   warm-up of each. Timed in CPU seconds of this process (``process_time``) and in wall seconds; the ratio of the
   fastest passes (least disturbed by other processes) is the headline; the ratio of the median passes and the
   median of the per-repeat ratios (robust to the load changing between repeats) are reported too. Target: <= 1.10.
   For a fair comparison on a shared machine both sides run with ``--threads`` torch threads (default 1: CPU time
   is then the work done, not OpenMP threads spinning while they wait for a busy CPU), and the garbage collector
   is emptied before every pass and paused during it (so no pass pays for the other's garbage).
2. Pruned vs original: ``uncurl prune --method frequency`` at each factor (written to a temporary folder), then for
   the original and every pruned checkpoint, in a fresh forked process each (so allocations do not mix): load time
   (``from_pretrained`` via :func:`uncurl_hf.load_model`, median of 3), parameter bytes, RSS growth of the load, and
   ms/example to score the task's test examples at batch 1 and batch 32 (:func:`uncurl_hf.evaluation.scoring.measure_latency`,
   median of ``--repeats``), plus weight bytes on disk. Printed side by side with ratios to the original; ``--json``
   writes every number.

Numbers depend on the machine and its load: compare ratios measured in one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.perf")


@dataclass
class Overhead:
    """Calibration vs plain forward on the same batches: seconds per pass over all batches."""

    num_examples: int
    num_batches: int
    repeats: int
    threads: int
    plain_cpu: list[float]
    calibrate_cpu: list[float]
    plain_wall: list[float]
    calibrate_wall: list[float]

    @property
    def ratio(self) -> float:
        """Fastest calibrate pass / fastest plain pass, in CPU time."""
        return min(self.calibrate_cpu) / min(self.plain_cpu)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.calibrate_cpu) / statistics.median(self.plain_cpu)

    @property
    def paired_ratio(self) -> float:
        """Median over repeats of calibrate / plain CPU time of the same repeat (neighbours in time, so a change
        of the machine's load between repeats cancels out)."""
        return statistics.median(h / p for h, p in zip(self.calibrate_cpu, self.plain_cpu))

    @property
    def wall_ratio(self) -> float:
        return min(self.calibrate_wall) / min(self.plain_wall)


@dataclass
class ModelCost:
    """One checkpoint's CPU costs."""

    name: str
    factor: float | None
    params: int
    param_mb: float
    disk_mb: float
    load_s: float
    rss_load_mb: float
    ms_batch1: float
    ms_batch32: float


def _rss_mb() -> float:
    """Resident set size of this process (``VmRSS``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - non-Linux


def _in_child(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a forked process (fresh allocations, the parent's imports already done)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        return pool.apply(target, args)


@contextmanager
def torch_threads(threads: int) -> Any:
    """Run the block with ``threads`` torch intra-op threads (0: leave torch's setting), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """``(CPU s, wall s)`` of ``run()``, after emptying the garbage collector, which stays off during the run."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        run()
        return time.process_time() - start_cpu, time.perf_counter() - start_wall
    finally:
        if enabled:
            gc.enable()


def measure_overhead(model_dir: Path, task_name: str, num_examples: int, repeats: int, seed: int,
                     threads: int = 1) -> Overhead:
    """Seconds of a plain forward pass and of :func:`calibrate` over the same batches, in alternating order."""
    import torch

    from uncurl_hf import CalibrationSpec, build_batches, calibrate, get_family, load_model
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.evaluation.tasks import get_task

    model = load_model(model_dir)
    family = get_family(model)
    defaults = CalibrationSpec()
    examples = get_task(task_name).calibration_examples(num_examples, seed)
    batches = build_batches(examples, load_tokenizer(model_dir), defaults.batch_size, defaults.max_length)

    @torch.no_grad()
    def plain() -> None:
        for batch in batches:
            model(**family.forward_inputs(model, batch))

    def hooked() -> None:
        calibrate(model, family, batches, defaults.max_logit_samples, seed, progress=False)

    cpu: dict[str, list[float]] = {"plain": [], "hooked": []}
    wall: dict[str, list[float]] = {"plain": [], "hooked": []}
    with torch_threads(threads) as used:
        plain(), hooked()  # warm-up: allocator, lazy imports, kernels
        runs = (("plain", plain), ("hooked", hooked))
        for repeat in range(repeats):
            for name, run in runs if repeat % 2 == 0 else runs[::-1]:  # ABBA: drifts in load cancel out
                seconds_cpu, seconds_wall = _timed(run)
                cpu[name].append(seconds_cpu)
                wall[name].append(seconds_wall)
    return Overhead(len(examples), len(batches), repeats, used, cpu["plain"], cpu["hooked"], wall["plain"],
                    wall["hooked"])


def _model_cost(folder: str, name: str, factor: float | None, task_name: str, repeats: int) -> dict[str, Any]:
    """Runs in a forked child: load time, memory and latency of one checkpoint."""
    from uncurl_hf import load_model
    from uncurl_hf.io.checkpoint import count_parameters, load_tokenizer, weights_size
    from uncurl_hf.evaluation.scoring import measure_latency
    from uncurl_hf.evaluation.tasks import get_task

    before = _rss_mb()
    start = time.perf_counter()
    model = load_model(folder)
    first_load = time.perf_counter() - start
    rss_load = _rss_mb() - before
    loads = [first_load]
    for _ in range(2):
        start = time.perf_counter()
        load_model(folder)
        loads.append(time.perf_counter() - start)
    tokenizer = load_tokenizer(folder)
    task = get_task(task_name)
    test = task.load_split("test")
    batch1 = [measure_latency(model, tokenizer, task, test[:16], 1) for _ in range(repeats)]
    batch32 = [measure_latency(model, tokenizer, task, test[:64], 32) for _ in range(repeats)]
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return asdict(ModelCost(
        name=name, factor=factor, params=count_parameters(model), param_mb=param_bytes / 1e6,
        disk_mb=weights_size(folder) / 1e6, load_s=statistics.median(loads), rss_load_mb=rss_load,
        ms_batch1=statistics.median(batch1), ms_batch32=statistics.median(batch32),
    ))


def measure_models(model_dir: Path, task_name: str, factors: Sequence[float], repeats: int, seed: int,
                   workdir: Path) -> list[ModelCost]:
    """Prune with ``frequency`` at every factor, then measure the original and each pruned checkpoint."""
    from uncurl_hf import CalibrationSpec, PruneRecipe, RunOptions, prune

    folders: list[tuple[str, float | None, Path]] = [("original", None, model_dir)]
    for factor in factors:
        out = workdir / f"x{factor:g}"
        recipe = PruneRecipe(method="frequency", factor=factor, calibration=CalibrationSpec(task=task_name, seed=seed))
        prune(model_dir, recipe, out, RunOptions(card=False, progress=False))
        folders.append((f"x{factor:g}", factor, out))
    costs = []
    for name, factor, folder in folders:
        logger.info("measuring %s", name)
        costs.append(ModelCost(**_in_child(_model_cost, str(folder), name, factor, task_name, repeats)))
    return costs


def format_report(overhead: Overhead, costs: Sequence[ModelCost]) -> str:
    o = overhead
    lines = [
        f"calibration overhead ({o.num_examples} examples, {o.num_batches} batches, {o.repeats} alternated passes, "
        f"{o.threads} torch thread{'s' if o.threads != 1 else ''}):",
        f"  CPU, fastest pass:  plain forward {1000 * min(o.plain_cpu):.1f} ms, calibrate {1000 * min(o.calibrate_cpu):.1f}"
        f" ms -> ratio {o.ratio:.3f} ({100 * (o.ratio - 1):+.1f}%, target <= +10%)",
        f"  CPU, median pass:   plain forward {1000 * statistics.median(o.plain_cpu):.1f} ms, calibrate "
        f"{1000 * statistics.median(o.calibrate_cpu):.1f} ms -> ratio {o.median_ratio:.3f}",
        f"  CPU, paired:        median of calibrate / plain within each repeat -> ratio {o.paired_ratio:.3f}",
        f"  wall, fastest pass: plain forward {1000 * min(o.plain_wall):.1f} ms, calibrate "
        f"{1000 * min(o.calibrate_wall):.1f} ms -> ratio {o.wall_ratio:.3f}",
    ]
    if not costs:
        return "\n".join(lines)
    lines.append("")
    original = costs[0]
    rows: list[tuple[str, str, str]] = [
        ("params", "params", ",.0f"),
        ("parameter MB", "param_mb", ".2f"),
        ("weights on disk MB", "disk_mb", ".2f"),
        ("RSS growth of load MB", "rss_load_mb", ".1f"),
        ("load s (from_pretrained)", "load_s", ".3f"),
        ("ms/example batch 1", "ms_batch1", ".2f"),
        ("ms/example batch 32", "ms_batch32", ".2f"),
    ]
    header = [""] + [c.name if c.factor is None else f"{c.name} frequency" for c in costs]
    table = [header]
    for label, key, fmt in rows:
        row = [label]
        for cost in costs:
            value = getattr(cost, key)
            text = format(value, fmt)
            if cost is not original:
                base = getattr(original, key)
                text += f" ({value / base:.2f})" if base else ""
            row.append(text)
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table]
    lines.append("(ratio to the original in parentheses)")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-switch-8", help="zoo model name or checkpoint folder")
    parser.add_argument("--task", default="sentiment", help="registered classification task")
    parser.add_argument("--factors", type=_floats, default=[2.0, 4.0, 8.0], help="comma-separated (default 2,4,8)")
    parser.add_argument("--num-calibration", type=int, default=256, help="examples for the overhead (prune's default)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per timing of the checkpoints")
    parser.add_argument("--overhead-repeats", type=int, default=21,
                        help="alternated pairs of passes for the calibration overhead (default 21: a single pass "
                             "varies by +-10%% on a busy machine)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the overhead timing (default 1; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-models", action="store_true", help="only the calibration overhead")
    parser.add_argument("--json", help="also write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from uncurl_hf.io.resolve import resolve_model

    model_dir = resolve_model(args.model)
    logger.info("calibration overhead on %s", model_dir)
    overhead = measure_overhead(model_dir, args.task, args.num_calibration, args.overhead_repeats, args.seed,
                                args.threads)
    costs: list[ModelCost] = []
    if not args.skip_models:
        with tempfile.TemporaryDirectory(prefix="uncurl-perf-") as tmp:
            costs = measure_models(model_dir, args.task, args.factors, args.repeats, args.seed, Path(tmp))
    print(f"model: {model_dir}")
    print(format_report(overhead, costs))
    if args.json:
        payload = {
            "model": str(model_dir),
            "overhead": {**asdict(overhead), "ratio": overhead.ratio, "median_ratio": overhead.median_ratio,
                         "paired_ratio": overhead.paired_ratio, "wall_ratio": overhead.wall_ratio},
            "models": [asdict(c) for c in costs],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
