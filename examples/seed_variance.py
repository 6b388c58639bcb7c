"""Seed variance of the study's topic findings: re-fine-tune the study models with other seeds and re-sweep them.

docs/study.md trained one seed per model, so its topic findings ("no threshold grows with E"; "UNCURL is the most
robust method at E=16 and the weakest at E=64") could be one seed's luck. This script keeps each E's pretraining
(the cached ``zoo-work/study-switch-E``: the recipe's ``pretrain_key`` makes the builder reuse it, and the script
refuses to start a pretraining run) and changes only the fine-tuning seed, which drives the shuffling of the training
examples and the dropout masks (the fine-tune starts from the same pretrained weights). Seed 0 is the study's own
model and reuses the study's cached sweep; seeds >= 1 are built into the zoo cache as
``study-switch-E-TASK-seedS`` (not registry recipes) and swept exactly like ``uncurl study`` (same methods, factors
1..E, calibration, bootstrap and tolerance; test split).

    python examples/seed_variance.py --seeds 1,2 --experts 16,64 --task topic

Writes docs/study_seeds.md and docs/study_seeds.json. Everything is cached: a rerun only rewrites the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from uncurl_hf.errors import UncurlError
from uncurl_hf.experiments.study import StudyConfig, sweep_models
from uncurl_hf.zoo import registry, sources
from uncurl_hf.zoo.recipe import ZooRecipe

logger = logging.getLogger("seed_variance")


# ------------------------------------------------------------------------------------------------------ models


def variant_name(num_experts: int, task: str, seed: int) -> str:
    """Seed 0 is the study's own model; other seeds get a ``-seedS`` suffix."""
    base = registry.study_name(num_experts, task)
    return base if seed == 0 else f"{base}-seed{seed}"


def variant_recipe(num_experts: int, task: str, seed: int) -> ZooRecipe:
    """The study recipe with only the fine-tuning seed changed (same ``pretrain_key``, so the same pretraining)."""
    base = registry.study_recipe(num_experts, task)
    return dataclasses.replace(base, name=variant_name(num_experts, task, seed),
                               finetune=dataclasses.replace(base.finetune, seed=seed))


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors")) and (
        folder / "zoo_manifest.json").exists()


def model_folder(num_experts: int, task: str, seed: int) -> Path:
    """Where the variant lives (seed 0: wherever the registry finds the study model)."""
    if seed == 0:
        return registry.zoo_path(registry.study_name(num_experts, task), build_if_missing=False)
    return sources.cache_dir() / "zoo" / variant_name(num_experts, task, seed)


def ensure_built(num_experts: int, task: str, seed: int) -> Path:
    """Build the variant if missing, but only on top of the cached pretraining: a pretraining rerun would cost far
    more than the fine-tune this script is about, so its absence is an error rather than a silent hour of CPU."""
    folder = model_folder(num_experts, task, seed)
    if _complete(folder):
        return folder
    recipe = variant_recipe(num_experts, task, seed)
    work = sources.cache_dir() / "zoo-work" / recipe.work_name
    for stage in ("tokenizer/tokenizer.json", "pretrained/config.json", "intermediate/config.json"):
        if not (work / stage).exists():
            raise UncurlError(f"{work / stage} is missing: run `uncurl study` first (this script only fine-tunes).")
    logger.info("fine-tuning %s (seed %d) on the pretraining in %s", recipe.name, seed, work)
    return registry.build(recipe, folder, workdir=work, progress=False)


def manifest(num_experts: int, task: str, seed: int) -> dict[str, Any]:
    return json.loads((model_folder(num_experts, task, seed) / "zoo_manifest.json").read_text())


# ------------------------------------------------------------------------------------------------------ sweeps


def study_config(num_experts: int, task: str) -> StudyConfig:
    """The study's sweep settings for one model (the sweep cache key does not depend on the other E or tasks)."""
    return StudyConfig(experts=(num_experts,), scratch_experts=(), tasks=(task,))


