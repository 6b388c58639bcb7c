"""lm-evaluation-harness integration: the project's classification tasks as lm-eval ``multiple_choice`` tasks.

Why: a pruned decoder is a plain transformers checkpoint, so ``lm_eval --model hf --model_args pretrained=OUT`` runs
on it; what lm-eval lacks is the project's tasks. This module writes them as lm-eval tasks over local data (no Hub
dataset) and runs lm-eval's Python API on a pruned model and its original, so a number from ``uncurl eval --task``
can be checked with, and reported by, the tool everyone else uses.

The prompt is never written twice: every JSON line of a task's data file carries the context text, which is
``tokenizer.decode(prompt_ids(...))`` of :mod:`uncurl_hf.evaluation.prompts` (start token included), and the labels'
continuations. lm-eval then tokenizes exactly the ids the project scores (checked for every example when the file is
written: :attr:`TaskFolder.mismatched` counts the examples where re-tokenizing differs), so its ``acc`` equals the
project's prompted accuracy on the same examples. The context starts with the tokenizer's start token, which tells
lm-eval's ``HFLM`` not to add special tokens of its own (a T5-style tokenizer would append ``</s>`` otherwise).

The shipped YAMLs (``harness_tasks/``) hold the task settings; :func:`write_task_folder` renders a task's split for one
tokenizer into a cached folder (named by the content's hash) with the YAMLs pointing at the data files, the folder
the printed ``lm_eval --include_path`` command uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uncurl_hf.errors import EvaluationError
from uncurl_hf.evaluation.prompts import prompt_ids, start_ids
from uncurl_hf.evaluation.tasks import Task, get_task

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("harness_tasks")  # the shipped YAMLs
TEMPLATE = "_uncurl_template_yaml"
PREFIX = "uncurl_"  # lm-eval task name = PREFIX + project task name
METRIC = "acc"
INSTALL_HINT = "pip install 'uncurl-hf[eval]'"


@dataclass(frozen=True)
class HarnessScore:
    """One model's lm-eval result on one task: ``value`` ± ``stderr`` of ``metric`` over ``n`` examples.

    ``per_example`` (0/1 per example, in split order) and ``choice_logprobs`` (each choice's summed log-likelihood)
    come from lm-eval's logged samples: what an agreement with the project's own scores is checked on.
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    per_example: tuple[float, ...] = ()
    choice_logprobs: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class TaskFolder:
    """A folder for ``lm_eval --include_path``: per-task YAMLs and the JSON-lines splits they read."""

    path: Path
    tasks: tuple[str, ...]  # lm-eval task names
    split: str
    mismatched: dict[str, int] = field(default_factory=dict)  # task -> examples whose re-tokenized ids differ


@dataclass(frozen=True)
class HarnessReport:
    """What ``uncurl eval MODEL --harness TASKS [--reference ORIGINAL]`` reports."""

    model: str
    folder: TaskFolder
    scores: dict[str, HarnessScore]
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    reference: str | None = None
    reference_scores: dict[str, HarnessScore] | None = None

    def command(self, model: str | None = None) -> str:
        """The ``lm_eval`` command line that reproduces these numbers for ``model`` (default: the pruned one)."""
        parts = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model or self.model}",
                 "--include_path", str(self.folder.path), "--tasks", ",".join(self.folder.tasks),
                 "--batch_size", str(self.batch_size), "--device", self.device]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        return shlex.join(parts)

    def format_table(self) -> str:
        """Original vs pruned side by side (lm-eval's ``acc ± stderr``), then the command lines that reproduce them."""
        def cell(score: HarnessScore | None) -> str:
            stderr = f" ± {score.stderr:.4f}" if score is not None and score.stderr is not None else ""
            return f"{score.value:.4f}{stderr}" if score is not None else "-"

        models = ([("original", self.reference_scores)] if self.reference_scores is not None else []) + [
            ("pruned" if self.reference else "model", self.scores)]
        rows = [[f"lm-eval {METRIC} ({self.folder.split})", "n", *(name for name, _ in models)]]
        rows += [[task, str(score.n), *(cell(values.get(task)) for _, values in models)]
                 for task, score in self.scores.items()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.append("\nreproduce with the lm_eval CLI:")
        lines += [f"  {self.command(model)}" for model in (self.reference, self.model) if model]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def scores(values: dict[str, HarnessScore] | None) -> dict[str, Any] | None:
            if values is None:
                return None
            return {k: {"metric": v.metric, "value": v.value, "stderr": v.stderr, "n": v.n} for k, v in values.items()}

        return {"model": self.model, "reference": self.reference, "split": self.folder.split, "limit": self.limit,
                "include_path": str(self.folder.path), "mismatched": dict(self.folder.mismatched),
                "scores": scores(self.scores), "reference_scores": scores(self.reference_scores),
                "commands": [self.command(m) for m in (self.reference, self.model) if m]}


# ------------------------------------------------------------------------------------------------ tasks and data


def require_lm_eval() -> None:
    """Fail early, naming the extra, when lm-eval (an optional dependency) is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs the [hf] extra: accelerate)
    except ImportError as exc:
        raise EvaluationError(
            f"--harness runs EleutherAI's lm-evaluation-harness, which is not installed ({exc}). Install it with "
            f"{INSTALL_HINT}."
        ) from None


def harness_task(name: str) -> Task:
    """The project task behind ``name`` (``sentiment`` or ``uncurl_sentiment``); it must have labels."""
    task = get_task(name[len(PREFIX):] if name.startswith(PREFIX) else name)
    if not task.labels:
        raise EvaluationError(
            f"Task {task.name!r} has no labels, so it has no multiple-choice form for lm-eval; --harness takes "
            "classification tasks (sentiment, topic, hedge). Score it with `uncurl eval MODEL --task "
            f"{task.name}`."
        )
    return task


def parse_tasks(spec: str | Sequence[str]) -> list[Task]:
    """``"sentiment,topic"`` (or a list) -> the tasks, each once, in order; :class:`EvaluationError` when empty."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise EvaluationError(f"--harness expects comma-separated task names (e.g. sentiment,topic), got {spec!r}.")
    tasks = {task.name: task for task in map(harness_task, names)}
    return list(tasks.values())


def task_rows(tokenizer: Any, task: Task, examples: Sequence[Any]) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines of a task's data file and the number of examples whose text lm-eval would tokenize to other
    ids than the project scores (lm-eval encodes ``context`` and ``context + choice`` whole, without special tokens
    when the context starts with the start token, and splits the continuation off by length)."""
    template = task.decoder_prompt()
    choices = [template.continuations[label] for label in task.labels]
    special = not start_ids(tokenizer)  # lm-eval adds special tokens only when no start token leads the text
    rows, mismatched = [], 0
    for example in examples:
        if example.target not in task.labels:
            raise EvaluationError(f"An example of task {task.name!r} has target {example.target!r}, not one of its "
                                  f"labels {list(task.labels)}.")
        ids = prompt_ids(tokenizer, template, task.raw_text(example.source))
        context = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        whole = [tokenizer.encode(context + choice, add_special_tokens=special) for choice in choices]
        conts = [tokenizer.encode(choice, add_special_tokens=False) for choice in choices]
        if tokenizer.encode(context, add_special_tokens=special) != ids or any(
                w != ids + c for w, c in zip(whole, conts)):
            mismatched += 1
        rows.append({"context": context, "choices": choices, "label": task.labels.index(example.target)})
    return rows, mismatched


def _task_yaml(task: Task, data_file: Path) -> dict[str, Any]:
    shipped = TASKS_DIR / f"{PREFIX}{task.name}.yaml"
    config = (yaml.safe_load(shipped.read_text()) if shipped.is_file() else
              {"include": TEMPLATE, "task": PREFIX + task.name, "tag": "uncurl"})
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    return config


def harness_root() -> Path:
    """Where task folders are cached: ``$UNCURL_HF_CACHE/harness`` (``~/.cache/uncurl_hf/harness``)."""
    from uncurl_hf.zoo.sources import cache_dir

    return cache_dir() / "harness"


def write_task_folder(
    tokenizer: Any, tasks: Sequence[Task], split: str = "test", root: str | Path | None = None,
) -> TaskFolder:
    """Render ``tasks``' ``split`` for ``tokenizer`` into ``root/<split>-<hash>/`` (default :func:`harness_root`):
    one ``uncurl_<task>.jsonl`` and ``uncurl_<task>.yaml`` per task plus the shared template. The folder is named by
    its content, so the same tokenizer and split reuse it and a printed command keeps working."""
    rendered: dict[str, list[dict[str, Any]]] = {}
    mismatched: dict[str, int] = {}
    for task in tasks:
        rows, bad = task_rows(tokenizer, task, task.load_split(split))
        rendered[PREFIX + task.name], mismatched[PREFIX + task.name] = rows, bad
        if bad:
            logger.warning("%d of %d %s examples re-tokenize to other ids than uncurl scores; lm-eval's acc may "
                           "differ from `uncurl eval --task %s` on them", bad, len(rows), task.name, task.name)
    texts = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in rendered.items()}
    digest = hashlib.sha256(json.dumps([split, (TASKS_DIR / TEMPLATE).read_text(), texts]).encode()).hexdigest()
    folder = Path(root or harness_root()) / f"{split}-{digest[:16]}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            shutil.copyfile(TASKS_DIR / TEMPLATE, temp / TEMPLATE)
            for task in tasks:
                name = PREFIX + task.name
                (temp / f"{name}.jsonl").write_text(texts[name], encoding="utf-8")
                config = _task_yaml(task, folder / f"{name}.jsonl")
                (temp / f"{name}.yaml").write_text(f"# written by uncurl-hf: {task.name} {split} split\n"
                                                   + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            os.replace(temp, folder)  # another process may have won the race: its folder has the same content
        except OSError:
            if not folder.is_dir():
                raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return TaskFolder(folder, tuple(rendered), split, mismatched)


# ------------------------------------------------------------------------------------------------ running lm-eval


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
    """lm-eval logs its setup at WARNING (e.g. that a loaded model was passed); keep it to errors unless the
    project's logger is at DEBUG (``uncurl -vv``). Without ``progress``, datasets' bars are off too."""
    import datasets

    lm_logger = logging.getLogger("lm_eval")
    before, bars = lm_logger.level, datasets.is_progress_bar_enabled()
    if not logging.getLogger("uncurl_hf").isEnabledFor(logging.DEBUG):
        lm_logger.setLevel(logging.ERROR)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        lm_logger.setLevel(before)
        if bars:
            datasets.enable_progress_bars()


def _hflm(model: Any, tokenizer: Any, batch_size: int, progress: bool) -> Any:
    """lm-eval's ``HFLM`` around a loaded model; without ``progress`` its loglikelihood bars are off."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

    cls = HFLM if progress else QuietHFLM
    return cls(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


def _score(task: str, results: dict[str, Any]) -> HarnessScore:
    values = results["results"][task]
    stderr = values.get(f"{METRIC}_stderr,none")
    samples = sorted(results.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
    return HarnessScore(
        task=task, metric=METRIC, value=float(values[f"{METRIC},none"]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        n=int(results["n-samples"][task]["effective"]),
        per_example=tuple(float(s[METRIC]) for s in samples),
        choice_logprobs=tuple(tuple(float(r[0]) for r in s["filtered_resps"]) for s in samples),
    )


def run_harness(
    model: Any, tokenizer: Any, folder: TaskFolder, limit: int | None = None, batch_size: int = 16,
    progress: bool = True,
) -> dict[str, HarnessScore]:
    """Run lm-eval (``simple_evaluate`` with an ``HFLM`` wrapping the loaded ``model``) on ``folder``'s tasks.

    No random seed is set (zero-shot multiple choice draws nothing), so the caller's RNG state is left alone.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from uncurl_hf.evaluation.causal import check_prompt_fits

    check_causal(model)
    check_numbers(limit, batch_size)
    for name in folder.tasks:  # lm-eval would silently cut the prompt's start instead
        check_prompt_fits(model, tokenizer, harness_task(name))
    was_training = model.training
    model.eval()  # HFLM leaves a model it is handed as it is: dropout would make the scores random
    try:
        with _quiet_lm_eval(progress):
            results = simple_evaluate(
                model=_hflm(model, tokenizer, batch_size, progress), tasks=list(folder.tasks), limit=limit,
                bootstrap_iters=1000, log_samples=True,
                task_manager=TaskManager(include_path=str(folder.path), include_defaults=False),
                random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
            )
    finally:
        model.train(was_training)
    if results is None:  # only on non-zero ranks of a distributed run
        raise EvaluationError("lm-eval returned no results (run it on one process).")
    return {task: _score(task, results) for task in folder.tasks}


def check_numbers(limit: int | None, batch_size: int) -> None:
    """``--limit`` and ``--batch-size`` must be positive (lm-eval reads a limit below 1 as a fraction)."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {limit}.")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}.")


def _seq2seq_error(name: str, model_type: str) -> EvaluationError:
    return EvaluationError(
        f"--harness runs lm-eval's multiple-choice tasks on decoder-only LMs; {name} is an encoder-decoder "
        f"({model_type}). Score it with uncurl's own seq2seq label scoring: `uncurl eval MODEL --task TASK "
        "[--reference ORIGINAL]`."
    )


def check_causal(model: Any, name: str = "the model") -> None:
    """lm-eval's ``hf`` model scores decoder-only LMs here; an encoder-decoder (Switch) is refused by name."""
    from uncurl_hf.evaluation.causal import is_causal

    if not is_causal(model):
        raise _seq2seq_error(name, str(getattr(model.config, "model_type", "?")))


def check_causal_folder(folder: str | Path) -> None:
    """:func:`check_causal` from a folder's config.json, before any weight is read."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("is_encoder_decoder"):
        raise _seq2seq_error(str(folder), str(config.get("model_type", "?")))


def evaluate_harness(
    model: str | Path, tasks: str | Sequence[str], reference: str | Path | None = None, split: str = "test",
    limit: int | None = None, batch_size: int = 16, root: str | Path | None = None, progress: bool = True,
) -> HarnessReport:
    """lm-eval scores of the checkpoint folder ``model`` (and of ``reference``, its original) on ``tasks``.

    Both folders are checked (decoder-only, lm-eval installed) before either is loaded; the task data is rendered
    with ``model``'s tokenizer, which a pruned checkpoint shares with its original.
    """
    from uncurl_hf.io.checkpoint import load_model, load_tokenizer

    task_list = parse_tasks(tasks)
    check_numbers(limit, batch_size)
    for folder in (model, reference):
        if folder is not None:
            check_causal_folder(folder)
    require_lm_eval()
    tokenizer = load_tokenizer(model)
    task_folder = write_task_folder(tokenizer, task_list, split, root)
    reference_scores = None
    if reference is not None:
        reference_scores = run_harness(load_model(reference), tokenizer, task_folder, limit, batch_size,
                                       progress)
    loaded = load_model(model)
    scores = run_harness(loaded, tokenizer, task_folder, limit, batch_size, progress)
    return HarnessReport(
        model=str(model), folder=task_folder, scores=scores, limit=limit, batch_size=batch_size,
        device=str(getattr(loaded, "device", "cpu")).split(":")[0], reference=str(reference) if reference else None,
        reference_scores=reference_scores,
    )


__all__ = [
    "HarnessReport",
    "HarnessScore",
    "TaskFolder",
    "evaluate_harness",
    "parse_tasks",
    "require_lm_eval",
    "run_harness",
    "task_rows",
    "write_task_folder",
]
