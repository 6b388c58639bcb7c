"""The EAN and NAEE baselines and super-expert protection: budgets, determinism, round trips, and each criterion
checked against a direct recomputation (EAN), a brute force through the real pruned layer (NAEE) and crafted
outliers (super experts)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, make_recipe, prune_flat, tiny_switch_model, tiny_tokenizer
from test_families_decoder import tiny_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from uncurl_hf import LayerPlan, PruningPlan, build_batches, calibrate
from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.cli.main import main as cli_main
from uncurl_hf.errors import UncurlError
from uncurl_hf.evaluation.tasks import Example
from uncurl_hf.families import get_family
from uncurl_hf.methods import get_method
from uncurl_hf.methods.ean import rank_by_ean
from uncurl_hf.methods.naee import Reconstruction, exhaustive_subset, greedy_subset
from uncurl_hf.methods.super_experts import keep_protected, max_activations, outliers, protected_experts
from uncurl_hf.surgery.apply import apply_plan
from uncurl_hf.surgery.budget import expert_budget

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
DECODER_IDS = torch.tensor([[5, 9, 13, 7, 22, 31, 2, 40, 17, 3], [11, 3, 8, 19, 27, 6, 44, 12, 50, 33]])
CASES = [
    ("ean", {}),
    ("ean", {"reduce": "sum"}),
    ("ean", {"protect_super_experts": True}),
    ("naee", {}),
    ("naee", {"max_combinations": 1}),  # greedy
    ("naee", {"protect_super_experts": True, "super_expert_site": "input"}),
]


def switch_calibrated(model=None):
    model = tiny_switch_model() if model is None else model
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=4, max_length=32)
    return model, calibrate(model, get_family(model), batches, progress=False)


def decoder_calibrated(family_name: str = "mixtral", model=None, **overrides):
    model = tiny_model(family_name, **overrides) if model is None else model
    batch = {"input_ids": DECODER_IDS, "attention_mask": torch.ones_like(DECODER_IDS)}
    return model, calibrate(model, get_family(model), [batch], progress=False)


def plan_for(method: str, model, stats, factor: int = 2, **options) -> PruningPlan:
    family = get_family(model)
    recipe = make_recipe(factor=factor, method=method, method_options=options)
    budget = expert_budget(family.layer_sizes(model), recipe.factor, recipe.num_experts_per_layer)
    return get_method(method)(stats, model, family, budget, recipe)


def layer_of(model, name: str):
    return {layer.name: layer for layer in get_family(model).sparse_layers(model)}[name]


@pytest.fixture(scope="module")
def switch():
    return switch_calibrated()


@pytest.fixture(scope="module")
def mixtral():
    return decoder_calibrated("mixtral")


# -- every method: budget, determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_each_method_keeps_k_experts_per_layer_and_is_deterministic(method, options, switch, mixtral):
    for model, stats in (switch, mixtral):
        family = get_family(model)
        first = plan_for(method, model, stats, **options)
        second = plan_for(method, model, stats, **options)
        first.validate(family.layer_sizes(model))
        assert first.counts == {name: size // 2 for name, size in family.layer_sizes(model).items()}
        assert all(layer.is_pure_pruning for layer in first.layers)
        assert first.to_json() == second.to_json()
        assert first.method == method


def test_bad_options_are_one_clear_error(switch):
    model, stats = switch
    for method, options, message in [
        ("naee", {"max_combinations": 0}, "max_combinations"),
        ("naee", {"max_tokens": 0}, "max_tokens"),
        ("ean", {"super_expert_z": -1.0}, "super_expert_z"),
        ("ean", {"reduce": "median"}, "reduce"),
        ("naee", {"super_expert_site": "gate"}, "super_expert_site"),
    ]:
        with pytest.raises(UncurlError, match=message):
            plan_for(method, model, stats, **options)


def test_uncurl_methods_lists_the_new_methods_and_their_options(capsys):
    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    for text in ("ean ", "naee ", "protect_super_experts", "super_expert_z", "super_expert_site", "max_combinations",
                 "reduce (one of 'mean', 'sum', default 'mean')"):
        assert text in out


# -- EAN -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def direct_mean_output_norms(model, batches) -> dict[str, torch.Tensor]:
    """Per layer: mean ||expert(x)|| over the real tokens routed to each expert, token by token from the layer input."""
    family = get_family(model)
    layers = family.sparse_layers(model)
    sums = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    counts = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    for batch in batches:
        inputs = family.forward_inputs(model, batch)
        captured: dict[str, torch.Tensor] = {}
        handles = [layer.module.register_forward_pre_hook(
            lambda m, args, name=layer.name: captured.__setitem__(name, args[0])) for layer in layers]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            mask = inputs[layer.mask_key]
            hidden = captured[layer.name].reshape(-1, captured[layer.name].shape[-1])[mask.reshape(-1).bool()]
            _, selected = family.routing(family.router_logits(layer, hidden), layer.top_k)
            for t in range(hidden.shape[0]):
                for e in selected[t].tolist():
                    sums[layer.name][e] += float(family.run_expert(layer, e, hidden[t : t + 1]).double().norm())
                    counts[layer.name][e] += 1
    return {name: sums[name] / counts[name].clamp(min=1) for name in sums}


def test_ean_ranking_equals_a_direct_recomputation_of_mean_routed_output_norms(switch, mixtral):
    batch = {"input_ids": DECODER_IDS, "attention_mask": torch.ones_like(DECODER_IDS)}
    switch_batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=4, max_length=32)
    for (model, stats), batches in ((switch, switch_batches), (mixtral, [batch])):
        direct = direct_mean_output_norms(model, batches)
        plan = plan_for("ean", model, stats)
        for name, scores in direct.items():
            layer_stats = stats[name]
            torch.testing.assert_close(layer_stats.mean_output_norm, scores, rtol=1e-5, atol=1e-6)
            counts, mass = layer_stats.counts.tolist(), layer_stats.gate_mass.tolist()
            expected = sorted(range(len(scores)), key=lambda e: (-round(float(scores[e]), 4), -counts[e], -mass[e], e))
            ranking = rank_by_ean(layer_stats)
            assert [round(float(scores[e]), 4) for e in ranking] == [round(float(scores[e]), 4) for e in expected]
            assert plan.layer(name).used == sorted(ranking[: len(scores) // 2])


def test_ean_ties_fall_back_to_counts_gate_mass_and_index():
    stats = ExpertStats(layer="x", num_experts=4, top_k=1, num_tokens=6, counts=torch.tensor([2, 1, 2, 1]),
                        gate_mass=torch.tensor([1.0, 0.5, 1.5, 0.5], dtype=torch.float64),
                        output_norm_sum=torch.tensor([4.0, 2.0, 4.0, 2.0], dtype=torch.float64))
    assert rank_by_ean(stats) == [2, 0, 1, 3]  # all means are 2: counts, then gate mass, then index
    assert rank_by_ean(stats, "sum") == [2, 0, 1, 3]


# -- NAEE ------------------------------------------------------------------------------------------------------------


def _block_output(module, hidden: torch.Tensor, per_token: bool) -> torch.Tensor:
    """The MoE block's output on ``hidden [T, D]`` (Switch: every token its own sequence, so no capacity drop)."""
    x = hidden[:, None, :] if per_token else hidden[None]
    out = module(x)
    return (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)