def sweep_variant(num_experts: int, task: str, seed: int, progress: bool = False) -> Any:
    """The variant's sweep: seed 0 through the study's own cache; other seeds keyed the same way plus the seed."""
    from dataclasses import replace

    from uncurl_hf.experiments.sweep import SweepConfig, run_sweep
    from uncurl_hf.experiments.sweep_output import load_sweep

    config = study_config(num_experts, task)
    if seed == 0:
        return sweep_models(config, progress=progress)[(num_experts, task)]
    name = variant_name(num_experts, task, seed)
    wanted = {
        "methods": list(config.methods), "factors": list(config.factors(num_experts)), "tolerance": config.tolerance,
        "bootstrap": config.bootstrap, "calibration": config.calibration.num_examples, "seed": config.calibration.seed,
        "limit": config.max_eval_examples, "model_test": manifest(num_experts, task, seed)["test"],
        "finetune_seed": seed,
    }
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
    folder = sources.cache_dir() / "study" / "sweeps" / f"{name}-{digest}"
    key_file = folder / "study_key.json"
    if key_file.exists() and json.loads(key_file.read_text()) == wanted:
        return load_sweep(folder)
    logger.info("sweeping %s over factors %s", name, config.factors(num_experts))
    sweep = SweepConfig(
        model=str(model_folder(num_experts, task, seed)), task=task, methods=config.methods,
        factors=config.factors(num_experts), split="test", max_eval_examples=config.max_eval_examples,
        tolerance=config.tolerance, bootstrap=config.bootstrap, calibration=replace(config.calibration, task=task),
    )
    result = run_sweep(sweep, progress=progress, output_dir=folder, overwrite=True)
    key_file.write_text(json.dumps(wanted, sort_keys=True))
    return result


def run_lane(num_experts: int, task: str, seeds: list[int]) -> None:
    """One worker's share: build then sweep every seed of one E (fine-tunes of one E share its pretraining)."""
    for seed in seeds:
        t0 = time.perf_counter()
        ensure_built(num_experts, task, seed)
        t1 = time.perf_counter()
        sweep_variant(num_experts, task, seed)
        logger.info("E=%d seed %d done: build %.0f s, sweep %.0f s", num_experts, seed, t1 - t0,
                    time.perf_counter() - t1)


def run_lanes(experts: list[int], task: str, seeds: list[int], workers: int) -> None:
    """One subprocess per E (single torch thread each), at most ``workers`` at a time; logs in the study log dir."""
    log_dir = sources.cache_dir() / "study" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(experts)
    running: list[tuple[subprocess.Popen, int]] = []
    while pending or running:
        while pending and len(running) < workers:
            e = pending.pop(0)
            log = (log_dir / f"seeds-{e}-{task}.log").open("a")
            cmd = [sys.executable, __file__, "--lane", "--experts", str(e), "--task", task,
                   "--seeds", ",".join(map(str, seeds))]
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), e))
        proc, e = running.pop(0)
        if proc.wait() != 0:
            raise UncurlError(f"lane E={e} failed (exit {proc.returncode}); see {log_dir}/seeds-{e}-{task}.log")


# ------------------------------------------------------------------------------------------------------ report


def collect(experts: list[int], task: str, seeds: list[int]) -> dict[str, Any]:
    """Everything the report shows, as plain data (written as study_seeds.json)."""
    config = study_config(experts[0], task)
    runs = []
    for e in experts:
        for seed in seeds:
            m, result = manifest(e, task, seed), sweep_variant(e, task, seed)
            factors = list(StudyConfig().factors(e))
            methods = {}
            for method in config.methods:
                t = result.thresholds[method]
                methods[method] = {
                    "threshold": t.factor, "ci": [t.ci_low, t.ci_high], "censored": t.censored,
                    "retention": {f"{f:g}": round(result.point(method, f).relative, 2) for f in factors},
                }
            runs.append({
                "experts": e, "seed": seed, "model": variant_name(e, task, seed), "test": m["test"]["score"],
                "dev": m["finetune"]["dev"], "best_epoch": m["finetune"].get("epoch"),
                "sweep_unpruned": result.unpruned_score, "methods": methods,
            })
    return {
        "task": task, "experts": experts, "seeds": seeds, "methods": list(config.methods),
        "sweep": {"calibration": config.calibration.num_examples, "calibration_seed": config.calibration.seed,
                  "tolerance": config.tolerance, "bootstrap": config.bootstrap, "split": "test"},
        "runs": runs, "spread": spread(runs, experts, list(config.methods)),
    }


def spread(runs: list[dict[str, Any]], experts: list[int], methods: list[str]) -> list[dict[str, Any]]:
    """Per (E, method, factor): retention across seeds (mean, min, max, sample sd)."""
    rows = []
    for e in experts:
        mine = [r for r in runs if r["experts"] == e]
        for method in methods:
            for f in mine[0]["methods"][method]["retention"]:
                values = [r["methods"][method]["retention"][f] for r in mine]
                rows.append({
                    "experts": e, "method": method, "factor": float(f), "values": values,
                    "mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values),
                    "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None,
                })
    return rows


