"""Evaluation of causal LMs (the decoder families): label scoring, perplexity and KL to the original model.

* Label scoring, as lm-eval's ``multiple_choice`` ``acc``: each example is put through the task's decoder prompt
  (:mod:`uncurl_hf.evaluation.prompts`) and every label's continuation is scored by its summed token
  log-likelihood; the best label is the prediction, and the softmax over the labels is the label distribution that
  sweeps compare (agreement, KL) exactly as for seq2seq models.
* Perplexity: ``exp`` of the token-weighted mean negative log-likelihood over the sequences (every token after the
  start token is predicted; padding never counts).
* KL(original || pruned): next-token distributions over the whole vocabulary, teacher-forced on the same token ids,
  averaged over every predicted token. It sees a change that no argmax shows, which makes it the sensitive measure
  of what pruning cost.

Batches are right-padded with an attention mask: real tokens then keep their positions and never attend to
padding, so a sequence scores the same in any batch (batch 1 and 8 agree to 1e-5, tested). Sequences are sorted by
length before batching (less padding) and results are put back in input order; no sampling anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from uncurl_hf.errors import EvaluationError, PromptError
from uncurl_hf.evaluation.prompts import (
    continuation_ids,
    max_prompt_length,
    prompt_ids,
    text_ids,
)

logger = logging.getLogger(__name__)

DEFAULT_TEXT_TOKENS = 512  # cap on a perplexity text's tokens when neither the task nor the model sets a lower one


def is_causal(model: Any) -> bool:
    """Whether ``model`` is a decoder-only LM (what this module scores) rather than an encoder-decoder."""
    config = getattr(model, "config", None)
    return config is not None and not bool(getattr(config, "is_encoder_decoder", False))


def max_positions(model: Any) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings``), ``None`` when the config has none."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def task_prompt(task: Any) -> Any:
    """The task's decoder prompt, or :class:`EvaluationError` for a task without labels that is not a text task."""
    template = task.decoder_prompt()
    if template is None:
        raise EvaluationError(
            f"Task {task.name!r} has no labels, so it has no prompt to score a causal LM with; generation tasks are "
            "not scored for causal LMs yet. Use a classification task (sentiment, topic, hedge) or a text task "
            "(metric 'perplexity')."
        )
    return template


def check_prompt_fits(model: Any, tokenizer: Any, task: Any) -> None:
    """Refuse a task whose longest prompt + answer exceeds the model's positions, before any example is scored
    (positions past ``max_position_embeddings`` give garbage or an index error, not a lower score)."""
    limit = max_positions(model)
    if limit is None or task.is_text_task:
        return  # text tasks are truncated to the model's positions instead
    template = task_prompt(task)
    needed = max_prompt_length(tokenizer, template)
    if needed > limit:
        shown = template.render("<text>").replace("\n", "\\n")  # an error message is one line
        raise PromptError(
            f"The {task.name!r} prompt needs up to {needed} tokens (template '{shown}' with up "
            f"to {template.max_text_tokens} text tokens, plus the longest label), but the model has "
            f"max_position_embeddings={limit}. Evaluate a model with at least {needed} positions, or register a "
            "PromptTemplate with a smaller max_text_tokens in uncurl_hf.evaluation.prompts.PROMPTS."
        )


# ------------------------------------------------------------------------------------------------ batching


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0  # padding is masked out, any id will do


def _device(model: Any) -> torch.device:
    from uncurl_hf.families.devices import input_device

    return input_device(model)


def padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(indices, input_ids, attention_mask)`` batches of ``sequences``, sorted by length, right-padded."""
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}.")
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
            mask[row, : len(sequences[i])] = 1
        yield indices, ids, mask


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """float32 logits on the CPU; with ``keep`` > 0 only those of the last ``keep`` positions (``logits_to_keep``:
    a label needs a few positions, and full ``[B, T, vocab]`` logits of a 150k-token vocabulary need gigabytes)."""
    device = _device(model)
    kwargs: dict[str, Any] = {"use_cache": False}
    if keep and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    return logits[:, -keep:].float().cpu() if keep else logits.float().cpu()


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    base = getattr(model, "get_base_model", None)  # a peft wrapper forwards keyword arguments to the model
    target = base() if callable(base) else model
    try:
        return "logits_to_keep" in inspect.signature(type(target).forward).parameters
    except (TypeError, ValueError):
        return False


def _progress(batches: Iterator[Any], desc: str, progress: bool, total: int) -> Iterator[Any]:
    return tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)


# ------------------------------------------------------------------------------------------------ label scoring


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """``[P]`` float64: summed log-probability of each ``continuation`` given its ``context`` (token ids)."""
    sequences = [list(context) + list(continuation) for context, continuation in pairs]
    scores = torch.zeros(len(pairs), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        batches = padded_batches(sequences, batch_size, _pad_id(tokenizer))
        total = -(-len(sequences) // batch_size)
        for indices, ids, mask in _progress(batches, "label scores", progress, total):
            width = ids.shape[1]
            # the token at position t is predicted by the logits at t - 1: keep from the earliest such position
            keep = max(width - (len(sequences[i]) - len(pairs[i][1]) - 1) for i in indices)
            logits = _logits(model, ids, mask, keep)
            for row, i in enumerate(indices):
                n, end = len(pairs[i][1]), len(sequences[i])
                if n == 0:
                    continue
                first = end - n - 1 - (width - keep)
                logp = torch.log_softmax(logits[row, first : first + n], dim=-1)
                target = torch.tensor(sequences[i][end - n :], dtype=torch.long)
                scores[i] = logp.gather(-1, target.unsqueeze(-1)).double().sum()
    finally:
        model.train(was_training)
    return scores


def label_logprobs(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """``[N, L]`` summed log-likelihood of each label's continuation (columns in ``task.labels`` order)."""
    check_prompt_fits(model, tokenizer, task)
    template = task_prompt(task)
    conts = continuation_ids(tokenizer, template)
    pairs = []
    for example in examples:
        context = prompt_ids(tokenizer, template, task.raw_text(example.source))
        pairs += [(context, conts[label]) for label in task.labels]
    # ``batch_size`` counts examples, as for seq2seq models: one forward holds every label of each example
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size * max(1, len(task.labels)), progress)
    return flat.reshape(len(examples), len(task.labels))


