"""What uncurl-hf needs to know about one sparse MoE architecture, behind one small interface.

Calibration, methods and weight surgery only talk to a :class:`MoEFamily` and to :class:`MoELayer` records, so a
new architecture (Mixtral, Qwen-MoE, OLMoE, ...) is one new file implementing this class plus one registry line.
Expert weights are exchanged as plain ``dict[str, Tensor]`` per expert (``{"wi": [d_ff, d_model], ...}``) with
:attr:`MoEFamily.neuron_axes` telling merge methods which axis of each tensor indexes the expert's hidden neurons
(needed to permute/align neurons before averaging).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping, MutableMapping, Protocol

import torch
from torch import nn


@dataclass
class MoELayer:
    """One sparse MoE layer of a loaded model.

    ``name`` is stable across runs and across pruning (``encoder.block.1``): plans and stats are keyed by it.
    ``prefix`` is the module path used in state-dict keys. ``mask_key`` names the batch entry whose attention
    mask tells real tokens from padding for this layer (encoder vs decoder side). ``renormalized`` says whether the
    gate the model applies to an expert's output is its top-k probability renormalized over the token's chosen
    experts (Mixtral, gpt-oss, Qwen/OLMoE with ``norm_topk_prob``) rather than its softmax over all experts.
    """

    name: str
    prefix: str
    module: nn.Module
    router: nn.Linear
    experts: list[nn.Module]
    top_k: int = 1
    mask_key: str = "attention_mask"
    renormalized: bool = False
    # a logical merge (router rule "map"): the router has one row per original expert, row e runs expert_map[e]
    expert_map: list[int] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def per_router_row(self) -> "MoELayer":
        """This layer with one expert per router row (row ``e`` runs ``experts[expert_map[e]]``): how calibration and
        the Space see a logical merge, whose routing statistics are over the original experts. Itself otherwise."""
        if self.expert_map is None:
            return self
        return replace(self, experts=[self.experts[m] for m in self.expert_map], expert_map=None)


@dataclass
class ReducedLayer:
    """The new content of one layer after a plan is applied: one tensor dict per output expert + router rows.

    ``expert_map`` (the ``"map"`` router rule, a *logical merge*): ``router`` keeps one row per original expert and
    ``expert_map[e]`` is the output expert that original expert ``e``'s tokens go to; ``None`` means one router row
    per output expert.
    """

    experts: list[dict[str, torch.Tensor]]
    router: dict[str, torch.Tensor]
    expert_capacity: int | None = None
    expert_map: list[int] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class DiskLayer:
    """One sparse layer as stored in a checkpoint's safetensors files (no model needed: config + tensor keys).

    ``name`` equals the in-memory :attr:`MoELayer.name`, so plans made on a loaded model apply to files. ``keys``
    are every stored tensor the layer owns (experts and router): out-of-core surgery replaces exactly these with
    :meth:`MoEFamily.write_disk_layer`'s output and copies every other tensor through unchanged.
    ``expert_capacity`` is the per-expert token capacity the config gives the layer (what
    :meth:`MoEFamily.expert_capacity` returns for the loaded layer; ``None`` for families without one).
    """

    name: str
    num_experts: int
    keys: frozenset[str]
    top_k: int = 1
    expert_capacity: int | None = None


class TensorReader(Protocol):
    """Lazy access to the tensors of a checkpoint (e.g. over ``safetensors.safe_open``): nothing is read until asked."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> torch.Tensor:
        """The whole stored tensor."""

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` (first axis), reading only that slice from disk (fused ``[E, ...]`` expert tensors)."""


class MoEFamily(ABC):
    """Adapter between uncurl-hf and one family of sparse MoE models (upstream and pruned variants)."""

    name: ClassVar[str]
    description: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    neuron_axes: ClassVar[dict[str, int]]
    # Expert tensors that the expert's output is linear in (its output projection, and that projection's bias):
    # scaling them by ``s`` scales the expert's output by exactly ``s`` (a plan's ``extras["output_scales"]``).
    output_keys: ClassVar[tuple[str, ...]] = ()

    def matches(self, config: Any) -> bool:
        """True if ``config`` (a ``PretrainedConfig``, a model, or a ``config.json`` dict) belongs to this family."""
        return model_type_of(config) in self.model_types

    @abstractmethod
    def auto_model_class(self) -> type:
        """The ``transformers`` Auto class that loads checkpoints of this family."""

    def is_causal_lm(self) -> bool:
        """Whether checkpoints of this family are decoder-only LMs: a task is put to them as its prompt."""
        return self.auto_model_class().__name__ == "AutoModelForCausalLM"

    @abstractmethod
    def sparse_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every sparse MoE layer of ``model``, in a stable order."""

    @abstractmethod
    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., E]`` (float32) for hidden states entering the sparse layer."""

    def routing(self, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [N, E], selected [N, k])``: softmax probabilities and the experts the model would pick."""
        probs = torch.softmax(logits.float(), dim=-1)
        return probs, probs.topk(top_k, dim=-1).indices

    def run_expert(self, layer: MoELayer, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Output of expert ``index`` alone (no gate scaling) on ``hidden [N, D]``."""
        return layer.experts[index](hidden)

    def run_expert_tensors(
        self, layer: MoELayer, tensors: Mapping[str, torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Output (no gate scaling) of an expert of ``layer``'s architecture holding ``tensors`` (keyed like
        :attr:`neuron_axes`, e.g. a merge result) on ``hidden [N, D]``: what a reduced layer's expert computes."""
        raise NotImplementedError(f"{self.name} cannot run an expert from tensors")

    def expert_input(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (e.g. a float32 calibration sample on the CPU) on the layer's device in its experts' dtype: what
        :meth:`run_expert` and :meth:`run_expert_tensors` are fed."""
        dtype = next(iter(self.expert_tensors(layer, 0).values())).dtype
        return hidden.to(device=layer.router.weight.device, dtype=dtype)

    def fused_experts(self, layer: MoELayer) -> nn.Module | None:
        """The one module computing all of the layer's experts (``experts(hidden, top_k_index, top_k_weights)``),
        or ``None`` when each expert is its own module (Switch): calibration reads expert outputs off it."""
        return None

    @abstractmethod
    def expert_tensors(self, layer: MoELayer, index: int) -> dict[str, torch.Tensor]:
        """The weights of one expert, keyed like :attr:`neuron_axes` (detached views, not copies)."""

    @abstractmethod
    def router_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        """Router parameters whose first axis indexes experts (``weight [E, D]``, optional ``bias [E]``)."""

    @abstractmethod
    def build_reduced_model(
        self, model: nn.Module, layers: MutableMapping[str, ReducedLayer], base_model: str | None = None,
        consume: bool = False, share: bool = False,
    ) -> nn.Module:
        """A new model equal to ``model`` except that each named layer holds the given experts and router.

        ``consume``: pop each layer from ``layers`` once its tensors are in the new model's layout, so a family that
        repacks them (fused ``[E, ...]`` experts) holds one layer twice, not the whole reduced model.
        ``share``: every tensor not replaced is the input's own storage, not a copy (a transient model that only
        runs forward passes, such as sequential planning's intermediate models; an output must not share).
        """

    def expert_capacity(self, layer: MoELayer) -> int | None:
        """Per-expert token capacity of the layer, if the architecture has one."""
        return None

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a calibration batch; every ``*attention_mask`` entry marks real tokens."""
        device = _device_of(model)
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        return {"input_ids": input_ids, "attention_mask": mask}

    def dummy_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A tiny deterministic batch used to check that a written checkpoint reproduces the model."""
        vocab = int(getattr(model.config, "vocab_size", 32))
        ids = (torch.arange(12).reshape(2, 6) * 7 + 3) % max(vocab, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def layer_sizes(self, model: nn.Module) -> dict[str, int]:
        """``{layer name: num_experts}`` for every sparse layer."""
        return {layer.name: layer.num_experts for layer in self.sparse_layers(model)}

    # ---- the on-disk view, for out-of-core surgery (uncurl_hf/surgery/streaming.py) -----------------------------------
    # A family that implements these five methods can be pruned without ever holding the model in memory: the
    # streaming writer reads one layer's expert tensors at a time, merges them exactly like apply.py does, and
    # writes the layer's new tensors in the same on-disk layout the family's loader expects.

    def disk_layers(self, config: Mapping[str, Any], keys: list[str]) -> list[DiskLayer]:
        """Every sparse layer of a stored checkpoint (``config.json`` dict + all tensor keys), in model order."""
        raise NotImplementedError(f"{self.name} does not support out-of-core (streaming) surgery yet")

    def read_disk_expert(self, layer: DiskLayer, index: int, reader: TensorReader) -> dict[str, torch.Tensor]:
        """Expert ``index``'s weights, keyed and shaped exactly like :meth:`expert_tensors` returns them."""
        raise NotImplementedError(f"{self.name} does not support out-of-core (streaming) surgery yet")

    def read_disk_router(self, layer: DiskLayer, reader: TensorReader) -> dict[str, torch.Tensor]:
        """Router tensors, keyed and shaped exactly like :meth:`router_tensors` returns them."""
        raise NotImplementedError(f"{self.name} does not support out-of-core (streaming) surgery yet")

    def write_disk_layer(self, layer: DiskLayer, reduced: ReducedLayer) -> dict[str, torch.Tensor]:
        """``{stored key: tensor}`` for the reduced layer, in the layout the family's loader reads."""
        raise NotImplementedError(f"{self.name} does not support out-of-core (streaming) surgery yet")

    def reduced_config_dict(
        self,
        config: Mapping[str, Any],
        layers: Mapping[str, ReducedLayer | int],
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """The ``config.json`` dict of the reduced checkpoint (new per-layer counts; model_type/auto_map updated)."""
        raise NotImplementedError(f"{self.name} does not support out-of-core (streaming) surgery yet")


def model_type_of(obj: Any) -> str | None:
    """``model_type`` of a config, a model, a config dict, or a checkpoint folder holding ``config.json``."""
    if isinstance(obj, (str, Path)):
        import json

        try:
            obj = json.loads((Path(obj) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if isinstance(obj, Mapping):
        value = obj.get("model_type")
        return value if isinstance(value, str) else None
    config = getattr(obj, "config", obj)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def _device_of(model: nn.Module) -> torch.device:
    from uncurl_hf.families.devices import input_device

    return input_device(model)
