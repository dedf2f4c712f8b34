"""The SAS update (support-restricted encode / re-activate / decode): Triton kernels vs the torch
reference (``sas_delta_torch``), on one CUDA GPU. Plain torch + Triton, no vLLM.

Usage::

    python benchmarks/sas_kernel.py                                   # d=2304, d_sae 16k and 64k, 8192 tokens, U 16/128/1024
    python benchmarks/sas_kernel.py --tokens 1 64 8192 --union 16 128 --dense

Workload per case: an SAE with ``d_sae + 1`` features (a zero padding feature, as the engine keeps
it), JumpReLU by default, float32 weights; ``h`` in ``--dtype``; a bank of ``--slots`` + 1 rows
(row 0 unsteered), each steered row with nonzero values on about half the union's features; every
token on a random slot; ``union`` = ``U`` distinct features.

Bytes counted per call (the op's minimal traffic, not what each implementation moves)::

    read h (T*d*elt) + index (T*4) + gathered bank entries (T*U*4) + union weight rows
    (2*U*d*4: encoder and decoder) + b_enc/threshold/union (U*16) + write delta (T*d*4)

Bank entries are counted once per token even when tokens share a slot (they then mostly hit in
L2). FLOPs: ``4*T*U*d`` (encode and decode GEMMs). Timing: CUDA events, ``--warmup`` untimed calls,
median of ``--iters``.

Prints a table and writes ``results/sas-kernel.json`` and the "SAS kernel" section of
``benchmarks/RESULTS.md`` (``--no-results-md`` to skip). Exits with status 1 and a message when no
CUDA GPU is present: nothing is measured on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import publish

HERE = Path(__file__).resolve().parent
SECTION = "## SAS kernel: Triton vs torch reference"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def op_bytes(T: int, d: int, U: int, dtype: torch.dtype, idx_elt: int = 4) -> int:
    """Minimal bytes moved by one call (see module docstring)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return T * d * elt + T * idx_elt + T * U * 4 + 2 * U * d * 4 + U * 16 + T * d * 4


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_case(T: int, d: int, m: int, U: int, slots: int, dtype: torch.dtype, seed: int = 0):
    """Padded SAE weights on the GPU, a bank, a union of U distinct features, tokens, slots."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    w_enc_t = torch.randn(m + 1, d, generator=g, device=dev) / d**0.5
    w_dec = torch.randn(m + 1, d, generator=g, device=dev) / d**0.5
    b_enc = 0.1 * torch.randn(m + 1, generator=g, device=dev)
    thr = 0.2 * torch.rand(m + 1, generator=g, device=dev)
    w_enc_t[m], w_dec[m], b_enc[m], thr[m] = 0, 0, 0, 0
    union = torch.randperm(m, generator=g, device=dev)[:U].sort().values
    bank = torch.zeros(slots + 1, m + 1, device=dev)
    pick = torch.rand(slots, U, generator=g, device=dev) < 0.5
    vals = 4 * torch.randn(slots, U, generator=g, device=dev) * pick
    bank[1:, union] = vals
    h = torch.randn(T, d, generator=g, device=dev).to(dtype)
    index = torch.randint(0, slots + 1, (T,), generator=g, device=dev, dtype=torch.int32)
    return h, index, bank, w_enc_t, b_enc, w_dec, thr, union


def run_case(impls: dict[str, Callable], args: argparse.Namespace, T: int, m: int, U: int, dtype: torch.dtype,
             reference: Callable) -> list[dict]:
    """Time every implementation on one shape; print and return one row each."""
    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(T, args.hidden, m, U, args.slots, dtype)
    th = thr if args.activation == "jumprelu" else None
    nbytes = op_bytes(T, args.hidden, U, dtype)
    flops = 4 * T * U * args.hidden
    cases = [(name, fn, union) for name, fn in impls.items()]
    if args.dense:
        cases.append(("torch-dense", reference, None))
    want = reference(h, index, bank, w_enc_t, b_enc, w_dec, th, union, activation=args.activation)
    rows = []
    for name, fn, un in cases:
        def call(fn: Callable = fn, un: torch.Tensor | None = un) -> torch.Tensor:
            return fn(h, index, bank, w_enc_t, b_enc, w_dec, th, un, activation=args.activation)

        err = float((call() - want).abs().max())
        ms = time_cuda(call, args.warmup, args.iters)
        gbs = nbytes / (ms * 1e-3) / 1e9
        tflops = flops / (ms * 1e-3) / 1e12
        print(f"{name:>14} {T:>6} {args.hidden:>5} {m:>6} {U:>5} {nbytes / 1e6:>8.2f} "
              f"{ms * 1e3:>10.1f} {gbs:>7.1f} {tflops:>8.2f}")
        rows.append({"impl": name, "tokens": T, "hidden": args.hidden, "d_sae": m, "union": U,
                     "bytes": nbytes, "flops": flops, "us": round(ms * 1e3, 2),
                     "gb_per_s": round(gbs, 1), "tflop_per_s": round(tflops, 3),
                     "max_abs_diff_vs_reference": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2304)
    p.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192])
    p.add_argument("--union", type=int, nargs="+", default=[16, 128, 1024])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--activation", choices=["relu", "jumprelu"], default="jumprelu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(sas_delta_torch)")
    p.add_argument("--dense", action="store_true",
                   help="also time the reference without the support restriction (union=None: full d x d_sae)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-results-md", action="store_true", help="print only; write no files")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("sas_kernel: no CUDA GPU available; this benchmark needs one. Nothing was measured.", file=sys.stderr)
        return 1
    from vsteer.kernels.sas_reference import sas_delta_torch
    from vsteer.kernels.sas_triton import (
        HAVE_TRITON,
        TRITON_IMPORT_ERROR,
        sas_delta_triton,
    )

    dtype = DTYPES[args.dtype]
    impls: dict[str, Callable] = {"torch": sas_delta_torch}
    if HAVE_TRITON:
        impls = {"triton": sas_delta_triton, **impls}
    else:
        print(f"warning: Triton unavailable ({TRITON_IMPORT_ERROR}); timing torch only", file=sys.stderr)
    if args.compile:
        impls["torch.compile"] = torch.compile(sas_delta_torch, fullgraph=True, dynamic=False)

    from vsteer.kernels import sas_triton

    triton_version = getattr(sas_triton.triton, "__version__", "?") if HAVE_TRITON else "unavailable"
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"triton {triton_version}")
    print(f"# device: {machine}  dtype={args.dtype} activation={args.activation} slots={args.slots} "
          f"warmup={args.warmup} iters={args.iters} (median)")
    header = f"{'impl':>14} {'T':>6} {'d':>5} {'d_sae':>6} {'U':>5} {'MB':>8} {'us':>10} {'GB/s':>7} {'TFLOP/s':>8}"
    print(header)
    rows: list[dict] = []
    for m in args.d_sae:
        for T in args.tokens:
            for U in args.union:
                if U <= m:
                    rows += run_case(impls, args, T, m, U, dtype, sas_delta_torch)
                    torch.cuda.empty_cache()

    if args.no_results_md:
        return 0
    lines = [
        (f"Support-restricted SAS update, {args.activation}, h in {args.dtype}, float32 SAE weights and math, "
         f"{args.slots} steered slots + slot 0, tokens on random slots. Median of {args.iters} calls (CUDA "
         "events). GB/s over the op's minimal traffic (h, index, gathered bank entries, the union's encoder and "
         "decoder rows, delta); TFLOP/s over 4*T*U*d."),
        "",
        "| impl | tokens | d | d_sae | U | us | GB/s | TFLOP/s | max abs diff vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['impl']} | {r['tokens']} | {r['hidden']} | {r['d_sae']} | {r['union']} | {r['us']} | "
              f"{r['gb_per_s']} | {r['tflop_per_s']} | {r['max_abs_diff_vs_reference']:.2e} |" for r in rows]
    data = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    publish(SECTION, args.out_dir / "sas-kernel.json", data, lines, machine=machine, results_md=args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