@torch.no_grad()
def brute_force_errors(model, name: str, hidden: torch.Tensor, k: int) -> dict[tuple[int, ...], float]:
    """``||F - F_S||_F`` for every subset S of k experts of layer ``name``, each through the real pruned model."""
    family = get_family(model)
    per_token = family.name == "switch_transformers"
    full = _block_output(layer_of(model, name).module, hidden, per_token)
    errors = {}
    for subset in itertools.combinations(range(layer_of(model, name).num_experts), k):
        layers = [
            LayerPlan.keep(layer.name, layer.num_experts, subset if layer.name == name else range(layer.num_experts))
            for layer in family.sparse_layers(model)
        ]
        plan = PruningPlan(model_type=model.config.model_type, family=family.name, method="manual", layers=layers)
        pruned = apply_plan(model, family, plan)
        errors[subset] = float((full - _block_output(layer_of(pruned, name).module, hidden, per_token)).norm())
    return errors


@pytest.mark.parametrize("case", ["switch", "mixtral", "qwen2_moe-softmax-gates"])
def test_naee_exhaustive_search_returns_the_brute_force_optimum_through_the_pruned_layer(case, switch, mixtral):
    if case == "switch":
        model, stats = switch
        name = "encoder.block.1"
    elif case == "mixtral":
        model, stats = mixtral
        name = "model.layers.0"
    else:  # top-2, gates = softmax over the kept experts (no renormalization)
        model, stats = decoder_calibrated("qwen2_moe", norm_topk_prob=False)
        name = "model.layers.0"
    family = get_family(model)
    hidden = stats[name].hidden_sample
    brute = brute_force_errors(model, name, hidden, 2)  # factor 4: C(8, 2) = 28 pruned models
    score = Reconstruction(family, layer_of(model, name), hidden)
    subsets = [list(s) for s in brute]
    errors = score(subsets).sqrt().tolist()
    scale = max(brute.values())
    for subset, error in zip(brute, errors):
        assert error == pytest.approx(brute[subset], rel=1e-4, abs=1e-5 * scale)
    best = min(brute, key=brute.get)
    kept, squared = exhaustive_subset(score, 2)
    assert tuple(kept) == best and math.sqrt(squared) == pytest.approx(brute[best], rel=1e-4)
    plan = plan_for("naee", model, stats, factor=4, max_tokens=10_000)
    assert plan.layer(name).used == list(best)
    extras = plan.layer(name).extras["naee"]
    assert extras["search"] == "exhaustive" and extras["subsets"] == 28
    assert extras["error"] == pytest.approx(brute[best], rel=1e-3)


