"""`accelerate launch` as a launcher of distributed calibration.

What accelerate 1.x does on a machine without GPUs (read in ``accelerate/commands/launch.py`` and observed):

* ``--multi_gpu --num_processes N`` runs ``torch.distributed.run`` (torchrun), which starts N local processes and
  exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``: the supported way to get N CPU processes without
  MPI (tested end to end below);
* ``--cpu --num_processes N`` (and ``--num_processes N`` alone) goes through the "simple launcher": ONE process, with
  ``MASTER_ADDR``/``MASTER_PORT`` but no rank; several only with ``--mpirun_hostfile`` (mpirun exports its own rank
  variables). ``uncurl_hf.calibration.distributed`` reads those variables and warns about the single-process case.

The environments below are copied from what accelerate 1.15.0 exported to a script that dumped its environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hash_tree

from uncurl_hf.cli.main import main
from uncurl_hf.calibration.distributed import (
    LAUNCHER_VARIABLES,
    LaunchEnv,
    init_from_env,
    launch_env,
    single_process_accelerate_warning,
)
from uncurl_hf.errors import UncurlError

# `accelerate launch --multi_gpu --num_processes 2 script.py`, rank 1 (torchrun's variables; accelerate's own omitted)
TORCHRUN_RANK1 = {
    "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
    "ROLE_RANK": "1", "ROLE_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    "ACCELERATE_MIXED_PRECISION": "no", "TORCHELASTIC_RUN_ID": "none",
}
# `accelerate launch --cpu --num_processes 2 script.py`: the one process it starts
SIMPLE_LAUNCHER = {
    "ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1", "KMP_BLOCKTIME": "1",
}
# `accelerate launch --cpu --num_processes 1 script.py`: one process asked for, one started
SIMPLE_LAUNCHER_ONE = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}


def test_torchrun_variables_exported_by_accelerate_multi_gpu_give_rank_and_world_size():
    assert launch_env(TORCHRUN_RANK1) == LaunchEnv(rank=1, world_size=2, rank_variable="RANK")
    assert single_process_accelerate_warning(TORCHRUN_RANK1) is None


@pytest.mark.parametrize("rank_name,size_name", LAUNCHER_VARIABLES[1:])
def test_mpi_launcher_variables_give_rank_and_world_size(rank_name, size_name):
    # what mpirun exports under `accelerate launch --cpu --mpirun_hostfile H` (plus MASTER_ADDR/PORT by accelerate)
    environ = {**SIMPLE_LAUNCHER, rank_name: "2", size_name: "3"}
    assert launch_env(environ) == LaunchEnv(rank=2, world_size=3, rank_variable=rank_name)
    assert single_process_accelerate_warning(environ) is None


def test_torchrun_variables_take_precedence_over_an_enclosing_mpi_job():
    # torchrun with 2 processes inside a 4-process MPI (e.g. Slurm PMI) allocation: torchrun's group is the one
    assert launch_env({**TORCHRUN_RANK1, "PMI_RANK": "3", "PMI_SIZE": "4"}).rank_variable == "RANK"
    # one torchrun process inside the MPI job is a single-process run, not rank 3 of 4
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1", "PMI_RANK": "3", "PMI_SIZE": "4"}) == LaunchEnv()


def test_no_launcher_is_a_single_process():
    assert launch_env({}) == LaunchEnv(rank=0, world_size=1, rank_variable=None)
    assert launch_env(SIMPLE_LAUNCHER_ONE) == LaunchEnv()
    assert single_process_accelerate_warning(SIMPLE_LAUNCHER_ONE) is None  # nothing more was asked for


def test_accelerate_simple_launcher_with_several_processes_is_a_single_process_with_a_warning():
    assert launch_env(SIMPLE_LAUNCHER) == LaunchEnv()
    warning = single_process_accelerate_warning(SIMPLE_LAUNCHER)
    assert warning is not None
    assert "single process" in warning and "accelerate launch --multi_gpu --num_processes N" in warning


@pytest.mark.parametrize(
    "environ,fragment",
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not an integer"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2 is set but OMPI_COMM_WORLD_RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside [0, WORLD_SIZE=2)"),
    ],
)
def test_inconsistent_launcher_variables_are_refused(environ, fragment):
    with pytest.raises(UncurlError) as info:
        launch_env(environ)
    assert fragment in str(info.value)


@pytest.fixture
def clean_launch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``os.environ`` without any launcher variable (the test then sets the ones it needs)."""
    for pair in LAUNCHER_VARIABLES:
        for name in pair:
            monkeypatch.delenv(name, raising=False)
    for name in ("MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_init_from_env_warns_when_accelerate_started_one_of_several_processes(clean_launch_env, caplog):
    for name, value in SIMPLE_LAUNCHER.items():
        clean_launch_env.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="uncurl_hf.calibration.distributed"):
        assert init_from_env() is False
    assert [r.getMessage() for r in caplog.records] == [single_process_accelerate_warning()]


def test_init_from_env_without_a_rendezvous_address_names_the_variables_to_export(clean_launch_env):
    clean_launch_env.setenv("OMPI_COMM_WORLD_RANK", "0")
    clean_launch_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(UncurlError) as info:
        init_from_env()
    message = str(info.value)
    assert "OMPI_COMM_WORLD_RANK says this is one of 2 processes" in message
    assert "MASTER_ADDR and MASTER_PORT are not set" in message


def test_accelerate_launch_multi_gpu_starts_two_cpu_processes_that_write_the_single_process_bytes(
    switch_dir, calibration_jsonl, tmp_path
):
    """The real launcher, end to end: 2 processes over gloo, rank 0 writes, same bytes as one process."""
    pytest.importorskip("accelerate")

    def argv(out: Path) -> list[str]:
        return ["prune", str(switch_dir), "--calibration-file", str(calibration_jsonl), "--factor", "2", "--method",
                "uncurl", "--seed", "3", "--num-calibration", "12", "--batch-size", "5", "--max-length", "16",
                "-o", str(out), "--no-progress"]

    env = {k: v for k, v in os.environ.items() if not any(k in pair for pair in LAUNCHER_VARIABLES)}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),  # no accelerate default_config.yaml of the machine's user is read
        CUDA_VISIBLE_DEVICES="",  # CPU processes even where GPUs exist (the reference below runs on CPU)
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",  # bit-identical forwards need the reference's thread count (conftest pins 1)
    )
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0", "-m", "uncurl_hf.cli.main", "-v"]
    dist = tmp_path / "dist" / "out"
    proc = subprocess.run([*launch, *argv(dist)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        assert f"process group initialised: rank {rank} of 2 (gloo)" in proc.stderr
    assert proc.stderr.count("calibrated on 12 sequences across 2 processes") == 2
    assert proc.stdout.count(f"wrote {dist}") == 1  # only rank 0 reports (and writes)
    assert sorted(p.name for p in dist.parent.iterdir()) == ["out"]  # one folder, no temp leftovers

    single = tmp_path / "single" / "out"
    assert main(argv(single)) == 0
    assert hash_tree(dist) == hash_tree(single)
