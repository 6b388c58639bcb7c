"""Which experts kernel a model runs, so that benchmarks and reports can say what they compare.

transformers lets MoE models pick the kernel of their fused experts modules (``set_experts_implementation``:
``"eager"`` per-expert loop, ``"batched_mm"``, ``"grouped_mm"``, ...), but what was *requested* is not always what
runs: a model class that may not choose keeps its kernel without a word (the pruned decoder classes used to run the
eager loop this way while their stock family ran ``grouped_mm``). :func:`experts_implementation` therefore reads the
name each experts module dispatches on, not the request.
"""

from __future__ import annotations

from torch import nn


def _dispatches_on_config(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module whose forward dispatches on ``config._experts_implementation``.

    transformers' experts decorator wraps ``forward`` (``functools.wraps``: ``__wrapped__``) and gives each instance
    its weight-layout flags (``is_concatenated``, ``is_transposed``, ...) and the ``config`` it dispatches on.
    """
    config = getattr(module, "config", None)
    return (
        hasattr(type(module).forward, "__wrapped__")
        and isinstance(getattr(module, "is_concatenated", None), bool)
        and config is not None
        and hasattr(config, "_experts_implementation")
    )


def experts_implementation(model: nn.Module) -> str:
    """The experts kernel ``model`` runs: ``"eager"``, ``"batched_mm"``, ``"grouped_mm"``, ...

    Models whose experts do not dispatch (Switch Transformers keeps one module per expert and always loops over
    them) run the eager loop, and dense models have no experts: both give ``"eager"``. When experts modules disagree
    (sub-models set differently), the names are joined with ``"+"`` in sorted order. ``"grouped_mm"`` names the
    dispatch: where torch has no usable grouped GEMM (CPU with torch <= 2.8, for example) transformers runs it as a
    loop of matmuls behind the same name.
    """
    names = {
        module.config._experts_implementation or "eager"  # None: transformers falls back to the module's own forward
        for module in model.modules()
        if _dispatches_on_config(module)
    }
    return "+".join(sorted(names)) if names else "eager"


__all__ = ["experts_implementation"]
