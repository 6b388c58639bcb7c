"""Weight surgery: lossless removal of unreachable experts, round trip through disk, merges, permutations."""

from __future__ import annotations

import torch
from helpers import BANNED_HALF, BANNED_UNEQUAL, CALIBRATION_TARGETS, CALIBRATION_TEXTS, hash_tree
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import uncurl_hf
from uncurl_hf import LayerPlan, PruningPlan, apply_plan, build_batches, calibrate, load_model
from helpers import make_recipe
from uncurl_hf.surgery.apply import merge_experts
from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.io.checkpoint import count_parameters, weights_size, write_checkpoint
from uncurl_hf.families import get_family
from uncurl_hf.methods import get_method
from uncurl_hf.evaluation.tasks import Example
from helpers import prune_flat

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


def batches_for(folder, batch_size=4):
    return build_batches(EXAMPLES, AutoTokenizer.from_pretrained(folder), batch_size=batch_size, max_length=32)


@torch.no_grad()
def logits_on(model, batches):
    family = get_family(model)
    return [model(**family.forward_inputs(model, batch)).logits for batch in batches]


def keep_plan(model, kept: dict[str, list[int]]) -> PruningPlan:
    family = get_family(model)
    layers = [LayerPlan.keep(l.name, l.num_experts, kept[l.name]) for l in family.sparse_layers(model)]
    return PruningPlan(model.config.model_type, family.name, "manual", layers)


