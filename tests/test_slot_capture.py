"""Fused experts' per-slot outputs read off the model's own forward (uncurl_hf.calibration.slots).

The capture calls the experts module with every (token, slot) pair as its own top-1 row and rebuilds the module's
result from the per-slot outputs. That rebuilt result must be the module's own, bit for bit, for every decoder family,
both capturable kernels and float32 / bfloat16 (else calibration would see other hidden states than a plain
forward); the captured outputs must be each chosen expert's output; and calibration must get the same statistics as
when it re-runs the experts (the path kept for the eager kernel).
"""

from __future__ import annotations

import pytest
import torch

from test_families_decoder import FAMILIES, tiny_model
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.calibration.slots import SlotCapture, capturable
from uncurl_hf.families import get_family

IDS = torch.tensor([[5, 9, 13, 7, 22, 31, 2, 40], [11, 3, 8, 19, 27, 6, 44, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def _model(family_name: str, kernel: str, dtype: torch.dtype):
    model = tiny_model(family_name).to(dtype)
    model.set_experts_implementation(kernel)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_the_captured_forward_is_the_models_own_bit_for_bit(family_name, kernel, dtype):
    model = _model(family_name, kernel, dtype)
    family = get_family(model)
    expected = _logits(model)
    layers = family.sparse_layers(model)
    captures = [SlotCapture(family.fused_experts(layer)) for layer in layers]
    assert all(capturable(c.experts) for c in captures)
    handles = [h for c in captures for h in c.register()]
    inputs: dict[str, torch.Tensor] = {}
    handles += [
        layer.module.experts.register_forward_pre_hook(
            lambda m, args, name=layer.name: inputs.__setitem__(name, args[0][::m.config.num_experts_per_tok])
        )
        for layer in layers
    ]
    try:
        assert torch.equal(_logits(model), expected)
    finally:
        for handle in handles:
            handle.remove()
    for layer, capture in zip(layers, captures):
        ((index, outputs),) = capture.take()
        hidden = inputs[layer.name]
        assert outputs.shape == (*index.shape, hidden.shape[-1])
        for token in (0, 5, 11):
            for slot in range(index.shape[1]):
                direct = family.run_expert(layer, int(index[token, slot]), hidden[token : token + 1])[0]
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(outputs[token, slot].float(), direct.float(), rtol=tolerance,
                                           atol=tolerance)


def test_the_eager_kernel_is_not_captured():
    model = _model("qwen3_moe", "eager", torch.float32)
    family = get_family(model)
    assert not capturable(family.fused_experts(family.sparse_layers(model)[0]))
    switch_like = torch.nn.Linear(2, 2)
    assert not capturable(switch_like) and not capturable(None)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_calibration_reads_the_same_norms_as_re_running_the_experts(family_name, monkeypatch):
    """Counts and gate mass are identical; the norms agree to float32 rounding (other kernel, same arithmetic)."""
    from uncurl_hf.calibration.hooks import LayerCollector

    captured = _model(family_name, "grouped_mm", torch.float32)
    rerun = _model(family_name, "eager", torch.float32)
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    b = calibrate(rerun, get_family(rerun), batches, 64, 0, progress=False)

    def no_rerun(*args, **kwargs):
        raise AssertionError("the experts were run again although their outputs were captured")

    monkeypatch.setattr(LayerCollector, "_recomputed_norms", no_rerun)
    a = calibrate(captured, get_family(captured), batches, 64, 0, progress=False)
    for name in a.layers:
        sa, sb = a.layers[name], b.layers[name]
        assert torch.equal(sa.counts, sb.counts)
        torch.testing.assert_close(sa.gate_mass, sb.gate_mass, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sa.output_norm_sum, sb.output_norm_sum, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sa.weighted_output_norm_sum, sb.weighted_output_norm_sum, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sa.applied_output_norm_sum, sb.applied_output_norm_sum, rtol=1e-5, atol=1e-7)