def crafted_pairs_case(kept: tuple[int, ...] = (1, 3, 4, 6)):
    """A Mixtral layer (top-2, renormalized) whose router sends each crafted token to a pair of ``kept`` experts.

    Router row e is 10 * (unit vector e); a token is e_a + e_b for a pair {a, b} of ``kept``, so its logits are 10
    for a and b and 0 elsewhere. Any subset holding both a and b routes it identically with the same renormalized
    gates, so ``kept`` is the one subset of 4 with zero error, and every other subset misses some pair.
    """
    model = tiny_model("mixtral")
    family = get_family(model)
    layer = family.sparse_layers(model)[0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :8] = 10.0 * torch.eye(8)
    hidden = torch.zeros(0, 16)
    for a, b in itertools.combinations(kept, 2):
        token = torch.zeros(16)
        token[a] = token[b] = 1.0
        hidden = torch.cat([hidden, token[None], 2.0 * token[None]])
    return family, layer, hidden


def test_naee_finds_the_only_zero_error_subset_of_a_crafted_layer():
    family, layer, hidden = crafted_pairs_case()
    score = Reconstruction(family, layer, hidden)
    kept, squared = exhaustive_subset(score, 4)
    assert kept == [1, 3, 4, 6] and squared < 1e-12 * score.total
    others = score([list(s) for s in itertools.combinations(range(8), 4) if list(s) != kept])
    assert float(others.min()) > 1e-3 * score.total
    greedy, greedy_squared = greedy_subset(score, 4, order=list(range(8)))
    assert greedy == [1, 3, 4, 6] and greedy_squared < 1e-12 * score.total


