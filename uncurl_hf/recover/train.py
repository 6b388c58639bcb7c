"""Recovery after pruning: train LoRA adapters (PEFT) on the task's training split, with the pruned weights frozen.

Pruning removes experts the task rarely routes to, but the tokens that did go to them now land on a surviving
expert that was never trained for them, and the layers around have never seen the reduced model's hidden states.
A short fine-tune of low-rank adapters on the attention projections and the surviving experts (per family:
:mod:`~uncurl_hf.recover.targets`) lets the model adapt to its new routing for a small fraction of the parameters.
Switch Transformers (seq2seq) and the decoder families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss; stock or
``pruned_*`` checkpoints) are trained the same way; a decoder learns the label continuation of the task's prompt,
the one its scoring reads (:mod:`~uncurl_hf.recover.batches`). The result stays one of two things a user can ship:

* ``save="adapter"``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) whose
  ``base_model_name_or_path`` is the pruned folder; it loads with
  ``PeftModel.from_pretrained(AutoModelFor{CausalLM,Seq2SeqLM}.from_pretrained(pruned_dir), adapter_dir)``.
* ``save="merged"``: the adapters folded into the weights (``merge_and_unload``) and written as an ordinary
  pruned checkpoint (same config, same plan, same shapes), so it loads with the family's Auto class and
  ``uncurl verify`` checks it like any other output.

Choices, and why:

* The router is not adapted. Its rows are what the pruning plan decided (kept or merged rows); training it would
  move tokens between experts and undo the routing the plan was computed on. Only the task loss is used
  (``output_router_logits=False``: no load-balancing or z-loss terms), for the same reason.
* AdamW (not the zoo recipe's Adafactor): Adafactor scales its steps by each parameter's RMS, and LoRA's ``B``
  matrices start at exactly zero, so Adafactor's first steps on them are degenerate. The schedule is the zoo
  recipe's (:func:`uncurl_hf.zoo.recipe.lr_at`: linear warm-up, cosine decay to 10% of the peak); batches are
  shuffled epochs (:func:`~uncurl_hf.recover.batches.training_batches`: text-to-text pairs for seq2seq, prompt +
  label for causal LMs, labels padded with -100).
* Determinism: the adapter's random init (``lora_A``), dropout and the data order are all seeded from
  ``RecoverConfig.seed``, so the same pruned folder, config and torch thread count give byte-identical output
  folders. Wall times are reported in :class:`RecoverResult` only, never written.
* Scores before and after are the ones ``uncurl eval`` reports (:func:`~uncurl_hf.evaluation.scoring.task_score`:
  label sequences for seq2seq, label continuations of the prompt for causal LMs), measured on the task's dev split
  (test only with ``eval_test``: tuning the recovery budget on test would leak it). "After" is measured on exactly
  what is written: the adapter model, or the merged model (which the writer checks reproduces the in-memory logits).

Modules: :mod:`~uncurl_hf.recover.config` (settings and results), :mod:`~uncurl_hf.recover.targets` (what is
adapted), :mod:`~uncurl_hf.recover.lora` (PEFT wrapping), :mod:`~uncurl_hf.recover.batches` (training data),
this one (the training loop and :func:`recover`), :mod:`~uncurl_hf.recover.save` (the output folders) and
:mod:`uncurl_hf.cards.recovery_card` (their cards).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.errors import ModelNotFoundError, RecoveryError
from uncurl_hf.recover.batches import training_batches
from uncurl_hf.recover.config import RecoverConfig, RecoverResult, SplitScore
from uncurl_hf.recover.lora import add_lora, check_dropout, require_peft, trainable_parameters
from uncurl_hf.recover.targets import LoraTargets, resolve_targets, task_type_of
from uncurl_hf.recover.save import recovery_record, write_adapter, write_merged

logger = logging.getLogger(__name__)


def check_pruned_folder(path: str | Path) -> tuple[Path, Any]:
    """The resolved folder of a pruned checkpoint and its family, or a named error.

    A model folder without ``uncurl_plan.json`` was not written by ``uncurl prune``: recovery is meant for what
    pruning lost, and its card and plan are what the merged output carries on.
    """
    from uncurl_hf.io.checkpoint import inspect_checkpoint
    from uncurl_hf.plan import PLAN_FILENAME
    from uncurl_hf.pipeline.source import check_evaluable_family

    folder = Path(path).expanduser()
    family = inspect_checkpoint(folder)
    if not (folder / PLAN_FILENAME).is_file():
        raise ModelNotFoundError(
            f"{folder} is a model folder but not a pruned one (no {PLAN_FILENAME}). `uncurl recover` fine-tunes the "
            "output of `uncurl prune`: prune first (uncurl prune MODEL --task TASK --factor F -o OUT), then recover "
            "OUT."
        )
    check_evaluable_family(family)
    return folder.resolve(), family


def warn_if_other_task(folder: Path, task: str) -> str | None:
    """Warn (and return the plan's task) when ``folder`` was calibrated on another task than ``task``.

    The plan kept the experts the calibration task routes to; recovering on a different task asks LoRA to restore
    experts that were removed for it, which it usually cannot, and the run would otherwise say nothing about it.
    A plan calibrated on a file (no task recorded) or without readable metadata gives no warning.
    """
    import json

    from uncurl_hf.plan import PLAN_FILENAME

    try:
        calibrated = json.loads((folder / PLAN_FILENAME).read_text(encoding="utf-8"))["metadata"]["calibration"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(calibrated, str) or calibrated == task:
        return None
    logger.warning(
        "%s was pruned with calibration on the %r task, but this recovery trains and scores %r: the experts kept are "
        "the ones %r routes to, and recovery cannot bring back what %r lost. Recover with --task %s, or prune on %r "
        "first (uncurl prune MODEL --task %s ...).", folder, calibrated, task, calibrated, task, calibrated, task, task,
    )
    return calibrated


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

    Cheap checks first (settings, peft, task, folder, a decoder's prompt, targets vs dropout, output), then: load,
    score the pruned model on the dev split (and test with ``eval_test``), train the adapters, score again, write
    ``output_dir`` atomically (temporary folder, reload check, card, ``uncurl_manifest.json``, rename).
    ``pruned_dir`` is only read.
    """
    from uncurl_hf.io.access import check_writable_parent
    from uncurl_hf.io.atomic import check_output_dir, sweep_stale_temp_dirs
    from uncurl_hf.io.checkpoint import count_parameters, load_model, load_tokenizer
    from uncurl_hf.evaluation.scoring import task_score
    from uncurl_hf.evaluation.tasks import get_task

    start = time.perf_counter()
    config.validate()
    require_peft()
    task = get_task(config.task)
    if not task.labels:
        raise RecoveryError(f"Task {task.name!r} is a generation task; recovery scores classification tasks only.")
    source, family = check_pruned_folder(pruned_dir)
    causal = task_type_of(family) == "CAUSAL_LM"
    if causal:
        check_decoder_task(task)
    targets = resolve_targets(family.name, config.target_modules, config.target_parameters)
    check_dropout(targets, config.dropout)
    warn_if_other_task(source, task.name)
    output = Path(output_dir).expanduser().resolve()
    sweep_stale_temp_dirs(output)
    check_output_dir(output, source, overwrite)
    check_writable_parent(output)

    model = load_model(source)
    tokenizer = load_tokenizer(source)
    total_params = count_parameters(model)
    eval_sets = {split: _limited(task.load_split(split), config.eval_limit) for split in config.eval_splits}
    before = {split: task_score(model, tokenizer, task, ex, progress=progress) for split, ex in eval_sets.items()}
    logger.info("pruned model: %s", ", ".join(f"{s} {v:.4f}" for s, v in before.items()))

    wrapped = add_lora(model, config, targets)
    wrapped.peft_config["default"].base_model_name_or_path = str(source)
    trainable = trainable_parameters(wrapped)
    train = _limited(task.load_split("train"), config.train_limit)
    t0 = time.perf_counter()
    losses = train_lora(
        wrapped, training_batches(tokenizer, train, config, causal=causal), steps=config.steps, lr=config.lr,
        warmup=config.warmup_steps, weight_decay=config.weight_decay, seed=config.seed, progress=progress,
    )
    train_time = time.perf_counter() - t0
    final: nn.Module = wrapped.merge_and_unload() if config.save == "merged" else wrapped
    final.eval()
    after = {split: task_score(final, tokenizer, task, ex, progress=progress) for split, ex in eval_sets.items()}
    scores = {s: SplitScore(s, len(eval_sets[s]), before[s], after[s]) for s in eval_sets}
    record = recovery_record(source, config, task.metric, scores, losses, trainable, total_params,
                             lora=lora_record(family, targets))
    if config.save == "merged":
        files = write_merged(final, output, source, record, overwrite=overwrite, sync=sync)
    else:
        files = write_adapter(wrapped, output, source, record, overwrite=overwrite, sync=sync)
    result = RecoverResult(
        output_dir=output, config=config, metric=task.metric, scores=scores, losses=losses,
        trainable_params=trainable, total_params=total_params, train_time_s=train_time,
        wall_time_s=time.perf_counter() - start, files=files, model=final,
    )
    logger.info("recovered %s -> %s: %s", source, output,
                ", ".join(f"{s.split} {s.before:.4f} -> {s.after:.4f}" for s in scores.values()))
    return result


def check_decoder_task(task: Any) -> None:
    """A causal LM learns (and is scored on) the task's decoder prompt: refuse a task without one before loading
    (the prompt's own errors name the fix: a label without a continuation, a task without labels)."""
    from uncurl_hf.evaluation.causal import task_prompt

    task_prompt(task)


def lora_record(family: Any, targets: LoraTargets) -> dict[str, Any]:
    """What ``uncurl_recovery.json`` says about the adapters: family, peft task type, the targets resolved."""
    return {"family": family.name, "task_type": task_type_of(family), "targets": targets.to_dict()}


def _limited(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]
