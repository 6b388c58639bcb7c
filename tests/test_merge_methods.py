"""UNCURL and the baseline suite (reap, msmoe, hcsmoe): merging semantics, clustering, budgets, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, tiny_switch_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import uncurl_hf  # noqa: F401  (registers the pruned model type with the Auto classes)
from uncurl_hf import LayerPlan, PruningPlan, apply_plan, build_batches, calibrate, load_model
from helpers import load_benchmark, make_recipe, prune_flat
from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.io.checkpoint import write_checkpoint
from uncurl_hf.cli.main import main as cli_main
from uncurl_hf.errors import UncurlError
from uncurl_hf.families import get_family
from uncurl_hf.methods import available_methods, get_method
from uncurl_hf.methods._alignment import align_groups, match_neurons
from uncurl_hf.methods._merging import allocate_by_effective_experts, allocate_by_pooled_usage
from uncurl_hf.methods.reap import rank_by_reap
from uncurl_hf.methods.uncurl import spectral_groups
from uncurl_hf.evaluation.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
LAYER = "encoder.block.1"  # the first sparse layer: editing it does not change what reaches it
ALL_METHODS = [
    ("random", {}),
    ("frequency", {}),
    ("reap", {}),
    ("msmoe", {}),
    ("hcsmoe", {}),
    ("uncurl", {}),
    ("uncurl", {"uniform": True}),
    ("uncurl", {"adaptive": "entropy", "router": "anchor"}),
]
UNIFORM = {"random", "frequency", "reap", "hcsmoe"}


def batches_for(tokenizer_dir: Path) -> list[dict[str, torch.Tensor]]:
    return build_batches(EXAMPLES, AutoTokenizer.from_pretrained(tokenizer_dir), batch_size=4, max_length=32)


@torch.no_grad()
def logits_on(model, batches) -> list[torch.Tensor]:
    family = get_family(model)
    return [model(**family.forward_inputs(model, batch)).logits for batch in batches]


def layer_of(model, name: str):
    return {layer.name: layer for layer in get_family(model).sparse_layers(model)}[name]


def counts_config(model, options: dict | None = None, method: str | None = None, **counts: int) -> "PruneRecipe":
    """Keep every expert except in the layers named (dots as ``__``): explicit counts, so no adaptive re-split."""
    sizes = get_family(model).layer_sizes(model)
    chosen = {name.replace("__", "."): k for name, k in counts.items()}
    extra = {"method": method, "method_options": options} if options else {}
    return make_recipe(num_experts_per_layer={name: chosen.get(name, size) for name, size in sizes.items()}, **extra)


def plan_for(method: str, model, stats, config: "PruneRecipe") -> PruningPlan:
    family = get_family(model)
    budget = expert_budget(family.layer_sizes(model), config.factor, config.num_experts_per_layer)
    return get_method(method)(stats, model, family, budget, config)


@pytest.fixture(scope="module")
def calibrated(switch_dir):
    model = load_model(switch_dir)
    batches = batches_for(switch_dir)
    return model, batches, calibrate(model, get_family(model), batches, progress=False)


def make_twins(model, a: int, b: int, seed: int = 0) -> list[int]:
    """Expert ``b`` := expert ``a`` with its hidden neurons shuffled (same function), router row ``b`` := row ``a``."""
    layer = layer_of(model, LAYER)
    perm = torch.randperm(model.config.d_ff, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.experts[b].wi.weight.copy_(layer.experts[a].wi.weight[perm])
        layer.experts[b].wo.weight.copy_(layer.experts[a].wo.weight[:, perm])
        layer.router.weight[b] = layer.router.weight[a]
    return perm.tolist()


@pytest.mark.parametrize("method", ["uncurl", "msmoe"])
def test_twin_experts_merge_losslessly_thanks_to_alignment(method, switch_dir):
    """Two copies of one expert, one with its neurons permuted, merge into exactly that expert.

    Reference: with one router row per output expert (M-SMoE's default), the same model with the twin simply deleted
    (the original cannot be matched: with identical router rows the twins split the softmax mass, so any 7-row top-1
    router changes the gates); with UNCURL's default ``router="map"`` (every original row kept), the original model.
    The twins are given equal usage so both weigh 1/2: without the permutation the average would be a different
    function, so equality proves both the neuron alignment and that the weights sum to one.
    """
    model = tiny_switch_model()
    a, b = 1, 5
    make_twins(model, a, b)
    family = get_family(model)
    batches = batches_for(switch_dir)
    stats = calibrate(model, family, batches, progress=False)
    counts = torch.full((8,), 10, dtype=torch.long)
    counts[[a, b]] = 3  # least used, equal: M-SMoE makes `a` a centre and merges `b` into it
    stats[LAYER].counts = counts

    usage_weights = {"weights": "usage"} if method == "uncurl" else None  # the twins' equal counts weigh 1/2 each
    plan = plan_for(method, model, stats, counts_config(model, usage_weights, method, encoder__block__1=7))
    layer_plan = plan.layer(LAYER)
    assert layer_plan.groups == [[0], [a, b], [2], [3], [4], [6], [7]]
    assert layer_plan.weights[1] == [0.5, 0.5]
    assert layer_plan.extras["permutations"][1][1] is not None

    merged = apply_plan(model, family, plan)
    merged_expert = layer_of(merged, LAYER).experts[1]
    torch.testing.assert_close(merged_expert.wi.weight, layer_of(model, LAYER).experts[a].wi.weight)
    torch.testing.assert_close(merged_expert.wo.weight, layer_of(model, LAYER).experts[a].wo.weight)

    keep = [LayerPlan.keep(l.name, 8, [e for e in range(8) if not (l.name == LAYER and e == b)])
            for l in family.sparse_layers(model)]
    deduplicated = apply_plan(model, family, PruningPlan(model.config.model_type, family.name, "manual", keep))
    assert layer_plan.router == {"uncurl": "map", "msmoe": "weighted"}[method]
    reference = model if layer_plan.router == "map" else deduplicated
    for got, want in zip(logits_on(merged, batches), logits_on(reference, batches)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    unaligned = PruningPlan.from_json(plan.to_json())
    unaligned.layer(LAYER).extras = {}
    naive = apply_plan(model, family, unaligned)
    assert not torch.allclose(logits_on(naive, batches)[0], logits_on(deduplicated, batches)[0], atol=1e-3)


def test_spectral_clustering_groups_experts_with_identical_router_columns(switch_dir):
    model = tiny_switch_model()
    classes = [[0, 3, 5], [1, 6], [2, 4, 7]]
    router = layer_of(model, LAYER).router
    with torch.no_grad():
        for members in classes:
            router.weight[members[1:]] = router.weight[members[0]].clone()
    stats = calibrate(model, get_family(model), batches_for(switch_dir), progress=False)
    plan = plan_for("uncurl", model, stats, counts_config(model, encoder__block__1=3))
    assert sorted(sorted(g) for g in plan.layer(LAYER).groups) == classes
    assert all(len(layer.groups) == 8 for layer in plan.layers if layer.name != LAYER)


@pytest.mark.parametrize(
    "affinity",
    [np.ones((6, 6)), np.zeros((6, 6)), np.full((6, 6), np.nan), np.eye(6), np.random.default_rng(0).random((6, 6))],
    ids=["ones", "zeros", "nan", "identity", "random"],
)
@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_spectral_groups_always_partition_into_k(affinity, k):
    groups = spectral_groups(affinity, k, seed=0)
    assert len(groups) == k and all(groups)
    assert sorted(e for g in groups for e in g) == list(range(6))
    assert groups == spectral_groups(affinity, k, seed=0)


def test_match_neurons_recovers_a_permutation():
    rng = torch.Generator().manual_seed(1)
    anchor = torch.randn(16, 12, generator=rng)
    perm = torch.randperm(16, generator=rng)
    shuffled = anchor[perm]
    found = match_neurons(anchor, shuffled)
    assert torch.equal(shuffled[found], anchor)
    assert match_neurons(anchor, anchor) is None


def test_align_groups_solves_every_member_as_match_neurons_does_for_any_number_of_threads():
    """The pool changes when the assignments run, never what they are; weight-0 members and singletons are skipped."""
    from uncurl_hf.methods._alignment import neuron_features

    model = tiny_switch_model()
    family = get_family(model)
    layer = family.sparse_layers(model)[0]
    groups, weights = [[0, 3, 5], [1], [2, 4, 6, 7]], [[0.5, 0.3, 0.2], [1.0], [0.4, 0.0, 0.3, 0.3]]

    def features(index):
        return neuron_features(family.expert_tensors(layer, index), family.neuron_axes)

    expected = [
        [None, match_neurons(features(0), features(3)), match_neurons(features(0), features(5))],
        None,
        [None, None, match_neurons(features(2), features(6)), match_neurons(features(2), features(7))],
    ]
    assert all(p is not None for p in (expected[0][1], expected[2][3]))  # random experts: real permutations
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert align_groups(family, layer, groups, weights) == expected
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method, kwargs", ALL_METHODS, ids=lambda v: v if isinstance(v, str) else str(v or ""))
def test_method_budget_determinism_and_round_trip(method, kwargs, calibrated, switch_dir, tmp_path):
    model, batches, stats = calibrated
    family = get_family(model)
    sizes = family.layer_sizes(model)
    for factor in (2, 4, 8):
        budget = expert_budget(sizes, factor)
        config = make_recipe(method=method, factor=factor, seed=3, method_kwargs=kwargs)
        plan = get_method(method)(stats, model, family, budget, config)
        assert plan.to_json() == get_method(method)(stats, model, family, budget, config).to_json()
        counts = plan.counts
        assert sum(counts.values()) == sum(budget.values())
        assert all(1 <= counts[name] <= sizes[name] for name in sizes)
        if method in UNIFORM or kwargs.get("uniform"):
            assert counts == budget
        plan.validate(sizes, get_method(method).allocate(stats, budget, config))

    pruned = apply_plan(model, family, plan)
    out = write_checkpoint(pruned, tmp_path / "out", plan, source_dir=switch_dir)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert reloaded.config.num_experts_per_encoder_layer == [counts["encoder.block.1"], counts["encoder.block.3"]]
    for got, want in zip(logits_on(reloaded, batches), logits_on(pruned, batches)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_adaptive_counts_follow_the_task_and_land_in_the_config(calibrated, switch_dir, calibration_jsonl, tmp_path):
    model, _, stats = calibrated
    sizes = get_family(model).layer_sizes(model)
    total = sum(expert_budget(sizes, 2).values())
    usage = allocate_by_pooled_usage(stats, total, list(sizes))
    assert usage != expert_budget(sizes, 2)  # this random model routes unevenly: counts differ by layer
    entropy = allocate_by_effective_experts(stats, total, list(sizes))
    assert sum(entropy.values()) == total

    result = prune_flat(switch_dir, output_dir=tmp_path / "adaptive", factor=2, method="uncurl",
                   calibration_file=calibration_jsonl, progress=False)
    assert result.plan.counts == usage
    config = json.loads((tmp_path / "adaptive" / "config.json").read_text())
    assert config["num_experts_per_encoder_layer"] == [usage["encoder.block.1"], usage["encoder.block.3"]]
    assert config["num_experts_per_decoder_layer"] == [usage["decoder.block.1"], usage["decoder.block.3"]]

    code = cli_main(["prune", str(switch_dir), "--calibration-file", str(calibration_jsonl), "--factor", "2",
                     "--method", "uncurl", "--uniform", "-o", str(tmp_path / "uniform"), "--no-progress"])
    assert code == 0
    assert PruningPlan.load(tmp_path / "uniform").counts == dict.fromkeys(sizes, 4)


def test_pooled_usage_gives_seats_to_the_most_used_experts_anywhere():
    def layer(name: str, counts: list[int]) -> ExpertStats:
        c = torch.tensor(counts)
        return ExpertStats(layer=name, num_experts=len(counts), top_k=1, num_tokens=int(c.sum()), counts=c,
                           gate_mass=c.double())

    stats = {"a": layer("a", [50, 50, 0, 0]), "b": layer("b", [25, 25, 25, 25])}
    assert allocate_by_pooled_usage(stats, 4, ["a", "b"]) == {"a": 2, "b": 2}
    assert allocate_by_pooled_usage(stats, 3, ["a", "b"]) == {"a": 2, "b": 1}
    assert allocate_by_effective_experts(stats, 3, ["a", "b"]) == {"a": 1, "b": 2}
    assert allocate_by_effective_experts(stats, 8, ["a", "b"]) == {"a": 4, "b": 4}


def test_reap_ranks_by_gate_times_norm():
    """Three experts where frequency, mean norm and gate * norm each pick a different winner."""
    stats = ExpertStats(
        layer="l",
        num_experts=4,
        top_k=1,
        counts=torch.tensor([10, 10, 2, 0]),
        gate_mass=torch.tensor([6.0, 5.0, 1.0, 0.5], dtype=torch.float64),
        output_norm_sum=torch.tensor([10.0, 30.0, 4.0, 0.0], dtype=torch.float64),  # means 1.0, 3.0, 2.0, 0
        weighted_output_norm_sum=torch.tensor([5.0, 6.0, 1.8, 0.0], dtype=torch.float64),  # means .5, .6, .9, 0
        applied_output_norm_sum=torch.tensor([5.0, 6.0, 1.8, 0.0], dtype=torch.float64),  # top-1: the softmax gate
    )
    assert rank_by_reap(stats) == rank_by_reap(stats, "softmax") == [2, 1, 0, 3]
    assert rank_by_reap(stats, "renormalized") == [1, 2, 0, 3]
    model = tiny_switch_model()
    family = get_family(model)
    config = make_recipe(factor=4)
    reap = get_method("reap").plan_layer("l", 4, stats, 1, model, family, config)
    freq = get_method("frequency").plan_layer("l", 4, stats, 1, model, family, config)
    assert reap.groups == [[2]] and freq.groups == [[0]]


def test_method_options_are_checked_against_the_methods_options_dataclass_when_the_recipe_is_made():
    for method, kwargs, message in [
        ("uncurl", {"routr": "anchor"}, r"no setting\(s\) \['routr'\].*router='map'"),
        ("uncurl", {"router": "sum"}, "router must be one of 'weighted', 'anchor', 'fitted', 'map', got 'sum'"),
        ("uncurl", {"uniform": "yes"}, "must be a bool"),
        ("uncurl", {"profile": "spearman"}, "profile must be one of 'pearson', 'centered', 'raw'"),
        ("reap", {"gate": "none"}, "gate must be one of 'applied', 'softmax', 'renormalized'"),
        ("hcsmoe", {"max_tokens": 0}, "max_tokens must be >= 1"),
        ("frequency", {"router": "anchor"}, r"Method 'frequency' options has no setting\(s\) \['router'\]"),
    ]:
        with pytest.raises(UncurlError, match=message):
            make_recipe(method=method, factor=2, method_kwargs=kwargs)
    assert {"reap", "msmoe", "hcsmoe", "uncurl"} <= set(available_methods())


def test_quality_benchmark_runs_end_to_end(switch_dir, tmp_path, capsys):
    module = load_benchmark("quality")
    from uncurl_hf.experiments.sweep import split_methods  # the benchmark reads --methods with the sweep's parser

    assert split_methods("uncurl:router=anchor,uniform=true,frequency") == [
        "uncurl:router=anchor,uniform=true", "frequency"
    ]
    out = tmp_path / "quality.json"
    code = module.main(["--pairs", f"{switch_dir}:sentiment", "--methods", "frequency,uncurl:router=fitted",
                        "--reference", "uncurl:router=fitted", "--factors", "2", "--seeds", "0,1", "--limit", "8",
                        "--num-calibration", "8", "--bootstrap", "50", "--json", str(out), "-q"])
    assert code == 0
    table = capsys.readouterr().out
    assert "uncurl:router=fitted - best [95% CI]" in table and "cells ok for uncurl:router=fitted" in table
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert [(r["method"], r["seed"]) for r in results] == [
        ("frequency", 0), ("uncurl:router=fitted", 0), ("frequency", 1), ("uncurl:router=fitted", 1)
    ]
    assert all(sum(r["counts"].values()) == 16 and len(r["correct"]) == 8 for r in results)
    assert all(0.0 <= r["replaced"] <= 1.0 for r in results)
    assert results[0]["router_agreement"] != results[0]["router_agreement"]  # NaN: pruning has no merged router
    assert 0.0 <= results[1]["router_agreement"] <= 1.0
    assert all(r["reconstruction"] > 0.0 for r in results)  # held-out layer-output error of a real reduction
    assert all(0.0 < r["label_kl"] < 1.0 for r in results)  # the pruned models' label distributions moved, a little
    assert len(payload["verdicts"]) == 1 and payload["verdicts"][0]["factor"] == 2.0


def test_paired_interval_is_exact_on_a_constant_difference():
    module = load_benchmark("quality")
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=float)
    assert module.paired_interval(a, a, 100) == (0.0, 0.0, 0.0)
    mean, low, high = module.paired_interval(a, np.zeros(8), 2000)
    assert mean == 5 / 8 and 0.0 <= low < mean < high <= 1.0


def test_the_knn_affinity_is_a_symmetric_locally_scaled_neighbour_graph():
    from uncurl_hf.methods._merging import cosine_similarity, knn_affinity

    profiles = np.random.default_rng(0).normal(size=(20, 50))
    affinity = knn_affinity(profiles, neighbours=3)
    assert np.array_equal(affinity, affinity.T) and np.all(np.diag(affinity) == 1.0)
    distance = 1.0 - cosine_similarity(profiles)
    for i in range(20):
        nearest = [j for j in np.argsort(distance[i], kind="stable") if j != i][:3]
        assert all(affinity[i, j] > 0 for j in nearest)  # its 3 nearest are kept
        sigma_i = distance[i, nearest[-1]]
        for j in nearest:
            sigma_j = distance[j, [m for m in np.argsort(distance[j], kind="stable") if m != j][2]]
            assert affinity[i, j] == pytest.approx(np.exp(-distance[i, j] ** 2 / (sigma_i * sigma_j)))
    assert (affinity > 0).sum() < 20 * 20 / 2  # sparse: far pairs are 0
    assert np.array_equal(knn_affinity(profiles, neighbours=3), affinity)


def test_uncurl_with_the_knn_affinity_plans_every_layer(switch_dir, calibration_jsonl, tmp_path):
    result = prune_flat(switch_dir, tmp_path / "knn", method="uncurl", method_options={"affinity": "knn"}, factor=2,
                        file=str(calibration_jsonl), num_examples=16, dry_run=True)
    for layer in result.plan.layers:
        assert sorted(e for g in layer.groups for e in g) == list(range(layer.num_experts))
