"""Prompt templates of the decoder zoo (defined in :mod:`uncurl_hf.evaluation.prompts`), and label scoring by
continuation log-likelihood.

A task is solved by prompting: ``Review: <text>\\nSentiment:`` is followed by each label's continuation
(`` positive`` / `` negative``) and the label whose tokens have the highest summed log-likelihood wins, as
lm-eval's ``multiple_choice`` tasks score ``acc``. The instruction stage of the decoder recipe trains on exactly
these token sequences (:func:`prompt_ids`), and evaluation scores exactly them, so the two can never drift apart.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

# The templates and their token ids live with evaluation, which scores exactly what the instruction stage trains on.
from uncurl_hf.evaluation.prompts import continuation_ids, get_prompt, prompt_ids


@torch.no_grad()
def label_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, texts: list[str], batch_size: int = 64
) -> tuple[tuple[str, ...], torch.Tensor]:
    """``(labels, scores)``: ``scores[i, j]`` = summed log-likelihood of label ``j``'s continuation after text ``i``."""
    tpl = get_prompt(task)
    conts = continuation_ids(tokenizer, task)
    labels = tpl.labels
    rows = []  # (example, label index, ids, number of continuation tokens)
    for i, text in enumerate(texts):
        ids = prompt_ids(tokenizer, task, text)
        for j, label in enumerate(labels):
            rows.append((i, j, ids + conts[label], len(conts[label])))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))
    scores = torch.zeros(len(texts), len(labels), dtype=torch.float64)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (_, _, seq, _) in enumerate(chunk):
            ids[k, : len(seq)] = torch.tensor(seq)
            mask[k, : len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for k, (i, j, seq, n) in enumerate(chunk):
            pos = torch.arange(len(seq) - n - 1, len(seq) - 1)
            scores[i, j] = logp[k, pos, torch.tensor(seq[-n:])].double().sum()
    model.train(was_training)
    return labels, scores


def prompted_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, rows: list[tuple[str, str]]
) -> float:
    """Accuracy of the highest-likelihood label over ``(text, label)`` rows."""
    labels, scores = label_logprobs(model, tokenizer, task, [text for text, _ in rows])
    pred = scores.argmax(1).tolist()
    return sum(labels[p] == gold for p, (_, gold) in zip(pred, rows)) / max(1, len(rows))
