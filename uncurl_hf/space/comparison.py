"""The two functions behind the page: :func:`compare` (one input) and :func:`compare_batch` (N test examples).

Both return JSON-able dicts; the page (:mod:`uncurl_hf.space.app`) only formats them (:mod:`uncurl_hf.space.render`),
and the tests call them directly and through ``gradio_client``, so "what the page shows" and "what the Python API
returns" cannot drift apart. Runs without Gradio or matplotlib.

Encoder-decoders (Switch) and causal LMs (the decoder families, stock or pruned classes) take one code path: what a
model is given differs (:mod:`uncurl_hf.space.inputs`), what is measured does not. Labels are scored by evaluation's
own scorer, the two models run one experts kernel (:func:`~uncurl_hf.space.models.align_experts_kernel`), and a batch
of causal LMs also reports evaluation's teacher-forced KL(original || pruned) and perplexities.
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

from uncurl_hf.calibration.run import calibrate
from uncurl_hf.errors import RequestTimeoutError, SpaceInputError
from uncurl_hf.evaluation.scoring import label_distribution
from uncurl_hf.evaluation.tasks import Example, Task, get_task
from uncurl_hf.families import get_family
from uncurl_hf.modeling.kernels import experts_implementation
from uncurl_hf.space.inputs import (
    DEFAULT_PROMPT_FORMAT,
    check_fits,
    check_label_prompt,
    check_prompt_format,
    generate_kwargs,
    generation_prompt,
    label_input,
    new_token_ids,
    usage_batches,
)
from uncurl_hf.space.divergence import token_metrics as divergence_metrics
from uncurl_hf.space.limits import Deadline, check_batch_size, check_text
from uncurl_hf.space.models import LoadedModel, align_experts_kernel, get_model

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
    kind: str = "seq2seq"  # or "causal"
    prompt: str = ""  # the generation prompt as text
    experts_kernel: str = "eager"  # the experts kernel the model ran (the same on both sides when it can be)


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


def expert_usage(loaded: LoadedModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Per sparse layer: how many of this input's tokens the router sent to each expert.

    ``batches`` are :func:`~uncurl_hf.space.inputs.usage_batches`: a seq2seq model's encoder layers see the input and
    its decoder layers the (teacher-forced) predicted label; a causal LM's layers see the task prompt and the label.
    Uses the same hooks as calibration, so it shows exactly what pruning saw. With top-k routing each token counts
    once in each of its ``top_k`` experts, so a layer's counts sum to ``tokens * top_k``.
    """
    family = get_family(loaded.model)
    stats = calibrate(loaded.model, family, batches, max_logit_samples=1, progress=False)
    maps = {layer.name: layer.expert_map for layer in family.sparse_layers(loaded.model)}
    usage: dict[str, dict[str, Any]] = {}
    for name, layer_stats in stats.items():
        mapping = loaded.layer_groups(name)
        counts = layer_stats.counts
        if maps.get(name) is not None:  # a logical merge counts its router's original experts: fold them
            index = torch.as_tensor(maps[name])
            counts = torch.zeros(int(index.max()) + 1, dtype=counts.dtype).index_add_(0, index, counts)
        usage[name] = {
            "tokens": int(layer_stats.num_tokens),
            "top_k": (loaded.top_k or {}).get(name, 1),
            "counts": [int(c) for c in counts.tolist()],
            "groups": mapping[0] if mapping else None,
            "source_experts": mapping[1] if mapping else None,
        }
    return usage


def label_log_distribution(loaded: LoadedModel, task: Task, source: str) -> torch.Tensor:
    """``[L]`` log-distribution over the task's labels for one input: evaluation's own scorer
    (:func:`~uncurl_hf.evaluation.scoring.label_distribution`: label sequences for a seq2seq model, label
    continuations of the task prompt for a causal LM), so the page and `uncurl eval` cannot disagree."""
    return label_distribution(loaded.model, loaded.tokenizer, task, [Example(source)], batch_size=1)[0]