def label_distribution(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """``[N, L]`` log-distribution over the labels (softmax of :func:`label_logprobs`); argmax = prediction."""
    return torch.log_softmax(label_logprobs(model, tokenizer, task, examples, batch_size, progress), dim=-1)


# ------------------------------------------------------------------------------------------------ perplexity, KL


def text_limit(model: Any, task: Any | None = None) -> int:
    """Tokens kept of a perplexity text: the task's ``max_source_tokens`` (or 512), within the model's positions."""
    limit = int(getattr(task, "max_source_tokens", DEFAULT_TEXT_TOKENS)) if task is not None else DEFAULT_TEXT_TOKENS
    positions = max_positions(model)
    return min(limit, positions - 1) if positions else limit


def texts_sequences(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Start token + each text's tokens (truncated to fit): the sequences :func:`perplexity` scores."""
    limit = text_limit(model) if max_tokens is None else max_tokens
    return [text_ids(tokenizer, text, limit) for text in texts]


def evaluation_sequences(model: Any, tokenizer: Any, task: Any, examples: Sequence[Any]) -> list[list[int]]:
    """The token ids a task's perplexity and KL are measured on: a text task's texts; for a classification task,
    each prompt followed by the gold label's continuation (only the prompt when the target is not a label)."""
    if task.is_text_task:
        return texts_sequences(model, tokenizer, [e.source for e in examples], text_limit(model, task))
    template = task_prompt(task)
    conts = continuation_ids(tokenizer, template)
    return [prompt_ids(tokenizer, template, task.raw_text(e.source)) + conts.get(e.target, []) for e in examples]


@torch.no_grad()
def token_nll(
    model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 16, pad_id: int = 0, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [S], tokens [S])``: each sequence's summed negative log-likelihood (float64) and predicted tokens."""
    nll = torch.zeros(len(sequences), dtype=torch.float64)
    counts = torch.tensor([max(len(s) - 1, 0) for s in sequences], dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        total = -(-len(sequences) // batch_size)
        for indices, ids, mask in _progress(padded_batches(sequences, batch_size, pad_id), "perplexity", progress,
                                            total):
            logp = torch.log_softmax(_logits(model, ids, mask)[:, :-1], dim=-1)
            picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double()
            picked = picked * mask[:, 1:].double()  # a padded target is no token
            nll[indices] = -picked.sum(-1)
    finally:
        model.train(was_training)
    return nll, counts


def perplexity_of(model: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                  progress: bool = False) -> float:
    """Token-weighted perplexity of token sequences (each starting with its start token)."""
    nll, counts = token_nll(model, sequences, batch_size, _pad_id(tokenizer), progress)
    tokens = int(counts.sum())
    if tokens == 0:
        raise EvaluationError("Perplexity needs at least one text with one token; the texts given are empty.")
    return float(torch.exp(nll.sum() / tokens))


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_tokens: int | None = None,
               progress: bool = False) -> float:
    """Token-weighted perplexity of ``texts`` (start token + text, truncated to the model's positions)."""
    return perplexity_of(model, tokenizer, texts_sequences(model, tokenizer, texts, max_tokens), batch_size, progress)


def task_perplexity(model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 16,
                    progress: bool = False) -> float:
    """Perplexity on a task's evaluation sequences (:func:`evaluation_sequences`)."""
    return perplexity_of(model, tokenizer, evaluation_sequences(model, tokenizer, task, examples), batch_size, progress)


def check_same_vocabulary(reference: Any, model: Any) -> None:
    """KL compares distributions token by token, so both models must share one vocabulary."""
    a, b = reference.config.vocab_size, model.config.vocab_size
    if a != b:
        raise EvaluationError(
            f"KL(original || pruned) needs two models sharing a tokenizer, but their vocabularies differ ({a} vs "
            f"{b} tokens); pass the model the pruned checkpoint was made from as --reference."
        )


@torch.no_grad()
def kl_divergence(
    reference: Any, model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8, pad_id: int = 0,
    progress: bool = False,
) -> float:
    """Mean per-token KL(reference || model) in nats of the next-token distributions, teacher-forced on
    ``sequences`` (every position that predicts a real token counts once)."""
    check_same_vocabulary(reference, model)
    total, tokens = 0.0, 0
    states = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        count = -(-len(sequences) // batch_size)
        for _, ids, mask in _progress(padded_batches(sequences, batch_size, pad_id), "kl", progress, count):
            valid = mask[:, 1:].bool()
            p = torch.log_softmax(_logits(reference, ids, mask)[:, :-1][valid], dim=-1)
            q = torch.log_softmax(_logits(model, ids, mask)[:, :-1][valid], dim=-1)
            total += float((p.exp() * (p - q)).sum(-1).double().sum())
            tokens += int(valid.sum())
    finally:
        reference.train(states[0])
        model.train(states[1])
    if tokens == 0:
        raise EvaluationError("KL needs at least one text with one token; the texts given are empty.")
    return max(total / tokens, 0.0)


def task_kl(reference: Any, model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int = 8,
            progress: bool = False) -> float:
    """KL(reference || model) on the task's evaluation sequences (:func:`evaluation_sequences`)."""
    sequences = evaluation_sequences(model, tokenizer, task, examples)
    return kl_divergence(reference, model, sequences, batch_size, _pad_id(tokenizer), progress)


# ------------------------------------------------------------------------------------------------ latency


def measure_latency(model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], batch_size: int,
                    warmup: int = 2) -> float:
    """Milliseconds per example to score ``examples`` (labels, or perplexity for text tasks), after warm-up."""
    def score(chunk: Sequence[Any], size: int) -> None:
        if task.is_text_task:
            sequences = evaluation_sequences(model, tokenizer, task, chunk)
            token_nll(model, sequences, size, _pad_id(tokenizer))
        else:
            label_logprobs(model, tokenizer, task, chunk, size)

    for example in examples[:warmup]:
        score([example], 1)
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        score(examples[i : i + batch_size], batch_size)
    return (time.perf_counter() - start) * 1000 / max(1, len(examples))


__all__ = [
    "check_prompt_fits",
    "continuation_logprobs",
    "evaluation_sequences",
    "is_causal",
    "kl_divergence",
    "label_distribution",
    "label_logprobs",
    "max_positions",
    "measure_latency",
    "padded_batches",
    "perplexity",
    "task_kl",
    "task_perplexity",
    "token_nll",
]
