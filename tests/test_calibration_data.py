"""Calibration sources -> examples: tasks, .txt, .jsonl (text / chat messages / prompt+completion), .parquet, .arrow,
.csv, save_to_disk folders and Python data; column choice, the seeded sample, and every error naming its fix.

Every file is real, written in ``tmp_path`` by ``datasets`` / ``pyarrow``; chats are rendered by a real
``PreTrainedTokenizerFast`` carrying a small Jinja chat template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa
import pytest
from helpers import tiny_tokenizer

from uncurl_hf.calibration.data import calibration_examples, data_examples, load_calibration_file
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.evaluation.tasks import Example, get_task

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "user", "content": "is it good ?"}, {"role": "assistant", "content": "yes"}]
RENDERED = "<user>is it good ?\n<assistant>yes\n"


@dataclass
class Spec:
    """Shaped like :class:`uncurl_hf.recipe.CalibrationSpec` (``calibration_examples`` reads attributes only)."""

    task: str | None = None
    file: Any = None
    column: str | None = None
    target_column: str | None = None
    split: str | None = None
    num_examples: int = 256
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    max_logit_samples: int = 4096
    data: Any = None


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, rows) -> Any:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_arrow(path, table: pa.Table, stream: bool) -> Any:
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


# ---- .txt and .jsonl (parsed here, line by line) -------------------------------------------------------------------


def test_txt_and_jsonl_text_rows(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n   \nsecond line\n", encoding="utf-8")
    assert load_calibration_file(txt) == [Example("first line"), Example("second line")]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x y", "target": "positive"}\n\n{"text": " z "}\n', encoding="utf-8")
    assert load_calibration_file(jsonl) == [Example("x y", "positive"), Example("z")]


def test_jsonl_chat_prompt_completion_and_text_rows(tmp_path, chat_tokenizer):
    """A chat is rendered with the tokenizer's template; prompt/completion are kept verbatim (their whitespace is
    tokenized); a text row does not take a 'completion' field for its target (it never did)."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": CHAT},
        {"prompt": "Q: 2 + 2 =", "completion": " 4"},
        {"prompt": "say hi"},
        {"text": "  plain  ", "completion": "ignored"},
    ])
    assert load_calibration_file(path, chat_tokenizer) == [
        Example(RENDERED), Example("Q: 2 + 2 =", " 4"), Example("say hi"), Example("plain"),
    ]


def test_jsonl_named_fields(tmp_path):
    path = write_jsonl(tmp_path / "named.jsonl", [{"sentence": " a b ", "label": "pos", "text": "not this"}])
    examples = load_calibration_file(path, column="sentence", target_column="label")
    assert examples == [Example("a b", "pos")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n  \n", "no examples"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
        ("notext.jsonl", '{"target": "x"}\n', r"line 1: no field 'text', 'messages' or 'prompt' \(fields: 'target'\)"),
        ("emptytext.jsonl", '{"text": "  "}\n', "line 1: the model input 'text' must be a non-empty string"),
        ("array.jsonl", '["text"]\n', "line 1: each line must be a JSON object"),
        ("badtarget.jsonl", '{"text": "a", "target": 3}\n', "line 1: 'target' must be a string"),
        ("badchat.jsonl", '{"messages": [{"content": "no role"}]}\n', "line 1, field 'messages': a chat must be"),
        ("data.xlsx", "a,b\n", r"use \.txt .*\.parquet, \.arrow or \.csv"),
        ("latin1.txt", b"caf\xe9\n", "not UTF-8"),
        ("binary.txt", b"\x00\x01\x02", "looks binary"),
    ],
)
def test_calibration_file_errors(tmp_path, chat_tokenizer, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=message):
        load_calibration_file(path, chat_tokenizer)


def test_chat_rows_need_a_tokenizer_with_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(CalibrationDataError, match="pass the model's tokenizer"):
        load_calibration_file(path)
    no_template = tiny_tokenizer()
    assert no_template.chat_template is None
    with pytest.raises(CalibrationDataError, match=r"no chat template \(tokenizer.chat_template is None\).*set "):
        load_calibration_file(path, no_template)
    with pytest.raises(CalibrationDataError, match="no chat template"):
        calibration_examples(Spec(file=str(path)), no_template)


