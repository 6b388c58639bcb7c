"""Calibration across processes with ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Every rank is given the SAME full list of calibration batches and forwards only its contiguous shard of them
(:func:`shard_bounds`); :func:`uncurl_hf.calibration.run.calibrate` then combines the per-rank measurements so that the
result equals a single-process run on the same batches:

* integer counts (tokens routed per expert, tokens, sequences): ``all_reduce(SUM)`` — exact;
* float64 sums (gate mass, expert output norms): each rank keeps one partial sum per batch; the partials are
  gathered and added in global batch order, i.e. in exactly the order a single process adds them, so the sums are
  bit-identical (given bit-identical forwards of each batch: same hardware, dtype and thread count). An
  ``all_reduce`` of per-rank totals would add ``(b1 + b2) + (b3 + b4)`` instead of ``((b1 + b2) + b3) + b4``;
* the bounded token sample: every token's sampling key is a hash of (seed, layer, global sequence index, position),
  so "the ``M`` tokens with the smallest keys" is the same set however tokens are split across ranks; ranks first
  gather keys only, agree on the winners, then send just those rows.

Rank 0 is the main process: it alone writes outputs (:func:`uncurl_hf.pipeline.prune.prune`); the others wait for its
result in :func:`broadcast_from_main` and exit cleanly. Works on CPU with the ``gloo`` backend (tested with two
processes on 127.0.0.1) and on GPUs (``cpu:gloo,cuda:nccl``: statistics are exchanged as CPU tensors).

Launchers (:func:`launch_env` reads what they export):

* ``torchrun --nproc_per_node N``: ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``;
* ``accelerate launch --multi_gpu --num_processes N`` runs ``torch.distributed.run`` (torchrun) and exports the same
  variables; it does so on CPU-only machines too (the flag's name notwithstanding), which is how accelerate starts
  several local CPU processes without MPI (tested);
* ``accelerate launch --cpu --mpirun_hostfile H`` starts the processes with ``mpirun``, which exports its own rank
  variables (Intel MPI/MPICH ``PMI_RANK``/``PMI_SIZE``, Open MPI ``OMPI_COMM_WORLD_*``, MVAPICH2 ``MV2_COMM_WORLD_*``,
  read here as accelerate reads them) and accelerate adds ``MASTER_ADDR``/``MASTER_PORT``;
* ``accelerate launch --cpu --num_processes N`` (or without ``--multi_gpu`` on a machine without GPUs) starts ONE
  process: accelerate's simple launcher only exports ``MASTER_ADDR``/``MASTER_PORT``. The run is then an ordinary
  single-process run; :func:`init_from_env` logs a warning naming the command that starts N processes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from uncurl_hf.errors import CalibrationDataError, UncurlError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroupInfo:
    """This process' place in an initialised process group of more than one process."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current(distributed: bool | None = None) -> ProcessGroupInfo | None:
    """The process group to calibrate across, or ``None`` for a single-process run.

    ``distributed=None`` (default) uses the default process group when one is initialised with more than one
    process; ``False`` never does (e.g. a caller that already feeds each rank its own data); ``True`` requires one.
    """
    if distributed is False:
        return None
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not ready:
        if distributed:
            raise UncurlError(
                "distributed=True needs an initialised torch.distributed process group: launch with "
                "`torchrun --nproc_per_node N -m uncurl_hf.cli prune ...` (or `accelerate launch --multi_gpu "
                "--num_processes N -m uncurl_hf.cli prune ...`) or call "
                "uncurl_hf.calibration.distributed.init_from_env() first."
            )
        return None
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return None
    return ProcessGroupInfo(torch.distributed.get_rank(), world_size)


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous shard of ``num_items`` (sizes differ by at most one)."""
    return num_items * rank // world_size, num_items * (rank + 1) // world_size


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors travel bit-exactly), in rank order."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of an integer tensor (exact), as a new CPU tensor."""
    if values.is_floating_point():
        raise TypeError("all_sum is for integer tensors; float sums are gathered and added in batch order")
    total = values.detach().cpu().to(torch.int64).clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total


