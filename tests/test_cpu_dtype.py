"""vsteer's default dtype on CPU: float32 where the CPU lacks native bfloat16."""

import pytest

from vsteer._cpu import cpu_flags, default_cpu_dtype, has_native_bf16


@pytest.mark.parametrize(("flags", "expected"), [
    ({"sse4_2", "avx2", "avx512f"}, "float32"),           # AVX-512 without BF16: emulated bfloat16
    ({"avx2", "fma"}, "float32"),
    (set(), "float32"),
    ({"avx512f", "avx512_bf16"}, None),                    # native bfloat16: keep vLLM's "auto"
    ({"avx512f", "amx_bf16", "amx_tile"}, None),
])
def test_default_cpu_dtype_from_flags(flags, expected):
    assert default_cpu_dtype(flags) == expected
    assert has_native_bf16(flags) is (expected is None)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx512_bf16", "avx2"}
    assert default_cpu_dtype(cpu_flags(str(info))) is None
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_this_machine_is_consistent_with_proc_cpuinfo():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert default_cpu_dtype() == (None if native else "float32")
