"""`uncurl recover` on the decoder families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss), stock and ``pruned_*``.

Models are the tiny random-init ``*ForCausalLM`` of ``test_families_decoder`` (3 layers, hidden 16, 8 experts top-2;
Qwen2-MoE's layer 1 dense) with the zoo tokenizer, pruned on ``sentiment``; one run uses the shipped
``tiny-qwen3moe-64``. What is specified:

* targets, declared once per family (``uncurl_hf/recover/targets.py``): attention ``q/k/v/o`` and the surviving
  experts' fused ``gate_up_proj``/``down_proj`` (peft ``target_parameters``, one rank-r pair per expert), plus
  Qwen2-MoE's shared expert; routers and gates never; ``--target-modules``/``--target-parameters`` replace them;
* with ``lora_B = 0`` the wrapped model computes the pruned model's logits exactly; training moves only LoRA
  weights, and every router (and Qwen2-MoE's ``shared_expert_gate``) is bit-identical in the merged output;
* training batches are the prompt label scoring reads, then the gold label; the loss covers the label tokens only;
* outputs: the merged folder reloads through ``AutoModelForCausalLM`` with the in-memory logits and passes verify;
  the adapter folder loads with ``PeftModel`` (task type ``CAUSAL_LM``); cards describe a causal LM and their usage
  code runs; the same inputs give byte-identical folders;
* every family runs end to end through the CLI; bad settings get one clear error before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import hash_tree, prune_flat
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_causal_eval import decoder, decoder_folder
from test_families_decoder import FAMILIES, STOCK_CLASSES, ZOO_TOKENIZER, tiny_model, unequal_plan
from transformers import AutoTokenizer

from uncurl_hf.cli.main import main
from uncurl_hf.errors import PromptError, RecoveryError
from uncurl_hf.evaluation import causal
from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids
from uncurl_hf.evaluation.tasks import get_task
from uncurl_hf.families import available_families, get_family
from uncurl_hf.io.checkpoint import load_model
from uncurl_hf.recover.batches import training_batches
from uncurl_hf.recover.config import RECOVERY_FILENAME, RecoverConfig
from uncurl_hf.recover.lora import add_lora
from uncurl_hf.recover.targets import DEFAULT_TARGETS, resolve_targets, task_type_of
from uncurl_hf.recover.train import recover, train_lora
from uncurl_hf.surgery.apply import apply_plan

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAST = dict(task="sentiment", steps=2, batch_size=4, lr=1e-2, train_limit=8, eval_limit=4)
UNEQUAL = {"mixtral": [5, 3, 6], "qwen3_moe": [5, 3, 6], "olmoe": [5, 3, 6], "gpt_oss": [5, 3, 6], "qwen2_moe": [5, 3]}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
IDS = torch.tensor([[1, 57, 301, 12, 990, 44, 7], [1, 8, 9, 10, 11, 12, 13]])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


@pytest.fixture(scope="module")
def pruned(tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """``pruned(family, fmt)``: a tiny decoder folder pruned on sentiment, ``fmt`` "stock" (factor 2: equal counts,
    a plain checkpoint) or "pruned" (unequal counts: the ``pruned_<family>`` class); built once per module."""
    root = tmp_path_factory.mktemp("recover-decoder")
    cache: dict[tuple[str, str], Path] = {}

    def build(family: str, fmt: str) -> Path:
        if (family, fmt) not in cache:
            source = root / family
            if not source.exists():
                decoder_folder(source, family, tokenizer)
            counts = dict(factor=2) if fmt == "stock" else dict(num_experts_per_layer=UNEQUAL[family])
            cache[family, fmt] = prune_flat(
                str(source), output_dir=root / f"{family}-{fmt}", method="frequency", task="sentiment",
                num_calibration_examples=8, progress=False, **counts,
            ).output_dir
        return cache[family, fmt]

    return build


@pytest.fixture(scope="module")
def adapter_run(pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "adapter"
    return recover(pruned("qwen3_moe", "pruned"), out, RecoverConfig(**FAST), progress=False)


@pytest.fixture(scope="module")
def merged_run(pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "merged"
    return recover(pruned("qwen3_moe", "pruned"), out, RecoverConfig(**FAST, save="merged"), progress=False)


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def pruned_in_memory(family: str) -> Any:
    """A tiny model of ``family`` (the zoo tokenizer's vocabulary) with unequal counts (5, 3, 5; Qwen2-MoE 5, -, 5):
    the ``Pruned*ForCausalLM``."""
    model = decoder(family, AutoTokenizer.from_pretrained(ZOO_TOKENIZER))
    return apply_plan(model, get_family(model), unequal_plan(model)).eval()


def adapted(wrapped: Any) -> tuple[list[str], list[str]]:
    tuner = wrapped.base_model
    return sorted(tuner.targeted_module_names), sorted(tuner.targeted_parameter_names)


def router_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every router/gate tensor stored in a folder (``mlp.gate``, ``mlp.router``, ``shared_expert_gate``)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return {k: v for k, v in tensors.items() if re.search(r"\.mlp\.(gate|router|shared_expert_gate)\.", k)}


# ---------------------------------------------------------------------------------------------------------- targets


def test_every_family_declares_its_targets_and_task_type() -> None:
    assert set(DEFAULT_TARGETS) == set(available_families())
    assert {name: task_type_of(get_family({"model_type": name})) for name in available_families()} == {
        "switch_transformers": "SEQ_2_SEQ_LM", **{name: "CAUSAL_LM" for name in FAMILIES},
    }
    for name in FAMILIES:
        assert DEFAULT_TARGETS[name].parameters == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    # either flag replaces the defaults as a whole
    assert resolve_targets("qwen3_moe", target_modules=r".*q_proj").parameters == ()
    assert resolve_targets("qwen3_moe", target_parameters="mlp.experts.down_proj").modules == ()
    with pytest.raises(RecoveryError, match=r"no default LoRA targets for the 'nope' family.*--target-modules"):
        resolve_targets("nope")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_attention_and_the_surviving_experts_and_start_as_a_no_op(family: str) -> None:
    model = pruned_in_memory(family)
    expected_logits = logits(model)
    config = model.config
    sparse = [int(layer.name.split(".")[-1]) for layer in get_family(model).sparse_layers(model)]
    wrapped = add_lora(model, RecoverConfig(task="sentiment"))

    modules, params = adapted(wrapped)
    expected_modules = {f"model.layers.{i}.self_attn.{p}" for i in range(config.num_hidden_layers) for p in ATTENTION}
    if family == "qwen2_moe":  # the shared expert is adapted, its gate is not
        expected_modules |= {f"model.layers.{i}.mlp.shared_expert.{p}" for i in sparse
                             for p in ("gate_proj", "up_proj", "down_proj")}
    assert modules == sorted(expected_modules)
    assert params == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in sparse for p in ("gate_up_proj", "down_proj"))
    assert sparse == ([0, 2] if family == "qwen2_moe" else [0, 1, 2])
    assert wrapped.peft_config["default"].task_type == "CAUSAL_LM"

    # r (in + out) per adapted Linear; per fused [E, a, b] parameter, r (a + b) for each of its E experts
    base = wrapped.get_base_model()
    linear = sum(8 * (m.in_features + m.out_features) for n, m in base.named_modules() if n in expected_modules)
    fused = sum(8 * p.shape[0] * (p.shape[1] + p.shape[2]) for n, p in base.named_parameters()
                if re.search(r"experts\.(base_layer\.)*(gate_up_proj|down_proj)$", n.replace(".parametrizations", "")))
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == linear + fused
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if family == "qwen3_moe":  # 3 x (q 256 + k 192 + v 192 + o 256) + (5 + 3 + 5 experts) x (256 + 192)
        assert linear + fused == 8512
    assert all(torch.count_nonzero(p) == 0 for n, p in trainable.items() if ".lora_B." in n)
    assert torch.equal(logits(wrapped), expected_logits)  # lora_B = 0: exactly the pruned model


def test_training_moves_only_lora_and_merging_leaves_every_router_bit_identical(tokenizer) -> None:
    """Qwen2-MoE: routers, the shared expert's gate, norms and embeddings keep their exact bytes."""
    model = pruned_in_memory("qwen2_moe")
    frozen = {n: p.detach().clone() for n, p in model.state_dict().items()}
    config = RecoverConfig(**{**FAST, "steps": 3})
    wrapped = add_lora(model, config)
    train = get_task("sentiment").load_split("train")[:8]
    losses = train_lora(wrapped, training_batches(tokenizer, train, config, causal=True), steps=3, lr=1e-2, warmup=1)
    assert len(losses) == 3
    assert all(torch.equal(p, frozen[n]) for n, p in wrapped.get_base_model().state_dict().items() if n in frozen)

    merged = wrapped.merge_and_unload().state_dict()
    assert set(merged) == set(frozen)
    changed = sorted(n for n in frozen if not torch.equal(merged[n], frozen[n]))
    assert changed and all(re.search(r"self_attn\.[qkvo]_proj\.weight$|experts\.(gate_up|down)_proj$|"
                                     r"shared_expert\.(gate|up|down)_proj\.weight$", n) for n in changed), changed
    gates = [n for n in frozen if re.search(r"\.mlp\.(gate|shared_expert_gate)\.weight$", n)]
    assert len(gates) == 4 and not set(gates) & set(changed)


# ---------------------------------------------------------------------------------------------------------- batches


def test_causal_batches_are_the_scored_prompt_then_the_label_with_loss_on_the_label_only(tokenizer) -> None:
    task = get_task("sentiment")
    examples = task.load_split("train")[:3]
    config = RecoverConfig(task="sentiment", steps=1, batch_size=3)
    [batch] = training_batches(tokenizer, examples, config, causal=True)
    conts = continuation_ids(tokenizer, "sentiment")
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    # the very sequences causal evaluation scores: prompt + gold continuation (here in the seeded shuffled order)
    scored = causal.evaluation_sequences(tiny_model("olmoe"), tokenizer, task, examples)
    rows = [batch["input_ids"][r, : int(batch["attention_mask"][r].sum())].tolist() for r in range(3)]
    assert sorted(rows) == sorted(scored)
    for row, ids in enumerate(rows):
        example = examples[scored.index(ids)]
        prompt = prompt_ids(tokenizer, "sentiment", task.raw_text(example.source))
        labels = batch["labels"][row]
        assert labels[len(prompt) : len(ids)].tolist() == conts[example.target]
        assert (labels[: len(prompt)] == -100).all() and (labels[len(ids) :] == -100).all()
        assert (batch["input_ids"][row, len(ids) :] == tokenizer.pad_token_id).all()  # right padding, masked
        assert batch["attention_mask"][row, : len(ids)].all() and not batch["attention_mask"][row, len(ids) :].any()


def test_loss_goes_down_on_a_fixed_batch(tokenizer) -> None:
    """Initialised with std 0.3 (not 0.02) so that the label logits of a 16-wide model can move in a few steps."""
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=None, eos_token_id=1,
                       max_position_embeddings=128, initializer_range=0.3)
    wrapped = add_lora(apply_plan(model, get_family(model), unequal_plan(model)), RecoverConfig(task="sentiment"))
    train = get_task("sentiment").load_split("train")[:8]
    one = RecoverConfig(task="sentiment", steps=1, batch_size=8)
    batch = next(training_batches(tokenizer, train, one, causal=True))
    losses = train_lora(wrapped, (batch for _ in range(8)), steps=8, lr=3e-2, warmup=1)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------- outputs


