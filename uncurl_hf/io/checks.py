"""Checks of weight *values* and *shapes*: what a broken checkpoint or an overflowing dtype looks like, told early.

Why these exist: a NaN in one expert used to surface as scipy's "matrix contains invalid numeric entries" deep in a
merge (or not at all: ``frequency`` wrote it out), a config that disagrees with the weights as transformers' "look
at the above report" with no report, and a half-precision merge as "does not reproduce the outputs" with no cause.
Each check here turns one of those into a single :class:`~uncurl_hf.errors.UncurlError` naming the tensor (or layer)
and the fix, raised before the heavy work where the information exists that early:

* :func:`check_model_finite` — the sparse layers' router and expert weights of a loaded model (after loading,
  before calibration); :func:`check_finite` the same for tensors the surgery reads or computes, and
  :func:`check_stored_finite` for stored tensors an out-of-core run copies without decoding;
* :func:`check_stats_finite` — calibration statistics (router logits, gate mass, output norms) per layer;
* :func:`check_shapes_match_config` — the safetensors headers against a meta-device model built from
  ``config.json`` (the logic of :mod:`uncurl_hf.io.verify`, reused), before ``from_pretrained``;
* :func:`storage_state` — what is written: the model's tensors, float32 copies of half-precision values stored
  back in the source dtype (losslessly);
* :func:`compare_written_tensors` and :func:`compare_outputs` — the post-write check of
  :func:`~uncurl_hf.io.checkpoint.write_checkpoint`: the written tensors bit for bit (exact in every dtype), then the
  reloaded forward pass within a tolerance derived from the dtype (exact-ish in float32, a few ulps in half precision,
  where CPU kernels may round differently on differently aligned copies of the same bytes).

Every scan reads one tensor at a time and counts in slices, so memory stays at one tensor plus a small mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from uncurl_hf.errors import CalibrationDataError, CheckpointError, UncurlError

if TYPE_CHECKING:
    from uncurl_hf.calibration.stats import CalibrationStats
    from uncurl_hf.families.base import MoEFamily
    from uncurl_hf.io.safetensors import SafetensorsReader

logger = logging.getLogger(__name__)

_SLICE = 1 << 24  # elements counted per step: the boolean masks stay at 16 MB whatever the tensor size
_STORED_WHOLE = 1 << 28  # bytes: a stored tensor larger than this is read row by row
# Forward-check tolerance (atol = rtol) per dtype, in units of the dtype's machine epsilon: float32 keeps the tight
# bound the check always had (1e-5 / 1e-4 are ~100 / ~800 eps); half precision allows a few ulps of rounding-order
# difference per logit, far below what a wrong config or a missing expert does (differences of order 1).
_FLOAT32_TOLERANCE = (1e-5, 1e-4)
_HALF_TOLERANCE_EPS = 8.0


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, infinite count)`` of a tensor; ``(0, 0)`` for meta and non-floating tensors."""
    if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
        return 0, 0
    flat = tensor.detach().reshape(-1)
    nan = inf = 0
    for part in flat.split(_SLICE):
        # Screen with the sum: one NaN or infinity makes an IEEE sum non-finite, and a sum is one vectorized pass
        # (about 13 GB/s in bfloat16 on CPU, where ``isfinite`` runs at 0.8); a sum that overflows on finite values
        # only falls through to the exact count below.
        if bool(torch.isfinite(part.sum())):
            continue
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def _describe(name: str, tensor: torch.Tensor, nan: int, inf: int, rows: int | None = None) -> str:
    """``"key (expert 3, 5) has 2 NaN and 1 infinite value(s) of 512"``; ``rows`` = experts on the first axis."""
    where = ""
    if rows is not None and tensor.dim() >= 1 and tensor.shape[0] == rows and rows > 1:
        bad = (~torch.isfinite(tensor.detach().reshape(rows, -1))).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        where = f" (expert {shown})"
    return f"{name}{where} has {nan} NaN and {inf} infinite value(s) of {tensor.numel()}"


