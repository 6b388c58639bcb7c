"""Teacher-forced next-token metrics of a batch of causal LMs: KL(original || pruned) and each model's perplexity.

The numbers are evaluation's (:func:`uncurl_hf.evaluation.causal.task_kl` and
:func:`~uncurl_hf.evaluation.causal.task_perplexity`, on :func:`~uncurl_hf.evaluation.causal.evaluation_sequences`:
each example's task prompt followed by its gold label), computed here chunk by chunk only so that a request can stop
at its time budget between chunks. Both are token-weighted means, so chunks recombine exactly: a chunk's KL and log
perplexity are weighted by its predicted tokens (every token after the first of each sequence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from uncurl_hf.evaluation import causal
from uncurl_hf.evaluation.tasks import Example, Task
from uncurl_hf.space.limits import Deadline
from uncurl_hf.space.models import LoadedModel

CHUNK = 16  # examples per evaluation call: one deadline check per chunk, a few forwards each


def _predicted_tokens(loaded: LoadedModel, task: Task, examples: Sequence[Example]) -> int:
    sequences = causal.evaluation_sequences(loaded.model, loaded.tokenizer, task, examples)
    return sum(max(len(sequence) - 1, 0) for sequence in sequences)


def token_metrics(
    original: LoadedModel, pruned: LoadedModel, task: Task, examples: Sequence[Example], deadline: Deadline
) -> dict[str, Any]:
    """``{"kl_tokens": nats, "perplexity": {"original", "pruned"}, "scored_tokens": N}`` over ``examples``.

    Runs two forwards per example and model (KL needs both models' logits, perplexity each model's), so it costs
    about as much as scoring the labels again; ``compare_batch(..., token_metrics=False)`` skips it.
    """
    causal.check_same_vocabulary(original.model, pruned.model)
    kl_sum, tokens = 0.0, 0
    nll = {"original": 0.0, "pruned": 0.0}
    for start in range(0, len(examples), CHUNK):
        deadline.check(f"after KL and perplexity of {start} of {len(examples)} examples")
        chunk = examples[start : start + CHUNK]
        count = _predicted_tokens(original, task, chunk)
        if count == 0:
            continue
        kl_sum += causal.task_kl(original.model, pruned.model, original.tokenizer, task, chunk) * count
        for side, loaded in (("original", original), ("pruned", pruned)):
            nll[side] += math.log(causal.task_perplexity(loaded.model, loaded.tokenizer, task, chunk)) * count
        tokens += count
    if tokens == 0:
        return {"kl_tokens": None, "perplexity": {"original": None, "pruned": None}, "scored_tokens": 0}
    return {
        "kl_tokens": round(max(kl_sum / tokens, 0.0), 6),
        "perplexity": {side: round(math.exp(value / tokens), 4) for side, value in nll.items()},
        "scored_tokens": tokens,
    }
