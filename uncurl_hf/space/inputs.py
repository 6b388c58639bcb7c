"""What each kind of model is given for one input of the Space: the text label scoring sees, the generation prompt,
the tokens whose routing the heatmap shows, and where the generated tokens start.

An encoder-decoder (Switch) reads the task's source (``sentiment: <text>``) and generates from its decoder start
token. A causal LM (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss) is put the task through its decoder prompt
(``Review: <text>\\nSentiment:``, :mod:`uncurl_hf.evaluation.prompts`), exactly as evaluation scores it, and continues
its prompt. The generation prompt can also be the tokenizer's chat template (an instruct model answers a user turn)
or the plain text; either kind accepts all three formats, so the page has one code path.

Every check here raises :class:`~uncurl_hf.errors.SpaceInputError` with the message the page shows: a missing chat
template or a prompt that does not fit the model's positions is the user's to fix, not a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uncurl_hf.calibration.data import build_batches
from uncurl_hf.errors import PromptError, SpaceInputError
from uncurl_hf.evaluation import causal
from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids, start_ids
from uncurl_hf.evaluation.tasks import Example, Task
from uncurl_hf.space.models import LoadedModel

PROMPT_FORMATS: tuple[str, ...] = ("task", "chat", "plain")
DEFAULT_PROMPT_FORMAT = "task"
PROMPT_FORMAT_HELP = {
    "task": "the task's prompt (what label scoring sees)",
    "chat": "the input as a user turn of the tokenizer's chat template",
    "plain": "the input text alone",
}


@dataclass(frozen=True)
class GenerationPrompt:
    """The prompt one model generates from: as text (shown on the page) and as the token ids it is given."""

    format: str
    text: str
    ids: list[int]


def check_prompt_format(prompt_format: str | None) -> str:
    """``prompt_format`` if it is one of :data:`PROMPT_FORMATS` (``None``: the default), else a page message."""
    value = (prompt_format or DEFAULT_PROMPT_FORMAT).strip().lower()
    if value not in PROMPT_FORMATS:
        raise SpaceInputError(f"Unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}.")
    return value


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def check_label_prompt(loaded: LoadedModel, task: Task) -> None:
    """A causal LM must fit the task's longest prompt + label (evaluation's rule), else one message naming both."""
    if not loaded.is_causal:
        return
    try:
        causal.check_prompt_fits(loaded.model, loaded.tokenizer, task)
    except PromptError as exc:
        raise SpaceInputError(f"{loaded.path.name} cannot be compared on {task.name!r}: {exc}") from None


def label_input(loaded: LoadedModel, task: Task, source: str) -> str:
    """The text label scoring gives the model: the seq2seq source, or the decoder's rendered task prompt."""
    if not loaded.is_causal:
        return source
    return causal.task_prompt(task).render(task.raw_text(source))


def _chat_text(loaded: LoadedModel, text: str) -> str:
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise SpaceInputError(
            f"The tokenizer of {loaded.path.name} has no chat template (tokenizer.chat_template is None), so the "
            "input cannot be put as a chat turn. Pick the 'task' or 'plain' prompt format, or compare a chat/instruct "
            "checkpoint whose tokenizer has one."
        )
    try:
        return str(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True))
    except Exception as exc:  # noqa: BLE001 - a template's own error (Jinja, a required role) becomes one message
        raise SpaceInputError(f"The chat template of {loaded.path.name} failed on this input: {exc}") from None


def generation_prompt(loaded: LoadedModel, task: Task, source: str, text: str, prompt_format: str) -> GenerationPrompt:
    """The prompt ``loaded`` generates from for user ``text`` (``source``: the task's seq2seq input for it).

    ``task``: a seq2seq model reads ``source`` (truncated as in scoring); a causal LM continues the task's decoder
    prompt. ``chat``: the text as a user turn of the chat template (its own special tokens, nothing added).
    ``plain``: the text alone (a causal LM's start token first, as in perplexity).
    """
    tokenizer = loaded.tokenizer
    if prompt_format == "chat":
        rendered = _chat_text(loaded, text)
        return GenerationPrompt("chat", rendered, _ids(tokenizer, rendered))
    if not loaded.is_causal:
        shown = source if prompt_format == "task" else text
        ids = tokenizer(shown, truncation=True, max_length=task.max_source_tokens).input_ids
        return GenerationPrompt(prompt_format, shown, list(ids))
    if prompt_format == "task":
        template = causal.task_prompt(task)
        raw = task.raw_text(source)
        return GenerationPrompt("task", template.render(raw), prompt_ids(tokenizer, template, raw))
    return GenerationPrompt("plain", text, start_ids(tokenizer) + _ids(tokenizer, text))


def check_fits(loaded: LoadedModel, prompt: GenerationPrompt, new_tokens: int) -> None:
    """A causal LM must hold the prompt and the new tokens within its positions (``max_position_embeddings``):
    past them it gives garbage or an index error, not an answer."""
    limit = causal.max_positions(loaded.model) if loaded.is_causal else None
    needed = len(prompt.ids) + new_tokens
    if limit is not None and needed > limit:
        raise SpaceInputError(
            f"The {prompt.format} prompt is {len(prompt.ids)} tokens; with {new_tokens} new tokens it needs {needed} "
            f"positions, but {loaded.path.name} has max_position_embeddings={limit}. Shorten the input or pick "
            "another prompt format."
        )
    if not prompt.ids:
        raise SpaceInputError(f"The {prompt.format} prompt is empty for {loaded.path.name}; type some text.")


def generate_kwargs(loaded: LoadedModel, prompt: GenerationPrompt) -> dict[str, Any]:
    """``generate`` inputs for one prompt; a causal LM without a pad id gets its EOS (one sequence: never used)."""
    ids = torch.tensor([prompt.ids], dtype=torch.long)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = getattr(loaded.model, "generation_config", None)
    if loaded.is_causal and config is not None and config.pad_token_id is None:
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, Sequence):
            pad = next(iter(pad), None)
        if pad is not None:
            kwargs["pad_token_id"] = int(pad)
    return kwargs


def new_token_ids(loaded: LoadedModel, output: torch.Tensor, prompt: GenerationPrompt) -> torch.Tensor:
    """The generated tokens of a one-sequence ``generate`` output: a causal LM's output repeats its prompt first,
    a seq2seq one starts with the decoder start token."""
    return output[0, len(prompt.ids):] if loaded.is_causal else output[0, 1:]


def usage_batches(loaded: LoadedModel, task: Task, source: str, label: str) -> list[dict[str, torch.Tensor]]:
    """The tokens whose routing the heatmap shows: the input, teacher-forced on the predicted ``label``.

    A seq2seq model sees the source on the encoder and the label on the decoder (as calibration does); a causal LM
    sees the task prompt followed by the label's continuation, the very sequence label scoring runs.
    """
    if not loaded.is_causal:
        return build_batches([Example(source, label)], loaded.tokenizer, batch_size=1,
                             max_length=task.max_source_tokens)
    template = causal.task_prompt(task)
    ids = prompt_ids(loaded.tokenizer, template, task.raw_text(source)) + continuation_ids(loaded.tokenizer,
                                                                                          template)[label]
    tensor = torch.tensor([ids], dtype=torch.long)
    return [{"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}]
