"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss): calibrate, plan, prune, write, reload.

Every model is a tiny random-init ``*ForCausalLM`` built from the real transformers config class (8 experts, top-2).
What is specified here:

* routing: the adapter picks exactly the experts the model's own router picks, token by token;
* surgery: removing experts the data never routes to leaves the logits unchanged; permuting every expert's hidden
  neurons (the merge methods' alignment) leaves them unchanged too — which pins the neuron axes, gpt-oss's
  interleaved gate/up columns and its biases included;
* outputs: equal counts give a stock checkpoint (top-k clamped) that stock transformers loads; unequal counts give
  the family's ``Pruned*ForCausalLM``, loadable through the Auto classes and, without uncurl-hf, as remote code;
* the on-disk view: ``read_disk_*`` on a saved checkpoint (per-expert or fused layout, sharded) returns exactly the
  in-memory tensors, and ``write_disk_layer`` + ``reduced_config_dict`` reproduce the in-memory writer's files;
* calibration inputs of a causal LM (source then target tokens) and the whole ``prune()`` pipeline on a folder.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import uncurl_hf
from uncurl_hf.surgery.apply import apply_plan, reduce_layer
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.io.checkpoint import load_model, write_checkpoint
from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families import available_families, get_family
from uncurl_hf.plan import LayerPlan, PruningPlan
from helpers import prune_flat

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
STOCK_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
ZOO_TOKENIZER = Path(uncurl_hf.__file__).parent / "zoo" / "checkpoints" / "tiny-switch-8"
IDS = torch.tensor([[5, 9, 13]])  # 3 tokens x top-2 reach at most 6 of the 8 experts of a layer


def tiny_config(family: str, **overrides: Any) -> Any:
    """A real config of ``family``: 3 layers, hidden 16, 8 experts, top-2 (Qwen2-MoE: layer 1 dense)."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2,
    )
    specific: dict[str, dict[str, Any]] = {
        "mixtral": dict(intermediate_size=8, num_local_experts=8),
        "qwen2_moe": dict(
            intermediate_size=12, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=8,
            norm_topk_prob=True, mlp_only_layers=[1],
        ),
        "qwen3_moe": dict(intermediate_size=12, moe_intermediate_size=8, num_experts=8, head_dim=8, norm_topk_prob=True),
        "olmoe": dict(intermediate_size=8, num_experts=8, norm_topk_prob=True),
        "gpt_oss": dict(
            intermediate_size=8, num_local_experts=8, head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    }
    config_class = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "gpt_oss": transformers.GptOssConfig,
    }[family]
    return config_class(**{**common, **specific[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A seeded random-init stock ``*ForCausalLM`` of ``family`` in eval mode (routers scaled up: decisive routing)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, STOCK_CLASSES[family])(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for layer in get_family(model).sparse_layers(model):
            layer.router.weight.mul_(20.0)
    return model


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def plan_of(model: Any, groups: dict[str, list[list[int]]], **layer_kwargs: Any) -> PruningPlan:
    family = get_family(model)
    layers = [
        LayerPlan(name=layer.name, num_experts=layer.num_experts, groups=groups[layer.name], **layer_kwargs.get(layer.name, {}))
        for layer in family.sparse_layers(model)
    ]
    return PruningPlan(model_type=model.config.model_type, family=family.name, method="manual", layers=layers)


def unequal_plan(model: Any) -> PruningPlan:
    """Layer by layer: merges, singletons and different counts (5, 3, ...), so the output needs the pruned class."""
    layers = get_family(model).sparse_layers(model)
    shapes = [
        ([[0, 1], [2], [3, 4, 5], [6], [7]], [[0.25, 0.75], [1.0], [0.5, 0.25, 0.25], [1.0], [1.0]]),
        ([[7], [5, 2], [0]], [[1.0], [0.5, 0.5], [1.0]]),
    ]
    groups = {layer.name: shapes[i % 2][0] for i, layer in enumerate(layers)}
    weights = {layer.name: {"weights": shapes[i % 2][1]} for i, layer in enumerate(layers)}
    return plan_of(model, groups, **weights)


class FolderReader:
    """The :class:`~uncurl_hf.families.base.TensorReader` protocol over every safetensors file of a folder."""

    def __init__(self, folder: Path) -> None:
        self._where: dict[str, Any] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            self._where.update({key: handle for key in handle.keys()})

    def keys(self) -> list[str]:
        return sorted(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        return self._where[key].get_slice(key)[index]


# ---- registry ------------------------------------------------------------------------------------------------


def test_families_are_registered_for_stock_and_pruned_model_types(capsys):
    from uncurl_hf.cli.main import main

    assert set(FAMILIES) <= set(available_families())
    for family in FAMILIES:
        assert get_family({"model_type": family}).name == family
        assert get_family({"model_type": f"pruned_{family}"}).name == family
    assert main(["families"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{family}  (model_type: {family}, pruned_{family})" in listed for family in FAMILIES)


# ---- routing and surgery in memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", FAMILIES)
def test_routing_picks_exactly_the_experts_the_model_picks(family_name):
    model = tiny_model(family_name)
    family = get_family(model)
    layers = family.sparse_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    chosen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        handles.append(layer.module.register_forward_hook(lambda m, a, o, n=layer.name: inputs.__setitem__(n, a[0])))
        handles.append(layer.router.register_forward_hook(lambda m, a, o, n=layer.name: chosen.__setitem__(n, o[2])))
    ids = torch.tensor([[3, 8, 13, 21, 34, 55, 5, 7], [11, 12, 14, 17, 19, 23, 29, 31]])
    logits(model, ids)
    for handle in handles:
        handle.remove()

    assert [layer.name for layer in layers] == (
        ["model.layers.0", "model.layers.2"] if family_name == "qwen2_moe" else [f"model.layers.{i}" for i in range(3)]
    )
    for layer in layers:
        hidden = inputs[layer.name].reshape(-1, 16)
        _, selected = family.routing(family.router_logits(layer, hidden), layer.top_k)
        assert layer.top_k == 2
        assert torch.equal(selected.sort(dim=-1).values, chosen[layer.name].sort(dim=-1).values)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_removing_never_routed_experts_leaves_the_logits_unchanged(family_name):
    model = tiny_model(family_name)
    family = get_family(model)
    stats = calibrate(model, family, [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}], progress=False)
    kept = {name: [[e] for e in range(s.num_experts) if s.counts[e] > 0] for name, s in stats.items()}
    assert all(2 <= len(groups) <= 6 for groups in kept.values())  # 3 tokens x top-2: at least 2 experts unused
    plan = plan_of(model, kept)

    pruned = apply_plan(model, family, plan)

    counts = [len(groups) for groups in kept.values()]
    expected_type = STOCK_CLASSES[family_name] if len(set(counts)) == 1 else f"Pruned{STOCK_CLASSES[family_name]}"
    assert type(pruned).__name__ == expected_type
    assert family.layer_sizes(pruned) == plan.counts
    assert torch.allclose(logits(pruned), logits(model), atol=1e-6, rtol=1e-5)
    # generated tokens leave the calibrated ones (they may route to removed experts): only "it runs" is specified
    assert pruned.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 7)
    if family_name == "qwen2_moe":  # the shared expert and the dense layer are copied through unchanged
        for key, value in model.state_dict().items():
            if ".shared_expert" in key or key.startswith("model.layers.1.mlp."):
                assert torch.equal(pruned.state_dict()[key], value), key


@pytest.mark.parametrize("family_name", FAMILIES)
def test_permuting_every_experts_hidden_neurons_leaves_the_logits_unchanged(family_name):
    """A merge aligns neurons with ``extras["permutations"]``: the neuron axes must move gate, up, down (and
    gpt-oss's interleaved columns and gate/up biases) together, and leave the output bias alone."""
    model = tiny_model(family_name)
    family = get_family(model)
    generator = torch.Generator().manual_seed(1)
    groups, extras = {}, {}
    for layer in family.sparse_layers(model):
        width = family.expert_tensors(layer, 0)["gate"].shape[0]
        groups[layer.name] = [[e] for e in range(layer.num_experts)]
        perms = [[torch.randperm(width, generator=generator).tolist()] for _ in range(layer.num_experts)]
        extras[layer.name] = {"extras": {"permutations": perms}}
    plan = plan_of(model, groups, **extras)

    permuted = apply_plan(model, family, plan)

    assert type(permuted).__name__ == STOCK_CLASSES[family_name]
    first = family.sparse_layers(model)[0]
    perm = plan.layers[0].extras["permutations"][0][0]
    assert torch.equal(family.expert_tensors(family.sparse_layers(permuted)[0], 0)["gate"],
                       family.expert_tensors(first, 0)["gate"][perm])
    assert torch.allclose(logits(permuted), logits(model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family_name", ["mixtral", "gpt_oss"])
def test_equal_counts_give_a_stock_model_with_top_k_clamped(family_name, tmp_path):
    import transformers

    model = tiny_model(family_name)
    family = get_family(model)
    plan = plan_of(model, {layer.name: [[3]] for layer in family.sparse_layers(model)})

    pruned = apply_plan(model, family, plan)
    pruned.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family_name and "auto_map" not in config
    assert config["num_local_experts"] == 1 and config["num_experts_per_tok"] == 1
    assert not list(tmp_path.glob("*.py"))
    stock = getattr(transformers, STOCK_CLASSES[family_name]).from_pretrained(tmp_path)
    assert torch.equal(logits(stock), logits(pruned))
    # one expert left: every token goes to expert 3 with gate weight 1, i.e. the MoE block is expert 3 itself
    layer, original = family.sparse_layers(pruned)[0], family.sparse_layers(model)[0]
    hidden = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block = layer.module(hidden[None])
        block = block[0] if isinstance(block, tuple) else block  # gpt-oss's MLP also returns its router scores
        assert torch.allclose(block[0], family.run_expert(original, 3, hidden), atol=1e-6)


def test_unequal_counts_clamp_top_k_per_layer_and_train_with_the_balancing_loss():
    model = tiny_model("mixtral")
    family = get_family(model)
    plan = plan_of(model, {"model.layers.0": [[0]], "model.layers.1": [[1], [2], [3]], "model.layers.2": [[4], [5]]})

    pruned = apply_plan(model, family, plan)

    assert type(pruned).__name__ == "PrunedMixtralForCausalLM"
    assert pruned.config.num_experts_per_layer == [1, 3, 2] and pruned.config.num_local_experts == 3
    assert [layer.top_k for layer in family.sparse_layers(pruned)] == [1, 2, 2]
    out = pruned(input_ids=IDS, labels=IDS, output_router_logits=True)
    assert [tuple(r.shape) for r in out.router_logits] == [(3, 3)] * 3  # padded to the largest count with -inf
    assert torch.isinf(out.router_logits[0][:, 1:]).all() and torch.isfinite(out.loss)
    out.loss.backward()  # trainable: the padding does not break the graph



def test_pruned_configs_check_their_per_layer_counts():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from uncurl_hf.modeling.pruned_decoder_moe import PrunedMixtralConfig, PrunedQwen2MoeConfig

    values = {k: v for k, v in tiny_config("mixtral").to_dict().items() if k not in ("model_type", "transformers_version")}
    config = PrunedMixtralConfig(**{**values, "num_experts_per_layer": [8, 1, 3]})
    assert config.experts_per_layer() == [8, 1, 3] and config.top_k_per_layer() == [2, 1, 2]
    for counts, problem in (([8, 1], "has 2 entries but the model has 3 sparse layers"),
                            ([8, 0, 3], "entries must be >= 1"), ([4, 1, 3], "largest count must equal num_experts=8")):
        with pytest.raises(StrictDataclassClassValidationError, match=problem):
            PrunedMixtralConfig(**{**values, "num_experts_per_layer": counts})
    qwen = {k: v for k, v in tiny_config("qwen2_moe").to_dict().items() if k not in ("model_type", "transformers_version")}
    assert PrunedQwen2MoeConfig(**{**qwen, "num_experts_per_layer": [8, 2]}).experts_per_layer() == [8, 2]  # 2 sparse

# ---- writing and reloading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", FAMILIES)
def test_pruned_checkpoint_round_trips_through_the_auto_classes(family_name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family_name)
    family = get_family(model)
    plan = unequal_plan(model)
    pruned = apply_plan(model, family, plan, base_model="tiny/source")

    out = write_checkpoint(pruned, tmp_path / "out", plan)  # validates: reload + identical logits

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"pruned_{family_name}"
    assert config["num_experts_per_layer"] == list(plan.counts.values())
    assert config["uncurl_base_model"] == "tiny/source"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned_decoder_moe.Pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == f"Pruned{STOCK_CLASSES[family_name]}"
    assert torch.equal(logits(reloaded), logits(pruned))
    assert torch.equal(reloaded.generate(IDS, max_new_tokens=3, do_sample=False),
                       pruned.generate(IDS, max_new_tokens=3, do_sample=False))
    again = load_model(out)  # the project's loader accepts it (no missing/unexpected tensors, no remote code)
    assert family.layer_sizes(again) == plan.counts
    twice = apply_plan(again, family, plan_of(again, {n: [[0], [1]] for n in plan.counts}))  # prune the output again
    assert type(twice).__name__ == STOCK_CLASSES[family_name] and set(family.layer_sizes(twice).values()) == {2}


CLEAN_LOADER = textwrap.dedent(
    """
    import sys
    site_packages, folder, out = sys.argv[1:4]
    sys.path.append(site_packages)
    try:
        import uncurl_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("uncurl_hf is importable in the clean interpreter")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, out)
    print(type(model).__name__)
    """
)


def test_pruned_checkpoint_loads_as_remote_code_without_uncurl(tmp_path):
    model = tiny_model("mixtral")
    pruned = apply_plan(model, get_family(model), unequal_plan(model))
    pruned.save_pretrained(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").glob("*.py")} == {
        "configuration_pruned_decoder_moe.py", "modeling_pruned_decoder_moe.py"
    }
    clean = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CLEAN_LOADER, site.getsitepackages()[0], str(tmp_path / "out"),
         str(tmp_path / "logits.safetensors")],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert clean.stdout.strip().splitlines()[-1] == "PrunedMixtralForCausalLM"
    with safe_open(str(tmp_path / "logits.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("logits"), logits(pruned))


# ---- the on-disk view --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", FAMILIES)
def test_disk_view_reads_exactly_the_loaded_tensors_and_writes_what_save_pretrained_writes(family_name, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model(family_name).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    family = get_family(model)
    reader = FolderReader(tmp_path / "src")
    source_config = json.loads((tmp_path / "src" / "config.json").read_text())

    disk = family.disk_layers(source_config, reader.keys())
    memory = family.sparse_layers(model)
    assert [(d.name, d.num_experts, d.top_k) for d in disk] == [(m.name, m.num_experts, m.top_k) for m in memory]
    for d, m in zip(disk, memory):
        assert not any("shared_expert" in key for key in d.keys)
        for j in range(m.num_experts):
            _assert_same_tensors(family.read_disk_expert(d, j, reader), family.expert_tensors(m, j))
        _assert_same_tensors(family.read_disk_router(d, reader), family.router_tensors(m))

    for plan in (unequal_plan(model), plan_of(model, {m.name: [[6], [1, 2]] for m in memory})):
        pruned = apply_plan(model, family, plan)
        pruned.save_pretrained(tmp_path / "memory")
        reduced = {m.name: reduce_layer(family, m, plan.layer(m.name)) for m in memory}
        written = json.loads((tmp_path / "memory" / "config.json").read_text())
        assert family.reduced_config_dict(source_config, reduced) == written
        assert family.reduced_config_dict(source_config, plan.counts) == written

        files = FolderReader(tmp_path / "memory")
        new_disk = {d.name: d for d in family.disk_layers(written, files.keys())}
        tensors = {k: reader.get(k) for k in reader.keys() if not any(k in d.keys for d in disk)}
        for d in disk:
            layer_tensors = family.write_disk_layer(d, reduced[d.name])
            assert set(layer_tensors) == set(new_disk[d.name].keys)
            _assert_same_tensors(layer_tensors, {k: files.get(k) for k in layer_tensors})
            tensors.update(layer_tensors)
        (tmp_path / "disk").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / "disk" / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / "disk" / "config.json").write_text(json.dumps(family.reduced_config_dict(source_config, reduced)))
        assembled = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
        assert torch.equal(logits(assembled), logits(pruned))


@pytest.mark.parametrize("family_name", ["mixtral", "qwen2_moe"])
def test_disk_view_also_reads_experts_stored_fused(family_name, tmp_path):
    """A checkpoint that stores the in-memory fused tensors (it loads in transformers too) reads the same."""
    model = tiny_model(family_name)
    family = get_family(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    reader = FolderReader(tmp_path)
    for d, m in zip(family.disk_layers(config, reader.keys()), family.sparse_layers(model)):
        assert f"{m.prefix}.experts.gate_up_proj" in d.keys
        for j in (0, 7):
            _assert_same_tensors(family.read_disk_expert(d, j, reader), family.expert_tensors(m, j))
        _assert_same_tensors(family.read_disk_router(d, reader), family.router_tensors(m))


def test_disk_view_refuses_quantized_experts_naming_the_fix():
    family = get_family({"model_type": "gpt_oss"})
    config = tiny_config("gpt_oss").to_dict()
    keys = [f"model.layers.{i}.mlp.{name}" for i in range(3) for name in (
        "router.weight", "router.bias", "experts.gate_up_proj_blocks", "experts.gate_up_proj_scales",
        "experts.gate_up_proj_bias", "experts.down_proj_blocks", "experts.down_proj_scales", "experts.down_proj_bias",
    )]
    with pytest.raises(UnsupportedModelError, match="quantized experts .*Dequantize it first"):
        family.disk_layers(config, keys)


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


# ---- calibration inputs and the pipeline -------------------------------------------------------------------------


def test_calibration_sees_each_source_followed_by_its_target_right_padded():
    model = tiny_model("mixtral")
    batch = {  # the tokenizer padded on the left; targets start with BOS (1) and are padded with -100
        "input_ids": torch.tensor([[0, 0, 7, 8], [4, 5, 6, 9]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        "labels": torch.tensor([[1, 30, 31, 2], [1, 40, 2, -100]]),
        "decoder_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }

    inputs = get_family(model).forward_inputs(model, batch)

    assert torch.equal(inputs["input_ids"], torch.tensor([[7, 8, 30, 31, 2, 0], [4, 5, 6, 9, 40, 2]]))
    assert torch.equal(inputs["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    assert inputs["use_cache"] is False
    no_target = get_family(model).forward_inputs(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    assert torch.equal(no_target["input_ids"], torch.tensor([[7, 8, 0, 0], [4, 5, 6, 9]]))


def test_prune_a_tiny_mixtral_folder_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ZOO_TOKENIZER)
    source = tmp_path / "mixtral"
    tiny_model("mixtral", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=None, eos_token_id=1).save_pretrained(
        source
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ZOO_TOKENIZER / name, source / name)
    calibration = tmp_path / "data.jsonl"
    lines = [("the movie was great fun", "positive"), ("a boring and weak film", "negative"),
             ("charming , funny and clever", "positive"), ("the worst script of the year", "negative")]
    calibration.write_text("".join(json.dumps({"text": t, "target": g}) + "\n" for t, g in lines))

    result = prune_flat(
        str(source), output_dir=tmp_path / "out", factor=2, method="frequency", calibration_file=calibration,
        progress=False,
    )

    assert set(result.plan.counts.values()) == {4} and result.plan.family == "mixtral"
    tokens = sum(len(tokenizer(t).input_ids) + len(tokenizer(g).input_ids) for t, g in lines)
    assert result.stats_summary["model.layers.0"]["num_tokens"] == tokens  # every source and target token
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    prompt = tokenizer("the movie was", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert (result.output_dir / "tokenizer.json").is_file()
    # the files are stored one tensor per expert while the model holds them fused: verify maps one onto the other
    from uncurl_hf.io.verify import verify_checkpoint

    report = verify_checkpoint(result.output_dir)
    assert report.ok, report.format()
    # equal counts are already a stock checkpoint, so --export stock writes the same model
    stock = prune_flat(
        str(source), output_dir=tmp_path / "stock", factor=2, method="frequency", calibration_file=calibration,
        export="stock", progress=False,
    )
    assert json.loads((stock.output_dir / "config.json").read_text())["model_type"] == "mixtral"


def test_task_evaluation_accepts_causal_lms(tmp_path, capsys):
    """Decoder families are evaluable (uncurl_hf/evaluation/causal.py; end to end in tests/test_causal_eval.py):
    the cheap family check passes, and `uncurl eval` scores a tiny OLMoE through the task's prompt."""
    from uncurl_hf.cli.main import main
    from uncurl_hf.pipeline.source import check_evaluable_family

    from transformers import AutoTokenizer

    folder = tmp_path / "olmoe"
    tiny_model("olmoe", vocab_size=len(AutoTokenizer.from_pretrained(ZOO_TOKENIZER)), pad_token_id=0, bos_token_id=None, eos_token_id=1,
               max_position_embeddings=128).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ZOO_TOKENIZER / name, folder / name)
    for family_name in FAMILIES:
        check_evaluable_family(get_family(tiny_config(family_name)))  # no refusal
    assert main(["eval", str(folder), "--task", "sentiment", "--limit", "4", "--batch-size", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kind                     causal" in out and "metric                   accuracy" in out
    assert "perplexity" in out


@pytest.mark.parametrize("family_name", FAMILIES)
def test_streaming_writer_produces_the_in_memory_checkpoint(family_name, tmp_path):
    """The out-of-core writer (:mod:`uncurl_hf.surgery.streaming`) only talks to the family's disk methods: same tensors,
    same config.json and same files as ``apply_plan`` + ``write_checkpoint``."""
    from uncurl_hf.surgery.streaming import stream_apply_plan

    tiny_model(family_name).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    model = load_model(tmp_path / "src")
    plan = unequal_plan(model)

    memory = write_checkpoint(apply_plan(model, get_family(model), plan), tmp_path / "memory", plan, tmp_path / "src")
    streamed = stream_apply_plan(tmp_path / "src", plan, tmp_path / "streamed")

    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in memory.iterdir())
    assert json.loads((streamed / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    a, b = FolderReader(memory), FolderReader(streamed)
    assert a.keys() == b.keys()
    _assert_same_tensors({k: b.get(k) for k in b.keys()}, {k: a.get(k) for k in a.keys()})
