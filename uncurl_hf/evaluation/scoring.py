"""Evaluation: task metric (through `evaluate`), size and latency of a seq2seq SMoE checkpoint.

Classification tasks are scored text-to-text the robust way: for every example, the label whose token
sequence has the highest log-likelihood under the model is the prediction (no free generation, so a
model cannot lose points for spelling a label differently). The encoder runs once per batch and is
reused for every label.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from uncurl_hf.io.checkpoint import count_parameters, load_model, load_tokenizer, weights_size
from uncurl_hf.evaluation.metrics import load_metric
from uncurl_hf.evaluation.tasks import Example, Task, get_task

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What `uncurl eval` reports for one model on one task split."""

    model: str
    task: str
    split: str
    metric: str
    score: float
    num_examples: int
    params: int
    disk_mb: float
    ms_per_example_batch1: float
    ms_per_example_batched: float
    batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def label_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    labels: Sequence[str],
    max_length: int = 128,
) -> torch.Tensor:
    """[N, L] summed log-probabilities of each label's target sequence given each source."""
    enc = _encode(tokenizer, sources, max_length)
    encoder_outputs = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    scores = []
    for label in labels:
        target = tokenizer(label, return_tensors="pt").input_ids  # [1, T] incl. eos
        target = target.expand(len(sources), -1).contiguous()
        out = model(
            encoder_outputs=encoder_outputs,
            attention_mask=enc["attention_mask"],
            labels=target,
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        scores.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.stack(scores, dim=-1)


@torch.no_grad()
def label_distribution(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """[N, L] log-probabilities over the task's labels (softmax of the label sequence log-likelihoods).

    Its argmax is the prediction; it is also finer than accuracy for comparing a pruned model with its
    original: two models can agree on every argmax and still differ in confidence (measured as KL divergence).
    """
    model.eval()
    starts = range(0, len(examples), batch_size)
    chunks = [
        label_logprobs(
            model, tokenizer, [e.source for e in examples[i : i + batch_size]], task.labels, task.max_source_tokens
        )
        for i in tqdm(starts, desc=f"eval {task.name}", disable=not progress, leave=False)
    ]
    return torch.log_softmax(torch.cat(chunks), dim=-1)


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Predicted label string per example (argmax of :func:`label_distribution`)."""
    distribution = label_distribution(model, tokenizer, task, examples, batch_size, progress)
    return [task.labels[i] for i in distribution.argmax(-1).tolist()]


def metric_score(task: Task, predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """The task metric of ``predictions`` against the examples' targets (the project's `evaluate` module)."""
    metric = load_metric(task.metric)
    return float(metric.compute(predictions=list(predictions), references=[e.target for e in examples])[task.metric])


def task_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """The task metric (computed by the project's `evaluate` module) on ``examples``."""
    if not task.labels:
        raise NotImplementedError(f"task {task.name!r} is a generation task; only classification is scored yet")
    return metric_score(task, predict_labels(model, tokenizer, task, examples, batch_size, progress), examples)


def measure_latency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    batch_size: int,
    warmup: int = 2,
) -> float:
    """Milliseconds per example to score ``examples`` in batches of ``batch_size`` (after warm-up)."""
    model.eval()
    for e in examples[:warmup]:
        label_logprobs(model, tokenizer, [e.source], task.labels, task.max_source_tokens)
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        label_logprobs(model, tokenizer, [e.source for e in chunk], task.labels, task.max_source_tokens)
    return (time.perf_counter() - t0) * 1000 / max(1, len(examples))


def evaluate_checkpoint(
    path: str | Path,
    task: str | Task,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    latency_examples: int = 64,
    progress: bool = True,
) -> EvalResult:
    """Load a checkpoint folder and report metric, params, disk MB and ms/example (batch 1 and batched)."""
    task_obj = get_task(task) if isinstance(task, str) else task
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    examples = task_obj.load_split(split)
    if limit is not None:
        examples = examples[:limit]
    score = task_score(model, tokenizer, task_obj, examples, batch_size, progress)
    timing = examples[:latency_examples]
    return EvalResult(
        model=str(path),
        task=task_obj.name,
        split=split,
        metric=task_obj.metric,
        score=score,
        num_examples=len(examples),
        params=count_parameters(model),
        disk_mb=round(weights_size(path) / 1e6, 3),
        ms_per_example_batch1=round(measure_latency(model, tokenizer, task_obj, timing, 1), 3),
        ms_per_example_batched=round(measure_latency(model, tokenizer, task_obj, timing, batch_size), 3),
        batch_size=batch_size,
    )
