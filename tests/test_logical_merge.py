"""The logical merge (router rule ``"map"``): merged experts behind the original router.

Specification: a merged layer keeps every original router row and sends each original expert's tokens to the
expert its group became (the reference codes of M-SMoE / HC-SMoE), so the pruned model routes exactly as the
original: merging experts whose weights are identical changes no output, where the averaged router row of
``"weighted"`` does. The checkpoint records the map in its config; it loads through the Auto classes with the
in-memory model's logits, for Switch and every decoder family; streamed it is the same bytes; in bfloat16 it is
deterministic. What has no logical-merge form is refused with one message each: a map that leaves an expert
without a group, a config map that misses an expert, ``--export stock``, and pruning a logical merge again.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hash_tree, make_tiny_switch, prune_flat, tiny_switch_model
from test_families_decoder import FAMILIES, IDS, logits, plan_of, tiny_model
from test_half_precision import save_source

from uncurl_hf import LayerPlan, load_model
from uncurl_hf.errors import ExportError, InvalidPlanError, UnsupportedModelError
from uncurl_hf.families import get_family
from uncurl_hf.surgery.apply import apply_plan

SWITCH_IDS = torch.tensor([[5, 9, 13, 7, 3, 11, 2, 8]])


def model_of(family: str):
    return tiny_switch_model(seed=0).eval() if family == "switch" else tiny_model(family)


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        if get_family(model).is_causal_lm():
            return logits(model)
        return model(input_ids=SWITCH_IDS, decoder_input_ids=SWITCH_IDS).logits


def pairs(model) -> dict[str, list[list[int]]]:
    """Every layer's experts in pairs (0, 1), (2, 3), ..."""
    return {layer.name: [[j, j + 1] for j in range(0, layer.num_experts, 2)]
            for layer in get_family(model).sparse_layers(model)}


def make_twins(model) -> None:
    """Give expert j + 1 of every pair expert j's weights: merging a pair then computes what either computed."""
    family = get_family(model)
    with torch.no_grad():
        for layer in family.sparse_layers(model):
            for j in range(0, layer.num_experts, 2):
                source, target = family.expert_tensors(layer, j), family.expert_tensors(layer, j + 1)
                for name in source:
                    target[name].copy_(source[name])


def with_rule(model, groups, rule: str):
    return plan_of(model, groups, **{name: {"router": rule} for name in groups})


@pytest.mark.parametrize("family", ["switch", *FAMILIES])
def test_merging_identical_experts_behind_the_original_router_changes_no_output(family):
    model = model_of(family)
    make_twins(model)
    expected = outputs(model)
    mapped = apply_plan(model, get_family(model), with_rule(model, pairs(model), "map"))
    # equal up to the order of float sums (an expert now computes both twins' tokens in one matmul)
    torch.testing.assert_close(outputs(mapped), expected, rtol=0, atol=1e-5)
    averaged = apply_plan(model, get_family(model), with_rule(model, pairs(model), "weighted"))
    assert (outputs(averaged) - expected).abs().max() > 1e-4  # the averaged router row moves tokens: the test can fail


@pytest.mark.parametrize("family", ["switch", *FAMILIES])
def test_a_logical_merge_loads_through_from_pretrained_with_the_in_memory_logits(family, tmp_path):
    model = model_of(family)
    groups = {name: [[0, 3, 5], [1], [2, 7], [4, 6]] for name in pairs(model)}
    groups[next(iter(groups))] = [[0, 1, 2, 3, 4, 5, 6], [7]]  # unequal counts too
    plan = with_rule(model, groups, "map")
    pruned = apply_plan(model, get_family(model), plan)
    pruned.save_pretrained(tmp_path / "out")
    loaded = load_model(tmp_path / "out")
    assert type(loaded) is type(pruned)
    reloaded, in_memory = dict(loaded.state_dict()), pruned.state_dict()
    assert reloaded.keys() == in_memory.keys() and all(torch.equal(reloaded[k], in_memory[k]) for k in in_memory)
    if family == "switch":  # reloaded Switch models differ from in-memory ones by ~1e-6 with every router rule
        torch.testing.assert_close(outputs(loaded), outputs(pruned), rtol=0, atol=1e-5)
    else:
        assert torch.equal(outputs(loaded), outputs(pruned))

    config = loaded.config.to_dict()
    expected_maps = [plan.layer(name).expert_map for name in groups]
    stored = (config["expert_map_per_layer"] if family != "switch"
              else config["expert_map_per_encoder_layer"] + config["expert_map_per_decoder_layer"])
    assert stored == expected_maps
    for layer in get_family(loaded).sparse_layers(loaded):
        assert layer.router.weight.shape[0] == 8 and layer.num_experts == len(groups[layer.name])
        original = next(l for l in get_family(model).sparse_layers(model) if l.name == layer.name)
        assert torch.equal(layer.router.weight, original.router.weight.to(layer.router.weight.dtype))


