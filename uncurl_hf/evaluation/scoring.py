"""Evaluation: task metric (through `evaluate`), size and latency of an SMoE checkpoint, seq2seq or causal LM.

Classification tasks are scored text-to-text the robust way: for every example, the label whose token
sequence has the highest log-likelihood under the model is the prediction (no free generation, so a
model cannot lose points for spelling a label differently). The encoder runs once per batch and is
reused for every label. A causal LM (the decoder families) is scored the same way through the task's decoder prompt
(:mod:`uncurl_hf.evaluation.causal`); every public function here dispatches on the model's kind, so `uncurl eval`,
``prune --evaluate``, sweeps and the max-drop search treat both kinds alike. Causal LMs also report perplexity, and
with a reference model (the original) the agreement of their label argmaxes and the KL divergences.

Per-example scores (:func:`score_examples`) are what factor sweeps bootstrap and what the max-drop search compares:
the mean of a model's per-example vector is its task metric, so resampling examples needs no model run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from uncurl_hf.errors import SweepError
from uncurl_hf.evaluation import causal
from uncurl_hf.errors import EvaluationError
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
    kind: str = "seq2seq"  # or "causal"
    perplexity: float | None = None  # causal LMs: on the task's text (prompt + gold answer for classification)
    reference: str | None = None  # the model compared against (`uncurl eval --reference`, the original)
    reference_score: float | None = None
    agreement: float | None = None  # % of examples whose predicted label equals the reference's
    kl_labels: float | None = None  # mean KL(reference || this) of the label distributions, nats
    kl_tokens: float | None = None  # causal LMs: mean per-token KL(reference || this) of next-token distributions

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
    A causal LM scores each label's continuation of the task's prompt (:func:`causal.label_distribution`).
    """
    if causal.is_causal(model):
        return causal.label_distribution(model, tokenizer, task, examples, batch_size, progress)
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
    """The task metric (computed by the project's `evaluate` module) on ``examples``; a text task's perplexity."""
    if task.is_text_task:
        return causal.task_perplexity(_causal_only(model, task), tokenizer, task, examples, progress=progress)
    if not task.labels:
        raise EvaluationError(
            f"Task {task.name!r} is a generation task; only classification tasks (and, for causal LMs, perplexity "
            "tasks) are scored yet. Use a classification task."
        )
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
    if causal.is_causal(model):
        return causal.measure_latency(model, tokenizer, task, examples, batch_size, warmup)
    model.eval()
    for e in examples[:warmup]:
        label_logprobs(model, tokenizer, [e.source], task.labels, task.max_source_tokens)
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        label_logprobs(model, tokenizer, [e.source for e in chunk], task.labels, task.max_source_tokens)
    return (time.perf_counter() - t0) * 1000 / max(1, len(examples))


def _causal_only(model: Any, task: Task) -> Any:
    if not causal.is_causal(model):
        raise EvaluationError(
            f"Task {task.name!r} is scored by perplexity, which needs a causal LM (a decoder family); this model is "
            "an encoder-decoder. Evaluate it on a classification task."
        )
    return model


def evaluate_checkpoint(
    path: str | Path,
    task: str | Task,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    latency_examples: int = 64,
    progress: bool = True,
    reference: str | Path | None = None,
) -> EvalResult:
    """Load a checkpoint folder and report metric, params, disk MB and ms/example (batch 1 and batched); a causal
    LM also its perplexity. With ``reference`` (the original model's folder): its score, the agreement of the two
    models' predicted labels and KL(reference || this model)."""
    return _evaluate(path, task, split, limit, batch_size, latency_examples, progress, reference)[0]


