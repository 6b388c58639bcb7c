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
are split across processes (:mod:`uncurl_hf.calibration.distributed`) or padded, and it is listed in (sequence, position) order.
Expert output norms are read off the model's own forward (hooks on the expert modules) instead of re-running every
expert, so calibration costs little more than a plain forward (``benchmarks/perf.py`` measures it). What keeps it
cheap on a small model, where every tensor op's fixed cost counts: given a list of batches, each layer's sample is
chosen from the masks before the forward, so a hook copies only the tokens that stay, straight into their final rows;
and the counts and float64 sums of many batches are computed together (:meth:`_LayerCollector._flush`), bit for
bit what batch-by-batch accumulation gives.
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
from uncurl_hf.evaluation.tasks import Example

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
    keys = _token_keys(np.array([base], dtype=np.uint64), sequence.cpu().numpy(), position.cpu().numpy())
    return torch.from_numpy(keys[0])


def _token_keys(bases: np.ndarray, sequence: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``[L, R]`` int64 keys of ``R`` tokens for ``L`` layers at once (:func:`token_keys` with one base per row).

    The layers that read the same tokens share the token-dependent terms, and numpy's per-call cost is paid once
    per batch instead of once per layer (when batches are streamed, hooks need the keys of every batch).
    """
    seq = sequence.astype(np.uint64)
    pos = position.astype(np.uint64)
    with np.errstate(over="ignore"):
        per_sequence = _splitmix64(bases.reshape(-1, 1) ^ _splitmix64(seq * _GOLDEN + np.uint64(1)))
        mixed = _splitmix64(per_sequence + (pos + np.uint64(1)) * _GOLDEN)
    return (mixed >> np.uint64(1)).astype(np.int64)


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
        """The rows ``index`` (a 1-D int64 tensor), copied (``index_select``: a faster row gather than ``t[index]``)."""
        return TokenSample(*(getattr(self, f).index_select(0, index) for f in TokenSample.__dataclass_fields__))

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
        """This sample sorted by (sequence, position); itself when it already is (no copy)."""
        if len(self) == 0:
            return self
        token = self.sequence * (int(self.position.max()) + 1) + self.position  # unique per token
        if bool((token[1:] > token[:-1]).all()):
            return self
        return self.take(torch.argsort(token))


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
    were forwarded (:mod:`uncurl_hf.calibration.distributed`).
    """

    num_tokens: int
    counts: torch.Tensor
    sums: dict[int, torch.Tensor]
    sample: TokenSample


@dataclass
class _TokenIds:
    """The real (non-padding) rows of a flattened batch: mask, row indices (CPU tensors; ``on`` caches device
    copies), and per real row its global sequence index and position among the sequence's real tokens (numpy).

    ``bases`` are the sampling-key bases of the layers that read these rows: :meth:`keys` hashes the tokens for all
    of them at once, on the first layer's request.
    """

    real: torch.Tensor
    rows: torch.Tensor
    sequence: np.ndarray
    position: np.ndarray
    bases: np.ndarray
    _keys: np.ndarray | None = None
    _device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real mask, real row indices)`` on ``device``."""
        if device not in self._device:
            self._device[device] = (self.real.to(device), self.rows.to(device))
        return self._device[device]

    def keys(self, slot: int) -> np.ndarray:
        """``[R]`` int64 sampling keys of the real rows for the layer registered as ``slot``."""
        if self._keys is None:
            self._keys = _token_keys(self.bases, self.sequence, self.position)
        return self._keys[slot]


def _real_tokens(mask: torch.Tensor, sequence_offset: int, bases: np.ndarray) -> _TokenIds:
    """The real tokens of a ``[B, T]`` (or flattened) mask whose first sequence has global index
    ``sequence_offset``: position among the sequence's real tokens counts the mask's non-zero entries."""
    values = mask.detach().cpu().reshape(-1, mask.shape[-1]).long().numpy()
    real = values.reshape(-1) != 0
    real_rows = np.flatnonzero(real)
    return _TokenIds(
        real=torch.from_numpy(real),
        rows=torch.from_numpy(real_rows),
        sequence=sequence_offset + real_rows // values.shape[1],
        position=(values.cumsum(axis=1) - 1).reshape(-1)[real_rows],
        bases=bases,
    )


class _CalibrationContext:
    """The batch being forwarded: token masks (padding), its global index and first global sequence index, and
    the real tokens of its masks when they were worked out before the forward."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}
        self.batch_index = 0
        self.sequence_offset = 0
        self._given: dict[str, _TokenIds] = {}
        self._ids: dict[tuple[str, int], _TokenIds] = {}
        self._bases: dict[str, list[int]] = {}

    def register(self, mask_key: str, key_base: int) -> int:
        """Record a layer reading ``mask_key`` with sampling-key base ``key_base``; returns its slot for
        :meth:`_TokenIds.keys`."""
        bases = self._bases.setdefault(mask_key, [])
        bases.append(key_base)
        return len(bases) - 1

    def bases(self, mask_key: str) -> np.ndarray:
        """The sampling-key bases of the layers registered for ``mask_key``, in slot order."""
        return np.array(self._bases.get(mask_key, []), dtype=np.uint64)

    def begin(
        self, masks: dict[str, torch.Tensor], batch_index: int, sequence_offset: int,
        tokens: dict[str, _TokenIds] | None = None,
    ) -> None:
        self.masks, self.batch_index, self.sequence_offset = masks, batch_index, sequence_offset
        self._given, self._ids = tokens or {}, {}

    def clear(self) -> None:
        self.masks, self._given, self._ids = {}, {}, {}

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
        ids = self._given.get(mask_key)
        if ids is None:
            ids = _real_tokens(mask, self.sequence_offset, self.bases(mask_key))
        self._ids[(mask_key, rows)] = ids
        return ids


