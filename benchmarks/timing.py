"""Time at real shapes (issue 17): where each method's prune spends its time, and what the calibration hooks cost.

Models (random weights, real shapes; built once and cached in ``--workdir``):

* ``switch-base-8``: google/switch-base-8 shapes (d_model 768, d_ff 3072, 8 experts, 12 sparse layers, 619M
  parameters), float32 as the Hub checkpoint is, 2.48 GB (``benchmarks/scale.py``'s generator), with the zoo's
  tiny-switch-8 tokenizer;
* ``qwen3-30b-a3b``: a bfloat16 Qwen3-MoE with Qwen3-30B-A3B layer shapes, 128 experts top-8, 2 layers, 2.53 GB
  (``benchmarks/memory.py``'s model);
* ``tiny-qwen3moe-64``: the shipped 64-expert top-8 decoder (hook work per token is largest next to its small
  matrices).

1. **Stages.** Each method prunes each model (``--task sentiment --factor 2 --num-calibration N``) in its own
   process with the pipeline's stage functions timed: load, calibrate, plan, surgery, write (save, post-write
   check, card). The table gives each stage's seconds, the time outside calibration (the whole ``prune`` call but
   calibration), and that time as a multiple of ``frequency``'s. Target: ``uncurl`` <= 1.5x at switch-base-8
   shapes.
2. **Hook overhead.** ``benchmarks/perf.py``'s measurement (plain forward vs :func:`uncurl_hf.calibrate` over the
   same batches, alternated passes, one torch thread, CPU time), in its own process per model. Target <= 1.05
   (paired ratio).

    nice python benchmarks/timing.py                                 # everything (~35 min on 2 cores)
    python benchmarks/timing.py --models switch-base-8 --methods frequency,uncurl --skip-overhead

Numbers depend on the machine and its load: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmarks: scale (Switch generator), memory (Qwen3 model), perf, quality
ZOO = HERE.parent / "uncurl_hf" / "zoo" / "checkpoints"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
MODELS = ("switch-base-8", "qwen3-30b-a3b", "tiny-qwen3moe-64")
STAGE_NAMES = ("load", "calibrate", "plan", "surgery", "write")
# (module, function, stage): the pipeline functions each stage is the call of.
STAGES = (
    ("uncurl_hf.pipeline.prune", "load_source", "load"),
    ("uncurl_hf.pipeline.planning", "calibrate_model", "calibrate"),
    ("uncurl_hf.pipeline.planning", "plan_model", "plan"),
    ("uncurl_hf.pipeline.output", "apply_plan", "surgery"),
    ("uncurl_hf.pipeline.output", "write_model_checkpoint", "write"),
)
UNCURL_TARGET = 1.5
# Calibration examples per model: (prune, one overhead pass). switch-base-8 uses the 256 and the 30B-shaped
# model memory.py's 128; overhead passes are repeated 2 x (repeats + 1) times, so the slow models get fewer examples.
EXAMPLES = {"switch-base-8": (256, 64), "qwen3-30b-a3b": (128, 16), "tiny-qwen3moe-64": (256, 256)}
OVERHEAD_TARGET = 1.05


def build_switch_base_8(folder: Path) -> Path:
    """google/switch-base-8 shapes in float32 with tiny-switch-8's tokenizer (ids < 4096 fit the 32128 vocabulary)."""
    if (folder / "config.json").is_file():
        return folder
    from scale import SWITCH_BASE, generate_checkpoint, stored_parameters

    generate_checkpoint(folder, stored_parameters(SWITCH_BASE, 8) * 4 / 1e9, dtype="float32", max_shard_size="5GB")
    for name in SIDE_FILES:
        shutil.copyfile(ZOO / "tiny-switch-8" / name, folder / name)
    return folder


def model_folder(name: str, workdir: Path) -> Path:
    if name == "switch-base-8":
        return build_switch_base_8(workdir / "switch-base-8-shapes-fp32")
    if name == "qwen3-30b-a3b":
        from memory import build_model

        return build_model(workdir / "qwen3-30b-a3b-shapes-2l-bf16", layers=2)
    if name == "tiny-qwen3moe-64":
        return ZOO / name
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ---- children: one prune with its stages timed, or one overhead measurement --------------------------------------


def instrument(
    on_stage: Callable[[str, float], None],
    stages: Sequence[tuple[str, str, str]] = STAGES,
    before: Callable[[str], None] | None = None,
) -> None:
    """Wrap every pipeline function of ``stages`` (``(module, function, stage)``) so that each call reports
    ``(stage, seconds)``, after ``before(stage)``; a function this version lacks is skipped (memory.py's profile
    wraps internals too)."""
    import importlib

    for module_name, function, stage in stages:
        module = importlib.import_module(module_name)
        owner_name, _, attribute = function.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        original = getattr(owner, attribute, None)
        if original is None:
            continue

        def timed(*args: Any, __original: Any = original, __stage: str = stage, **kwargs: Any) -> Any:
            if before is not None:
                before(__stage)
            began = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                on_stage(__stage, time.perf_counter() - began)

        setattr(owner, attribute, timed)