def evaluate_pair(
    original: str | Path, pruned: str | Path, task: str | Task, split: str = "test", limit: int | None = None,
    batch_size: int = 64, latency_examples: int = 64, progress: bool = True,
) -> tuple[EvalResult, EvalResult]:
    """``(original, pruned)`` results, the pruned one compared with the original (agreement, KL), the original's
    label distribution computed once (what ``prune --evaluate`` records in the card)."""
    first, loaded = _evaluate(original, task, split, limit, batch_size, latency_examples, progress, None)
    second, _ = _evaluate(pruned, task, split, limit, batch_size, latency_examples, progress, original, loaded)
    return first, second


def _evaluate(path: str | Path, task: str | Task, split: str, limit: int | None, batch_size: int,
              latency_examples: int, progress: bool, reference: str | Path | None,
              reference_loaded: tuple[Any, torch.Tensor | None] | None = None,
              ) -> tuple[EvalResult, tuple[Any, torch.Tensor | None]]:
    """The result and ``(model, label distribution)`` of one checkpoint (reused when it is the next reference)."""
    task_obj = get_task(task) if isinstance(task, str) else task
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    is_causal = causal.is_causal(model)
    if is_causal:
        causal.check_prompt_fits(model, tokenizer, task_obj)
    examples = task_obj.load_split(split)
    if limit is not None:
        examples = examples[:limit]
    distribution = None
    if task_obj.labels:
        distribution = label_distribution(model, tokenizer, task_obj, examples, batch_size, progress)
        score = metric_score(task_obj, [task_obj.labels[i] for i in distribution.argmax(-1).tolist()], examples)
    else:
        score = task_score(model, tokenizer, task_obj, examples, batch_size, progress)
    extra: dict[str, Any] = {"kind": "causal" if is_causal else "seq2seq"}
    if is_causal:
        extra["perplexity"] = score if task_obj.is_text_task else causal.task_perplexity(
            model, tokenizer, task_obj, examples, progress=progress)
    if reference is not None:
        ref_model, ref_distribution = reference_loaded or (load_model(reference), None)
        extra.update(_compare(ref_model, model, tokenizer, task_obj, examples, distribution, ref_distribution,
                              batch_size, progress), reference=str(reference))
    timing = examples[:latency_examples]
    result = EvalResult(
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
        **extra,
    )
    return result, (model, distribution)


def _compare(reference: Any, model: Any, tokenizer: Any, task: Task, examples: Sequence[Example],
             distribution: torch.Tensor | None, ref_distribution: torch.Tensor | None, batch_size: int,
             progress: bool) -> dict[str, Any]:
    """The reference's score, label agreement and KL divergences of ``model`` against ``reference``."""
    if causal.is_causal(reference) != causal.is_causal(model):
        raise EvaluationError(
            "--reference must be the same kind of model as the evaluated one (both causal LMs or both "
            "encoder-decoders): pass the model the pruned checkpoint was made from."
        )
    out: dict[str, Any] = {}
    if distribution is not None:
        if ref_distribution is None:
            ref_distribution = label_distribution(reference, tokenizer, task, examples, batch_size, progress)
        predictions = [task.labels[i] for i in ref_distribution.argmax(-1).tolist()]
        out["reference_score"] = metric_score(task, predictions, examples)
        out["agreement"], out["kl_labels"] = divergence(ref_distribution, distribution)
    elif task.is_text_task:
        out["reference_score"] = causal.task_perplexity(reference, tokenizer, task, examples, progress=progress)
    if causal.is_causal(model):
        out["kl_tokens"] = causal.task_kl(reference, model, tokenizer, task, examples, progress=progress)
    return out


# ------------------------------------------------------------- per-example scores (sweeps, the max-drop search)


PerExampleScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def _exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """1.0 where the prediction equals the reference (as strings), else 0.0: accuracy's per-example score."""
    return np.array([float(str(p) == str(r)) for p, r in zip(predictions, references)], dtype=np.float64)


_PER_EXAMPLE: dict[str, PerExampleScorer] = {"accuracy": _exact_match}


def register_per_example_metric(name: str, scorer: PerExampleScorer) -> None:
    """Register the per-example form of metric ``name`` (its mean must be the metric), e.g. a rouge-L per pair."""
    _PER_EXAMPLE[name] = scorer