class _SampleBuffer:
    """The candidates for one layer's token sample: keys and token ids (numpy), router logits and layer inputs
    (float32 rows, on the CPU), in buffers cut back to the ``limit`` smallest keys once they hold ``2 * limit`` rows.

    Each batch's entering rows are gathered straight into the buffers (one copy), and the cut moves only the
    winners, so the cost stays linear in the number of tokens with no re-sorting of the whole sample every batch.
    Once the sample is full, tokens whose key is above its largest key cannot enter and are never copied.
    """

    def __init__(self, limit: int, key_slot: int) -> None:
        self.limit = limit
        self.key_slot = key_slot
        self.size = 0
        self.keys = np.empty(0, dtype=np.int64)
        self.sequence = np.empty(0, dtype=np.int64)
        self.position = np.empty(0, dtype=np.int64)
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.threshold: int | None = None  # keys above it cannot enter the sample any more

    def offer(self, flat: torch.Tensor, logits: torch.Tensor, ids: _TokenIds, batch_index: int) -> None:
        """Add the real rows of ``flat``/``logits`` whose key can still enter."""
        keys = ids.keys(self.key_slot)
        sequence, position = ids.sequence, ids.position
        if self.threshold is None:
            _, rows = ids.on(flat.device)
        else:
            entering = np.flatnonzero(keys <= self.threshold)
            if entering.size == 0:
                return
            keys, sequence, position = keys[entering], sequence[entering], position[entering]
            rows = ids.rows.index_select(0, torch.from_numpy(entering)).to(flat.device)
        start, stop = self.size, self.size + keys.shape[0]
        self._reserve(stop, logits.shape[-1], flat.shape[-1])
        assert self.logits is not None and self.hidden is not None
        self.keys[start:stop], self.sequence[start:stop], self.position[start:stop] = keys, sequence, position
        _gather_rows(logits, rows, self.logits[start:stop])
        _gather_rows(flat, rows, self.hidden[start:stop])
        self.size = stop
        if stop >= 2 * self.limit:
            self._cut()

    def _reserve(self, needed: int, num_experts: int, hidden_size: int) -> None:
        """Room for ``needed`` rows: ``2 * limit`` plus this batch, the most the buffers hold between cuts.

        Allocated once (again only if a later batch is larger) and uninitialised: the pages of a large allocation
        take memory only when rows are written, and growing step by step would copy the rows each time.
        """
        capacity = self.keys.shape[0]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * self.limit + needed - self.size)
        size = self.size
        for name in ("keys", "sequence", "position"):
            grown = np.empty(capacity, dtype=np.int64)
            grown[:size] = getattr(self, name)[:size]
            setattr(self, name, grown)
        for name, width in (("logits", num_experts), ("hidden", hidden_size)):
            grown_rows = torch.empty(capacity, width, dtype=torch.float32)
            old = getattr(self, name)
            if old is not None and size:
                grown_rows[:size] = old[:size]
            setattr(self, name, grown_rows)

    def _winners(self) -> np.ndarray:
        """Ascending indices of the ``limit`` rows with the smallest (key, sequence, position)."""
        n = self.size
        return _smallest(self.keys[:n], self.sequence[:n], self.position[:n], self.limit)

    def _cut(self) -> None:
        """Keep the ``limit`` smallest keys (moved to the front of the buffers)."""
        assert self.logits is not None and self.hidden is not None
        keep = self._winners()
        index = torch.from_numpy(keep)
        for name in ("keys", "sequence", "position"):
            column = getattr(self, name)
            column[: keep.shape[0]] = column[keep]
        for rows in (self.logits, self.hidden):
            rows[: keep.shape[0]] = rows.index_select(0, index)
        self.size = keep.shape[0]
        self.threshold = int(self.keys[: self.size].max())

    def sample(self) -> TokenSample | None:
        """The ``limit`` smallest keys in (sequence, position) order, as new tensors; ``None`` when empty."""
        if self.size == 0 or self.logits is None or self.hidden is None:
            return None
        keep = self._winners()
        keep = keep[np.lexsort((self.position[keep], self.sequence[keep]))]
        index = torch.from_numpy(keep)
        return TokenSample(
            torch.from_numpy(self.keys[keep]),
            torch.from_numpy(self.sequence[keep]),
            torch.from_numpy(self.position[keep]),
            self.logits.index_select(0, index),
            self.hidden.index_select(0, index),
        )