def _describe_stored(model: nn.Module, name: str, param: torch.Tensor, nan: int, inf: int, rows: int) -> list[str]:
    """The non-finite tensors under the keys the checkpoint stores them (a fused in-memory ``[E, ...]`` parameter is
    one tensor per expert on disk), so the message names what the user can find in the files; the in-memory name
    with the affected experts when the key mapping is unavailable."""
    try:
        from uncurl_hf.io.verify import _stored_state

        stored = _stored_state(model, {name: param.detach()})
    except Exception:  # noqa: BLE001 - only the wording of the message depends on it
        stored = {}
    described = []
    for key, tensor in sorted(stored.items()):
        counts = nonfinite_counts(tensor)
        if sum(counts):
            described.append(_describe(key, tensor, *counts))
    return described or [_describe(name, param, nan, inf, rows)]


def _raise_nonfinite(found: Sequence[str], what: str, fix: str) -> None:
    """One error for every non-finite tensor found: the first described in full, the count of the others."""
    more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
    raise CheckpointError(f"{what}: {found[0]}{more}. {fix}")


_WEIGHTS_FIX = (
    "NaN/Inf weights cannot be calibrated, merged or kept meaningfully. The checkpoint is corrupt or its training "
    "diverged: re-download it, or restore the weights from a good copy."
)


