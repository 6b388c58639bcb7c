"""What decides a zoo build's bytes besides its recipe and seeds, pinned for the build; and how long a build takes.

Seeds fix the data order and the initial weights, but not the arithmetic: CPU matmuls and reductions split their
work by the number of threads, and a different split adds floating-point numbers in a different order. Over a
thousand optimizer steps those last-bit differences grow into a different model (``study-switch-64-topic`` built
with two torch threads scored 84.4% where the documented one-thread build scores 80.7%). So every training stage of
a :class:`~uncurl_hf.zoo.recipe.ZooRecipe` runs under :func:`pinned`: the recipe's thread count for torch and for
numpy's BLAS (the PPMI-SVD embedding init), and ``torch.use_deterministic_algorithms`` (which refuses, rather than
silently runs, an op without a deterministic implementation). The caller's settings, and its global random states,
are restored afterwards, so building a model inside a larger program changes nothing around it.

Two builds that share a work folder (``study-switch-32-topic`` and ``study-switch-32-hedge`` share one pretraining
run) take turns through :func:`exclusive`: without it the second resumes the first's pretraining checkpoint while the
first is still training, and both write the same folders.

Not pinned, because a program cannot choose them: the torch version and the CPU's instruction set (an AVX-512
machine may take other kernels than an AVX2 one). :func:`runtime_record` writes both into the manifest, so two
builds that differ can be told apart.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Seconds per optimizer step of one pinned single-thread build on the 2-core reference machine (E=8, batches of 32):
# a pretraining step (112-token chunks) and a fine-tuning step including its share of the per-epoch dev scoring,
# from the study zoo's builds (`uncurl study --small`: three models in ~40 minutes with two one-thread workers) and
# tiny-switch-8's manifest. A build also scores the test split and writes its routing report (EVAL_S).
PRETRAIN_STEP_S = 0.5
FINETUNE_STEP_S = 0.35
EVAL_S = 60.0
TASK_TRAIN_SIZES = {"sentiment": 2800, "topic": 1425, "hedge": 2000}
TASK_LENGTH_COST = {"sentiment": 1.0, "hedge": 1.3, "topic": 3.0}  # topic inputs are ~128 tokens, sentences ~25


@contextlib.contextmanager
def pinned(num_threads: int, deterministic: bool = True) -> Iterator[None]:
    """Run the block with ``num_threads`` torch (and BLAS) threads and, if asked, deterministic algorithms; restore
    the caller's thread count, determinism flags and random states (python, numpy, torch) afterwards."""
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    limits = _blas_limits(num_threads)
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        limits.close()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block; when another process
    (or another open of the same file) holds it, say so and wait. The lock is released when the block ends, or when
    the process dies, so a killed build never leaves a stale lock behind."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another build is using %s (%s); waiting for it to finish", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _blas_limits(num_threads: int) -> contextlib.ExitStack:
    """numpy/scipy's BLAS limited to ``num_threads`` (threadpoolctl, a scikit-learn dependency) until closed."""
    stack = contextlib.ExitStack()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn, a dependency, requires it
        logger.warning("threadpoolctl is not installed: numpy's BLAS threads are not pinned for this build")
        return stack
    stack.enter_context(threadpool_limits(limits=num_threads, user_api="blas"))
    return stack


def pinned_stage(stage: F) -> F:
    """Decorate a training stage ``stage(recipe, ...)`` to run under :func:`pinned` with the recipe's settings."""

    @functools.wraps(stage)
    def run(recipe: Any, *args: Any, **kwargs: Any) -> Any:
        with pinned(recipe.num_threads, recipe.deterministic_algorithms):
            logger.info("%s %s: %d torch thread(s), deterministic algorithms %s", stage.__name__, recipe.name,
                        recipe.num_threads, "on" if recipe.deterministic_algorithms else "off")
            return stage(recipe, *args, **kwargs)

    return run  # type: ignore[return-value]


def runtime_record(recipe: Any) -> dict[str, Any]:
    """What the build ran with, for the manifest: the pinned settings and what could not be pinned."""
    return {
        "torch_num_threads": recipe.num_threads,
        "deterministic_algorithms": recipe.deterministic_algorithms,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def estimated_build_minutes(recipe: Any, workdir: Path | None = None) -> int | None:
    """About how many minutes building ``recipe`` takes on the reference machine (stages already in ``workdir``
    are free); ``None`` for recipes this estimate does not know (the decoder zoo)."""
    if not all(hasattr(recipe, name) for name in ("pretrain", "finetune", "model", "num_threads")):
        return None
    experts = max(1, recipe.model.num_experts)
    scale = 1.0 + 0.5 * max(0.0, math.log2(experts / 8)) / 3  # E=64 steps take ~1.5x the E=8 ones
    done = (lambda stage: workdir is not None and (workdir / stage / "config.json").exists())
    steps = 0 if done("pretrained") else recipe.pretrain.steps
    if recipe.intermediate is not None and not done("intermediate"):
        steps += recipe.intermediate.steps
    spec = recipe.finetune
    train = TASK_TRAIN_SIZES.get(spec.task, 2000)
    train = min(train, spec.train_limit) if spec.train_limit else train
    finetune_steps = math.ceil(train / spec.batch_size) * spec.epochs
    seconds = (steps * PRETRAIN_STEP_S + finetune_steps * FINETUNE_STEP_S * TASK_LENGTH_COST.get(spec.task, 1.0)) * scale
    return max(1, round((seconds + EVAL_S) / 60))


__all__ = ["estimated_build_minutes", "pinned", "pinned_stage", "runtime_record"]