def batches_fingerprint(batches: Sequence[dict[str, torch.Tensor]]) -> str:
    """SHA-256 of every batch's tensors (names, shapes, dtypes, bytes): equal on every rank or the data differs."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            digest.update(name.encode())
            if isinstance(value, torch.Tensor):
                tensor = value.detach().cpu().contiguous()
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


def check_same_batches(batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Refuse to calibrate when ranks were given different batch lists (each must pass the full, same list)."""
    prints = all_gather(batches_fingerprint(batches))
    if len(set(prints)) != 1:
        counts = all_gather(len(batches))
        raise CalibrationDataError(
            f"Distributed calibration: the ranks were given different calibration batches (batch counts per rank "
            f"{counts}). Give every rank the same full list; each forwards its own shard of it. To calibrate on "
            "per-rank data instead, call calibrate(..., distributed=False) on each rank."
        )


# (rank variable, world-size variable) per launcher, in order of precedence: torchrun (also what `accelerate launch
# --multi_gpu` runs), then the MPI launchers behind `accelerate launch --cpu --mpirun_hostfile` (Intel MPI/MPICH,
# Open MPI, MVAPICH2), the variables accelerate's own `get_cpu_distributed_information` reads.
LAUNCHER_VARIABLES: tuple[tuple[str, str], ...] = (
    ("RANK", "WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
)


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its rank, the number of processes, and which variables said so."""

    rank: int = 0
    world_size: int = 1
    rank_variable: str | None = None  # None: not started by a multi-process launcher


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UncurlError(
            f"The launcher variable {name}={environ[name]!r} is not an integer; unset it or launch with "
            "`torchrun --nproc_per_node N -m uncurl_hf.cli ...`."
        ) from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process' rank and world size from the launcher's variables (``environ`` defaults to ``os.environ``).

    The first launcher of :data:`LAUNCHER_VARIABLES` whose world-size variable is set wins, and its rank variable
    must then be set too (a world size without a rank is not a launch we can join).
    """
    environ = os.environ if environ is None else environ
    for rank_name, size_name in LAUNCHER_VARIABLES:
        if size_name not in environ:
            continue
        world_size = _int_variable(environ, size_name)
        if world_size <= 1:
            return LaunchEnv()
        if rank_name not in environ:
            raise UncurlError(
                f"{size_name}={world_size} is set but {rank_name} is not; launch with "
                "`torchrun --nproc_per_node N -m uncurl_hf.cli ...` (which sets both) or unset it."
            )
        rank = _int_variable(environ, rank_name)
        if not 0 <= rank < world_size:
            raise UncurlError(f"{rank_name}={rank} is outside [0, {size_name}={world_size}); check the launcher.")
        return LaunchEnv(rank=rank, world_size=world_size, rank_variable=rank_name)
    return LaunchEnv()


def single_process_accelerate_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """The warning for ``accelerate launch --num_processes N`` that started one process, else ``None``.

    accelerate's simple launcher (``--cpu``, or no ``--multi_gpu`` on a machine without GPUs) exports
    ``ACCELERATE_USE_CPU``, and ``MASTER_ADDR`` only when more than one process was asked for, but starts a single
    process without rank variables unless ``--mpirun_hostfile`` is given. Silently calibrating in that one process
    is correct but not what the user asked for.
    """
    environ = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" not in environ or "MASTER_ADDR" not in environ or launch_env(environ).world_size > 1:
        return None
    return (
        "accelerate launch started a single process: without --multi_gpu (or --mpirun_hostfile) it does not start "
        "several on CPU. Calibrating in this one process; for N CPU processes use `accelerate launch --multi_gpu "
        "--num_processes N -m uncurl_hf.cli ...` (it runs torchrun and needs no GPU) or `torchrun --nproc_per_node N "
        "-m uncurl_hf.cli ...`."
    )


def process_rank() -> int:
    """This process' rank: from the process group when initialised, else the launcher's (:func:`launch_env`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return launch_env().rank


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when not launched by one); see :func:`launch_env`."""
    return launch_env().world_size


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from the launcher's environment when launched with several processes.

    Returns ``True`` when this call created the group (the caller then destroys it with :func:`shutdown`), ``False``
    when there is nothing to do (single process, or a group already exists). Rank and world size come from
    :func:`launch_env` (torchrun's or an MPI launcher's variables) and are passed explicitly, so that MPI launches
    need no ``RANK``/``WORLD_SIZE``; the rendezvous address is ``MASTER_ADDR``/``MASTER_PORT``. Backend: ``gloo`` on
    CPU-only machines, ``cpu:gloo,cuda:nccl`` when CUDA is available (statistics always travel as CPU tensors).
    """
    launch = launch_env()
    if launch.world_size == 1 or not torch.distributed.is_available():
        warning = single_process_accelerate_warning()
        if warning:
            logger.warning(warning)
        return False
    if torch.distributed.is_initialized():
        return False
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UncurlError(
            f"{launch.rank_variable} says this is one of {launch.world_size} processes, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: export the rank-0 host and a free port as MASTER_ADDR "
            "and MASTER_PORT (accelerate launch and torchrun set them)."
        )
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
    logger.info(
        "process group initialised: rank %d of %d (%s)",
        torch.distributed.get_rank(), torch.distributed.get_world_size(), backend,
    )
    return True


def shutdown(created: bool) -> None:
    """Destroy the default process group if :func:`init_from_env` created it."""
    if created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass
class MainOutcome:
    """What rank 0 tells the other ranks when it is done: its result fields, or the error it stopped on."""

    values: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None


def broadcast_from_main(outcome: MainOutcome | None) -> MainOutcome:
    """Rank 0 sends ``outcome`` to every rank (the others pass ``None`` and wait here for it)."""
    box = [outcome if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    received = box[0]
    assert isinstance(received, MainOutcome)
    return received


@dataclass
class _Handoff:
    """Set by the main process once the ranks have parted ways (only rank 0 writes): what to send them at the end."""

    export: Callable[[Any], dict[str, Any]] | None = None
    armed: bool = False


_HANDOFF: ContextVar[_Handoff | None] = ContextVar("uncurl_handoff", default=None)
F = TypeVar("F", bound=Callable[..., Any])


def arm_handoff(export: Callable[[Any], dict[str, Any]]) -> None:
    """On rank 0 of a :func:`launched` call: the other ranks now wait for this call's outcome.

    When the call returns, ``export(result)`` is sent to them; when it raises, the error message is. Before this
    point every rank runs the same steps (collectives included), so a failure there fails every rank by itself.
    """
    handoff = _HANDOFF.get()
    if handoff is None:
        raise RuntimeError("arm_handoff() outside a @launched call")
    handoff.export, handoff.armed = export, True


def await_main() -> dict[str, Any]:
    """On ranks > 0 of a :func:`launched` call: wait for rank 0's result fields (its error becomes ours)."""
    outcome = broadcast_from_main(None)
    if outcome.error is not None:
        raise UncurlError(f"rank 0 failed, so nothing was written by this run: {outcome.error}")
    return dict(outcome.values or {})


def launched(fn: F) -> F:
    """Decorator for entry points that ``torchrun``/``accelerate launch``/``mpirun`` may start on several processes.

    Initialises the default process group from the launcher's environment (and destroys it afterwards when it
    created it), and delivers rank 0's outcome to the other ranks once :func:`arm_handoff` was called.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        created = init_from_env()
        token = _HANDOFF.set(_Handoff())
        try:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                handoff = _HANDOFF.get()
                if handoff is not None and handoff.armed:
                    name = type(exc).__name__
                    broadcast_from_main(MainOutcome(error=f"{name}: {exc}", error_type=name))
                raise
            handoff = _HANDOFF.get()
            if handoff is not None and handoff.armed and handoff.export is not None:
                broadcast_from_main(MainOutcome(values=handoff.export(result)))
            return result
        finally:
            _HANDOFF.reset(token)
            shutdown(created)

    return wrapper  # type: ignore[return-value]