def test_merged_output_reloads_with_the_in_memory_logits_and_passes_verify(merged_run, pruned) -> None:
    from transformers import AutoModelForCausalLM

    from uncurl_hf.evaluation.scoring import evaluate_checkpoint
    from uncurl_hf.io.verify import verify_checkpoint

    source, out = pruned("qwen3_moe", "pruned"), merged_run.output_dir
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "PrunedQwen3MoeForCausalLM"
    assert torch.equal(logits(reloaded), logits(merged_run.model))
    assert not torch.allclose(logits(reloaded), logits(load_model(source)), atol=1e-4)  # training changed it
    for name in ("config.json", "uncurl_plan.json", "tokenizer.json"):  # same architecture, plan and tokenizer
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    routers = router_tensors(source)
    assert len(routers) == 3 and all(torch.equal(v, router_tensors(out)[k]) for k, v in routers.items())
    verify_checkpoint(out).raise_for_failures()
    # before/after are the scores `uncurl eval` gives the two folders (causal label scoring through the prompt)
    assert evaluate_checkpoint(source, "sentiment", "dev", limit=4, latency_examples=1, progress=False).score == \
        merged_run.scores["dev"].before
    assert evaluate_checkpoint(out, "sentiment", "dev", limit=4, latency_examples=1, progress=False).score == \
        merged_run.scores["dev"].after
    record = json.loads((out / RECOVERY_FILENAME).read_text())
    assert record["lora"]["task_type"] == "CAUSAL_LM" and record["lora"]["family"] == "qwen3_moe"
    assert record["lora"]["targets"]["parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_adapter_folder_loads_with_peft_and_reproduces_the_trained_model(adapter_run, merged_run, pruned) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, out = pruned("qwen3_moe", "pruned"), adapter_run.output_dir
    assert set(adapter_run.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                      RECOVERY_FILENAME, "uncurl_manifest.json", "tokenizer.json",
                                      "tokenizer_config.json"}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["base_model_name_or_path"] == str(source)
    # sorted lists, never a set's hash-seed-dependent order: the same bytes in every process
    assert adapter_config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), out)
    assert torch.equal(logits(reloaded), logits(adapter_run.model))
    # the same run merged computes the same function
    torch.testing.assert_close(logits(merged_run.model), logits(adapter_run.model), atol=1e-5, rtol=1e-5)
    assert adapter_run.losses == merged_run.losses


