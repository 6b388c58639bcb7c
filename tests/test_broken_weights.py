"""Broken checkpoints fail with one clear error, before anything is written (issue 17).

* NaN in an expert weight / Inf in a router weight, for Switch and Mixtral, ``frequency`` and ``uncurl``, in memory
  (found after loading, before calibration) and streamed with a saved plan (the model never loaded: tensors the
  surgery reads are checked as read, kept experts copied as bytes are checked before writing): exit 2, the message
  names the tensor, no output and no temporary folder are left, the input folder is unchanged;
* a ``config.json`` that disagrees with the weights (expert count doubled, an expert tensor stored transposed):
  exit 2 naming the tensor, its stored shape and the shape the config implies, found from the headers before
  loading;
* non-finite calibration statistics (router logits) stop planning with an error naming the layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hash_tree, make_tiny_switch, prune_flat, write_calibration_file
from test_half_precision import TARGETS, TEXTS, save_source
from uncurl_hf.cli.main import main
from uncurl_hf.plan import PruningPlan

LAYER = {"switch": "encoder.block.1", "mixtral": "model.layers.0"}
ROUTER = {
    "switch": "encoder.block.1.layer.1.mlp.router.classifier.weight",
    "mixtral": "model.layers.0.block_sparse_moe.gate.weight",
}
EXPERT = {  # stored key of expert j's first weight
    "switch": "encoder.block.1.layer.1.mlp.experts.expert_{}.wi.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.{}.w1.weight",
}
COUNT_FIELD = {"switch": "num_experts", "mixtral": "num_local_experts"}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calibration_file(tmp_path_factory.mktemp("data") / "six.jsonl", TEXTS, TARGETS)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clean float32 sources, built once (tests copy them before breaking them)."""
    root = tmp_path_factory.mktemp("clean")
    folders = {family: save_source(root / family, family, torch.float32) for family in ("mixtral",)}
    folders["switch"] = make_tiny_switch(root, name="switch", d_ff=64)  # d_ff != d_model: a transpose shows
    return folders


@pytest.fixture(scope="module")
def plans(clean: dict[str, Path], calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``plans(family, method)`` -> a plan file computed on the clean source (a dry run), made once per pair."""
    root = tmp_path_factory.mktemp("plans")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, method: str) -> Path:
        if (family, method) not in made:
            result = prune_flat(str(clean[family]), root / f"{family}-{method}", method=method, factor=2,
                                calibration_file=str(calibration), num_calibration_examples=6, dry_run=True,
                                progress=False)
            made[family, method] = result.output_dir / "uncurl_plan.json"
        return made[family, method]

    return get


def edit_weights(folder: Path, key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite ``folder/model.safetensors`` with ``key`` replaced by ``change(tensor)``."""
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    tensors[key] = change(tensors[key].clone()).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


def copy_source(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "source"))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--no-progress"])
    return code, capsys.readouterr().err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".uncurl-tmp")]


def target_expert(plan: PruningPlan, method: str) -> tuple[str, int]:
    """An expert the output is made from: kept as is (frequency) or a member of a merged group (uncurl)."""
    for layer in plan.layers:
        for group in layer.groups:
            if method == "frequency" or len(group) > 1:
                return layer.name, group[-1]
    raise AssertionError("the plan merges nothing")


