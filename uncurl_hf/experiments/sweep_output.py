"""A sweep's folder: ``results.json`` (everything measured, per-example scores included), ``results.csv`` (one row
per point) and ``plot.png``, written atomically; reading ``results.json`` back; the plot (also drawn per panel into
the study's grid). The sweep itself is :mod:`uncurl_hf.experiments.sweep`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uncurl_hf.errors import SweepError
from uncurl_hf.experiments.sweep import SweepResult
from uncurl_hf.io.atomic import check_output_dir

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PLOT_PNG = "plot.png"


def results_json(result: SweepResult) -> str:
    """``results.json``: indented, except each point's per-example list, which stays on one line."""
    data = result.to_dict()
    inline = {}
    for i, point in enumerate(data["points"]):
        key = f"@per_example_{i}@"
        inline[json.dumps(key)] = json.dumps(point["per_example"], separators=(",", ":"))
        point["per_example"] = key
    text = json.dumps(data, indent=1)
    for key, value in inline.items():
        text = text.replace(key, value)
    return text + "\n"


def results_csv(result: SweepResult) -> str:
    """One row per (method, factor); counts as ``layer=k;...``."""
    out = io.StringIO()
    columns = ["model", "task", "split", "metric", "method", "factor", "effective_factor", "experts_kept",
               "experts_total", "counts", "clamped", "score", "relative", "score_ci_low", "score_ci_high",
               "agreement", "kl", "num_examples"]
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for p in result.points:
        data = p.to_dict(with_examples=False)
        ci = data.pop("score_ci") or [None, None]
        writer.writerow({
            **data, "model": result.model_name, "task": result.config.task, "split": result.config.split,
            "metric": result.metric, "counts": ";".join(f"{k}={v}" for k, v in p.counts.items()),
            "clamped": ";".join(p.clamped), "score_ci_low": ci[0], "score_ci_high": ci[1],
            "num_examples": result.num_examples,
        })
    return out.getvalue()


def plot_sweeps(results: Sequence[SweepResult | str | Path], path: str | Path) -> Path:
    """One panel per sweep (model / E / task): % of the unpruned score vs factor (log2 axis), one line per method,
    the tolerance band shaded, each method's threshold marked. Accepts results or ``results.json`` paths/folders.

    Uses matplotlib's object API (``Figure`` + Agg canvas), never pyplot's global state; PNG metadata carries no
    software version, so the same results give the same bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loaded = [r if isinstance(r, SweepResult) else load_sweep(r) for r in results]
    if not loaded:
        raise SweepError("Nothing to plot: give at least one sweep result.")
    fig = Figure(figsize=(5.0 * len(loaded), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(loaded), squeeze=False)[0]
    for ax, result in zip(axes, loaded):
        draw_panel(ax, result)
    path = Path(path)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def draw_panel(ax: Any, result: SweepResult) -> None:
    """Draw one sweep on a matplotlib Axes (used by plot_sweeps and by the study's task x E grid)."""
    from matplotlib.ticker import NullLocator

    factors = list(result.config.factors)
    floor = 100.0 * (result.unpruned_score - result.config.tolerance / 100.0) / result.unpruned_score \
        if result.unpruned_score else 0.0
    ax.axhspan(floor, 100.0, color="tab:green", alpha=0.12, label=f"within {result.config.tolerance:g} pt")
    ax.axhline(100.0, color="grey", linewidth=0.8)
    for i, method in enumerate(result.config.methods):
        color = f"C{i % 10}"
        ys = [result.point(method, f).relative for f in factors]
        ax.plot(factors, ys, marker="o", color=color, label=method)
        t = result.thresholds.get(method)
        if t is not None:
            ax.plot([t.factor], [result.point(method, t.factor).relative], marker="*", markersize=13, color=color,
                    linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_xticks(factors, labels=[f"x{f:g}" for f in factors])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("pruning factor (log2; star = threshold)")
    ax.set_ylabel(f"{result.metric}, % of unpruned")
    ax.set_title(f"{result.model_name} (E={result.num_experts}) - {result.config.task}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def load_sweep(path: str | Path) -> SweepResult:
    """Read a sweep's ``results.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(f"Cannot read sweep results {path} ({exc}); give a folder written by `uncurl sweep`.") from exc
    result = SweepResult.from_dict(data)
    result.output_dir = path.parent
    return result


def check_sweep_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, and never replace a folder that is not a sweep's."""
    check_output_dir(output, None, overwrite, markers=(RESULTS_JSON,), kind="sweep folder")


def write_sweep(result: SweepResult, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``results.csv`` and ``plot.png`` into a temporary sibling, then rename it into place
    (an interrupted write leaves no partial folder; the next write cleans it up)."""
    from uncurl_hf.io.atomic import TEMP_PREFIX, move_into_place, sweep_stale_temp_dirs
    from uncurl_hf.io.manifest import fsync_dir

    output = Path(output_dir).expanduser().resolve()
    sweep_stale_temp_dirs(output)
    check_sweep_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o777 & ~umask)
        (temp / RESULTS_JSON).write_text(results_json(result), encoding="utf-8")
        (temp / RESULTS_CSV).write_text(results_csv(result), encoding="utf-8")
        plot_sweeps([result], temp / PLOT_PNG)
        move_into_place(temp, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    logger.info("wrote %s", output)
    return output

