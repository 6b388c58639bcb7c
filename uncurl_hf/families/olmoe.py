"""OLMoE (``allenai/OLMoE-1B-7B-*``) and the pruned variant written by uncurl-hf.

Every decoder layer is sparse: ``model.layers.{i}.mlp`` with ``gate`` (``weight [E, H]``) and fused ``experts``
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). Routing: softmax over all experts, top-
``num_experts_per_tok``, renormalised only with ``norm_topk_prob`` (false in the released checkpoints: the gate
weights are then the softmax over all experts, so removing experts scales the surviving ones up slightly).
On disk: ``model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`` and ``mlp.gate.weight``.
"""

from __future__ import annotations

from uncurl_hf.families import register_family
from uncurl_hf.families._fused import FusedMoEFamily


@register_family
class OlmoeFamily(FusedMoEFamily):
    name = "olmoe"
    description = "OLMoE decoder-only (softmax top-k, norm_topk_prob; fused experts), and uncurl's pruned variant"
    model_types = ("olmoe", "pruned_olmoe")
    stock_model_type = "olmoe"
    stock_lm_class = "OlmoeForCausalLM"
