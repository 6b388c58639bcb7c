"""The ``uncurl`` CLI: listings, end-to-end prune, and one clear error (no traceback) per bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hash_tree
from transformers import AutoModelForSeq2SeqLM

from uncurl_hf.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def test_methods_and_families(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "frequency" in out and "random" in out
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert "switch_transformers" in out and "pruned_switch_transformers" in out


def test_prune_end_to_end(switch_dir, calibration_txt, tmp_path, capsys):
    before = hash_tree(switch_dir)
    plan_out = tmp_path / "plan.json"
    argv = ["prune", str(switch_dir), "--calibration-file", str(calibration_txt), "--factor", "2",
            "--method", "frequency", "-o", str(tmp_path / "out"), "--seed", "1", "--num-calibration", "8",
            "--batch-size", "3", "--max-length", "16", "--plan-out", str(plan_out), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "weights MB" in out and "experts encoder.block.1        8       4" in out
    assert plan_out.is_file()
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts_per_decoder_layer == [4, 4]
    assert hash_tree(switch_dir) == before
    assert main(argv) != 0  # the output exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("dense", "not a sparse mixture-of-experts"),
        ("zero", "would keep 0 experts"),
        ("below_one", "below 1"),
        ("unknown_method", "Unknown pruning method"),
        ("no_file", "Calibration file"),
    ],
)
def test_bad_input_gives_one_clear_error(case, message, switch_dir, t5_dir, calibration_txt, tmp_path, capsys):
    model = {"missing": tmp_path / "nope", "dense": t5_dir}.get(case, switch_dir)
    factor = {"zero": "16", "below_one": "0.5"}.get(case, "2")
    calibration = tmp_path / "missing.txt" if case == "no_file" else calibration_txt
    method = "magic" if case == "unknown_method" else "frequency"
    before = hash_tree(model) if Path(model).exists() else None
    code = main(["prune", str(model), "--calibration-file", str(calibration), "--factor", factor,
                 "--method", method, "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert hash_tree(model) == before


def test_debug_flag_reraises(tmp_path):
    from uncurl_hf.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        main(["--debug", "prune", str(tmp_path / "nope"), "--calibration-file", "x.txt", "--factor", "2",
              "-o", str(tmp_path / "o")])


def test_subprocess_error_has_no_traceback(switch_dir, calibration_txt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "uncurl_hf", "prune", str(switch_dir), "--calibration-file", str(calibration_txt),
         "--factor", "0.5", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: Pruning factor 0.5 is below 1") and "Traceback" not in proc.stderr


def test_prune_with_a_registered_task(switch_dir, tmp_path, capsys):
    from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS

    from uncurl_hf.evaluation.tasks import Example, Task, register_task

    examples = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]

    @register_task("unit-test-sentiment")
    def _task() -> Task:
        return Task(name="unit-test-sentiment", description="tiny in-memory task", load_split=lambda split: examples)

    assert main(["prune", str(switch_dir), "--task", "unit-test-sentiment", "--factor", "4", "--num-calibration", "5",
                 "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    from uncurl_hf import PruningPlan

    plan = PruningPlan.load(tmp_path / "out")
    assert plan.metadata["calibration"] == {
        "task": "unit-test-sentiment", "calibration_file": None, "num_examples": 5, "max_length": 128,
    }
    assert set(plan.counts.values()) == {2}
    argv = ["prune", str(switch_dir), "--task", "unit-test-nope", "--factor", "2", "-o", str(tmp_path / "o2")]
    assert main(argv) == 2
    assert "Unknown task" in capsys.readouterr().err
