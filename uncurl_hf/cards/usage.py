"""What a card says about the checkpoint format, and its usage code, decided from the files actually written.

A card must describe the folder it sits in: a Mixtral pruned to equal counts is a stock ``mixtral`` checkpoint
(no ``auto_map``, no custom code), while unequal counts give ``pruned_mixtral`` with two modeling files. Guessing
from the run's options got this wrong before (every decoder output was described as Switch), so
:func:`written_format` reads ``config.json`` and the folder, and :func:`checkpoint_format` derives everything else
(pipeline tag, Auto class, stock type) from that. The usage code is meant to be run as is (a test executes it
against the folder for every family and format): load the model and tokenizer, then generate from an example input.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRUNED_PREFIX = "pruned_"
_DEFAULT_REMOTE_FILES = {  # what save_pretrained copies for each pruned type (used when no folder was read)
    True: ("configuration_pruned_decoder_moe.py", "modeling_pruned_decoder_moe.py"),
    False: ("configuration_pruned_switch_transformers.py", "modeling_pruned_switch_transformers.py"),
}


@dataclass(frozen=True)
class CheckpointFormat:
    """The written checkpoint as a reader of the card needs to know it."""

    model_type: str  # config.json's model_type, e.g. "qwen3_moe" or "pruned_qwen3_moe"
    causal: bool  # a decoder family (AutoModelForCausalLM) rather than an encoder-decoder
    remote_files: tuple[str, ...]  # modeling files auto_map points at (empty: no custom code)

    @property
    def stock_type(self) -> str:
        """The transformers model type of the family (``pruned_mixtral`` -> ``mixtral``)."""
        return self.model_type[len(PRUNED_PREFIX):] if self.model_type.startswith(PRUNED_PREFIX) else self.model_type

    @property
    def stock(self) -> bool:
        return not self.model_type.startswith(PRUNED_PREFIX)

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.causal else "AutoModelForSeq2SeqLM"

    @property
    def pipeline_tag(self) -> str:
        return "text-generation" if self.causal else "text2text-generation"


def written_format(folder: str | Path) -> dict[str, Any]:
    """``{"model_type", "remote_code_files"}`` of the checkpoint in ``folder`` (``{}`` without a config.json)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    auto_map = config.get("auto_map") or {}
    modules: set[str] = set()
    for value in auto_map.values() if isinstance(auto_map, dict) else ():
        for reference in value if isinstance(value, list) else [value]:
            if isinstance(reference, str) and "." in reference:
                modules.add(reference.split("--")[-1].split(".", 1)[0] + ".py")
    files = tuple(sorted(name for name in modules if (folder / name).is_file()))
    return {"model_type": config.get("model_type"), "remote_code_files": files}


def _is_causal_family(family_name: str) -> bool | None:
    from uncurl_hf.families import family_by_name

    try:
        return family_by_name(family_name).auto_model_class().__name__ == "AutoModelForCausalLM"
    except Exception:  # noqa: BLE001 - a plan of a family that is not registered here
        return None


def checkpoint_format(facts: Any) -> CheckpointFormat:
    """The format of ``facts``' checkpoint: as written (``facts.model_type``), else as the plan implies it."""
    plan = facts.plan
    base = str(plan.model_type or "")
    base = base[len(PRUNED_PREFIX):] if base.startswith(PRUNED_PREFIX) else base
    causal = _is_causal_family(plan.family)
    if causal is None:
        causal = "switch" not in base
    model_type = facts.model_type
    if not model_type:
        uniform = len(set(facts.experts_after.values())) <= 1
        # equal decoder counts are written stock, unless an expert map needs the pruned classes
        stock = not plan.has_expert_maps and (facts.export == "stock" or (causal and uniform))
        model_type = base if stock else PRUNED_PREFIX + base
    remote = facts.remote_code_files
    if remote is None:
        remote = () if not model_type.startswith(PRUNED_PREFIX) else _DEFAULT_REMOTE_FILES[causal]
    return CheckpointFormat(model_type=model_type, causal=causal, remote_files=tuple(remote))


def example_input(fmt: CheckpointFormat, task: Any | None) -> str:
    """The input the usage code generates from: the task's prompt around a short example (decoders), the task's
    seq2seq format (Switch), or a neutral text for a model calibrated on a file."""
    from uncurl_hf.evaluation.prompts import PROMPTS

    sample = PROMPTS[task.name].example if task is not None and task.name in PROMPTS else ""
    sample = sample or "Your text here."
    if task is None:
        return "Once upon a time" if fmt.causal else sample
    if not fmt.causal:
        return task.format(sample)
    try:
        template = task.decoder_prompt()
    except Exception:  # noqa: BLE001 - a task whose prompt is broken still gets a card
        template = None
    return template.render(sample) if template is not None else sample


def prompt_display(fmt: CheckpointFormat, task: Any | None) -> str | None:
    """The decoder prompt of a classification task as one line of inline code (``\\n`` spelled out)."""
    if not fmt.causal or task is None or not getattr(task, "labels", None):
        return None
    try:
        template = task.decoder_prompt()
    except Exception:  # noqa: BLE001
        return None
    if template is None:
        return None
    answers = " | ".join(template.continuations[label].strip() for label in task.labels)
    return (template.render("<text>") + f" <{answers}>").replace("\n", "\\n")


def usage_code(fmt: CheckpointFormat, model_id: str, example: str, remote: bool = False) -> str:
    """Python that loads the checkpoint with its Auto class and generates a few tokens from ``example``.

    ``remote``: the variant that needs no uncurl-hf (``trust_remote_code=True`` runs the shipped modeling files).
    """
    remote_kwarg = ", trust_remote_code=True" if remote else ""
    lines = [
        f"from transformers import {fmt.auto_class}, AutoTokenizer",
        "",
        f'model = {fmt.auto_class}.from_pretrained("{model_id}"{remote_kwarg})',
        # the tokenizer too: without a tokenizer_class, AutoTokenizer reads the (custom) config to pick one
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}"{remote_kwarg})',
        *generation_lines(fmt, example),
    ]
    return "\n".join(lines)


def generation_lines(fmt: CheckpointFormat, example: str) -> list[str]:
    """The lines that tokenize ``example``, generate 8 tokens with ``model`` and print them (a causal LM's output
    starts with the prompt, so only the new tokens are decoded); every card's usage code ends with them."""
    decoded = 'outputs[0, inputs["input_ids"].shape[1]:]' if fmt.causal else "outputs[0]"
    return [
        f'inputs = tokenizer({json.dumps(example)}, return_tensors="pt")',
        "outputs = model.generate(**inputs, max_new_tokens=8, do_sample=False)",
        f"print(tokenizer.decode({decoded}, skip_special_tokens=True))",
    ]


__all__ = ["CheckpointFormat", "checkpoint_format", "example_input", "generation_lines", "prompt_display",
           "usage_code", "written_format"]