def test_naee_greedy_is_exhaustive_at_one_removal_and_matches_it_on_the_tiny_models(switch, mixtral):
    for model, stats in (switch, mixtral):
        family = get_family(model)
        for layer in family.sparse_layers(model):
            score = Reconstruction(family, layer, stats[layer.name].hidden_sample)
            order = list(range(layer.num_experts))
            for k in (layer.num_experts - 1, layer.num_experts // 2):
                best, best_error = exhaustive_subset(score, k)
                greedy, greedy_error = greedy_subset(score, k, order)
                assert greedy_error >= best_error * (1 - 1e-9)  # the exhaustive search is optimal
                # k = E - 1: greedy evaluates every subset (provably equal); k = E/2: equal on these seeded models
                assert greedy == best and greedy_error == pytest.approx(best_error, rel=1e-9)


def test_naee_computes_in_float32_for_a_half_precision_model(mixtral):
    model, stats = mixtral
    name = "model.layers.0"
    reference = plan_for("naee", model, stats).layer(name)
    half = tiny_model("mixtral").to(torch.bfloat16)
    layer = layer_of(half, name)
    score = Reconstruction(get_family(half), layer, stats[name].hidden_sample)
    assert score.grams.dtype == torch.float64 and next(layer.module.parameters()).dtype == torch.bfloat16
    assert score.layer is not layer and next(score.layer.module.parameters()).dtype == torch.float32
    kept, _ = exhaustive_subset(score, 4)
    assert kept == reference.used  # the bf16 weights rounded, the same decision


# -- super experts ---------------------------------------------------------------------------------------------------


def test_no_super_expert_on_unscaled_models(switch, mixtral):
    for model, stats in (switch, mixtral):
        family = get_family(model)
        for layer in family.sparse_layers(model):
            for site in ("output", "input"):
                assert protected_experts(layer, stats[layer.name], family, site=site) == set()


def test_an_expert_scaled_100x_is_the_layers_super_expert(switch, mixtral):
    model, stats = switch  # Switch: wi x 100 scales the down projection's input and (ReLU) its output
    name = "encoder.block.1"
    expert = int(stats[name].counts.argmax())
    scaled = tiny_switch_model()
    with torch.no_grad():
        layer_of(scaled, name).experts[expert].wi.weight.mul_(100.0)
    family = get_family(scaled)
    for site in ("output", "input"):
        assert protected_experts(layer_of(scaled, name), stats[name], family, site=site) == {expert}

    model, stats = mixtral  # Mixtral: down_proj x 100 scales the output only
    name = "model.layers.0"
    expert = int(stats[name].counts.argmax())
    scaled = tiny_model("mixtral")
    with torch.no_grad():
        layer_of(scaled, name).module.experts.down_proj[expert].mul_(100.0)
    family = get_family(scaled)
    assert protected_experts(layer_of(scaled, name), stats[name], family, site="output") == {expert}
    assert protected_experts(layer_of(scaled, name), stats[name], family, site="input") == set()
    values = max_activations(layer_of(scaled, name), stats[name], family, "output")
    assert float(values[expert]) > 30 * float(values.nanmedian())


def test_protection_keeps_a_super_expert_the_criteria_would_drop():
    """wi x 100 and wo / 100: the expert's output (so EAN and NAEE) is unchanged, its down-projection input is 100x."""
    model, stats = switch_calibrated()
    name = "encoder.block.1"
    dropped = set(range(8)) - set(plan_for("ean", model, stats).layer(name).used)
    dropped -= set(plan_for("naee", model, stats).layer(name).used)
    expert = min(e for e in dropped if stats[name].counts[e] > 0)
    with torch.no_grad():
        layer_of(model, name).experts[expert].wi.weight.mul_(100.0)
        layer_of(model, name).experts[expert].wo.weight.div_(100.0)
    model, stats = switch_calibrated(model)
    for method in ("ean", "naee"):
        assert expert not in plan_for(method, model, stats).layer(name).used
        assert expert not in plan_for(method, model, stats, protect_super_experts=True).layer(name).used
        protected = plan_for(method, model, stats, protect_super_experts=True, super_expert_site="input")
        assert expert in protected.layer(name).used and protected.counts[name] == 4


def test_outlier_rule_and_keeping_protected_experts_within_the_budget():
    nan = float("nan")
    assert outliers(torch.tensor([1.0, 1.1, 0.9, 1.05, 50.0], dtype=torch.float64), z=10) == {4}
    assert outliers(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.2], dtype=torch.float64), z=10) == set()  # MAD 0: floored
    assert outliers(torch.tensor([1.0, nan, 100.0, nan], dtype=torch.float64), z=10) == set()  # too few measured
    assert keep_protected([3, 1, 0, 2], {2}, 2) == [2, 3]
    assert keep_protected([3, 1, 0, 2], {0, 2, 1}, 2) == [1, 0]  # more protected than k: the best ranked of them


# -- round trips -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", [("ean", {"protect_super_experts": True}), ("naee", {})])
def test_prune_a_switch_folder_end_to_end_and_reload(method, options, switch_dir, calibration_jsonl, tmp_path):
    result = prune_flat(switch_dir, output_dir=tmp_path / method, factor=2, method=method,
                        calibration_file=calibration_jsonl, method_kwargs=options, progress=False)
    assert result.plan.method == method and set(result.plan.counts.values()) == {4}
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir)
    assert reloaded.config.num_experts_per_encoder_layer == [4, 4]
    saved = json.loads((result.output_dir / "uncurl_plan.json").read_text())
    assert saved["method"] == method
    if method == "naee":
        assert all(layer["extras"]["naee"]["search"] == "exhaustive" for layer in saved["layers"])
    ids = torch.tensor([[5, 9, 13, 1]])
    out = reloaded(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5]]))
    assert torch.isfinite(out.logits).all()


def test_prune_a_mixtral_folder_with_naee_end_to_end_and_reload(tmp_path):
    source = tmp_path / "mixtral"
    tiny_model("mixtral", vocab_size=len(tiny_tokenizer()), pad_token_id=0, bos_token_id=None,
               eos_token_id=1).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    data = tmp_path / "data.jsonl"
    rows = zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)
    data.write_text("".join(json.dumps({"text": t, "target": g}) + "\n" for t, g in rows))
    result = prune_flat(str(source), output_dir=tmp_path / "out", factor=2, method="naee", calibration_file=data,
                        method_kwargs={"protect_super_experts": True}, progress=False)
    assert set(result.plan.counts.values()) == {4} and result.plan.family == "mixtral"
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert reloaded.config.num_local_experts == 4
    generated = reloaded.generate(input_ids=torch.tensor([[5, 9, 13]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
