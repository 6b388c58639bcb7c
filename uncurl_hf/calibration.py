"""Calibration: run task examples through the model once and record, per sparse layer, how the router uses
each expert on *this task* — the evidence every pruning method decides from.

Hooks sit on every sparse MLP (encoder and decoder). For the real tokens entering a layer (padding excluded with
the encoder mask on encoder layers and the decoder mask on decoder layers) they recompute the router logits and
record, per expert: tokens routed (the router's top-k choice, before any capacity drop), summed router
probability (gate mass), summed L2 norm of the expert's own output on its routed tokens (raw and multiplied by
the gate, the REAP saliency), plus a bounded, seeded uniform sample of (router logits, layer input) pairs for
methods that cluster experts by their logit profiles (UNCURL) or compare expert outputs (HC-SMoE).

The sample keeps the ``max_logit_samples`` tokens with the smallest keys, where a token's key is a hash of (seed,
layer, global sequence index, position among the sequence's real tokens) — not a random stream consumed in
arrival order. That makes the sample a property of the data alone: the same tokens are chosen however the batches
are split across processes (:mod:`uncurl_hf.distributed`) or padded, and it is listed in (sequence, position) order.
Expert output norms are read off the model's own forward (hooks on the expert modules) instead of re-running every
expert, so calibration costs little more than a plain forward (``benchmarks/perf.py`` measures it).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    # [S, 2] int64: (global sequence index, position among the sequence's real tokens) of each sampled token
    sample_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))

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


# ---- the token sample --------------------------------------------------------------------------------------------
# splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer; numpy uint64 arithmetic wraps by definition.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX_1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX_2
    return x ^ (x >> np.uint64(31))


def token_keys(base: int, sequence: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """int64 sampling keys in ``[0, 2**63)``: a hash of (``base``, global sequence index, position in the sequence).

    A token's key does not depend on which process saw it, in which batch or after how many other tokens, so
    "keep the tokens with the smallest keys" selects the same tokens in a single process and across ranks.
    """
    seq = sequence.cpu().numpy().astype(np.uint64)
    pos = position.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        per_sequence = _splitmix64(np.uint64(base) ^ _splitmix64(seq * _GOLDEN + np.uint64(1)))
        mixed = _splitmix64(per_sequence + (pos + np.uint64(1)) * _GOLDEN)
    return torch.from_numpy((mixed >> np.uint64(1)).astype(np.int64))


@dataclass
class TokenSample:
    """Sampled tokens of one layer: key, global sequence index, position, router logits ``[S, E]``, input ``[S, D]``.

    The sample is the ``max_samples`` tokens with the smallest :func:`token_keys` (ties: sequence, then position),
    i.e. a uniform sample without replacement whose membership does not depend on batching or on the number of
    processes; :meth:`in_token_order` lists it in (sequence, position) order, which is the arrival order of a
    single-process run.
    """

    keys: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor

    @classmethod
    def empty(cls, num_experts: int, hidden_size: int) -> "TokenSample":
        ints = torch.zeros(0, dtype=torch.int64)
        return cls(ints, ints.clone(), ints.clone(), torch.zeros(0, num_experts), torch.zeros(0, hidden_size))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def take(self, index: torch.Tensor) -> "TokenSample":
        return TokenSample(
            self.keys[index], self.sequence[index], self.position[index], self.logits[index], self.hidden[index]
        )

    @classmethod
    def concat(cls, samples: Sequence["TokenSample"]) -> "TokenSample":
        return cls(*(torch.cat([getattr(s, f) for s in samples]) for f in TokenSample.__dataclass_fields__))

    def smallest(self, limit: int) -> "TokenSample":
        """The ``limit`` tokens with the smallest (key, sequence, position), a deterministic total order."""
        if len(self) <= limit:
            return self
        order = torch.argsort(self.keys)
        if self.keys[order[limit - 1]] == self.keys[order[limit]]:  # a tie at the cut (63-bit keys: ~never)
            order = _lexsort(self.keys, self.sequence, self.position)
        return self.take(order[:limit])

    def in_token_order(self) -> "TokenSample":
        if len(self) == 0:
            return self
        token = self.sequence * (int(self.position.max()) + 1) + self.position  # unique per token
        return self.take(torch.argsort(token))

    def threshold(self, limit: int) -> int | None:
        """Tokens with a key above this cannot enter a full sample (``None`` while it has room)."""
        return int(self.keys.max()) if len(self) >= limit else None


def _lexsort(*columns: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by ``columns[0]``, then ``columns[1]``, ... (stable sorts, last column first)."""
    order = torch.arange(columns[0].shape[0])
    for column in reversed(columns):
        order = order[torch.argsort(column[order], stable=True)]
    return order