def test_cards_describe_a_causal_lm_and_the_adapter_usage_code_runs(adapter_run, merged_run, pruned) -> None:
    source = pruned("qwen3_moe", "pruned")
    card = ModelCard.load(adapter_run.output_dir / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert "fused `gate_up_proj`/`down_proj`" in card.text and "cross" not in card.text
    [code] = re.findall(r"```python\n(.*?)```", card.text.split("## How to use", 1)[1], flags=re.S)
    assert "AutoModelForCausalLM" in code and "Seq2Seq" not in code and "import uncurl_hf" in code
    code = code.replace(f"path/to/{source.name}", str(source)).replace("path/to/this/folder",
                                                                       str(adapter_run.output_dir))
    namespace: dict[str, Any] = {}
    exec(compile(code, "<card snippet>", "exec"), namespace)  # noqa: S102 - the card's own snippet
    assert type(namespace["model"]).__name__ == "PrunedQwen3MoeForCausalLM"  # merged, as the snippet does
    assert namespace["outputs"].shape[1] == namespace["inputs"]["input_ids"].shape[1] + 8

    merged = ModelCard.load(merged_run.output_dir / "README.md")
    assert merged.data.pipeline_tag == "text-generation" and merged.data.library_name == "transformers"
    assert merged.text.index("## Recovery") < merged.text.index("## How to use")
    assert "AutoModelForCausalLM" in merged.text and "Seq2Seq" not in merged.text


def test_same_inputs_give_byte_identical_folders(adapter_run, merged_run, pruned, tmp_path) -> None:
    for first, save in ((adapter_run, "adapter"), (merged_run, "merged")):
        again = recover(pruned("qwen3_moe", "pruned"), tmp_path / save, RecoverConfig(**FAST, save=save),
                        progress=False)
        assert hash_tree(again.output_dir) == hash_tree(first.output_dir), save


# ---------------------------------------------------------------------------------------------------------- the CLI


# (checkpoint format, --save) per family: together they cover stock and pruned_* checkpoints, adapter and merged
CLI_CASES = {"mixtral": ("stock", "adapter"), "olmoe": ("pruned", "adapter"), "gpt_oss": ("stock", "merged"),
             "qwen2_moe": ("pruned", "merged"), "qwen3_moe": ("stock", "merged")}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_recovers_every_family_end_to_end(family: str, pruned, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    fmt, save = CLI_CASES[family]
    source = pruned(family, fmt)
    out = tmp_path / "out"
    argv = ["recover", str(source), "--task", "sentiment", "--steps", "2", "--batch-size", "4", "--lr", "0.01",
            "--train-limit", "8", "--eval-limit", "4", "--save", save, "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^accuracy \(dev, n=4\)\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d\.\d{4}$", printed, flags=re.MULTILINE)
    record = json.loads((out / RECOVERY_FILENAME).read_text())
    assert record["lora"] == {"family": family, "task_type": "CAUSAL_LM", "targets": DEFAULT_TARGETS[family].to_dict()}
    assert record["command"].startswith(f"uncurl recover {source.name} --task sentiment --steps 2")
    if save == "merged":
        model = AutoModelForCausalLM.from_pretrained(out)
        assert type(model).__name__ == ("" if fmt == "stock" else "Pruned") + STOCK_CLASSES[family]
        assert all(torch.equal(v, router_tensors(out)[k]) for k, v in router_tensors(source).items())
    else:  # peft holds some targets as sets (stock Mixtral): written sorted, the same bytes in every process
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        assert adapter_config["task_type"] == "CAUSAL_LM"
        assert adapter_config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        assert adapter_config["target_modules"] == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(3)
                                                          for p in ATTENTION)


def test_recover_on_the_shipped_tiny_qwen3moe_64(tmp_path) -> None:
    pruned_dir = prune_flat("tiny-qwen3moe-64", output_dir=tmp_path / "q64-x2", factor=2, method="frequency",
                            task="sentiment", num_calibration_examples=8, progress=False).output_dir
    result = recover(pruned_dir, tmp_path / "q64-lora", RecoverConfig(**{**FAST, "eval_limit": 8}), progress=False)
    assert result.scores["dev"].num_examples == 8 and 0.0 <= result.scores["dev"].after <= 1.0
    assert len(result.losses) == 2 and all(loss == loss and loss > 0 for loss in result.losses)
    # 4 layers x (q 128->128, k 128->64, v 128->64, o 128->128) + 4 x 32 experts x (gate_up 128+64, down 32+128)
    assert result.trainable_params == 8 * (4 * (256 + 192 + 192 + 256) + 4 * 32 * (192 + 160))
    assert result.model.peft_config["default"].task_type == "CAUSAL_LM"


# ---------------------------------------------------------------------------------------------------------- errors


def test_bad_decoder_settings_name_the_fix_before_anything_is_written(pruned, tmp_path) -> None:
    source = pruned("qwen2_moe", "pruned")
    cases = [
        ({"dropout": 0.1}, r"--dropout 0.1 cannot be used with LoRA on fused expert parameters.*--dropout 0"),
        ({"target_parameters": "mlp.experts.nothing"}, r"No parameter of the model matches --target-parameters"),
        ({"target_parameters": "mlp.gate.weight"}, r"router/gate weights .*routers are never adapted"),
        ({"target_modules": r".*shared_expert_gate"}, r"router/gate weights \(model\.layers\.0\.mlp\.shared_expert"),
        ({"target_modules": r".*\.nothing_here"}, r"No module of the model matches the LoRA targets"),
    ]
    for overrides, message in cases:
        with pytest.raises(RecoveryError, match=message):
            recover(source, tmp_path / "out", RecoverConfig(**{**FAST, **overrides}), progress=False)
    assert not (tmp_path / "out").exists()


def test_either_target_flag_alone_adapts_exactly_what_it_names(tokenizer) -> None:
    """On a stock OLMoE, where peft itself would widen a regex to every module with the same leaf name."""
    only_q = RecoverConfig(task="sentiment", target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    assert adapted(add_lora(decoder("olmoe", tokenizer), only_q)) == (["model.layers.0.self_attn.q_proj"], [])
    only_down = RecoverConfig(task="sentiment", target_parameters="mlp.experts.down_proj")
    assert adapted(add_lora(decoder("olmoe", tokenizer), only_down)) == (
        [], [f"model.layers.{i}.mlp.experts.down_proj" for i in range(3)])


def test_a_prompt_longer_than_the_models_positions_is_refused(tokenizer, tmp_path) -> None:
    source = decoder_folder(tmp_path / "short", "mixtral", tokenizer, positions=32)
    pruned_dir = prune_flat(str(source), output_dir=tmp_path / "p", factor=2, method="frequency", task="sentiment",
                            num_calibration_examples=4, max_length=16, progress=False).output_dir
    with pytest.raises(PromptError, match=r"max_position_embeddings=32"):
        recover(pruned_dir, tmp_path / "out", RecoverConfig(**FAST), progress=False)
    assert not (tmp_path / "out").exists()