@pytest.mark.parametrize("family", ["switch", "qwen3_moe"])
def test_router_losses_run_over_the_original_experts(family):
    """``output_router_logits`` (the load-balancing and z losses of fine-tuning) sees the original routing."""
    model = model_of(family)
    pruned = apply_plan(model, get_family(model), with_rule(model, pairs(model), "map"))
    ids = IDS if family != "switch" else SWITCH_IDS
    extra = {} if family != "switch" else {"decoder_input_ids": ids}
    out = pruned(input_ids=ids, labels=ids, output_router_logits=True, **extra)
    assert torch.isfinite(out.loss)
    router_logits = out.router_logits if family != "switch" else out.encoder_router_logits
    assert all(logit.shape[-1] == 8 for logit in router_logits)


def test_uncurl_with_the_map_router_writes_a_verified_checkpoint_streamed_byte_for_byte(
    switch_dir, calibration_jsonl, tmp_path
):
    kwargs = dict(calibration_file=calibration_jsonl, method="uncurl", method_options={"router": "map"}, factor=2,
                  max_length=16, progress=False)
    in_memory = prune_flat(switch_dir, output_dir=tmp_path / "memory", **kwargs)  # the post-write check passed
    assert all(layer.router == "map" for layer in in_memory.plan.layers)
    assert any(len(group) > 1 for layer in in_memory.plan.layers for group in layer.groups)
    assert all(layer.extras["diagnostics"]["router_agreement"] == 1.0 for layer in in_memory.plan.layers)
    streamed = prune_flat(switch_dir, output_dir=tmp_path / "streamed", streaming=True, **kwargs)
    assert hash_tree(streamed.output_dir) == hash_tree(in_memory.output_dir)
    card = (in_memory.output_dir / "README.md").read_text()
    assert "expert map (router=map)" in card


def test_a_bfloat16_decoder_logical_merge_is_deterministic(tmp_path, calibration_jsonl):
    source = save_source(tmp_path / "src", "qwen3_moe", torch.bfloat16)
    runs = [prune_flat(source, tmp_path / name, method="msmoe", method_options={"router": "map", "uniform": True},
                       factor=2, file=str(calibration_jsonl), num_examples=16) for name in ("a", "b")]
    assert hash_tree(runs[0].output_dir) == hash_tree(runs[1].output_dir)
    reloaded = load_model(runs[0].output_dir)
    assert reloaded.config.model_type == "pruned_qwen3_moe"  # equal counts, but a stock config has no map
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_a_map_needs_every_expert_in_a_group():
    LayerPlan("l", 4, [[0, 1], [2, 3]], router="map").validate(4)
    assert LayerPlan("l", 4, [[2, 0], [1, 3]], router="map").expert_map == [0, 1, 0, 1]
    with pytest.raises(InvalidPlanError, match="1 of 4 are in none"):
        LayerPlan("l", 4, [[0, 1], [2]], router="map").validate(4)


