"""Factor sweeps (``uncurl sweep``), thresholds with bootstrap CIs, and ``uncurl prune --max-drop``.

A tiny labelled task is registered here over the shared calibration sentences; its split loader records every
split it is asked for, so a test can prove that the max-drop search never touches the test split.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, hash_tree

from uncurl_hf.cli.main import main
from uncurl_hf.evaluation.scoring import evaluate_checkpoint, generate_predictions, register_per_example_metric
from uncurl_hf.plan import PruningPlan
from uncurl_hf.experiments.sweep import SweepConfig, run_sweep
from uncurl_hf.recipe import CalibrationSpec
from uncurl_hf.experiments.sweep_output import load_sweep
from uncurl_hf.experiments.thresholds import (
    bootstrap_thresholds,
    bootstrap_weights,
    percentile_interval,
    threshold_factor,
)
from uncurl_hf.evaluation.tasks import Example, Task, get_task, register_task

TASK = "unit-test-sweep"
GEN_TASK = "unit-test-sweep-generation"
EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
SPLITS = {"train": EXAMPLES, "dev": EXAMPLES[::-1], "test": EXAMPLES[1:] + EXAMPLES[:1]}
REQUESTED: list[str] = []  # every split the tasks' loaders were asked for


def _load(split: str) -> list[Example]:
    REQUESTED.append(split)
    return list(SPLITS[split])


@register_task(TASK)
def _task() -> Task:
    return Task(name=TASK, description="tiny in-memory sentiment task", load_split=_load,
                labels=("negative", "positive"))


def _words(predictions, references) -> np.ndarray:
    """A per-example 'metric' for the generation task: number of words generated, / 10."""
    return np.array([len(p.split()) / 10 for p in predictions])


register_per_example_metric("unit-words", _words)


@register_task(GEN_TASK)
def _generation_task() -> Task:
    return Task(name=GEN_TASK, description="tiny generation task", load_split=_load, metric="unit-words")


# --------------------------------------------------------------------------------------------- threshold logic


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([0.80, 0.795, 0.70, 0.80], 2.0),  # x4 fails; x8's recovery does not count
        ([0.80, 0.79, 0.79, 0.75], 4.0),  # a drop of exactly 1 point passes
        ([0.80, 0.80, 0.81, 0.805], 8.0),  # never fails: the largest factor
        ([0.80, 0.7899, 0.80, 0.80], 1.0),  # x2 already fails: only the unpruned model
        ([0.80, 0.80, float("nan"), 0.80], 2.0),  # a NaN score is a failure
    ],
)
def test_threshold_is_the_largest_factor_before_the_first_failure(scores, expected):
    assert threshold_factor([1.0, 2.0, 4.0, 8.0], scores, tolerance=0.01) == expected


def _synthetic(n: int = 400) -> np.ndarray:
    """[F=4, N] per-example correctness: x2 = x1 with 4 of its 300 hits lost (exactly 1 point), x4 loses 100."""
    base = np.zeros(n)
    base[:300] = 1.0
    x2 = base.copy()
    x2[:4] = 0.0
    x4 = base.copy()
    x4[:100] = 0.0
    return np.stack([base, x2, x4, base])


def test_bootstrap_ci_brackets_the_point_estimate_and_is_seeded():
    factors = [1.0, 2.0, 4.0, 8.0]
    per_example = _synthetic()
    point = threshold_factor(factors, per_example.mean(axis=1).tolist(), 0.01)
    assert point == 2.0
    weights = bootstrap_weights(per_example.shape[1], 500, seed=7)
    assert weights.shape == (500, 400) and (weights.sum(axis=1) == 400).all()
    thresholds, scores = bootstrap_thresholds(factors, per_example, 0.01, weights)
    assert set(thresholds.tolist()) == {1.0, 2.0}  # x2 sits on the edge of the budget; x4 always fails
    low, high = percentile_interval(thresholds)
    assert (low, high) == (1.0, 2.0) and low <= point <= high
    # paired resamples: x8 repeats x1 example for example, so its resampled scores equal x1's exactly
    np.testing.assert_array_equal(scores[:, 3], scores[:, 0])
    again, _ = bootstrap_thresholds(factors, per_example, 0.01, bootstrap_weights(400, 500, seed=7))
    np.testing.assert_array_equal(again, thresholds)
    # a clear-cut curve gives a degenerate interval at the point estimate
    clear = per_example.copy()
    clear[1] = clear[0]
    sure, _ = bootstrap_thresholds(factors, clear, 0.01, weights)
    assert percentile_interval(sure) == (2.0, 2.0)


# ---------------------------------------------------------------------------------------------------- sweeps


def _config(model, task, methods, factors, **settings) -> SweepConfig:
    """A sweep of ``methods`` x ``factors`` calibrated on 12 train examples of ``task``."""
    return SweepConfig(model=str(model), task=task, methods=tuple(methods), factors=tuple(factors),
                       calibration=CalibrationSpec(task=task, num_examples=12), **settings)


@pytest.fixture(scope="module")
def sweep(switch_dir, tmp_path_factory):
    """One sweep of frequency + uncurl at x1/x2/x4/x16 (x16 > 8 experts: clamped to 1) into a folder."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    before = hash_tree(switch_dir)
    result = run_sweep(_config(switch_dir, TASK, ["frequency", "uncurl"], [2, 4, 16], bootstrap=200),
                       progress=False, output_dir=out)
    assert hash_tree(switch_dir) == before
    return result, out


