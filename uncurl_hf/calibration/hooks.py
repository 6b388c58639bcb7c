"""The hooks of calibration: per sparse layer, a :class:`LayerCollector` on the sparse block, its router and every
expert module, fed the batch being forwarded by a shared :class:`CalibrationContext`.

For the real tokens entering a layer (padding excluded with the encoder mask on encoder layers and the decoder mask
on decoder layers) the collector reads the router logits and records, per expert: tokens routed (the router's top-k
choice, before any capacity drop), summed router probability (gate mass), summed L2 norm of the expert's own output
on its routed tokens (raw and multiplied by the gate, the REAP saliency), and offers the tokens to the layer's sample
(:mod:`uncurl_hf.calibration.sampling`). Expert output norms are read off the model's own forward instead of
re-running every expert (hooks on the expert modules of Switch; for the fused experts of decoder families,
:mod:`uncurl_hf.calibration.slots`), so calibration costs little more than a plain forward (``benchmarks/perf.py``
and ``benchmarks/timing.py`` measure it); the counts and float64 sums of many batches are computed together
(:meth:`LayerCollector._flush`), bit for bit what batch-by-batch accumulation gives.

Whatever the model's device and dtype, what the hooks keep lives on the CPU: router logits are moved there as
float32 (routing is decided from them there), expert output norms are moved there, sampled inputs are copied there
as float32, and every sum is float64 on the CPU (``index_add_`` adds in index order there; atomics on a GPU add in
any order).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from uncurl_hf.calibration.sampling import PlannedSample, SampleBuffer, TokenIds, TokenSample, real_tokens
from uncurl_hf.calibration.slots import SlotCapture, capturable
from uncurl_hf.calibration.stats import LayerPartial
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.seeding import stable_seed

logger = logging.getLogger(__name__)


class CalibrationContext:
    """The batch being forwarded: token masks (padding), its global index and first global sequence index, and
    the real tokens of its masks when they were worked out before the forward."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}
        self.batch_index = 0
        self.sequence_offset = 0
        self._given: dict[str, TokenIds] = {}
        self._ids: dict[tuple[str, int], TokenIds] = {}
        self._bases: dict[str, list[int]] = {}

    def register(self, mask_key: str, key_base: int) -> int:
        """Record a layer reading ``mask_key`` with sampling-key base ``key_base``; returns its slot for
        :meth:`TokenIds.keys`."""
        bases = self._bases.setdefault(mask_key, [])
        bases.append(key_base)
        return len(bases) - 1

    def bases(self, mask_key: str) -> np.ndarray:
        """The sampling-key bases of the layers registered for ``mask_key``, in slot order."""
        return np.array(self._bases.get(mask_key, []), dtype=np.uint64)

    def begin(
        self, masks: dict[str, torch.Tensor], batch_index: int, sequence_offset: int,
        tokens: dict[str, TokenIds] | None = None,
    ) -> None:
        self.masks, self.batch_index, self.sequence_offset = masks, batch_index, sequence_offset
        self._given, self._ids = tokens or {}, {}

    def clear(self) -> None:
        self.masks, self._given, self._ids = {}, {}, {}

    def token_ids(self, mask_key: str, hidden: torch.Tensor, layer: str) -> TokenIds:
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
            ids = real_tokens(mask, self.sequence_offset, self.bases(mask_key))
        self._ids[(mask_key, rows)] = ids
        return ids


# Routed batches wait for _flush until they hold this many bytes (router probabilities and choices) per layer.
_FLUSH_BYTES = 4 << 20


@dataclass
class _Pending:
    """One batch's routing, kept until :meth:`LayerCollector._flush`: probabilities ``[N, E]`` and choices
    ``[N, k]`` of every row, and the expert output norms either grouped by expert (from the forward) or per real
    row and slot (re-run)."""

    batch_index: int
    ids: TokenIds
    probs: torch.Tensor
    selected: torch.Tensor
    grouped: torch.Tensor | None
    row_norms: torch.Tensor | None


