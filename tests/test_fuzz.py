"""Property-based fuzzing of everything that parses user input: plans, configs/budgets, CLI counts, data files.

The property is always the same: arbitrary input either parses, or raises the one documented ``UncurlError``
subclass — never a ``TypeError``/``KeyError``/``OverflowError`` from deep inside (which the CLI would report as an
"unexpected" crash). Examples are bounded (``max_examples``) to keep the suite fast; ``deadline=None`` because the
shared test machine's timing is erratic.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uncurl_hf.surgery.budget import expert_budget
from uncurl_hf.calibration.data import load_calibration_file
from uncurl_hf.cli.arguments import parse_counts, parse_factor
from helpers import make_recipe
from uncurl_hf.errors import CalibrationDataError, InvalidFactorError, InvalidPlanError, UncurlError
from uncurl_hf.plan import PruningPlan

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = {"encoder.block.1": 8, "encoder.block.3": 8, "decoder.block.1": 8, "decoder.block.3": 4}

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Plan-shaped JSON: the right keys with values that are sometimes right, so the fuzzer gets past the first check.
index_lists = st.lists(st.lists(st.integers(-2, 9) | scalars, max_size=3), max_size=5)
layer_like = st.fixed_dictionaries(
    {
        "name": st.sampled_from(list(SIZES)) | scalars,
        "num_experts": st.integers(-1, 9) | scalars,
        "groups": index_lists | json_values,
    },
    optional={
        "weights": st.lists(st.lists(st.floats(-1, 2) | scalars, max_size=3), max_size=5) | json_values,
        "router": st.sampled_from(["weighted", "anchor", "bogus"]) | scalars,
        "extras": st.fixed_dictionaries({}, optional={"permutations": json_values | index_lists}) | json_values,
        "unexpected": json_values,
    },
)
plan_like = st.fixed_dictionaries(
    {
        "layers": st.lists(layer_like, max_size=4) | json_values,
        "model_type": st.just("switch_transformers") | scalars,
        "family": st.just("switch_transformers") | scalars,
        "method": st.just("frequency") | scalars,
    },
    optional={
        "factor": st.floats() | scalars,
        "seed": st.integers(-3, 3) | scalars,
        "base_model": scalars,
        "metadata": json_values,
        "format_version": st.integers(-1, 3) | scalars,
    },
)


@FUZZ
@given(st.one_of(plan_like, json_values, st.text(max_size=40)))
def test_plan_parser_accepts_or_raises_invalid_plan(value):
    text = value if isinstance(value, str) else json.dumps(value)  # raw strings: mostly not JSON at all
    try:
        plan = PruningPlan.from_json(text)
    except InvalidPlanError:
        return
    # a parsed plan validates or raises InvalidPlanError, and survives a JSON round trip unchanged
    try:
        plan.validate({layer.name: layer.num_experts for layer in plan.layers})
    except InvalidPlanError:
        pass
    again = PruningPlan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()


numbers = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=4)
counts = st.none() | st.dictionaries(st.sampled_from([*SIZES, "encoder.block.9"]) | st.text(max_size=4), numbers,
                                     max_size=5) | st.lists(numbers, max_size=6) | numbers


@FUZZ
@given(
    factor=numbers | st.floats(0.5, 20),
    per_layer=counts | st.lists(st.integers(0, 10), min_size=4, max_size=4),
    sizes=st.integers(-2, 10**6) | numbers,
    seed=numbers,
    method=st.just("frequency") | numbers,
)
def test_config_and_budget_accept_or_raise_uncurl_errors(factor, per_layer, sizes, seed, method):
    try:
        config = make_recipe(method=method, factor=factor, num_experts_per_layer=per_layer,
                               num_calibration_examples=sizes, seed=seed)
    except UncurlError:
        return
    try:
        budget = expert_budget(SIZES, config.factor, config.num_experts_per_layer)
    except InvalidFactorError:
        return
    assert set(budget) == set(SIZES) and all(1 <= budget[name] <= SIZES[name] for name in SIZES)
    if config.factor is not None:
        assert config.factor > 1 and math.isfinite(config.factor)
        assert all(budget[n] == math.floor(SIZES[n] / config.factor + 1e-9) for n in SIZES)
        assert any(budget[n] < SIZES[n] for n in SIZES)  # a factor always prunes something


@FUZZ
@given(st.text(max_size=30))
def test_cli_number_parsers(text):
    for parse in (parse_factor, parse_counts):
        try:
            parse(text)
        except InvalidFactorError:
            pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_calibration_files_load_or_raise_calibration_data_error(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        try:
            examples = load_calibration_file(path)
        except CalibrationDataError:
            return
    assert examples and all(example.source.strip() and "\x00" not in example.source for example in examples)