def test_sweep_writes_one_row_per_method_and_factor(sweep):
    result, out = sweep
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "results.csv", "results.json"]  # no checkpoints
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".uncurl-tmp")]
    rows = (out / "results.csv").read_text().splitlines()
    header, rows = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert [(r["method"], float(r["factor"])) for r in rows] == [
        (m, f) for m in ("frequency", "uncurl") for f in (1.0, 2.0, 4.0, 16.0)
    ]
    for r in rows:
        assert r["num_examples"] == "12" and r["task"] == TASK and {"kl", "agreement", "counts"} <= set(header)
        if float(r["factor"]) == 1.0:
            assert (float(r["relative"]), float(r["kl"]), float(r["agreement"])) == (100.0, 0.0, 100.0)
            assert r["counts"] == "encoder.block.1=8;encoder.block.3=8;decoder.block.1=8;decoder.block.3=8"
    x2 = result.point("frequency", 2.0)
    assert x2.counts == dict.fromkeys(x2.counts, 4) and x2.effective_factor == 2.0
    x16 = result.point("frequency", 16.0)
    assert x16.counts == dict.fromkeys(x16.counts, 1) and x16.clamped == list(x16.counts)
    assert x16.effective_factor == 8.0 and any("x16" in note for note in result.notes)
    assert sum(result.point("uncurl", 4.0).counts.values()) == 8  # adaptive: re-split, same total as 4 x 2


def test_sweep_scores_match_pruned_checkpoints(sweep, switch_dir, tmp_path):
    """The in-memory point equals `uncurl prune` + `uncurl eval` on the written checkpoint."""
    from helpers import prune_flat

    result, _ = sweep
    point = result.point("uncurl", 2.0)
    written = prune_flat(switch_dir, output_dir=tmp_path / "x2", task=TASK, factor=2, method="uncurl",
                    num_calibration_examples=12, progress=False, card=False)
    assert written.plan.counts == point.counts
    assert evaluate_checkpoint(written.output_dir, TASK, split="test", progress=False).score == point.score
    assert point.score == pytest.approx(point.per_example.mean()) and len(point.per_example) == 12


def test_sweep_json_round_trips_and_thresholds_follow_the_definition(sweep):
    result, out = sweep
    loaded = load_sweep(out)
    assert loaded.to_dict() == json.loads((out / "results.json").read_text())
    for method, t in loaded.thresholds.items():
        scores = [loaded.point(method, f).score for f in loaded.config.factors]
        assert t.factor == threshold_factor(list(loaded.config.factors), scores, 0.01)
        assert t.ci_low <= t.factor <= t.ci_high and t.bootstrap == 200
        assert t.censored == (t.factor == 16.0)
        np.testing.assert_array_equal(loaded.point(method, 2.0).per_example, result.point(method, 2.0).per_example)


def test_plot_is_a_png_and_outputs_are_deterministic(sweep, switch_dir, tmp_path):
    from matplotlib.image import imread

    _, out = sweep
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out / "plot.png").shape[:2] == (400, 500)  # one 5x4 in panel at 100 dpi
    again = run_sweep(_config(switch_dir, TASK, ["frequency", "uncurl"], [16, 4, 2, 1], bootstrap=200),
                      progress=False, output_dir=tmp_path / "again")
    assert hash_tree(again.output_dir) == hash_tree(out)


def test_plot_sweeps_draws_one_panel_per_sweep(sweep, tmp_path):
    from matplotlib.image import imread

    from uncurl_hf.experiments.sweep_output import plot_sweeps

    _, out = sweep
    path = plot_sweeps([out, out / "results.json"], tmp_path / "study.png")
    assert imread(path).shape[:2] == (400, 1000)


def test_generation_task_plugs_in_with_a_per_example_metric(switch_dir):
    from uncurl_hf.io.checkpoint import load_model, load_tokenizer

    result = run_sweep(_config(switch_dir, GEN_TASK, ["frequency"], [2], bootstrap=20, max_eval_examples=3),
                       progress=False)
    task = get_task(GEN_TASK)
    model, tokenizer = load_model(switch_dir), load_tokenizer(switch_dir)
    expected = _words(generate_predictions(model, tokenizer, task, SPLITS["test"][:3]), None)
    unpruned = result.point("frequency", 1.0)
    np.testing.assert_array_equal(unpruned.per_example, expected)
    assert expected.sum() > 0  # the metric is not trivially zero on this model
    assert unpruned.kl is None and result.point("frequency", 2.0).agreement is None


