"""The inputs real users bring, through ``uncurl prune`` and ``uncurl_hf.prune`` end to end (on real files).

* calibration sources: .txt, .jsonl (text+target, chat ``messages`` rendered with the tokenizer's chat template,
  prompt/completion), .parquet, .csv, .arrow, a ``save_to_disk`` folder, and in Python a list of texts and a
  ``datasets.Dataset``; each prunes the tiny Switch model and records the example count it calibrated on;
* models: a local folder, a zoo name (``tiny-switch-8``) and a Hub id served by the project's test Hub server
  (``uncurl prune tester/NAME``), the last giving the same bytes as pruning the folder it was pushed from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import uncurl_hf
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, hash_tree
from uncurl_hf import CalibrationSpec, PruneRecipe, RunOptions
from uncurl_hf.cli import main
from uncurl_hf.plan import PruningPlan

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_switch(switch_dir, tmp_path_factory) -> Path:
    """The tiny Switch checkpoint whose tokenizer has a chat template (what chat calibration files need)."""
    folder = tmp_path_factory.mktemp("chat") / "switch"
    shutil.copytree(switch_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


def _rows() -> list[dict[str, str]]:
    return [{"text": t, "target": g} for t, g in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


def _write_source(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A calibration source of ``kind`` holding the 12 tiny sentiment examples; returns (path, extra CLI flags)."""
    import datasets

    rows = _rows()
    if kind == "txt":
        path = folder / "data.txt"
        path.write_text("\n".join(CALIBRATION_TEXTS) + "\n")
        return path, []
    if kind in ("jsonl", "chat", "prompt"):
        path = folder / f"{kind}.jsonl"
        if kind == "chat":
            rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["target"]}]}
                    for r in rows]
        elif kind == "prompt":
            rows = [{"prompt": r["text"], "completion": " " + r["target"]} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, []
    table = datasets.Dataset.from_list([{"sentence": r["text"], "label": r["target"]} for r in rows])
    flags = ["--calibration-column", "sentence", "--calibration-target-column", "label"]
    if kind == "parquet":
        path = folder / "data.parquet"
        table.to_parquet(str(path))
    elif kind == "csv":
        path = folder / "data.csv"
        table.to_csv(str(path), index=False)
    elif kind == "arrow":
        path = folder / "saved"
        table.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:  # a DatasetDict saved with save_to_disk
        path = folder / "dataset"
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
        flags += ["--calibration-split", "train"]
    return path, flags


@pytest.mark.parametrize("kind", ["txt", "jsonl", "chat", "prompt", "parquet", "csv", "arrow", "datasets"])
def test_every_calibration_source_prunes_from_the_cli(kind, chat_switch, tmp_path):
    path, flags = _write_source(kind, tmp_path)
    out = tmp_path / "out"
    assert main(["prune", str(chat_switch), "--calibration-file", str(path), *flags, "--factor", "2",
                 "--no-progress", "--no-card", "-o", str(out)]) == 0
    plan = PruningPlan.load(out / "uncurl_plan.json")
    assert plan.metadata["calibration"]["num_examples"] == 12
    assert plan.metadata["calibration"]["calibration_file"] == str(path)
    stats = plan.metadata["stats"]
    assert all(layer["num_tokens"] > 0 for layer in stats.values())


def test_python_sources_a_list_and_a_dataset_give_the_files_plan(chat_switch, tmp_path):
    import datasets

    path, _ = _write_source("jsonl", tmp_path)
    from_file = uncurl_hf.prune(chat_switch, PruneRecipe(factor=2, calibration=CalibrationSpec(file=str(path))),
                                tmp_path / "file", RunOptions(progress=False, card=False))
    dataset = datasets.Dataset.from_list(_rows())
    from_dataset = uncurl_hf.prune(chat_switch, PruneRecipe(factor=2, calibration=CalibrationSpec(data=dataset)),
                                   tmp_path / "dataset", RunOptions(progress=False, card=False))
    assert from_dataset.plan.layers == from_file.plan.layers  # same examples, same order: the same plan
    texts = uncurl_hf.prune(chat_switch, PruneRecipe(factor=2, calibration=CalibrationSpec(data=CALIBRATION_TEXTS)),
                            tmp_path / "texts", RunOptions(progress=False, card=False))
    assert texts.plan.metadata["calibration"]["num_examples"] == 12


def test_a_zoo_name_is_a_model(tmp_path):
    recipe = PruneRecipe(factor=2, calibration=CalibrationSpec(task="sentiment", num_examples=16))
    result = uncurl_hf.prune("tiny-switch-8", recipe, tmp_path / "zoo", RunOptions(progress=False, card=False))
    assert result.plan.base_model == "tiny-switch-8" and set(result.plan.counts.values()) == {4}


def test_a_hub_id_is_a_model_and_prunes_like_its_folder(hub, switch_dir, calibration_jsonl, tmp_path):
    api = HfApi(endpoint=hub.url, token="hf_test_token")
    api.create_repo("tester/inputs-switch")
    api.upload_folder(repo_id="tester/inputs-switch", folder_path=str(switch_dir), commit_message="add model")
    common = ["--calibration-file", str(calibration_jsonl), "--factor", "2", "--method", "msmoe", "--no-progress"]
    assert main(["prune", "tester/inputs-switch", *common, "-o", str(tmp_path / "hub")]) == 0
    assert main(["prune", str(switch_dir), *common, "-o", str(tmp_path / "local")]) == 0
    hub_files, local_files = hash_tree(tmp_path / "hub"), hash_tree(tmp_path / "local")
    assert hub_files["model.safetensors"] == local_files["model.safetensors"]
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["uncurl_base_model"] == "tester/inputs-switch"  # the source as the user named it
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "uncurl prune tester/inputs-switch --recipe uncurl_recipe.yaml" in card
    assert "base_model: tester/inputs-switch" in card  # the cache snapshot's path keeps the repo id
