"""LoRA adapters (PEFT) on a pruned model: the optional ``peft`` import, wrapping, counting trainable parameters.

What is adapted is decided in :mod:`uncurl_hf.recover.targets` (per family); this module applies it and refuses
what cannot be trained as asked.

The adapters start as an exact no-op (``lora_B = 0``), so the wrapped model computes what the pruned model computed
until the first training step; ``lora_A``'s random init is seeded from :attr:`RecoverConfig.seed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from uncurl_hf.errors import RecoveryError
from uncurl_hf.recover.config import RecoverConfig
from uncurl_hf.recover.targets import (
    LoraTargets,
    check_no_router,
    module_names,
    parameter_names,
    resolve_targets,
    router_names,
    task_type_of,
)

INSTALL_HINT = "pip install 'uncurl-hf[recover]'"


def require_peft() -> Any:
    """The ``peft`` module, or a :class:`RecoveryError` naming the install command."""
    try:
        import peft
    except ImportError as exc:
        raise RecoveryError(
            f"`uncurl recover` trains LoRA adapters with the peft library, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return peft


def add_lora(model: nn.Module, config: RecoverConfig, targets: LoraTargets | None = None) -> Any:
    """Wrap ``model`` in a PEFT LoRA model: base weights frozen, adapters seeded (``lora_A`` random, ``lora_B`` 0).

    The wrapped model computes exactly what ``model`` computed until the first step (``B = 0``). ``targets``
    default to the family's (:func:`~uncurl_hf.recover.targets.resolve_targets` of ``config``); the peft task type
    (``CAUSAL_LM`` / ``SEQ_2_SEQ_LM``) is the family's. Refused with a :class:`RecoveryError`: targets that match
    nothing, targets that include a router or gate, dropout on fused parameters (peft cannot apply it there), and
    a wrap that adapted other weights than the targets name.
    """
    from uncurl_hf.families import get_family

    peft = require_peft()
    family = get_family(model)
    if targets is None:
        targets = resolve_targets(family.name, config.target_modules, config.target_parameters)
    check_dropout(targets, config.dropout)
    routers = router_names(model, family)
    names = module_names(model, targets.modules)
    if targets.modules and not names:
        raise RecoveryError(
            f"No module of the model matches the LoRA targets {_shown(targets)}; give --target-modules a regular "
            f"expression over full module names such as {_example(model)!r}."
        )
    params = parameter_names(model, targets.parameters)
    unmatched = [t for t, found in params.items() if not found]
    if unmatched:
        raise RecoveryError(
            f"No parameter of the model matches --target-parameters {','.join(unmatched)!r}; name fused "
            "parameters by their suffix, e.g. 'mlp.experts.gate_up_proj' (the weights of nn.Linear modules are "
            "adapted through --target-modules)."
        )
    check_no_router([*names, *(n for found in params.values() for n in found)], routers)
    lora = peft.LoraConfig(
        task_type=getattr(peft.TaskType, task_type_of(family)),
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=names,
        target_parameters=list(targets.parameters) or None,
        bias="none",
    )
    torch.manual_seed(config.seed)
    try:
        with quiet_peft():
            wrapped = peft.get_peft_model(model, lora)
    except ValueError as exc:  # peft: a target of a type it cannot wrap, a parameter it cannot adapt
        raise RecoveryError(
            f"peft cannot adapt the LoRA targets {_shown(targets)} ({exc}). Use the default targets, or give "
            f"--target-modules a regular expression over nn.Linear module names such as {_example(model)!r}."
        ) from None
    tuner = wrapped.base_model
    check_matched(names, list(tuner.targeted_module_names), params, list(tuner.targeted_parameter_names))
    return wrapped


def check_dropout(targets: LoraTargets, dropout: float) -> None:
    """peft's ``ParamWrapper`` (LoRA on a fused parameter) cannot apply dropout: the input of each expert's
    ``x @ (W + BA)`` is not separable from ``W``'s. Say so before anything is trained."""
    if targets.parameters and dropout:
        raise RecoveryError(
            f"--dropout {dropout:g} cannot be used with LoRA on fused expert parameters "
            f"({', '.join(targets.parameters)}): peft applies no dropout there. Use --dropout 0, or adapt modules "
            "only with --target-modules REGEX."
        )


def check_matched(names: list[str], modules: list[str], params: dict[str, list[str]], adapted: list[str]) -> None:
    """peft must adapt exactly the modules and parameters resolved: it rewrites some targets of transformers-5 MoE
    models (:mod:`~uncurl_hf.recover.targets`), and a silent change would adapt (or merge into) other weights."""
    wanted = sorted({n for found in params.values() for n in found})
    if sorted(modules) != names or sorted(adapted) != wanted:
        extra = sorted((set(modules) - set(names)) | (set(adapted) - set(wanted)))
        missing = sorted((set(names) - set(modules)) | (set(wanted) - set(adapted)))
        raise RecoveryError(
            f"peft adapted other weights than the LoRA targets name (also {extra[:3]}, not {missing[:3]}); this "
            "happens when a target ends in an expert or router name that peft remaps for transformers 5 (gate, "
            "gate_proj, up_proj, down_proj, w1, w2, w3). Adapt fused experts with --target-parameters instead."
        )


def _shown(targets: LoraTargets) -> str:
    modules = targets.modules if isinstance(targets.modules, str) else list(targets.modules)
    return repr(modules) + (f" + parameters {list(targets.parameters)!r}" if targets.parameters else "")


def _example(model: nn.Module) -> str:
    """An attention module name of this model, to show what a pattern is matched against."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("attn" in name.lower() or name.endswith("SelfAttention.q")):
            return name
    return "model.layers.0.self_attn.q_proj"


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
    wrap; it is not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
