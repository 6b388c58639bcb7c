"""Where, and in which dtype, :func:`~uncurl_hf.io.checkpoint.load_model` puts a model: checked before loading.

A wrong device should fail in a second with a message that names the fix, not after minutes of reading weights
(or deep inside ``torch`` with "Torch not compiled with CUDA enabled"). So the options are resolved first into a
:class:`Placement`: the keyword arguments ``from_pretrained`` gets, and the device the loaded model is moved to.

``dtype="auto"`` passes no ``dtype`` at all, which is what the loader always did: transformers then uses "auto"
(the dtype ``config.json`` records, else the stored weights'), so the default load stays byte-identical.
``device="auto"`` is accelerate's ``device_map="auto"`` (GPUs first, then CPU, then disk), which needs accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from uncurl_hf.errors import DeviceError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_HELP = "Use cpu, cuda, cuda:N, mps, or auto (accelerate's device_map='auto')."


@dataclass(frozen=True)
class Placement:
    """``from_pretrained`` keyword arguments (``dtype``, ``device_map``) and the device to move the model to after
    loading (``None``: leave it where the loader put it)."""

    load_kwargs: dict[str, Any] = field(default_factory=dict)
    move_to: str | None = None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """``None`` for ``"auto"`` (the checkpoint's own dtype), else the torch dtype; :class:`DeviceError` otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported for loading; use auto, {', '.join(DTYPES)}.")
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise DeviceError(f"Unknown dtype {dtype!r}; use auto (the checkpoint's dtype), {', '.join(DTYPES)}.") from None


def check_device(device: str) -> str:
    """The normalized device string (``"cuda:0"``, ``"cpu"``, ...) if this machine has it, else :class:`DeviceError`
    saying what is missing and what to use instead."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"Unknown device {device!r}. {_DEVICE_HELP}") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"Device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}, {build}; "
                "no usable GPU or driver). Use --device cpu, or install a CUDA build of torch on a machine with a GPU."
            )
        count = torch.cuda.device_count()
        index = parsed.index or 0
        if index >= count:
            raise DeviceError(f"Device {device!r} asked for, but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1}); choose one of them.")
        return f"cuda:{index}"
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(
                f"Device {device!r} asked for, but Apple MPS is not available here (it needs macOS 12.3+ on Apple "
                "silicon and an MPS build of torch). Use --device cpu."
            )
        return "mps"
    raise DeviceError(f"Device type {parsed.type!r} is not supported for loading. {_DEVICE_HELP}")


def placement(device: str = "cpu", dtype: str | torch.dtype = "auto") -> Placement:
    """Check ``device`` and ``dtype`` (see the module docstring) and say how to load and where to move the model."""
    kwargs: dict[str, Any] = {}
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError as exc:
            raise DeviceError(
                f"device='auto' places the model with accelerate's device_map='auto', but accelerate is not "
                f"importable ({exc}). pip install accelerate, or give a device (cpu, cuda, cuda:N, mps)."
            ) from exc
        kwargs["device_map"] = "auto"
        return Placement(kwargs)
    target = check_device(device)
    return Placement(kwargs, None if target == "cpu" else target)


__all__ = ["DTYPES", "Placement", "check_device", "placement", "resolve_dtype"]
