"""What LoRA adapts, per model family: declared once here (:data:`DEFAULT_TARGETS`), overridable from the CLI.

A target is two peft lists: ``modules`` (``target_modules``: a regular expression peft matches with ``re.fullmatch``
against each full module name, or a list of name suffixes) and ``parameters`` (``target_parameters``: suffixes of
``nn.Parameter`` names, peft >= 0.17). Both are needed because the decoder families keep their experts *fused* in
transformers 5: ``mlp.experts.gate_up_proj`` is one ``[E, 2I, H]`` parameter (gpt-oss: ``[E, H, 2I]``) and
``down_proj`` one ``[E, H, I]``, with no ``nn.Linear`` per expert to wrap. peft's ``ParamWrapper`` gives each of the
E experts its own rank-r pair (``lora_A`` ``[r*E, in]``, ``lora_B`` ``[out, r*E]``), folds them into the parameter
during the forward (so the eager, ``batched_mm`` and ``grouped_mm`` expert kernels all see the adapted weights),
merges them with ``merge_and_unload`` and saves/loads them with the adapter (both checked by the tests).

The choices, and why:

* Attention ``q/k/v/o`` of every block: attention sees every token, and after pruning its inputs are the reduced
  layers' hidden states, which it has never seen.
* The surviving experts (Switch: each ``expert_i.wi``/``wo``; decoders: the fused ``gate_up_proj``/``down_proj``):
  they now receive the tokens of the removed experts.
* Routers and gates are never adapted, not even when a user's pattern names them (:func:`check_no_router`): their
  rows are what the pruning plan decided, and training them would move tokens between experts and undo the routing
  the plan was computed on. This includes Qwen2-MoE's ``shared_expert_gate`` (a per-token gate on the shared expert).
* Qwen2-MoE's shared expert (``mlp.shared_expert.{gate,up,down}_proj``) *is* adapted: it sits in the same MoE block,
  sees every token, and its output is added to the routed experts' output, so it is the one place in the block that
  can correct, for every token, what the removed experts used to add; its three matrices cost ``3 r (H + I_s)``
  parameters per layer. Dense feed-forward layers outside MoE blocks (Switch's dense blocks, Qwen's
  ``mlp_only_layers``) are not: pruning changed neither them nor the tokens they see directly.
* Expert biases (gpt-oss) and norms stay frozen: LoRA adapts matrices (``bias="none"``).

``--target-modules`` / ``--target-parameters`` replace the defaults as a whole: given either, exactly what is given
is adapted (so ``--target-modules REGEX`` alone adapts modules only).

peft receives the module targets resolved here to full module names (:func:`module_names`, peft's own matching
rules), never the regular expression: peft 0.21 rewrites a regex target of a transformers-5 MoE model (stock
Mixtral, Qwen3-MoE, OLMoE) into bare leaf names (its v4 -> v5 conversion), which would widen a pattern such as
``model.layers.0.self_attn.q_proj`` to every layer's ``q_proj``. :func:`~uncurl_hf.recover.lora.add_lora` then checks
that peft adapted exactly the names resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from uncurl_hf.errors import RecoveryError

_DECODER_ATTENTION = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_DECODER_TEXT = "attention `q/k/v/o` and the surviving experts' fused `gate_up_proj`/`down_proj` (rank r per expert)"


@dataclass(frozen=True)
class LoraTargets:
    """The modules and parameters LoRA adapts, and how a card names them."""

    modules: str | tuple[str, ...]  # peft target_modules: a regex over full module names, or name suffixes ("": none)
    parameters: tuple[str, ...] = ()  # peft target_parameters: suffixes of fused nn.Parameter names
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        modules = self.modules if isinstance(self.modules, str) else list(self.modules)
        return {"modules": modules, "parameters": list(self.parameters), "description": self.description}


# One entry per registered family (a test checks that none is missing).
DEFAULT_TARGETS: dict[str, LoraTargets] = {
    "switch_transformers": LoraTargets(
        r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)|.*\.mlp\.experts\.expert_\d+\.(wi|wo)",
        description="attention `q/k/v/o` (self and cross) and the surviving experts' `wi`/`wo`",
    ),
    "mixtral": LoraTargets(_DECODER_ATTENTION, _FUSED_EXPERTS, _DECODER_TEXT),
    "qwen3_moe": LoraTargets(_DECODER_ATTENTION, _FUSED_EXPERTS, _DECODER_TEXT),
    "olmoe": LoraTargets(_DECODER_ATTENTION, _FUSED_EXPERTS, _DECODER_TEXT),
    "gpt_oss": LoraTargets(_DECODER_ATTENTION, _FUSED_EXPERTS, _DECODER_TEXT),
    "qwen2_moe": LoraTargets(
        _DECODER_ATTENTION + r"|.*\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)",
        _FUSED_EXPERTS,
        _DECODER_TEXT + ", and the shared expert's `gate_proj`/`up_proj`/`down_proj`",
    ),
}

# Module names (last component) that gate tokens and are frozen whatever the user's pattern says, besides each
# sparse layer's router (which the family names).
_GATE_NAMES = ("shared_expert_gate",)


def split_names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"a,b"`` (the CLI's text) or a sequence -> ``("a", "b")``; ``None`` -> ``()``."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(item.strip() for item in items if item.strip())


def resolve_targets(family_name: str, target_modules: Any = None, target_parameters: Any = None) -> LoraTargets:
    """The family's default targets, or exactly the user's (either flag given replaces both defaults)."""
    if target_modules is None and target_parameters is None:
        try:
            return DEFAULT_TARGETS[family_name]
        except KeyError:
            raise RecoveryError(
                f"uncurl recover has no default LoRA targets for the {family_name!r} family; name them with "
                "--target-modules REGEX (module names) and/or --target-parameters NAME,... (fused parameters)."
            ) from None
    modules: str | tuple[str, ...] = (
        target_modules if isinstance(target_modules, str) else split_names(target_modules)
    )
    parameters = split_names(target_parameters)
    shown = [f"`{modules if isinstance(modules, str) else ','.join(modules)}`"] if modules else []
    shown += [f"parameters `{','.join(parameters)}`"] if parameters else []
    return LoraTargets(modules, parameters, " and ".join(shown))


def module_names(model: Any, modules: str | tuple[str, ...]) -> list[str]:
    """Sorted full names of the modules of ``model`` that ``modules`` targets, matched as peft matches them: a string
    is a regular expression that must match the whole name (``re.fullmatch``); a sequence lists names or suffixes
    (``name == t`` or ``name.endswith("." + t)``)."""
    if not modules:
        return []
    if isinstance(modules, str):
        try:
            pattern = re.compile(modules)
        except re.error as exc:
            raise RecoveryError(f"--target-modules {modules!r} is not a regular expression ({exc}).") from None
        return sorted(name for name, _ in model.named_modules() if name and pattern.fullmatch(name))
    return sorted(
        name for name, _ in model.named_modules()
        if name and any(name == t or name.endswith("." + t) for t in modules)
    )


def parameter_names(model: Any, parameters: tuple[str, ...]) -> dict[str, list[str]]:
    """``{suffix: sorted full names}`` of the parameters each ``parameters`` entry targets, as peft matches them
    (``name == t`` or ``name.endswith("." + t)``)."""
    names = [name for name, _ in model.named_parameters()]
    return {t: sorted(n for n in names if n == t or n.endswith("." + t)) for t in parameters}


def task_type_of(family: Any) -> str:
    """peft's task type for the family's Auto class: ``CAUSAL_LM`` for decoders, ``SEQ_2_SEQ_LM`` for encoder-decoders.

    It decides the ``PeftModel`` subclass (its ``forward``/``generate`` signatures) and is written to
    ``adapter_config.json``, so ``PeftModel.from_pretrained`` rebuilds the same wrapper.
    """
    kind = family.auto_model_class().__name__
    if kind == "AutoModelForCausalLM":
        return "CAUSAL_LM"
    if kind == "AutoModelForSeq2SeqLM":
        return "SEQ_2_SEQ_LM"
    raise RecoveryError(
        f"uncurl recover trains causal and encoder-decoder LMs; the {family.name} family loads with {kind}."
    )


def router_names(model: Any, family: Any) -> set[str]:
    """Full names of the modules that route tokens: every sparse layer's router, plus the gates of
    :data:`_GATE_NAMES` (e.g. Qwen2-MoE's ``shared_expert_gate``)."""
    routers = {id(layer.router) for layer in family.sparse_layers(model)}
    return {
        name for name, module in model.named_modules()
        if id(module) in routers or name.rpartition(".")[2] in _GATE_NAMES
    }


def check_no_router(adapted: list[str], routers: set[str]) -> None:
    """Refuse targets that would adapt a router or gate (``adapted``: module or parameter names peft wrapped)."""
    hit = sorted(
        name for name in adapted
        if any(name == r or name.startswith(r + ".") for r in routers)
    )
    if hit:
        raise RecoveryError(
            f"The LoRA targets include router/gate weights ({', '.join(hit[:3])}{', ...' if len(hit) > 3 else ''}); "
            "routers are never adapted: their rows are what the pruning plan decided, and training them would undo "
            "the routing the plan was computed on. Narrow --target-modules / --target-parameters."
        )


__all__ = [
    "DEFAULT_TARGETS",
    "LoraTargets",
    "check_no_router",
    "module_names",
    "parameter_names",
    "resolve_targets",
    "router_names",
    "split_names",
    "task_type_of",
]
