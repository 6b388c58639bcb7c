"""Calibration statistics: padding never counts, token totals, decoder-side counting, bounded seeded samples; any
model device and dtype (batches go where the input embeddings run, statistics are CPU float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CALIBRATION_TARGETS, CALIBRATION_TEXTS, VOCAB, tiny_switch_model, tiny_tokenizer
from transformers import AutoTokenizer

from uncurl_hf import build_batches, calibrate, load_model
from uncurl_hf.calibration import run
from uncurl_hf.families.devices import input_device
from uncurl_hf.evaluation.tasks import Example
from uncurl_hf.families import get_family

EXAMPLES = [Example(s, t) for s, t in zip(CALIBRATION_TEXTS, CALIBRATION_TARGETS)]


@pytest.fixture(scope="module")
def model_and_tokenizer(switch_dir):
    return load_model(switch_dir), AutoTokenizer.from_pretrained(switch_dir)


def pad_more(batch: dict, extra: int) -> dict:
    """Append ``extra`` padding positions to every sequence (encoder and decoder side)."""
    def grow(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)

    return {
        "input_ids": grow(batch["input_ids"], 0),
        "attention_mask": grow(batch["attention_mask"], 0),
        "labels": grow(batch["labels"], -100),
        "decoder_attention_mask": grow(batch["decoder_attention_mask"], 0),
    }


def test_counts_sum_to_real_tokens_on_both_sides(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = build_batches(EXAMPLES, tokenizer, batch_size=5, max_length=32)
    stats = calibrate(model, get_family(model), batches, progress=False)
    encoder_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    decoder_tokens = sum(int(b["decoder_attention_mask"].sum()) for b in batches)
    assert decoder_tokens == 2 * len(EXAMPLES)  # one label word + </s> per example
    assert stats.num_sequences == len(EXAMPLES)
    for name, layer in stats.items():
        expected = decoder_tokens if name.startswith("decoder") else encoder_tokens
        assert layer.num_tokens == expected
        assert int(layer.counts.sum()) == expected
        torch.testing.assert_close(layer.gate_mass.sum().item(), float(expected), rtol=1e-6, atol=1e-6)
        assert layer.logit_sample.shape == (expected, 8)
        assert layer.hidden_sample.shape == (expected, model.config.d_model)
        used = layer.counts > 0
        assert (layer.output_norm_sum[used] > 0).all() and (layer.output_norm_sum[~used] == 0).all()
        assert (layer.weighted_output_norm_sum <= layer.output_norm_sum + 1e-9).all()


def test_padding_never_counts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    family = get_family(model)
    unpadded = calibrate(model, family, build_batches(EXAMPLES, tokenizer, batch_size=1), progress=False)
    padded_batches = [pad_more(b, 7) for b in build_batches(EXAMPLES, tokenizer, batch_size=6)]
    padded = calibrate(model, family, padded_batches, progress=False)
    for name in unpadded:
        assert torch.equal(unpadded[name].counts, padded[name].counts), name
        assert unpadded[name].num_tokens == padded[name].num_tokens
        torch.testing.assert_close(unpadded[name].gate_mass, padded[name].gate_mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unpadded[name].output_norm_sum, padded[name].output_norm_sum, rtol=1e-4, atol=1e-4)


def test_sample_is_bounded_and_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    family = get_family(model)
    batches = build_batches(EXAMPLES, tokenizer, batch_size=4)
    a = calibrate(model, family, batches, max_logit_samples=10, seed=3, progress=False)
    b = calibrate(model, family, batches, max_logit_samples=10, seed=3, progress=False)
    c = calibrate(model, family, batches, max_logit_samples=10, seed=4, progress=False)
    layer = "encoder.block.1"
    assert a[layer].logit_sample.shape == (10, 8) and a[layer].hidden_sample.shape == (10, 32)
    assert torch.equal(a[layer].logit_sample, b[layer].logit_sample)
    assert not torch.equal(a[layer].logit_sample, c[layer].logit_sample)
    # the sampled logits belong to the sampled hidden states
    recomputed = family.router_logits(family.sparse_layers(model)[0], a[layer].hidden_sample)
    torch.testing.assert_close(recomputed, a[layer].logit_sample)


def test_sources_without_targets_feed_only_the_start_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = build_batches([Example(e.source) for e in EXAMPLES], tokenizer, batch_size=4)
    assert "labels" not in batches[0]
    stats = calibrate(model, get_family(model), batches, progress=False)
    assert stats["decoder.block.1"].num_tokens == len(EXAMPLES)


# ---- device and dtype ----------------------------------------------------------------------------------------------
# No GPU here: what is checked on the CPU is that nothing assumes it — the batch device is derived from the model
# (accelerate's execution device included), and bf16/fp16 models give CPU float64 statistics with the fp32 counts.

SUMS = ("gate_mass", "output_norm_sum", "weighted_output_norm_sum")


def tiny_qwen3_moe(seed: int = 0):
    """A random-init stock Qwen3-MoE causal LM (2 sparse layers, 8 experts, top-2) over the tiny tokenizer's vocab."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=12, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def decisive(model):
    """Routing by token parity with wide margins: coordinate 0 of every input embedding is +10 (even ids) or -10
    (odd ids), and every router reads that coordinate only (expert ``e``'s row is ``(E/2 - e - 1/2) * e_0``), so even
    tokens go to the first experts and odd ones to the last, with logit margins of about 4: far above what bf16 or
    fp16 rounding moves."""
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = torch.where(torch.arange(embeddings.shape[0]) % 2 == 0, 10.0, -10.0)
        for layer in get_family(model).sparse_layers(model):
            weight = layer.router.weight
            experts = weight.shape[0]
            weight.zero_()
            weight[:, 0] = experts / 2 - torch.arange(experts, dtype=weight.dtype) - 0.5
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["switch", "qwen3_moe"])
def test_half_precision_models_give_the_fp32_counts_as_cpu_float64(kind, dtype):
    model = decisive(tiny_switch_model(seed=2) if kind == "switch" else tiny_qwen3_moe(seed=2))
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=5, max_length=16)
    full = calibrate(model, get_family(model), batches, progress=False)
    half_model = copy.deepcopy(model).to(dtype)
    half = calibrate(half_model, get_family(half_model), batches, progress=False)
    assert next(half_model.parameters()).dtype == dtype  # the model is left as it was
    assert list(half) == list(full) and half.num_sequences == full.num_sequences
    for name, stats in half.items():
        reference = full[name]
        assert int((reference.counts > 0).sum()) >= 2 * reference.top_k  # routing depends on the token
        assert stats.num_tokens == reference.num_tokens and torch.equal(stats.counts, reference.counts), name
        assert torch.equal(stats.sample_tokens, reference.sample_tokens)  # sampling keys depend on the data only
        for field in SUMS:
            value = getattr(stats, field)
            assert value.dtype == torch.float64 and value.device.type == "cpu", (name, field)
        torch.testing.assert_close(stats.gate_mass, reference.gate_mass, rtol=1e-2, atol=1e-2)
        for sample in (stats.logit_sample, stats.hidden_sample):
            assert sample.dtype == torch.float32 and sample.device.type == "cpu"
        torch.testing.assert_close(stats.logit_sample, reference.logit_sample, rtol=0.05, atol=0.1)