@torch.no_grad()
def _run_side(
    loaded: LoadedModel, task: Task, source: str, text: str, prompt_format: str, deadline: Deadline | None = None
) -> SideResult:
    deadline = deadline or Deadline(None)
    name = loaded.path.name
    prompt = generation_prompt(loaded, task, source, text, prompt_format)
    check_fits(loaded, prompt, MAX_NEW_TOKENS)
    deadline.check(f"before scoring with {name}")
    log_dist, latency_ms = _timed(lambda: label_log_distribution(loaded, task, source))
    probs = log_dist.double().exp().tolist()
    label = task.labels[int(log_dist.argmax())]
    deadline.check(f"before generating with {name}")
    left = deadline.remaining()
    budget = {} if left is None else {"max_time": max(left, 1e-3) / (LATENCY_REPEATS + 1)}
    kwargs = generate_kwargs(loaded, prompt)
    output, generate_ms = _timed(
        lambda: loaded.model.generate(**kwargs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1, **budget)
    )
    deadline.check(f"after generating with {name}")
    new = new_token_ids(loaded, output, prompt)
    new_tokens = int(new.numel())
    return SideResult(
        model=str(loaded.path),
        label=label,
        probabilities={lab: round(float(p), 6) for lab, p in zip(task.labels, probs)},
        generated=loaded.tokenizer.decode(new, skip_special_tokens=True).strip(),
        latency_ms=round(latency_ms, 3),
        generate_ms=round(generate_ms, 3),
        new_tokens=new_tokens,
        tokens_per_s=round(new_tokens / (generate_ms / 1000), 1) if generate_ms > 0 else 0.0,
        input_tokens=len(prompt.ids),
        params=loaded.params,
        disk_mb=loaded.disk_mb,
        experts=loaded.experts,
        expert_usage=expert_usage(loaded, usage_batches(loaded, task, source, label)),
        kind=loaded.kind,
        prompt=prompt.text,
        experts_kernel=experts_implementation(loaded.model),
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


def _pair(base: str | Path, pruned: str | Path, task: Task) -> tuple[LoadedModel, LoadedModel]:
    """Both models, checked to be one kind and to fit the task's prompt, before any of them runs."""
    original_model, pruned_model = get_model(base), get_model(pruned)
    if original_model.kind != pruned_model.kind:
        raise SpaceInputError(
            f"The base model is {'a causal LM' if original_model.is_causal else 'an encoder-decoder'} and the pruned "
            f"checkpoint {'a causal LM' if pruned_model.is_causal else 'an encoder-decoder'}; compare a pruned "
            "checkpoint with the model it was pruned from."
        )
    for loaded in (original_model, pruned_model):
        check_label_prompt(loaded, task)
    return original_model, pruned_model


def compare(
    text: str,
    base: str | Path,
    pruned: str | Path,
    task: str = DEFAULT_TASK,
    timeout: float | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
) -> dict[str, Any]:
    """Run ``text`` through the base and the pruned model; everything the Compare tab shows.

    Returns ``{"text", "model_input", "task", "labels", "kind", "prompt_format", "experts_kernel", "original":
    SideResult, "pruned": SideResult, "ratios", "agree"}`` (SideResults as dicts). Labels and probabilities come from
    evaluation's label scoring (softmax over the labels' sequence log-likelihoods; a causal LM's through the task's
    prompt, ``model_input``), ``generated`` from greedy ``generate`` on the ``prompt_format`` prompt (``task``,
    ``chat`` or ``plain``; :mod:`uncurl_hf.space.inputs`); ``latency_ms`` is the median time to score the labels for
    this input, ``tokens_per_s`` the generation throughput, both on the ``experts_kernel`` of both models.
    Raises :class:`SpaceInputError` (empty / too long input, no chat template, a prompt longer than the model's
    positions, models of two kinds), :class:`RequestTimeoutError` when the work takes longer than ``timeout``
    seconds (``None``: no limit), and the loading errors of :func:`get_model`.
    """
    deadline = Deadline(timeout)
    text = check_text(text)
    prompt_format = check_prompt_format(prompt_format)
    task_obj = classification_task(task)
    source = model_input(task_obj, text)
    original_model, pruned_model = _pair(base, pruned, task_obj)
    with _locked(deadline):
        kernel = align_experts_kernel(original_model, pruned_model)
        original = _run_side(original_model, task_obj, source, text, prompt_format, deadline)
        reduced = _run_side(pruned_model, task_obj, source, text, prompt_format, deadline)
    return {
        "text": text,
        "model_input": label_input(original_model, task_obj, source),
        "task": task_obj.name,
        "labels": list(task_obj.labels),
        "kind": original_model.kind,
        "prompt_format": prompt_format,
        "experts_kernel": kernel,
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


def _score_batch(
    models: dict[str, LoadedModel], task: Task, examples: list[Example], deadline: Deadline
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[float]]]:
    """Per side: each example's label log-distribution and its latency (ms, batch 1), examples alternating models
    so both see the same background load."""
    dists: dict[str, list[torch.Tensor]] = {side: [] for side in models}
    latency: dict[str, list[float]] = {side: [] for side in models}
    for loaded in models.values():  # warm-up: first calls allocate and are not representative
        label_log_distribution(loaded, task, examples[0].source)
    for index, example in enumerate(examples):
        deadline.check(f"after {index} of {len(examples)} examples")
        for side, loaded in models.items():
            dist, ms = _timed(lambda: label_log_distribution(loaded, task, example.source), repeats=1, warmup=0)
            dists[side].append(dist)
            latency[side].append(round(ms, 3))
    return dists, latency


def compare_batch(
    n: int,
    base: str | Path,
    pruned: str | Path,
    task: str = DEFAULT_TASK,
    timeout: float | None = None,
    token_metrics: bool = True,
) -> dict[str, Any]:
    """Score the first ``n`` test examples with both models; everything the Batch tab shows.

    Returns ``{"task", "split", "n", "kind", "metric", "scores": {original, pruned}, "agreement" (0..1),
    "kl_labels" (mean KL(original || pruned) of the label distributions, nats), "experts_kernel", "latency_ms":
    {original: [...], pruned: [...]} (per example, batch 1), "median_latency_ms", "rows"}``; for causal LMs with
    ``token_metrics`` also ``"kl_tokens"`` (teacher-forced next-token KL(original || pruned), nats per token) and
    ``"perplexity": {original, pruned}`` on the examples' prompts + gold labels (:mod:`uncurl_hf.space.divergence`).
    Raises :class:`RequestTimeoutError` when the batch takes longer than ``timeout`` seconds (checked between
    examples).
    """
    from uncurl_hf.evaluation.scoring import divergence, metric_score

    deadline = Deadline(timeout)
    count = check_batch_size(n)
    task_obj = classification_task(task)
    examples = task_obj.load_split("test")[:count]
    count = len(examples)
    original_model, pruned_model = _pair(base, pruned, task_obj)
    models = {"original": original_model, "pruned": pruned_model}
    extra: dict[str, Any] = {}
    with _locked(deadline), torch.no_grad():
        kernel = align_experts_kernel(original_model, pruned_model)
        dists, latency = _score_batch(models, task_obj, examples, deadline)
        if token_metrics and original_model.is_causal:
            extra = divergence_metrics(original_model, pruned_model, task_obj, examples, deadline)
    preds = {side: [task_obj.labels[int(d.argmax())] for d in values] for side, values in dists.items()}
    _, kl_labels = divergence(torch.stack(dists["original"]), torch.stack(dists["pruned"]))
    return {
        "task": task_obj.name,
        "split": "test",
        "n": count,
        "kind": original_model.kind,
        "metric": task_obj.metric,
        "scores": {side: metric_score(task_obj, p, examples) for side, p in preds.items()},
        "agreement": sum(a == b for a, b in zip(preds["original"], preds["pruned"])) / count,
        "kl_labels": round(kl_labels, 6),
        **extra,
        "experts_kernel": kernel,
        "latency_ms": latency,
        "median_latency_ms": {side: round(statistics.median(v), 3) for side, v in latency.items()},
        "rows": [
            {"text": display_text(task_obj, e.source), "gold": e.target, "original": a, "pruned": b}
            for e, a, b in zip(examples, preds["original"], preds["pruned"])
        ],
    }
