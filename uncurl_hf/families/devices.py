"""Where a model's inputs go: the device its input embeddings run on (accelerate's device maps included).

Calibration, the families' ``forward_inputs`` and evaluation all send batches to :func:`input_device`, so a model
dispatched by accelerate over several devices (or with offloaded, meta-device weights) gets its inputs where its
first module runs, not where its first parameter happens to be stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device calibration batches go to: where the model's input embeddings run.

    A model dispatched by accelerate (``device_map``) may spread over several devices, and a module whose weights
    are offloaded keeps them on the ``meta`` device; accelerate's hook on the embeddings (or on a module holding
    them) then names where they execute. Otherwise it is the embeddings' own device, then that of the first
    parameter not on ``meta``, then the CPU.
    """
    embeddings = _input_embeddings(model)
    if embeddings is not None:
        for module in reversed(_modules_down_to(model, embeddings)):  # the innermost hook is the one that runs
            device = _execution_device(getattr(module, "_hf_hook", None))
            if device is not None:
                return device
    for module in (embeddings, model):
        if module is not None:
            for parameter in module.parameters():
                if parameter.device.type != "meta":
                    return parameter.device
    return torch.device("cpu")


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _modules_down_to(model: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules from ``model`` down to ``target`` (both included), outermost first; ``[target]`` if not found."""
    for name, module in model.named_modules():
        if module is target:
            path = [model]
            for part in name.split(".") if name else []:
                path.append(getattr(path[-1], part))
            return path
    return [target]


def _execution_device(hook: Any) -> torch.device | None:
    """The ``execution_device`` of an accelerate hook (or of the first hook of a ``SequentialHook`` naming one)."""
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None