# ----------------------------------------------------------------------------------------------------- max-drop


@pytest.mark.parametrize("max_drop", [100.0, 0.0])
def test_max_drop_searches_on_dev_never_test(max_drop, switch_dir, tmp_path):
    from helpers import prune_flat

    REQUESTED.clear()
    result = prune_flat(switch_dir, output_dir=tmp_path / "auto", task=TASK, method="frequency", max_drop=max_drop,
                   num_calibration_examples=12, progress=False, card=False)
    assert "test" not in REQUESTED and {"train", "dev"} <= set(REQUESTED)
    search = PruningPlan.load(result.output_dir).metadata["max_drop"]
    assert search["chosen_counts"] == result.plan.counts and search["split"] == "dev"
    assert search["trace"][0]["phase"] == "uniform" and search["trace"][0]["factor"] == 2.0
    assert search["evaluations"] == len(search["trace"])
    dev = evaluate_checkpoint(result.output_dir, TASK, split="dev", progress=False).score
    assert dev == pytest.approx(search["chosen_score"], abs=1e-6)  # the metadata keeps 6 decimals
    assert dev >= search["unpruned_score"] - max_drop / 100 - 1e-6
    if max_drop == 100.0:  # every candidate is within budget: one expert per layer is the fewest possible
        assert set(result.plan.counts.values()) == {1}
    accepted = [s for s in search["trace"] if s["accepted"]]
    assert all(s["score"] >= search["floor"] - 1e-9 for s in accepted)
    assert (accepted[-1]["counts"] if accepted else dict.fromkeys(result.plan.counts, 8)) == result.plan.counts


def test_max_drop_calibrates_once_and_plans_like_an_explicit_counts_run(switch_dir, tmp_path, monkeypatch):
    """The search's statistics also plan the output: one calibration pass, and the same layers as a run given the
    chosen counts explicitly (which calibrates on the same seeded train examples)."""
    import uncurl_hf.calibration.run
    import uncurl_hf.pipeline.planning
    from helpers import prune_flat

    passes: list[int] = []
    real = uncurl_hf.calibration.run.calibrate

    def counting(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(uncurl_hf.pipeline.planning, "calibrate", counting)  # every pass goes through planning
    common = dict(task=TASK, method="msmoe", num_calibration_examples=12, progress=False, card=False)
    searched = prune_flat(switch_dir, output_dir=tmp_path / "auto", max_drop=0.0, **common)
    assert len(passes) == 1
    explicit = prune_flat(switch_dir, output_dir=tmp_path / "explicit", num_experts_per_layer=searched.plan.counts, **common)
    assert searched.plan.layers == explicit.plan.layers  # dataclasses: every field equal
    assert searched.plan.metadata["stats"] == explicit.plan.metadata["stats"]


def test_max_drop_with_offload_is_refused_before_loading(switch_dir, tmp_path):
    from uncurl_hf.errors import MaxDropError
    from helpers import prune_flat

    with pytest.raises(MaxDropError, match="cannot run with --offload"):
        prune_flat(switch_dir, output_dir=tmp_path / "x", task=TASK, max_drop=1.0, offload=True, progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_sweep_and_max_drop(switch_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["sweep", str(switch_dir), "--task", TASK, "--methods", "frequency,uncurl:uniform=true", "--factors",
            "2,4", "-o", str(out), "--bootstrap", "50", "--num-calibration", "12", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "threshold" in text and "95% CI" in text and "uncurl:uniform=true" in text
    assert json.loads((out / "results.json").read_text())["config"]["methods"] == ["frequency", "uncurl:uniform=true"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["sweep", str(switch_dir), "--task", TASK, "--factors", "0.5", "-o", str(tmp_path / "bad")]) == 2
    assert "factors must be finite numbers >= 1" in capsys.readouterr().err

    prune = ["prune", str(switch_dir), "--task", TASK, "--max-drop", "100", "--num-calibration", "12",
             "-o", str(tmp_path / "auto"), "--no-progress", "--no-card"]
    assert main(prune) == 0
    assert "--max-drop 100:" in capsys.readouterr().out
    assert main([*prune[:-4], "--factor", "2", "-o", str(tmp_path / "x")]) == 2
    assert "not factor and max_drop" in capsys.readouterr().err
    calibration_file = ["prune", str(switch_dir), "--calibration-file", "x.txt", "--max-drop", "1", "-o",
                        str(tmp_path / "y")]
    assert main(calibration_file) == 2 and "needs --task" in capsys.readouterr().err
