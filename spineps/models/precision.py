"""Numeric precision of the network forward passes (``--precision``).

- ``fp32``: float32 everywhere on CPU (the reference behaviour). On CUDA nnU-Net runs its
  own float16 autocast and the instance U-Net runs in half precision, whatever is asked.
- ``bf16``: bfloat16 autocast of both networks on CPU, with channels-last 3D weights. On CPUs
  with native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16) the semantic network's
  forward passes are several times faster; elsewhere bfloat16 is emulated and slower.
- ``auto`` (default): ``bf16`` on a CPU with native bfloat16, ``fp32`` otherwise.

Measured in ``benchmarks/`` (see its README): bf16 keeps >= 99.9 % of the labels of the
float32 output (the criterion of the benchmarks issue); the differences are single voxels
at structure borders.

No torch import here: the CLI resolves the choice before anything heavy is loaded.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["PRECISIONS", "cpu_has_native_bf16", "native_bf16_in_cpuinfo", "resolve_precision", "describe"]

PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags that mean native bfloat16 arithmetic
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when ``/proc/cpuinfo`` lists a native bfloat16 flag (``avx512_bf16``,
    ``amx_bf16``; ``bf16`` in an Arm ``Features`` line). False where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return native_bf16_in_cpuinfo(text)


def native_bf16_in_cpuinfo(text: str) -> bool:
    """Whether the first ``flags`` (x86) or ``Features`` (Arm) line of a ``/proc/cpuinfo``
    text names native bfloat16 arithmetic."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return bool(_BF16_FLAGS & set(value.split()))
    return False


def resolve_precision(precision: str, device: str) -> str:
    """What the networks on ``device`` ("cpu" or "cuda...") actually run in: ``"fp32"`` or
    ``"bf16"`` on CPU, ``"fp16"`` on CUDA (nnU-Net's autocast; half-precision instance
    U-Net). ``ValueError`` for an unknown choice."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if str(device).startswith("cuda"):
        return "fp16"
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def describe() -> str:
    """One line for logs: the CPU and whether it has native bfloat16."""
    return f"{platform.machine()} CPU, native bfloat16: {'yes' if cpu_has_native_bf16() else 'no'}"
