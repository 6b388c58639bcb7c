"""Mixtral (``mistralai/Mixtral-*``) and the pruned variant written by uncurl-hf.

Every decoder layer is sparse: ``model.layers.{i}.mlp`` holds ``gate`` (``MixtralTopKRouter``, ``weight [E, H]``)
and fused ``experts`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, SiLU GLU). Routing: softmax over the
``num_local_experts`` logits, top-``num_experts_per_tok``, and the chosen probabilities renormalised to sum to 1 —
so removing experts a token never picks leaves its output unchanged. On disk (what ``save_pretrained`` writes and Hub
checkpoints hold): ``model.layers.{i}.block_sparse_moe.gate.weight`` and
``model.layers.{i}.block_sparse_moe.experts.{j}.{w1,w3,w2}.weight`` (gate, up, down). See ``_fused.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from uncurl_hf.families import register_family
from uncurl_hf.families._fused import FusedMoEFamily


@register_family
class MixtralFamily(FusedMoEFamily):
    name = "mixtral"
    description = "Mixtral decoder-only (softmax, top-k renormalised; fused experts), and uncurl's pruned variant"
    model_types = ("mixtral", "pruned_mixtral")
    stock_model_type = "mixtral"
    stock_lm_class = "MixtralForCausalLM"
    disk_blocks = ("block_sparse_moe", "mlp")
    disk_expert_names: ClassVar[dict[str, str] | None] = {"gate": "w1", "up": "w3", "down": "w2"}

    def renormalizes(self, router: Any) -> bool:
        """Mixtral always renormalizes its top-k probabilities."""
        return True
