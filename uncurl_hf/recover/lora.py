"""LoRA adapters (PEFT) on a pruned model: the optional ``peft`` import, wrapping, counting trainable parameters.

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


def add_lora(model: nn.Module, config: RecoverConfig) -> Any:
    """Wrap ``model`` in a PEFT LoRA model: base weights frozen, adapters seeded (``lora_A`` random, ``lora_B`` 0).

    The wrapped model computes exactly what ``model`` computed until the first step (``B = 0``).
    """
    peft = require_peft()
    lora = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules),
        bias="none",
    )
    torch.manual_seed(config.seed)
    try:
        with quiet_peft():
            wrapped = peft.get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise RecoveryError(
            f"No module of the model matches the LoRA targets {config.target_modules!r} ({exc}). Use the default "
            "targets, or give --target-modules a regular expression over module names such as "
            "'encoder.block.0.layer.0.SelfAttention.q'."
        ) from None
    return wrapped


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
    wrap; it is not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
