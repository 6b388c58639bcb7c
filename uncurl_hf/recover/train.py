"""Recovery after pruning: train LoRA adapters (PEFT) on the task's training split, with the pruned weights frozen.

Pruning removes experts the task rarely routes to, but the tokens that did go to them now land on a surviving
expert that was never trained for them, and the layers around have never seen the reduced model's hidden states.
A short fine-tune of low-rank adapters on the attention projections (``q/k/v/o`` of self- and cross-attention) and
on the surviving experts' ``wi``/``wo`` lets the model adapt to its new routing for a small fraction of the
parameters, and the result stays one of two things a user can ship:

* ``save="adapter"``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) whose
  ``base_model_name_or_path`` is the pruned folder; it loads with
  ``PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(pruned_dir), adapter_dir)``.
* ``save="merged"``: the adapters folded into the weights (``merge_and_unload``) and written as an ordinary
  pruned checkpoint (same config, same plan, same shapes), so it loads with ``AutoModelForSeq2SeqLM`` and
  ``uncurl verify`` checks it like any other output.

Choices, and why:

* The router is not adapted. Its rows are what the pruning plan decided (kept or merged rows); training it would
  move tokens between experts and undo the routing the plan was computed on. Only the task loss is used
  (``output_router_logits=False``: no load-balancing or z-loss terms), for the same reason.
* AdamW (not the zoo recipe's Adafactor): Adafactor scales its steps by each parameter's RMS, and LoRA's ``B``
  matrices start at exactly zero, so Adafactor's first steps on them are degenerate. The schedule is the zoo
  recipe's (:func:`uncurl_hf.zoo.recipe.lr_at`: linear warm-up, cosine decay to 10% of the peak) and the batches are
  its :func:`~uncurl_hf.zoo.recipe.task_batches` (shuffled epochs of text-to-text pairs, labels padded with -100).
* Determinism: the adapter's random init (``lora_A``), dropout and the data order are all seeded from
  ``RecoverConfig.seed``, so the same pruned folder, config and torch thread count give byte-identical output
  folders. Wall times are reported in :class:`RecoverResult` only, never written.
* Scores before and after are measured on the task's dev split (test only with ``eval_test``: tuning the recovery
  budget on test would leak it). "After" is measured on exactly what is written: the adapter model, or the merged
  model (which the writer checks reproduces the in-memory logits).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.errors import ModelNotFoundError, RecoveryError, UncurlError

logger = logging.getLogger(__name__)

# Attention projections of every block (encoder self-attention, decoder self- and cross-attention) and the
# surviving experts' two matrices. Dense feed-forward layers (``mlp.wi``/``mlp.wo`` of the non-sparse blocks) are not
# targets: pruning did not change them. PEFT matches a string target against each module's full name (re.fullmatch).
DEFAULT_TARGET_MODULES = r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)|.*\.mlp\.experts\.expert_\d+\.(wi|wo)"
SAVE_CHOICES = ("adapter", "merged")
RECOVERY_FILENAME = "uncurl_recovery.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INSTALL_HINT = "pip install 'uncurl-hf[recover]'"



@dataclass(frozen=True)
class RecoverConfig:
    """Settings of one recovery run (what ``uncurl recover`` flags set).

    ``target_modules`` is a PEFT target: a regular expression matched against full module names, or a list of
    name suffixes. ``warmup`` of ``None`` means 10% of the steps. ``train_limit``/``eval_limit`` take the first N
    examples of the train / evaluation splits (quick checks and tests).
    """

    task: str
    steps: int = 200
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    batch_size: int = 16
    seed: int = 0
    warmup: int | None = None
    weight_decay: float = 0.0
    target_modules: str | tuple[str, ...] = DEFAULT_TARGET_MODULES
    save: str = "adapter"
    eval_test: bool = False
    eval_limit: int | None = None
    train_limit: int | None = None
    max_length: int = 128

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("dev", "test") if self.eval_test else ("dev",)

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the flag to change (before anything is loaded)."""
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"--steps must be an integer >= 1, got {self.steps!r}."),
            (self.lr > 0, f"--lr must be > 0, got {self.lr!r}."),
            (isinstance(self.rank, int) and self.rank >= 1, f"--rank must be an integer >= 1, got {self.rank!r}."),
            (self.alpha > 0, f"--alpha must be > 0, got {self.alpha!r}."),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout!r}."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size!r}."),
            (self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup!r}."),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}."),
            (self.save in SAVE_CHOICES, f"--save must be one of {', '.join(SAVE_CHOICES)}, got {self.save!r}."),
            (self.eval_limit is None or self.eval_limit >= 1, f"--eval-limit must be >= 1, got {self.eval_limit!r}."),
            (self.train_limit is None or self.train_limit >= 1,
             f"--train-limit must be >= 1, got {self.train_limit!r}."),
            (bool(self.target_modules), "--target-modules must name at least one module pattern."),
        ]
        for ok, message in checks:
            if not ok:
                raise RecoveryError(message)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data