def test_frequency_removes_exactly_the_unreachable_experts_losslessly(half_banned_switch_dir):
    model = load_model(half_banned_switch_dir)
    family = get_family(model)
    batches = batches_for(half_banned_switch_dir)
    stats = calibrate(model, family, batches, progress=False)
    config = make_recipe(factor=2)
    plan = get_method("frequency")(stats, model, family, expert_budget(family.layer_sizes(model), 2.0), config)
    for layer in plan.layers:
        assert layer.dropped == BANNED_HALF[layer.name]
    pruned = apply_plan(model, family, plan)
    for before, after in zip(logits_on(model, batches), logits_on(pruned, batches)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_hand_plan_unequal_counts_lossless_round_trip_train_generate(unequal_banned_switch_dir, tmp_path):
    model = load_model(unequal_banned_switch_dir)
    family = get_family(model)
    kept = {name: [e for e in range(8) if e not in banned] for name, banned in BANNED_UNEQUAL.items()}
    plan = keep_plan(model, kept)
    pruned = apply_plan(model, family, plan)
    assert type(pruned).__name__ == "PrunedSwitchTransformersForConditionalGeneration"
    assert pruned.config.num_experts_per_encoder_layer == [5, 2]
    assert pruned.config.num_experts_per_decoder_layer == [7, 8]
    batches = batches_for(unequal_banned_switch_dir)
    original = logits_on(model, batches)
    for before, after in zip(original, logits_on(pruned, batches)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)

    out = write_checkpoint(pruned, tmp_path / "out", plan, source_dir=unequal_banned_switch_dir)
    reloaded, info = AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.model_type == "pruned_switch_transformers"
    assert reloaded.config.num_experts_per_encoder_layer == [5, 2]
    for before, after in zip(original, logits_on(reloaded, batches)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    assert PruningPlan.load(out) == plan

    ids = batches[0]["input_ids"]
    generated = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(generated, model.generate(ids, max_new_tokens=5, do_sample=False))
    reloaded.train()
    loss = reloaded(input_ids=ids, labels=batches[0]["labels"], output_router_logits=True).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_apply_does_not_modify_the_input_model(switch_dir):
    model = load_model(switch_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    family = get_family(model)
    pruned = apply_plan(model, family, keep_plan(model, {n: [0, 2] for n in family.layer_sizes(model)}))
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)  # the pruned model owns its tensors
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"


def test_merged_group_averages_weights_and_shrinks_the_checkpoint(switch_dir, tmp_path):
    model = load_model(switch_dir)
    family = get_family(model)
    layers = []
    for layer in family.sparse_layers(model):
        if layer.name == "encoder.block.1":  # 8 -> 3 experts: {0,1} merged, {2,5,7} merged, 4 kept, 3 and 6 dropped
            layers.append(LayerPlan(layer.name, 8, [[0, 1], [2, 5, 7], [4]], [[0.25, 0.75], [0.5, 0.25, 0.25], [1.0]]))
        else:
            layers.append(LayerPlan.keep(layer.name, 8, range(8)))
    plan = PruningPlan(model.config.model_type, family.name, "manual-merge", layers)
    pruned = apply_plan(model, family, plan)

    old = {l.name: l for l in family.sparse_layers(model)}["encoder.block.1"]
    new = {l.name: l for l in family.sparse_layers(pruned)}["encoder.block.1"]
    assert new.num_experts == 3
    expected = 0.25 * old.experts[0].wi.weight + 0.75 * old.experts[1].wi.weight
    torch.testing.assert_close(new.experts[0].wi.weight, expected)
    torch.testing.assert_close(
        new.experts[1].wo.weight,
        0.5 * old.experts[2].wo.weight + 0.25 * old.experts[5].wo.weight + 0.25 * old.experts[7].wo.weight,
    )
    assert torch.equal(new.experts[2].wi.weight, old.experts[4].wi.weight)
    torch.testing.assert_close(new.router.weight[0], 0.25 * old.router.weight[0] + 0.75 * old.router.weight[1])
    assert torch.equal(new.router.weight[2], old.router.weight[4])

    d_model, d_ff = model.config.d_model, model.config.d_ff
    removed = 5 * (2 * d_model * d_ff + d_model)  # 5 experts (wi + wo) and 5 router rows
    assert count_parameters(pruned) == count_parameters(model) - removed
    out = write_checkpoint(pruned, tmp_path / "merged", plan, source_dir=switch_dir)
    assert weights_size(out) < weights_size(switch_dir)
    assert weights_size(switch_dir) - weights_size(out) >= removed * 4  # float32 bytes


def test_anchor_router_rule_and_neuron_permutations(switch_dir):
    model = load_model(switch_dir)
    family = get_family(model)
    layer = family.sparse_layers(model)[0]
    perm = torch.randperm(model.config.d_ff, generator=torch.Generator().manual_seed(0)).tolist()
    # A neuron-permuted expert computes the same function: merging it with weight 1 reproduces expert 3.
    merged = merge_experts(family, layer, [3, 6], [1.0, 0.0], [perm, None])
    assert not torch.equal(merged["wi"], layer.experts[3].wi.weight)
    x = torch.randn(5, model.config.d_model)
    expert = layer.experts[3]
    rebuilt = torch.relu(x @ merged["wi"].T) @ merged["wo"].T
    torch.testing.assert_close(rebuilt, expert(x))

    layers = [
        LayerPlan(
            l.name, 8, [[3, 6], [0]], [[0.5, 0.5], [1.0]], router="anchor",
            extras={"permutations": [[perm, None], None]},
        )
        if l.name == layer.name
        else LayerPlan.keep(l.name, 8, range(8))
        for l in family.sparse_layers(model)
    ]
    plan = PruningPlan.from_json(PruningPlan(model.config.model_type, family.name, "m", layers).to_json())
    pruned = apply_plan(model, family, plan)
    new = family.sparse_layers(pruned)[0]
    assert torch.equal(new.router.weight[0], layer.router.weight[3])
    index = torch.tensor(perm)
    expected = 0.5 * layer.experts[3].wi.weight[index] + 0.5 * layer.experts[6].wi.weight
    torch.testing.assert_close(new.experts[0].wi.weight, expected)


def test_prune_twice_and_public_prune(switch_dir, calibration_jsonl, tmp_path):
    kwargs = dict(factor=2, calibration_file=calibration_jsonl, progress=False)
    first = prune_flat(switch_dir, output_dir=tmp_path / "x2", **kwargs)
    second = prune_flat(first.output_dir, output_dir=tmp_path / "x4", **kwargs)
    assert set(first.plan.counts.values()) == {4} and set(second.plan.counts.values()) == {2}
    assert first.params_before > first.params_after > second.params_after
    assert first.disk_bytes_before > first.disk_bytes_after > second.disk_bytes_after
    config = AutoModelForSeq2SeqLM.from_pretrained(second.output_dir).config
    assert config.num_experts_per_decoder_layer == [2, 2]
    assert config.uncurl_base_model == str(switch_dir)  # the original model, not the intermediate one
    assert second.plan.base_model == str(first.output_dir)
    # capacity grew with the pruning factor so the surviving experts can take the removed experts' tokens
    assert config.expert_capacity_per_encoder_layer == [64 * 4, 64 * 4]
    assert "tokenizer.json" in hash_tree(second.output_dir)
