"""Where the networks run (``--device``): the one place that asks torch for a GPU."""

from __future__ import annotations

from typing import Any

from spineps.errors import UsageError

__all__ = ["DEVICES", "resolve_device", "to_memory_format"]

#: the choices of ``--device``
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``: ``auto`` (or empty) is CUDA when torch sees a GPU,
    else the CPU. ``UsageError`` (exit 64) for CUDA without a GPU and for an unknown device."""
    device = str(device or "auto").strip()
    if device == "cpu":
        return "cpu"
    is_cuda = device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    if device != "auto" and not is_cuda:
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda (cuda:N)")
    import torch

    has_cuda = bool(torch.cuda.is_available())
    if is_cuda and not has_cuda:
        raise UsageError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def to_memory_format(module: Any, memory_format: Any) -> Any:
    """``module.to(memory_format=memory_format)`` (e.g. ``torch.channels_last_3d``): what torch
    does for modules, though its type stubs list no ``memory_format`` for ``Module.to``."""
    return module.to(memory_format=memory_format)
