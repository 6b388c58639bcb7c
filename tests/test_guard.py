"""The reconstruction guard of the merging methods (``guard=true``).

Specification: the guard's proxy is the real layer -- its MoE output equals the family's own sparse block on the
original layer and on the pruned model's layer -- and, per layer, it returns the candidate (the merge, or the same
groups pruned to their highest-REAP members) with the smallest relative error, the merge on a tie, recording every
candidate's error. Merging identical experts behind the original router reconstructs the layer exactly, so the
guard keeps that merge; in bfloat16 the guarded prune is deterministic (a decoder and Switch).
"""

from __future__ import annotations

import pytest
import torch
from helpers import hash_tree, prune_flat
from test_families_decoder import tiny_model
from test_half_precision import save_source
from test_logical_merge import make_twins, model_of, pairs, with_rule

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.families import get_family
from uncurl_hf.methods._guard import guarded_plan, moe_output
from uncurl_hf.methods.reap import reap_scores
from uncurl_hf.surgery.apply import apply_plan

# Qwen2-MoE is left out: its block adds a shared expert, which the guard leaves out (it cancels in F - F_P)
BLOCK_FAMILIES = ("switch", "mixtral", "qwen3_moe", "olmoe", "gpt_oss")


def block_output(family, layer, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own sparse block on ``hidden [T, D]`` (each token its own sequence: no Switch capacity drop)."""
    with torch.no_grad():
        out = layer.module(hidden[:, None, :])
    return (out[0] if isinstance(out, tuple) else out)[:, 0, :]


def proxy_output(family, layer, hidden: torch.Tensor) -> torch.Tensor:
    router = family.router_tensors(layer)
    return moe_output(family, layer, hidden, router, lambda j, x: family.run_expert(layer, j, x), layer.expert_map)


@pytest.mark.parametrize("family_name", BLOCK_FAMILIES)
def test_the_proxy_is_the_sparse_block_of_the_original_and_of_the_pruned_model(family_name):
    model = model_of(family_name)
    family = get_family(model)
    torch.manual_seed(0)
    hidden = torch.randn(40, model.config.hidden_size if family_name != "switch" else model.config.d_model)
    for rule in ("weighted", "map"):
        pruned = apply_plan(model, family, with_rule(model, pairs(model), rule))
        for m in (model, pruned):
            for layer in get_family(m).sparse_layers(m):
                torch.testing.assert_close(proxy_output(family, layer, hidden), block_output(family, layer, hidden),
                                           rtol=1e-5, atol=1e-6)


def calibrated_stats(model, layer, tokens: int = 64, seed: int = 0) -> ExpertStats:
    """Stats with routing counts and a hidden sample, as calibration records them (random inputs)."""
    family = get_family(model)
    torch.manual_seed(seed)
    hidden = torch.randn(tokens, layer.router.weight.shape[1])
    logits = family.router_logits(layer, hidden)
    _, selected = family.routing(logits, layer.top_k)
    e = layer.num_experts
    counts = torch.bincount(selected.reshape(-1), minlength=e)
    return ExpertStats(
        layer=layer.name, num_experts=e, top_k=layer.top_k, num_tokens=tokens, counts=counts,
        gate_mass=counts.double(), applied_output_norm_sum=torch.arange(e, 0, -1).double(),
        logit_sample=logits, hidden_sample=hidden,
    )


@pytest.mark.parametrize("family_name", ["switch", "qwen3_moe"])
def test_the_guard_keeps_the_candidate_with_the_smallest_error(family_name):
    model = model_of(family_name)
    family = get_family(model)
    for rule in ("weighted", "map"):
        plan = with_rule(model, pairs(model), rule)
        for layer in family.sparse_layers(model):
            stats = calibrated_stats(model, layer)
            chosen = guarded_plan(family, layer, plan.layer(layer.name), stats, seed=0)
            record = chosen.extras["guard"]
            assert record["errors"][record["chosen"]] == min(record["errors"].values())
            assert record["tokens"] == 64
            if record["chosen"] == "prune":
                scores = reap_scores(stats).tolist()
                assert chosen.groups == sorted([max(g, key=lambda e: scores[e])] for g in pairs(model)[layer.name])
            else:
                assert chosen is plan.layer(layer.name)


def test_identical_experts_merged_behind_the_original_router_are_kept_merged():
    model = tiny_model("qwen3_moe")
    make_twins(model)
    family = get_family(model)
    plan = with_rule(model, pairs(model), "map")
    for layer in family.sparse_layers(model):
        chosen = guarded_plan(family, layer, plan.layer(layer.name), calibrated_stats(model, layer), seed=0)
        assert chosen.extras["guard"]["chosen"] == "merge"
        assert chosen.extras["guard"]["errors"]["merge"] < 1e-5 < chosen.extras["guard"]["errors"]["prune"]


@pytest.mark.parametrize("family", ["qwen3_moe", "switch"])
def test_a_guarded_bfloat16_prune_is_deterministic(tmp_path, calibration_jsonl, family):
    source = save_source(tmp_path / "src", family, torch.bfloat16)
    runs = [prune_flat(source, tmp_path / name, method="uncurl", method_options={"guard": True}, factor=2,
                       file=str(calibration_jsonl), num_examples=16) for name in ("a", "b")]
    assert hash_tree(runs[0].output_dir) == hash_tree(runs[1].output_dir)
    assert all("guard" in layer.extras for layer in runs[0].plan.layers)
