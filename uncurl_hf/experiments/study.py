"""The paper's study at tiny scale (``uncurl study``): threshold pruning factors per expert count and task, and
pruned-from-E versus trained-from-scratch with fewer experts.

UNCURL (Sarkar et al., arXiv 2409.01483) reports that task-specific expert pruning keeps quality up to a threshold
factor that depends on how many experts the model was pretrained with, and asks whether a pruned large SMoE beats a
smaller SMoE trained from scratch. This module reproduces both questions on the study zoo
(:data:`uncurl_hf.zoo.registry.STUDY_EXPERTS` x :data:`~uncurl_hf.zoo.registry.STUDY_TASKS`):

1. **build** the zoo models that are missing (``uncurl zoo build`` in worker subprocesses, one expert count per
   worker so fine-tunes reuse their pretraining; resumable, cached in ``$UNCURL_HF_CACHE/zoo``);
2. **sweep** every (E, task) model over methods x factors 1..E (:func:`uncurl_hf.experiments.sweep.run_sweep`: one calibration,
   in-memory pruning, per-example scores on the test split, thresholds with bootstrap intervals), cached per model;
3. **report**: Table 1 (threshold per E per task and method), Table 2 (pruned-from-E at E/k experts vs the zoo's
   from-scratch model with E/k experts, same task, same fine-tune budget), the sweep figure, written as Markdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from uncurl_hf.recipe import CalibrationSpec
from uncurl_hf.errors import UncurlError
from uncurl_hf.zoo import registry, sources

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("uncurl", "frequency", "reap", "msmoe")


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs. ``experts`` are swept; ``scratch_experts`` are only trained (Table 2's smaller models);
    every model in ``experts`` also serves as a from-scratch counterpart of the larger ones."""

    experts: tuple[int, ...] = (8, 16, 32, 64)
    scratch_experts: tuple[int, ...] = (1, 2, 4)
    tasks: tuple[str, ...] = registry.STUDY_TASKS
    methods: tuple[str, ...] = DEFAULT_METHODS
    tolerance: float = 1.0
    bootstrap: int = 1000
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)  # per task: the task's train split
    max_eval_examples: int | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = [e for e in (*self.experts, *self.scratch_experts) if e not in registry.STUDY_EXPERTS]
        if unknown:
            raise UncurlError(f"The study zoo has E in {registry.STUDY_EXPERTS}; {unknown} are not recipes.")
        bad_tasks = [t for t in self.tasks if t not in registry.STUDY_TASKS]
        if bad_tasks:
            raise UncurlError(f"Study tasks are {registry.STUDY_TASKS}; {bad_tasks} have no zoo recipes.")
        if any(e < 2 for e in self.experts):
            raise UncurlError("Swept models need at least 2 experts (E=1 is the dense counterpart).")

    @property
    def all_experts(self) -> tuple[int, ...]:
        return tuple(sorted({*self.experts, *self.scratch_experts}))

    def model_names(self) -> list[str]:
        return [registry.study_name(e, t) for e in self.all_experts for t in self.tasks]

    def factors(self, num_experts: int) -> tuple[float, ...]:
        """1, 2, 4, ... up to E: the last factor keeps one expert per layer."""
        out, f = [], 1
        while f <= num_experts:
            out.append(float(f))
            f *= 2
        return tuple(out)


SMALL = StudyConfig(experts=(8, 16), scratch_experts=(4,), tasks=("sentiment",), methods=("uncurl", "frequency"),
                    bootstrap=200)


# ------------------------------------------------------------------------------------------------------ building


def _built(name: str) -> Path | None:
    try:
        return registry.zoo_path(name, build_if_missing=False)
    except UncurlError:
        return None


def build_models(config: StudyConfig, progress: bool = True) -> dict[str, Path]:
    """Build every missing study model; returns ``{name: folder}``.

    Workers are subprocesses (``uncurl zoo build``) with one torch thread each: two single-thread trainings of these
    tiny models finish sooner on two cores than one two-thread training after another. One worker owns all tasks of
    one expert count, so its fine-tunes reuse the pretraining it just ran; an interrupted study resumes from the
    pretraining checkpoints and skips finished models.
    """
    missing = [n for n in config.model_names() if _built(n) is None]
    if missing:
        lanes = _lanes(config, missing)
        logger.info("building %d study models in %d worker(s): %s", len(missing), len(lanes), missing)
        log_dir = sources.cache_dir() / "study" / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(missing), desc="study zoo", disable=not progress)
        running = [_start_lane(lane, log_dir) for lane in lanes]
        for proc, lane in running:
            code = proc.wait()
            bar.update(len(lane))
            if code != 0:
                raise UncurlError(
                    f"Building {lane} failed (exit {code}); see {log_dir}/<name>.log, then rerun `uncurl study` "
                    "(finished models and pretraining checkpoints are kept)."
                )
        bar.close()
    return {name: registry.zoo_path(name, build_if_missing=False) for name in config.model_names()}


