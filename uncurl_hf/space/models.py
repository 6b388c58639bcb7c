"""The Space's models: checkpoints loaded by reference (resolved by :func:`uncurl_hf.io.resolve.resolve_model`) with
the facts the page shows about them, kept in a small in-process cache so a click does not reload weights; and the
experts kernel both models of a comparison run (:func:`align_experts_kernel`), so their latencies compare the
pruning and not two kernels.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uncurl_hf.evaluation.causal import is_causal
from uncurl_hf.families import get_family
from uncurl_hf.io.checkpoint import count_parameters, load_model, load_tokenizer, weights_size
from uncurl_hf.io.resolve import resolve_model
from uncurl_hf.modeling.kernels import experts_implementation
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

logger = logging.getLogger(__name__)

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
    kind: str = "seq2seq"  # or "causal": a decoder-only LM, scored and prompted through the task's prompt template
    top_k: dict[str, int] | None = None  # experts each token is routed to, per sparse layer

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

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
    layers = family.sparse_layers(model)
    plan_file = path / PLAN_FILENAME
    loaded = LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        params=count_parameters(model),
        disk_mb=round(weights_size(path) / 1e6, 3),
        experts=family.layer_sizes(model),
        plan=PruningPlan.load(plan_file) if plan_file.is_file() else None,
        kind="causal" if is_causal(model) else "seq2seq",
        top_k={layer.name: int(layer.top_k) for layer in layers},
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


def _set_kernel(loaded: LoadedModel, kernel: str) -> bool:
    """Ask ``loaded`` to run ``kernel``; whether it now does (a model class may refuse or ignore the request)."""
    setter = getattr(loaded.model, "set_experts_implementation", None)
    if setter is None:
        return False
    try:
        setter(kernel)
    except (ValueError, ImportError, RuntimeError, TypeError) as exc:  # refused: unsupported here
        logger.info("%s cannot run the %s experts kernel: %s", loaded.path.name, kernel, exc)
        return False
    return experts_implementation(loaded.model) == kernel


def align_experts_kernel(original: LoadedModel, pruned: LoadedModel) -> dict[str, str | bool]:
    """Make both models run one experts kernel, the original's when the pruned model can run it, and say which.

    A latency ratio means something only when both sides run the same kernel: a pruned decoder class that fell
    back to the eager loop while its stock original ran ``grouped_mm`` would look slower for reasons pruning has
    nothing to do with. Returns ``{"original", "pruned", "same"}`` (the kernel names each model runs afterwards,
    read from the experts modules, :func:`~uncurl_hf.modeling.kernels.experts_implementation`).
    """
    wanted = experts_implementation(original.model)
    if experts_implementation(pruned.model) != wanted and not _set_kernel(pruned, wanted):
        fallback = experts_implementation(pruned.model)
        _set_kernel(original, fallback)
    kernels = {"original": experts_implementation(original.model), "pruned": experts_implementation(pruned.model)}
    if kernels["original"] != kernels["pruned"]:
        logger.warning("original runs the %s experts kernel and pruned the %s one; latencies compare kernels too",
                       kernels["original"], kernels["pruned"])
    return {**kernels, "same": kernels["original"] == kernels["pruned"]}
