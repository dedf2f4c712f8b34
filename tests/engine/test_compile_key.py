"""Compiled CPU engines key vLLM's and inductor's caches on the vector width inductor generates
code for (vsteer/engine/compile_key.py); the compiled engine itself is checked in test_batching.py."""

from __future__ import annotations

import pytest
from torch._inductor.cpu_vec_isa import VecAVX2, pick_vec_isa, valid_vec_isa_list
from vllm.config.compilation import CompilationConfig, CompilationMode

from vsteer.engine.compile_key import SIMDLEN_KEY, pin_vector_width


def _compiled(**kw) -> CompilationConfig:
    return CompilationConfig(mode=CompilationMode.VLLM_COMPILE, **kw)


def test_the_width_inductor_picks_is_pinned_and_enters_the_hash(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native, again = _compiled(), _compiled()
    width = pin_vector_width(native)
    assert width == pick_vec_isa().bit_width() and native.inductor_compile_config[SIMDLEN_KEY] == width
    pin_vector_width(again)
    assert again.compute_hash() == native.compute_hash()  # the same machine reuses its cache
    if not any(isinstance(isa, VecAVX2) for isa in valid_vec_isa_list()):
        pytest.skip("inductor cannot generate AVX2 code on this CPU")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # as on an AVX2-only CPU
    capped = _compiled()
    assert pin_vector_width(capped) == 256
    # AVX-512 code is never read where AVX2 code is generated (and the reverse)
    assert (capped.compute_hash() != native.compute_hash()) is (width != 256)


def test_a_chosen_width_and_eager_engines_are_left_alone():
    mine = _compiled(inductor_compile_config={SIMDLEN_KEY: 256})
    assert pin_vector_width(mine) is None and mine.inductor_compile_config[SIMDLEN_KEY] == 256
    eager = CompilationConfig(mode=CompilationMode.NONE)
    assert pin_vector_width(eager) is None and SIMDLEN_KEY not in eager.inductor_compile_config
