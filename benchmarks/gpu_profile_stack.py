"""Where a compiled steered stack spends its time, kernel by kernel, and the steer op's warp count.

Usage (GPU, torch + Triton, no vLLM needed; vsteer from the tree as in gpu_evidence.sh)::

    python benchmarks/gpu_profile_stack.py --out benchmarks/results/gpu
    python benchmarks/gpu_profile_stack.py --smoke --out /tmp/x   # CPU, tiny stack: checks the script

1. Profile: the stack of ``gpu_graph_stack.py`` (``--model``, default the 1.5B shape, batch 256),
   plain and steered at all layers with K=256 configs, each compiled with ``torch.compile``
   (inductor, default mode: no CUDA graphs, so every kernel reaches the profiler), ``--steps``
   forward passes under ``torch.profiler``. The table lists CUDA kernels by device time per step,
   plain vs steered: what the steering adds beyond its own kernel shows up as extra rows.
2. Warp sweep: the Triton steer op alone, inside a CUDA graph (``gpu_kernels.time_in_graph``),
   for hidden 1536/4096/8192, T = 256/1024/8192, and 1..16 warps; the kernel's own choice is
   marked. Achieved bandwidth is counted as in ``gpu_kernels.py``.

Writes ``gpu_profile_stack.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import gpu_graph_stack as gs  # noqa: E402 - imports vsteer through the shim first
import gpu_kernels as gk  # noqa: E402
import torch  # noqa: E402

from vsteer.kernels import steer_triton  # noqa: E402

WARPS = (1, 2, 4, 8, 16)


def kernel_profile(fn: Callable[[], object], steps: int, cuda: bool) -> dict[str, dict[str, float]]:
    """{kernel name: {"calls": per step, "us": device microseconds per step}} over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        if us is None:
            us = e.self_cuda_time_total
        if us and us > 0:
            out[e.key] = {"calls": e.count / steps, "us": us / steps}
    return out


def profile_stack(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Profile the plain and the all-layer steered stack (K=256), compiled."""
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = (gs.MODELS if cuda else gs.SMOKE_MODELS)[args.model]
    weights = gs.make_weights(cfg, dtype, device, seed=1)
    d, batch = cfg["hidden"], args.batch
    positions = torch.arange(batch, device=device)
    x = (torch.randn(batch, d, generator=torch.Generator(device="cpu").manual_seed(2)) * 0.5).to(device, dtype)
    res: dict[str, Any] = {}
    for variant in ("plain", "all"):
        model = gs.Stack([gs.LlamaDecoderLayer(w, cfg) for w in weights]).eval()
        if variant == "all":
            buf = gs.wrap_decoder_layers(model, layout=gs.BankLayout(d, 0), num_slots=gs.NUM_SLOTS, max_tokens=batch,
                                         steerable_layers=None, capture_layers=[], device=device, dtype=dtype,
                                         eager=False, saes=None, max_sas_support=gs.SAS_SUPPORT)
            gs.fill(buf, K=256, composed=1, sas_layer=None, batch=batch, seed=7, scale=4.0)
        torch._dynamo.reset()
        compiled = torch.compile(model) if cuda else model

        def run(compiled=compiled) -> None:
            with torch.no_grad():
                compiled(positions, x)

        res[variant] = kernel_profile(run, args.steps, cuda)
    return res


def warp_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Graph time of the steer op per warp count (the kernel's own choice marked)."""
    device = torch.device("cuda")
    rows = []
    chosen = steer_triton._num_warps
    try:
        for d in args.hidden:
            bank = gk.steer_bank(d, gs.NUM_SLOTS, device, seed=d)
            own = chosen(1 << (d - 1).bit_length())
            for T in args.tokens:
                c = gk.tokens_case(T, d, gs.NUM_SLOTS, torch.bfloat16, device, seed=T + d)
                used = int(c["index"].unique().numel())
                for w in WARPS:
                    steer_triton._num_warps = lambda _b, w=w: w
                    fn = lambda: steer_triton.steer_residual_triton(c["hidden"], c["residual"], bank,  # noqa: E731
                                                                     c["index"], rank=0)
                    secs = gk.time_in_graph(fn, cuda=True, calls=20, warmup=5, iters=20)
                    gbs = gk.steer_bytes(T, d, 2, used) / secs / 1e9
                    rows.append({"hidden": d, "tokens": T, "warps": w, "chosen": w == own, "us": secs * 1e6,
                                 "gbs": gbs})
    finally:
        steer_triton._num_warps = chosen
    return rows


def markdown(res: dict[str, Any]) -> str:
    """The profile and the sweep as markdown tables."""
    lines = ["## GPU profile: kernels of a compiled stack, plain vs steered at all layers", "",
             f"Command: `{res['command']}`  ", f"Device: {res['device']} (torch {res['torch']})  ",
             f"Model shape {res['model']}, batch {res['batch']}, K=256 configs, torch.compile default mode", ""]
    prof = res["profile"]
    names = sorted(set(prof["plain"]) | set(prof["all"]),
                   key=lambda k: -(prof["all"].get(k, {}).get("us", 0) + prof["plain"].get(k, {}).get("us", 0)))
    lines += ["| kernel | plain calls/step | plain us/step | steered calls/step | steered us/step |",
              "|---|---:|---:|---:|---:|"]
    for k in names[:25]:
        p, s = prof["plain"].get(k, {}), prof["all"].get(k, {})
        lines.append(f"| `{k[:90]}` | {p.get('calls', 0):.0f} | {p.get('us', 0):.1f} | {s.get('calls', 0):.0f} | "
                     f"{s.get('us', 0):.1f} |")
    tot = {v: sum(e["us"] for e in prof[v].values()) for v in ("plain", "all")}
    lines += [f"| **total** | | {tot['plain']:.1f} | | {tot['all']:.1f} |", ""]
    if res["warps"]:
        lines += ["### Steer op (Triton) by warp count, inside a CUDA graph", "",
                  f"Copy bandwidth {res['copy_gbs']:.0f} GB/s; * = the kernel's own choice", "",
                  "| hidden | tokens | warps | us | GB/s | of copy |", "|---:|---:|---:|---:|---:|---:|"]
        for r in res["warps"]:
            lines.append(f"| {r['hidden']} | {r['tokens']} | {r['warps']}{' *' if r['chosen'] else ''} | "
                         f"{r['us']:.1f} | {r['gbs']:.0f} | {r['gbs'] / res['copy_gbs']:.2f} |")
    if res["smoke"]:
        lines += ["", "Smoke run (CPU, tiny stack, CPU profile, no sweep): the numbers mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny stack, no sweep; numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    p.add_argument("--model", default=None, help=f"of {sorted(gs.MODELS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[1536, 4096, 8192])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 8192])
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_profile_stack.py: no CUDA GPU here; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    args.model = args.model or ("llama-1.5b" if cuda else "tiny")
    args.batch = args.batch or (256 if cuda else 16)
    command = "python benchmarks/gpu_profile_stack.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    res = {"command": command, "device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
           "smoke": not cuda, "model": args.model, "batch": args.batch}
    res["profile"] = profile_stack(args, cuda)
    res["copy_gbs"] = gk.copy_bandwidth(torch.device("cuda"), 1024, warmup=5, iters=20) if cuda else 0.0
    res["warps"] = warp_sweep(args) if cuda else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_profile_stack.json").write_text(json.dumps(res, indent=2))
    (args.out / "gpu_profile_stack.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