def _lanes(config: StudyConfig, missing: Sequence[str]) -> list[list[str]]:
    """Split the missing models into ``config.workers`` lanes; each expert count stays in one lane, largest first
    (pretraining time grows with E), each lane given to the least-loaded worker."""
    by_experts: dict[int, list[str]] = {}
    for e in config.all_experts:
        names = [registry.study_name(e, t) for t in config.tasks if registry.study_name(e, t) in missing]
        if names:
            by_experts[e] = names
    lanes: list[list[str]] = [[] for _ in range(max(1, min(config.workers, len(by_experts))))]
    load = [0.0] * len(lanes)
    for e in sorted(by_experts, reverse=True):
        i = load.index(min(load))
        lanes[i].extend(by_experts[e])
        load[i] += (1.0 + e / 64) * 2 + len(by_experts[e])  # rough: pretraining ~ 2-4 fine-tunes
    return [lane for lane in lanes if lane]


def _start_lane(lane: list[str], log_dir: Path) -> tuple[subprocess.Popen, list[str]]:
    """One worker: build the lane's models one after another in a subprocess with one torch thread."""
    script = "; ".join(
        f"{shlex.quote(sys.executable)} -m uncurl_hf.cli zoo --no-progress build {name} "
        f"> {shlex.quote(str(log_dir / name))}.log 2>&1"
        for name in lane
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "-c", f"set -e; {script}"], env=env), lane


# ------------------------------------------------------------------------------------------------------ sweeping


def sweep_models(config: StudyConfig, progress: bool = True) -> dict[tuple[int, str], Any]:
    """Sweep (or load the cached sweep of) every swept model; ``{(E, task): SweepResult}``."""
    from uncurl_hf.experiments.sweep import SweepConfig, run_sweep
    from uncurl_hf.experiments.sweep_output import load_sweep

    results = {}
    root = sources.cache_dir() / "study" / "sweeps"
    for e in config.experts:
        for task in config.tasks:
            name = registry.study_name(e, task)
            wanted = _sweep_key(config, e, task)
            digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
            folder = root / f"{name}-{digest}"  # --small and the full study keep separate caches
            cached = folder / "study_key.json"
            if cached.exists() and json.loads(cached.read_text()) == wanted:
                results[(e, task)] = load_sweep(folder)
                continue
            logger.info("sweeping %s over factors %s", name, config.factors(e))
            sweep = SweepConfig(
                model=str(registry.zoo_path(name, build_if_missing=False)), task=task, methods=config.methods,
                factors=config.factors(e), split="test", max_eval_examples=config.max_eval_examples,
                tolerance=config.tolerance, bootstrap=config.bootstrap,
                calibration=replace(config.calibration, task=task),
            )
            result = run_sweep(sweep, progress=progress, output_dir=folder, overwrite=True)
            (folder / "study_key.json").write_text(json.dumps(wanted, sort_keys=True))
            results[(e, task)] = result
    return results


def _sweep_key(config: StudyConfig, num_experts: int, task: str) -> dict[str, Any]:
    """What a cached sweep must match to be reused (the model's own manifest pins its weights' recipe)."""
    manifest = registry.zoo_path(registry.study_name(num_experts, task), build_if_missing=False) / "zoo_manifest.json"
    return {
        "methods": list(config.methods), "factors": list(config.factors(num_experts)), "tolerance": config.tolerance,
        "bootstrap": config.bootstrap, "calibration": config.calibration.num_examples, "seed": config.calibration.seed,
        "limit": config.max_eval_examples, "model_test": json.loads(manifest.read_text())["test"],
    }


# ------------------------------------------------------------------------------------------------------ reporting


@dataclass
class StudyReport:
    """Both tables as rows (also written as ``study.json``), the figure path and the regeneration command."""

    config: StudyConfig
    table1: list[dict[str, Any]] = field(default_factory=list)
    table2: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    figure: str | None = None
    command: str = ""
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config": asdict(self.config)}


