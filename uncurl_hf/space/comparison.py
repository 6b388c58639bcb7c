"""The two functions behind the page: :func:`compare` (one input) and :func:`compare_batch` (N test examples).

Both return JSON-able dicts; the page (:mod:`uncurl_hf.space.app`) only formats them (:mod:`uncurl_hf.space.render`),
and the tests call them directly and through ``gradio_client``, so "what the page shows" and "what the Python API
returns" cannot drift apart. Runs without Gradio or matplotlib.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from uncurl_hf.calibration.data import build_batches
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.errors import RequestTimeoutError, SpaceInputError
from uncurl_hf.evaluation.scoring import label_logprobs
from uncurl_hf.evaluation.tasks import Example, Task, get_task
from uncurl_hf.families import get_family
from uncurl_hf.space.limits import Deadline, check_batch_size, check_text
from uncurl_hf.space.models import LoadedModel, get_model

DEFAULT_TASK = "sentiment"
LATENCY_REPEATS = 3
MAX_NEW_TOKENS = 8

T = TypeVar("T")

# One model run at a time: latencies are only comparable when the two models do not compete for the CPU.
_run_lock = threading.Lock()


@dataclass
class SideResult:
    """One model's answer to one input (``compare()['original']`` / ``['pruned']``)."""

    model: str
    label: str
    probabilities: dict[str, float]
    generated: str
    latency_ms: float
    generate_ms: float
    new_tokens: int
    tokens_per_s: float
    input_tokens: int
    params: int
    disk_mb: float
    experts: dict[str, int]
    expert_usage: dict[str, dict[str, Any]]


def _timed(fn: Callable[[], T], repeats: int | None = None, warmup: int = 1) -> tuple[T, float]:
    """``fn()``'s result and its median wall time in ms over ``repeats`` runs after ``warmup`` runs.

    The median of a few runs (default :data:`LATENCY_REPEATS`), not one run: on a shared CPU a single timing of
    a ~ms call is mostly noise.
    """
    repeats = LATENCY_REPEATS if repeats is None else repeats
    for _ in range(warmup):
        fn()
    times = []
    result: T
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return result, statistics.median(times)


def model_input(task: Task, text: str) -> str:
    """The model's input for user text: the task prefix is added unless the text already starts with it."""
    text = text.strip()
    if task.prefix and text.lower().startswith(task.prefix.strip().lower()):
        return text
    return task.format(text)


def display_text(task: Task, source: str) -> str:
    """A task example as a user would type it (without the task prefix)."""
    if task.prefix and source.startswith(task.prefix):
        return source[len(task.prefix) :]
    return source


def expert_usage(loaded: LoadedModel, source: str, target: str, max_length: int) -> dict[str, dict[str, Any]]:
    """Per sparse layer: how many of this input's tokens the router sent to each expert.

    Encoder layers see the input tokens; decoder layers see the (teacher-forced) ``target`` tokens, here the
    model's own predicted label. Uses the same hooks as calibration, so it shows exactly what pruning saw.
    """
    family = get_family(loaded.model)
    batches = build_batches([Example(source, target)], loaded.tokenizer, batch_size=1, max_length=max_length)
    stats = calibrate(loaded.model, family, batches, max_logit_samples=1, progress=False)
    usage: dict[str, dict[str, Any]] = {}
    for name, layer_stats in stats.items():
        mapping = loaded.layer_groups(name)
        usage[name] = {
            "tokens": int(layer_stats.num_tokens),
            "counts": [int(c) for c in layer_stats.counts.tolist()],
            "groups": mapping[0] if mapping else None,
            "source_experts": mapping[1] if mapping else None,
        }
    return usage


@torch.no_grad()
def _run_side(loaded: LoadedModel, task: Task, source: str, deadline: Deadline | None = None) -> SideResult:
    deadline = deadline or Deadline(None)
    tokenizer, model = loaded.tokenizer, loaded.model
    deadline.check(f"before scoring with {loaded.path.name}")
    scores, latency_ms = _timed(lambda: label_logprobs(model, tokenizer, [source], task.labels, task.max_source_tokens))
    probs = torch.softmax(scores[0].float(), dim=-1).tolist()
    label = task.labels[int(torch.tensor(probs).argmax())]
    enc = tokenizer(source, truncation=True, max_length=task.max_source_tokens, return_tensors="pt")
    deadline.check(f"before generating with {loaded.path.name}")
    left = deadline.remaining()
    budget = {} if left is None else {"max_time": max(left, 1e-3) / (LATENCY_REPEATS + 1)}
    output, generate_ms = _timed(
        lambda: model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1, **budget)
    )
    deadline.check(f"after generating with {loaded.path.name}")
    new = output[0, 1:]  # drop the decoder start token; with one sequence every later position was generated
    new_tokens = int(new.numel())
    return SideResult(
        model=str(loaded.path),
        label=label,
        probabilities={lab: round(float(p), 6) for lab, p in zip(task.labels, probs)},
        generated=tokenizer.decode(new, skip_special_tokens=True).strip(),
        latency_ms=round(latency_ms, 3),
        generate_ms=round(generate_ms, 3),
        new_tokens=new_tokens,
        tokens_per_s=round(new_tokens / (generate_ms / 1000), 1) if generate_ms > 0 else 0.0,
        input_tokens=int(enc["input_ids"].shape[1]),
        params=loaded.params,
        disk_mb=loaded.disk_mb,
        experts=loaded.experts,
        expert_usage=expert_usage(loaded, source, label, task.max_source_tokens),
    )


