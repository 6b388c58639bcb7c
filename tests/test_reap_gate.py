"""REAP scores with the gate the model applies, for every decoder family (``norm_topk_prob`` true and false).

The ground truth is the model's own router module: transformers' top-k routers return the weights the experts'
outputs are scaled by (``router_scores``: renormalized top-k probabilities for Mixtral, gpt-oss and Qwen/OLMoE with
``norm_topk_prob``; the softmax probabilities otherwise). REAP's ``applied`` saliency must equal the mean over routed
tokens of that weight times the expert's output norm, recomputed here token by token; ``softmax`` keeps the softmax
probability whatever the model applies.
"""

from __future__ import annotations

import pytest
import torch

from test_families_decoder import tiny_model
from uncurl_hf.calibration.run import calibrate
from uncurl_hf.families import get_family
from uncurl_hf.methods.reap import reap_scores

CASES = [
    ("mixtral", {}),
    ("gpt_oss", {}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": True}),
    ("olmoe", {"norm_topk_prob": False}),
]
IDS = torch.tensor([[5, 9, 13, 7, 22, 31, 2, 40], [11, 3, 8, 19, 27, 6, 44, 12]])


def _direct(model, family) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (mean applied-gate * norm, mean softmax * norm) over routed tokens, from the router module."""
    inputs: dict[str, torch.Tensor] = {}
    layers = family.sparse_layers(model)
    handles = [
        layer.module.register_forward_pre_hook(lambda m, args, name=layer.name: inputs.__setitem__(name, args[0]))
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
        for handle in handles:
            handle.remove()
        out = {}
        for layer in layers:
            hidden = inputs[layer.name].reshape(-1, inputs[layer.name].shape[-1])
            logits, scores, chosen = layer.router(hidden)
            probs = torch.softmax(logits.float(), dim=-1)
            applied = torch.zeros(layer.num_experts, dtype=torch.float64)
            softmax = torch.zeros(layer.num_experts, dtype=torch.float64)
            counts = torch.zeros(layer.num_experts, dtype=torch.float64)
            for t in range(hidden.shape[0]):
                for slot in range(chosen.shape[1]):
                    e = int(chosen[t, slot])
                    norm = family.run_expert(layer, e, hidden[t : t + 1]).double().norm()
                    applied[e] += float(scores[t, slot]) * norm
                    softmax[e] += float(probs[t, e]) * norm
                    counts[e] += 1
            out[layer.name] = (applied / counts.clamp(min=1), softmax / counts.clamp(min=1))
    return out


@pytest.mark.parametrize("family_name, overrides", CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_reap_applied_gate_equals_the_routers_own_weights(family_name, overrides):
    model = tiny_model(family_name, **overrides)
    family = get_family(model)
    stats = calibrate(model, family, [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}], progress=False)
    direct = _direct(model, family)
    renormalizes = family_name in ("mixtral", "gpt_oss") or overrides.get("norm_topk_prob", False)
    for layer in family.sparse_layers(model):
        applied, softmax = direct[layer.name]
        assert layer.renormalized == renormalizes
        torch.testing.assert_close(reap_scores(stats[layer.name], "applied"), applied, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reap_scores(stats[layer.name], "softmax"), softmax, rtol=1e-5, atol=1e-6)
        if renormalizes:  # top-2 over 8 experts: the renormalized gate is larger than the softmax one
            used = stats[layer.name].counts > 0
            assert (applied[used] > softmax[used]).all()
