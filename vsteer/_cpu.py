"""The default dtype on CPU: float32 where the CPU has no native bfloat16.

vLLM's ``dtype="auto"`` takes the model's own dtype (bfloat16 for most current checkpoints). On a
CPU without AVX-512 BF16 or AMX, bfloat16 matmuls are emulated and several times slower than
float32, so vsteer picks float32 there unless the user chose a dtype. The same holds where torch is
told to dispatch no AVX-512 kernels (``ATEN_CPU_CAPABILITY=avx2`` or ``default``): bfloat16 is then
emulated even on a CPU that has the instructions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

__all__ = ["BELOW_AVX512", "BF16_FLAGS", "chosen_dtype", "cpu_flags", "default_cpu_dtype", "has_native_bf16", "kernel_cap",
           "note_cpu_dtype"]

#: /proc/cpuinfo flags of an x86 CPU with native bfloat16 arithmetic.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
#: values of ``ATEN_CPU_CAPABILITY`` under which torch dispatches no AVX-512 (hence no bfloat16) kernels
BELOW_AVX512 = frozenset({"default", "avx2"})
_announced = False


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from ``cpuinfo`` (None where the file cannot be read, e.g. not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def kernel_cap() -> str | None:
    """The ISA torch is told to stop at (``ATEN_CPU_CAPABILITY``, lower case) where that is below
    AVX-512, else None."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return cap if cap in BELOW_AVX512 else None


def has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether this process computes bfloat16 natively: the CPU has the instructions and torch may
    use them. ``flags``: the CPU's feature flags (default: read from /proc/cpuinfo; where they cannot
    be read, torch's CPU capability decides)."""
    if kernel_cap() is not None:
        return False
    found = frozenset(flags) if flags is not None else cpu_flags()
    if found is None:
        import torch

        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    return bool(BF16_FLAGS & found)


def default_cpu_dtype(flags: Iterable[str] | None = None) -> str | None:
    """``"float32"`` on a CPU without native bfloat16, else None (keep vLLM's ``"auto"``)."""
    return None if has_native_bf16(flags) else "float32"


def note_cpu_dtype(dtype: str) -> None:
    """Say once per process, in one line on stderr, that vsteer chose ``dtype`` for this CPU."""
    global _announced
    if not _announced:
        _announced = True
        cap = kernel_cap()
        why = (f"torch may not use AVX-512 here (ATEN_CPU_CAPABILITY={cap})" if cap else
               "this CPU has no native bfloat16 (no avx512_bf16/amx_bf16)")
        print(f"vsteer: {why}, so the engine runs in {dtype} (several times faster here); pass a dtype to override.",
              file=sys.stderr)


def chosen_dtype(device_type: str) -> str | None:
    """The dtype vsteer gives an engine whose user chose none: float32 on a CPU without native
    bfloat16 (said once on stderr), else None (vLLM's ``"auto"``)."""
    dtype = default_cpu_dtype() if device_type == "cpu" else None
    if dtype is not None:
        note_cpu_dtype(dtype)
    return dtype
