"""Experts kernels of the pruned decoder classes: the same choice, default and results as their stock family.

transformers decides whether a class may choose its experts kernel (``set_experts_implementation``) from the source
of the class's module and caches the answer on the class, so these tests also run in fresh interpreters, asking the
stock and the pruned classes in both orders. Models are tiny random-init ones of the five families (3 layers,
hidden 16, 8 experts, top-2; Qwen2-MoE's layer 1 dense), routers scaled up so that routing is decisive and cannot
flip on the last-bit differences between kernels. The configs are built here rather than imported from
``test_families_decoder``, which imports the pipeline modules: these tests need only ``uncurl_hf.modeling``.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from uncurl_hf.modeling import experts_implementation
from uncurl_hf.modeling.pruned_decoder_moe import PRUNED_CAUSAL_LMS, PRUNED_CONFIGS, sparse_layer_indices

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
STOCK_CLASSES = {
    "mixtral": transformers.MixtralForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
    "gpt_oss": transformers.GptOssForCausalLM,
}
KERNELS = ("eager", "batched_mm", "grouped_mm")
UNEQUAL = [8, 3, 1]  # per sparse layer (Qwen2-MoE has two): a full layer, a pruned one, a single expert (top-1)
IDS = torch.tensor([[5, 9, 13, 7, 21, 3], [11, 4, 30, 8, 2, 17]])


def tiny_values(family: str) -> dict[str, Any]:
    """Config values of a tiny ``family`` model (the sizes of ``test_families_decoder.tiny_config``)."""
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
        "qwen3_moe": dict(
            intermediate_size=12, moe_intermediate_size=8, num_experts=8, head_dim=8, norm_topk_prob=True,
        ),
        "olmoe": dict(intermediate_size=8, num_experts=8, norm_topk_prob=True),
        "gpt_oss": dict(
            intermediate_size=8, num_local_experts=8, head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    }
    return {**common, **specific[family]}


def _decisive(model: Any) -> Any:
    """``model`` in eval mode with every router's weight scaled by 20 (decisive, kernel-independent routing)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("TopKRouter"):
                module.weight.mul_(20.0)
    return model.eval()


def stock_decoder(family: str, seed: int = 0) -> Any:
    """A seeded tiny stock ``*ForCausalLM`` of ``family``."""
    config = STOCK_CLASSES[family].config_class(**tiny_values(family))
    torch.manual_seed(seed)
    return _decisive(STOCK_CLASSES[family](config))


def pruned_decoder(family: str, counts: list[int] | None = UNEQUAL, seed: int = 0) -> Any:
    """A seeded tiny ``Pruned*ForCausalLM`` of ``family``; ``counts`` (cut to the sparse layers) or uniform 8."""
    values = tiny_values(family)
    if counts is not None:
        layers = sparse_layer_indices(STOCK_CLASSES[family].config_class(**values))
        counts = counts[: len(layers)]
    config = PRUNED_CONFIGS[family](**values, num_experts_per_layer=counts)
    torch.manual_seed(seed)
    return _decisive(PRUNED_CAUSAL_LMS[family](config))


def run_logits(model: Any, kernel: str) -> torch.Tensor:
    model.set_experts_implementation(kernel)
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.fixture(autouse=True)
def forget_kernel_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop the cached may-choose-a-kernel answers, so that no test depends on which class an earlier one asked."""
    for cls in (*STOCK_CLASSES.values(), *PRUNED_CAUSAL_LMS.values()):
        monkeypatch.delattr(cls, "_can_set_experts_implementation_cached_value", raising=False)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of the batched/grouped kernels (the eager loop is the modules' own forward)."""
    calls = dict.fromkeys(KERNELS[1:], 0)
    for name in calls:
        kernel = ALL_EXPERTS_FUNCTIONS[name]

        def counting(*args: Any, _kernel: Any = kernel, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._local_mapping, name, counting)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_unequal_counts_run_every_stock_kernel_with_the_eager_results(family, kernel_calls):
    pruned = pruned_decoder(family)  # asked before the stock class: nothing cached to inherit
    stock = stock_decoder(family)
    assert experts_implementation(pruned) == experts_implementation(stock) == stock.config._experts_implementation
    assert pruned.config._experts_implementation == stock.config._experts_implementation  # the family's default

    expected = run_logits(pruned, "eager")
    assert kernel_calls == {"batched_mm": 0, "grouped_mm": 0}
    for kernel in KERNELS[1:]:
        actual = run_logits(pruned, kernel)
        assert experts_implementation(pruned) == kernel
        assert kernel_calls[kernel] == len(pruned.config.experts_per_layer())  # once per sparse layer: really ran
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_counts_match_the_stock_model_under_every_kernel(family):
    stock, pruned = stock_decoder(family), pruned_decoder(family, counts=None)
    pruned.load_state_dict(stock.state_dict(), strict=True)
    expected = run_logits(stock, "eager")
    for kernel in KERNELS:
        torch.testing.assert_close(run_logits(pruned, kernel), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run_logits(stock, kernel), expected, rtol=1e-4, atol=1e-5)


