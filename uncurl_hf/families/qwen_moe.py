"""Qwen2-MoE and Qwen3-MoE (``Qwen/Qwen1.5-MoE-*``, ``Qwen/Qwen2-57B-A14B``, ``Qwen/Qwen3-30B-A3B`` ...).

A sparse layer is ``model.layers.{i}.mlp`` with ``gate`` (``weight [E, H]``) and fused ``experts``
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``I = moe_intermediate_size``). Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense and left alone. Qwen2-MoE adds a
``shared_expert`` (a dense MLP every token uses, scaled by ``sigmoid(shared_expert_gate)``): it is not routed, so it
is never pruned or merged and is copied through unchanged.

Routing: softmax over all experts (float32), top-``num_experts_per_tok``; the chosen probabilities are renormalised
only with ``norm_topk_prob`` (Qwen3 checkpoints: true; Qwen1.5/Qwen2-MoE: false, where removing experts — even
never-routed ones — changes the softmax denominator and so scales the surviving gate weights up slightly).
On disk: ``model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`` and ``mlp.gate.weight``.
"""

from __future__ import annotations

from uncurl_hf.families import register_family
from uncurl_hf.families._fused import FusedMoEFamily


@register_family
class Qwen2MoeFamily(FusedMoEFamily):
    name = "qwen2_moe"
    description = "Qwen2-MoE / Qwen1.5-MoE decoder-only (shared expert kept as is), and uncurl's pruned variant"
    model_types = ("qwen2_moe", "pruned_qwen2_moe")
    stock_model_type = "qwen2_moe"
    stock_lm_class = "Qwen2MoeForCausalLM"


@register_family
class Qwen3MoeFamily(FusedMoEFamily):
    name = "qwen3_moe"
    description = "Qwen3-MoE decoder-only (softmax top-k, norm_topk_prob), and uncurl's pruned variant"
    model_types = ("qwen3_moe", "pruned_qwen3_moe")
    stock_model_type = "qwen3_moe"
    stock_lm_class = "Qwen3MoeForCausalLM"
