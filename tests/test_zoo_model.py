"""The shipped tiny-switch-8 is a real model of its task, and the README's main command works on it."""

from __future__ import annotations

import json

import pytest

from uncurl_hf.cli.main import main
from uncurl_hf.evaluation.scoring import evaluate_checkpoint
from uncurl_hf.zoo.baselines import tfidf_logreg_score
from uncurl_hf.zoo.registry import SHIPPED_DIR, zoo_path

MODEL = "tiny-switch-8"


@pytest.fixture(scope="module")
def model_dir():
    return zoo_path(MODEL, build_if_missing=False)


@pytest.fixture(scope="module")
def manifest(model_dir):
    return json.loads((model_dir / "zoo_manifest.json").read_text())


def test_zoo_path_is_the_shipped_folder(model_dir, capsys):
    assert model_dir == SHIPPED_DIR / MODEL
    assert main(["zoo", "path", MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)


def test_shipped_model_beats_the_tfidf_floor_and_matches_its_manifest(model_dir, manifest):
    result = evaluate_checkpoint(model_dir, "sentiment", split="test", progress=False, latency_examples=4)
    floor = tfidf_logreg_score("sentiment")
    assert result.num_examples == 800
    assert result.score > floor  # a model that learned its task, not noise
    assert result.score == pytest.approx(manifest["test"]["score"], abs=1e-9)
    assert floor == pytest.approx(manifest["tfidf_logreg_test"], abs=1e-9)
    assert result.params == manifest["params"] and 2_000_000 < result.params < 5_000_000


def test_routers_did_not_collapse_in_the_encoder(manifest):
    """Every encoder layer spreads the task's tokens over all 8 experts (the aux loss did its job).

    The decoder only ever sees the label tokens of the task, so its router is allowed to concentrate.
    """
    for name, layer in manifest["routing"]["layers"].items():
        assert len(layer["share"]) == 8 and abs(sum(layer["share"]) - 1) < 1e-3
        if name.startswith("encoder"):
            assert all(share > 0 for share in layer["share"]), name
            assert layer["entropy_normalized"] > 0.45, name


def test_demo_run_prints_the_original_vs_pruned_table(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["demo-run", "-o", str(out), "--limit", "80", "--num-calibration", "64", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Task-specific pruning: tiny-qwen3moe-64" in text  # then the specificity lines (tests/test_specificity.py)
    assert sum(line.split()[:2] in (["code", "reap"], ["shakespeare", "frequency"]) for line in text.splitlines()) == 2
    for row in ("accuracy (test, n=80)", "params", "disk MB", "ms/example (batch 1)", "ms/example (batch 64)"):
        assert row in text
    params_line = next(line for line in text.splitlines() if line.startswith("params"))
    original, pruned, ratio = params_line.split()[1:4]
    assert int(pruned.replace(",", "")) < int(original.replace(",", "")) and float(ratio) < 1
    assert (out / "config.json").exists() and (out / "uncurl_plan.json").exists()
