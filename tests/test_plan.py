"""PruningPlan: JSON round trip and validation errors that name the problem."""

from __future__ import annotations

import pytest

from uncurl_hf import LayerPlan, PruningPlan
from uncurl_hf.errors import InvalidPlanError

SIZES = {"encoder.block.1": 8, "decoder.block.1": 8}


def make_plan(**layer_overrides) -> PruningPlan:
    first = dict(name="encoder.block.1", num_experts=8, groups=[[0, 1], [5]], weights=[[0.5, 0.5], [1.0]])
    first.update(layer_overrides)
    return PruningPlan(
        model_type="switch_transformers",
        family="switch_transformers",
        method="manual",
        layers=[LayerPlan(**first), LayerPlan.keep("decoder.block.1", 8, [7, 2])],
        factor=4.0,
        seed=3,
        base_model="some/model",
        metadata={"note": "x", "budget": {"encoder.block.1": 2}},
    )


def test_json_round_trip(tmp_path):
    plan = make_plan(extras={"permutations": [[None, [1, 0]], None]}, router="anchor")
    assert PruningPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(path) == plan
    assert plan.to_json() == PruningPlan.load(path).to_json()
    assert plan.layer("decoder.block.1").groups == [[2], [7]]
    assert plan.counts == {"encoder.block.1": 2, "decoder.block.1": 2}
    assert plan.layers[0].dropped == [2, 3, 4, 6, 7] and not plan.layers[0].is_pure_pruning
    plan.validate(SIZES, budget={"encoder.block.1": 2, "decoder.block.1": 2})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"groups": []}, "at least 1 expert"),
        ({"groups": [[0, 1], []], "weights": [[0.5, 0.5], []]}, "group 1 is empty"),
        ({"groups": [[0, 8], [5]]}, "index 8 out of range"),
        ({"groups": [[0, 1], [1]], "weights": [[0.5, 0.5], [1.0]]}, "more than one group"),
        ({"weights": [[0.5, 0.4], [1.0]]}, "sum to 0.9"),
        ({"weights": [[1.5, -0.5], [1.0]]}, "finite and >= 0"),
        ({"weights": [[1.0], [1.0]]}, "2 members but 1 weights"),
        ({"router": "mean"}, "router rule"),
        ({"num_experts": 16}, "made for 16 experts"),
        ({"extras": {"permutations": [None]}}, "permutations"),
    ],
)
def test_layer_validation_errors(overrides, message):
    with pytest.raises(InvalidPlanError, match=message):
        make_plan(**overrides).validate(SIZES)


def test_plan_level_validation_errors():
    plan = make_plan()
    with pytest.raises(InvalidPlanError, match="exceed the budget of 1"):
        plan.validate(SIZES, budget={"encoder.block.1": 1})
    with pytest.raises(InvalidPlanError, match=r"no entry for layers \['encoder.block.3'\]"):
        plan.validate({**SIZES, "encoder.block.3": 8})
    with pytest.raises(InvalidPlanError, match="does not have"):
        plan.validate({"decoder.block.1": 8})
    plan.layers.append(plan.layers[1])
    with pytest.raises(InvalidPlanError, match="more than once"):
        plan.validate(SIZES)


def test_malformed_json(tmp_path):
    with pytest.raises(InvalidPlanError, match="not valid JSON"):
        PruningPlan.from_json("{")
    with pytest.raises(InvalidPlanError, match="Malformed"):
        PruningPlan.from_json('{"model_type": "x"}')
    with pytest.raises(InvalidPlanError, match="newer"):
        PruningPlan.from_json('{"format_version": 99, "layers": []}')
    with pytest.raises(InvalidPlanError, match="Cannot read"):
        PruningPlan.load(tmp_path / "missing.json")