def model_rows(config: StudyConfig) -> list[dict[str, Any]]:
    """One row per built study model: size, training facts and measured quality (from its zoo manifest)."""
    rows = []
    for e in config.all_experts:
        for task in config.tasks:
            folder = registry.zoo_path(registry.study_name(e, task), build_if_missing=False)
            m = json.loads((folder / "zoo_manifest.json").read_text())
            layers = m.get("routing", {}).get("layers", {})
            rows.append({
                "experts": e, "task": task, "params": m["params"], "test": m["test"]["score"],
                "dev": m["finetune"]["dev"], "best_epoch": m["finetune"].get("epoch"),
                "tfidf": m.get("tfidf_logreg_test"),
                "min_share": min((v["min_share"] for v in layers.values()), default=None),
                "wall_s": round(sum(m["wall_time_s"].values()), 1),
            })
    return rows


def threshold_rows(config: StudyConfig, sweeps: dict[tuple[int, str], Any]) -> list[dict[str, Any]]:
    """Table 1: per (task, E, method) the threshold factor, its bootstrap interval and the score at x E."""
    rows = []
    for task in config.tasks:
        for e in config.experts:
            result = sweeps[(e, task)]
            for method in config.methods:
                t = result.thresholds[method]
                last = result.point(method, float(e))
                rows.append({
                    "task": task, "experts": e, "method": method, "unpruned": result.unpruned_score,
                    "threshold": t.factor, "ci": [t.ci_low, t.ci_high], "experts_left": e / t.factor,
                    "relative_at_max": last.relative,
                })
    return rows


def scratch_rows(
    config: StudyConfig, sweeps: dict[tuple[int, str], Any], models: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Table 2: pruned-from-E at E/k experts (each method) vs the from-scratch model with E/k experts
    (``models`` = :func:`model_rows`)."""
    scores = {(r["experts"], r["task"]): r["test"] for r in models}
    rows = []
    for task in config.tasks:
        for e in config.experts:
            result = sweeps[(e, task)]
            for small in sorted(config.all_experts):
                if small >= e or (small, task) not in scores:
                    continue
                factor = float(e // small)
                pruned = {m: result.point(m, factor).score for m in config.methods}
                best = max(pruned, key=pruned.get)
                rows.append({
                    "task": task, "from_experts": e, "to_experts": small, "factor": factor,
                    "unpruned": result.unpruned_score, "pruned": pruned, "best_method": best,
                    "scratch": scores[(small, task)], "pruned_minus_scratch": pruned[best] - scores[(small, task)],
                })
    return rows


def draw_figure(config: StudyConfig, sweeps: dict[tuple[int, str], Any], path: Path) -> Path:
    """The sweep figure: one panel per (task row, E column)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from uncurl_hf.experiments.sweep_output import draw_panel

    rows, cols = len(config.tasks), len(config.experts)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, task in enumerate(config.tasks):
        for j, e in enumerate(config.experts):
            draw_panel(axes[i][j], sweeps[(e, task)])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})
    return path


