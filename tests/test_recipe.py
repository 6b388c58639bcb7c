"""The recipe (what a run does), the run options (how it runs), and the CLI generated from them.

What is specified here:

* ``PruneRecipe`` validates when it is built, round-trips through YAML, and rejects unknown keys / wrong types with
  one message naming the valid settings; method options are checked against the method's ``Options`` dataclass;
* every recipe, calibration and run-option field that declares a flag is on ``uncurl prune``, and every flag of
  ``uncurl prune`` (but the positional/recipe/method-arg ones) sets a field: the CLI cannot drift from the fields;
* every output folder carries ``uncurl_recipe.yaml``; the card quotes it, and rerunning the card's command gives the
  same bytes; ``--recipe`` with flags on top overrides field by field;
* ``--dry-run`` writes only the plan and the recipe, and ``--plan`` applies that plan to the same bytes as a real run;
* the public call is ``prune(model, recipe, output_dir, options)``: four parameters.
"""

from __future__ import annotations

import inspect
import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import uncurl_hf
from helpers import hash_tree
from uncurl_hf import CalibrationSpec, PruneRecipe, RunOptions
from uncurl_hf.cli import main
from uncurl_hf.cli.main import build_parser
from uncurl_hf.errors import CalibrationDataError, InvalidFactorError, UncurlError
from uncurl_hf.methods import available_methods, get_method
from uncurl_hf.plan import PLAN_FILENAME
from uncurl_hf.recipe import RECIPE_FILENAME


def test_prune_takes_a_model_a_recipe_an_output_folder_and_options():
    assert list(inspect.signature(uncurl_hf.prune).parameters) == ["model", "recipe", "output_dir", "options"]


def test_a_recipe_round_trips_through_yaml(tmp_path):
    recipe = PruneRecipe(
        method="uncurl", method_options={"router": "anchor", "uniform": True}, factor=4,
        calibration=CalibrationSpec(task="sentiment", num_examples=64, max_length=96, seed=3),
        sequential=True, export="stock", scale_expert_capacity=False,
    )
    path = recipe.save(tmp_path / "r.yaml")
    assert PruneRecipe.load(path) == recipe
    data = yaml.safe_load(path.read_text())
    assert data["format"] == "uncurl-recipe/1" and data["calibration"]["num_examples"] == 64
    assert recipe.options() == get_method("uncurl").Options(router="anchor", uniform=True)
    counts = PruneRecipe(num_experts_per_layer={"a": 2}, calibration=CalibrationSpec(file="d.jsonl"))
    assert PruneRecipe.from_dict(counts.to_dict()) == counts


@pytest.mark.parametrize(
    "data, error, message",
    [
        ({"factor": 2, "methd": "uncurl"}, UncurlError, r"recipe has no setting\(s\) \['methd'\]"),
        ({"factor": "two"}, UncurlError, "factor must be a number or null, got 'two'"),
        ({"factor": 2, "calibration": {"num_exampels": 3}}, UncurlError, r"no setting\(s\) \['num_exampels'\]"),
        ({"factor": 2, "calibration": {"num_examples": 0}}, CalibrationDataError, "num_examples must be an integer >= 1"),
        ({"factor": 2, "max_drop": 1, "calibration": {"task": "sentiment"}}, InvalidFactorError,
         "not factor and max_drop"),
        ({}, InvalidFactorError, "Give a pruning factor"),
        ({"factor": 1}, InvalidFactorError, "keeps every expert"),
        ({"max_drop": 1, "calibration": {"file": "x.jsonl"}}, UncurlError, "--max-drop needs --task"),
        ({"factor": 2, "calibration": {"task": "sentiment", "file": "x.jsonl"}}, CalibrationDataError,
         "got task and file"),
        ({"factor": 2, "method": "uncurl", "method_options": {"router": "sum"}}, UncurlError,
         "router must be one of 'weighted', 'anchor'"),
        ({"plan": "p.json", "method": "uncurl"}, UncurlError, "no method to run"),
        ({"factor": 2, "export": "onnx"}, UncurlError, "export must be one of 'pruned', 'stock', got 'onnx'"),
        ({"format": "uncurl-recipe/9", "factor": 2}, UncurlError, "cannot read it"),
    ],
)
def test_bad_recipes_fail_when_built_with_one_message(data, error, message):
    with pytest.raises(error, match=message):
        PruneRecipe.from_dict(data)


