"""benchmarks/timing.py runs end to end on a tiny model (its numbers are never asserted: they are the machine's).

Specified: a child prune reports every pipeline stage it wraps (so a renamed stage function cannot silently drop
out of the table), the stages add up to at most the whole call, and the tables put each row's ratio to frequency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "timing.py"
TINY = ROOT / "uncurl_hf" / "zoo" / "checkpoints" / "tiny-switch-8"


def test_a_child_prune_times_every_stage(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--child-prune", str(TINY), "msmoe", str(tmp_path / "out"),
         "--num-calibration", "16"],
        capture_output=True, text=True, check=True,
    ).stdout
    row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    timing = load_benchmark("timing")
    assert all(row[stage] > 0 for stage in timing.STAGE_NAMES)  # msmoe plans (aligns), so even "plan" takes time
    assert sum(row[stage] for stage in timing.STAGE_NAMES) <= row["total"]
    assert abs(row["outside_calibration"] - (row["total"] - row["calibrate"])) < 1e-9
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_tables_give_each_method_its_ratio_to_frequency() -> None:
    timing = load_benchmark("timing")
    base = dict.fromkeys(timing.STAGE_NAMES, 1.0)
    rows = [
        {"model": "m", "examples": 8, "method": "frequency", **base, "total": 6.0, "outside_calibration": 4.0},
        {"model": "m", "examples": 8, "method": "uncurl", **base, "total": 11.0, "outside_calibration": 10.0},
    ]
    lines = timing.stage_table(rows).splitlines()  # header, rule, rows
    assert lines[2].split()[-1] == "1.00" and lines[3].split()[-1] == "2.50"
    overhead = timing.overhead_table([{"model": "m", "examples": 8, "repeats": 3, "plain_s": 1.0,
                                       "calibrate_s": 1.1, "fastest": 1.1, "paired": 1.08}])
    assert overhead.splitlines()[2].split()[-3:] == ["1.100", "1.080", "1.05"]