def set_value(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor[1, 2] = value
        return tensor

    return change


@pytest.mark.parametrize("mode", ["memory", "streamed"])
@pytest.mark.parametrize("broken", ["nan-expert", "inf-router"])
@pytest.mark.parametrize("method", ["frequency", "uncurl"])
@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_non_finite_weights_fail_with_the_tensor_named(family, method, broken, mode, clean, plans, calibration,
                                                        tmp_path, capsys):
    plan_file = plans(family, method)
    layer, expert = target_expert(PruningPlan.load(plan_file), method)
    assert layer == LAYER[family]  # the first sparse layer: the keys below are its tensors
    source = copy_source(clean[family], tmp_path)
    key = EXPERT[family].format(expert) if broken == "nan-expert" else ROUTER[family]
    edit_weights(source, key, set_value(float("nan") if broken == "nan-expert" else float("inf")))
    before = hash_tree(source)
    out = tmp_path / "out"

    if mode == "memory":
        args = ["prune", str(source), "--calibration-file", str(calibration), "--num-calibration", "6",
                "--factor", "2", "--method", method, "-o", str(out)]
    else:
        args = ["prune", str(source), "--plan", str(plan_file), "--streaming", "-o", str(out)]
    code, err = run_cli(args, capsys)

    assert code == 2, err
    assert err.startswith("error: ") and "unexpected" not in err
    what = "1 NaN and 0 infinite" if broken == "nan-expert" else "0 NaN and 1 infinite"
    assert what in err, err
    if mode == "memory" or (method == "frequency" and broken == "nan-expert"):  # a stored tensor, by its key
        assert key in err, err
    elif broken == "nan-expert":  # a member the streamed merge read
        assert f"layer {layer}, expert {expert}, tensor" in err, err
    else:
        assert f"layer {layer}, router, tensor weight" in err, err
    assert "re-download" in err  # the fix
    assert_nothing_written(out)
    assert hash_tree(source) == before


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_a_config_with_twice_the_experts_names_the_tensor_and_both_shapes(family, clean, calibration, tmp_path,
                                                                           capsys):
    source = copy_source(clean[family], tmp_path)
    config = json.loads((source / "config.json").read_text())
    config[COUNT_FIELD[family]] *= 2
    (source / "config.json").write_text(json.dumps(config))
    before = hash_tree(source)

    code, err = run_cli(["prune", str(source), "--calibration-file", str(calibration), "--num-calibration", "6",
                         "--factor", "2", "--method", "uncurl", "-o", str(tmp_path / "out")], capsys)

    assert code == 2, err
    hidden = 32 if family == "switch" else 16
    router = ROUTER[family].replace("encoder.block.1.layer.1", "decoder.block.1.layer.2") if family == "switch" \
        else ROUTER[family]  # the first mismatch in key order
    assert f"tensor {router} is stored with shape [8, {hidden}], but config.json implies [16, {hidden}]" in err, err
    assert "Check config.json against the checkpoint" in err
    assert "ignore_mismatched_sizes" not in err
    assert_nothing_written(tmp_path / "out")
    assert hash_tree(source) == before


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_a_transposed_expert_tensor_names_the_tensor_and_both_shapes(family, clean, calibration, tmp_path, capsys):
    source = copy_source(clean[family], tmp_path)
    key = EXPERT[family].format(2)
    edit_weights(source, key, lambda tensor: tensor.T)
    before = hash_tree(source)

    code, err = run_cli(["prune", str(source), "--calibration-file", str(calibration), "--num-calibration", "6",
                         "--factor", "2", "--method", "frequency", "-o", str(tmp_path / "out")], capsys)

    assert code == 2, err
    stored, expected = ([32, 64], [64, 32]) if family == "switch" else ([16, 8], [8, 16])
    assert f"tensor {key} is stored with shape {stored}, but config.json implies {expected}" in err, err
    assert_nothing_written(tmp_path / "out")
    assert hash_tree(source) == before


def test_non_finite_router_logits_stop_planning_naming_the_layer(clean, calibration):
    from uncurl_hf.calibration.data import build_batches, calibration_examples
    from uncurl_hf.errors import CalibrationDataError
    from uncurl_hf.families import get_family
    from uncurl_hf.io.checkpoint import load_model, load_tokenizer
    from uncurl_hf.methods import get_method
    from uncurl_hf.pipeline.planning import calibrate_model, plan_model
    from helpers import make_recipe

    recipe = make_recipe(method="frequency", factor=2, calibration_file=str(calibration), num_calibration_examples=6)
    model = load_model(clean["switch"])
    family = get_family(model)
    tokenizer = load_tokenizer(clean["switch"])
    batches = build_batches(calibration_examples(recipe.calibration, tokenizer), tokenizer, batch_size=6,
                            max_length=32)
    stats = calibrate_model(model, family, batches, recipe, progress=False)
    stats["decoder.block.1"].logit_sample[0, 3] = float("inf")  # what an overflowing float16 activation gives
    budget = {name: 4 for name in stats}

    with pytest.raises(CalibrationDataError, match=r"non-finite router logits in layer decoder\.block\.1.*--dtype"):
        plan_model(model, family, get_method("frequency"), stats, budget, recipe)


def test_the_surgery_and_the_alignment_name_a_non_finite_expert_of_a_model_given_in_memory():
    """The API path (a model never passed through load_model): the tensors read are checked where they are read."""
    from helpers import tiny_switch_model
    from uncurl_hf.errors import CheckpointError
    from uncurl_hf.families import get_family
    from uncurl_hf.methods._alignment import align_groups
    from uncurl_hf.plan import LayerPlan
    from uncurl_hf.surgery.apply import apply_plan

    model = tiny_switch_model()
    family = get_family(model)
    layers = family.sparse_layers(model)
    with torch.no_grad():
        layers[0].experts[3].wi.weight[0, 0] = float("nan")
    groups = [[0, 3], [1], [2], [4], [5], [6], [7]]
    plan = PruningPlan(model.config.model_type, family.name, "manual", [
        LayerPlan(name=layer.name, num_experts=8, groups=groups) for layer in layers
    ])

    with pytest.raises(CheckpointError, match=r"layer encoder\.block\.1, expert 3, tensor wi has 1 NaN and 0 inf"):
        apply_plan(model, family, plan)
    with pytest.raises(CheckpointError, match=r"layer encoder\.block\.1, expert 3, tensor wi has 1 NaN"):
        align_groups(family, layers[0], [[0, 3]], [[0.5, 0.5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_nonfinite_counts_are_exact_whatever_the_sum_screen_says(dtype):
    """The fast screen (a non-finite sum) never hides a NaN/Inf, and an overflowing sum of finite values is not one."""
    from uncurl_hf.io.checks import nonfinite_counts

    big = torch.finfo(dtype).max
    assert nonfinite_counts(torch.full((64,), big, dtype=dtype)) == (0, 0)  # the sum overflows; every value is finite
    values = torch.zeros(1000, dtype=dtype)
    values[[3, 500]] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # +inf + -inf: a NaN sum
    values[999] = float("nan")
    assert nonfinite_counts(values) == (1, 2)
    assert nonfinite_counts(torch.randn(10_000).to(dtype)) == (0, 0)