@contextmanager
def _locked(deadline: Deadline) -> Iterator[None]:
    """Hold the model-run lock (one request computes at a time), waiting at most the request's remaining budget."""
    left = deadline.remaining()
    if not _run_lock.acquire(timeout=-1 if left is None else max(left, 0.0)):
        deadline.check("waiting for the models to be free")
        raise RequestTimeoutError("The models stayed busy for the whole request budget; try again in a moment.")
    try:
        yield
    finally:
        _run_lock.release()


def ratio(after: float, before: float) -> float | None:
    return round(after / before, 4) if before else None


def classification_task(task: str) -> Task:
    task_obj = get_task(task)
    if not task_obj.labels:
        raise SpaceInputError(f"The demo compares classification tasks; {task!r} is a generation task.")
    return task_obj


def compare(
    text: str, base: str | Path, pruned: str | Path, task: str = DEFAULT_TASK, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``text`` through the base and the pruned model; everything the Compare tab shows.

    Returns ``{"text", "model_input", "task", "labels", "original": SideResult, "pruned": SideResult, "ratios",
    "agree"}`` (SideResults as dicts). Labels and probabilities come from label scoring (softmax over the labels'
    sequence log-likelihoods, as in evaluation), ``generated`` from greedy ``generate``; ``latency_ms`` is the
    median time to score the labels for this input, ``tokens_per_s`` the generation throughput.
    Raises :class:`SpaceInputError` (empty / too long input), :class:`RequestTimeoutError` when the work takes
    longer than ``timeout`` seconds (``None``: no limit), and the loading errors of :func:`get_model`.
    """
    deadline = Deadline(timeout)
    text = check_text(text)
    task_obj = classification_task(task)
    source = model_input(task_obj, text)
    original_model, pruned_model = get_model(base), get_model(pruned)
    with _locked(deadline):
        original = _run_side(original_model, task_obj, source, deadline)
        reduced = _run_side(pruned_model, task_obj, source, deadline)
    return {
        "text": text,
        "model_input": source,
        "task": task_obj.name,
        "labels": list(task_obj.labels),
        "original": asdict(original),
        "pruned": asdict(reduced),
        "ratios": {
            "params": ratio(reduced.params, original.params),
            "disk_mb": ratio(reduced.disk_mb, original.disk_mb),
            "latency_ms": ratio(reduced.latency_ms, original.latency_ms),
            "tokens_per_s": ratio(reduced.tokens_per_s, original.tokens_per_s),
        },
        "agree": original.label == reduced.label,
    }


def compare_batch(
    n: int, base: str | Path, pruned: str | Path, task: str = DEFAULT_TASK, timeout: float | None = None
) -> dict[str, Any]:
    """Score the first ``n`` test examples with both models; everything the Batch tab shows.

    Returns ``{"task", "split", "n", "metric", "scores": {original, pruned}, "agreement" (0..1),
    "latency_ms": {original: [...], pruned: [...]} (per example, batch 1), "median_latency_ms", "rows"}``.
    Examples run one at a time, alternating models, so both see the same background load. Raises
    :class:`RequestTimeoutError` when the batch takes longer than ``timeout`` seconds (checked between examples).
    """
    from uncurl_hf.evaluation.metrics import load_metric

    deadline = Deadline(timeout)
    count = check_batch_size(n)
    task_obj = classification_task(task)
    examples = task_obj.load_split("test")[:count]
    models = {"original": get_model(base), "pruned": get_model(pruned)}
    preds: dict[str, list[str]] = {side: [] for side in models}
    latency: dict[str, list[float]] = {side: [] for side in models}
    with _locked(deadline), torch.no_grad():
        for side, loaded in models.items():  # warm-up: first calls allocate and are not representative
            label_logprobs(loaded.model, loaded.tokenizer, [examples[0].source], task_obj.labels)
        for index, example in enumerate(examples):
            deadline.check(f"after {index} of {count} examples")
            for side, loaded in models.items():
                scores, ms = _timed(
                    lambda: label_logprobs(
                        loaded.model, loaded.tokenizer, [example.source], task_obj.labels, task_obj.max_source_tokens
                    ),
                    repeats=1,
                    warmup=0,
                )
                preds[side].append(task_obj.labels[int(scores[0].argmax())])
                latency[side].append(round(ms, 3))
    metric = load_metric(task_obj.metric)
    references = [e.target for e in examples]
    scores_by_side = {
        side: float(metric.compute(predictions=p, references=references)[task_obj.metric]) for side, p in preds.items()
    }
    agreement = sum(a == b for a, b in zip(preds["original"], preds["pruned"])) / count
    return {
        "task": task_obj.name,
        "split": "test",
        "n": count,
        "metric": task_obj.metric,
        "scores": scores_by_side,
        "agreement": agreement,
        "latency_ms": latency,
        "median_latency_ms": {side: round(statistics.median(v), 3) for side, v in latency.items()},
        "rows": [
            {"text": display_text(task_obj, e.source), "gold": e.target, "original": a, "pruned": b}
            for e, a, b in zip(examples, preds["original"], preds["pruned"])
        ],
    }
