"""Sequential planning: layer l is planned on statistics of the model whose earlier layers are already pruned."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BANNED_HALF, CALIBRATION_TARGETS, CALIBRATION_TEXTS, tiny_tokenizer

from uncurl_hf import apply_plan, build_batches, calibrate, get_method, load_model

from helpers import make_recipe
from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.cli.main import main
from uncurl_hf.families import get_family
from uncurl_hf.plan import LayerPlan, PruningPlan
from uncurl_hf.pipeline.planning import calibrate_and_plan
from uncurl_hf.evaluation.tasks import Example

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
LAYERS = ["encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3"]


def plan_both_ways(model_dir, method: str, factor: float):
    model = load_model(model_dir)
    family = get_family(model)
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=6, max_length=16)
    budget = expert_budget(family.layer_sizes(model), factor)
    config = make_recipe(method=method, factor=factor, seed=1)
    one_shot = calibrate_and_plan(model, family, get_method(method), batches, budget, config, progress=False)
    sequential = calibrate_and_plan(
        model, family, get_method(method), batches, budget, config, sequential=True, progress=False
    )
    return model, family, batches, one_shot, sequential


def test_removing_never_routed_experts_changes_nothing_downstream(half_banned_switch_dir):
    """frequency x2 on BANNED_HALF removes exactly the unreachable experts, so every later layer sees the same
    hidden states: sequential and one-shot statistics and plans coincide."""
    _, _, _, one_shot, sequential = plan_both_ways(half_banned_switch_dir, "frequency", 2.0)
    assert sequential.calibration_passes == len(LAYERS) and one_shot.calibration_passes == 1
    for layer in sequential.plan.layers:
        assert layer.dropped == BANNED_HALF[layer.name]
    assert sequential.plan.layers == one_shot.plan.layers
    for name in LAYERS:
        assert torch.equal(sequential.stats[name].counts, one_shot.stats[name].counts), name
        # float32 GEMMs over 4 instead of 8 router rows round differently in the last bits
        torch.testing.assert_close(sequential.stats[name].gate_mass, one_shot.stats[name].gate_mass, rtol=1e-5,
                                   atol=1e-5)
    assert sequential.plan.metadata["sequential"] is True


def test_each_layer_is_planned_on_the_model_pruned_before_it(switch_dir):
    model, family, batches, one_shot, sequential = plan_both_ways(switch_dir, "frequency", 4.0)
    done: list[LayerPlan] = []
    for index, name in enumerate(LAYERS):
        keep_rest = [
            next((p for p in done if p.name == n), None) or LayerPlan.keep(n, 8, list(range(8))) for n in LAYERS
        ]
        partial = PruningPlan(model_type="switch_transformers", family=family.name, method="frequency",
                              layers=keep_rest)
        expected = calibrate(apply_plan(model, family, partial), family, batches, progress=False)[name]
        assert torch.equal(sequential.stats[name].counts, expected.counts), name
        if index == 0:
            assert torch.equal(sequential.stats[name].counts, one_shot.stats[name].counts)
        done.append(sequential.plan.layer(name))
    # pruning encoder.block.1 to 2 experts moves the hidden states every later layer sees
    for name in LAYERS[1:]:
        assert not torch.equal(sequential.stats[name].counts, one_shot.stats[name].counts), name
    # and frequency then keeps the experts most used on THOSE states
    for name in LAYERS:
        counts = sequential.stats[name].counts.tolist()
        kept = sequential.plan.layer(name).used
        assert min(counts[e] for e in kept) >= max(counts[e] for e in range(8) if e not in kept), name


def test_adaptive_counts_are_allocated_once_from_the_unpruned_model(switch_dir):
    _, _, _, one_shot, sequential = plan_both_ways(switch_dir, "uncurl", 2.0)
    assert sequential.budget == one_shot.budget
    assert sequential.plan.counts == one_shot.budget


@pytest.mark.parametrize("flag", [[], ["--sequential"]])
def test_cli_sequential_flag(flag, switch_dir, calibration_jsonl, tmp_path):
    out = tmp_path / "out"
    argv = ["prune", str(switch_dir), "--calibration-file", str(calibration_jsonl), "--factor", "4", "--seed", "1",
            "--num-calibration", "12", "--batch-size", "6", "--max-length", "16", "-o", str(out), "--no-progress",
            *flag]
    assert main(argv) == 0
    plan = json.loads((out / "uncurl_plan.json").read_text())
    assert plan["metadata"].get("sequential", False) is bool(flag)
    assert load_model(out).config.num_experts_per_encoder_layer == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family_name", ["switch", "qwen3_moe", "gpt_oss"])
def test_an_intermediate_model_shares_what_it_does_not_reduce(family_name, dtype):
    """Sequential planning's intermediate models (``only`` + ``share``) hold the source's own tensors wherever
    nothing changed, so they cost the reduced layers, not a second model; they equal the copying surgery."""
    from test_families_decoder import logits, tiny_model

    from helpers import tiny_switch_model

    model = (tiny_switch_model() if family_name == "switch" else tiny_model(family_name)).to(dtype)
    family = get_family(model)
    layers = family.sparse_layers(model)
    first = layers[0]
    planned = LayerPlan(name=first.name, num_experts=first.num_experts,
                        groups=[[e] for e in range(0, first.num_experts, 2)])
    partial = PruningPlan(
        model_type=model.config.model_type, family=family.name, method="manual",
        layers=[planned] + [LayerPlan.keep(layer.name, layer.num_experts, list(range(layer.num_experts)))
                            for layer in layers[1:]],
    )
    shared = apply_plan(model, family, partial, only={first.name}, share=True)
    copied = apply_plan(model, family, partial)
    source = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    reduced_prefix = f"{first.prefix}."
    for name, tensor in shared.state_dict().items():
        expert_or_router = name.startswith(reduced_prefix) and (".experts." in name or "router" in name
                                                                 or ".gate." in name)
        if expert_or_router:
            assert tensor.data_ptr() != source.get(name), name
        else:
            assert tensor.data_ptr() == source[name], name
    assert all(t.data_ptr() not in source.values() for t in copied.state_dict().values())
    assert shared.state_dict().keys() == copied.state_dict().keys()
    for name, tensor in copied.state_dict().items():
        assert torch.equal(shared.state_dict()[name], tensor), name
    if family_name != "switch":
        assert torch.equal(logits(shared), logits(copied))