# ---- per-layer collection ------------------------------------------------------------------------------------------


@dataclass
class LayerPartial:
    """What one process measured on one layer: exact integers, float64 partial sums per batch, the token sample.

    ``sums`` holds one ``[3, E]`` float64 tensor per batch (gate mass, output norms, gate-weighted output norms),
    keyed by the batch's global index, so the final sums can be added in global batch order wherever the batches
    were forwarded (:mod:`uncurl_hf.distributed`).
    """

    num_tokens: int
    counts: torch.Tensor
    sums: dict[int, torch.Tensor]
    sample: TokenSample


@dataclass
class _TokenIds:
    """The real (non-padding) rows of a flattened batch: mask, row indices, global sequence index, position among
    the sequence's real tokens (CPU tensors; ``on`` caches device copies)."""

    real: torch.Tensor
    rows: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor
    _device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real mask, real row indices)`` on ``device``."""
        if device not in self._device:
            self._device[device] = (self.real.to(device), self.rows.to(device))
        return self._device[device]


class _CalibrationContext:
    """The batch being forwarded: token masks (padding), its global index and first global sequence index."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}
        self.batch_index = 0
        self.sequence_offset = 0
        self._ids: dict[tuple[str, int], _TokenIds] = {}

    def begin(self, masks: dict[str, torch.Tensor], batch_index: int, sequence_offset: int) -> None:
        self.masks, self.batch_index, self.sequence_offset, self._ids = masks, batch_index, sequence_offset, {}

    def clear(self) -> None:
        self.masks, self._ids = {}, {}

    def token_ids(self, mask_key: str, hidden: torch.Tensor, layer: str) -> _TokenIds:
        """Token identities of the rows of ``hidden.reshape(-1, D)`` (computed once per batch and mask)."""
        rows = hidden.numel() // hidden.shape[-1]
        cached = self._ids.get((mask_key, rows))
        if cached is not None:
            return cached
        mask = self.masks.get(mask_key)
        if mask is None:  # no mask for this side: every row is a real token
            batch = hidden.shape[0] if hidden.dim() >= 3 else 1
            mask = torch.ones(batch, rows // batch, dtype=torch.long)
        if mask.numel() != rows:
            raise CalibrationDataError(
                f"Layer {layer}: mask {mask_key} has {mask.numel()} entries for {rows} tokens; batches must carry "
                "masks matching their inputs."
            )
        mask = mask.detach().cpu().reshape(-1, mask.shape[-1]).long()
        sequence = self.sequence_offset + torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)
        real = mask.reshape(-1).bool()
        ids = _TokenIds(
            real, real.nonzero().squeeze(1), sequence.reshape(-1)[real], (mask.cumsum(dim=1) - 1).reshape(-1)[real]
        )
        self._ids[(mask_key, rows)] = ids
        return ids


