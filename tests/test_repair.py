"""The merge methods' ``repair`` option: one output scale per merged group (``extras["output_scales"]``).

Specification: the surgery multiplies a group's output expert by exactly its scale (every family, in memory and
streamed alike, other tensors untouched); ``lsq`` scales reconstruct the members' outputs on their routed sample
tokens at least as well as the unscaled merge, ``norm`` scales give the merged expert its members' mean output norm;
merging identical experts needs no repair (scale 1); plans with malformed scales are refused; a repaired prune is
deterministic in bfloat16 and streams the in-memory bytes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hash_tree, prune_flat
from test_families_decoder import FAMILIES
from test_guard import calibrated_stats
from test_half_precision import save_source
from test_logical_merge import make_twins, model_of, pairs, with_rule

from uncurl_hf import LayerPlan, PruningPlan
from uncurl_hf.errors import InvalidPlanError
from uncurl_hf.families import get_family
from uncurl_hf.methods._repair import output_scales
from uncurl_hf.surgery.apply import reduce_layer


def scaled(plan: LayerPlan, scales: list[float | None]) -> LayerPlan:
    return LayerPlan(plan.name, plan.num_experts, plan.groups, plan.weights, plan.router,
                     {**plan.extras, "output_scales": scales})


@torch.no_grad()
def member_errors(family, layer, plan: LayerPlan, stats, scales) -> tuple[float, float]:
    """``(sum ||s E_g(x) - E_m(x)||^2, same with s = 1)`` over merged groups, members and their routed sample tokens."""
    merged = reduce_layer(family, layer, plan, scale_expert_capacity=False).experts
    _, selected = family.routing(stats.logit_sample, stats.top_k)
    repaired = plain = 0.0
    for position, group in enumerate(plan.groups):
        for member in group if len(group) > 1 else []:
            x = stats.hidden_sample[(selected == member).any(dim=-1)]
            target = family.run_expert(layer, member, x).double()
            out = family.run_expert_tensors(layer, merged[position], x).double()
            s = scales[position] if scales[position] is not None else 1.0
            repaired += float(((s * out - target) ** 2).sum())
            plain += float(((out - target) ** 2).sum())
    return repaired, plain


@pytest.mark.parametrize("family_name", ["switch", *FAMILIES])
def test_an_output_scale_multiplies_the_output_expert_exactly(family_name):
    model = model_of(family_name)
    family = get_family(model)
    torch.manual_seed(0)
    plan = with_rule(model, pairs(model), "weighted")
    for layer in family.sparse_layers(model):
        base = plan.layer(layer.name)
        scales = [0.5 if g % 2 == 0 else None for g in range(len(base.groups))]
        plain = reduce_layer(family, layer, base).experts
        repaired = reduce_layer(family, layer, scaled(base, scales)).experts
        hidden = torch.randn(7, layer.router.weight.shape[1])
        for position, scale in enumerate(scales):
            expected = family.run_expert_tensors(layer, plain[position], hidden)
            got = family.run_expert_tensors(layer, repaired[position], hidden)
            torch.testing.assert_close(got, expected * (scale or 1.0), rtol=1e-5, atol=1e-6)
            for name, tensor in plain[position].items():  # only the output projection (and its bias) changed
                if name not in family.output_keys:
                    assert torch.equal(repaired[position][name], tensor)


@pytest.mark.parametrize("family_name", ["switch", "qwen3_moe", "gpt_oss"])
def test_lsq_scales_reconstruct_the_members_at_least_as_well_and_norm_scales_match_their_norms(family_name):
    model = model_of(family_name)
    family = get_family(model)
    plan = with_rule(model, pairs(model), "map")
    for layer in family.sparse_layers(model):
        stats = calibrated_stats(model, layer, tokens=96)
        base = plan.layer(layer.name)
        lsq = output_scales(family, layer, base, stats, "lsq")
        assert all(s is not None and s >= 0 for s in lsq)
        repaired, plain = member_errors(family, layer, base, stats, lsq)
        assert repaired <= plain * (1 + 1e-3)  # 1e-3: the scales are rounded to 3 significant digits
        norm = output_scales(family, layer, base, stats, "norm")
        merged = reduce_layer(family, layer, scaled(base, norm), scale_expert_capacity=False).experts
        _, selected = family.routing(stats.logit_sample, stats.top_k)
        for position, group in enumerate(base.groups):
            rows = [(selected == m).any(dim=-1) for m in group]
            members = sum(float(family.run_expert(layer, m, stats.hidden_sample[r]).norm(dim=-1).sum())
                          for m, r in zip(group, rows))
            repaired_norm = sum(
                float(family.run_expert_tensors(layer, merged[position], stats.hidden_sample[r]).norm(dim=-1).sum())
                for r in rows
            )
            assert repaired_norm == pytest.approx(members, rel=5e-3)


@pytest.mark.parametrize("family_name", ["switch", "qwen3_moe"])
def test_merging_identical_experts_needs_no_repair(family_name):
    model = model_of(family_name)
    make_twins(model)
    family = get_family(model)
    plan = with_rule(model, pairs(model), "map")
    for layer in family.sparse_layers(model):
        stats = calibrated_stats(model, layer)
        for rule in ("lsq", "norm"):
            scales = output_scales(family, layer, plan.layer(layer.name), stats, rule)
            assert 1.0 in scales and set(scales) <= {1.0, None}  # None: a pair no sampled token reached


def test_singletons_and_unreached_groups_keep_no_scale():
    model = model_of("qwen3_moe")
    family = get_family(model)
    layer = family.sparse_layers(model)[0]
    e = layer.num_experts
    stats = calibrated_stats(model, layer)
    plan = LayerPlan(layer.name, e, [[0, 1], *[[j] for j in range(2, e)]], router="map")
    empty = calibrated_stats(model, layer, tokens=0)
    assert output_scales(family, layer, plan, empty, "lsq") == [None] * len(plan.groups)
    scales = output_scales(family, layer, plan, stats, "lsq")
    assert scales[1:] == [None] * (len(plan.groups) - 1)


@pytest.mark.parametrize("bad", [[-1.0, None], [float("nan"), None], [1.0], "big"])
def test_malformed_output_scales_are_refused(bad):
    with pytest.raises(InvalidPlanError, match="output_scales"):
        LayerPlan("layer", 4, [[0, 1], [2]], router="weighted", extras={"output_scales": bad}).validate()


def test_output_scales_round_trip_through_the_plan_file(tmp_path):
    layer = LayerPlan("layer", 4, [[0, 1], [2]], router="weighted", extras={"output_scales": [1.25, None]})
    plan = PruningPlan("qwen3_moe", "qwen3_moe", "manual", [layer])
    loaded = PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.layers[0].extras["output_scales"] == [1.25, None]


@pytest.mark.parametrize("family", ["qwen3_moe", "switch"])
def test_a_repaired_bfloat16_prune_is_deterministic_and_streams_the_same_bytes(tmp_path, calibration_jsonl, family):
    source = save_source(tmp_path / "src", family, torch.bfloat16)
    before = hash_tree(source)
    kwargs = dict(method="uncurl", method_options={"repair": "lsq"}, factor=2, file=str(calibration_jsonl),
                  num_examples=16)
    runs = [prune_flat(source, tmp_path / name, **kwargs) for name in ("a", "b")]
    streamed = prune_flat(source, tmp_path / "streamed", streaming=True, **kwargs)
    assert hash_tree(runs[0].output_dir) == hash_tree(runs[1].output_dir) == hash_tree(streamed.output_dir)
    assert hash_tree(source) == before
    scales = [s for layer in runs[0].plan.layers for s in layer.extras.get("output_scales", [])]
    assert any(s is not None and s != 1.0 for s in scales)  # the repair did scale something