def test_a_config_map_must_reach_every_expert_of_its_layer():
    from uncurl_hf.modeling.pruned_decoder_moe import PrunedQwen3MoeConfig
    from uncurl_hf.modeling.pruned_switch_transformers import PrunedSwitchTransformersConfig
    from test_families_decoder import tiny_config

    values = {k: v for k, v in tiny_config("qwen3_moe").to_dict().items()
              if k not in ("model_type", "transformers_version")}
    good = dict(values, num_experts=8, num_experts_per_layer=[2, 2, 2], expert_map_per_layer=[[0, 1] * 4] * 3)
    assert PrunedQwen3MoeConfig(**good).router_widths() == [8, 8, 8]
    with pytest.raises(Exception, match="must send tokens to each of its 2 experts"):
        PrunedQwen3MoeConfig(**dict(good, expert_map_per_layer=[[0] * 8] * 3))
    with pytest.raises(Exception, match="must send tokens to each of its 4 experts"):
        PrunedSwitchTransformersConfig(num_experts=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                                       num_sparse_decoder_layers=1, num_experts_per_encoder_layer=[4],
                                       expert_map_per_encoder_layer=[[0, 1, 2, 2, 1, 0, 0, 1]])


def test_stock_export_and_pruning_a_logical_merge_again_are_refused(switch_dir, calibration_jsonl, tmp_path):
    kwargs = dict(calibration_file=calibration_jsonl, factor=2, max_length=16, progress=False)
    with pytest.raises(ExportError, match="cannot hold a logical merge"):
        prune_flat(switch_dir, tmp_path / "stock", method="uncurl", method_options={"router": "map", "uniform": True},
                   export="stock", **kwargs)
    assert not (tmp_path / "stock").exists()
    merged = prune_flat(switch_dir, tmp_path / "merged", method="uncurl", method_options={"router": "map"}, **kwargs)
    before = hash_tree(merged.output_dir)
    with pytest.raises(UnsupportedModelError, match="is a logical merge .*Prune its base model"):
        prune_flat(merged.output_dir, tmp_path / "again", method="frequency", **kwargs)
    assert hash_tree(merged.output_dir) == before and not (tmp_path / "again").exists()


def test_switch_capacity_is_counted_per_original_expert(tmp_path, calibration_jsonl):
    """Under a map, tokens beyond an original expert's capacity are dropped exactly as before pruning, so the
    layer keeps the source's capacity (pruning otherwise scales it by E_old / E_new)."""
    source = make_tiny_switch(tmp_path, "small-capacity", expert_capacity=3)
    result = prune_flat(source, tmp_path / "out", method="uncurl", method_options={"router": "map"}, factor=2,
                        calibration_file=calibration_jsonl, max_length=16, progress=False)
    config = load_model(result.output_dir).config
    assert set(config.expert_capacity_per_encoder_layer + config.expert_capacity_per_decoder_layer) == {3}


def calibration_batches(model) -> list[dict[str, torch.Tensor]]:
    ids = SWITCH_IDS if not get_family(model).is_causal_lm() else IDS
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"input_ids": ids.flip(-1),
                                                                         "attention_mask": torch.ones_like(ids)}]


@pytest.mark.parametrize("family", ["switch", "qwen3_moe", "gpt_oss"])
def test_a_logical_merge_calibrates_over_its_original_experts_with_the_original_routing(family):
    """Calibration (the Space's usage heatmap, sequential planning) sees a logical merge per router row: its routing
    counts are exactly the original model's; the Space folds them onto the merged experts."""
    from uncurl_hf.calibration.run import calibrate
    from uncurl_hf.space.comparison import expert_usage
    from uncurl_hf.space.models import LoadedModel

    model = model_of(family)
    make_twins(model)  # the merged model then computes what the original does, so every layer routes alike
    plan = with_rule(model, pairs(model), "map")
    pruned = apply_plan(model, get_family(model), plan)
    batches = calibration_batches(model)
    original = calibrate(model, get_family(model), batches, progress=False)
    merged = calibrate(pruned, get_family(pruned), batches, progress=False)
    for name in original:
        assert torch.equal(merged[name].counts, original[name].counts)
    loaded = LoadedModel(path=None, model=pruned, tokenizer=None, params=0, disk_mb=0.0, experts=plan.counts, plan=plan)
    usage = expert_usage(loaded, batches)
    for name, layer_usage in usage.items():
        folded = [int(original[name].counts[[2 * j, 2 * j + 1]].sum()) for j in range(plan.counts[name])]
        assert layer_usage["counts"] == folded
