"""Model cards: metadata that round-trips through huggingface_hub, and numbers equal to the run's measurements."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS
from hub_server import validate_card_metadata
from huggingface_hub import ModelCard, ModelCardData

import uncurl_hf
from uncurl_hf.cards.model_card import BASE_MODEL_RELATION, format_ms, format_score, hub_model_id
from uncurl_hf.errors import UncurlError
from uncurl_hf.evaluation.scoring import evaluate_checkpoint
from uncurl_hf.evaluation.tasks import Example, Task, register_task
from helpers import prune_flat

TASK = "tiny-sentiment-cards"
EXAMPLES = [Example(text, label) for text, label in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


@register_task(TASK)
def _tiny_task() -> Task:
    return Task(
        name=TASK,
        description="twelve tiny sentiment sentences",
        load_split=lambda split: list(EXAMPLES),
        labels=("negative", "positive"),
    )


@pytest.fixture(scope="module")
def evaluated(switch_dir, tmp_path_factory):
    """One pruning run with evaluation (the expensive part, shared by the tests below)."""
    out = tmp_path_factory.mktemp("cards") / "evaluated"
    result = prune_flat(
        switch_dir, output_dir=out, factor=2, task=TASK, num_calibration_examples=8, seed=3, progress=False,
        evaluate=True, eval_limit=6, base_model_id="google/switch-base-8",
    )
    return result


def test_card_metadata_round_trips_and_validates(evaluated):
    text = (evaluated.output_dir / "README.md").read_text(encoding="utf-8")
    card = ModelCard.load(evaluated.output_dir / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data  # ModelCardData round trip (model-index included)
    assert data["base_model"] == "google/switch-base-8"
    assert data["base_model_relation"] == BASE_MODEL_RELATION == "finetune"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text2text-generation"
    assert {"moe", "pruning", "uncurl", TASK, "frequency", "custom_code"} <= set(data["tags"])
    assert validate_card_metadata(text) == []  # what the Hub checks on push


def test_card_numbers_are_the_runs_measurements(evaluated):
    card = ModelCard.load(evaluated.output_dir / "README.md")
    original, pruned = evaluated.eval_original, evaluated.eval_pruned
    assert original.num_examples == pruned.num_examples == 6 and pruned.split == "test"
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"accuracy": pruned.score}  # the original's score is in the body's table, not a result of this model
    assert all(r.dataset_split == "test" and r.metric_type == "accuracy" for r in card.data.eval_results)
    # The scores are those of exactly the files in the folder: re-evaluating the final folder gives the same.
    again = evaluate_checkpoint(evaluated.output_dir, TASK, limit=6, latency_examples=1, progress=False)
    assert again.score == pruned.score
    body = card.text
    assert f"| accuracy | {format_score(original.score)} | {format_score(pruned.score)} |" in body
    assert (
        f"| Latency, ms per example (batch 1) | {format_ms(original.ms_per_example_batch1)} | "
        f"{format_ms(pruned.ms_per_example_batch1)} |" in body
    )
    assert f"| Parameters | {evaluated.params_before:,} | {evaluated.params_after:,} |" in body
    assert f"| {evaluated.disk_bytes_before / 1e6:.2f} | {evaluated.disk_bytes_after / 1e6:.2f} |" in body
    for name, before in evaluated.experts_before.items():
        assert f"| `{name}` | {before} | {evaluated.experts_after[name]} |" in body
    assert "| Calibration examples | 8 (at most 128 tokens each) |" in body
    assert "uncurl prune switch --recipe uncurl_recipe.yaml -o OUTPUT_DIR --evaluate --eval-limit 6" in body
    assert "method: frequency\n" in body and "factor: 2.0\n" in body and "  task: tiny-sentiment-cards\n" in body
    assert "trust_remote_code=True" in body and "No evaluation was run" not in body
    assert str(evaluated.output_dir.parent) not in body  # no absolute paths in a public card
    summary = evaluated.summary_table()
    assert f"{original.score:.4f} -> {pruned.score:.4f}" in summary


def test_card_without_evaluation_says_so(switch_dir, calibration_jsonl, tmp_path):
    result = prune_flat(
        switch_dir, output_dir=tmp_path / "plain", factor=4, calibration_file=calibration_jsonl, progress=False
    )
    card = ModelCard.load(result.output_dir / "README.md")
    data = card.data.to_dict()
    assert "model-index" not in data and "base_model" not in data  # a local path is not a Hub id
    assert "No evaluation was run" in card.text and "quality on the task is **unknown**" in card.text
    assert "  file: calibration.jsonl\n" in card.text and "factor: 4.0\n" in card.text  # paths shown by name
    assert str(calibration_jsonl.parent) not in card.text
    assert validate_card_metadata((result.output_dir / "README.md").read_text()) == []
    assert result.eval_original is None and result.eval_pruned is None

    no_card = prune_flat(
        switch_dir, output_dir=tmp_path / "nocard", factor=4, calibration_file=calibration_jsonl, progress=False,
        card=False,
    )
    assert not (no_card.output_dir / "README.md").exists()


def test_card_of_a_saved_plan_run_names_the_plan_file_and_its_calibration(switch_dir, calibration_jsonl, tmp_path):
    """Re-applying a plan: the card's recipe names the plan file (by name), and the calibration facts come from the
    plan's metadata."""
    first = prune_flat(
        switch_dir, output_dir=tmp_path / "first", factor=4, calibration_file=calibration_jsonl, progress=False,
        plan_out=tmp_path / "my-plan.json",
    )
    again = prune_flat(switch_dir, output_dir=tmp_path / "again", plan=tmp_path / "my-plan.json", progress=False)
    text = ModelCard.load(again.output_dir / "README.md").text
    assert f"uncurl prune {switch_dir.name} --recipe uncurl_recipe.yaml -o OUTPUT_DIR" in text
    assert "plan: my-plan.json\n" in text
    assert "calibration.jsonl" in text
    assert again.plan.counts == first.plan.counts


def test_evaluate_needs_a_task_and_fails_before_any_work(switch_dir, calibration_jsonl, tmp_path):
    with pytest.raises(UncurlError, match="--evaluate needs --task"):
        prune_flat(
            switch_dir, output_dir=tmp_path / "x", factor=2, calibration_file=calibration_jsonl, evaluate=True
        )
    with pytest.raises(UncurlError, match="not a Hub model id"):
        prune_flat(
            switch_dir, output_dir=tmp_path / "x", factor=2, calibration_file=calibration_jsonl,
            base_model_id="/some/local/path",
        )
    assert not (tmp_path / "x").exists()


def test_base_model_id_from_the_hub_cache_layout(tmp_path):
    snapshot = tmp_path / "hub" / "models--google--switch-base-8" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert hub_model_id(snapshot) == "google/switch-base-8"
    assert hub_model_id(tmp_path) is None


def test_the_cards_command_reruns_the_recipe_and_names_the_source_without_its_path():
    from uncurl_hf import RunOptions
    from uncurl_hf.pipeline.output import recipe_command

    command = recipe_command(Path("/home/someone/models/switch"), RunOptions())
    assert command == "uncurl prune switch --recipe uncurl_recipe.yaml -o OUTPUT_DIR"
    assert recipe_command("google/switch-base-8", RunOptions(evaluate=True, eval_limit=5)) == (
        "uncurl prune google/switch-base-8 --recipe uncurl_recipe.yaml -o OUTPUT_DIR --evaluate --eval-limit 5"
    )
