"""The card of a recovered output: the pruned model's card carried on with a ``## Recovery`` section (merged
weights), or a PEFT adapter card that says how to load the adapter on the pruned folder.

The merged card keeps the pruned card's usage code: the merged folder has the same config, format and files.
The adapter card writes its own, for the pruned folder's format (:class:`~uncurl_hf.cards.usage.CheckpointFormat`):
``AutoModelForCausalLM`` and a prompted input for a decoder (pipeline tag ``text-generation``),
``AutoModelForSeq2SeqLM`` for Switch, and ``import uncurl_hf`` only where the base is a ``pruned_*`` checkpoint.
Scores in the source card's ``model-index`` were measured before recovery; they are relabelled, never claimed for
the recovered weights.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from uncurl_hf.cards.usage import CheckpointFormat

RECOVERED_SUFFIX = " (pruned, before recovery)"
_RECOVERY_TAGS = ("peft", "lora", "uncurl-recovered")


def recovery_section(record: dict[str, Any]) -> str:
    """The card's ``## Recovery`` section: settings, scores before/after, the command."""
    cfg = record["config"]
    target_text = _target_text(record)
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
        f"| LoRA targets | {target_text} |",
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


def _target_text(record: dict[str, Any]) -> str:
    """The targets as the run resolved them (``record["lora"]``), else as configured."""
    described = (record.get("lora") or {}).get("targets", {}).get("description")
    if described:
        return described
    cfg = record["config"]
    given = [f"`{cfg[key]}`" for key in ("target_modules", "target_parameters") if cfg.get(key)]
    return " and ".join(given) or "the family's default targets (attention and the surviving experts)"


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


def adapter_card(source_card: str | None, record: dict[str, Any], fmt: CheckpointFormat | None = None) -> str:
    """A card for the adapter folder: PEFT metadata, how to load it on the pruned model, the recovery section.

    ``fmt`` is the pruned folder's format (``None``: a ``pruned_switch_transformers`` checkpoint).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from uncurl_hf.cards.provenance import carry_license, provenance_sections

    fmt = fmt or CheckpointFormat("pruned_switch_transformers", causal=False, remote_files=())
    source = ModelCard(source_card).data if source_card else ModelCardData()
    data = ModelCardData(
        library_name="peft",
        pipeline_tag=source.pipeline_tag or fmt.pipeline_tag,
        datasets=source.datasets,
        tags=_merge_tags(source.tags, ["pruning", "uncurl", record["config"]["task"]]),
    )
    carry_license(source_card, data)  # the pruned card's licence (the base model's), and its citations below
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
        adapter_usage(fmt, base, record["config"]["task"]),
        "```",
        "",
        provenance_sections(source_card),
    ])
    return f"---\n{data.to_yaml()}\n---\n{body}"


def adapter_usage(fmt: CheckpointFormat, base: str, task_name: str) -> str:
    """Python that loads the pruned model with its Auto class, puts the adapter on it and generates (runs as is once
    the two paths are filled in; a test executes it for a decoder)."""
    from uncurl_hf.cards.usage import example_input, generation_lines
    from uncurl_hf.evaluation.tasks import get_task

    try:
        task = get_task(task_name)
    except Exception:  # noqa: BLE001 - a task registered only in the training process still gets a card
        task = None
    lines = []
    if not fmt.stock:
        lines.append(f"import uncurl_hf  # noqa: F401  (registers {fmt.model_type} with the Auto classes)")
    lines += [
        "from peft import PeftModel",
        f"from transformers import {fmt.auto_class}, AutoTokenizer",
        "",
        f'base = {fmt.auto_class}.from_pretrained("path/to/{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "model = model.merge_and_unload()  # optional: fold the adapter into the weights",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        *generation_lines(fmt, example_input(fmt, task)),
    ]
    return "\n".join(lines)


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
