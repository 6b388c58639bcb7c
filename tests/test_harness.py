"""lm-evaluation-harness integration (uncurl_hf/evaluation/harness.py, `uncurl eval MODEL --harness TASKS`).

What is specified:

* lm-eval's ``acc`` on the uncurl_* tasks equals the project's own prompted accuracy on the same examples, example
  by example, and its per-choice log-likelihoods equal the project's label scores: on a tiny random Qwen3-MoE (the
  shipped tasks and a task registered without a template) and on the zoo's tiny-qwen3moe-64;
* the shipped YAMLs load with lm-eval's loader and index; the folder written for a tokenizer is named by its content
  and every example re-tokenizes to the ids the project scores;
* ``uncurl eval PRUNED --harness T --reference ORIGINAL --eval-limit N`` prints both models side by side and an
  ``lm_eval`` command line that runs as printed (a subprocess, offline) and reports the same number;
* bad input gets one clear message: lm-eval not installed, an encoder-decoder, an unknown or label-less task, an
  empty task list, a non-positive limit, a prompt longer than the model's positions, --task with --harness.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_families_decoder import ZOO_TOKENIZER, tiny_model
from transformers import AutoTokenizer

from uncurl_hf.cli.main import main
from uncurl_hf.errors import EvaluationError, PromptError, UnknownTaskError
from uncurl_hf.evaluation import causal, harness
from uncurl_hf.evaluation.prompts import get_prompt
from uncurl_hf.evaluation.scoring import score_examples
from uncurl_hf.evaluation.tasks import Example, Task, get_task, register_task
from uncurl_hf.io.checkpoint import load_model, load_tokenizer
from uncurl_hf.zoo.registry import zoo_path

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ZOO = "tiny-qwen3moe-64"
LIMIT = 16
GENERIC = "harness-tiny"  # registered without a template: scored through the generic "\nAnswer:" prompt
GENERIC_EXAMPLES = [Example(f"item : {text}", label) for text, label in [
    ("a charming and funny story", "yes"), ("a boring film", "no"), ("the worst script", "no"),
    ("brilliant director , wonderful actress", "yes"), ("dull , long and flat", "no"), ("quite clever", "yes")]]


@register_task(GENERIC)
def _generic_task() -> Task:
    return Task(name=GENERIC, description="six tiny yes/no items", load_split=lambda split: list(GENERIC_EXAMPLES),
                labels=("no", "yes"), prefix="item : ")


@register_task("harness-text")
def _text_task() -> Task:
    return Task(name="harness-text", description="texts", load_split=lambda split: [Example("a text")],
                metric="perplexity")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


@pytest.fixture(scope="module")
def zoo():
    folder = zoo_path(ZOO)
    return folder, load_model(folder), load_tokenizer(folder)


@pytest.fixture(scope="module", autouse=True)
def task_root(tmp_path_factory) -> Path:
    """Task folders go to a temporary root (shared by the tests: a folder is reused), never the user's cache."""
    root = tmp_path_factory.mktemp("harness-tasks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "harness_root", lambda: root)
        yield root


def random_decoder(tokenizer, positions: int = 128):
    return tiny_model("qwen3_moe", seed=3, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=None,
                      eos_token_id=1, max_position_embeddings=positions)


def assert_same_as_uncurl(model, tokenizer, tasks: list[str], limit: int, root: Path, raw: bool = False) -> dict:
    """lm-eval and the project score the same examples identically: acc, per-example hits, the label distribution
    (with ``raw``, the summed log-likelihoods themselves)."""
    folder = harness.write_task_folder(tokenizer, harness.parse_tasks(tasks), "test", root)
    assert folder.mismatched == {f"uncurl_{t}": 0 for t in tasks}
    scores = harness.run_harness(model, tokenizer, folder, limit=limit, batch_size=8, progress=False)
    for name in tasks:
        task = get_task(name)
        examples = task.load_split("test")[:limit]
        own = score_examples(model, tokenizer, task, examples, batch_size=4)
        got = scores[f"uncurl_{name}"]
        assert (got.n, got.metric) == (len(examples), "acc")
        assert got.value == own.score, name  # THE equality: lm-eval's acc is uncurl's prompted accuracy
        assert list(got.per_example) == own.per_example.tolist()
        logprobs = torch.tensor(got.choice_logprobs, dtype=torch.float64)
        assert torch.allclose(torch.log_softmax(logprobs, -1), own.distribution.double(), atol=1e-4)
        if raw:
            expected = causal.label_logprobs(model, tokenizer, task, examples, batch_size=4)
            assert torch.allclose(logprobs, expected, atol=1e-4)
    return scores


# ---- acc equality ------------------------------------------------------------------------------------------------


def test_lm_eval_acc_equals_uncurl_accuracy_on_a_tiny_random_decoder(tokenizer, task_root):
    assert_same_as_uncurl(random_decoder(tokenizer), tokenizer, ["sentiment", GENERIC], 12, task_root, raw=True)


def test_lm_eval_acc_equals_uncurl_accuracy_on_the_zoo_decoder(zoo, task_root):
    _, model, tokenizer = zoo
    scores = assert_same_as_uncurl(model, tokenizer, ["sentiment", "topic", "hedge"], LIMIT, task_root)
    assert scores["uncurl_sentiment"].value > 0.5  # a trained model, not a random one


# ---- task files --------------------------------------------------------------------------------------------------


def test_shipped_yamls_load_with_lm_evals_loader_and_index():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in ("sentiment", "topic", "hedge"):
        config = load_yaml(harness.TASKS_DIR / f"uncurl_{name}.yaml")
        assert config["task"] == f"uncurl_{name}" and config["output_type"] == "multiple_choice"
        assert (config["doc_to_text"], config["doc_to_choice"], config["target_delimiter"]) == (
            "context", "choices", "")
    index = TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False).all_subtasks
    assert {"uncurl_sentiment", "uncurl_topic", "uncurl_hedge"} <= set(index)


