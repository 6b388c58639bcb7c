"""The bounded, seeded token sample of each sparse layer: (router logits, layer input) pairs for methods that cluster
experts by their logit profiles (UNCURL) or compare expert outputs (HC-SMoE).

The sample keeps the ``max_logit_samples`` tokens with the smallest keys, where a token's key is a hash of (seed,
layer, global sequence index, position among the sequence's real tokens) — not a random stream consumed in
arrival order. That makes the sample a property of the data alone: the same tokens are chosen however the batches
are split across processes (:mod:`uncurl_hf.calibration.distributed`) or padded, and it is listed in (sequence,
position) order. Given a list of batches, each layer's sample is chosen from the masks before the forward
(:class:`PlannedSample`), so a hook copies only the tokens that stay, straight into their final rows; batches that
can only be iterated once go through a buffer cut back to the smallest keys (:class:`SampleBuffer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from uncurl_hf.errors import CalibrationDataError

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
            order = lexsort(self.keys, self.sequence, self.position)
        return self.take(order[:limit])

    def in_token_order(self) -> "TokenSample":
        """This sample sorted by (sequence, position); itself when it already is (no copy)."""
        if len(self) == 0:
            return self
        token = self.sequence * (int(self.position.max()) + 1) + self.position  # unique per token
        if bool((token[1:] > token[:-1]).all()):
            return self
        return self.take(torch.argsort(token))


def lexsort(*columns: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by ``columns[0]``, then ``columns[1]``, ... (stable sorts, last column first)."""
    order = torch.arange(columns[0].shape[0])
    for column in reversed(columns):
        order = order[torch.argsort(column[order], stable=True)]
    return order


@dataclass
class TokenIds:
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


def real_tokens(mask: torch.Tensor, sequence_offset: int, bases: np.ndarray) -> TokenIds:
    """The real tokens of a ``[B, T]`` (or flattened) mask whose first sequence has global index
    ``sequence_offset``: position among the sequence's real tokens counts the mask's non-zero entries."""
    values = mask.detach().cpu().reshape(-1, mask.shape[-1]).long().numpy()
    real = values.reshape(-1) != 0
    real_rows = np.flatnonzero(real)
    return TokenIds(
        real=torch.from_numpy(real),
        rows=torch.from_numpy(real_rows),
        sequence=sequence_offset + real_rows // values.shape[1],
        position=(values.cumsum(axis=1) - 1).reshape(-1)[real_rows],
        bases=bases,
    )


class SampleBuffer:
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

    def offer(self, flat: torch.Tensor, logits: torch.Tensor, ids: TokenIds, batch_index: int) -> None:
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


class PlannedSample:
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
        cls, layer: str, key_base: int, batches: Sequence[tuple[int, TokenIds]], mine: set[int], limit: int,
    ) -> "PlannedSample":
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

    def offer(self, flat: torch.Tensor, logits: torch.Tensor, ids: TokenIds, batch_index: int) -> None:
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
    """``out[:] = source[rows]`` as float32 on the CPU, written in place (no intermediate copy when possible).

    ``source`` may be on any device and in any dtype (the gather runs there, then only the rows travel);
    ``rows`` is moved to it when it is elsewhere.
    """
    if rows.device != source.device:
        rows = rows.to(source.device)
    if source.dtype == out.dtype and source.device == out.device:
        torch.index_select(source, 0, rows, out=out)
    else:
        out.copy_(source.index_select(0, rows))


