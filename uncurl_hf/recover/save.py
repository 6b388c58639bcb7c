"""Writing a recovery's output: the PEFT adapter folder or the merged checkpoint, each with
``uncurl_recovery.json`` and a card (:mod:`uncurl_hf.cards.recovery_card`), atomically and checked by reloading.

``uncurl_recovery.json`` (:func:`recovery_record`) holds settings, scores and losses, never times or paths, so the
same run writes the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uncurl_hf.cards.recovery_card import adapter_card, merged_card
from uncurl_hf.errors import RecoveryError
from uncurl_hf.recover.config import RECOVERY_FILENAME, RecoverConfig, SplitScore, recover_command
from uncurl_hf.recover.lora import quiet_peft


def recovery_record(
    source: Path,
    config: RecoverConfig,
    metric: str,
    scores: dict[str, SplitScore],
    losses: list[float],
    trainable: int,
    total: int,
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``uncurl_recovery.json`` holds (and the card shows): settings, resolved targets (``lora``: family, peft
    task type, targets), scores, losses. No times, no paths."""
    from uncurl_hf._version import __version__

    record: dict[str, Any] = {
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
    if lora is not None:
        record["lora"] = lora
    return record


def write_merged(
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


def write_adapter(
    model: Any, output: Path, source: Path, record: dict[str, Any], *, overwrite: bool, sync: bool
) -> list[str]:
    """The PEFT adapter folder (+ the source's tokenizer, a card, ``uncurl_recovery.json``), checked by reloading."""
    from uncurl_hf.cards.model_card import CARD_FILENAME
    from uncurl_hf.io.atomic import write_atomically
    from uncurl_hf.io.checkpoint import TOKENIZER_FILES

    def fill(temp: Path) -> None:
        sort_target_sets(model)
        model.save_pretrained(str(temp))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (temp / name).write_bytes((source / name).read_bytes())
        _write_json(temp / RECOVERY_FILENAME, record)
        _write_text(temp / CARD_FILENAME, adapter_card(_read_card(source), record, base_format(source)))
        validate_adapter(model, source, temp)

    written = write_atomically(output, fill, source_dir=source, overwrite=overwrite, sync=sync)
    return sorted(p.name for p in written.iterdir())


def sort_target_sets(model: Any) -> None:
    """peft keeps some targets as sets (its transformers-5 MoE conversion turns lists into sets) and writes them with
    ``list(set)``, whose order depends on the process's hash seed; sorted lists make ``adapter_config.json`` the same
    bytes in every run, stock or ``pruned_*`` (peft reads them back as sets, and sorts parameter targets itself)."""
    for config in model.peft_config.values():
        for name in ("target_modules", "target_parameters"):
            value = getattr(config, name, None)
            if isinstance(value, (set, frozenset, list, tuple)):
                setattr(config, name, sorted(value))


@torch.no_grad()
def validate_adapter(model: Any, source: Path, folder: Path) -> None:
    """The written adapter, loaded on a fresh copy of the pruned model, must reproduce the in-memory logits."""
    from peft import PeftModel

    from uncurl_hf.io.checkpoint import load_model
    from uncurl_hf.families import get_family

    base = load_model(source)
    with quiet_peft():
        reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    inputs = get_family(base).dummy_inputs(base)
    expected = model.eval()(**inputs).logits
    actual = reloaded(**inputs).logits
    if not torch.equal(expected, actual):
        raise RecoveryError(
            f"The written adapter does not reproduce the trained model's outputs (max difference "
            f"{(expected - actual).abs().max().item():.3g}); nothing was written. Rerun, and report it if it repeats."
        )


def base_format(source: Path) -> Any:
    """The pruned folder's checkpoint format (stock or ``pruned_*``, causal or seq2seq), as its files say: what the
    adapter card's usage code must load."""
    from uncurl_hf.cards.usage import PRUNED_PREFIX, CheckpointFormat, written_format
    from uncurl_hf.families import get_family

    written = written_format(source)
    model_type = str(written.get("model_type") or "")
    causal = get_family(source).auto_model_class().__name__ == "AutoModelForCausalLM"
    remote = tuple(written.get("remote_code_files") or ()) if model_type.startswith(PRUNED_PREFIX) else ()
    return CheckpointFormat(model_type=model_type, causal=causal, remote_files=remote)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _read_card(source: Path) -> str | None:
    from uncurl_hf.cards.model_card import CARD_FILENAME

    path = source / CARD_FILENAME
    return path.read_text(encoding="utf-8") if path.is_file() else None
