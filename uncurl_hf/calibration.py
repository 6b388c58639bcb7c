"""Calibration: run task examples through the model once and record, per sparse layer, how the router uses
each expert on *this task* — the evidence every pruning method decides from.

Hooks sit on every sparse MLP (encoder and decoder). For the real tokens entering a layer (padding excluded with
the encoder mask on encoder layers and the decoder mask on decoder layers) they recompute the router logits and
record, per expert: tokens routed (the router's top-k choice, before any capacity drop), summed router
probability (gate mass), summed L2 norm of the expert's own output on its routed tokens (raw and multiplied by
the gate, the REAP saliency), plus a bounded, seeded uniform sample of (router logits, layer input) pairs for
methods that cluster experts by their logit profiles (UNCURL) or compare expert outputs (HC-SMoE).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.seeding import stable_seed
from uncurl_hf.tasks import Example

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class ExpertStats:
    """Routing statistics of one sparse layer over the calibration tokens (``E`` experts, ``S`` sampled tokens)."""

    layer: str
    num_experts: int
    top_k: int
    num_tokens: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    gate_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    output_norm_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    weighted_output_norm_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    logit_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    hidden_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @classmethod
    def empty(cls, layer: MoELayer, hidden_size: int) -> "ExpertStats":
        e = layer.num_experts
        return cls(
            layer=layer.name,
            num_experts=e,
            top_k=layer.top_k,
            counts=torch.zeros(e, dtype=torch.long),
            gate_mass=torch.zeros(e, dtype=torch.float64),
            output_norm_sum=torch.zeros(e, dtype=torch.float64),
            weighted_output_norm_sum=torch.zeros(e, dtype=torch.float64),
            logit_sample=torch.zeros(0, e),
            hidden_sample=torch.zeros(0, hidden_size),
        )

    @property
    def frequency(self) -> torch.Tensor:
        """Share of routing decisions that picked each expert (sums to 1 over experts when tokens were seen)."""
        total = self.counts.sum().clamp(min=1)
        return self.counts.double() / total

    @property
    def mean_output_norm(self) -> torch.Tensor:
        """Mean ``||expert(x)||`` over the tokens routed to the expert (0 for unused experts)."""
        return self.output_norm_sum / self.counts.double().clamp(min=1)

    @property
    def mean_weighted_output_norm(self) -> torch.Tensor:
        """Mean ``gate * ||expert(x)||`` over routed tokens (REAP's router-weighted activation norm)."""
        return self.weighted_output_norm_sum / self.counts.double().clamp(min=1)

    def summary(self, exact_only: bool = False) -> dict[str, Any]:
        """JSON-able digest (counts and gate mass), e.g. for plan metadata and the CLI.

        ``exact_only`` leaves out the float gate mass. Integer counts are the same with any number of torch threads,
        but float statistics are not bit-stable across thread counts (some CPU GEMM kernels, e.g. MKL's for matrices
        of a few rows, round differently with 1 and 2 threads), and a rounded float still flips its last printed
        digit when it sits near a rounding boundary. The plan file stores only the exact digest, so that it is
        byte-identical whatever the thread count; rounding would only move the flip points, not remove them.
        """
        digest: dict[str, Any] = {"num_tokens": int(self.num_tokens), "counts": [int(c) for c in self.counts.tolist()]}
        if not exact_only:
            digest["gate_mass"] = [round(float(g), 6) for g in self.gate_mass.tolist()]
        return digest


@dataclass
class CalibrationStats(Mapping[str, ExpertStats]):
    """``{layer name: ExpertStats}`` plus how much data produced them."""

    layers: dict[str, ExpertStats]
    num_sequences: int = 0

    def __getitem__(self, name: str) -> ExpertStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def summary(self, exact_only: bool = False) -> dict[str, Any]:
        return {name: stats.summary(exact_only) for name, stats in self.layers.items()}


class _CalibrationContext:
    """Holds the token masks of the batch being forwarded, so the hooks can drop padding."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}


class _LayerCollector:
    """Forward hook accumulating :class:`ExpertStats` for one layer."""

    def __init__(
        self,
        family: MoEFamily,
        layer: MoELayer,
        context: _CalibrationContext,
        hidden_size: int,
        max_samples: int,
        seed: int,
    ) -> None:
        self.family = family
        self.layer = layer
        self.context = context
        self.max_samples = max_samples
        self.stats = ExpertStats.empty(layer, hidden_size)
        self.sample_keys = torch.zeros(0)
        self.generator = torch.Generator().manual_seed(stable_seed(seed, "calibration-sample", layer.name))

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden = args[0]
        mask = self.context.masks.get(self.layer.mask_key)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if mask is not None:
            if mask.numel() != flat.shape[0]:
                raise CalibrationDataError(
                    f"Layer {self.layer.name}: mask {self.layer.mask_key} has {mask.numel()} entries for "
                    f"{flat.shape[0]} tokens; batches must carry masks matching their inputs."
                )
            flat = flat[mask.reshape(-1).to(flat.device).bool()]
        if flat.shape[0] == 0:
            return
        self._accumulate(flat)

    def _accumulate(self, hidden: torch.Tensor) -> None:
        stats = self.stats
        logits = self.family.router_logits(self.layer, hidden)
        probs, selected = self.family.routing(logits, self.layer.top_k)
        stats.num_tokens += hidden.shape[0]
        stats.counts += torch.bincount(selected.reshape(-1).cpu(), minlength=stats.num_experts)
        # sums in float64: a float32 sum over many tokens depends on how the reduction is split across threads
        stats.gate_mass += probs.double().sum(dim=0).cpu()
        for expert in selected.unique().tolist():
            rows = (selected == expert).any(dim=-1)
            out = self.family.run_expert(self.layer, expert, hidden[rows])
            norms = out.float().norm(dim=-1).double()
            stats.output_norm_sum[expert] += norms.sum().cpu()
            stats.weighted_output_norm_sum[expert] += (norms * probs[rows, expert].double()).sum().cpu()
        self._update_sample(logits.float().cpu(), hidden.float().cpu())

    def _update_sample(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Uniform sample without replacement over all tokens seen so far: keep the smallest random keys."""
        keys = torch.rand(logits.shape[0], generator=self.generator)
        all_keys = torch.cat([self.sample_keys, keys])
        all_logits = torch.cat([self.stats.logit_sample, logits])
        all_hidden = torch.cat([self.stats.hidden_sample, hidden])
        if all_keys.shape[0] > self.max_samples:
            keep = all_keys.topk(self.max_samples, largest=False).indices.sort().values
            all_keys, all_logits, all_hidden = all_keys[keep], all_logits[keep], all_hidden[keep]
        self.sample_keys, self.stats.logit_sample, self.stats.hidden_sample = all_keys, all_logits, all_hidden


@torch.no_grad()
def calibrate(
    model: nn.Module,
    family: MoEFamily,
    batches: Iterable[Batch],
    max_logit_samples: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationStats:
    """Forward ``batches`` through ``model`` (eval mode, no grad) and return per-layer :class:`ExpertStats`.

    Batches are dicts with ``input_ids`` and ``attention_mask`` and, for encoder-decoder models, the decoder side
    as ``labels`` (teacher forcing; ``-100`` marks padding) or ``decoder_input_ids`` (+ ``decoder_attention_mask``).
    Without either, the decoder sees only its start token. The model is left as it was (training flag restored).
    """
    layers = family.sparse_layers(model)
    if not layers:
        from uncurl_hf.errors import UnsupportedModelError

        raise UnsupportedModelError("The model has no sparse MoE layers to calibrate; nothing to prune.")
    hidden_size = int(layers[0].router.in_features)
    context = _CalibrationContext()
    collectors = [_LayerCollector(family, layer, context, hidden_size, max_logit_samples, seed) for layer in layers]
    handles = [layer.module.register_forward_hook(collector) for layer, collector in zip(layers, collectors)]
    was_training = model.training
    model.eval()
    num_sequences = 0
    total = len(batches) if isinstance(batches, Sequence) else None
    try:
        for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
            inputs = family.forward_inputs(model, batch)
            context.masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask")}
            model(**inputs)
            num_sequences += int(inputs["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
        context.masks = {}
        model.train(was_training)
    if num_sequences == 0:
        raise CalibrationDataError("No calibration batches were given; provide at least one example.")
    stats = CalibrationStats({c.layer.name: c.stats for c in collectors}, num_sequences=num_sequences)
    logger.info(
        "calibrated on %d sequences (%s)",
        num_sequences,
        ", ".join(f"{name}: {s.num_tokens} tokens" for name, s in stats.items()),
    )
    return stats


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


def load_calibration_file(path: str | Path) -> list[Example]:
    """Read calibration examples from ``.txt`` (one per line, blank lines skipped) or ``.jsonl``.

    ``.jsonl`` lines are objects with a required ``text`` (the model input) and an optional ``target``.
    Raises :class:`CalibrationDataError` for a missing, unreadable, malformed or empty file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(
            f"Calibration file {path} has extension {path.suffix or '(none)'}; use .txt (one example per line) "
            "or .jsonl (objects with a 'text' field and an optional 'target')."
        )
    if not path.exists():
        raise CalibrationDataError(f"Calibration file {path} does not exist; check the path.")
    if not path.is_file():
        raise CalibrationDataError(f"Calibration file {path} is not a regular file.")
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
    examples = _parse_jsonl(path, text) if suffix == ".jsonl" else _parse_txt(text)
    if not examples:
        raise CalibrationDataError(f"Calibration file {path} holds no examples; add at least one non-empty line.")
    logger.info("read %d calibration examples from %s", len(examples), path)
    return examples


def check_coverage(stats: CalibrationStats, min_tokens_per_expert: float = 1.0) -> None:
    """Refuse statistics too thin to rank experts: every layer must see ``min_tokens_per_expert * E`` tokens.

    With fewer routed tokens than experts, most experts are never seen and every method ranks them by noise (ties),
    so the "task-specific" plan would be arbitrary. Decoder layers see only target tokens (or just the start token
    when the data has no targets), so they run out first.
    """
    thin = {
        name: (s.num_tokens, s.num_experts)
        for name, s in stats.items()
        if s.num_tokens < min_tokens_per_expert * s.num_experts
    }
    if thin:
        name, (tokens, experts) = next(iter(thin.items()))
        raise CalibrationDataError(
            f"Calibration data too small: layer {name} saw {tokens} token(s) for {experts} experts "
            f"({len(thin)} layer(s) below {min_tokens_per_expert:g} token per expert). Give more examples "
            "(--num-calibration, a longer file), or a .jsonl file with 'target' fields so decoder layers see "
            "target tokens."
        )


def _looks_binary(text: str) -> bool:
    """NUL bytes, or more than 10% control characters other than whitespace: not natural-language text."""
    if "\x00" in text:
        return True
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f\v")
    return control > 0.1 * max(len(text), 1)


def _parse_txt(text: str) -> list[Example]:
    return [Example(line.strip()) for line in text.splitlines() if line.strip()]


def _parse_jsonl(path: Path, text: str) -> list[Example]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CalibrationDataError(
                f"{path}, line {number}: not valid JSON ({exc}); fix or remove that line (one JSON object per line)."
            ) from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise CalibrationDataError(
                f"{path}, line {number}: each line must be a JSON object with a non-empty string field 'text'."
            )
        target = row.get("target", "")
        if not isinstance(target, str):
            raise CalibrationDataError(f"{path}, line {number}: 'target' must be a string.")
        examples.append(Example(row["text"].strip(), target.strip()))
    return examples
