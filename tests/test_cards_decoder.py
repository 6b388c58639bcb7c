"""Model cards describe the checkpoint actually written, and their usage code runs (uncurl_hf/cards/usage.py).

For every decoder family, in the stock format (equal counts: a plain ``mixtral`` ... checkpoint) and the pruned
format (unequal counts: ``pruned_<family>`` with its modeling files), and for Switch: prune a tiny model folder,
then execute the card's Python usage snippets against the folder in a fresh interpreter (the ``trust_remote_code``
variant with ``uncurl_hf`` made unimportable) and check that they load the right class and generate. The metadata
names the right pipeline tag, family tag and ``custom_code`` only when ``auto_map`` is written; ``model-index``
lists only the pruned model's own score.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, prune_flat
from huggingface_hub import ModelCard
from test_causal_eval import decoder_folder
from test_families_decoder import FAMILIES, STOCK_CLASSES, ZOO_TOKENIZER
from transformers import AutoTokenizer

from uncurl_hf.errors import ExportError
from uncurl_hf.evaluation.tasks import Example, Task, register_task
from uncurl_hf.families import get_family

SWITCH_TASK = "tiny-switch-cards-decoder"
PLACEHOLDER = "path/to/this/folder"
RUNNER = """
import json, sys
if sys.argv[2] == "remote":
    sys.modules["uncurl_hf"] = None  # the trust_remote_code variant must not need uncurl-hf
for code in json.loads(sys.argv[1]):
    namespace = {}
    exec(compile(code, "<card snippet>", "exec"), namespace)
    model, outputs = namespace["model"], namespace["outputs"]
    print("RAN", type(model).__module__, type(model).__name__, "x".join(map(str, outputs.shape)))
"""


@register_task(SWITCH_TASK)
def _switch_task() -> Task:
    examples = [Example(text, label) for text, label in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]
    return Task(name=SWITCH_TASK, description="twelve tiny sentiment sentences", load_split=lambda split: examples,
                labels=("negative", "positive"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


def usage_snippets(card_text: str) -> list[str]:
    section = card_text.split("## How to use", 1)[1].split("## How it was made", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_snippets(codes: list[str], tmp_path: Path, remote: bool) -> list[list[str]]:
    """Execute the snippets (model id already replaced by a folder) in a fresh interpreter, one after the other;
    ``[module, class, output shape]`` of the model each one loaded."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(codes), "remote" if remote else "local"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RAN ")]


def unequal_counts(folder: Path) -> dict[str, int]:
    from uncurl_hf.io.checkpoint import disk_layer_sizes

    return {name: (5, 3, 6)[i % 3] for i, name in enumerate(disk_layer_sizes(folder))}


@pytest.mark.parametrize("family_name", FAMILIES)
def test_decoder_cards_describe_the_written_format_and_their_usage_code_runs(family_name, tokenizer, tmp_path):
    source = decoder_folder(tmp_path / family_name, family_name, tokenizer)
    common = dict(method="frequency", task="sentiment", num_calibration_examples=8, progress=False)
    stock = prune_flat(str(source), output_dir=tmp_path / "stock", factor=2, **common).output_dir
    pruned = prune_flat(str(source), output_dir=tmp_path / "pruned", num_experts_per_layer=unequal_counts(source),
                        **common).output_dir
    stock_class = STOCK_CLASSES[family_name]

    local, remote = [], []
    for folder, model_type in ((stock, family_name), (pruned, f"pruned_{family_name}")):
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
        assert data["pipeline_tag"] == "text-generation" and data["library_name"] == "transformers"
        assert family_name in data["tags"] and "switch_transformers" not in data["tags"]
        assert ("custom_code" in data["tags"]) == (folder == pruned)  # only where auto_map is written
        assert f"| Checkpoint format | {'stock ' if folder == stock else ''}`{model_type}`" in card.text
        assert "Seq2Seq" not in card.text and "pruned_switch_transformers" not in card.text
        snippets = usage_snippets(card.text)
        assert all("AutoModelForCausalLM" in s for s in snippets)
        if folder == stock:
            assert len(snippets) == 1 and "import uncurl_hf" not in snippets[0]
            local.append(snippets[0].replace(PLACEHOLDER, str(folder)))
        else:
            files = sorted(p.name for p in folder.glob("*.py"))
            assert files == ["configuration_pruned_decoder_moe.py", "modeling_pruned_decoder_moe.py"]
            assert all(f"`{name}`" in card.text for name in files)  # the files named are those in the folder
            assert len(snippets) == 2 and "import uncurl_hf" in snippets[0] and "trust_remote_code=True" in snippets[1]
            local.append(snippets[0].replace(PLACEHOLDER, str(folder)))
            remote.append(snippets[1].replace(PLACEHOLDER, str(folder)))

    ran = run_snippets(local, tmp_path, remote=False)
    assert [r[1] for r in ran] == [stock_class, f"Pruned{stock_class}"]
    assert ran[0][0].startswith("transformers.models.")  # stock transformers, no custom code
    [ran_remote] = run_snippets(remote, tmp_path, remote=True)
    assert ran_remote[0].startswith("transformers_modules.") and ran_remote[1] == f"Pruned{stock_class}"

    # --export stock of unequal counts names the family's own config, not Switch's
    with pytest.raises(ExportError, match=r"A \w+Config has a single expert count") as refused:
        prune_flat(str(source), output_dir=tmp_path / "refused", num_experts_per_layer=unequal_counts(source),
                   export="stock", **common)
    assert "SwitchTransformers" not in str(refused.value)
    assert get_family(source).stock_config_class().__name__ in str(refused.value)


def test_switch_cards_keep_seq2seq_usage_and_list_only_the_pruned_score(switch_dir, tmp_path):
    common = dict(method="frequency", task=SWITCH_TASK, num_calibration_examples=8, progress=False)
    pruned = prune_flat(switch_dir, output_dir=tmp_path / "pruned", factor=2, evaluate=True, eval_limit=6,
                        **common)
    stock = prune_flat(switch_dir, output_dir=tmp_path / "stock", factor=2, export="stock", **common).output_dir

    card = ModelCard.load(pruned.output_dir / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text2text-generation"
    assert {"switch_transformers", "custom_code"} <= set(data["tags"])
    [result] = card.data.eval_results  # the original's score is in the body, not a result of this model
    assert result.metric_value == pruned.eval_pruned.score and result.metric_name == "accuracy"
    assert f"| accuracy | {pruned.eval_original.score:.4f} | {pruned.eval_pruned.score:.4f} |" in card.text
    assert "| Predicted label equal to the original's (%) | 100.00 |" in card.text
    stock_card = ModelCard.load(stock / "README.md")
    assert "custom_code" not in stock_card.data.tags and "switch_transformers" in stock_card.data.tags
    assert "| Checkpoint format | stock `switch_transformers`" in stock_card.text

    local = [usage_snippets(stock_card.text)[0].replace(PLACEHOLDER, str(stock))]
    import_snippet, remote_snippet = usage_snippets(card.text)
    local.append(import_snippet.replace(PLACEHOLDER, str(pruned.output_dir)))
    ran = run_snippets(local, tmp_path, remote=False)
    assert [r[1] for r in ran] == ["SwitchTransformersForConditionalGeneration",
                                   "PrunedSwitchTransformersForConditionalGeneration"]
    [ran_remote] = run_snippets([remote_snippet.replace(PLACEHOLDER, str(pruned.output_dir))], tmp_path,
                                remote=True)
    assert ran_remote[0].startswith("transformers_modules.")