def _mean_pruned(run: dict[str, Any], method: str) -> float:
    """Mean retention over the pruned factors (x2..xE): one number per method for ranking robustness."""
    ret = run["methods"][method]["retention"]
    values = [v for f, v in ret.items() if float(f) > 1]
    return statistics.fmean(values)


def _best(run: dict[str, Any], methods: list[str], factor: str) -> list[str]:
    """Every method with the highest retention at ``factor`` (at xE UNCURL and M-SMoE often tie: both merge each
    layer's experts into one)."""
    top = max(run["methods"][m]["retention"][factor] for m in methods)
    return [m for m in methods if run["methods"][m]["retention"][factor] == top]


def holds(data: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers: which method ranks where, per E, in how many seeds."""
    lines = []
    methods, runs = data["methods"], data["runs"]
    for e in data["experts"]:
        mine = [r for r in runs if r["experts"] == e]
        n = len(mine)
        xe = f"{e:g}"
        at_max = {r["seed"]: _best(r, methods, xe) for r in mine}
        by_mean = {r["seed"]: sorted(methods, key=lambda m: -_mean_pruned(r, m)) for r in mine}
        uncurl_rank = {s: order.index("uncurl") + 1 for s, order in by_mean.items()}
        best_mean = {s: order[0] for s, order in by_mean.items()}
        lines.append(
            f"- E={e}: best method at x{e} per seed: "
            + ", ".join(f"seed {s} {'='.join(m)}" for s, m in at_max.items())
            + f"; best by mean retention over x2..x{e}: " + ", ".join(f"seed {s} {m}" for s, m in best_mean.items())
            + f"; UNCURL's rank by that mean (1 = most robust of {len(methods)}): "
            + ", ".join(f"seed {s} #{k}" for s, k in uncurl_rank.items())
            + f" ({sum(k == 1 for k in uncurl_rank.values())}/{n} seeds best, "
            f"{sum(k == len(methods) for k in uncurl_rank.values())}/{n} worst)."
        )
        thr = {m: [f"x{r['methods'][m]['threshold']:g}" for r in mine] for m in methods}
        best_thr = [max(r["methods"][m]["threshold"] for m in methods) for r in mine]
        lines.append(f"- E={e}: best threshold of any method per seed: " + ", ".join(f"x{t:g}" for t in best_thr)
                     + ".")
        lines.append(f"- E={e}: thresholds across seeds " + "; ".join(f"{m} {', '.join(v)}" for m, v in thr.items())
                     + "; unpruned test accuracy " + ", ".join(f"{100 * r['test']:.1f}" for r in mine) + ".")
    wide = sorted((s for s in data["spread"] if s["sd"] is not None and s["factor"] > 1), key=lambda s: -s["sd"])[:3]
    if wide:
        lines.append("- Widest seed spread of retention: " + "; ".join(
            f"E={s['experts']} {s['method']} x{s['factor']:g}: {s['min']:.1f}-{s['max']:.1f}% (sd {s['sd']:.1f})"
            for s in wide) + ".")
    return lines


def render(data: dict[str, Any], command: str, reading: str | None) -> str:
    """The Markdown report: models, per-run thresholds and retention, spread across seeds, what holds."""
    methods, task = data["methods"], data["task"]
    out = [
        "# Seed variance of the study's topic findings",
        "",
        f"Regenerate: `{command}` (models and sweeps are cached in `$UNCURL_HF_CACHE`).",
        "",
        ("docs/study.md fine-tuned one seed per model. Here each E keeps its one pretraining (the study's cached "
        "`zoo-work/study-switch-E`, span corruption + review polarity, seed 0) and only the fine-tuning seed changes; "
        "it drives the order of the training examples and the dropout masks. Seed 0 is the study's model "
        f"(`study-switch-E-{task}`), seeds >= 1 are `study-switch-E-{task}-seedS` in the zoo cache. Every model is "
        f"swept like `uncurl study`: methods {', '.join(methods)}; factors 1..E; "
        f"{data['sweep']['calibration']} calibration examples (seed {data['sweep']['calibration_seed']}); test split; "
        f"threshold = largest factor within {data['sweep']['tolerance']:g} point, 95% interval from "
        f"{data['sweep']['bootstrap']} bootstrap resamples. `test acc` is the zoo manifest's evaluation, `unpruned in "
         "sweep` the sweep's own (they can differ slightly: E=16 seed 0)."),
        "",
        "## What holds across seeds",
        "",
        READING_START,
        reading.strip() if reading else "(A person's reading of the numbers goes here; reruns keep it.)",
        READING_END,
        "",
        "Computed from the tables below (robustness = mean retention over the pruned factors x2..xE):",
        "",
        *holds(data),
        "",
        "## Models",
        "",
        "| E | seed | model | test acc | dev acc (best epoch) | unpruned in sweep |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in data["runs"]:
        out.append(f"| {r['experts']} | {r['seed']} | `{r['model']}` | {100 * r['test']:.1f} | "
                   f"{100 * r['dev']:.1f} ({r['best_epoch']}) | {100 * r['sweep_unpruned']:.1f} |")
    out += ["", "## Thresholds and retention per run", "",
            ("Retention = score at the factor as % of the unpruned score (sweep's own unpruned evaluation). "
             "Threshold `x8+` = no swept factor failed (censored)."), ""]
    for e in data["experts"]:
        mine = [r for r in data["runs"] if r["experts"] == e]
        factors = list(mine[0]["methods"][methods[0]]["retention"])
        out += [f"### E={e}", "", "| seed | method | threshold [95% CI] | " + " | ".join(f"x{f}" for f in factors) + " |",
                "|---:|---|---|" + "---:|" * len(factors)]
        for r in mine:
            for m in methods:
                d = r["methods"][m]
                thr = f"x{d['threshold']:g}{'+' if d['censored'] else ''}"
                ci = "-" if d["ci"][0] is None else f"x{d['ci'][0]:g}-x{d['ci'][1]:g}"
                out.append(f"| {r['seed']} | {m} | {thr} [{ci}] | "
                           + " | ".join(f"{d['retention'][f]:.1f}" for f in factors) + " |")
        out.append("")
    out += ["## Spread of retention across seeds", "",
            "Per E, method and factor: mean [min-max] retention (%) over the seeds, sample sd in parentheses.", ""]
    for e in data["experts"]:
        rows = [s for s in data["spread"] if s["experts"] == e]
        factors = sorted({s["factor"] for s in rows})
        out += [f"### E={e}", "", "| method | " + " | ".join(f"x{f:g}" for f in factors) + " |",
                "|---|" + "---:|" * len(factors)]
        for m in methods:
            cells = []
            for f in factors:
                s = next(x for x in rows if x["method"] == m and x["factor"] == f)
                sd = "" if s["sd"] is None else f" ({s['sd']:.1f})"
                cells.append(f"{s['mean']:.1f} [{s['min']:.1f}-{s['max']:.1f}]{sd}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


READING_START, READING_END = "<!-- reading: hand-written, kept by reruns -->", "<!-- /reading -->"


def kept_reading(markdown: str) -> str | None:
    """The hand-written paragraph of an earlier report (between the reading markers), so a rerun keeps it."""
    if READING_START not in markdown or READING_END not in markdown:
        return None
    text = markdown.split(READING_START, 1)[1].split(READING_END, 1)[0].strip()
    return None if not text or text.startswith("(A person's reading") else text


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2", help="fine-tune seeds besides the study's seed 0")
    parser.add_argument("--experts", default="16,64")
    parser.add_argument("--task", default="topic", choices=registry.STUDY_TASKS)
    parser.add_argument("--workers", type=int, default=2, help="parallel lanes (one per E)")
    parser.add_argument("--output", default="docs")
    parser.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)  # internal: one worker's share
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    experts, seeds = _ints(args.experts), sorted({0, *_ints(args.seeds)})
    if args.lane:
        import torch

        torch.set_num_threads(1)
        for e in experts:
            run_lane(e, args.task, seeds)
        return
    run_lanes(experts, args.task, seeds, max(1, args.workers))
    data = collect(experts, args.task, seeds)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_seeds.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    md = out / "study_seeds.md"
    reading = kept_reading(md.read_text(encoding="utf-8")) if md.exists() else None
    seeds_arg = ",".join(str(s) for s in seeds if s != 0)
    command = (f"python examples/seed_variance.py --seeds {seeds_arg} --experts {args.experts} --task {args.task}")
    md.write_text(render(data, command, reading))
    for line in holds(data):
        print(line)


if __name__ == "__main__":
    main()
