"""`uncurl study` (uncurl_hf/experiments/study.py): work split into training lanes, Table 1 / Table 2 from sweep results, and the
written report — on synthetic per-example scores and stand-in zoo folders, so no model is trained here (the recipes
themselves are exercised end to end in test_zoo_recipe.py, and sweeps on real models in test_sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uncurl_hf.experiments import study
from uncurl_hf.errors import UncurlError
from uncurl_hf.experiments.sweep import SweepConfig, SweepPoint, SweepResult
from uncurl_hf.experiments.thresholds import compute_thresholds
from uncurl_hf.zoo import registry

CONFIG = study.StudyConfig(experts=(8,), scratch_experts=(2, 4), tasks=("sentiment",), methods=("uncurl", "frequency"),
                           bootstrap=50)


def _sweep(num_experts: int, correct: dict[str, list[int]]) -> SweepResult:
    """A sweep over factors 1..E with 10 eval examples; ``correct[method][i]`` = how many of the 10 are right at
    the i-th factor (the first 'correct' examples are right)."""
    factors = CONFIG.factors(num_experts)
    config = SweepConfig(model="m", task="sentiment", methods=tuple(correct), factors=factors, bootstrap=50,
                         tolerance=CONFIG.tolerance)
    points = []
    for method, rights in correct.items():
        for factor, right in zip(factors, rights):
            per_example = np.array([1.0] * right + [0.0] * (10 - right))
            kept = max(1, num_experts // int(factor))
            points.append(SweepPoint(method, factor, {"enc": kept}, kept, num_experts, right / 10,
                                     100.0 * right / correct[method][0], per_example=per_example))
    result = SweepResult(config, f"study-switch-{num_experts}-sentiment", "accuracy", 10, {"enc": num_experts},
                         correct[next(iter(correct))][0] / 10, points, {})
    compute_thresholds(result)
    return result


@pytest.fixture()
def fake_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in folders for the study models of CONFIG (enough for registry.zoo_path and the manifest readers)."""
    monkeypatch.setenv("UNCURL_HF_CACHE", str(tmp_path / "cache"))
    for e, score in ((2, 0.61), (4, 0.66), (8, 0.70)):
        folder = tmp_path / "cache" / "zoo" / registry.study_name(e, "sentiment")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        manifest = {"params": 1000 * e, "test": {"metric": "accuracy", "score": score, "num_examples": 10},
                    "finetune": {"dev": score + 0.01, "epoch": 2}, "tfidf_logreg_test": 0.65,
                    "routing": {"layers": {"encoder.block.1": {"min_share": 0.05}}},
                    "wall_time_s": {"pretrain_and_intermediate": 100.0, "finetune": 50.0}}
        (folder / "zoo_manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_factors_run_from_one_to_one_expert_per_layer() -> None:
    assert CONFIG.factors(8) == (1.0, 2.0, 4.0, 8.0)
    assert study.SMALL.all_experts == (4, 8, 16) and study.SMALL.tasks == ("sentiment",)
    with pytest.raises(UncurlError, match="E in"):
        study.StudyConfig(experts=(12,))
    with pytest.raises(UncurlError, match="dense"):
        study.StudyConfig(experts=(1,))


def test_lanes_keep_each_expert_count_together_and_balance_the_work() -> None:
    """All tasks of one E run in one worker after its pretraining; the two workers get similar work."""
    config = study.StudyConfig()
    lanes = study._lanes(config, config.model_names())
    assert len(lanes) == 2 and sorted(n for lane in lanes for n in lane) == sorted(config.model_names())
    for e in config.all_experts:
        holders = [i for i, lane in enumerate(lanes) if any(n.startswith(f"study-switch-{e}-") for n in lane)]
        assert len(holders) == 1
    first = [lane[0] for lane in lanes]
    assert first == ["study-switch-64-sentiment", "study-switch-32-sentiment"]  # the longest pretrainings start first
    missing_one = study._lanes(config, ["study-switch-4-topic"])
    assert missing_one == [["study-switch-4-topic"]]


def test_tables_from_sweeps(fake_zoo: Path) -> None:
    """Table 1 reads thresholds off the sweep; Table 2 pairs pruned-from-8 at factor k with the E=8/k model."""
    sweeps = {(8, "sentiment"): _sweep(8, {"uncurl": [7, 7, 7, 5], "frequency": [7, 7, 4, 3]})}
    table1 = {r["method"]: r for r in study.threshold_rows(CONFIG, sweeps)}
    assert table1["uncurl"]["threshold"] == 4.0 and table1["uncurl"]["experts_left"] == 2.0
    assert table1["frequency"]["threshold"] == 2.0
    assert table1["uncurl"]["relative_at_max"] == pytest.approx(100 * 5 / 7)
    low, high = table1["uncurl"]["ci"]
    assert low <= 4.0 <= high
    table2 = study.scratch_rows(CONFIG, sweeps, study.model_rows(CONFIG))
    assert [(r["to_experts"], r["factor"]) for r in table2] == [(2, 4.0), (4, 2.0)]
    to2, to4 = table2
    assert to2["pruned"] == {"uncurl": 0.7, "frequency": 0.4} and to2["best_method"] == "uncurl"
    assert to2["scratch"] == 0.61 and to2["pruned_minus_scratch"] == pytest.approx(0.09)
    assert to4["scratch"] == 0.66 and to4["pruned_minus_scratch"] == pytest.approx(0.04)


def test_run_study_writes_markdown_json_and_figure(fake_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweeps = {(8, "sentiment"): _sweep(8, {"uncurl": [7, 7, 7, 5], "frequency": [7, 7, 4, 3]})}
    monkeypatch.setattr(study, "sweep_models", lambda config, progress=True: sweeps)
    out = fake_zoo / "docs"
    out.mkdir()
    (out / "study_findings.md").write_text("UNCURL holds to x4 here.\n")
    report = study.run_study(CONFIG, output=out, build=False, progress=False, command="uncurl study --test")
    text = (out / "study.md").read_text()
    assert "Regenerate: `uncurl study --test`" in text and "## Findings\n\nUNCURL holds to x4 here." in text
    assert "| sentiment | 8 | 70.0 | x4 [" in text and "| sentiment | 8 -> 2 | 70.0 | 70.0 | 40.0 | 61.0 | +9.0 |" in text
    assert (out / "study_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "study.json").read_text())
    assert saved["table2"] == json.loads(json.dumps(report.table2))
    with pytest.raises(UncurlError, match="not built yet"):
        study.run_study(study.StudyConfig(experts=(16,), scratch_experts=(), tasks=("sentiment",)), output=out,
                        build=False, progress=False)