def test_a_failing_chat_template_names_the_row(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(CalibrationDataError, match="line 1.*chat template failed.*roles must alternate"):
        load_calibration_file(path, tokenizer)


# ---- what datasets reads ------------------------------------------------------------------------------------------


def test_parquet_csv_and_arrow_files(tmp_path):
    table = datasets.Dataset.from_dict({"text": [" a b ", "c"], "target": ["pos", None], "extra": [1, 2]})
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.to_csv(str(tmp_path / "t.csv"), index=False)
    arrow = pa.table({"text": [" a b ", "c"], "target": ["pos", None]})
    expected = [Example("a b", "pos"), Example("c")]
    paths = [tmp_path / "t.parquet", tmp_path / "t.csv", write_arrow(tmp_path / "s.arrow", arrow, stream=True),
             write_arrow(tmp_path / "f.arrow", arrow, stream=False)]
    for path in paths:
        assert load_calibration_file(path) == expected, path
        assert calibration_examples(Spec(file=str(path))) == expected, path


def test_tabular_chat_and_prompt_columns(tmp_path, chat_tokenizer):
    chats = datasets.Dataset.from_dict({"messages": [CHAT, CHAT[:1]], "id": [0, 1]})
    chats.to_parquet(str(tmp_path / "chat.parquet"))
    assert load_calibration_file(tmp_path / "chat.parquet", chat_tokenizer) == [
        Example(RENDERED), Example("<user>is it good ?\n"),
    ]
    prompts = datasets.Dataset.from_dict({"prompt": ["Q: hi", "Q: bye"], "completion": [" A: hi", " A: bye"]})
    prompts.to_csv(str(tmp_path / "p.csv"), index=False)
    assert load_calibration_file(tmp_path / "p.csv") == [Example("Q: hi", " A: hi"), Example("Q: bye", " A: bye")]


def test_named_columns_of_a_table(tmp_path):
    table = datasets.Dataset.from_dict({"sentence": ["x y", "z"], "label": ["pos", "neg"], "text": ["no", "no"]})
    table.to_parquet(str(tmp_path / "t.parquet"))
    spec = Spec(file=str(tmp_path / "t.parquet"), column="sentence", target_column="label")
    assert calibration_examples(spec) == [Example("x y", "pos"), Example("z", "neg")]
    assert calibration_examples(Spec(file=spec.file)) == [Example("no"), Example("no")]  # default: 'text', no target


@pytest.mark.parametrize(
    "columns, message",
    [
        (dict(column="body"), r"no column 'body' \(columns: 'label', 'sentence'\).*--calibration-column"),
        (dict(column="sentence", target_column="answer"),
         r"no column 'answer' for the target \(columns: 'label', 'sentence'\).*--calibration-target-column"),
        ({}, r"no column 'text', 'messages' or 'prompt' \(columns: 'label', 'sentence'\)"),
    ],
)
def test_missing_columns_are_listed(tmp_path, columns, message):
    datasets.Dataset.from_dict({"sentence": ["x"], "label": ["y"]}).to_csv(str(tmp_path / "t.csv"), index=False)
    with pytest.raises(CalibrationDataError, match=message):
        calibration_examples(Spec(file=str(tmp_path / "t.csv"), **columns))


def test_table_errors(tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(CalibrationDataError, match="Cannot read calibration file .*garbage.parquet as parquet"):
        load_calibration_file(tmp_path / "garbage.parquet")
    datasets.Dataset.from_dict({"text": ["a", None, "c"]}).to_parquet(str(tmp_path / "hole.parquet"))
    with pytest.raises(CalibrationDataError, match="hole.parquet, row 1: the model input 'text' must be a non-empty"):
        load_calibration_file(tmp_path / "hole.parquet")
    datasets.Dataset.from_dict({"text": ["a"], "target": [3]}).to_parquet(str(tmp_path / "int.parquet"))
    with pytest.raises(CalibrationDataError, match="row 0: 'target' must be a string"):
        load_calibration_file(tmp_path / "int.parquet")
    empty = datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(CalibrationDataError, match="holds no rows"):
        load_calibration_file(tmp_path / "empty.parquet")


def test_save_to_disk_folders(tmp_path):
    train = datasets.Dataset.from_dict({"text": ["t1", "t2"]})
    validation = datasets.Dataset.from_dict({"text": ["v1"]})
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / "dict"))
    assert calibration_examples(Spec(file=str(tmp_path / "one"))) == [Example("t1"), Example("t2")]
    assert calibration_examples(Spec(file=str(tmp_path / "dict"))) == [Example("t1"), Example("t2")]
    assert calibration_examples(Spec(file=str(tmp_path / "dict"), split="validation")) == [Example("v1")]
    assert load_calibration_file(tmp_path / "dict", split="validation") == [Example("v1")]
    with pytest.raises(CalibrationDataError, match=r"no split 'test' \(splits: 'train', 'validation'\)"):
        calibration_examples(Spec(file=str(tmp_path / "dict"), split="test"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CalibrationDataError, match="not written by datasets' save_to_disk"):
        calibration_examples(Spec(file=str(tmp_path / "plain")))


# ---- data given from Python ---------------------------------------------------------------------------------------


def test_python_data(chat_tokenizer):
    assert calibration_examples(Spec(data=[" a ", "b"])) == [Example("a"), Example("b")]
    rows = [{"text": "a", "target": "t"}, {"messages": CHAT}, {"prompt": "p", "completion": " c"}]
    assert calibration_examples(Spec(data=rows), chat_tokenizer) == [
        Example("a", "t"), Example(RENDERED), Example("p", " c"),
    ]
    table = datasets.Dataset.from_dict({"q": ["x", "y"], "a": ["1", "2"]})
    spec = Spec(data=table, column="q", target_column="a")
    assert calibration_examples(spec) == [Example("x", "1"), Example("y", "2")]
    splits = datasets.DatasetDict({"train": table, "dev": table.select([1])})
    assert calibration_examples(Spec(data=splits, column="q", split="dev")) == [Example("y")]
    assert data_examples(splits, column="q") == [Example("x"), Example("y")]


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "empty list"),
        (["a", {"text": "b"}], "mixes dict, str"),
        ("just a string", "is a str; give a list of texts"),
        (["a", "  "], r"data\[1\] is an empty text"),
        ([{"text": "a"}, {"body": "b"}], r"data\[1\]: no field 'text', 'messages' or 'prompt' \(fields: 'body'\)"),
        ([{"messages": CHAT}], r"data\[0\], field 'messages': chat messages need a tokenizer"),
    ],
)
def test_python_data_errors(data, message):
    with pytest.raises(CalibrationDataError, match=message):
        calibration_examples(Spec(data=data))