def test_the_task_folder_holds_the_projects_prompts_and_is_named_by_its_content(tokenizer, task_root):
    from lm_eval.tasks import TaskManager

    tasks = harness.parse_tasks("sentiment, uncurl_topic,sentiment")  # both spellings, each task once
    assert [t.name for t in tasks] == ["sentiment", "topic"]
    folder = harness.write_task_folder(tokenizer, tasks, "dev", task_root)
    assert harness.write_task_folder(tokenizer, tasks, "dev", task_root).path == folder.path
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "_uncurl_template_yaml", "uncurl_sentiment.jsonl", "uncurl_sentiment.yaml", "uncurl_topic.jsonl",
        "uncurl_topic.yaml"]
    loaded = TaskManager(include_path=str(folder.path), include_defaults=False).load(["uncurl_sentiment"])
    task = loaded["tasks"]["uncurl_sentiment"]
    docs = list(task.test_docs())
    examples = get_task("sentiment").load_split("dev")
    assert len(docs) == len(examples)
    template = get_prompt("sentiment")
    first = docs[0]
    assert first["context"].startswith(tokenizer.eos_token + " review:") and first["context"].endswith("\nsentiment:")
    assert first["choices"] == [template.continuations[label] for label in template.labels]
    assert first["label"] == template.labels.index(examples[0].target)


# ---- the command line --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness") / "pruned"
    assert main(["prune", ZOO, "--task", "sentiment", "--factor", "2", "--num-calibration", "32", "-o", str(out),
                 "--no-progress"]) == 0
    return out


def test_uncurl_eval_harness_prints_both_models_and_a_command_that_runs(pruned_zoo, zoo, capsys, tmp_path):
    _, original, tokenizer = zoo
    argv = ["eval", str(pruned_zoo), "--harness", "sentiment", "--reference", ZOO, "--eval-limit", str(LIMIT),
            "--batch-size", "16", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = re.search(r"^uncurl_sentiment\s+(\d+)\s+([\d.]+) ± [\d.]+\s+([\d.]+) ± [\d.]+$", out, re.M)
    assert row and int(row[1]) == LIMIT, out
    task = get_task("sentiment")
    examples = task.load_split("test")[:LIMIT]
    assert float(row[2]) == round(score_examples(original, tokenizer, task, examples).score, 4)
    pruned_score = score_examples(load_model(pruned_zoo), tokenizer, task, examples).score
    assert float(row[3]) == round(pruned_score, 4)
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("lm_eval ")]
    assert len(commands) == 2 and f"pretrained={pruned_zoo}" in commands[1]
    assert f"--limit {LIMIT}" in commands[1] and "--tasks uncurl_sentiment" in commands[1]

    # the printed command, as printed, in a fresh process (offline; transformers loads the pruned folder itself)
    argv = shlex.split(commands[1])
    lm_eval = Path(sys.executable).with_name("lm_eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    done = subprocess.run([str(lm_eval) if lm_eval.exists() else shutil.which("lm_eval"), *argv[1:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = re.search(r"\|uncurl_sentiment\s*\|.*?\|acc\s*\|.*?\|\s*([\d.]+)\|", done.stdout)
    assert table and float(table[1]) == pytest.approx(pruned_score, abs=5e-5), done.stdout


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_lm_eval_missing_names_the_extra(zoo, monkeypatch, capsys):
    folder, _, _ = zoo
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert main(["eval", str(folder), "--harness", "sentiment", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'uncurl-hf[eval]'" in err and err.count("\n") == 1


def test_an_encoder_decoder_is_told_to_use_uncurls_own_scoring(switch_dir, capsys):
    assert main(["eval", str(switch_dir), "--harness", "sentiment"]) == 2
    err = capsys.readouterr().err
    assert "encoder-decoder (switch_transformers)" in err and "uncurl eval MODEL --task TASK" in err


@pytest.mark.parametrize("spec, error, words", [
    ("nope", UnknownTaskError, "Unknown task 'nope'"),
    ("harness-text", EvaluationError, "has no labels"),
    (" , ", EvaluationError, "comma-separated task names"),
])
def test_bad_task_lists_are_named(spec, error, words):
    with pytest.raises(error, match=re.escape(words)):
        harness.parse_tasks(spec)


def test_bad_numbers_and_flags(zoo, tokenizer, task_root, capsys):
    folder, _, _ = zoo
    assert main(["eval", str(folder), "--harness", "sentiment", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main(["eval", str(folder), "--harness", "sentiment", "--task", "sentiment"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    short = random_decoder(tokenizer, positions=64)  # the sentiment prompt needs up to 124 positions
    task_folder = harness.write_task_folder(tokenizer, harness.parse_tasks("sentiment"), "test", task_root)
    with pytest.raises(PromptError, match="max_position_embeddings=64"):
        harness.run_harness(short, tokenizer, task_folder, limit=2)