def test_input_device_is_where_the_embeddings_run():
    """The embeddings' device; an accelerate hook's execution device when there is one (the innermost on the way
    down to the embeddings wins); meta (offloaded) weights are skipped. The hooks below are only set, not
    attached, so that no CUDA device is touched."""
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    model = tiny_qwen3_moe()
    assert input_device(model) == torch.device("cpu")
    embeddings = model.get_input_embeddings()
    model.model._hf_hook = SequentialHook(AlignDevicesHook(execution_device=torch.device("cuda", 0)))
    assert input_device(model) == torch.device("cuda", 0)
    embeddings._hf_hook = AlignDevicesHook(execution_device="cuda:1")
    assert input_device(model) == torch.device("cuda", 1)
    offloaded = cpu_offload(tiny_qwen3_moe(), execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert input_device(offloaded) == torch.device("cpu")


@pytest.mark.parametrize("stream", [False, True])
def test_every_batch_goes_to_the_device_derived_from_the_model(monkeypatch, stream):
    """The embeddings say they run on cuda:1 (a hook set, not attached): every batch is sent there, for lists and
    streams alike. (The spy then hands the forward CPU tensors, as no GPU is here.)"""
    from accelerate.hooks import AlignDevicesHook

    model = decisive(tiny_qwen3_moe())
    model.get_input_embeddings()._hf_hook = AlignDevicesHook(execution_device="cuda:1")
    sent: list[torch.device] = []
    on_device = run._on_device

    def spy(inputs, device):
        sent.append(device)
        return on_device(inputs, torch.device("cpu"))

    monkeypatch.setattr(run, "_on_device", spy)
    import uncurl_hf.families.devices as devices  # the families' forward_inputs follow it too: keep their tensors here

    monkeypatch.setattr(devices, "input_device", lambda model: torch.device("cpu"))
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=5, max_length=16)
    calibrate(model, get_family(model), iter(batches) if stream else batches, progress=False)
    assert sent == [torch.device("cuda", 1)] * len(batches)


def test_a_model_with_accelerate_hooks_calibrates_like_the_plain_model():
    """accelerate hooks (as ``dispatch_model`` with a device_map places them) on the embeddings and every block:
    batches go to their execution device and the statistics equal the plain model's, bit for bit."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = decisive(tiny_qwen3_moe(seed=1))
    hooked = copy.deepcopy(model)
    for module in (hooked.model.embed_tokens, *hooked.model.layers, hooked.model.norm, hooked.lm_head):
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    batches = build_batches(EXAMPLES, tiny_tokenizer(), batch_size=4, max_length=16)
    plain = calibrate(model, get_family(model), batches, max_logit_samples=20, progress=False)
    dispatched = calibrate(hooked, get_family(hooked), batches, max_logit_samples=20, progress=False)
    for name, stats in plain.items():
        for field in ("counts", *SUMS, "logit_sample", "hidden_sample", "sample_tokens"):
            assert torch.equal(getattr(dispatched[name], field), getattr(stats, field)), (name, field)