def check_model_finite(model: nn.Module, family: "MoEFamily", source: str | Path | None = None) -> None:
    """Refuse a loaded model whose sparse layers (router and expert weights) hold NaN or infinite values.

    Only the sparse layers are scanned: they are what calibration, the methods and the surgery compute on (a
    non-finite value elsewhere shows up as non-finite router logits, :func:`check_stats_finite`), and it keeps the
    scan at one pass over the tensors already in memory. Meta-device (offloaded) tensors are skipped.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    found: list[str] = []
    seen: set[int] = set()
    for layer in family.sparse_layers(model):
        for param in [*layer.router.parameters(), *layer.module.parameters()]:
            if id(param) in seen:
                continue
            seen.add(id(param))
            nan, inf = nonfinite_counts(param)
            if nan or inf:
                found += _describe_stored(model, names.get(id(param), layer.prefix), param, nan, inf, layer.num_experts)
    if found:
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        overflow = (
            " If the stored weights are finite and only this load is not, they overflow float16: load in bfloat16 "
            "or float32 (--dtype)." if torch.float16 in dtypes else ""
        )
        where = f"The weights of {source}" if source is not None else "The model's weights"
        _raise_nonfinite(found, f"{where} hold non-finite values", _WEIGHTS_FIX + overflow)


def check_finite(tensors: Mapping[str, torch.Tensor], context: str, *, computed: bool = False) -> None:
    """Refuse NaN/Inf in tensors the surgery read (``computed=False``) or produced (``computed=True``).

    ``context`` names where they belong (``"layer encoder.block.1, expert 3"``); meta tensors (dry runs) are skipped.
    A computed non-finite value comes from finite inputs, so it is the arithmetic: merge weights that overflow the
    stored dtype.
    """
    found = []
    for name, tensor in tensors.items():
        nan, inf = nonfinite_counts(tensor)
        if nan or inf:
            found.append(_describe(f"{context}, tensor {name}", tensor, nan, inf))
    if not found:
        return
    if computed:
        dtype = next(iter(tensors.values())).dtype
        _raise_nonfinite(
            found, "The merge produced non-finite values",
            f"The inputs were finite, so the plan's merge weights overflow {str(dtype).removeprefix('torch.')}: "
            "use weights that sum to 1 (edit uncurl_plan.json, or recompute the plan with `uncurl prune`).",
        )
    _raise_nonfinite(found, "The weights hold non-finite values", _WEIGHTS_FIX)


def check_stored_finite(reader: "SafetensorsReader", keys: Iterable[str]) -> None:
    """Refuse stored tensors holding NaN/Inf (tensors an out-of-core run copies without decoding).

    Keys are read one at a time, and a tensor over :data:`_STORED_WHOLE` bytes one first-axis row at a time, so a
    fused multi-GB expert tensor is never held whole: memory stays at the bound streaming promises.
    """
    found = []
    for key in keys:
        stored = reader.info(key)
        if stored.nbytes <= _STORED_WHOLE or len(stored.shape) < 2:
            parts: Iterable[torch.Tensor] = [reader.get(key)]
        else:
            parts = (reader.get_rows(key, row) for row in range(stored.shape[0]))
        nan = inf = 0
        for part in parts:
            counts = nonfinite_counts(part)
            nan, inf = nan + counts[0], inf + counts[1]
        if nan or inf:
            found.append(f"{key} has {nan} NaN and {inf} infinite value(s) of {stored.numel}")
    if found:
        _raise_nonfinite(found, f"The weights in {reader.folder} hold non-finite values", _WEIGHTS_FIX)


def check_stats_finite(stats: "CalibrationStats") -> None:
    """Refuse calibration statistics with NaN/Inf (router logits, gate mass, output norms), naming the first layer.

    The weights were checked finite, so this is activations overflowing on the way to a router (float16 is the usual
    cause) or inputs the model cannot represent; every method would rank or merge experts by garbage.
    """
    bad: list[tuple[str, str]] = []
    for name, layer in stats.items():
        parts = {
            "router logits": layer.logit_sample,
            "gate mass": layer.gate_mass,
            "expert output norms": layer.output_norm_sum,
            "gate-weighted output norms": layer.weighted_output_norm_sum,
        }
        broken = [label for label, tensor in parts.items() if sum(nonfinite_counts(tensor))]
        if broken:
            bad.append((name, " and ".join(broken)))
    if bad:
        name, what = bad[0]
        more = f" ({len(bad)} layers in all)" if len(bad) > 1 else ""
        raise CalibrationDataError(
            f"Calibration gave non-finite {what} in layer {name}{more}: activations overflow before that layer's "
            "router (common for float16 models) or the weights before it are broken. Calibrate in float32 or "
            "bfloat16 (--dtype float32 or --dtype bfloat16); if that does not help, the checkpoint's non-expert "
            "weights are broken: re-download it or restore it from a good copy."
        )


def check_shapes_match_config(folder: str | Path) -> None:
    """Refuse a folder whose stored tensor shapes disagree with the model ``config.json`` describes, before loading.

    The headers (:func:`~uncurl_hf.io.safetensors.stored_tensors`) are compared with a meta-device model built from
    the config, under the keys ``save_pretrained`` writes (:func:`uncurl_hf.io.verify._stored_state`, shared with
    ``uncurl verify``). Only keys present in both are compared: missing or extra keys may be a layout transformers
    converts on load (fused vs per-expert experts), and ``from_pretrained``'s loading report judges those. When the
    config cannot be built here (remote code, an unusual config), nothing is checked and loading reports instead.
    """
    from uncurl_hf.io.verify import _file_shapes, _meta_model, _stored_state

    root = Path(folder)
    try:
        shapes = _file_shapes(root)
        model, _ = _meta_model(root)
        expected = {key: tuple(tensor.shape) for key, tensor in _stored_state(model).items()}
    except UncurlError:
        raise
    except Exception as exc:  # noqa: BLE001 - the load that follows reports what is wrong, in full
        logger.debug("%s: shape check skipped (%s: %s)", root, type(exc).__name__, exc)
        return
    mismatched = [key for key in sorted(set(shapes) & set(expected)) if tuple(shapes[key]) != expected[key]]
    if not mismatched:
        return
    key = mismatched[0]
    more = f" ({len(mismatched)} tensors disagree; also {', '.join(mismatched[1:4])}" \
        f"{', ...' if len(mismatched) > 4 else ''})" if len(mismatched) > 1 else ""
    raise CheckpointError(
        f"The weights in {root} do not match its config.json: tensor {key} is stored with shape "
        f"{list(shapes[key])}, but config.json implies {list(expected[key])}{more}. Check config.json against the "
        "checkpoint (expert counts such as num_experts / num_local_experts, hidden and intermediate sizes): restore "
        "the config.json that came with the weights, or re-download / re-save the checkpoint."
    )


def storage_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to write: the model's, with float32 tensors of a half-precision model stored in its dtype
    where that loses nothing (every value round-trips exactly).

    Why: transformers keeps some modules in float32 in memory (``_keep_in_fp32_modules``: gpt-oss's norms in a
    float16 model; Switch's router after a forward upcasts itself in place), and ``save_pretrained`` would write them
    as float32 into a float16/bfloat16 checkpoint. Their values came from the half-precision source, so storing them
    in the source dtype is exact, keeps the output in the source's dtype and byte-identical to the streamed path
    (which copies the stored bytes); reloading upcasts them again exactly as it did for the source.
    """
    dtype = getattr(model.config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    state = model.state_dict()
    if dtype not in (torch.float16, torch.bfloat16):
        return state
    cast: dict[tuple[int, torch.Size, tuple[int, ...]], torch.Tensor] = {}  # tied tensors stay one tensor
    for key, tensor in state.items():
        if tensor.dtype != torch.float32 or tensor.is_meta:
            continue
        ident = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if ident not in cast:
            narrow = tensor.to(dtype)
            cast[ident] = narrow if torch.equal(narrow.to(torch.float32), tensor) else tensor
        state[key] = cast[ident]
    return state


def compare_written_tensors(model: nn.Module, folder: Path, state: Mapping[str, torch.Tensor] | None = None) -> int:
    """Every tensor in ``folder``'s safetensors files equals, bit for bit and in dtype, what ``model`` holds under
    that key (as ``save_pretrained`` lays keys out); returns how many were compared. ``state`` is the state dict
    that was saved when it is not the model's own (:func:`storage_state`).

    Exact in every dtype, so a half-precision output is held to the same standard as a float32 one: the bytes on
    disk are the bytes of the pruned model. Raises :class:`CheckpointError` naming the first tensor that differs.
    """
    from uncurl_hf.io.safetensors import SafetensorsReader, safetensors_dtype
    from uncurl_hf.io.verify import _stored_state

    expected = _stored_state(model, state)
    problems: list[str] = []
    with SafetensorsReader(folder) as reader:
        for key in reader.keys():
            stored = reader.info(key)
            if key not in expected:
                problems.append(f"{key} is written but the model has no such tensor")
                continue
            want = expected[key].detach()
            if stored.dtype != safetensors_dtype(want.dtype) or tuple(stored.shape) != tuple(want.shape):
                problems.append(
                    f"{key} is written as {stored.dtype}{list(stored.shape)}, the model holds "
                    f"{safetensors_dtype(want.dtype)}{list(want.shape)}"
                )
                continue
            if not _same_bits(reader.get(key), want):
                problems.append(f"{key} ({stored.dtype}) differs from the model's values")
    if problems:
        raise CheckpointError(
            f"The written checkpoint in {folder} does not hold the pruned model's tensors: {problems[0]}"
            f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}. Nothing was written; this is a bug in "
            "uncurl-hf's writer for this model family: please report it with the plan (--dry-run writes it)."
        )
    return len(expected)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``-0.0`` differs from ``0.0``, a NaN equals the same NaN), whatever the dtype."""
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    if a.numel() == 0:
        return b.numel() == 0
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def forward_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing a reloaded model's logits with the in-memory ones computed in ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return _FLOAT32_TOLERANCE
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return _HALF_TOLERANCE_EPS * eps, _HALF_TOLERANCE_EPS * eps


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype among the model's parameters (what its logits are rounded to)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def compare_outputs(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype, folder: Path) -> None:
    """The reloaded logits match the in-memory ones within :func:`forward_tolerance` of ``dtype``; the error names
    the largest difference, the dtype and what to do."""
    want, got = expected.detach().float().cpu(), actual.detach().float().cpu()
    if want.shape != got.shape:
        raise CheckpointError(
            f"The written checkpoint in {folder} gives logits of shape {list(got.shape)}, the pruned model "
            f"{list(want.shape)}; nothing was written. This is a bug in uncurl-hf: please report it with the plan."
        )
    atol, rtol = forward_tolerance(dtype)
    if torch.allclose(want, got, atol=atol, rtol=rtol):
        return
    diff = (want - got).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = int(diff.reshape(-1).argmax())
    name = str(dtype).removeprefix("torch.")
    raise CheckpointError(
        f"The written checkpoint in {folder} does not reproduce the pruned model's outputs: the largest logit "
        f"difference is {float(diff.reshape(-1)[worst]):.4g} (in-memory {float(want.reshape(-1)[worst]):.4g}, "
        f"reloaded {float(got.reshape(-1)[worst]):.4g}), above the {name} tolerance (atol {atol:.3g}, rtol "
        f"{rtol:.3g}), although the written tensors are bit-identical to the in-memory ones. So config.json or the "
        "model class it loads computes differently from the pruned model; nothing was written. This is a bug in "
        "uncurl-hf's support for this model family: please report it with the plan (--dry-run writes it)."
    )


__all__ = [
    "check_finite",
    "check_model_finite",
    "check_shapes_match_config",
    "check_stats_finite",
    "check_stored_finite",
    "compare_outputs",
    "compare_written_tensors",
    "compute_dtype",
    "forward_tolerance",
    "nonfinite_counts",
    "storage_state",
]

