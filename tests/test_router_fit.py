"""The fitted router of merged groups (``router="fitted"``), UNCURL's usage-anchored centres, and merge diagnostics.

Specification: a fitted group row is a linear combination of the members' rows whose coefficients make every
calibration token keep its routing over groups as far as a linear row can; where the usage-weighted row moves
tokens to another group and a combination exists that does not, the fit finds it. The plan carries the
coefficients, surgery builds exactly ``sum_m c_m r_m``, and a re-applied plan needs no calibration data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prune_flat
from test_half_precision import save_source

from uncurl_hf import LayerPlan, load_model
from uncurl_hf.errors import InvalidPlanError
from uncurl_hf.families import get_family
from uncurl_hf.methods._router_fit import fit_router_coefficients, group_agreement, merge_diagnostics
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.methods.uncurl import spectral_placement
from uncurl_hf.calibration.stats import ExpertStats


def collinear_logits(seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Router rows r0 = 3u, r1 = u (one group) and r2 = v (another), on tokens with u.h > 0, routed top-1.

    Expert 1 never wins (3u.h > u.h), so the group's logit is 3u.h: the row c0 = 1, c1 = 0 reproduces every
    token's group, while the usage-weighted row (w0*3 + w1) u is smaller and tokens with (w0*3 + w1) u.h < v.h <
    3u.h move to {2}.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(600, 8))
    hidden[:, 0] = np.abs(hidden[:, 0]) + 0.1
    u, v = np.eye(8)[0], rng.normal(size=8)
    rows = np.stack([3 * u, u, v])
    return hidden @ rows.T, [[0, 1], [2]]


def test_the_fit_keeps_every_token_in_its_group_where_the_weighted_row_does_not():
    logits, groups = collinear_logits()
    weighted = [[0.5, 0.5], [1.0]]
    assert group_agreement(logits, groups, weighted) < 0.97  # the average row loses tokens to the other group
    fitted = fit_router_coefficients(logits, groups, weighted)
    assert group_agreement(logits, groups, fitted) == 1.0
    assert [len(row) for row in fitted] == [2, 1]


def test_the_fit_is_deterministic_and_keeps_the_start_without_tokens():
    logits, groups = collinear_logits(seed=3)
    start = [[0.7, 0.3], [1.0]]
    assert fit_router_coefficients(logits, groups, start) == fit_router_coefficients(logits, groups, start)
    assert fit_router_coefficients(np.zeros((0, 3)), groups, start) == start


def stats_of(counts: list[int], logits: np.ndarray) -> ExpertStats:
    e = len(counts)
    return ExpertStats(
        layer="layer", num_experts=e, top_k=1, num_tokens=sum(counts), counts=torch.tensor(counts),
        gate_mass=torch.tensor(counts, dtype=torch.float64), logit_sample=torch.tensor(logits, dtype=torch.float32),
    )


def test_merge_diagnostics_count_the_routing_merged_away_and_dead_groups():
    logits, _ = collinear_logits()
    stats = stats_of([60, 30, 9999, 1, 0], np.concatenate([logits, np.zeros((600, 2))], axis=1))
    groups = [[0, 1], [2], [3, 4]]
    got = merge_diagnostics(stats, groups, stats.logit_sample.double().numpy(), [[0.5, 0.5], [1.0], [0.5, 0.5]])
    assert got["merged_away"] == round(30 / 10090, 6)  # expert 1's tokens (group {3,4}: 0 goes with the 1-count)
    assert got["group_sizes"] == [2, 2, 1]
    assert got["dead_groups"] == 1  # {3, 4}: 1 decision of 10090
    assert 0.0 <= got["router_agreement"] <= 1.0


def test_usage_centres_are_the_most_used_experts_and_the_groups_partition_the_layer():
    rng = np.random.default_rng(0)
    affinity = rng.uniform(size=(12, 12))
    counts = [5, 90, 3, 40, 0, 0, 7, 60, 1, 2, 0, 8]
    centres = rank_by_frequency(stats_of(counts, np.zeros((0, 12))))[:4]
    assert centres == [1, 7, 3, 11]
    groups = spectral_placement(affinity, centres, seed=0)
    assert len(groups) == 4 and all(any(c in g for g in groups) for c in centres) and all(sum(c in g for c in centres) == 1 for g in groups)
    assert sorted(e for g in groups for e in g) == list(range(12))


def test_a_plan_with_the_fitted_rule_needs_its_coefficients():
    LayerPlan("l", 4, [[0, 1], [2, 3]], router="fitted", extras={"router_coefficients": [[1.0, 0.2], [0.5, 0.5]]}
              ).validate(4)
    for extras in ({}, {"router_coefficients": [[1.0], [0.5, 0.5]]}, {"router_coefficients": [[1.0, "x"], [1, 1]]}):
        with pytest.raises(InvalidPlanError, match="needs extras\\['router_coefficients'\\]"):
            LayerPlan("l", 4, [[0, 1], [2, 3]], router="fitted", extras=extras).validate(4)


def test_pruning_with_the_fitted_router_writes_exactly_the_combined_rows(switch_dir, calibration_jsonl, tmp_path):
    result = prune_flat(switch_dir, tmp_path / "out", method="uncurl", method_options={"router": "fitted"},
                        factor=2, file=str(calibration_jsonl), num_examples=16)
    source, pruned = load_model(switch_dir), load_model(result.output_dir)
    family = get_family(source)
    original = {layer.name: layer for layer in family.sparse_layers(source)}
    merged = 0
    for layer_plan, layer in zip(result.plan.layers, family.sparse_layers(pruned)):
        assert layer_plan.router == "fitted"
        rows = original[layer_plan.name].router.weight.detach().float()
        expected = torch.stack([
            (torch.tensor(c, dtype=torch.float32)[:, None] * rows[g]).sum(0)
            for g, c in zip(layer_plan.groups, layer_plan.extras["router_coefficients"])
        ])
        torch.testing.assert_close(layer.router.weight.detach().float(), expected, rtol=0, atol=1e-6)
        merged += any(len(g) > 1 for g in layer_plan.groups)
        diagnostics = layer_plan.extras["diagnostics"]
        assert set(diagnostics) == {"merged_away", "group_sizes", "dead_groups", "router_agreement"}
    assert merged  # the test would say nothing if no layer merged


def test_the_fitted_router_prunes_a_decoder_in_bfloat16_deterministically(tmp_path, calibration_jsonl):
    source = save_source(tmp_path / "src", "qwen3_moe", torch.bfloat16)
    runs = [prune_flat(source, tmp_path / name, method="msmoe", method_options={"router": "fitted"}, factor=2,
                       file=str(calibration_jsonl), num_examples=16) for name in ("a", "b")]
    for name in ("model.safetensors", "config.json", "uncurl_plan.json"):
        assert (runs[0].output_dir / name).read_bytes() == (runs[1].output_dir / name).read_bytes(), name
    assert all(layer.router == "fitted" for layer in runs[0].plan.layers)
    reloaded = load_model(runs[0].output_dir)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_reap_centres_anchor_the_groups_and_reap_weights_weight_them(switch_dir, calibration_jsonl, tmp_path):
    """``centres="reap"``: the k experts with the highest REAP scores are the groups' centres; ``weights="reap"``:
    each group's anchor is its highest-REAP member and the weights are the members' REAP scores over the group."""
    from uncurl_hf.calibration.data import build_batches, calibration_examples
    from uncurl_hf.calibration.run import calibrate
    from uncurl_hf.io.checkpoint import load_tokenizer
    from uncurl_hf.methods.reap import rank_by_reap, reap_scores
    from uncurl_hf import CalibrationSpec

    result = prune_flat(switch_dir, tmp_path / "out", method="uncurl", factor=2,
                        method_options={"centres": "reap", "weights": "reap", "uniform": True}, file=str(calibration_jsonl),
                        num_examples=16, dry_run=True)
    model, tokenizer = load_model(switch_dir), load_tokenizer(switch_dir)
    spec = CalibrationSpec(file=str(calibration_jsonl), num_examples=16)
    batches = build_batches(calibration_examples(spec, tokenizer), tokenizer, spec.batch_size, spec.max_length)
    stats = calibrate(model, get_family(model), batches, spec.max_logit_samples, spec.seed)
    for layer_plan in result.plan.layers:
        layer_stats = stats[layer_plan.name]
        scores = reap_scores(layer_stats).tolist()
        centres = rank_by_reap(layer_stats)[: len(layer_plan.groups)]
        assert sorted(g[0] for g in layer_plan.groups) == sorted(centres)
        for group, weights in zip(layer_plan.groups, layer_plan.weights):
            rounded = [float(f"{scores[e]:.3g}") for e in group]  # 3 digits: bytes independent of the thread count
            assert weights == pytest.approx([r / sum(rounded) for r in rounded], abs=1e-12)
