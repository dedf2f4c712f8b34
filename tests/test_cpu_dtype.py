"""vsteer's default dtype on CPU: float32 where the CPU lacks native bfloat16."""

import pytest

from vsteer._cpu import cpu_flags, default_cpu_dtype, has_native_bf16, kernel_cap


@pytest.mark.parametrize(("flags", "expected"), [
    ({"sse4_2", "avx2", "avx512f"}, "float32"),           # AVX-512 without BF16: emulated bfloat16
    ({"avx2", "fma"}, "float32"),
    (set(), "float32"),
    ({"avx512f", "avx512_bf16"}, None),                    # native bfloat16: keep vLLM's "auto"
    ({"avx512f", "amx_bf16", "amx_tile"}, None),
])
def test_default_cpu_dtype_from_flags(flags, expected, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert default_cpu_dtype(flags) == expected
    assert has_native_bf16(flags) is (expected is None)


@pytest.mark.parametrize(("cap", "native"), [("avx2", False), ("AVX2", False), ("default", False), ("avx512", True),
                                             ("", True)])
def test_torch_kept_below_avx512_means_emulated_bfloat16(cap, native, monkeypatch, capsys):
    """ATEN_CPU_CAPABILITY=avx2 (or default) keeps torch off its AVX-512 kernels, so bfloat16 is
    emulated even on a CPU with avx512_bf16: float32 is the default there, and the note says why."""
    import vsteer._cpu as cpu

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
    assert has_native_bf16({"avx512f", "avx512_bf16"}) is native
    assert default_cpu_dtype({"avx512f", "amx_bf16"}) == (None if native else "float32")
    monkeypatch.setattr(cpu, "_announced", False)
    cpu.note_cpu_dtype("float32")
    reason = capsys.readouterr().err
    assert (f"ATEN_CPU_CAPABILITY={cap.lower()}" in reason) is (not native) and reason.count("\n") == 1


def test_cpu_flags_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx512_bf16", "avx2"}
    assert default_cpu_dtype(cpu_flags(str(info))) is None
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_this_machine_is_consistent_with_proc_cpuinfo():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    native = bool({"avx512_bf16", "amx_bf16"} & flags) and kernel_cap() is None
    assert default_cpu_dtype() == (None if native else "float32")
