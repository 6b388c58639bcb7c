"""Calibration data: sources -> examples -> batches.

A calibration spec names exactly ONE source (:func:`calibration_examples`): a registered task, a file or folder
(:func:`load_calibration_file`: ``.txt``, ``.jsonl``, ``.parquet``, ``.arrow``, ``.csv``, a ``save_to_disk``
folder), or, from Python, the data itself (texts, rows, a ``datasets.Dataset``). When a source holds more than
``num_examples`` examples, a seeded sample of them is kept: ``random.Random(seed).sample``, so a task, a ``.txt``
and a ``.jsonl`` give the examples they always gave. :func:`build_batches` then tokenizes the examples into the
padded batches :func:`~uncurl_hf.calibration.run.calibrate` forwards.

``.txt`` and ``.jsonl`` are parsed here, line by line, so that an error names its line; what ``datasets`` reads is
read by ``datasets`` (:mod:`uncurl_hf.calibration.tables`). Every row-shaped source means the same by its fields
(:mod:`uncurl_hf.calibration.rows`). Every error is a :class:`CalibrationDataError` whose message names the fix.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uncurl_hf.calibration.rows import choose_fields, row_example
from uncurl_hf.calibration.run import Batch
from uncurl_hf.calibration.tables import (
    TABLE_BUILDERS,
    is_dataset,
    open_table,
    pick_split,
    read_dataset_folder,
    read_table_file,
    table_examples,
)
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.evaluation.prompts import prompted_examples
from uncurl_hf.evaluation.tasks import Example, get_task

logger = logging.getLogger(__name__)

_FORMATS = (
    "use .txt (one example per line), .jsonl (objects with a 'text' field and an optional 'target', or 'messages', "
    "or 'prompt' + 'completion'), .parquet, .arrow or .csv (a table with such columns), or a folder written by "
    "datasets' save_to_disk"
)


def calibration_examples(spec: Any, tokenizer: Any = None, causal: bool = False) -> list[Example]:
    """The examples of ``spec``'s one source, a seeded sample of ``spec.num_examples`` when there are more.

    ``spec`` is read by attribute (a :class:`~uncurl_hf.recipe.CalibrationSpec` or anything shaped like it):
    ``task``, ``file``, ``data`` (exactly one set), ``column``, ``target_column``, ``split``, ``num_examples``,
    ``seed``. ``tokenizer`` renders chat ``messages`` with its chat template (needed only for chats). ``causal``:
    a task's examples are put as the decoder prompt it is scored on (:func:`~uncurl_hf.evaluation.prompts.
    prompted_examples`); files and data are the user's text, used as given.
    """
    n, seed = int(spec.num_examples), int(spec.seed)
    if n < 1:
        raise CalibrationDataError(f"num_examples is {n}; calibrate on at least 1 example (256 is the default).")
    given = [name for name in ("task", "file", "data") if getattr(spec, name, None) is not None]
    if len(given) != 1:
        raise CalibrationDataError(
            "Give exactly one source of calibration data: a task (--task NAME), a file or datasets folder "
            f"(--calibration-file F), or, from Python, data=[...]; got {' and '.join(given) or 'none'}."
        )
    if spec.task is not None:
        examples = _task_examples(spec.task, n, seed, spec.split)
        return prompted_examples(get_task(spec.task), examples) if causal else examples
    column, target_column = spec.column, spec.target_column
    if spec.data is not None and is_dataset(spec.data):
        dataset = pick_split(spec.data, spec.split, "the calibration data")
        return _sampled_table(open_table(dataset, "the calibration data", column, target_column), tokenizer, n, seed)
    if spec.file is not None:
        path = _checked_path(spec.file)
        if path.is_dir() or path.suffix.lower() in TABLE_BUILDERS:
            table = open_table(_read_table(path, spec.split), str(path), column, target_column)
            return _sampled_table(table, tokenizer, n, seed)
        examples = load_calibration_file(path, tokenizer, column=column, target_column=target_column)
    else:
        examples = data_examples(spec.data, tokenizer, column=column, target_column=target_column)
    if len(examples) > n:
        examples = random.Random(seed).sample(examples, n)
    return examples


def load_calibration_file(
    path: str | Path,
    tokenizer: Any = None,
    *,
    column: str | None = None,
    target_column: str | None = None,
    split: str | None = None,
) -> list[Example]:
    """Every calibration example of a file or datasets folder, in file order.

    ``.txt``: one example per line, blank lines skipped. ``.jsonl``: one object per line (blank lines skipped) with
    a ``text`` (+ optional ``target``), a chat ``messages`` list (rendered with ``tokenizer``'s chat template) or a
    ``prompt`` (+ optional ``completion``); ``column``/``target_column`` name other fields. ``.parquet``, ``.arrow``,
    ``.csv`` and ``save_to_disk`` folders (``split`` of a ``DatasetDict``, default ``train``) are read by
    ``datasets``, with the same column rules. Raises :class:`CalibrationDataError` for a missing, unreadable,
    malformed or empty source.
    """
    path = _checked_path(path)
    if path.is_dir() or path.suffix.lower() in TABLE_BUILDERS:
        examples = table_examples(open_table(_read_table(path, split), str(path), column, target_column), tokenizer)
    else:
        text = _read_text(path)
        if path.suffix.lower() == ".jsonl":
            examples = _parse_jsonl(path, text, tokenizer, column, target_column)
        else:
            examples = _parse_txt(text)
    if not examples:
        raise CalibrationDataError(f"Calibration file {path} holds no examples; add at least one non-empty line.")
    logger.info("read %d calibration examples from %s", len(examples), path)
    return examples


def data_examples(
    data: Any, tokenizer: Any = None, *, column: str | None = None, target_column: str | None = None
) -> list[Example]:
    """Examples given from Python: a list of texts, a list of row dicts (fields as in ``.jsonl``), or a
    ``datasets.Dataset`` / ``DatasetDict`` (its ``train`` split)."""
    if is_dataset(data):
        return table_examples(open_table(pick_split(data, None, "the calibration data"), "the calibration data",
                                         column, target_column), tokenizer)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise CalibrationDataError(
            f"Calibration data is a {type(data).__name__}; give a list of texts, a list of dicts (with 'text', "
            "'messages' or 'prompt'), or a datasets.Dataset."
        )
    if not data:
        raise CalibrationDataError("The calibration data is an empty list; give at least one example.")
    if all(isinstance(item, str) for item in data):
        blank = next((i for i, item in enumerate(data) if not item.strip()), None)
        if blank is not None:
            raise CalibrationDataError(f"data[{blank}] is an empty text; drop it or give the example's text.")
        return [Example(item.strip()) for item in data]
    if all(isinstance(item, Mapping) for item in data):
        examples = []
        for index, row in enumerate(data):
            where = f"data[{index}]"
            fields = choose_fields(row.keys(), column, target_column, where, kind="field")
            examples.append(row_example(row, fields, tokenizer, where))
        return examples
    kinds = sorted({type(item).__name__ for item in data})
    raise CalibrationDataError(
        f"Calibration data mixes {', '.join(kinds)}; give a list of texts only or a list of dicts only."
    )


def build_batches(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[Batch]:
    """Tokenize ``Example(source, target)`` pairs into padded batches for :func:`calibrate`.

    When any example has a target, every batch carries ``labels`` (padding = -100) and
    ``decoder_attention_mask`` so decoder layers are calibrated on the task's real target tokens.
    """
    if not examples:
        raise CalibrationDataError("No calibration examples; give a task with data or a non-empty file.")
    with_targets = any(example.target for example in examples)
    batches: list[Batch] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer(
            [example.source for example in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch: Batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if with_targets:
            target = tokenizer(
                [example.target for example in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
            batch["labels"] = labels
            batch["decoder_attention_mask"] = target["attention_mask"]
        batches.append(batch)
    return batches


def _task_examples(name: str, n: int, seed: int, split: str | None) -> list[Example]:
    """A registered task's seeded calibration sample (its ``train`` split unless ``split`` says otherwise)."""
    task = get_task(name)
    examples = task.calibration_examples(n, seed) if split is None else task.calibration_examples(n, seed, split)
    if not examples:
        raise CalibrationDataError(f"Task {name!r} returned no calibration examples.")
    return examples


def _sampled_table(table: Any, tokenizer: Any, n: int, seed: int) -> list[Example]:
    """The seeded sample of a table's examples, converting only the sampled rows.

    ``random.Random(seed).sample`` picks positions from the population's length alone, so sampling row indices
    gives exactly the examples that sampling the list of every row's example would (each row is one example).
    """
    rows = random.Random(seed).sample(range(len(table)), n) if len(table) > n else None
    return table_examples(table, tokenizer, rows)


def _checked_path(path: str | Path) -> Path:
    """``path`` when it names a readable source: an existing file of a known format, or a folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise CalibrationDataError(f"Calibration file {path} does not exist; check the path.")
    if path.is_dir():
        return path
    if suffix not in (".txt", ".jsonl", *TABLE_BUILDERS):
        raise CalibrationDataError(f"Calibration file {path} has extension {path.suffix or '(none)'}; {_FORMATS}.")
    if not path.is_file():
        raise CalibrationDataError(f"Calibration file {path} is not a regular file.")
    return path


def _read_table(path: Path, split: str | None) -> Any:
    return read_dataset_folder(path, split) if path.is_dir() else read_table_file(path)


def _read_text(path: Path) -> str:
    """The UTF-8 text of a ``.txt`` / ``.jsonl`` file, refused when it is not text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"Calibration file {path} is not UTF-8 text ({exc.reason}); re-encode it.") from exc
    except OSError as exc:
        raise CalibrationDataError(f"Cannot read calibration file {path}: {exc.strerror or exc}.") from exc
    if _looks_binary(text):
        raise CalibrationDataError(
            f"Calibration file {path} looks binary (NUL or control characters), not text; give a UTF-8 .txt file "
            "with one example per line or a .jsonl file with a 'text' field per line."
        )
    return text


def _looks_binary(text: str) -> bool:
    """NUL bytes, or more than 10% control characters other than whitespace: not natural-language text."""
    if "\x00" in text:
        return True
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f\v")
    return control > 0.1 * max(len(text), 1)


def _parse_txt(text: str) -> list[Example]:
    return [Example(line.strip()) for line in text.splitlines() if line.strip()]


def _parse_jsonl(
    path: Path, text: str, tokenizer: Any, column: str | None, target_column: str | None
) -> list[Example]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CalibrationDataError(
                f"{where}: not valid JSON ({exc}); fix or remove that line (one JSON object per line)."
            ) from exc
        if not isinstance(row, dict):
            raise CalibrationDataError(
                f"{where}: each line must be a JSON object with a non-empty string field 'text' (or 'messages', or "
                "'prompt')."
            )
        fields = choose_fields(row.keys(), column, target_column, where, kind="field")
        examples.append(row_example(row, fields, tokenizer, where))
    return examples
