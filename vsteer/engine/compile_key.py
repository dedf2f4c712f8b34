"""Compiled CPU engines: the vector width inductor generates code for is part of every cache key.

vLLM's compile cache (``VLLM_CACHE_ROOT/torch_compile_cache``) and torch inductor's own caches key
their entries on the model, the configs and the code, not on the vector ISA the generated C++ is
built for (vLLM 0.32, torch 2.13). A cache written where inductor generated AVX-512 code and read
where it generates AVX2 code (a home directory shared by different machines, a cache baked into an
image, ``ATEN_CPU_CAPABILITY`` set differently) hands back code for the other ISA. Seen here with
inductor's cache: a process under ``ATEN_CPU_CAPABILITY=avx2`` that read entries an uncapped
process wrote computed garbage, and the reverse aborted with heap corruption; on a CPU without
AVX-512, AVX-512 code cannot run at all. Pinning inductor's ``cpp.simdlen`` to the width it would
pick anyway changes no generated code and puts the width into both keys (vLLM hashes
``inductor_compile_config`` into its cache paths; inductor keys on its config).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SIMDLEN_KEY", "pin_vector_width"]

#: inductor's config key for the vector width, as vLLM's ``inductor_compile_config`` takes it
SIMDLEN_KEY = "cpp.simdlen"


def pin_vector_width(compilation_config: Any) -> int | None:
    """Set ``cpp.simdlen`` in ``compilation_config.inductor_compile_config`` (a vLLM
    ``CompilationConfig``) to the width inductor picks in this process, when the engine compiles
    and no width is set yet. Returns the width set, or None where nothing was set (eager engine,
    a width chosen by the user, or a CPU inductor does not vectorize for)."""
    if not compilation_config.mode:  # None (unresolved) or CompilationMode.NONE (0): eager
        return None
    overrides = compilation_config.inductor_compile_config
    if SIMDLEN_KEY in overrides:
        return None
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if not isa:  # inductor's "invalid" ISA: scalar code only
        return None
    overrides[SIMDLEN_KEY] = isa.bit_width()
    return overrides[SIMDLEN_KEY]