def run_study(
    config: StudyConfig = StudyConfig(),
    output: str | Path = "docs",
    name: str = "study",
    build: bool = True,
    progress: bool = True,
    command: str = "uncurl study",
) -> StudyReport:
    """Build what is missing, sweep, and write ``<output>/<name>.md`` (+ ``.json`` and ``<name>_sweep.png``)."""
    start = time.perf_counter()
    if build:
        build_models(config, progress=progress)
    else:
        absent = [n for n in config.model_names() if _built(n) is None]
        if absent:
            raise UncurlError(f"Study models not built yet: {absent}; run without --no-build to train them.")
    sweeps = sweep_models(config, progress=progress)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    models = model_rows(config)
    report = StudyReport(
        config=config, table1=threshold_rows(config, sweeps), table2=scratch_rows(config, sweeps, models),
        models=models, command=command,
    )
    report.figure = draw_figure(config, sweeps, out / f"{name}_sweep.png").name
    report.wall_time_s = round(time.perf_counter() - start, 1)
    (out / f"{name}.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    findings = out / f"{name}_findings.md"
    text = findings.read_text(encoding="utf-8") if findings.exists() else None
    (out / f"{name}.md").write_text(render_markdown(report, text))
    return report


# ------------------------------------------------------------------------------------------------------ markdown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(report: StudyReport, findings: str | None = None) -> str:
    """The study as Markdown: setup, findings (a person's reading of the tables, kept in ``<name>_findings.md`` so a
    rerun keeps it), models, Table 1, Table 2, figure."""
    from uncurl_hf.evaluation.tasks import get_task

    c = report.config
    lines = [
        "# The UNCURL study at tiny scale",
        "",
        f"Regenerate: `{report.command}` (models and sweeps are cached; this run took {report.wall_time_s:.0f} s "
        "after building).",
        "",
        "## Setup",
        "",
        f"- Models: the study zoo, Switch Transformers with d_model 128, d_ff 256 per expert, 4+2 layers (sparse: "
        f"encoder blocks 1 and 3, decoder block 1), E in {list(c.all_experts)}; one pretraining per E on the same "
        "multi-domain corpus with the same token budget (800 span-corruption steps of 32 x 112 tokens + 200 "
        "review-polarity steps), then 5 fine-tuning epochs per task keeping the best dev epoch. Seed 0 everywhere; "
        "one training seed per model here; docs/study_seeds.md (examples/seed_variance.py) repeats topic at E=16 and "
        "64 with two more fine-tuning seeds.",
        "- Tasks (test split sizes): " + ", ".join(f"{t} ({len(get_task(t).load_split('test'))})" for t in c.tasks)
        + ".",
        f"- Sweep: methods {', '.join(c.methods)}; factors 1, 2, ... E (x E keeps one expert per layer); "
        f"{c.calibration.num_examples} calibration examples from the train split; scored on the full test split.",
        f"- Threshold: the largest swept factor whose score, and that of every smaller factor, stays within "
        f"{c.tolerance:g} point of the unpruned model; 95% interval from {c.bootstrap} bootstrap resamples of the "
        "test examples (the same resample applied to every factor).",
        "",
        *(["## Findings", "", findings.strip(), ""] if findings else []),
        "## Models",
        "",
        "| E | task | params | test | dev | TF-IDF+LR test | min expert share | train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.models:
        lines.append(
            f"| {r['experts']} | {r['task']} | {r['params']:,} | {_pct(r['test'])} | {_pct(r['dev'])} | "
            f"{_pct(r['tfidf'])} | {_pct(r['min_share'])}% | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "## Table 1: threshold factor per E, task and method",
        "",
        "Threshold (95% CI) = largest factor within tolerance; `at xE` = score at one expert per layer, % of unpruned.",
        "",
        "| task | E | unpruned | " + " | ".join(c.methods) + " | " + " | ".join(f"{m} at xE" for m in c.methods) + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(c.methods)),
    ]
    for task in c.tasks:
        for e in c.experts:
            rows = {r["method"]: r for r in report.table1 if r["task"] == task and r["experts"] == e}
            thr = [f"x{rows[m]['threshold']:g} [{_fmt_ci(rows[m]['ci'])}]" for m in c.methods]
            at_max = [f"{rows[m]['relative_at_max']:.1f}%" for m in c.methods]
            unpruned = next(iter(rows.values()))["unpruned"]
            lines.append(f"| {task} | {e} | {_pct(unpruned)} | " + " | ".join(thr) + " | " + " | ".join(at_max) + " |")
    lines += [
        "",
        "## Table 2: pruned from E down to E/k experts vs trained from scratch with E/k experts",
        "",
        "Same task, same fine-tuning budget; scores are test accuracy (%). `best - scratch` uses the best method.",
        "",
        "| task | E -> E/k | unpruned E | " + " | ".join(f"pruned {m}" for m in c.methods)
        + " | from scratch E/k | best - scratch |",
        "|---|---|---:|" + "---:|" * len(c.methods) + "---:|---:|",
    ]
    for r in report.table2:
        pruned = " | ".join(_pct(r["pruned"][m]) for m in c.methods)
        lines.append(
            f"| {r['task']} | {r['from_experts']} -> {r['to_experts']} | {_pct(r['unpruned'])} | {pruned} | "
            f"{_pct(r['scratch'])} | {100 * r['pruned_minus_scratch']:+.1f} |"
        )
    lines += ["", "## Figure", "", f"![sweep]({report.figure})", ""]
    return "\n".join(lines)


def _fmt_ci(ci: Sequence[float | None]) -> str:
    low, high = ci
    return "-" if low is None else f"x{low:g}-x{high:g}"
