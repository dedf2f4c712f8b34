"""Kernel bandwidth on a GPU: the steer op and the SAS op against a measured device copy.

Usage (GPU, torch + Triton, vsteer from the source tree; see benchmarks/gpu_evidence.sh)::

    python benchmarks/gpu_kernels.py --out benchmarks/results
    python benchmarks/gpu_kernels.py --smoke --out /tmp/x     # CPU, tiny sizes, torch reference

For every hidden size (default 1536, 4096, 8192) and token count T (default 1, 2, 4, ..., 8192),
with 256 steering slots (+ the identity slot 0) and each token on a random slot:

- steer: ``steer_residual_triton`` (rank 0: ``residual * m + a``) on bf16 ``hidden``/``residual``.
  Bytes counted: read hidden + residual and the index, the ``m`` and ``a`` rows (and flag) of
  each DISTINCT slot in the call once (float32), write the output
  (``3*T*d*2 + 4*T + slots_used*(2d+1)*4``): what must cross DRAM at least.
- sas: ``sas_delta_triton`` (ReLU SAE, ``--d-sae`` features, a union of ``--support`` features,
  every slot steering a random half of them). Bytes counted: read h (bf16) and the index, the
  union's encoder and decoder rows once (``2*U*d*4``), the bank entries (``T*U*4``), the ``[T, U]``
  float32 scratch and the ``[d/256, T, U]`` partial sums written and read, the float32 output.

Copy bandwidth: ``dst.copy_(src)`` of ``--copy-mib`` MiB, counted as read + write. Two timings,
both CUDA events, median of ``--iters`` after ``--warmup``: ``us/call`` is one call from Python
(launch overhead included: what an eager engine pays), ``us graph`` is one call inside a CUDA
graph that replays ``--graph-calls`` calls (what a graph-captured engine pays). Achieved GB/s =
bytes / graph time; the table gives it as a fraction of the copy bandwidth.

Writes ``gpu_kernels.json`` and ``gpu_kernels.md`` into ``--out``. ``--smoke`` runs on CPU with
tiny sizes and the torch reference (wall-clock timing): it checks that the script runs, and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import _gpu_shim

VSTEER_FROM = _gpu_shim.ensure_vsteer()

import torch  # noqa: E402

import vsteer  # noqa: E402
import vsteer.kernels as vk  # noqa: E402
from vsteer.kernels import BankLayout  # noqa: E402
from kernel_bandwidth import time_cuda  # noqa: E402 - the same CUDA-event timing as the older benchmark


def time_call(fn: Callable[[], object], *, cuda: bool, warmup: int, iters: int) -> float:
    """Median seconds of one ``fn()`` call (CUDA events on a GPU, wall clock on CPU)."""
    if cuda:
        return time_cuda(fn, warmup, iters) / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_in_graph(fn: Callable[[], object], *, cuda: bool, calls: int, warmup: int, iters: int) -> float:
    """Median seconds of one ``fn()`` inside a CUDA graph holding ``calls`` calls (on CPU: the same
    as :func:`time_call`)."""
    if not cuda:
        return time_call(fn, cuda=False, warmup=warmup, iters=iters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    secs = time_cuda(graph.replay, warmup, iters) / 1e3 / calls
    del graph
    return secs


def copy_bandwidth(device: torch.device, mib: int, *, warmup: int, iters: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written per second)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    secs = time_call(lambda: dst.copy_(src), cuda=device.type == "cuda", warmup=warmup, iters=iters)
    return 2 * n * 4 / secs / 1e9


def steer_bank(d: int, slots: int, device: torch.device, seed: int) -> torch.Tensor:
    """A rank-0 bank: identity slot 0, random ``m`` and ``a`` for slots 1..slots."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lay = BankLayout(d, 0)
    bank = lay.identity_bank(slots + 1)
    bank[1:, lay.m_slice] = 1 + 0.1 * torch.randn(slots, d, generator=g)
    bank[1:, lay.a_slice] = torch.randn(slots, d, generator=g)
    return bank.to(device)


