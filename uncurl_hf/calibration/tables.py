"""Calibration data that ``datasets`` reads: ``.parquet`` / ``.arrow`` / ``.csv`` files, folders written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, and ``datasets.Dataset`` objects given from Python.

``datasets`` is the reader (nothing here parses a format it parses); files are read through its packaged builders
with a throw-away cache folder and kept in memory, so nothing is left in the user's cache. A table is turned into
examples row by row (:mod:`uncurl_hf.calibration.rows`) after its columns are chosen once, and only the rows a
seeded sample keeps are converted (:func:`table_examples`): rendering a million chats to keep 256 would be waste.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uncurl_hf.calibration.rows import Fields, choose_fields, row_example
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.evaluation.tasks import Example

logger = logging.getLogger(__name__)

# file suffix -> the ``datasets`` packaged builder that reads it (the arrow builder reads the stream and file formats)
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


@dataclass(frozen=True)
class Table:
    """A ``datasets.Dataset`` to calibrate on, where it came from (for messages), and the fields to read."""

    dataset: Any
    origin: str
    fields: Fields

    def __len__(self) -> int:
        return len(self.dataset)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is installed with the test extra
        raise CalibrationDataError(
            "Reading .parquet/.arrow/.csv files and datasets folders needs the `datasets` package: "
            "pip install datasets."
        ) from exc
    return datasets


def read_table_file(path: Path) -> Any:
    """A ``.parquet`` / ``.arrow`` / ``.csv`` file as an in-memory ``datasets.Dataset``."""
    datasets = _datasets()
    builder = TABLE_BUILDERS[path.suffix.lower()]
    try:
        with tempfile.TemporaryDirectory(prefix="uncurl-calibration-") as cache:
            return datasets.load_dataset(
                builder, data_files=[str(path)], split="train", cache_dir=cache, keep_in_memory=True
            )
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # datasets' way of saying the table has no rows
            raise _unreadable(path, builder, exc) from exc
        raise CalibrationDataError(f"{path} holds no rows; give calibration data with at least one example.") from exc
    except Exception as exc:  # pyarrow / datasets errors on a malformed file
        raise _unreadable(path, builder, exc) from exc


def _unreadable(path: Path, builder: str, exc: Exception) -> CalibrationDataError:
    """The error for a file ``datasets`` could not read as ``builder``."""
    return CalibrationDataError(
        f"Cannot read calibration file {path} as {builder} ({type(exc).__name__}: {exc}); check that it is a "
        f"valid {path.suffix} file."
    )


def read_dataset_folder(path: Path, split: str | None) -> Any:
    """A folder written by ``save_to_disk``: its ``Dataset``, or the ``split`` (default ``train``) of a
    ``DatasetDict``."""
    datasets = _datasets()
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise CalibrationDataError(
            f"Calibration folder {path} was not written by datasets' save_to_disk (no dataset_info.json or "
            "dataset_dict.json); give a file (.txt, .jsonl, .parquet, .arrow, .csv) or save the data with "
            "Dataset.save_to_disk."
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CalibrationDataError(
            f"Cannot load the datasets folder {path} ({type(exc).__name__}: {exc}); save it again with save_to_disk."
        ) from exc
    return pick_split(loaded, split, str(path))


def pick_split(data: Any, split: str | None, origin: str) -> Any:
    """``data`` itself when it is a ``Dataset``; the ``split`` (default ``train``) of a ``DatasetDict``."""
    datasets = _datasets()
    if not isinstance(data, datasets.DatasetDict):
        return data
    name = split or "train"
    if name not in data:
        raise CalibrationDataError(
            f"{origin} has no split {name!r} (splits: {', '.join(repr(s) for s in data)}); set the calibration spec's "
            "split (--calibration-split) to one of them."
        )
    return data[name]


def is_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` or ``DatasetDict`` (it cannot be one if ``datasets`` was never
    imported, so a list of texts does not pay for importing it)."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(data, (datasets.Dataset, datasets.DatasetDict))


def open_table(dataset: Any, origin: str, column: str | None, target_column: str | None) -> Table:
    """``dataset`` with its fields chosen once from its column names; an empty table is refused."""
    fields = choose_fields(dataset.column_names, column, target_column, origin)
    if len(dataset) == 0:
        raise CalibrationDataError(f"{origin} holds no rows; give calibration data with at least one example.")
    return Table(dataset, origin, fields)


def table_examples(table: Table, tokenizer: Any, rows: Sequence[int] | None = None) -> list[Example]:
    """The examples of ``rows`` (all when ``None``), in the given order."""
    columns = [table.fields.source] + ([table.fields.target] if table.fields.target else [])
    subset = table.dataset.select_columns(columns)
    indices = list(range(len(table))) if rows is None else list(rows)
    if rows is not None:
        subset = subset.select(indices)
    return [
        row_example(row, table.fields, tokenizer, f"{table.origin}, row {index}")
        for index, row in zip(indices, subset.to_list())
    ]
