"""gpt-oss (``openai/gpt-oss-*``, dequantized) and the pruned variant written by uncurl-hf.

Every decoder layer is sparse: ``model.layers.{i}.mlp`` holds ``router`` (``weight [E, H]`` *and* ``bias [E]``) and
fused ``experts`` stored transposed with gate and up *interleaved* and with biases: ``gate_up_proj [E, H, 2I]``
(column ``2n`` is gate neuron ``n``, column ``2n + 1`` up neuron ``n``), ``gate_up_proj_bias [E, 2I]``,
``down_proj [E, I, H]``, ``down_proj_bias [E, H]``; the activation is the clamped ``(up + 1) * gate *
sigmoid(alpha * gate)``. One expert is exchanged as ``{"gate": [I, H], "up": [I, H], "down": [H, I], "gate_bias": [I],
"up_bias": [I], "down_bias": [H]}``: hidden neurons on axis 0 of gate/up and their biases and axis 1 of down;
``down_bias`` has no neuron axis (it is averaged, never permuted).

Routing: top-``num_experts_per_tok`` of the raw logits (bias included), then a softmax over the chosen logits only,
so removing experts a token never picks leaves its output unchanged. The probabilities reported for gate-mass
statistics are the softmax over all experts (same order as the logits).

On disk, transformers 5.24 has no conversion for gpt-oss: ``save_pretrained`` writes the fused in-memory tensors.
The released checkpoints store MXFP4 blocks/scales; prune them after loading dequantized (``Mxfp4Config(dequantize=
True)``): out-of-core surgery refuses quantized tensors, and the reduced checkpoint is written dequantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from uncurl_hf.families import register_family
from uncurl_hf.families._fused import FusedMoEFamily


@register_family
class GptOssFamily(FusedMoEFamily):
    name = "gpt_oss"
    description = "gpt-oss decoder-only (top-k of biased logits, then softmax; interleaved fused experts with biases)"

    model_types = ("gpt_oss", "pruned_gpt_oss")
    stock_model_type = "gpt_oss"
    stock_lm_class = "GptOssForCausalLM"
    router_attr = "router"
    disk_blocks = ("mlp",)
    disk_expert_names = None
    fused_params = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    router_params = ("weight", "bias")
    neuron_axes: ClassVar[dict[str, int]] = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}
    output_keys: ClassVar[tuple[str, ...]] = ("down", "down_bias")

    def routing(self, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's choice is the top-k of the logits themselves (softmax only over the chosen ones)."""
        logits = logits.float()
        return torch.softmax(logits, dim=-1), logits.topk(top_k, dim=-1).indices

    def expert_forward(self, experts: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Like ``GptOssExperts.forward`` for one expert: biased gate_up, clamped GLU, biased down."""
        gate_up_proj = experts.gate_up_proj[index]
        gate_up = hidden.to(gate_up_proj.dtype) @ gate_up_proj + experts.gate_up_proj_bias[index]
        return experts._apply_gate(gate_up) @ experts.down_proj[index] + experts.down_proj_bias[index]

    def unfuse(self, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gate_up, bias = rows["gate_up_proj"], rows["gate_up_proj_bias"]
        return {
            "gate": gate_up[:, ::2].T,
            "up": gate_up[:, 1::2].T,
            "down": rows["down_proj"].T,
            "gate_bias": bias[::2],
            "up_bias": bias[1::2],
            "down_bias": rows["down_proj_bias"],
        }

    def fuse(self, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            # [..., n] and [..., n] -> [..., 2n] ordered gate_0, up_0, gate_1, up_1, ...
            return torch.stack([gate, up], dim=-1).flatten(-2)

        return {
            "gate_up_proj": torch.stack([interleave(e["gate"].T, e["up"].T) for e in experts]).contiguous(),
            "gate_up_proj_bias": torch.stack([interleave(e["gate_bias"], e["up_bias"]) for e in experts]).contiguous(),
            "down_proj": torch.stack([e["down"].T for e in experts]).contiguous(),
            "down_proj_bias": torch.stack([e["down_bias"] for e in experts]).contiguous(),
        }

    def renormalizes(self, router: Any) -> bool:
        """gpt-oss applies a softmax over the chosen logits only, i.e. the renormalized top-k probabilities."""
        return True