class _LayerCollector:
    """Hooks accumulating one layer's statistics: on the sparse block, on its router and on every expert module.

    The router logits and the expert outputs are read off the model's own forward instead of being computed again
    (re-running every expert used to double the experts' cost). Each source is checked once per calibration, on the
    first batch: the router's output must match :meth:`MoEFamily.router_logits` (``allclose``) and each expert's
    captured input must be exactly the rows routed to it, in row order (``torch.equal``). From then on only the
    per-expert token counts are compared (a capacity drop changes them); whenever something does not match, the
    logits or the expert outputs are computed again, so the statistics never depend on the shortcut.
    """

    def __init__(
        self, family: MoEFamily, layer: MoELayer, context: _CalibrationContext, hidden_size: int, max_samples: int,
        seed: int,
    ) -> None:
        self.family = family
        self.layer = layer
        self.context = context
        self.max_samples = max_samples
        self.key_base = stable_seed(seed, "calibration-sample", layer.name)
        e = layer.num_experts
        self.partial = LayerPartial(0, torch.zeros(e, dtype=torch.long), {}, TokenSample.empty(e, hidden_size))
        self.captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.router_outputs: list[torch.Tensor] = []
        self.router_checked: bool | None = None  # None: not checked yet; False: the router hook is not usable
        self.experts_checked: bool | None = None
        self.chunks: list[TokenSample] = []  # sample candidates, cut back by _consolidate
        self.chunk_rows = 0
        self.threshold: int | None = None  # keys above it cannot enter the sample any more

    def register(self) -> list[Any]:
        """Install the hooks; returns their handles."""
        handles = [self.layer.module.register_forward_hook(self)]
        if isinstance(self.layer.router, nn.Module):
            handles.append(self.layer.router.register_forward_hook(self._capture_router))
        experts = self.layer.experts
        if len({id(expert) for expert in experts}) == len(experts):  # one module per expert: outputs can be captured
            for index, expert in enumerate(experts):
                if isinstance(expert, nn.Module):
                    handles.append(expert.register_forward_hook(functools.partial(self._capture, index)))
        return handles

    def _capture(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self.captured.setdefault(index, []).append((args[0], output))

    def _capture_router(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.router_outputs.append(output)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured, self.captured = self.captured, {}
        router_outputs, self.router_outputs = self.router_outputs, []
        hidden = args[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        ids = self.context.token_ids(self.layer.mask_key, hidden, self.layer.name)
        if not bool(ids.real.any()):
            return
        self._accumulate(flat, ids, self._router_logits(flat, router_outputs), captured)

    def _router_logits(self, flat: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """``[N, E]`` float32 router logits of every row: the router's own output when it is usable."""
        rows, e = flat.shape[0], self.layer.num_experts
        if self.router_checked is not False and len(outputs) == 1 and outputs[0].numel() == rows * e:
            logits = outputs[0].reshape(rows, e).float()
            if self.router_checked is None:
                expected = self.family.router_logits(self.layer, flat)
                self.router_checked = bool(torch.allclose(logits, expected, rtol=1e-4, atol=1e-5))
                if not self.router_checked:
                    logger.debug("%s: router output differs from router_logits; recomputing", self.layer.name)
                    return expected
            return logits
        return self.family.router_logits(self.layer, flat)

    def _accumulate(
        self,
        flat: torch.Tensor,
        ids: _TokenIds,
        logits: torch.Tensor,
        captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    ) -> None:
        e = self.layer.num_experts
        probs, selected = self.family.routing(logits, self.layer.top_k)
        _, rows = ids.on(flat.device)
        chosen, chosen_probs = selected.index_select(0, rows), probs.index_select(0, rows)
        from_forward = self._captured_norms(flat, selected, captured)
        norms = (
            from_forward.index_select(0, rows) if from_forward is not None
            else self._recomputed_norms(flat.index_select(0, rows), chosen)
        )
        experts = chosen.reshape(-1).cpu()
        gates = chosen_probs.gather(1, chosen).reshape(-1).double().cpu()
        norm_values = norms.reshape(-1).double().cpu()
        sums = torch.zeros(3, e, dtype=torch.float64)
        # float64 partials of this batch: a float32 sum over many tokens depends on how it is split across threads
        sums[0] = chosen_probs.double().sum(dim=0).cpu()
        sums[1].index_add_(0, experts, norm_values)
        sums[2].index_add_(0, experts, norm_values * gates)
        partial = self.partial
        partial.num_tokens += int(chosen.shape[0])
        partial.counts += torch.bincount(experts, minlength=e)
        partial.sums[self.context.batch_index] = sums
        self._offer_sample(flat, logits, ids)

    def _recomputed_norms(self, hidden: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """``[R, k]``: run every routed expert again on its real tokens (when the forward's outputs cannot be used)."""
        norms = torch.zeros(chosen.shape, dtype=torch.float32, device=hidden.device)
        for expert in chosen.unique().tolist():
            slots = chosen == expert  # at most one slot per token: masked assignment follows row order
            out = self.family.run_expert(self.layer, expert, hidden[slots.any(dim=-1)])
            norms[slots] = torch.linalg.vector_norm(out.float(), dim=-1).to(norms.device)
        return norms

    def _captured_norms(
        self, flat: torch.Tensor, selected: torch.Tensor, captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> torch.Tensor | None:
        """``[N, k]`` norms of the model's own expert outputs for every row and routing slot, or ``None`` when they
        cannot be attributed to rows (no capture, other per-expert counts, or the one-time order check failed).

        Experts are called on their routed rows in row order (checked exactly on the first batch); the work is
        vectorised over experts, since per-expert Python loops would cost more than the forward of a small model.
        """
        if not captured or self.experts_checked is False:
            return None
        pairs = selected.reshape(-1)  # the expert of every (row, slot), row-major
        counts = torch.bincount(pairs, minlength=self.layer.num_experts).tolist()
        hit = [e for e, c in enumerate(counts) if c]
        if sorted(captured) != hit or any(len(captured[e]) != 1 for e in hit):
            return None
        calls = [captured[e][0] for e in hit]
        if any(out.shape[0] != counts[e] or inp.numel() != counts[e] * flat.shape[-1]
               for e, (inp, out) in zip(hit, calls)):
            return None  # e.g. tokens dropped by expert capacity
        order = torch.argsort(pairs, stable=True)  # grouped by expert, rows ascending: the order experts saw them
        if self.experts_checked is None:
            expected = flat.index_select(0, order // selected.shape[-1]).split([counts[e] for e in hit])
            self.experts_checked = all(
                torch.equal(inp.reshape(want.shape), want) for (inp, _), want in zip(calls, expected)
            )
            if not self.experts_checked:
                logger.debug("%s: experts see their tokens in another order; re-running them", self.layer.name)
                return None
        in_order = torch.cat([torch.linalg.vector_norm(out.float(), dim=-1) for _, out in calls])
        norms = torch.empty(pairs.shape[0], dtype=torch.float32, device=in_order.device)
        norms[order] = in_order
        return norms.view(selected.shape)

    def _offer_sample(self, flat: torch.Tensor, logits: torch.Tensor, ids: _TokenIds) -> None:
        """Add this batch's real tokens to the sample; tokens whose key cannot enter are never copied.

        Chunks are appended and only cut back to the ``max_samples`` smallest keys once they hold twice that many,
        so the cost stays linear in the number of tokens (no re-sorting of the whole sample every batch).
        """
        keys = token_keys(self.key_base, ids.sequence, ids.position)
        sequence, position = ids.sequence, ids.position
        if self.threshold is None:
            _, rows = ids.on(flat.device)
        else:
            entering = keys <= self.threshold
            if not bool(entering.any()):
                return
            keys, sequence, position = keys[entering], sequence[entering], position[entering]
            rows = ids.rows[entering].to(flat.device)
        self.chunks.append(TokenSample(
            keys, sequence, position, logits.index_select(0, rows).float().cpu(), flat.index_select(0, rows).float().cpu()
        ))
        self.chunk_rows += len(keys)
        if self.chunk_rows >= 2 * self.max_samples:
            self._consolidate()

    def _consolidate(self) -> None:
        sample = TokenSample.concat(self.chunks).smallest(self.max_samples)
        self.chunks, self.chunk_rows = [sample], len(sample)
        self.threshold = sample.threshold(self.max_samples)

    def finish(self) -> LayerPartial:
        """This process' measurements, the sample cut to ``max_samples``."""
        if self.chunks:
            self._consolidate()
            self.partial.sample = self.chunks[0]
        return self.partial


def _gather_partial(partial: LayerPartial, max_samples: int) -> LayerPartial:
    """This layer's measurements of every rank, combined exactly as one process would have measured them (every
    rank gets the result).

    Counts and token totals are ``all_reduce``-d (integers: exact). The per-batch float64 sums are gathered (a few
    floats per batch). Samples go in two steps: keys first, so every rank knows the global winners, then only the
    winning rows.
    """
    from uncurl_hf import distributed

    counts = distributed.all_sum(torch.cat([partial.counts, torch.tensor([partial.num_tokens])]))
    sums: dict[int, torch.Tensor] = {}
    for rank_sums in distributed.all_gather(partial.sums):
        sums.update(rank_sums)
    sample = partial.sample
    columns = distributed.all_gather((sample.keys, sample.sequence, sample.position))
    owner = torch.cat([torch.full((len(keys),), rank) for rank, (keys, _, _) in enumerate(columns)])
    local_index = torch.cat([torch.arange(len(keys)) for keys, _, _ in columns])
    keys, sequence, position = (torch.cat([c[i] for c in columns]) for i in range(3))
    winners = _lexsort(keys, sequence, position)[:max_samples]
    mine = local_index[winners[owner[winners] == torch.distributed.get_rank()]]
    rows = distributed.all_gather(sample.take(mine.sort().values))
    return LayerPartial(
        num_tokens=int(counts[-1]),
        counts=counts[:-1],
        sums=sums,
        sample=TokenSample.concat(rows).smallest(max_samples),
    )


def _layer_stats(layer: MoELayer, hidden_size: int, partial: LayerPartial) -> ExpertStats:
    """:class:`ExpertStats` of a (merged) partial: float sums added in global batch order, sample in token order."""
    stats = ExpertStats.empty(layer, hidden_size)
    stats.num_tokens = partial.num_tokens
    stats.counts = partial.counts.clone()
    total = torch.zeros(3, layer.num_experts, dtype=torch.float64)
    for batch_index in sorted(partial.sums):
        total += partial.sums[batch_index]
    stats.gate_mass, stats.output_norm_sum, stats.weighted_output_norm_sum = total[0], total[1], total[2]
    sample = partial.sample.in_token_order()
    stats.logit_sample, stats.hidden_sample = sample.logits, sample.hidden
    stats.sample_tokens = torch.stack([sample.sequence, sample.position], dim=1)
    return stats


@dataclass
class _Assigned:
    """The batches this process forwards, as ``(global batch index, global index of its first sequence, batch)``."""

    items: Iterator[tuple[int, int, Batch]]
    total: int | None


def _assigned_batches(batches: Iterable[Batch], group: Any) -> _Assigned:
    """All batches in a single process; rank ``r``'s contiguous shard of them in a process group."""
    if group is None:
        start, stop = 0, None
        total = len(batches) if isinstance(batches, Sequence) else None
    else:
        from uncurl_hf.distributed import shard_bounds

        start, stop = shard_bounds(len(batches), group.rank, group.world_size)  # type: ignore[arg-type]
        total = stop - start

    def items() -> Iterator[tuple[int, int, Batch]]:
        offset = 0
        for index, batch in enumerate(batches):
            if index >= start and (stop is None or index < stop):
                yield index, offset, batch
            elif stop is not None and index >= stop:
                return
            offset += int(batch["input_ids"].shape[0])

    return _Assigned(items(), total)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    family: MoEFamily,
    batches: Iterable[Batch],
    max_logit_samples: int = 4096,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> CalibrationStats:
    """Forward ``batches`` through ``model`` (eval mode, no grad) and return per-layer :class:`ExpertStats`.

    Batches are dicts with ``input_ids`` and ``attention_mask`` and, for encoder-decoder models, the decoder side
    as ``labels`` (teacher forcing; ``-100`` marks padding) or ``decoder_input_ids`` (+ ``decoder_attention_mask``).
    Without either, the decoder sees only its start token. The model is left as it was (training flag restored).

    Across processes (``distributed=None`` and an initialised ``torch.distributed`` group of several processes, or
    ``distributed=True``): every rank passes the SAME full list of batches, forwards its contiguous shard, and gets
    the statistics of the whole list, equal to a single-process run (see :mod:`uncurl_hf.distributed` for what is
    exact). ``distributed=False`` calibrates on this process' batches only.
    """
    from uncurl_hf import distributed as dist_utils

    layers = family.sparse_layers(model)
    if not layers:
        from uncurl_hf.errors import UnsupportedModelError

        raise UnsupportedModelError("The model has no sparse MoE layers to calibrate; nothing to prune.")
    group = dist_utils.current(distributed)
    if group is not None:
        batches = list(batches)
        dist_utils.check_same_batches(batches)
    hidden_size = int(layers[0].router.weight.shape[-1])  # routers are [E, D]; not every router is an nn.Linear
    context = _CalibrationContext()
    collectors = [_LayerCollector(family, layer, context, hidden_size, max_logit_samples, seed) for layer in layers]
    handles = [handle for collector in collectors for handle in collector.register()]
    was_training = model.training
    model.eval()
    num_sequences = 0
    show = progress and (group is None or group.is_main)
    try:
        assigned = _assigned_batches(batches, group)
        for index, offset, batch in tqdm(assigned.items, total=assigned.total, desc="calibrating", unit="batch",
                                         disable=not show):
            inputs = family.forward_inputs(model, batch)
            context.begin({k: v for k, v in inputs.items() if k.endswith("attention_mask")}, index, offset)
            model(**inputs)
            num_sequences += int(inputs["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
        context.clear()
        model.train(was_training)
    partials = [collector.finish() for collector in collectors]
    if group is not None:
        num_sequences = int(dist_utils.all_sum(torch.tensor([num_sequences]))[0])
        partials = [_gather_partial(partial, max_logit_samples) for partial in partials]
    if num_sequences == 0:
        raise CalibrationDataError("No calibration batches were given; provide at least one example.")
    stats = CalibrationStats(
        {layer.name: _layer_stats(layer, hidden_size, partial) for layer, partial in zip(layers, partials)},
        num_sequences=num_sequences,
    )
    logger.info(
        "calibrated on %d sequences%s (%s)",
        num_sequences,
        f" across {group.world_size} processes" if group is not None else "",
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