def test_a_recipe_file_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(UncurlError, match="must hold a mapping"):
        PruneRecipe.load(tmp_path / "list.yaml")
    with pytest.raises(UncurlError, match="not valid YAML"):
        PruneRecipe.load(tmp_path / "bad.yaml")
    with pytest.raises(UncurlError, match="does not exist"):
        PruneRecipe.load(tmp_path / "missing.yaml")


def test_run_options_are_checked():
    with pytest.raises(UncurlError, match="--device must be one of"):
        RunOptions(device="tpu")
    with pytest.raises(UncurlError, match="--dtype must be one of"):
        RunOptions(dtype="int8")
    with pytest.raises(UncurlError, match="--dry-run writes only the plan"):
        RunOptions(dry_run=True, evaluate=True)
    assert RunOptions(device="cuda:1").device == "cuda:1"


def _prune_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    prune = sub.choices["prune"]
    return {flag for action in prune._actions for flag in action.option_strings}


def test_every_setting_with_a_flag_is_on_the_cli_and_every_flag_sets_a_setting():
    declared = {
        flag for cls in (PruneRecipe, CalibrationSpec, RunOptions) for f in fields(cls)
        for flag in f.metadata.get("flags", ())
    }
    extra = {"-h", "--help", "-o", "--output", "--recipe", "--method-arg", "--uniform"}
    assert _prune_flags() == declared | extra
    python_only = {
        f.name for cls in (PruneRecipe, CalibrationSpec, RunOptions) for f in fields(cls) if not f.metadata.get("flags")
    }
    assert python_only == {"method_options", "calibration", "data"}  # --method-arg, nested spec, in-memory data


def test_uncurl_methods_lists_each_methods_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert name in out
    assert "router (one of 'weighted', 'anchor', 'fitted', 'map', default 'weighted')" in out
    assert "gate (one of 'applied', 'softmax', 'renormalized', default 'applied')" in out


def test_every_output_carries_its_recipe_and_the_cards_command_reruns_to_the_same_bytes(
    switch_dir, calibration_jsonl, tmp_path, monkeypatch
):
    monkeypatch.chdir(calibration_jsonl.parent)  # the recipe names the data as given: a relative path here
    first = tmp_path / "first"
    assert main(["prune", str(switch_dir), "--calibration-file", calibration_jsonl.name, "--factor", "2",
                 "--method", "uncurl", "--method-arg", "router=anchor", "--num-calibration", "8", "--no-progress",
                 "-o", str(first)]) == 0
    written = PruneRecipe.load(first / RECIPE_FILENAME)
    assert written.method == "uncurl" and written.method_options == {"router": "anchor"}
    assert written.calibration.file == calibration_jsonl.name and written.calibration.num_examples == 8
    card = (first / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("uncurl prune "))
    assert (first / RECIPE_FILENAME).read_text().split("\n", 1)[1] in card  # the card quotes the recipe
    argv = shlex.split(command)[1:]
    argv[argv.index("--recipe") + 1] = str(first / RECIPE_FILENAME)
    argv[argv.index("-o") + 1] = str(tmp_path / "again")
    argv[1] = str(switch_dir)  # the card shows the source by name
    assert main([*argv, "--no-progress"]) == 0
    assert hash_tree(tmp_path / "again") == hash_tree(first)


