"""`uncurl recover`: LoRA recovery of a pruned checkpoint (uncurl_hf/recover/, uncurl_hf/cards/recovery_card.py).

Every test starts from the tiny random-init Switch model (``switch_dir``: d_model 32, 4+4 layers, 8 experts in
each of 4 sparse layers) pruned x2 with frequency on the sentiment task, so each sparse layer keeps 4 experts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import hash_tree
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import uncurl_hf
from uncurl_hf.io.checkpoint import TOKENIZER_FILES, load_model, load_tokenizer
from uncurl_hf.cli.main import main
from uncurl_hf.cards.recovery_card import merged_card
from uncurl_hf.errors import ModelNotFoundError, OutputExistsError, RecoveryError, UnknownTaskError
from uncurl_hf.families import get_family
from uncurl_hf.recover.config import RECOVERY_FILENAME, RecoverConfig
from uncurl_hf.recover.lora import add_lora
from uncurl_hf.recover.train import recover, train_lora, training_batches
from uncurl_hf.evaluation.tasks import get_task
from helpers import prune_flat

pytest.importorskip("peft")
# peft 0.21 reads a transformers attribute that transformers 5 deprecates; not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAST = dict(task="sentiment", steps=4, batch_size=8, lr=1e-2, train_limit=32, eval_limit=16)
# LoRA adds r * (fan_in + fan_out) parameters per adapted Linear. In the tiny model every adapted Linear is 32 x 32:
# 48 attention projections (4 encoder blocks x q/k/v/o + 4 decoder blocks x (self + cross) x q/k/v/o) and
# 32 expert matrices (4 sparse layers x 4 surviving experts x wi/wo) -> 80 x 8 x 64.
TRAINABLE_R8 = 80 * 8 * (32 + 32)


@pytest.fixture(scope="module")
def pruned_dir(switch_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recover") / "pruned-x2"
    prune_flat(
        str(switch_dir), task="sentiment", factor=2, method="frequency", output_dir=out,
        num_calibration_examples=32, progress=False,
    )
    return out


@pytest.fixture(scope="module")
def pruned_hashes(pruned_dir: Path) -> dict[str, str]:
    return hash_tree(pruned_dir)


@pytest.fixture(scope="module")
def adapter_run(pruned_dir: Path, pruned_hashes: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    return recover(pruned_dir, tmp_path_factory.mktemp("out") / "adapter", RecoverConfig(**FAST), progress=False)


@pytest.fixture(scope="module")
def merged_run(pruned_dir: Path, pruned_hashes: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    config = RecoverConfig(**FAST, save="merged", eval_test=True)
    return recover(pruned_dir, tmp_path_factory.mktemp("out") / "merged", config, progress=False)


def _logits(model: torch.nn.Module, base: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**get_family(base).dummy_inputs(base)).logits


def _reload_adapter(pruned_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(pruned_dir)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), base


# ------------------------------------------------------------------------------------------------------- training


def test_training_changes_only_the_lora_parameters(pruned_dir: Path) -> None:
    model = load_model(pruned_dir)
    tokenizer = load_tokenizer(pruned_dir)
    base_params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in base_params.items()}
    config = RecoverConfig(**FAST)
    wrapped = add_lora(model, config)
    lora = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}

    assert sum(p.numel() for p in lora.values()) == TRAINABLE_R8
    assert all(".lora_A." in n or ".lora_B." in n for n in lora)
    adapted = {re.sub(r"\.lora_[AB]\.default\.weight$", "", n.removeprefix("base_model.model.")) for n in lora}
    assert len(adapted) == 80
    assert not [n for n in adapted if "router" in n or re.search(r"layer\.\d\.mlp\.w[io]$", n)]  # routers, dense FFs
    assert "encoder.block.1.layer.1.mlp.experts.expert_3.wo" in adapted
    assert "decoder.block.1.layer.1.EncDecAttention.k" in adapted

    examples = get_task("sentiment").load_split("train")[:32]
    losses = train_lora(wrapped, training_batches(tokenizer, examples, config), steps=4, lr=1e-2, warmup=1)

    assert len(losses) == 4
    for name, param in base_params.items():  # the very tensors of the pruned model, now inside the LoRA layers
        assert not param.requires_grad, name
        assert torch.equal(param, before[name]), name
    assert all(torch.count_nonzero(lora_before[n]) == 0 for n in lora if ".lora_B." in n)  # B starts at zero
    unchanged = {n for n, p in lora.items() if torch.equal(p, lora_before[n])}
    # Attention sees every token, so all its adapters move; an expert's adapters move only if tokens reach it.
    assert not [n for n in unchanged if "Attention" in n]
    for layer in ("encoder.block.1.", "encoder.block.3.", "decoder.block.1.", "decoder.block.3."):
        assert [n for n in lora if layer in n and ".experts." in n and n not in unchanged], layer


def test_loss_goes_down_on_a_fixed_batch(pruned_dir: Path) -> None:
    model = load_model(pruned_dir)
    tokenizer = load_tokenizer(pruned_dir)
    wrapped = add_lora(model, RecoverConfig(task="sentiment"))
    examples = get_task("sentiment").load_split("train")[:16]
    batch = next(training_batches(tokenizer, examples, RecoverConfig(task="sentiment", steps=1, batch_size=16)))
    losses = train_lora(wrapped, (batch for _ in range(12)), steps=12, lr=1e-2, warmup=1)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 4, losses


def test_training_batches_cycle_epochs_to_exactly_steps(pruned_dir: Path) -> None:
    tokenizer = load_tokenizer(pruned_dir)
    examples = get_task("sentiment").load_split("train")[:10]
    config = RecoverConfig(task="sentiment", steps=7, batch_size=4)  # 3 batches per epoch (4+4+2)
    batches = list(training_batches(tokenizer, examples, config))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    again = list(training_batches(tokenizer, examples, config))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


# ---------------------------------------------------------------------------------------------------------- outputs


def test_adapter_folder_reloads_with_identical_logits(adapter_run, pruned_dir: Path) -> None:
    out = adapter_run.output_dir
    tokenizer_files = {name for name in TOKENIZER_FILES if (pruned_dir / name).is_file()}
    assert set(adapter_run.files) == {
        "README.md", "adapter_config.json", "adapter_model.safetensors", RECOVERY_FILENAME, "uncurl_manifest.json",
        *tokenizer_files,
    }
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(pruned_dir.resolve())
    assert adapter_config["r"] == 8 and adapter_config["task_type"] == "SEQ_2_SEQ_LM"

    reloaded, base = _reload_adapter(pruned_dir, out)
    assert torch.equal(_logits(reloaded, base), _logits(adapter_run.model, base))
    assert adapter_run.trainable_params == TRAINABLE_R8


def test_adapter_changes_the_model_and_records_the_run(adapter_run, pruned_dir: Path) -> None:
    base = load_model(pruned_dir)
    assert not torch.allclose(_logits(adapter_run.model, base), _logits(base, base), atol=1e-4)
    record = json.loads((adapter_run.output_dir / RECOVERY_FILENAME).read_text())
    assert record["config"]["steps"] == 4 and record["config"]["save"] == "adapter"
    assert record["scores"]["dev"]["num_examples"] == 16
    assert record["scores"]["dev"]["before"] == adapter_run.scores["dev"].before
    assert record["loss_first"] == adapter_run.losses[0] and record["loss_last"] == adapter_run.losses[-1]
    assert record["command"] == (
        "uncurl recover pruned-x2 --task sentiment --steps 4 --lr 0.01 --rank 8 --save adapter -o OUTPUT_DIR "
        "--batch-size 8 --eval-limit 16 --train-limit 32"
    )
    card = ModelCard.load(adapter_run.output_dir / "README.md")
    assert card.data.library_name == "peft"
    assert {"peft", "lora", "uncurl-recovered"} <= set(card.data.tags)
    assert "## Recovery" in card.text and "PeftModel.from_pretrained" in card.text


def test_merged_model_loads_with_auto_class_close_to_the_adapter(
    merged_run, adapter_run, pruned_dir: Path
) -> None:
    from transformers import AutoModelForSeq2SeqLM

    out = merged_run.output_dir
    merged = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(merged).__name__ == "PrunedSwitchTransformersForConditionalGeneration"
    adapter, base = _reload_adapter(pruned_dir, adapter_run.output_dir)
    torch.testing.assert_close(_logits(merged, base), _logits(adapter, base), atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for name in ("config.json", "uncurl_plan.json", "tokenizer.json"):  # same architecture, plan and tokenizer
        assert (out / name).read_bytes() == (pruned_dir / name).read_bytes(), name


def test_merged_output_passes_verify_and_has_a_recovery_card(merged_run, pruned_dir: Path) -> None:
    from uncurl_hf.io.verify import verify_checkpoint

    verify_checkpoint(merged_run.output_dir).raise_for_failures()
    card = ModelCard.load(merged_run.output_dir / "README.md")
    assert card.data.library_name == "transformers"
    assert {"pruning", "frequency", "lora", "uncurl-recovered"} <= set(card.data.tags)
    assert re.search(r"^# .+ \+ LoRA recovery$", card.text, flags=re.MULTILINE)
    assert card.text.index("## Recovery") < card.text.index("## How to use")
    test = merged_run.scores["test"]
    assert f"| test | 16 | {test.before:.4f} | {test.after:.4f} |" in card.text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("accuracy", test.after), ("accuracy (pruned, before recovery)", test.before),
    ]


def test_recover_never_modifies_the_pruned_folder(adapter_run, merged_run, pruned_dir: Path, pruned_hashes) -> None:
    assert hash_tree(pruned_dir) == pruned_hashes


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_same_inputs_give_byte_identical_folders(save: str, adapter_run, merged_run, pruned_dir, tmp_path) -> None:
    first = adapter_run if save == "adapter" else merged_run
    config = RecoverConfig(**FAST, save=save, eval_test=save == "merged")
    second = recover(pruned_dir, tmp_path / save, config, progress=False)
    assert hash_tree(second.output_dir) == hash_tree(first.output_dir)
    assert second.losses == first.losses


def test_overwrite_replaces_an_adapter_folder(pruned_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recover(pruned_dir, out, RecoverConfig(**{**FAST, "steps": 1}), progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recover(pruned_dir, out, RecoverConfig(**FAST), progress=False)
    result = recover(pruned_dir, out, RecoverConfig(**FAST), overwrite=True, progress=False)
    assert json.loads((out / RECOVERY_FILENAME).read_text())["config"]["steps"] == 4
    assert result.output_dir == out.resolve()
    recover(pruned_dir, out, RecoverConfig(**FAST, save="merged"), overwrite=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


# ------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, r"--steps must be an integer >= 1, got 0"),
        ({"rank": 0}, r"--rank must be an integer >= 1"),
        ({"lr": 0.0}, r"--lr must be > 0"),
        ({"save": "both"}, r"--save must be one of adapter, merged, got 'both'"),
        ({"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_before_loading(overrides, message, pruned_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecoveryError, match=message):
        recover(pruned_dir, tmp_path / "out", RecoverConfig(**{**FAST, **overrides}), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_name_the_fix(pruned_dir: Path, switch_dir: Path, tmp_path: Path) -> None:
    config = RecoverConfig(**FAST)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        recover(tmp_path / "missing", tmp_path / "a", config)
    with pytest.raises(ModelNotFoundError, match=r"not a pruned one \(no uncurl_plan.json\).*uncurl prune"):
        recover(switch_dir, tmp_path / "b", config)
    with pytest.raises(UnknownTaskError, match="Unknown task 'nope'"):
        recover(pruned_dir, tmp_path / "c", RecoverConfig(**{**FAST, "task": "nope"}))
    with pytest.raises(OutputExistsError, match="is the input model folder"):
        recover(pruned_dir, pruned_dir, config)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        recover(pruned_dir, tmp_path / "d", config)
    with pytest.raises(RecoveryError, match="No module of the model matches the LoRA targets"):
        recover(pruned_dir, tmp_path / "e", RecoverConfig(**FAST, target_modules=r".*\.nothing_here"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_missing_peft_names_the_install_command(pruned_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(RecoveryError, match=re.escape("pip install 'uncurl-hf[recover]'")):
        recover(pruned_dir, tmp_path / "out", RecoverConfig(**FAST))
    assert main(["recover", str(pruned_dir), "--task", "sentiment", "-o", str(tmp_path / "out")]) == 2
    assert "error: `uncurl recover` trains LoRA adapters with the peft library" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------------- CLI


def test_cli_recover_end_to_end(pruned_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "cli-merged"
    argv = ["recover", str(pruned_dir), "--task", "sentiment", "--steps", "3", "--batch-size", "8", "--lr", "0.01",
            "--train-limit", "16", "--eval-limit", "8", "--save", "merged", "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^accuracy \(dev, n=8\)\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d\.\d{4}$", printed, flags=re.MULTILINE)
    assert f"LoRA r=8: {TRAINABLE_R8:,} trainable parameters" in printed
    record = json.loads((out / RECOVERY_FILENAME).read_text())
    assert record["config"] == RecoverConfig(
        task="sentiment", steps=3, batch_size=8, lr=0.01, train_limit=16, eval_limit=8, save="merged"
    ).to_dict()
    AutoModelForSeq2SeqLM.from_pretrained(out)

    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:4], "--steps", "0", *argv[6:], "--overwrite"]) == 2
    assert "error: --steps must be an integer >= 1, got 0." in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ cards


def test_merged_card_relabels_scores_measured_before_recovery() -> None:
    common = dict(task_type="text-classification", dataset_type="rt", dataset_name="rt", dataset_split="test",
                  metric_type="accuracy")
    data = ModelCardData(
        library_name="transformers", tags=["moe"], model_name="m-x4",
        eval_results=[
            EvalResult(metric_value=0.70, metric_name="accuracy", **common),
            EvalResult(metric_value=0.73, metric_name="accuracy (original, before pruning)", **common),
        ],
    )
    source = f"---\n{data.to_yaml()}\n---\n\n# m pruned\n\nbody\n\n## How to use\n\nload it\n"
    record = {
        "base": "m-x4", "metric": "accuracy", "trainable_params": 10, "total_params": 100,
        "loss_first": 1.0, "loss_last": 0.5, "command": "uncurl recover m-x4 ...",
        "config": RecoverConfig(task="sentiment", save="merged", eval_test=True).to_dict(),
        "scores": {
            "dev": {"split": "dev", "num_examples": 400, "before": 0.7, "after": 0.72},
            "test": {"split": "test", "num_examples": 800, "before": 0.69, "after": 0.71},
        },
    }
    card = ModelCard(merged_card(source, record))
    assert [(r.metric_name, r.metric_value, r.dataset_type) for r in card.data.eval_results] == [
        ("accuracy", 0.71, "rt"),
        ("accuracy (pruned, before recovery)", 0.69, "rt"),
        ("accuracy (pruned, before recovery)", 0.70, "rt"),
        ("accuracy (original, before pruning)", 0.73, "rt"),
    ]
    assert card.data.tags == ["moe", "pruning", "uncurl", "sentiment", "peft", "lora", "uncurl-recovered"]
    assert card.text.startswith("\n# m pruned + LoRA recovery\n")
    assert "| dev | 400 | 0.7000 | 0.7200 |\n| test | 800 | 0.6900 | 0.7100 |" in card.text
    assert card.text.index("## Recovery") < card.text.index("## How to use")

    without_test = {**record, "scores": {"dev": record["scores"]["dev"]}}
    card = ModelCard(merged_card(source, without_test))
    assert [r.metric_name for r in card.data.eval_results] == [
        "accuracy (pruned, before recovery)", "accuracy (original, before pruning)",
    ]