def child_prune(source: str, method: str, num_calibration: int, output: str) -> dict[str, Any]:
    from uncurl_hf.cli import main as cli_main

    seconds = dict.fromkeys(STAGE_NAMES, 0.0)

    def record(stage: str, value: float) -> None:
        seconds[stage] += value

    instrument(record)
    began = time.perf_counter()
    code = cli_main(["prune", source, "--task", "sentiment", "--factor", "2", "--num-calibration",
                     str(num_calibration), "--method", method, "-o", output, "--overwrite", "--no-progress"])
    total = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"prune {method} on {source} failed with exit code {code}")
    return {"method": method, "total": total, "outside_calibration": total - seconds["calibrate"], **seconds}


def child_overhead(source: str, num_calibration: int, repeats: int) -> dict[str, Any]:
    from perf import measure_overhead

    o = measure_overhead(Path(source), "sentiment", num_calibration, repeats, seed=0, threads=1)
    return {"plain_s": min(o.plain_cpu), "calibrate_s": min(o.calibrate_cpu), "fastest": o.ratio,
            "paired": o.paired_ratio, "repeats": repeats, "examples": o.num_examples}


def in_child(*arguments: str) -> dict[str, Any]:
    """Run this script with ``arguments`` in a fresh interpreter (nothing imported or cached from another run)."""
    completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    result = next((line for line in completed.stdout.splitlines() if line.startswith("RESULT ")), None)
    if completed.returncode != 0 or result is None:
        raise RuntimeError(f"{' '.join(arguments)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(result.removeprefix("RESULT "))


# ---- the tables --------------------------------------------------------------------------------------------------


def stage_table(rows: Sequence[dict[str, Any]]) -> str:
    """Seconds per stage, per (model, method), and outside calibration as a multiple of frequency's."""
    from uncurl_hf.experiments.tables import text_table

    header = ["model", "examples", "method", *STAGE_NAMES, "total", "outside cal.", "x frequency"]
    lines = [header]
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["method"] == "frequency"), None)
        ratio = f"{row['outside_calibration'] / base['outside_calibration']:.2f}" if base else "-"
        lines.append([row["model"], str(row["examples"]), row["method"], *(f"{row[s]:.1f}" for s in STAGE_NAMES),
                      f"{row['total']:.1f}", f"{row['outside_calibration']:.1f}", ratio])
    return text_table(lines, left=3)


def overhead_table(rows: Sequence[dict[str, Any]]) -> str:
    from uncurl_hf.experiments.tables import text_table

    header = ["model", "examples", "passes", "plain s", "calibrate s", "fastest ratio", "paired ratio", "target"]
    lines = [header] + [
        [r["model"], str(r["examples"]), str(r["repeats"]), f"{r['plain_s']:.2f}", f"{r['calibrate_s']:.2f}",
         f"{r['fastest']:.3f}", f"{r['paired']:.3f}", f"{OVERHEAD_TARGET:.2f}"]
        for r in rows
    ]
    return text_table(lines, left=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "uncurl-timing-bench")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="frequency,reap,uncurl,msmoe")
    parser.add_argument("--num-calibration", type=int, default=None,
                        help="calibration examples per prune (default: per model, see EXAMPLES)")
    parser.add_argument("--overhead-examples", type=int, default=None,
                        help="calibration examples per overhead pass (default: per model, see EXAMPLES)")
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--child-prune", nargs=3, metavar=("SOURCE", "METHOD", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-overhead", metavar="SOURCE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_prune:
        source, method, output = args.child_prune
        print("RESULT " + json.dumps(child_prune(source, method, args.num_calibration, output)))
        return 0
    if args.child_overhead:
        print("RESULT " + json.dumps(child_overhead(args.child_overhead, args.overhead_examples,
                                                    args.overhead_repeats)))
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    stages: list[dict[str, Any]] = []
    overheads: list[dict[str, Any]] = []
    for name in [m for m in args.models.split(",") if m]:
        source = model_folder(name, args.workdir)
        if not args.skip_stages:
            examples = args.num_calibration or EXAMPLES[name][0]
            for method in [m for m in args.methods.split(",") if m]:
                output = args.workdir / f"out-{name}-{method}"
                row = in_child("--child-prune", str(source), method, str(output), "--num-calibration", str(examples))
                shutil.rmtree(output, ignore_errors=True)
                stages.append({"model": name, "examples": examples, **row})
                print(f"{name} {method}: {row['total']:.1f} s", file=sys.stderr, flush=True)
        if not args.skip_overhead:
            examples = args.overhead_examples or EXAMPLES[name][1]
            row = in_child("--child-overhead", str(source), "--overhead-examples", str(examples),
                           "--overhead-repeats", str(args.overhead_repeats))
            overheads.append({"model": name, **row})
            print(f"{name} overhead: paired {row['paired']:.3f}", file=sys.stderr, flush=True)
    if stages:
        print(f"stages, seconds (--task sentiment --factor 2; target: uncurl outside calibration <= "
              f"{UNCURL_TARGET}x frequency's at switch-base-8 shapes)")
        print(stage_table(stages))
    if overheads:
        print(f"\ncalibration-hook overhead (CPU seconds per pass over the batches, 1 torch thread)")
        print(overhead_table(overheads))
    if args.json is not None:
        args.json.write_text(json.dumps({"stages": stages, "overhead": overheads}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