def test_a_reloaded_pruned_model_takes_the_kernel_requested_at_load(tmp_path):
    pruned_decoder("olmoe").save_pretrained(tmp_path)
    for kernel in KERNELS:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=kernel)
        assert type(reloaded).__name__ == "PrunedOlmoeForCausalLM" and experts_implementation(reloaded) == kernel


def test_switch_models_report_their_eager_loop():
    from helpers import tiny_switch_model

    from uncurl_hf.modeling.pruned_switch_transformers import (
        PrunedSwitchTransformersConfig,
        PrunedSwitchTransformersForConditionalGeneration,
    )

    stock = tiny_switch_model(seed=0)
    derived = {"model_type", "transformers_version", "encoder_sparse_step", "decoder_sparse_step"}
    values = {k: v for k, v in stock.config.to_dict().items() if k not in derived}
    pruned = PrunedSwitchTransformersForConditionalGeneration(
        PrunedSwitchTransformersConfig(**values, num_experts_per_encoder_layer=[3, 8])
    )
    assert experts_implementation(stock) == experts_implementation(pruned) == "eager"
    assert type(pruned)._can_set_experts_implementation() is type(stock)._can_set_experts_implementation() is False


ORDER_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers
    from uncurl_hf.modeling import experts_implementation
    from uncurl_hf.modeling.pruned_decoder_moe import PRUNED_CAUSAL_LMS, PRUNED_CONFIGS

    order, families = sys.argv[1], json.loads(sys.argv[2])
    report = {}
    for family, (stock_name, values, counts) in families.items():
        stock_class, pruned_class = getattr(transformers, stock_name), PRUNED_CAUSAL_LMS[family]
        classes = [stock_class, pruned_class] if order == "stock-first" else [pruned_class, stock_class]
        answers = {cls.__name__: cls._can_set_experts_implementation() for cls in classes}
        stock = stock_class(stock_class.config_class(**values))
        pruned = pruned_class(PRUNED_CONFIGS[family](**values, num_experts_per_layer=counts))
        default = experts_implementation(pruned)
        pruned.set_experts_implementation("batched_mm")
        report[family] = {
            "stock_can_set": answers[stock_class.__name__], "pruned_can_set": answers[pruned_class.__name__],
            "stock_default": experts_implementation(stock), "pruned_default": default,
            "pruned_after_batched_mm": experts_implementation(pruned),
        }
    print(json.dumps(report))
    """
)


def test_kernel_support_does_not_depend_on_which_class_is_asked_first():
    families = {}
    for family in FAMILIES:
        values = tiny_values(family)
        layers = sparse_layer_indices(STOCK_CLASSES[family].config_class(**values))
        families[family] = (STOCK_CLASSES[family].__name__, values, UNEQUAL[: len(layers)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    reports = {}
    for order in ("stock-first", "pruned-first"):
        probe = subprocess.run(
            [sys.executable, "-c", ORDER_PROBE, order, json.dumps(families)],
            check=False, capture_output=True, text=True, timeout=300, env=env,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        reports[order] = json.loads(probe.stdout.strip().splitlines()[-1])
    assert reports["stock-first"] == reports["pruned-first"]
    for family, report in reports["pruned-first"].items():
        assert report["pruned_can_set"] is report["stock_can_set"] is True, family
        assert report["pruned_default"] == report["stock_default"], family
        assert report["pruned_after_batched_mm"] == "batched_mm", family


REMOTE_PROBE = textwrap.dedent(
    """
    import json, sys
    site_packages, folder = sys.argv[1:3]
    sys.path.append(site_packages)
    try:
        import uncurl_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("uncurl_hf is importable in the clean interpreter")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 9, 13, 7, 21, 3]])
    report = {"class": type(model).__name__, "module": type(model).__module__,
              "default": model.config._experts_implementation, "max_diff": {}}
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(input_ids=ids).logits
        for kernel in ("batched_mm", "grouped_mm"):
            model.set_experts_implementation(kernel)
            report[kernel] = model.config._experts_implementation
            report["max_diff"][kernel] = (model(input_ids=ids).logits - expected).abs().max().item()
    print(json.dumps(report))
    """
)


def test_remote_code_copy_offers_the_stock_kernels_without_uncurl(tmp_path):
    """The module file ``save_pretrained`` copies (``auto_map``) carries the kernel choice to machines without us."""
    pruned_decoder("qwen3_moe").save_pretrained(tmp_path / "out")
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c", REMOTE_PROBE, site.getsitepackages()[0], str(tmp_path / "out")],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["class"] == "PrunedQwen3MoeForCausalLM" and report["module"].startswith("transformers_modules")
    assert report["default"] == stock_decoder("qwen3_moe").config._experts_implementation
    assert report["batched_mm"] == "batched_mm" and report["grouped_mm"] == "grouped_mm"
    assert max(report["max_diff"].values()) < 1e-4
