"""Training batches of a recovery run: text-to-text pairs for encoder-decoders, prompt + label for causal LMs.

A causal LM is scored on a classification task by the log-likelihood of each label's continuation after the task's
decoder prompt (:mod:`uncurl_hf.evaluation.causal`). Recovery trains on exactly those token ids: the prompt of
:func:`~uncurl_hf.evaluation.prompts.prompt_ids` (same template, same truncation of the text, same start token),
then the gold label's :func:`~uncurl_hf.evaluation.prompts.continuation_ids`. The loss covers the label tokens only
(prompt and padding are ``-100``): the model is taught to put its mass on the right answer where scoring reads it,
not to reproduce review text. Sequences are right-padded with an attention mask, as scoring pads them, so a real
token never attends to padding and keeps its position.

Both kinds cycle shuffled epochs (seeded by ``RecoverConfig.seed``) until exactly ``config.steps`` batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from uncurl_hf.errors import RecoveryError
from uncurl_hf.recover.config import RecoverConfig

IGNORE_INDEX = -100  # label positions the cross-entropy skips (transformers' convention)


def training_batches(
    tokenizer: Any, examples: list, config: RecoverConfig, *, causal: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``config.steps`` batches: shuffled epochs over ``examples`` (seeded), repeated as often as needed.

    ``causal``: prompt + label batches for a decoder (:func:`causal_pairs`); else the zoo recipe's text-to-text
    batches (:func:`~uncurl_hf.zoo.recipe.task_batches`, sources truncated to ``config.max_length``).
    """
    if not examples:
        raise RecoveryError(f"Task {config.task!r} has no training examples; recovery needs its train split.")
    rng = random.Random(config.seed)
    if causal:
        from uncurl_hf.evaluation.tasks import get_task

        pairs = causal_pairs(tokenizer, get_task(config.task), examples)
        pad = pad_id(tokenizer)

        def epoch() -> Iterator[dict[str, torch.Tensor]]:
            return causal_batches(pairs, config.batch_size, rng, pad)
    else:
        from uncurl_hf.zoo.recipe import task_batches

        def epoch() -> Iterator[dict[str, torch.Tensor]]:
            return task_batches(tokenizer, examples, config.batch_size, rng, config.max_length)

    produced = 0
    while True:
        for batch in epoch():
            if produced == config.steps:
                return
            produced += 1
            yield batch


def causal_pairs(tokenizer: Any, task: Any, examples: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, gold label continuation ids)`` per example: the very ids label scoring reads."""
    from uncurl_hf.evaluation.causal import task_prompt
    from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids

    template = task_prompt(task)
    conts = continuation_ids(tokenizer, template)
    empty = sorted(label for label, ids in conts.items() if not ids)
    if empty:
        raise RecoveryError(
            f"The {task.name!r} prompt's continuation of label(s) {empty} tokenizes to no tokens, so there is nothing "
            "to train on; give those labels a non-empty continuation in uncurl_hf.evaluation.prompts.PROMPTS."
        )
    pairs = []
    for example in examples:
        if example.target not in conts:
            raise RecoveryError(
                f"A {task.name!r} training example has target {example.target!r}, which is none of the task's labels "
                f"{sorted(conts)}; a causal LM is trained on label continuations only."
            )
        pairs.append((prompt_ids(tokenizer, template, task.raw_text(example.source)), conts[example.target]))
    return pairs


def causal_batches(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, rng: random.Random, pad: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled epoch of :func:`collate_causal` batches."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate_causal([pairs[i] for i in order[start : start + batch_size]], pad)


def collate_causal(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``; ``labels`` are the continuation tokens, ``-100`` elsewhere.

    ``labels`` are aligned with ``input_ids`` (transformers' causal LM loss shifts them by one itself).
    """
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(pairs):
        sequence = [*prompt, *continuation]
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = torch.tensor(list(continuation), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    """The padding id (the tokenizer's pad, else EOS, else 0): masked out, so any valid id would do."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


__all__ = ["IGNORE_INDEX", "causal_batches", "causal_pairs", "collate_causal", "pad_id", "training_batches"]
