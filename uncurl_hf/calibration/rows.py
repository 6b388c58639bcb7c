"""One row of calibration data -> one :class:`~uncurl_hf.evaluation.tasks.Example`.

Rows come from ``.jsonl`` lines, Python dicts and ``datasets`` tables alike, so the three agree on what a row means:

* ``text`` (+ optional ``target``): the model input and, for an encoder-decoder, the decoder's text; both are
  stripped, as ``.txt`` lines always were;
* ``messages``: a chat (``[{"role": ..., "content": ...}, ...]``, the OpenAI / Hugging Face format), rendered with
  the tokenizer's own chat template so the model is calibrated on the text it sees in use; kept verbatim;
* ``prompt`` + optional ``completion``: kept verbatim (a completion's leading space is a token of its own to most
  BPE tokenizers).

The source field is the one asked for, else the first of ``text``, ``messages``, ``prompt`` present; the target
field is the one asked for, else ``target`` (``completion`` first for a ``prompt``; any other source column takes
the first of ``target``, ``completion``). ``text`` does not pick up a ``completion`` field, as it never did.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.evaluation.tasks import Example

SOURCE_FIELDS = ("text", "messages", "prompt")
_TARGET_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("target",),
    "messages": ("target",),
    "prompt": ("completion", "target"),
}
_ANY_TARGET = ("target", "completion")
_VERBATIM = ("prompt",)  # source fields whose text (and target) are kept as given, not stripped


@dataclass(frozen=True)
class Fields:
    """Which field of a row is the model input (``source``) and which, if any, its target."""

    source: str
    target: str | None = None

    @property
    def verbatim(self) -> bool:
        """Prompt/completion rows keep their whitespace; text rows are stripped like ``.txt`` lines."""
        return self.source in _VERBATIM


def choose_fields(
    available: Collection[str], column: str | None, target_column: str | None, where: str, kind: str = "column"
) -> Fields:
    """The fields to read from rows with ``available`` fields (a table's columns, or one row's keys).

    Raises :class:`CalibrationDataError` listing ``available`` when the asked-for (or any default) source field is
    missing, or when an asked-for target field is.
    """
    names = sorted(available, key=str)
    listed = ", ".join(repr(name) for name in names) or "none"
    if column is None:
        source = next((name for name in SOURCE_FIELDS if name in available), None)
        if source is None:
            raise CalibrationDataError(
                f"{where}: no {kind} 'text', 'messages' or 'prompt' ({kind}s: {listed}); name the {kind} that holds "
                "the model input with the calibration spec's column (--calibration-column NAME), or rename it."
            )
    elif column not in available:
        raise CalibrationDataError(
            f"{where}: no {kind} {column!r} ({kind}s: {listed}); set the calibration spec's column "
            "(--calibration-column) to one of them."
        )
    else:
        source = column
    if target_column is None:
        defaults = _TARGET_FIELDS.get(source, _ANY_TARGET)
        return Fields(source, next((name for name in defaults if name in available and name != source), None))
    if target_column not in available:
        raise CalibrationDataError(
            f"{where}: no {kind} {target_column!r} for the target ({kind}s: {listed}); set the calibration spec's "
            "target_column (--calibration-target-column) to one of them, or leave it unset."
        )
    return Fields(source, target_column)


def row_example(row: Mapping[str, Any], fields: Fields, tokenizer: Any, where: str) -> Example:
    """The example of one row: its source field (text, or a chat rendered with ``tokenizer``) and its target."""
    value = row.get(fields.source)
    if fields.source == "messages" or isinstance(value, list):
        source = render_chat(value, tokenizer, f"{where}, field {fields.source!r}")
    elif isinstance(value, str) and value.strip():
        source = value if fields.verbatim else value.strip()
    else:
        raise CalibrationDataError(
            f"{where}: the model input {fields.source!r} must be a non-empty string (or a list of chat messages); "
            "fix or drop that row."
        )
    target = "" if fields.target is None else row.get(fields.target)
    if target is None:
        target = ""
    if not isinstance(target, str):
        raise CalibrationDataError(f"{where}: {fields.target!r} must be a string (the target text); fix that row.")
    return Example(source, target if fields.verbatim else target.strip())


def render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    """``messages`` rendered by ``tokenizer``'s chat template (the text the model reads in a conversation)."""
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        raise CalibrationDataError(
            f"{where}: a chat must be a non-empty list of {{'role': ..., 'content': ...}} messages; fix that row."
        )
    if tokenizer is None:
        raise CalibrationDataError(
            f"{where}: chat messages need a tokenizer to render them with its chat template; pass the model's "
            "tokenizer (calibration_examples(spec, tokenizer)), or give the rows as 'text'."
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationDataError(
            f"{where}: the tokenizer has no chat template (tokenizer.chat_template is None), so chat messages cannot "
            "be rendered; use the model's chat/instruct tokenizer, set tokenizer.chat_template to a Jinja template, "
            "or give the rows as 'text' (rendered as you want them)."
        )
    try:
        rendered = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    except Exception as exc:  # jinja errors (a template's raise_exception, a missing key) are the data's problem
        raise CalibrationDataError(
            f"{where}: the tokenizer's chat template failed on these messages ({type(exc).__name__}: {exc}); fix the "
            "messages (roles and order the template accepts) or the template."
        ) from exc
    if not isinstance(rendered, str) or not rendered.strip():
        raise CalibrationDataError(f"{where}: the chat template rendered these messages as empty text; fix the row.")
    return rendered