class _PlannedSample:
    """One layer's token sample when the tokens of every batch are known before the forward (a list of batches):
    the winners (smallest keys) are chosen up front, and each batch's hook copies exactly its winners, straight
    into their final rows (token order). No token is copied that does not stay, and nothing is sorted afterwards.

    ``slots`` maps a global batch index to (rows of the flattened batch, first and last+1 sample row).
    """

    def __init__(
        self, layer: str, keys: np.ndarray, sequence: np.ndarray, position: np.ndarray,
        slots: dict[int, tuple[torch.Tensor, int, int]],
    ) -> None:
        self.layer = layer
        self.keys, self.sequence, self.position = keys, sequence, position
        self.slots = slots
        self.unfilled = set(slots)
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    @classmethod
    def choose(
        cls, layer: str, key_base: int, batches: Sequence[tuple[int, _TokenIds]], mine: set[int], limit: int,
    ) -> "_PlannedSample":
        """The ``limit`` smallest keys among the real tokens of ``batches`` (``(global batch index, tokens)``, in
        batch order), restricted to the batches this process forwards (``mine``)."""
        sequence = np.concatenate([ids.sequence for _, ids in batches])
        position = np.concatenate([ids.position for _, ids in batches])
        keys = _token_keys(np.array([key_base], dtype=np.uint64), sequence, position)[0]
        winners = _smallest(keys, sequence, position, limit)  # ascending: batch order, then row order
        bounds = np.cumsum([0] + [ids.rows.shape[0] for _, ids in batches])
        cuts = np.searchsorted(winners, bounds)
        kept: list[np.ndarray] = []
        slots: dict[int, tuple[torch.Tensor, int, int]] = {}
        size = 0
        for (index, ids), start, first, last in zip(batches, bounds, cuts, cuts[1:]):
            if index not in mine or first == last:
                continue
            local = winners[first:last]
            slots[index] = (ids.rows.index_select(0, torch.from_numpy(local - start)), size, size + last - first)
            kept.append(local)
            size += last - first
        chosen = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        return cls(layer, keys[chosen], sequence[chosen], position[chosen], slots)

    def offer(self, flat: torch.Tensor, logits: torch.Tensor, ids: _TokenIds, batch_index: int) -> None:
        """Copy this batch's winners into their rows of the sample."""
        slot = self.slots.get(batch_index)
        if slot is None:
            return
        rows, start, stop = slot
        if self.logits is None or self.hidden is None:
            self.logits = torch.empty(self.keys.shape[0], logits.shape[-1], dtype=torch.float32)
            self.hidden = torch.empty(self.keys.shape[0], flat.shape[-1], dtype=torch.float32)
        rows = rows.to(flat.device)
        _gather_rows(logits, rows, self.logits[start:stop])
        _gather_rows(flat, rows, self.hidden[start:stop])
        self.unfilled.discard(batch_index)

    def sample(self) -> TokenSample | None:
        """The sample in (sequence, position) order; ``None`` when empty."""
        if self.unfilled:
            raise CalibrationDataError(
                f"Layer {self.layer} did not run on calibration batch {min(self.unfilled)} although its mask has "
                "real tokens for it; every sparse layer must run on every batch (check the batches' masks)."
            )
        if self.logits is None or self.hidden is None:
            return None
        return TokenSample(
            torch.from_numpy(self.keys), torch.from_numpy(self.sequence), torch.from_numpy(self.position),
            self.logits, self.hidden,
        )


