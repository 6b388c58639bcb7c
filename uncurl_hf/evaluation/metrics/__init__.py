"""The project's own `evaluate` metric modules, loaded by path (``evaluate.load("accuracy")`` needs the Hub).

Each file here is an ``evaluate.Metric`` module; :func:`load_metric` loads it with ``evaluate.load(path)``
so results carry the usual ``evaluate`` metadata and the code never touches the network.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


def available_metrics() -> list[str]:
    return sorted(p.stem for p in METRICS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load the local metric module ``name`` (e.g. ``accuracy``, ``macro_f1``) by its file path."""
    path = METRICS_DIR / f"{name}.py"
    if not path.exists():
        from uncurl_hf.errors import UncurlError

        raise UncurlError(f"Unknown metric {name!r}; available: {', '.join(available_metrics())}.")
    return evaluate.load(str(path))