def tokens_case(T: int, d: int, slots: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Any]:
    """Per-call activations: ``hidden``, ``residual`` and a random slot per token (0 included)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "hidden": torch.randn(T, d, generator=g, device=device).to(dtype),
        "residual": torch.randn(T, d, generator=g, device=device).to(dtype),
        "index": torch.randint(0, slots + 1, (T,), generator=g, device=device, dtype=torch.int32),
    }


def steer_bytes(T: int, d: int, elt: int, slots_used: int) -> int:
    """Bytes one steer-op call must move (module docstring)."""
    return 3 * T * d * elt + 4 * T + slots_used * BankLayout(d, 0).width * 4


def sas_sae(d: int, m: int, U: int, slots: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Padded ReLU SAE weights (zero feature ``m``), a union of U features, a bank in which every
    slot steers a random half of them."""
    g = torch.Generator(device=device).manual_seed(seed)
    feats = torch.randperm(m, generator=g, device=device)[:U].sort().values
    bank = torch.zeros(slots + 1, m + 1, device=device)
    pick = torch.rand(slots, U, generator=g, device=device) < 0.5
    bank[1:, feats] = torch.where(pick, 3 * torch.randn(slots, U, generator=g, device=device),
                                  torch.zeros((), device=device))
    w_enc_t = torch.randn(m + 1, d, generator=g, device=device) / d**0.5
    w_dec = torch.randn(m + 1, d, generator=g, device=device) / 8
    w_enc_t[m] = 0
    w_dec[m] = 0
    b_enc = 0.1 * torch.randn(m + 1, generator=g, device=device)
    b_enc[m] = 0
    return {"bank": bank, "w_enc_t": w_enc_t, "b_enc": b_enc, "w_dec": w_dec, "union": feats}