@dataclass(frozen=True)
class SplitScore:
    """The task metric on one split, before (pruned) and after recovery."""

    split: str
    num_examples: int
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class RecoverResult:
    """What a recovery run produced. ``losses`` holds the training loss of every step; ``model`` is the recovered
    model in memory (the ``PeftModel`` for ``save="adapter"``, the merged model otherwise), in eval mode."""

    output_dir: Path
    config: RecoverConfig
    metric: str
    scores: dict[str, SplitScore]
    losses: list[float]
    trainable_params: int
    total_params: int
    train_time_s: float
    wall_time_s: float
    files: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def summary_table(self) -> str:
        """Plain-text table: metric per split before/after, trainable parameters, loss and time."""
        rows = [("", "pruned", "recovered", "change")]
        for s in self.scores.values():
            rows.append((f"{self.metric} ({s.split}, n={s.num_examples})", f"{s.before:.4f}", f"{s.after:.4f}",
                         f"{s.delta:+.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{r[0]:<{widths[0]}}  " + "  ".join(f"{v:>{widths[i]}}" for i, v in enumerate(r) if i) for r in rows]
        share = self.trainable_params / self.total_params if self.total_params else 0.0
        lines.append(f"LoRA r={self.config.rank}: {self.trainable_params:,} trainable parameters "
                     f"({share:.2%} of {self.total_params:,}); {self.config.steps} steps, loss "
                     f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f} in {self.train_time_s:.1f} s")
        lines.append(f"wrote {self.config.save} to {self.output_dir} in {self.wall_time_s:.1f} s")
        return "\n".join(lines)


def require_peft() -> Any:
    """The ``peft`` module, or a :class:`RecoveryError` naming the install command."""
    try:
        import peft
    except ImportError as exc:
        raise RecoveryError(
            f"`uncurl recover` trains LoRA adapters with the peft library, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return peft


def check_pruned_folder(path: str | Path) -> Path:
    """The resolved folder of a pruned encoder-decoder checkpoint, or a named error.

    A model folder without ``uncurl_plan.json`` was not written by ``uncurl prune``: recovery is meant for what
    pruning lost, and its card and plan are what the merged output carries on.
    """
    from uncurl_hf.io.checkpoint import inspect_checkpoint
    from uncurl_hf.plan import PLAN_FILENAME
    from uncurl_hf.pipeline.prune import check_evaluable_family

    folder = Path(path).expanduser()
    family = inspect_checkpoint(folder)
    if not (folder / PLAN_FILENAME).is_file():
        raise ModelNotFoundError(
            f"{folder} is a model folder but not a pruned one (no {PLAN_FILENAME}). `uncurl recover` fine-tunes the "
            "output of `uncurl prune`: prune first (uncurl prune MODEL --task TASK --factor F -o OUT), then recover "
            "OUT."
        )
    check_evaluable_family(family)
    return folder.resolve()


def add_lora(model: nn.Module, config: RecoverConfig) -> Any:
    """Wrap ``model`` in a PEFT LoRA model: base weights frozen, adapters seeded (``lora_A`` random, ``lora_B`` 0).

    The wrapped model computes exactly what ``model`` computed until the first step (``B = 0``).
    """
    peft = require_peft()
    lora = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules),
        bias="none",
    )
    torch.manual_seed(config.seed)
    try:
        with _quiet_peft():
            wrapped = peft.get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise RecoveryError(
            f"No module of the model matches the LoRA targets {config.target_modules!r} ({exc}). Use the default "
            "targets, or give --target-modules a regular expression over module names such as "
            "'encoder.block.0.layer.0.SelfAttention.q'."
        ) from None
    return wrapped


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
    wrap; it is not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_batches(tokenizer: Any, examples: list, config: RecoverConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``config.steps`` batches: shuffled epochs over ``examples`` (seeded), repeated as often as needed."""
    from uncurl_hf.zoo.recipe import task_batches

    if not examples:
        raise RecoveryError(f"Task {config.task!r} has no training examples; recovery needs its train split.")
    rng = random.Random(config.seed)
    produced = 0
    while True:
        for batch in task_batches(tokenizer, examples, config.batch_size, rng, config.max_length):
            if produced == config.steps:
                return
            produced += 1
            yield batch


def train_lora(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train the parameters of ``model`` that require grad (the adapters) on ``batches``; return each step's loss.

    AdamW with the zoo recipe's schedule; the loss is the task's cross-entropy only (no router losses: the routers
    are frozen, see the module docstring). Parameters that do not require grad are never touched.
    """
    from uncurl_hf.zoo.recipe import lr_at

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecoveryError("The model has no trainable parameters; add LoRA adapters first (add_lora).")
    torch.manual_seed(seed)  # LoRA dropout (and router jitter, if the model has any) draw from this stream
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="recover (LoRA)", disable=not progress, leave=False)
    for step, batch in enumerate(batches):
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, lr)
        out = model(**batch, output_router_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    if len(losses) < steps:
        raise RecoveryError(
            f"The batch stream ended after {len(losses)} of {steps} steps; give more batches or fewer --steps."
        )
    return losses


def recover(
    pruned_dir: str | Path,
    output_dir: str | Path,
    config: RecoverConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    sync: bool = True,
) -> RecoverResult:
    """LoRA-recover the pruned checkpoint ``pruned_dir`` on ``config.task``; write the adapter or merged model.

    Cheap checks first (settings, peft, task, folder, output), then: load, score the pruned model on the dev split
    (and test with ``eval_test``), train the adapters, score again, write ``output_dir`` atomically (temporary folder,
    reload check, card, ``uncurl_manifest.json``, rename). ``pruned_dir`` is only read.
    """
    from uncurl_hf.io.checkpoint import (
        check_output_dir,
        count_parameters,
        load_model,
        load_tokenizer,
        sweep_stale_temp_dirs,
    )
    from uncurl_hf.evaluation.scoring import task_score
    from uncurl_hf.evaluation.tasks import get_task

    start = time.perf_counter()
    config.validate()
    require_peft()
    task = get_task(config.task)
    if not task.labels:
        raise RecoveryError(f"Task {task.name!r} is a generation task; recovery scores classification tasks only.")
    source = check_pruned_folder(pruned_dir)
    output = Path(output_dir).expanduser().resolve()
    sweep_stale_temp_dirs(output)
    check_output_dir(output, source, overwrite)

    model = load_model(source)
    tokenizer = load_tokenizer(source)
    total_params = count_parameters(model)
    eval_sets = {split: _limited(task.load_split(split), config.eval_limit) for split in config.eval_splits}
    before = {split: task_score(model, tokenizer, task, ex, progress=progress) for split, ex in eval_sets.items()}
    logger.info("pruned model: %s", ", ".join(f"{s} {v:.4f}" for s, v in before.items()))

    wrapped = add_lora(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = str(source)
    trainable = trainable_parameters(wrapped)
    train = _limited(task.load_split("train"), config.train_limit)
    t0 = time.perf_counter()
    losses = train_lora(
        wrapped, training_batches(tokenizer, train, config), steps=config.steps, lr=config.lr,
        warmup=config.warmup_steps, weight_decay=config.weight_decay, seed=config.seed, progress=progress,
    )
    train_time = time.perf_counter() - t0
    final: nn.Module = wrapped.merge_and_unload() if config.save == "merged" else wrapped
    final.eval()
    after = {split: task_score(final, tokenizer, task, ex, progress=progress) for split, ex in eval_sets.items()}
    scores = {s: SplitScore(s, len(eval_sets[s]), before[s], after[s]) for s in eval_sets}
    record = _record(source, config, task.metric, scores, losses, trainable, total_params)
    if config.save == "merged":
        files = _write_merged(final, output, source, record, overwrite=overwrite, sync=sync)
    else:
        files = _write_adapter(wrapped, output, source, record, overwrite=overwrite, sync=sync)
    result = RecoverResult(
        output_dir=output, config=config, metric=task.metric, scores=scores, losses=losses,
        trainable_params=trainable, total_params=total_params, train_time_s=train_time,
        wall_time_s=time.perf_counter() - start, files=files, model=final,
    )
    logger.info("recovered %s -> %s: %s", source, output,
                ", ".join(f"{s.split} {s.before:.4f} -> {s.after:.4f}" for s in scores.values()))
    return result


def _limited(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]


def _record(
    source: Path,
    config: RecoverConfig,
    metric: str,
    scores: dict[str, SplitScore],
    losses: list[float],
    trainable: int,
    total: int,
) -> dict[str, Any]:
    """What ``uncurl_recovery.json`` holds (and the card shows): settings, scores, losses. No times, no paths."""
    from uncurl_hf._version import __version__

    return {
        "base": source.name,
        "config": config.to_dict(),
        "metric": metric,
        "scores": {s: asdict(v) for s, v in scores.items()},
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": trainable,
        "total_params": total,
        "command": recover_command(source.name, config),
        "uncurl_version": __version__,
    }


def recover_command(source_name: str, config: RecoverConfig) -> str:
    """The ``uncurl recover`` command equivalent to ``config`` (output shown as ``OUTPUT_DIR``)."""
    default = RecoverConfig(task=config.task)
    args = ["uncurl", "recover", source_name, "--task", config.task, "--steps", str(config.steps),
            "--lr", f"{config.lr:g}", "--rank", str(config.rank), "--save", config.save, "-o", "OUTPUT_DIR"]
    optional = [("--alpha", "alpha", "g"), ("--dropout", "dropout", "g"), ("--batch-size", "batch_size", ""),
                ("--seed", "seed", ""), ("--warmup", "warmup", ""), ("--weight-decay", "weight_decay", "g"),
                ("--eval-limit", "eval_limit", ""), ("--train-limit", "train_limit", ""),
                ("--max-length", "max_length", "")]
    for flag, name, spec in optional:
        value = getattr(config, name)
        if value != getattr(default, name):
            args += [flag, format(value, spec) if spec else str(value)]
    if config.target_modules != default.target_modules:
        targets = config.target_modules
        args += ["--target-modules", targets if isinstance(targets, str) else ",".join(targets)]
    if config.eval_test:
        args.append("--eval-test")
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------------- writing


def _write_merged(
    model: nn.Module, output: Path, source: Path, record: dict[str, Any], *, overwrite: bool, sync: bool
) -> list[str]:
    """The merged model as an ordinary pruned checkpoint: weights + config, the source's plan/tokenizer, new card."""
    from uncurl_hf.cards.model_card import CARD_FILENAME
    from uncurl_hf.io.checkpoint import write_checkpoint
    from uncurl_hf.plan import PruningPlan

    def finalize(folder: Path) -> None:
        _write_json(folder / RECOVERY_FILENAME, record)
        _write_text(folder / CARD_FILENAME, merged_card(_read_card(source), record))

    written = write_checkpoint(
        model, output, PruningPlan.load(source), source_dir=source, overwrite=overwrite, finalize=finalize, sync=sync,
    )
    return sorted(p.name for p in written.iterdir())


def _write_adapter(
    model: Any, output: Path, source: Path, record: dict[str, Any], *, overwrite: bool, sync: bool
) -> list[str]:
    """The PEFT adapter folder (+ the source's tokenizer, a card, ``uncurl_recovery.json``), checked by reloading."""
    from uncurl_hf.cards.model_card import CARD_FILENAME
    from uncurl_hf.io.checkpoint import TOKENIZER_FILES, write_atomically

    def fill(temp: Path) -> None:
        model.save_pretrained(str(temp))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (temp / name).write_bytes((source / name).read_bytes())
        _write_json(temp / RECOVERY_FILENAME, record)
        _write_text(temp / CARD_FILENAME, adapter_card(_read_card(source), record))
        _validate_adapter(model, source, temp)

    written = write_atomically(output, fill, source_dir=source, overwrite=overwrite, sync=sync)
    return sorted(p.name for p in written.iterdir())


@torch.no_grad()
def _validate_adapter(model: Any, source: Path, folder: Path) -> None:
    """The written adapter, loaded on a fresh copy of the pruned model, must reproduce the in-memory logits."""
    from peft import PeftModel

    from uncurl_hf.io.checkpoint import load_model
    from uncurl_hf.families import get_family

    base = load_model(source)
    with _quiet_peft():
        reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    inputs = get_family(base).dummy_inputs(base)
    expected = model.eval()(**inputs).logits
    actual = reloaded(**inputs).logits
    if not torch.equal(expected, actual):
        raise RecoveryError(
            f"The written adapter does not reproduce the trained model's outputs (max difference "
            f"{(expected - actual).abs().max().item():.3g}); nothing was written. Rerun, and report it if it repeats."
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------ cards


RECOVERED_SUFFIX = " (pruned, before recovery)"
_RECOVERY_TAGS = ("peft", "lora", "uncurl-recovered")


def _read_card(source: Path) -> str | None:
    from uncurl_hf.cards.model_card import CARD_FILENAME

    path = source / CARD_FILENAME
    return path.read_text(encoding="utf-8") if path.is_file() else None


def recovery_section(record: dict[str, Any]) -> str:
    """The card's ``## Recovery`` section: settings, scores before/after, the command."""
    cfg = record["config"]
    targets = cfg["target_modules"]
    target_text = ("attention `q/k/v/o` (self and cross) and the surviving experts' `wi`/`wo`"
                   if targets == DEFAULT_TARGET_MODULES else f"`{targets}`")
    share = record["trainable_params"] / record["total_params"] if record["total_params"] else 0.0
    warmup = cfg["warmup"] if cfg["warmup"] is not None else max(1, cfg["steps"] // 10)
    lines = [
        "## Recovery",
        "",
        f"After pruning, LoRA adapters ([PEFT](https://github.com/huggingface/peft)) were trained on the train split "
        f"of `{cfg['task']}` with every pruned weight frozen (routers included), then "
        + ("merged into the weights (`merge_and_unload`)." if cfg["save"] == "merged" else "saved as an adapter."),
        "",
        "| | |",
        "|---|---|",
        f"| Steps | {cfg['steps']} (batch {cfg['batch_size']}) |",
        f"| Learning rate | {cfg['lr']:g} (AdamW, {warmup} warm-up steps, cosine decay to 10%) |",
        f"| LoRA rank / alpha / dropout | {cfg['rank']} / {cfg['alpha']:g} / {cfg['dropout']:g} |",
        f"| Target modules | {target_text} |",
        f"| Trainable parameters | {record['trainable_params']:,} ({share:.2%} of {record['total_params']:,}) |",
        f"| Training loss | {record['loss_first']:.4f} (first step) → {record['loss_last']:.4f} (last step) |",
        f"| Seed | {cfg['seed']} |",
        "",
        f"| {record['metric']} | examples | pruned | recovered |",
        "|---|---:|---:|---:|",
    ]
    for score in record["scores"].values():
        lines.append(f"| {score['split']} | {score['num_examples']} | {score['before']:.4f} | {score['after']:.4f} |")
    lines += ["", "```bash", record["command"], "```", ""]
    return "\n".join(lines)


def merged_card(source_card: str | None, record: dict[str, Any]) -> str:
    """The pruned model's card with recovery tags, relabelled scores and a ``## Recovery`` section.

    Scores in the source's ``model-index`` were measured on the pruned model before recovery: the pruned entry is
    relabelled ``(pruned, before recovery)``; with a test score from this run, the recovered score is added as the
    model's own entry, so the metadata never claims an old score for these weights.
    """
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(source_card) if source_card else ModelCard("---\n---\n")
    data: ModelCardData = card.data
    data.tags = _merge_tags(data.tags, ["pruning", "uncurl", record["config"]["task"]])
    if data.library_name is None:
        data.library_name = "transformers"
    data.eval_results = _recovered_eval_results(data, record)
    if data.eval_results and not data.model_name:
        data.model_name = f"{record['base']}-recovered"
    body = card.text if source_card else f"\n# {record['base']}\n\n"
    body = re.sub(r"^# (.+)$", lambda m: f"# {m.group(1)} + LoRA recovery", body, count=1, flags=re.MULTILINE)
    section = recovery_section(record)
    marker = "\n## How to use"
    body = body.replace(marker, f"\n{section}{marker}", 1) if marker in body else body.rstrip("\n") + f"\n\n{section}"
    return f"---\n{data.to_yaml()}\n---\n{body}"


def adapter_card(source_card: str | None, record: dict[str, Any]) -> str:
    """A card for the adapter folder: PEFT metadata, how to load it on the pruned model, the recovery section."""
    from huggingface_hub import ModelCard, ModelCardData

    source = ModelCard(source_card).data if source_card else ModelCardData()
    data = ModelCardData(
        library_name="peft",
        pipeline_tag=source.pipeline_tag or "text2text-generation",
        datasets=source.datasets,
        tags=_merge_tags(source.tags, ["pruning", "uncurl", record["config"]["task"]]),
    )
    base = record["base"]
    body = "\n".join([
        "",
        f"# LoRA recovery adapter for `{base}` ({record['config']['task']})",
        "",
        f"A PEFT LoRA adapter trained on top of the pruned checkpoint `{base}` (written by `uncurl prune`; its own "
        "card describes the pruning). The adapter is useless without that folder: `adapter_config.json` names it in "
        "`base_model_name_or_path`.",
        "",
        recovery_section(record),
        "## How to use",
        "",
        "```python",
        "import uncurl_hf  # noqa: F401  (registers pruned_switch_transformers with the Auto classes)",
        "from peft import PeftModel",
        "from transformers import AutoModelForSeq2SeqLM",
        "",
        f'base = AutoModelForSeq2SeqLM.from_pretrained("path/to/{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "model = model.merge_and_unload()  # optional: fold the adapter into the weights",
        "```",
        "",
    ])
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _merge_tags(existing: list[str] | None, extra: list[str]) -> list[str]:
    tags = list(existing or [])
    for tag in [*extra, *_RECOVERY_TAGS]:
        if tag not in tags:
            tags.append(tag)
    return tags


def _recovered_eval_results(data: Any, record: dict[str, Any]) -> list[Any] | None:
    """``model-index`` after recovery: the source's pruned entries relabelled ``(pruned, before recovery)``; with a
    test score from this run, the recovered score first and this run's pruned score beside it."""
    from huggingface_hub import EvalResult

    from uncurl_hf.cards.model_card import ORIGINAL_SUFFIX, TASK_HUB_DATASETS
    from uncurl_hf.evaluation.tasks import get_task

    old = []
    for entry in data.eval_results or []:
        name = entry.metric_name or entry.metric_type
        if not name.endswith((ORIGINAL_SUFFIX, RECOVERED_SUFFIX)):
            entry = replace(entry, metric_name=name + RECOVERED_SUFFIX)
        old.append(entry)
    test = record["scores"].get("test")
    if test is None:
        return old or None
    if old:
        template = replace(old[0], dataset_split="test")
    else:
        task = get_task(record["config"]["task"])
        template = EvalResult(
            task_type="text-classification", task_name=task.name,
            dataset_type=TASK_HUB_DATASETS.get(task.name, task.name), dataset_name=task.description,
            dataset_split="test", metric_type=record["metric"], metric_value=0.0,
        )
    recovered = replace(template, metric_value=float(test["after"]), metric_name=record["metric"])
    pruned = replace(template, metric_value=float(test["before"]), metric_name=record["metric"] + RECOVERED_SUFFIX)

    def key(r: Any) -> tuple:
        return (r.metric_name, r.dataset_split, r.metric_value)

    return [recovered, pruned, *(r for r in old if key(r) != key(pruned))]


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "RECOVERY_FILENAME",
    "RecoverConfig",
    "RecoverResult",
    "RecoveryError",
    "SplitScore",
    "add_lora",
    "adapter_card",
    "check_pruned_folder",
    "merged_card",
    "recover",
    "recover_command",
    "require_peft",
    "train_lora",
    "training_batches",
]
