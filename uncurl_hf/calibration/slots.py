"""Every (token, slot) expert output of a fused experts module, read off the model's own forward.

Decoder MoEs in transformers 5 (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss) hold all experts of a layer in one module,
called as ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``; it returns only the gate-weighted
sum over the k slots, so the per-expert outputs that REAP and EAN need are never visible. Re-running every routed
expert to get them doubled the experts' cost of calibration (2.2x a plain forward on the shipped 64-expert top-8
decoder).

:class:`SlotCapture` instead hooks the experts module so that it is called with every (token, slot) pair as its
own row of top-1 routing with weight 1: ``experts(repeat(hidden, k) [N*k, H], index [N*k, 1], ones [N*k, 1])``,
which returns each slot's unweighted expert output. The hook keeps those outputs and returns what the module would
have returned, ``(outputs * weights).view(N, k, H).sum(1).to(dtype)``. For the ``grouped_mm`` and ``batched_mm``
experts implementations (the stock default on CPU and GPU) this is bit for bit the module's own result: both
compute each row's expert output independently of the others, in the same grouping and order for the same expert
ids, then apply exactly that weighted sum (tests/test_slot_capture.py checks it for every family, both
implementations, float32 and bfloat16). Other implementations (``eager`` adds the experts' contributions in expert
order in the hidden dtype) are not captured: calibration re-runs the experts for them, as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EXACT_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


def capturable(experts: nn.Module | None) -> bool:
    """Whether ``experts``' forward is one whose result :class:`SlotCapture` reproduces exactly."""
    if experts is None or not hasattr(experts, "has_gate"):  # not a transformers @use_experts_implementation class
        return False
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) in EXACT_IMPLEMENTATIONS and not getattr(
        experts, "_is_expert_parallel", False
    )


class SlotCapture:
    """Hooks on one fused experts module: per call, the chosen experts ``[N, k]`` and their outputs ``[N, k, H]``."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._args: tuple[Any, ...] | None = None

    def register(self) -> list[Any]:
        return [
            self.experts.register_forward_pre_hook(self._expand),
            self.experts.register_forward_hook(self._combine),
        ]

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The calls since the last ``take`` (normally one per layer forward), and forget them."""
        calls, self.calls = self.calls, []
        return calls

    def _expand(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self._args = None
        if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
            return None
        hidden, index, weights = args[:3]
        if index.dim() != 2 or weights.shape != index.shape or hidden.shape[0] != index.shape[0]:
            return None
        self._args = args
        k = index.shape[1]
        return (hidden.repeat_interleave(k, dim=0), index.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1),
                *args[3:])

    def _combine(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        original, self._args = self._args, None
        if original is None or not isinstance(output, torch.Tensor):
            return None
        hidden, index, weights = original[:3]
        n, k = index.shape
        weighted = output * weights.reshape(-1).unsqueeze(-1)  # the implementations' own last two steps
        combined = weighted.view(n, k, -1).sum(dim=1).to(hidden.dtype)
        self.calls.append((index, output.view(n, k, -1)))
        return combined
