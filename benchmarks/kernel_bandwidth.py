"""Achieved memory bandwidth of the steering op: Triton kernel vs torch reference.

Usage::

    python benchmarks/kernel_bandwidth.py --hidden 4096 --rank 2 --tokens 1 64 512 4096

Bytes counted per call (the op's minimal traffic)::

    read hidden + residual (2*T*d*elt) + index (T*idx_elt) + gathered bank rows (T*W*4)
    + write output (T*d*elt)

Bank rows are counted once per token even when tokens share a slot (they then
mostly hit in L2), so with few slots the figure can exceed DRAM bandwidth.

Timing: CUDA events around each call, ``--warmup`` untimed calls, median of
``--iters``. Prints a table; writes no files. Exits with status 1 and a message
when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch
from vsteer.kernels import BankLayout, steer_residual_torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def op_bytes(T: int, d: int, rank: int, dtype: torch.dtype, residual: bool, idx_elt: int = 4) -> int:
    """Minimal bytes moved by one call (see module docstring)."""
    elt = torch.empty((), dtype=dtype).element_size()
    W = BankLayout(d, rank).width
    n_in = 2 if residual else 1
    return n_in * T * d * elt + T * idx_elt + T * W * 4 + T * d * elt


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


def make_case(T: int, d: int, rank: int, slots: int, dtype: torch.dtype, residual: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    lay = BankLayout(d, rank)
    bank = lay.identity_bank(slots, device="cuda")
    if slots > 1:
        n = slots - 1
        m = 1.0 + 0.1 * torch.randn(n, d, generator=g, device="cuda")
        a = 0.1 * torch.randn(n, d, generator=g, device="cuda")
        L = torch.nn.functional.normalize(torch.randn(n, rank * d, generator=g, device="cuda"), dim=-1)
        flag = (torch.arange(n, device="cuda") % 2).float()[:, None]
        bank[1:] = torch.cat([m, a, L, L, flag], dim=1)
    hidden = torch.randn(T, d, generator=g, device="cuda").to(dtype)
    res = torch.randn(T, d, generator=g, device="cuda").to(dtype) if residual else None
    index = torch.randint(0, slots, (T,), generator=g, device="cuda", dtype=torch.int32)
    return hidden, res, bank, index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048, 8192])
    p.add_argument("--hidden", type=int, nargs="+", default=[4096])
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-residual", action="store_true", help="benchmark residual=None")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(steer_residual_torch)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernel_bandwidth: no CUDA GPU available; this benchmark needs one. Nothing was measured.",
              file=sys.stderr)
        return 1
    from vsteer.kernels.steer_triton import (
        HAVE_TRITON,
        TRITON_IMPORT_ERROR,
        steer_residual_triton,
    )

    dtype = DTYPES[args.dtype]
    residual = not args.no_residual
    impls: dict[str, Callable] = {"torch": steer_residual_torch}
    if HAVE_TRITON:
        impls = {"triton": steer_residual_triton, **impls}
    else:
        print(f"warning: Triton unavailable ({TRITON_IMPORT_ERROR}); timing torch only", file=sys.stderr)
    if args.compile:
        impls["torch.compile"] = torch.compile(steer_residual_torch, fullgraph=True, dynamic=False)

    print(f"# device: {torch.cuda.get_device_name()}  dtype={args.dtype} rank={args.rank} "
          f"slots={args.slots} residual={residual} warmup={args.warmup} iters={args.iters} (median)")
    print(f"{'impl':>14} {'T':>6} {'d':>6} {'MB':>9} {'us':>9} {'GB/s':>8}")
    for d in args.hidden:
        for T in args.tokens:
            hidden, res, bank, index = make_case(T, d, args.rank, args.slots, dtype, residual)
            nbytes = op_bytes(T, d, args.rank, dtype, residual, index.element_size())
            for name, fn in impls.items():
                call = lambda fn=fn: fn(hidden, res, bank, index, rank=args.rank)  # noqa: E731
                ms = time_cuda(call, args.warmup, args.iters)
                gbs = nbytes / (ms * 1e-3) / 1e9
                print(f"{name:>14} {T:>6} {d:>6} {nbytes / 1e6:>9.3f} {ms * 1e3:>9.1f} {gbs:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