def sas_bytes(T: int, d: int, U: int, elt: int, split: int) -> int:
    """Bytes one SAS-op call moves (module docstring); ``split``: the encode's d-chunks."""
    return T * d * elt + 4 * T + 2 * U * d * 4 + T * U * 4 + 2 * T * U * 4 + 2 * split * T * U * 4 + T * d * 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything; return the JSON-able results."""
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    elt = 2
    if cuda:
        steer_fn = vk.steer_residual_triton
        sas_fn = vk.sas_delta_triton
        backend = "triton"
        from vsteer.kernels.sas_triton import ENCODE_CHUNK_D
    else:
        steer_fn = vk.steer_residual_torch
        sas_fn = vk.sas_delta_torch
        backend = "torch reference (no CUDA)"
        ENCODE_CHUNK_D = 0
    timing = dict(cuda=cuda, warmup=args.warmup, iters=args.iters)
    graph_timing = dict(timing, calls=args.graph_calls)
    copy_gbs = copy_bandwidth(device, args.copy_mib, warmup=args.warmup, iters=args.iters)
    rows: list[dict[str, Any]] = []
    for d in args.hidden:
        bank = steer_bank(d, args.slots, device, seed=d)
        sae = sas_sae(d, args.d_sae, args.support, args.slots, device, seed=d + 1)
        for T in args.tokens:
            c = tokens_case(T, d, args.slots, dtype, device, seed=T + d)
            steer = lambda: steer_fn(c["hidden"], c["residual"], bank, c["index"], rank=0)  # noqa: E731
            secs = time_call(steer, **timing)
            graph_secs = time_in_graph(steer, **graph_timing)
            want = vk.steer_residual_torch(c["hidden"], c["residual"], bank, c["index"], rank=0)
            ok = bool(torch.allclose(steer().float(), want.float(), rtol=1.6e-2, atol=1e-2))
            used = int(c["index"].unique().numel())
            rows.append(_row("steer", T, d, secs, graph_secs, steer_bytes(T, d, elt, used), copy_gbs, ok))
            sas = lambda: sas_fn(c["hidden"], c["index"], sae["bank"], sae["w_enc_t"], sae["b_enc"],  # noqa: E731
                                 sae["w_dec"], None, sae["union"], activation="relu")
            secs = time_call(sas, **timing)
            graph_secs = time_in_graph(sas, **graph_timing)
            want = vk.sas_delta_torch(c["hidden"], c["index"], sae["bank"], sae["w_enc_t"], sae["b_enc"], sae["w_dec"],
                                      None, sae["union"], activation="relu")
            scale = max(1.0, float(want.abs().max()))
            ok = bool(torch.allclose(sas(), want, rtol=1e-4, atol=1e-4 * scale))
            split = -(-d // ENCODE_CHUNK_D) if ENCODE_CHUNK_D else 0
            rows.append(_row("sas", T, d, secs, graph_secs, sas_bytes(T, d, args.support, elt, split), copy_gbs, ok))
            del c
        del bank, sae
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "smoke": args.smoke,
        "backend": backend,
        "torch": torch.__version__,
        "vsteer_from": f"{VSTEER_FROM}: {Path(vsteer.__file__).parent}, kernels {Path(vk.__file__).parent}",
        "dtype": "bfloat16",
        "slots": args.slots,
        "d_sae": args.d_sae,
        "support": args.support,
        "copy_gbs": copy_gbs,
        "all_match_reference": all(r["matches_reference"] for r in rows),
        "rows": rows,
    }


def _row(op: str, T: int, d: int, secs: float, graph_secs: float, nbytes: int, copy_gbs: float,
         ok: bool) -> dict[str, Any]:
    gbs = nbytes / graph_secs / 1e9
    return {"op": op, "tokens": T, "hidden": d, "us": secs * 1e6, "us_graph": graph_secs * 1e6,
            "us_per_token": graph_secs * 1e6 / T, "bytes": nbytes, "gbs": gbs, "fraction_of_copy": gbs / copy_gbs,
            "matches_reference": ok}


def markdown(res: dict[str, Any], command: str) -> str:
    """The results as a markdown table."""
    lines = [
        "## GPU kernels: steer and SAS op bandwidth", "",
        f"Command: `{command}`  ", f"Device: {res['device']} (backend: {res['backend']}, torch {res['torch']})  ",
        f"Measured copy bandwidth: {res['copy_gbs']:.0f} GB/s; bf16 activations, {res['slots']} slots; SAS: "
        f"ReLU SAE with {res['d_sae']} features, support {res['support']}  ",
        f"All outputs match the torch reference: {res['all_match_reference']}", "",
        "| op | hidden | tokens | us/call | us graph | us/token (graph) | GB/s | of copy | matches ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['op']} | {r['hidden']} | {r['tokens']} | {r['us']:.1f} | {r['us_graph']:.1f} | "
                     f"{r['us_per_token']:.3f} | "
                     f"{r['gbs']:.0f} | {r['fraction_of_copy']:.2f} | {r['matches_reference']} |")
    if res["smoke"]:
        lines += ["", "Smoke run (CPU, tiny sizes, torch reference): the numbers mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when an output misses the reference)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, torch reference; numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--slots", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--support", type=int, default=128)
    p.add_argument("--copy-mib", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--graph-calls", type=int, default=20, help="calls captured in one CUDA graph for 'us graph'")
    args = p.parse_args(argv)
    big = not args.smoke
    defaults = dict(hidden=[1536, 4096, 8192] if big else [64], tokens=[2**i for i in range(14)] if big else [1, 7],
                    slots=256 if big else 4, d_sae=16384 if big else 256, copy_mib=1024 if big else 8,
                    warmup=10 if big else 1, iters=50 if big else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.support = min(args.support, 16)
    elif not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA GPU here; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    res = run(args)
    command = "python benchmarks/gpu_kernels.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    res["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kernels.json").write_text(json.dumps(res, indent=2))
    (args.out / "gpu_kernels.md").write_text(markdown(res, command))
    print(markdown(res, command))
    return 0 if res["all_match_reference"] else 1


if __name__ == "__main__":
    sys.exit(main())