def _smallest(keys: np.ndarray, sequence: np.ndarray, position: np.ndarray, limit: int) -> np.ndarray:
    """Ascending indices of the ``limit`` entries with the smallest (key, sequence, position)."""
    if keys.shape[0] <= limit:
        return np.arange(keys.shape[0])
    if limit <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(keys, limit - 1)[:limit]
    if np.count_nonzero(keys <= keys[chosen].max()) > limit:  # a tie at the cut (63-bit keys: ~never)
        chosen = np.lexsort((position, sequence, keys))[:limit]
    return np.sort(chosen)


def _gather_rows(source: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = source[rows]`` as float32 on the CPU, written in place (no intermediate copy when possible)."""
    if source.dtype == out.dtype and source.device == out.device:
        torch.index_select(source, 0, rows, out=out)
    else:
        out.copy_(source.index_select(0, rows))


# Routed batches wait for _flush until they hold this many bytes (router probabilities and choices) per layer.
_FLUSH_BYTES = 4 << 20


@dataclass
class _Pending:
    """One batch's routing, kept until :meth:`_LayerCollector._flush`: probabilities ``[N, E]`` and choices
    ``[N, k]`` of every row, and the expert output norms either grouped by expert (from the forward) or per real
    row and slot (re-run)."""

    batch_index: int
    ids: _TokenIds
    probs: torch.Tensor
    selected: torch.Tensor
    grouped: torch.Tensor | None
    row_norms: torch.Tensor | None


class _LayerCollector:
    """Hooks accumulating one layer's statistics: on the sparse block, on its router and on every expert module.

    The router logits and the expert outputs are read off the model's own forward instead of being computed again
    (re-running every expert used to double the experts' cost). Each source is checked once per calibration, on the
    first batch: the router's output must match :meth:`MoEFamily.router_logits` (``allclose``) and each expert's
    captured input must be exactly the rows routed to it, in row order (``torch.equal``). From then on only the
    per-expert token counts are compared (a capacity drop changes them); whenever something does not match, the
    logits or the expert outputs are computed again, so the statistics never depend on the shortcut. What the
    router and expert hooks see during such a recomputation is discarded, so it cannot be taken for the next
    batch's forward.
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
        self.key_slot = context.register(layer.mask_key, self.key_base)
        e = layer.num_experts
        self.partial = LayerPartial(0, torch.zeros(e, dtype=torch.long), {}, TokenSample.empty(e, hidden_size))
        self.captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.router_outputs: list[torch.Tensor] = []
        self.router_checked: bool | None = None  # None: not checked yet; False: the router hook is not usable
        self.experts_checked: bool | None = None
        self.samples: _SampleBuffer | _PlannedSample = _SampleBuffer(max_samples, self.key_slot)
        self.pending: list[_Pending] = []  # routed batches whose counts and sums wait for _flush
        self.pending_bytes = 0

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
        captured, router_outputs = self.captured, self.router_outputs
        self.captured, self.router_outputs = {}, []
        try:
            hidden = args[0]
            flat = hidden.reshape(-1, hidden.shape[-1])
            ids = self.context.token_ids(self.layer.mask_key, hidden, self.layer.name)
            if ids.rows.shape[0] == 0:
                return
            self._accumulate(flat, ids, self._router_logits(flat, router_outputs), captured)
        finally:  # also drops what a recomputation (router_logits, run_expert) fed to the hooks
            self.captured, self.router_outputs = {}, []

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
        """Route this batch, take its expert output norms, offer its tokens to the sample; the bookkeeping (sums,
        counts) waits for :meth:`_flush`, which does it for many batches at once."""
        probs, selected = self.family.routing(logits, self.layer.top_k)
        grouped = self._captured_norms(flat, selected, captured)
        row_norms = None
        if grouped is None:
            _, rows = ids.on(flat.device)
            row_norms = self._recomputed_norms(flat.index_select(0, rows), selected.index_select(0, rows))
        self.pending.append(_Pending(self.context.batch_index, ids, probs, selected, grouped, row_norms))
        self.pending_bytes += probs.numel() * 4 + selected.numel() * 12
        self.samples.offer(flat, logits, ids, self.context.batch_index)
        if self.pending_bytes >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Counts and float64 sums of the pending batches, computed with one op per step for all of them.

        Each batch keeps its own sums (``partial.sums[batch index]``), bit for bit what batch-by-batch
        accumulation gives: the gate mass is still summed over each batch's own rows, and ``index_add_`` into one
        (batch, expert) bucket per pair adds every bucket's values in row order, as per batch.
        """
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        if not pending:
            return
        e, k = self.layer.num_experts, self.layer.top_k
        probs = torch.cat([p.probs for p in pending])
        selected = torch.cat([p.selected for p in pending])
        device = probs.device
        sizes = [p.probs.shape[0] for p in pending]
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        real = torch.cat([p.ids.rows + start for p, start in zip(pending, starts)]).to(device)
        real_counts = [int(p.ids.rows.shape[0]) for p in pending]
        norms = self._pending_norms(pending, selected, starts)
        chosen = selected.index_select(0, real)
        chosen_probs = probs.index_select(0, real)
        # sums over tokens on the CPU: index_add_ adds in index order there (atomics on a GPU add in any order)
        experts = chosen.reshape(-1).cpu()
        gates = chosen_probs.gather(1, chosen).reshape(-1).double().cpu()
        norm_values = norms.index_select(0, real).reshape(-1).double().cpu()
        batch_of_real = torch.repeat_interleave(torch.arange(len(pending)), torch.tensor(real_counts) * k)
        bucket_of_real = experts + e * batch_of_real
        norm_sums = torch.zeros(len(pending) * e, dtype=torch.float64).index_add_(0, bucket_of_real, norm_values)
        weighted_sums = torch.zeros(len(pending) * e, dtype=torch.float64).index_add_(
            0, bucket_of_real, norm_values * gates
        )
        # float64 partials per batch: a float32 sum over many tokens depends on how it is split across threads
        mass = torch.stack([rows.sum(dim=0) for rows in chosen_probs.double().split(real_counts)]).cpu()
        sums = torch.stack([mass, norm_sums.view(-1, e), weighted_sums.view(-1, e)], dim=1)
        partial = self.partial
        for p, batch_sums in zip(pending, sums.unbind(0)):
            partial.sums[p.batch_index] = batch_sums
        partial.num_tokens += int(real.shape[0])
        partial.counts += torch.bincount(experts, minlength=e)

    def _pending_norms(self, pending: list[_Pending], selected: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """``[N, k]`` expert output norms of every row and slot of the pending batches (``selected``: their
        choices, concatenated; ``starts``: each batch's first row), from the forward's grouped norms or re-runs."""
        e, k = self.layer.num_experts, self.layer.top_k
        device = selected.device
        norms = torch.empty(selected.shape, dtype=torch.float32, device=device)
        sizes = [p.selected.shape[0] for p in pending]
        grouped = [i for i, p in enumerate(pending) if p.grouped is not None]
        if grouped:
            batch_of_pair = torch.repeat_interleave(
                torch.arange(len(pending), device=device), torch.tensor(sizes, device=device) * k
            )
            bucket = selected.reshape(-1) + e * batch_of_pair  # (batch, expert) of every (row, slot)
            pairs: torch.Tensor | None = None
            if len(grouped) < len(pending):  # some batches were re-run: place only the others by bucket
                pairs = torch.cat([torch.arange(starts[i] * k, (starts[i] + sizes[i]) * k, device=device)
                                   for i in grouped])
                bucket = bucket.index_select(0, pairs)
            order = torch.argsort(bucket, stable=True)  # by batch, expert, then row: the order experts saw them
            target = order if pairs is None else pairs.index_select(0, order)
            norms.view(-1)[target] = torch.cat([pending[i].grouped for i in grouped])  # type: ignore[misc]
        for p, start in zip(pending, starts):
            if p.row_norms is not None:
                norms[p.ids.rows.to(device) + start] = p.row_norms.to(norms.dtype)
        return norms

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
        """``[N * k]`` norms of the model's own expert outputs, grouped by expert and in row order within each
        (the order the experts saw their rows), or ``None`` when they cannot be attributed to rows (no capture,
        other per-expert counts, or the one-time order check failed).

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
        if self.experts_checked is None:
            order = torch.argsort(pairs, stable=True)  # grouped by expert, rows ascending: the order experts saw them
            expected = flat.index_select(0, order // selected.shape[-1]).split([counts[e] for e in hit])
            self.experts_checked = all(
                torch.equal(inp.reshape(want.shape), want) for (inp, _), want in zip(calls, expected)
            )
            if not self.experts_checked:
                logger.debug("%s: experts see their tokens in another order; re-running them", self.layer.name)
                return None
        return torch.cat([torch.linalg.vector_norm(out.float(), dim=-1) for _, out in calls])

    def finish(self) -> LayerPartial:
        """This process' measurements, the sample cut to ``max_samples`` and in (sequence, position) order."""
        self._flush()
        sample = self.samples.sample()
        if sample is not None:
            self.partial.sample = sample
        return self.partial


def _gather_partial(partial: LayerPartial, max_samples: int) -> LayerPartial:
    """This layer's measurements of every rank, combined exactly as one process would have measured them (every
    rank gets the result).

    Counts and token totals are ``all_reduce``-d (integers: exact). The per-batch float64 sums are gathered (a few
    floats per batch). Samples go in two steps: keys first, so every rank knows the global winners, then only the
    winning rows.
    """
    from uncurl_hf.calibration import distributed

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


# (global batch index, global index of its first sequence, batch, its model inputs if made already, real tokens per
# mask if worked out already)
_Item = tuple[int, int, Batch, dict[str, torch.Tensor] | None, dict[str, _TokenIds] | None]


@dataclass
class _Prepared:
    """A list of batches looked at before the forward: this process' items and, per mask, the real tokens of EVERY
    batch (each rank looks at all of them: the sample is global)."""

    items: list[_Item]
    tokens: dict[str, list[tuple[int, _TokenIds]]]
    mine: set[int]


def _prepare(
    model: nn.Module, family: MoEFamily, batches: Sequence[Batch], group: Any, context: _CalibrationContext
) -> _Prepared:
    """Real tokens of every batch, from the masks of its model inputs. The inputs are kept for the forward when
    they are on the CPU; on an accelerator they are made again batch by batch (no device memory for all of them)."""
    start, stop = 0, len(batches)
    if group is not None:
        from uncurl_hf.calibration.distributed import shard_bounds

        start, stop = shard_bounds(len(batches), group.rank, group.world_size)
    prepared = _Prepared([], {}, set(range(start, stop)))
    offset = 0
    for index, batch in enumerate(batches):
        inputs = family.forward_inputs(model, batch)
        tokens = {
            key: _real_tokens(mask, offset, context.bases(key))
            for key, mask in inputs.items() if key.endswith("attention_mask")
        }
        for key, ids in tokens.items():
            prepared.tokens.setdefault(key, []).append((index, ids))
        if index in prepared.mine:
            on_cpu = all(value.device.type == "cpu" for value in inputs.values() if isinstance(value, torch.Tensor))
            prepared.items.append((index, offset, batch, inputs if on_cpu else None, tokens))
        offset += int(batch["input_ids"].shape[0])
    return prepared


def _streamed(batches: Iterable[Batch]) -> Iterator[_Item]:
    """Items of batches that can only be iterated once (single process): inputs made as they come."""
    for index, offset, batch in _assigned_batches(batches, None).items:
        yield index, offset, batch, None, None


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
        from uncurl_hf.calibration.distributed import shard_bounds

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
    the statistics of the whole list, equal to a single-process run (see :mod:`uncurl_hf.calibration.distributed` for what is
    exact). ``distributed=False`` calibrates on this process' batches only.
    """
    from uncurl_hf.calibration import distributed as dist_utils

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
    # eval() and train() walk every module (milliseconds on a big model): skip both when nothing is in training mode
    switch_mode = any(module.training for module in model.modules())
    if switch_mode:
        model.eval()
    num_sequences = 0
    show = progress and (group is None or group.is_main)
    try:
        items: Iterable[_Item]
        if isinstance(batches, Sequence):  # every token is known up front: choose each layer's sample now
            prepared = _prepare(model, family, batches, group, context)
            for collector in collectors:
                tokens = prepared.tokens.get(collector.layer.mask_key)
                if tokens is not None and len(tokens) == len(batches):
                    collector.samples = _PlannedSample.choose(
                        collector.layer.name, collector.key_base, tokens, prepared.mine, max_logit_samples
                    )
            items = prepared.items
        else:
            items = _streamed(batches)
        total = len(items) if isinstance(items, list) else None
        for index, offset, batch, ready, tokens in tqdm(items, total=total, desc="calibrating", unit="batch",
                                                         disable=not show):
            inputs = ready if ready is not None else family.forward_inputs(model, batch)
            context.begin({k: v for k, v in inputs.items() if k.endswith("attention_mask")}, index, offset, tokens)
            model(**inputs)
            num_sequences += int(inputs["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
        context.clear()
        if switch_mode:
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