def per_example_scores(task: Any, predictions: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
    """``[N]`` per-example scores whose mean is ``task.metric`` on these examples.

    A registered scorer (:func:`register_per_example_metric`) is used when there is one; otherwise the metric's
    ``evaluate`` module is run on each (prediction, reference) pair and its mean is checked against the corpus
    metric (:class:`SweepError` when they differ: a corpus-level metric such as macro-F1 cannot be bootstrapped
    from per-example values).
    """
    references = [e.target for e in examples]
    scorer = _PER_EXAMPLE.get(task.metric)
    if scorer is not None:
        return np.asarray(scorer(list(predictions), references), dtype=np.float64)
    metric = load_metric(task.metric)
    values = np.array(
        [float(metric.compute(predictions=[p], references=[r])[task.metric]) for p, r in zip(predictions, references)],
        dtype=np.float64,
    )
    corpus = metric_score(task, predictions, examples)
    if values.size and abs(float(values.mean()) - corpus) > 1e-6:
        raise SweepError(
            f"Metric {task.metric!r} is not the mean of its per-example values ({values.mean():.6f} vs "
            f"{corpus:.6f}), so a sweep cannot bootstrap it; register its per-example form with "
            "uncurl_hf.evaluation.scoring.register_per_example_metric, or sweep a task with a mean metric."
        )
    return values


@dataclass
class ScoredExamples:
    """One model's predictions on the evaluation examples, their per-example scores and (classification) the
    ``[N, L]`` label log-distribution used for agreement and KL."""

    predictions: list[str]
    per_example: np.ndarray
    distribution: torch.Tensor | None = None

    @property
    def score(self) -> float:
        return float(self.per_example.mean()) if self.per_example.size else float("nan")


@torch.no_grad()
def generate_predictions(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 32, progress: bool = False
) -> list[str]:
    """Greedy generations for a generation task (``task.labels`` empty), decoded without special tokens.

    ``task.max_target_tokens`` (when the task defines it) bounds the generated length; 64 otherwise.
    """
    max_new = int(getattr(task, "max_target_tokens", 64))
    model.eval()
    outputs: list[str] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"generate {task.name}", disable=not progress,
                      leave=False):
        chunk = examples[start : start + batch_size]
        enc = tokenizer([e.source for e in chunk], padding=True, truncation=True, max_length=task.max_source_tokens,
                        return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1)
        outputs += [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return outputs


def score_examples(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 64, progress: bool = False
) -> ScoredExamples:
    """Score ``model`` on ``examples``: label likelihood for classification tasks (a causal LM through the task's
    prompt), greedy generation otherwise (seq2seq only)."""
    text_task = bool(getattr(task, "is_text_task", False))
    if text_task or (not task.labels and causal.is_causal(model)):
        kind = "a perplexity task" if text_task else "a generation task, not scored for causal LMs yet"
        raise EvaluationError(
            f"Sweeps and --max-drop score a classification task example by example; {task.name!r} is {kind}. "
            "Compare checkpoints with `uncurl eval OUT --task TASK --reference ORIGINAL`, or use a classification "
            "task."
        )
    if task.labels:
        distribution = label_distribution(model, tokenizer, task, examples, batch_size, progress)
        predictions = [task.labels[i] for i in distribution.argmax(-1).tolist()]
    else:
        distribution = None
        predictions = generate_predictions(model, tokenizer, task, examples, progress=progress)
    return ScoredExamples(predictions, per_example_scores(task, predictions, examples), distribution)


def divergence(reference: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """(% of examples with the same argmax, mean KL(reference || pruned) in nats) of two ``[N, L]`` log-dists."""
    agreement = 100.0 * float((reference.argmax(-1) == pruned.argmax(-1)).double().mean())
    kl = float((reference.double().exp() * (reference.double() - pruned.double())).sum(-1).mean())
    return agreement, max(kl, 0.0)
