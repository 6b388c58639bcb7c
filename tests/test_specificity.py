"""Task-specific pruning on the shipped decoder (uncurl_hf/experiments/specificity.py, behind `uncurl demo-run`):
pruned for one domain, the model keeps that domain's perplexity much better than the other domains'. A real
assertion on the shipped tiny-qwen3moe-64 weights; the figures are in the README."""

from __future__ import annotations

import math

import pytest

from uncurl_hf.experiments.specificity import SpecificityRow, SpecificitySpec, calibration_windows, run_specificity
from uncurl_hf.zoo import domains


@pytest.fixture(scope="module")
def rows() -> list[SpecificityRow]:
    return run_specificity(SpecificitySpec())  # demo-run's lines: frequency and REAP x4, code and shakespeare


def test_the_calibration_domain_keeps_its_perplexity_best(rows):
    expected = {(t, m) for t in ("code", "shakespeare") for m in ("frequency", "reap")}
    assert {(r.target, r.method) for r in rows} == expected
    for r in rows:
        assert set(r.ratios) == set(domains.DOMAINS)
        target = r.ratios[r.target]
        assert 1.0 < target < 0.75 * r.others, (r.target, r.method, r.ratios)  # pruning costs, the others much more
        assert all(target < v for d, v in r.ratios.items() if d != r.target), (r.target, r.method, r.ratios)


def test_the_target_kl_is_measured_against_the_unpruned_model(rows):
    """KL(unpruned || pruned) on the target's held-out windows: positive (x4 removes experts the text routes to),
    finite, and zero for a model against itself (the same measurement, nothing pruned)."""
    from uncurl_hf import load_model
    from uncurl_hf.evaluation.causal import kl_divergence
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.zoo.decoder_report import heldout_windows
    from uncurl_hf.zoo.registry import zoo_path

    for r in rows:
        assert 0.0 < r.target_kl < 10.0 and math.isfinite(r.target_kl), (r.target, r.method, r.target_kl)
    folder = zoo_path("tiny-qwen3moe-64", build_if_missing=False)
    model = load_model(folder)
    windows = heldout_windows(load_tokenizer(folder), "code", 2).tolist()
    assert kl_divergence(model, model, windows) == 0.0


def test_others_is_the_geometric_mean_of_the_other_domains():
    row = SpecificityRow("code", "reap", 4.0, {"code": 1.5, "news": 2.0, "wiki": 8.0}, target_kl=0.1)
    assert math.isclose(row.others, 4.0)


def test_calibration_windows_are_seeded_windows_of_the_domain_text():
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.zoo.registry import zoo_path

    tokenizer = load_tokenizer(zoo_path("tiny-qwen3moe-64", build_if_missing=False))
    first = calibration_windows(tokenizer, "code", 16, seed=0)
    assert first == calibration_windows(tokenizer, "code", 16, seed=0)
    assert first != calibration_windows(tokenizer, "code", 16, seed=1)
    assert len(first) == len(set(first)) == 16
    train = "\n".join(domains.domain_splits("code")["train"]).lower()  # the zoo tokenizer lowercases
    assert all(text.strip()[:40] in train for text in first)  # drawn from the train side, as text


def test_the_benchmark_script_runs_end_to_end():
    """benchmarks/specificity.py is the same measurement behind a CLI (its numbers are the machine's; the table's
    shape is what is specified: one row per target x method x factor, every domain a column)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "specificity.py"
    out = subprocess.run(
        [sys.executable, str(script), "--targets", "wiki", "--methods", "frequency,uncurl:guard=true", "--factors", "2",
         "--windows", "2", "--num-calibration", "8", "-q"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("wiki ")]
    assert [r[1] for r in rows] == ["frequency", "uncurl:guard=true"] and all(r[2] == "x2" for r in rows)
    assert all(len(r) == 6 + len(domains.DOMAINS) for r in rows)