# ---- one source, the seeded sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sources, message",
    [({}, "got none"), (dict(task="sentiment", data=["a"]), "got task and data"),
     (dict(file="a.txt", data=["a"]), "got file and data")],
)
def test_exactly_one_source(sources, message):
    with pytest.raises(CalibrationDataError, match=f"exactly one source.*{message}"):
        calibration_examples(Spec(**sources))


def test_at_least_one_example(tmp_path):
    with pytest.raises(CalibrationDataError, match="at least 1 example"):
        calibration_examples(Spec(data=["a"], num_examples=0))


def test_task_examples_are_the_tasks_own_seeded_sample():
    assert calibration_examples(Spec(task="sentiment", num_examples=7, seed=3)) == (
        get_task("sentiment").calibration_examples(7, 3)
    )
    assert calibration_examples(Spec(task="sentiment", num_examples=4, seed=1, split="dev")) == (
        get_task("sentiment").calibration_examples(4, 1, "dev")
    )


def test_a_decoder_calibrates_on_the_prompt_it_is_scored_on(tmp_path):
    """For a causal LM a task's example is its prompt + the label's continuation, exactly the tokens label scoring
    and lm-eval put to it (``Review: <text>\nSentiment:`` + `` positive``), not the seq2seq ``sentiment: <text>``;
    the same seeded sample. A file is the user's text and stays as given."""
    from uncurl_hf.evaluation.prompts import get_prompt

    spec = Spec(task="sentiment", num_examples=5, seed=2)
    plain, prompted = calibration_examples(spec), calibration_examples(spec, causal=True)
    template = get_prompt("sentiment")
    assert prompted == [
        Example(f"Review: {e.source.removeprefix('sentiment: ').strip()}\nSentiment:", f" {e.target}") for e in plain
    ]
    assert all(p.source == template.render(get_task("sentiment").raw_text(e.source)) for p, e in zip(prompted, plain))
    path = tmp_path / "c.txt"
    path.write_text("one line\nanother line\n")
    assert calibration_examples(Spec(file=str(path), num_examples=5), causal=True) == calibration_examples(
        Spec(file=str(path), num_examples=5))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".csv", "folder", "list", "dataset"])
def test_larger_sources_are_sampled_with_random_sample_of_the_seed(tmp_path, suffix):
    """More examples than ``num_examples``: exactly ``random.Random(seed).sample(all examples, n)`` (what a .txt or
    .jsonl always gave), even where only the sampled rows of a table are converted."""
    texts = [f"example number {i}" for i in range(40)]
    everything = [Example(text) for text in texts]
    table = datasets.Dataset.from_dict({"text": texts})
    source: dict[str, Any]
    if suffix == ".txt":
        (tmp_path / "a.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        source = dict(file=str(tmp_path / "a.txt"))
    elif suffix == ".jsonl":
        source = dict(file=str(write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])))
    elif suffix == ".parquet":
        table.to_parquet(str(tmp_path / "a.parquet"))
        source = dict(file=str(tmp_path / "a.parquet"))
    elif suffix == ".csv":
        table.to_csv(str(tmp_path / "a.csv"), index=False)
        source = dict(file=str(tmp_path / "a.csv"))
    elif suffix == "folder":
        table.save_to_disk(str(tmp_path / "saved"))
        source = dict(file=str(tmp_path / "saved"))
    else:
        source = dict(data=texts if suffix == "list" else table)
    for seed in (0, 5):
        expected = random.Random(seed).sample(everything, 9)
        assert calibration_examples(Spec(num_examples=9, seed=seed, **source)) == expected
    assert calibration_examples(Spec(num_examples=40, **source)) == everything  # not more: all, in order


def test_the_recipes_calibration_spec():
    """The recipe's own spec is read as it is (``calibration_examples`` is duck-typed on its attributes)."""
    from uncurl_hf.recipe import CalibrationSpec

    spec = CalibrationSpec(data=[f"text {i}" for i in range(10)], num_examples=3, seed=4)
    assert calibration_examples(spec) == random.Random(4).sample([Example(f"text {i}") for i in range(10)], 3)
