"""Prompt templates: how a classification task is put to a causal LM, in one place for training and evaluation.

A decoder solves a task by prompting: ``Review: <text>\\nSentiment:`` is followed by each label's continuation
(`` positive`` / `` negative``) and the label whose tokens have the highest summed log-likelihood wins, as
lm-eval's ``multiple_choice`` tasks score ``acc``. The zoo's instruction stage trains on exactly the token ids
:func:`prompt_ids` returns and evaluation (:mod:`uncurl_hf.evaluation.causal`) scores exactly them, so training and
scoring cannot drift apart; that is why the templates live here and :mod:`uncurl_hf.zoo.prompts` imports them.

Token ids are built piece by piece (start token, prefix, text, suffix, continuation), each piece tokenized without
special tokens: a tokenizer that appends ``</s>`` to every text (T5-style post-processors) would otherwise put an
end-of-text token between the prompt and its answer. The start token is the tokenizer's BOS, or its EOS when it has
no BOS (the document separator the model saw in pretraining; lm-eval's ``prefix_token_id`` makes the same choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from uncurl_hf.errors import PromptError

GENERIC_SUFFIX = "\nAnswer:"




@dataclass(frozen=True)
class PromptTemplate:
    """``prefix`` + text (at most ``max_text_tokens`` tokens) + ``suffix``, then one of ``continuations``.

    ``example`` is a short input shown in model cards' usage code (never scored).
    """

    task: str
    prefix: str
    suffix: str
    continuations: dict[str, str]  # task label -> continuation text (leading space)
    max_text_tokens: int = 112
    example: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self.continuations))

    def render(self, text: str, label: str | None = None) -> str:
        """The prompt as plain text (for display and for calibration files)."""
        out = (f"{self.prefix} " if self.prefix else "") + f"{text.strip()}{self.suffix}"
        return out + self.continuations[label] if label is not None else out


PROMPTS: dict[str, PromptTemplate] = {
    "sentiment": PromptTemplate(
        "sentiment", "Review:", "\nSentiment:", {"negative": " negative", "positive": " positive"},
        example="A charming, funny and clever film.",
    ),
    "topic": PromptTemplate(
        "topic",
        "Article:",
        "\nTopic:",
        {
            "business": " business",
            "entertainment": " entertainment",
            "politics": " politics",
            "sports": " sport",
            "tech": " technology",
        },
        example="Shares rose after the company reported record profits for the year.",
    ),
    "hedge": PromptTemplate(
        "hedge", "Sentence:", "\nCertainty:", {"certain": " certain", "uncertain": " uncertain"},
        example="These results suggest that the protein may be involved in the response.",
    ),
}


def get_prompt(task: str) -> PromptTemplate:
    """The registered template of ``task`` (:class:`PromptError` naming the tasks that have one)."""
    try:
        return PROMPTS[task]
    except KeyError:
        raise PromptError(f"no decoder prompt for task {task!r}; prompts exist for {sorted(PROMPTS)}") from None


def generic_prompt(name: str, labels: Sequence[str], prefix: str = "") -> PromptTemplate:
    """A template for a classification task registered without one: ``<prefix> <text>\\nAnswer: <label>``.

    Lets any registered task (and the tests' tiny ones) be scored on a causal LM; a task the model was trained on
    deserves its own entry in :data:`PROMPTS`, since a model scores best on the wording it learned.
    """
    return PromptTemplate(name, prefix.strip(), GENERIC_SUFFIX, {label: f" {label}" for label in labels})


def prompt_for_task(task: Any) -> PromptTemplate | None:
    """The decoder prompt of a :class:`~uncurl_hf.evaluation.tasks.Task`: its registered template, a generic one
    for other classification tasks, ``None`` for tasks without labels (scored by perplexity or generation)."""
    if task.name in PROMPTS:
        template = PROMPTS[task.name]
        missing = sorted(set(task.labels) - set(template.continuations))
        if missing:
            raise PromptError(
                f"The prompt of task {task.name!r} has no continuation for label(s) {missing}; add them to "
                "uncurl_hf.evaluation.prompts.PROMPTS."
            )
        return template
    if not task.labels:
        return None
    return generic_prompt(task.name, task.labels, task.prefix)


def prompted_examples(task: Any, examples: Sequence[Any]) -> list[Any]:
    """A task's examples as a causal LM sees the task: ``Example(prompt, continuation)`` (e.g. ``Review: <text>
    \nSentiment:`` then `` positive``), for calibrating a decoder on the tokens it is scored and prompted on.

    A seq2seq example (``sentiment: <text>`` -> ``positive``) routes a decoder's tokens differently from the prompt
    evaluation, the Space and lm-eval put to it, so a plan calibrated on it is computed on the wrong routing.
    Tasks without a prompt (no labels) and examples whose target is not a label are returned as they are.
    """
    from uncurl_hf.evaluation.tasks import Example

    template = prompt_for_task(task)
    if template is None:
        return list(examples)
    return [
        Example(template.render(task.raw_text(e.source)), template.continuations[e.target])
        if e.target in template.continuations else e
        for e in examples
    ]


def _template(task: str | PromptTemplate) -> PromptTemplate:
    return task if isinstance(task, PromptTemplate) else get_prompt(task)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def start_ids(tokenizer: Any) -> list[int]:
    """The token every sequence starts with: BOS, else EOS (the document separator), else nothing."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def prompt_ids(tokenizer: Any, task: str | PromptTemplate, text: str) -> list[int]:
    """Token ids of the prompt: start token + prefix + text (truncated to ``max_text_tokens``) + suffix."""
    tpl = _template(task)
    body = _ids(tokenizer, text.strip())[: tpl.max_text_tokens]
    prefix = _ids(tokenizer, tpl.prefix) if tpl.prefix else []
    return start_ids(tokenizer) + prefix + body + _ids(tokenizer, tpl.suffix)


def continuation_ids(tokenizer: Any, task: str | PromptTemplate) -> dict[str, list[int]]:
    """Label -> token ids of its continuation."""
    return {label: _ids(tokenizer, cont) for label, cont in _template(task).continuations.items()}


def text_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """Start token + the text's tokens (at most ``max_tokens``): a sequence scored by perplexity."""
    return start_ids(tokenizer) + _ids(tokenizer, text)[:max_tokens]


def max_prompt_length(tokenizer: Any, task: str | PromptTemplate) -> int:
    """The longest sequence the template can produce: a full-length text followed by the longest continuation."""
    tpl = _template(task)
    fixed = len(prompt_ids(tokenizer, tpl, ""))
    return fixed + tpl.max_text_tokens + max((len(ids) for ids in continuation_ids(tokenizer, tpl).values()), default=0)


__all__ = [
    "PROMPTS",
    "PromptTemplate",
    "continuation_ids",
    "generic_prompt",
    "get_prompt",
    "max_prompt_length",
    "prompt_for_task",
    "prompt_ids",
    "start_ids",
    "text_ids",
]
