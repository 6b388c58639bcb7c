"""Methods and budgets: frequency on crafted routing, seeded random, factor rules, registry."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import CALIBRATION_TEXTS, tiny_switch_model
from transformers import AutoTokenizer

from uncurl_hf import build_batches, calibrate

from helpers import make_recipe
from uncurl_hf.surgery.budget import expert_budget, experts_to_keep
from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import InvalidFactorError, UnknownMethodError
from uncurl_hf.families import get_family
from uncurl_hf.methods import available_methods, get_method
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.seeding import stable_seed
from uncurl_hf.evaluation.tasks import Example

SIZES = {"encoder.block.1": 8, "encoder.block.3": 8, "decoder.block.1": 8, "decoder.block.3": 8}


def test_registry_lists_methods_and_rejects_unknown():
    assert {"frequency", "random"} <= set(available_methods())
    assert get_method("frequency").description
    with pytest.raises(UnknownMethodError, match="Available methods: .*frequency"):
        get_method("nope")


def test_frequency_keeps_top_k_on_crafted_routing(switch_dir):
    """Zero router weights + distinct biases: every token picks the top-bias expert; the rest tie at 0 routed
    tokens and are ranked by gate mass, i.e. by bias. So the k kept experts are the k largest biases."""
    model = tiny_switch_model(router_bias=True)
    family = get_family(model)
    biases = {}
    with torch.no_grad():
        for i, layer in enumerate(family.sparse_layers(model)):
            layer.router.weight.zero_()
            bias = torch.randperm(8, generator=torch.Generator().manual_seed(i)).float()
            layer.router.bias.copy_(bias)
            biases[layer.name] = bias
    tokenizer = AutoTokenizer.from_pretrained(switch_dir)
    batches = build_batches([Example(t, "positive") for t in CALIBRATION_TEXTS], tokenizer, batch_size=6)
    stats = calibrate(model, family, batches, progress=False)
    plan = get_method("frequency")(stats, model, family, expert_budget(SIZES, 2.0), make_recipe(factor=2))
    for layer in plan.layers:
        bias = biases[layer.name]
        assert stats[layer.name].counts[int(bias.argmax())] == stats[layer.name].num_tokens
        assert layer.used == sorted(bias.topk(4).indices.tolist())


def test_rank_by_frequency_tie_breaks():
    stats = ExpertStats(
        layer="l",
        num_experts=5,
        top_k=1,
        counts=torch.tensor([3, 7, 3, 0, 0]),
        gate_mass=torch.tensor([1.0, 5.0, 2.0, 0.5, 0.5], dtype=torch.float64),
    )
    assert rank_by_frequency(stats) == [1, 2, 0, 3, 4]


def test_random_is_seeded_and_reproducible(switch_dir):
    model = tiny_switch_model()
    family = get_family(model)
    method = get_method("random")
    budget = expert_budget(SIZES, 2.0)
    plans = [method({}, model, family, budget, make_recipe(factor=2, seed=s)) for s in (0, 0, 1)]
    assert plans[0].layers == plans[1].layers
    assert plans[0].layers != plans[2].layers
    assert all(len(layer.groups) == 4 for layer in plans[0].layers)
    # different layers get different draws from the same seed
    assert len({tuple(layer.used) for layer in plans[0].layers}) > 1


def test_stable_seed_is_sha256_not_salted_hash():
    digest = hashlib.sha256(b"0\x1frandom-pruning\x1fencoder.block.1").digest()
    expected = int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert stable_seed(0, "random-pruning", "encoder.block.1") == expected


@pytest.mark.parametrize("factor, k", [(8 / 7, 7), (2, 4), (3, 2), (8 / 3, 3), (4, 2), (8, 1)])
def test_budget_floor_rule(factor, k):
    assert experts_to_keep(8, factor) == k
    assert expert_budget(SIZES, factor) == dict.fromkeys(SIZES, k)


def test_budget_errors():
    with pytest.raises(InvalidFactorError, match=r"keep 0 experts.*Use a factor <= 8"):
        expert_budget(SIZES, 9)
    with pytest.raises(InvalidFactorError, match="below 1"):
        expert_budget(SIZES, 0.5)
    with pytest.raises(InvalidFactorError, match="keeps every expert"):
        expert_budget(SIZES, 1)  # a factor of 1 prunes nothing: refused as a likely typo
    with pytest.raises(InvalidFactorError, match=r"keeps every expert of every layer.*>= 1.143"):
        expert_budget(SIZES, 1 + 1e-12)  # within the floor tolerance: still 8 of 8
    with pytest.raises(InvalidFactorError, match="between 1 and 8"):
        expert_budget(SIZES, num_experts_per_layer={"encoder.block.1": 9})
    with pytest.raises(InvalidFactorError, match="does not have"):
        expert_budget(SIZES, num_experts_per_layer={"encoder.block.9": 2})
    assert expert_budget(SIZES, num_experts_per_layer={"encoder.block.1": 3})["encoder.block.1"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "Give a pruning factor"),
        ({"factor": 0.5}, "below 1"),
        ({"factor": float("nan")}, "finite"),
        ({"factor": "2"}, "must be a number"),
        ({"factor": 2, "num_experts_per_layer": {"a": 1}}, "not factor and num_experts_per_layer"),
        ({"num_experts_per_layer": {"a": 0}}, "integers >= 1"),
    ],
)
def test_recipe_validation(kwargs, message):
    with pytest.raises(InvalidFactorError, match=message):
        make_recipe(**kwargs)
