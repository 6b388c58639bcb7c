"""Calibration: run task examples through the model once and record, per sparse layer, how the router uses each
expert on *this task* (:func:`calibrate` -> :class:`~uncurl_hf.calibration.stats.CalibrationStats`).

Hooks sit on every sparse MLP, encoder and decoder (:mod:`uncurl_hf.calibration.hooks`); each layer keeps a
bounded, seeded token sample that depends on the data alone (:mod:`uncurl_hf.calibration.sampling`). Given a list
of batches, every batch's real tokens are worked out from its masks before the forward, so each layer's sample is
chosen up front. Across processes every rank forwards its shard of the same list and the per-rank measurements
are combined here (:func:`_gather_partial`) into exactly what one process would have measured.

The model may sit on any device, in any dtype: batches go to the device of its input embeddings (the first
module an accelerate-dispatched model runs), and the statistics are accumulated on the CPU in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from uncurl_hf.calibration.hooks import CalibrationContext, LayerCollector
from uncurl_hf.calibration.sampling import PlannedSample, TokenIds, TokenSample, lexsort, real_tokens
from uncurl_hf.calibration.stats import CalibrationStats, LayerPartial, layer_stats
from uncurl_hf.errors import CalibrationDataError
from uncurl_hf.families.devices import input_device
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.io.memory import trim_heap

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


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
    winners = lexsort(keys, sequence, position)[:max_samples]
    mine = local_index[winners[owner[winners] == torch.distributed.get_rank()]]
    rows = distributed.all_gather(sample.take(mine.sort().values))
    return LayerPartial(
        num_tokens=int(counts[-1]),
        counts=counts[:-1],
        sums=sums,
        sample=TokenSample.concat(rows).smallest(max_samples),
    )


def _on_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``inputs`` with every tensor on ``device`` (the same tensors when they are there already)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


# (global batch index, global index of its first sequence, batch, its model inputs if made already, real tokens per
# mask if worked out already)
_Item = tuple[int, int, Batch, dict[str, torch.Tensor] | None, dict[str, TokenIds] | None]


@dataclass
class _Prepared:
    """A list of batches looked at before the forward: this process' items and, per mask, the real tokens of EVERY
    batch (each rank looks at all of them: the sample is global)."""

    items: list[_Item]
    tokens: dict[str, list[tuple[int, TokenIds]]]
    mine: set[int]


def _prepare(
    model: nn.Module, family: MoEFamily, batches: Sequence[Batch], group: Any, context: CalibrationContext,
    device: torch.device,
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
        inputs = _on_device(family.forward_inputs(model, batch), device)
        tokens = {
            key: real_tokens(mask, offset, context.bases(key))
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
    only: Collection[str] | None = None,
) -> CalibrationStats:
    """Forward ``batches`` through ``model`` (eval mode, no grad) and return per-layer :class:`ExpertStats`.

    ``only``: the names of the layers to collect statistics of (default: every sparse layer). Each layer's statistics
    do not depend on which others are collected; sequential planning leaves out the layers it has already pruned.
    A logical merge's layer (router rule ``"map"``) is calibrated per router row, i.e. over its original experts.

    Batches are dicts with ``input_ids`` and ``attention_mask`` and, for encoder-decoder models, the decoder side
    as ``labels`` (teacher forcing; ``-100`` marks padding) or ``decoder_input_ids`` (+ ``decoder_attention_mask``).
    Without either, the decoder sees only its start token. The model is left as it was (training flag restored).

    The model may be on any device and in any dtype (fp32, bf16, fp16): batches go to :func:`input_device`, and the
    statistics are CPU tensors accumulated in float64 (router logits and samples in float32), so the integer counts
    of a bf16 model equal its fp32 counts wherever routing is decisive.

    Across processes (``distributed=None`` and an initialised ``torch.distributed`` group of several processes, or
    ``distributed=True``): every rank passes the SAME full list of batches, forwards its contiguous shard, and gets
    the statistics of the whole list, equal to a single-process run (see :mod:`uncurl_hf.calibration.distributed` for
    what is exact). ``distributed=False`` calibrates on this process' batches only.
    """
    from uncurl_hf.calibration import distributed as dist_utils

    # a logical merge's layer is calibrated per router row (its original experts): see MoELayer.per_router_row
    layers = [layer.per_router_row() for layer in family.sparse_layers(model) if only is None or layer.name in only]
    if not layers:
        from uncurl_hf.errors import UnsupportedModelError

        raise UnsupportedModelError("The model has no sparse MoE layers to calibrate; nothing to prune.")
    group = dist_utils.current(distributed)
    if group is not None:
        batches = list(batches)
        dist_utils.check_same_batches(batches)
    device = input_device(model)
    hidden_size = int(layers[0].router.weight.shape[-1])  # routers are [E, D]; not every router is an nn.Linear
    context = CalibrationContext()
    collectors = [LayerCollector(family, layer, context, hidden_size, max_logit_samples, seed) for layer in layers]
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
            prepared = _prepare(model, family, batches, group, context, device)
            for collector in collectors:
                tokens = prepared.tokens.get(collector.layer.mask_key)
                if tokens is not None and len(tokens) == len(batches):
                    collector.samples = PlannedSample.choose(
                        collector.layer.name, collector.key_base, tokens, prepared.mine, max_logit_samples
                    )
            items = prepared.items
        else:
            items = _streamed(batches)
        total = len(items) if isinstance(items, list) else None
        for index, offset, batch, ready, tokens in tqdm(items, total=total, desc="calibrating", unit="batch",
                                                         disable=not show):
            inputs = ready if ready is not None else _on_device(family.forward_inputs(model, batch), device)
            context.begin({k: v for k, v in inputs.items() if k.endswith("attention_mask")}, index, offset, tokens)
            model(**inputs)
            num_sequences += int(inputs["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
        context.clear()
        if switch_mode:
            model.train(was_training)
        trim_heap()  # the forward's freed activations, before the surgery allocates (not per batch: see trim_heap)
    partials = [collector.finish() for collector in collectors]
    if group is not None:
        num_sequences = int(dist_utils.all_sum(torch.tensor([num_sequences]))[0])
        partials = [_gather_partial(partial, max_logit_samples) for partial in partials]
    if num_sequences == 0:
        raise CalibrationDataError("No calibration batches were given; provide at least one example.")
    stats = CalibrationStats(
        {layer.name: layer_stats(layer, hidden_size, partial) for layer, partial in zip(layers, partials)},
        num_sequences=num_sequences,
    )
    logger.info(
        "calibrated on %d sequences%s (%s)",
        num_sequences,
        f" across {group.world_size} processes" if group is not None else "",
        ", ".join(f"{name}: {s.num_tokens} tokens" for name, s in stats.items()),
    )
    return stats

