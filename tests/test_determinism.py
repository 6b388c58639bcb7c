"""Determinism: same inputs + seed -> byte-identical output folder (every file hashed), run after run and with
1 or 2 torch threads.

What makes this hold (and where it could break) is in ``ExpertStats.summary``: integer routing counts are
thread-independent, float statistics are not bit-stable across thread counts on CPU (MKL rounds some small
matrix products differently with 2 threads), so the plan file records only the integer digest, and the methods'
decisions and merge weights come out identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import hash_tree

import forked
from uncurl_hf.cli.main import main

METHODS = ["frequency", "uncurl"]


def _argv(model: Path, calibration: Path, out: Path, method: str) -> list[str]:
    return ["prune", str(model), "--calibration-file", str(calibration), "--factor", "2", "--method", method,
            "--seed", "3", "-o", str(out), "--no-progress", "--num-calibration", "8", "--max-length", "16"]


def _prune_with_threads(argv: list[str], threads: int) -> dict[str, str]:
    """Child: set the torch thread count, run the CLI, return the output folder's hashes."""
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert main(argv) == 0
    return hash_tree(Path(argv[argv.index("-o") + 1]))


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_give_byte_identical_folders_with_1_and_2_threads(method, switch_dir, calibration_jsonl, tmp_path):
    runs = {
        "first": forked.run(_prune_with_threads, _argv(switch_dir, calibration_jsonl, tmp_path / "a", method), 1),
        "second": forked.run(_prune_with_threads, _argv(switch_dir, calibration_jsonl, tmp_path / "b", method), 1),
        "2 threads": forked.run(_prune_with_threads, _argv(switch_dir, calibration_jsonl, tmp_path / "c", method), 2),
    }
    reference = runs["first"]
    written = {"model.safetensors", "config.json", "uncurl_plan.json", "uncurl_manifest.json", "README.md"}
    assert written <= set(reference)
    for name, hashes in runs.items():
        differing = sorted(f for f in set(reference) | set(hashes) if reference.get(f) != hashes.get(f))
        assert not differing, f"{name} run differs in {differing}"
