"""benchmarks/peer.py: uncurl's side runs on real tensors, and the comparison with llm-compressor is like for like.

llm-compressor itself is not installed here (it pins an older transformers); its report format is a JSON of
``{"model.layers.N.mlp": [kept expert indices]}``, which these tests write by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "uncurl_hf" / "zoo" / "checkpoints" / "tiny-qwen3moe-64"


def test_uncurls_reap_prune_of_the_shared_text_reads_back_as_kept_sets(tmp_path: Path) -> None:
    peer = load_benchmark("peer")
    texts = peer.write_texts(tmp_path / "texts.jsonl", 8)
    rows = [json.loads(line) for line in texts.read_text().splitlines()]
    assert len(rows) == 8 and all(row["text"].startswith("Review: ") for row in rows)
    assert all(row["text"].rstrip().endswith(("positive", "negative")) for row in rows)
    args = peer.argparse.Namespace(num_calibration=8, max_length=64)
    out = tmp_path / "out"
    subprocess.run(peer.uncurl_command(DECODER, out, texts, args, sequential=False), check=True,
                   capture_output=True)
    kept = peer.uncurl_kept(out)
    assert sorted(kept) == [f"model.layers.{i}" for i in range(4)]
    assert all(len(experts) == 32 and len(set(experts)) == 32 for experts in kept.values())

    report = tmp_path / "peer-basic.json"
    theirs = {f"{name}.mlp": list(reversed(experts)) for name, experts in kept.items()}
    changed = sorted(set(range(64)) - set(kept["model.layers.2"]))[0]
    theirs["model.layers.2.mlp"] = [changed, *kept["model.layers.2"][1:]]
    report.write_text(json.dumps(theirs))
    same, layers, shared = peer.agreement(kept, peer.peer_kept(report))
    assert (same, layers) == (3, 4)
    assert shared == (3 + 31 / 32) / 4


def test_each_run_is_compared_with_its_like_among_the_peers_runs() -> None:
    peer = load_benchmark("peer")
    names = ["uncurl", "uncurl --sequential", "llm-compressor basic", "llm-compressor sequential"]
    rows = [{"run": name, "peak_rss": rss, "wall_s": wall, "model_bytes": 1}
            for name, rss, wall in zip(names, (2.0, 3.0, 4.0, 5.0), (1.0, 2.0, 10.0, 20.0))]
    kept = {name: {"model.layers.0": [0, 1]} for name in names}
    kept["llm-compressor sequential"] = {"model.layers.0": [0, 2]}
    peer.compare(rows, kept)
    by = {row["run"]: row for row in rows}
    assert by["uncurl"]["peer"] == "llm-compressor basic" and by["uncurl"]["rss_vs_peer"] == 0.5
    assert by["uncurl --sequential"]["peer"] == "llm-compressor sequential"
    assert by["uncurl --sequential"]["rss_vs_peer"] == 0.6 and by["uncurl --sequential"]["wall_vs_peer"] == 0.1
    assert by["llm-compressor sequential"]["same_layers"] == 0  # kept sets are checked against basic only
    assert by["uncurl --sequential"]["same_layers"] == 1
    lines = peer.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and "1/1 (100.0%)" in lines[2]


def test_without_the_peer_the_table_has_no_ratios() -> None:
    peer = load_benchmark("peer")
    rows = peer.compare([{"run": "uncurl", "peak_rss": 2e9, "wall_s": 3.0, "model_bytes": 1e9}],
                        {"uncurl": {"model.layers.0": [0]}})
    assert rows[0]["rss_vs_peer"] is None and "layers" not in rows[0]
    assert peer.format_table(rows).splitlines()[2].split()[:4] == ["uncurl", "1.00", "2.00", "2.00"]


def test_a_measured_child_reports_its_own_peak_not_the_benchmark_process():
    """A child's ru_maxrss starts from the peak of the process it was forked from; the fresh wrapper is bare."""
    memory = load_benchmark("memory")
    ballast = bytearray(400 * 2**20)  # this process now peaks above 400 MB
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    _, idle = memory.run_measured([sys.executable, "-c", "pass"])
    touch = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    _, busy = memory.run_measured([sys.executable, "-c", touch])
    assert idle["rc"] == busy["rc"] == 0
    assert idle["rss"] < 100 * 2**20 < 300 * 2**20 < busy["rss"] < 400 * 2**20
    del ballast