class LayerCollector:
    """Hooks accumulating one layer's statistics: on the sparse block, on its router and on every expert module
    (or on the one fused experts module, through a :class:`SlotCapture`).

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
        self, family: MoEFamily, layer: MoELayer, context: CalibrationContext, hidden_size: int, max_samples: int,
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
        self.samples: SampleBuffer | PlannedSample = SampleBuffer(max_samples, self.key_slot)
        self.pending: list[_Pending] = []  # routed batches whose counts and sums wait for _flush
        self.pending_bytes = 0
        fused = family.fused_experts(layer)
        self.slots = SlotCapture(fused) if capturable(fused) else None

    def register(self) -> list[Any]:
        """Install the hooks; returns their handles."""
        handles = [self.layer.module.register_forward_hook(self)]
        if self.slots is not None:
            handles += self.slots.register()
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
        # decoder top-k routers (Qwen3-MoE, Mixtral, OLMoE, ...) return (logits, scores, indices): their logits are
        # the same product router_logits computes, so one linear per layer call is not run twice
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            output = output[0]
        if isinstance(output, torch.Tensor):
            self.router_outputs.append(output)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured, router_outputs = self.captured, self.router_outputs
        self.captured, self.router_outputs = {}, []
        slot_calls = self.slots.take() if self.slots is not None else []
        try:
            hidden = args[0]
            flat = hidden.reshape(-1, hidden.shape[-1])
            ids = self.context.token_ids(self.layer.mask_key, hidden, self.layer.name)
            if ids.rows.shape[0] == 0:
                return
            logits = self._router_logits(flat, router_outputs).cpu()  # routed and kept on the CPU (float32)
            self._accumulate(flat, ids, logits, captured, slot_calls)
        finally:  # also drops what a recomputation (router_logits, run_expert) fed to the hooks
            self.captured, self.router_outputs = {}, []
            if self.slots is not None:
                self.slots.take()

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
        ids: TokenIds,
        logits: torch.Tensor,
        captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
        slot_calls: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Route this batch, take its expert output norms, offer its tokens to the sample; the bookkeeping (sums,
        counts) waits for :meth:`_flush`, which does it for many batches at once.

        ``flat`` (the layer input) is on the model's device in the model's dtype, ``logits`` on the CPU in float32:
        routing, norms and every sum are CPU tensors from here on, whatever the model's device.
        """
        probs, selected = self.family.routing(logits, self.layer.top_k)
        grouped = self._captured_norms(flat, selected, captured)
        row_norms = None
        if grouped is None:
            _, rows = ids.on(flat.device)
            row_norms = _slot_norms(slot_calls, selected, rows)
            if row_norms is None:
                row_norms = self._recomputed_norms(flat.index_select(0, rows), selected.index_select(0, ids.rows))
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
        chosen_gates = chosen_probs.gather(1, chosen)  # [N, k] softmax probabilities of the chosen experts
        gates = chosen_gates.reshape(-1).double().cpu()
        if self.layer.renormalized:  # the gate the model applies (Mixtral, gpt-oss, norm_topk_prob)
            applied = (chosen_gates / chosen_gates.sum(dim=1, keepdim=True)).reshape(-1).double().cpu()
        else:
            applied = gates
        norm_values = norms.index_select(0, real).reshape(-1).double().cpu()
        batch_of_real = torch.repeat_interleave(torch.arange(len(pending)), torch.tensor(real_counts) * k)
        bucket_of_real = experts + e * batch_of_real
        norm_sums = torch.zeros(len(pending) * e, dtype=torch.float64).index_add_(0, bucket_of_real, norm_values)
        weighted_sums = torch.zeros(len(pending) * e, dtype=torch.float64).index_add_(
            0, bucket_of_real, norm_values * gates
        )
        applied_sums = torch.zeros(len(pending) * e, dtype=torch.float64).index_add_(
            0, bucket_of_real, norm_values * applied
        )
        # float64 partials per batch: a float32 sum over many tokens depends on how it is split across threads
        mass = torch.stack([rows.sum(dim=0) for rows in chosen_probs.double().split(real_counts)]).cpu()
        sums = torch.stack([mass, norm_sums.view(-1, e), weighted_sums.view(-1, e), applied_sums.view(-1, e)], dim=1)
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
        """``[R, k]`` on the CPU: run every routed expert again on its real tokens ``hidden`` (on the model's
        device; ``chosen``, on the CPU, are their choices) when the forward's outputs cannot be used."""
        norms = torch.zeros(chosen.shape, dtype=torch.float32)
        for expert in chosen.unique().tolist():
            slots = chosen == expert  # at most one slot per token: masked assignment follows row order
            out = self.family.run_expert(self.layer, expert, hidden[slots.any(dim=-1).to(hidden.device)])
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
            rows = (order // selected.shape[-1]).to(flat.device)
            expected = flat.index_select(0, rows).split([counts[e] for e in hit])
            self.experts_checked = all(
                torch.equal(inp.reshape(want.shape), want) for (inp, _), want in zip(calls, expected)
            )
            if not self.experts_checked:
                logger.debug("%s: experts see their tokens in another order; re-running them", self.layer.name)
                return None
        return torch.cat([torch.linalg.vector_norm(out.float(), dim=-1) for _, out in calls]).cpu()

    def finish(self) -> LayerPartial:
        """This process' measurements, the sample cut to ``max_samples`` and in (sequence, position) order."""
        self._flush()
        sample = self.samples.sample()
        if sample is not None:
            self.partial.sample = sample
        return self.partial


def _slot_norms(
    calls: list[tuple[torch.Tensor, torch.Tensor]], selected: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor | None:
    """``[R, k]`` on the CPU: the output norms of the real ``rows`` per slot, from the fused experts' one call of
    this forward (:class:`SlotCapture`), or ``None`` when there is no such call or its experts are not ``selected``
    (the choices the statistics use), slot for slot."""
    if len(calls) != 1:
        return None
    index, outputs = calls[0]
    if index.shape != selected.shape or not torch.equal(index.to("cpu", selected.dtype), selected):
        return None
    return torch.linalg.vector_norm(outputs.index_select(0, rows).float(), dim=-1).cpu()
