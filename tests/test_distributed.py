"""Distributed calibration: two CPU processes over gloo on 127.0.0.1 give exactly the single-process statistics,
sample and plan, and `uncurl prune` launched like torchrun writes the same bytes once (rank 0 only).

The ranks are forked children of the test process (tests/forked.py), so they start in milliseconds; each joins a
real gloo process group on a free local port, exactly as under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, hash_tree
from transformers import AutoTokenizer

import forked
from uncurl_hf import build_batches, calibrate, get_method, load_model
from helpers import make_recipe
from uncurl_hf.calibration import distributed
from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.cli.main import main
from uncurl_hf.families import get_family
from uncurl_hf.evaluation.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
MAX_SAMPLES = 20  # fewer than the encoder's ~100 real tokens: the sample really is a choice
FIELDS = ("counts", "gate_mass", "output_norm_sum", "weighted_output_norm_sum", "logit_sample", "hidden_sample",
          "sample_tokens")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_env(rank: int, world_size: int, port: int) -> None:
    """What torchrun exports to each worker (plus gloo on the loopback interface)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )


def batches_for(model_dir: Path, examples: list[Example] = EXAMPLES) -> list[dict]:
    # batch size 5: batches of 5, 5 and 2 sequences, so rank 0 forwards one batch and rank 1 two
    return build_batches(examples, AutoTokenizer.from_pretrained(model_dir), batch_size=5, max_length=16)


def stats_and_plans(model_dir: Path) -> dict:
    """Calibrate (in whatever process group is current) and plan with frequency and uncurl at factor 2."""
    model = load_model(model_dir)
    family = get_family(model)
    stats = calibrate(model, family, batches_for(model_dir), max_logit_samples=MAX_SAMPLES, seed=5, progress=False)
    budget = expert_budget(family.layer_sizes(model), 2.0)
    plans = {
        name: get_method(name)(stats, model, family, budget, make_recipe(method=name, factor=2.0, seed=5)).to_dict()
        for name in ("frequency", "uncurl")
    }
    return {
        "num_sequences": stats.num_sequences,
        "layers": {n: {"num_tokens": s.num_tokens, **{f: getattr(s, f) for f in FIELDS}} for n, s in stats.items()},
        "plans": plans,
    }


def _rank_calibrates(rank: int, port: int, model_dir: str, out_dir: str) -> bool:
    """Child: join a 2-process gloo group, calibrate + plan, save the result as ``out_dir/rank{rank}.pt``."""
    torchrun_env(rank, 2, port)
    torch.distributed.init_process_group("gloo")
    try:
        torch.save(stats_and_plans(Path(model_dir)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
    return True


def _rank_calibrates_own_data(rank: int, port: int, model_dir: str) -> str:
    """Child: each rank passes different batches; calibrate must refuse (and say how to do per-rank data)."""
    torchrun_env(rank, 2, port)
    torch.distributed.init_process_group("gloo")
    try:
        model = load_model(model_dir)
        try:
            calibrate(model, get_family(model), batches_for(Path(model_dir), EXAMPLES[rank::2]), progress=False)
        except Exception as exc:  # noqa: BLE001 - the message is the result
            return f"{type(exc).__name__}: {exc}"
        return "no error"
    finally:
        torch.distributed.destroy_process_group()


def _rank_runs_cli(rank: int, port: int, argv: list[str]) -> dict:
    """Child: `uncurl prune ...` as torchrun would start it on rank ``rank`` of 2."""
    torchrun_env(rank, 2, port)
    code = main(argv)
    out = Path(argv[argv.index("-o") + 1])
    return {"code": code, "output_exists": out.is_dir(), "group_left": torch.distributed.is_initialized()}


def _rank_joins_with_mpi_variables(rank: int, port: int) -> dict:
    """Child: only an MPI launcher's variables (Open MPI's, as under `accelerate launch --cpu --mpirun_hostfile`)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    created = distributed.init_from_env()
    try:
        total = distributed.all_sum(torch.tensor([rank + 1]))
        return {"created": created, "rank": torch.distributed.get_rank(),
                "world_size": torch.distributed.get_world_size(), "sum": int(total)}
    finally:
        distributed.shutdown(created)


def run_ranks(target, *args, world_size: int = 2) -> list:
    children = [forked.start(target, rank, *args) for rank in range(world_size)]
    results = []
    for child in children:
        code, lines = child.join(timeout=240)
        final = json.loads(lines[-1]) if lines else {}
        assert code == 0 and "result" in final, f"rank failed (exit {code}): {final.get('traceback') or final}"
        results.append(final["result"])
    return results


def test_two_gloo_ranks_give_the_single_process_stats_sample_and_plans_exactly(switch_dir, tmp_path):
    run_ranks(_rank_calibrates, free_port(), str(switch_dir), str(tmp_path))
    single = stats_and_plans(switch_dir)
    for rank in range(2):
        merged = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert merged["num_sequences"] == single["num_sequences"] == len(EXAMPLES)
        for layer, expected in single["layers"].items():
            got = merged["layers"][layer]
            assert got["num_tokens"] == expected["num_tokens"], layer
            for name in FIELDS:
                assert torch.equal(got[name], expected[name]), f"rank {rank}, {layer}: {name} differs"
        assert merged["plans"] == single["plans"]
    encoder_sample = single["layers"]["encoder.block.1"]["sample_tokens"]
    assert encoder_sample.shape == (MAX_SAMPLES, 2)
    # the sample draws from both shards (sequences 0-4 were forwarded by rank 0, 5-11 by rank 1) ...
    assert (encoder_sample[:, 0] < 5).any() and (encoder_sample[:, 0] >= 5).any()
    # ... and is listed in (sequence, position) order
    keys = encoder_sample[:, 0] * 1000 + encoder_sample[:, 1]
    assert torch.equal(keys, keys.sort().values)


def test_ranks_with_different_batches_are_refused(switch_dir):
    messages = run_ranks(_rank_calibrates_own_data, free_port(), str(switch_dir))
    for message in messages:
        assert message.startswith("CalibrationDataError") and "different calibration batches" in message
        assert "distributed=False" in message


def test_cli_prune_under_torchrun_writes_once_and_matches_a_single_process(switch_dir, calibration_jsonl, tmp_path):
    def argv(out: Path) -> list[str]:
        return ["prune", str(switch_dir), "--calibration-file", str(calibration_jsonl), "--factor", "2", "--method",
                "uncurl", "--seed", "3", "--num-calibration", "12", "--batch-size", "5", "--max-length", "16",
                "-o", str(out), "--no-progress"]

    results = run_ranks(_rank_runs_cli, free_port(), argv(tmp_path / "dist" / "out"))
    assert [r["code"] for r in results] == [0, 0]
    assert all(r["output_exists"] for r in results)  # rank 1 returns only once rank 0's folder is in place
    assert not any(r["group_left"] for r in results)  # the process group created for the run is destroyed
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["out"]  # one folder, no temp leftovers
    assert main(argv(tmp_path / "single" / "out")) == 0
    assert hash_tree(tmp_path / "dist" / "out") == hash_tree(tmp_path / "single" / "out")


def test_mpi_launcher_variables_alone_form_the_process_group():
    # mpirun is not installed here: the children export what Open MPI's mpirun (plus accelerate) would
    results = run_ranks(_rank_joins_with_mpi_variables, free_port())
    assert results == [{"created": True, "rank": r, "world_size": 2, "sum": 3} for r in range(2)]