def test_flags_override_a_recipe_file_field_by_field(switch_dir, calibration_jsonl, tmp_path):
    recipe = PruneRecipe(method="uncurl", factor=2, calibration=CalibrationSpec(task="sentiment", num_examples=8))
    path = recipe.save(tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    assert main(["prune", str(switch_dir), "--recipe", str(path), "--num-experts-per-layer", "6,4,2,2",
                 "--calibration-file", str(calibration_jsonl), "--method", "reap", "--no-progress",
                 "-o", str(out)]) == 0
    used = PruneRecipe.load(out / RECIPE_FILENAME)
    assert used.factor is None and used.num_experts_per_layer == [6, 4, 2, 2] and used.method == "reap"
    assert used.calibration.task is None and used.calibration.file == str(calibration_jsonl)
    assert used.calibration.num_examples == 8  # kept from the file


def test_dry_run_writes_only_the_plan_and_applying_it_gives_the_real_runs_bytes(switch_dir, calibration_jsonl,
                                                                                 tmp_path, capsys):
    common = ["--calibration-file", str(calibration_jsonl), "--factor", "2", "--method", "msmoe", "--no-progress"]
    assert main(["prune", str(switch_dir), *common, "--dry-run", "-o", str(tmp_path / "dry")]) == 0
    out = capsys.readouterr().out
    assert "weights MB (estimate)" in out and "groups encoder.block.1:" in out and "dry run" in out
    assert sorted(p.name for p in (tmp_path / "dry").iterdir()) == sorted(
        [PLAN_FILENAME, RECIPE_FILENAME, "uncurl_manifest.json"]
    )
    assert main(["prune", str(switch_dir), *common, "-o", str(tmp_path / "real")]) == 0
    assert main(["prune", str(switch_dir), "--plan", str(tmp_path / "dry" / PLAN_FILENAME), "--no-progress",
                 "-o", str(tmp_path / "applied")]) == 0
    real, applied = hash_tree(tmp_path / "real"), hash_tree(tmp_path / "applied")
    for name in ("model.safetensors", "config.json", PLAN_FILENAME):
        assert applied[name] == real[name]
    dry = PruneRecipe.load(tmp_path / "dry" / RECIPE_FILENAME)
    assert dry.method == "msmoe" and dry.factor == 2.0
    # the estimate is what the real run's weights weigh, to within the router rows' rounding
    before = (switch_dir / "model.safetensors").stat().st_size
    assert "0.53" in out and before > (tmp_path / "real" / "model.safetensors").stat().st_size
    # the dry-run folder is ours: --overwrite replaces it with the real output
    assert main(["prune", str(switch_dir), *common, "--overwrite", "-o", str(tmp_path / "dry")]) == 0
    assert (tmp_path / "dry" / "model.safetensors").is_file()


def test_python_data_sources_are_recorded_but_cannot_be_rerun(switch_dir, tmp_path):
    texts = ["sentiment : the movie was very good", "sentiment : a boring film with a weak plot"] * 6
    recipe = PruneRecipe(factor=2, calibration=CalibrationSpec(data=texts))
    result = uncurl_hf.prune(switch_dir, recipe, tmp_path / "out", RunOptions(progress=False))
    written = yaml.safe_load((result.output_dir / RECIPE_FILENAME).read_text())
    assert written["calibration"]["file"].startswith("<in-memory")
    with pytest.raises(CalibrationDataError, match="give the data again"):
        PruneRecipe.load(result.output_dir / RECIPE_FILENAME)
    assert result.plan.metadata["calibration"]["num_examples"] == 12
    assert Path(result.output_dir / "model.safetensors").is_file()


def test_calibration_dtype_is_a_run_option_and_the_output_keeps_the_source_dtype(switch_dir, calibration_jsonl,
                                                                                 tmp_path):
    from safetensors import safe_open

    from uncurl_hf.errors import DeviceError

    recipe = PruneRecipe(method="uncurl", factor=2, calibration=CalibrationSpec(file=str(calibration_jsonl)))
    result = uncurl_hf.prune(switch_dir, recipe, tmp_path / "bf16", RunOptions(dtype="bfloat16", progress=False))
    with safe_open(str(result.output_dir / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {__import__("torch").float32}
    assert set(result.plan.counts) == set(result.experts_before)
    assert PruneRecipe.load(result.output_dir / RECIPE_FILENAME) == recipe  # how it ran is not in the recipe
    import torch

    if not torch.cuda.is_available():  # the accelerator path is the same code; here it must say what is missing
        with pytest.raises(DeviceError, match="cuda"):
            uncurl_hf.prune(switch_dir, recipe, tmp_path / "cuda", RunOptions(device="cuda", progress=False))
        assert not (tmp_path / "cuda").exists()
