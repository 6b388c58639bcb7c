"""The Space's models: checkpoints loaded by reference (resolved by :func:`uncurl_hf.io.resolve.resolve_model`) with
the facts the page shows about them, kept in a small in-process cache so a click does not reload weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uncurl_hf.families import get_family
from uncurl_hf.io.checkpoint import count_parameters, load_model, load_tokenizer, weights_size
from uncurl_hf.io.resolve import resolve_model
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

MODEL_CACHE_SIZE = 6


@dataclass
class LoadedModel:
    """A checkpoint in memory with the facts the page shows about it."""

    path: Path
    model: Any
    tokenizer: Any
    params: int
    disk_mb: float
    experts: dict[str, int]
    plan: PruningPlan | None

    def layer_groups(self, layer: str) -> tuple[list[list[int]], int] | None:
        """``(groups of original experts per output expert, original count)`` from the plan, when there is one."""
        if self.plan is None:
            return None
        try:
            layer_plan = self.plan.layer(layer)
        except KeyError:  # a plan for other layer names (e.g. of a different model) gives no mapping
            return None
        return layer_plan.groups, layer_plan.num_experts


_models: OrderedDict[str, LoadedModel] = OrderedDict()
_models_lock = threading.Lock()


def get_model(ref: str | Path) -> LoadedModel:
    """Load (or reuse) the checkpoint ``ref``; keeps the last :data:`MODEL_CACHE_SIZE` models in memory."""
    path = resolve_model(ref)
    key = str(path)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    family = get_family(model)
    plan_file = path / PLAN_FILENAME
    loaded = LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        params=count_parameters(model),
        disk_mb=round(weights_size(path) / 1e6, 3),
        experts=family.layer_sizes(model),
        plan=PruningPlan.load(plan_file) if plan_file.is_file() else None,
    )
    with _models_lock:
        _models[key] = loaded
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    """Forget loaded models (e.g. after a checkpoint folder was rewritten)."""
    with _models_lock:
        _models.clear()
