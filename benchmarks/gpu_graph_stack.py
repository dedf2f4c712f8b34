"""Steered vs plain decoder stacks under CUDA graphs, with a replay-correctness check.

Usage (GPU, torch + Triton, no vLLM needed; see benchmarks/gpu_evidence.sh)::

    python benchmarks/gpu_graph_stack.py --out benchmarks/results
    python benchmarks/gpu_graph_stack.py --smoke --out /tmp/x    # CPU: tiny stack, eager only

The stack: ``layers`` vLLM-shaped decoder layers (a ``LlamaDecoderLayer`` whose forward takes
``(positions, hidden_states, residual)`` and returns ``(hidden, residual)``, its class placed in
``vllm.model_executor.models.llama`` so that :func:`vsteer.engine.layers.find_decoder_layers`
accepts it) with the shapes of a 1.5B (hidden 1536, MLP 8960, 28 layers, 12/2 heads) and an 8B
Llama (4096, 14336, 32, 32/8), random bf16 weights, a decode batch of 256 tokens. Each layer
runs RMSNorm, the QKV and output projections, RMSNorm and the gated MLP; attention over a KV
cache is replaced by a token-local stand-in (``q * sigmoid(k) + v``, no cache), so a layer costs
less than a real one and the steering overhead reads HIGH against this plain stack.

Variants are built by :func:`vsteer.engine.layers.wrap_decoder_layers` itself (eager=False, the
branch-free op the engine compiles), sharing the plain stack's weights:

- steer at one (middle) layer, at all layers; K = 1, 64 or 256 distinct configs in the batch
  (token t on slot ``1 + t % K``, every 8th token on slot 0, unsteered);
- all layers, 4 composed vectors (folded into one slot row on the host, as the engine does);
- SAS at one layer: a ReLU SAE with ``--d-sae`` features, a union buffer of 128 features, K=256.

The number of configs only changes buffer contents, so one capture serves K = 1/64/256. Two
graph modes: ``torch.compile(mode="reduce-overhead")`` (inductor + CUDA graph trees) and a manual
``torch.cuda.CUDAGraph`` of the eager forward. Timing: CUDA events over ``--iters`` replays,
median of ``--repeats``; ratios are to the plain stack in the same mode and run.

Correctness under replay: for every variant and K, the buffers are filled, the graph replayed
and its output compared with an eager run of the same stack; then bank rows and slot indices are
changed in place and the check repeated. Slot-0 tokens must equal the plain stack's output.
Manual graphs must match eager to 1e-3 (relative to the output's max); compiled graphs within
max(2e-2, 3x the plain stack's compiled-vs-eager error).

Writes ``gpu_graph_stack.json`` and ``.md`` into ``--out``. ``--smoke``: CPU, a tiny float32
stack, eager only (no graphs, no compile): it checks the script and the wrapping, its timings
mean nothing. ``--budget-s`` bounds the run: compiled variants left when it runs out are
recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import _gpu_shim

VSTEER_FROM = _gpu_shim.ensure_vsteer()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import vsteer  # noqa: E402
from vsteer.engine.layers import SteeringBuffers, find_decoder_layers, wrap_decoder_layers  # noqa: E402
from vsteer.kernels import BankLayout  # noqa: E402

MODELS = {
    "llama-1.5b": dict(hidden=1536, ffn=8960, layers=28, heads=12, kv_heads=2),
    "llama-8b": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8),
}
SMOKE_MODELS = {"tiny": dict(hidden=64, ffn=128, layers=3, heads=4, kv_heads=2)}
NUM_SLOTS = 256
SAS_SUPPORT = 128


class LlamaDecoderLayer(nn.Module):
    """A vLLM-shaped decoder layer: ``forward(positions, hidden_states, residual) -> (hidden,
    residual)``, the true residual stream being their sum (vLLM's fused add + RMSNorm)."""

    def __init__(self, w: dict[str, torch.Tensor], cfg: dict[str, int]) -> None:
        super().__init__()
        for name, t in w.items():
            self.register_buffer(name, t, persistent=False)
        self.d = cfg["hidden"]
        self.kv = cfg["hidden"] // cfg["heads"] * cfg["kv_heads"]
        self.rep = cfg["heads"] // cfg["kv_heads"]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states if residual is None else hidden_states + residual
        h = self._norm(residual, self.ln1)
        qkv = h @ self.wqkv
        q, k, v = qkv.split([self.d, self.kv, self.kv], dim=-1)
        k = k.repeat_interleave(self.rep, dim=-1)
        v = v.repeat_interleave(self.rep, dim=-1)
        attn = q * torch.sigmoid(k) + v  # token-local stand-in for attention (module docstring)
        residual = attn @ self.wo + residual
        h = self._norm(residual, self.ln2)
        gate, up = (h @ self.wgu).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.wdown, residual


# find_decoder_layers accepts vLLM's own classes only (module vllm.model_executor.models.*).
LlamaDecoderLayer.__module__ = "vllm.model_executor.models.llama"


class _Inner(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class Stack(nn.Module):
    """``model.layers`` (the path vLLM's Llama uses) run in order; returns the residual stream."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.model = _Inner(layers)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


def make_weights(cfg: dict[str, int], dtype: torch.dtype, device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random per-layer weights, scaled so activations stay O(1) through the stack."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, f = cfg["hidden"], cfg["ffn"]
    kv = d // cfg["heads"] * cfg["kv_heads"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) / shape[0] ** 0.5 * 0.5).to(dtype)

    return [{"ln1": torch.ones(d, device=device, dtype=dtype), "ln2": torch.ones(d, device=device, dtype=dtype),
             "wqkv": rnd(d, d + 2 * kv), "wo": rnd(d, d), "wgu": rnd(d, 2 * f), "wdown": rnd(f, d)}
            for _ in range(cfg["layers"])]


@dataclass
class BenchSae:
    """The attributes :func:`wrap_decoder_layers` reads from an SAE (a ReLU SAE, random weights);
    keeps this script free of ``vsteer.sae``'s file-format dependencies."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    threshold: torch.Tensor
    activation: str = "relu"
    config: Any = field(default_factory=lambda: type("Cfg", (), {"k": None})())

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encoder_bias(self) -> torch.Tensor:
        return self.b_enc


def make_sae(d: int, m: int, device: torch.device, seed: int) -> BenchSae:
    g = torch.Generator(device=device).manual_seed(seed)
    return BenchSae(W_enc=torch.randn(d, m, generator=g, device=device) / d**0.5,
                    b_enc=0.05 * torch.randn(m, generator=g, device=device),
                    W_dec=torch.randn(m, d, generator=g, device=device) / d**0.5,
                    threshold=torch.zeros(m, device=device))


# ----------------------------------------------------------------------------- buffer contents


def fill(buf: SteeringBuffers, *, K: int, composed: int, sas_layer: int | None, batch: int, seed: int,
         scale: float) -> None:
    """Write K configs into the bank (slots 1..K; each the fold of ``composed`` random vectors,
    or SAS rows on the union) and the slot index (token t -> 1 + t % K, every 8th token -> 0)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = buf.bank.device
    L, _, W = buf.bank.shape
    lay = BankLayout((W - 1) // 2, 0)  # rank 0: W = 2d + 1
    buf.bank.copy_(lay.identity_bank(buf.bank.shape[0] * buf.bank.shape[1], device=dev).view_as(buf.bank))
    if sas_layer is None:
        vecs = torch.randn(composed, L, K, lay.hidden_size, generator=g).sum(0) * scale / composed**0.5
        buf.bank[:, 1:K + 1, lay.a_slice] = vecs.to(dev)
    else:
        s = buf.sas[sas_layer]
        feats = torch.randperm(s.d_sae, generator=g)[:SAS_SUPPORT]
        s.union[: feats.numel()].copy_(feats)
        s.bank.zero_()
        pick = torch.rand(K, feats.numel(), generator=g) < 0.5
        s.bank[1:K + 1, feats.to(dev)] = torch.where(pick, 4 * torch.randn(K, feats.numel(), generator=g),
                                                     torch.zeros(())).to(dev)
    slots = 1 + torch.arange(batch) % K
    slots[::8] = 0
    slots = slots[torch.randperm(batch, generator=g)]
    buf.index[:batch].copy_(slots.to(torch.int32))


SCENARIOS = [  # name, variant, K, composed vectors
    ("one layer, K=1", "one", 1, 1), ("one layer, K=64", "one", 64, 1), ("one layer, K=256", "one", 256, 1),
    ("all layers, K=1", "all", 1, 1), ("all layers, K=64", "all", 64, 1), ("all layers, K=256", "all", 256, 1),
    ("all layers, 4 composed vectors, K=1", "all", 1, 4), ("all layers, 4 composed vectors, K=256", "all", 256, 4),
    ("SAS one layer, support 128, K=1", "sas", 1, 1), ("SAS one layer, support 128, K=256", "sas", 256, 1),
]


# ----------------------------------------------------------------------------- running


def timed(fn: Callable[[], object], *, cuda: bool, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``iters`` calls."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) / iters)
    return statistics.median(out)


def manual_graph(model: nn.Module, positions: torch.Tensor, x: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``model(positions, x)`` in a ``torch.cuda.CUDAGraph``; return (replay, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(positions, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(positions, x)
    return graph.replay, out


def _inductor_counters() -> dict[str, int]:
    """Inductor's event counters (cumulative; empty if unavailable)."""
    try:
        from torch._dynamo.utils import counters

        return dict(counters["inductor"])
    except Exception:  # noqa: BLE001
        return {}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float32)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def bench_model(name: str, cfg: dict[str, int], args: argparse.Namespace, deadline: float,
                result: dict[str, Any], save: Callable[[], None]) -> None:
    """All variants and modes for one model shape, filled into ``result`` as they finish (``save``
    is called after each, so a run cut short keeps what it measured)."""
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = args.batch
    weights = make_weights(cfg, dtype, device, seed=1)
    d, L = cfg["hidden"], cfg["layers"]
    mid = L // 2
    positions = torch.arange(batch, device=device)
    x = (torch.randn(batch, d, generator=torch.Generator(device="cpu").manual_seed(2)) * 0.5).to(device, dtype)

    def build(variant: str) -> tuple[nn.Module, SteeringBuffers | None]:
        model = Stack([LlamaDecoderLayer(w, cfg) for w in weights]).eval()
        if variant == "plain":
            return model, None
        assert len(find_decoder_layers(model)) == L
        buf = wrap_decoder_layers(
            model, layout=BankLayout(d, 0), num_slots=NUM_SLOTS, max_tokens=batch,
            steerable_layers=None if variant == "all" else [mid], capture_layers=[], device=device, dtype=dtype,
            eager=False, saes={mid: make_sae(d, args.d_sae, device, seed=3)} if variant == "sas" else None,
            max_sas_support=SAS_SUPPORT)
        return model, buf

    modes = ["eager"] if not cuda else ["cuda_graph", "compile_reduce_overhead"]
    variants = {v: build(v) for v in ("plain", "one", "all", "sas")}
    with torch.no_grad():
        plain_ref = variants["plain"][0](positions, x).clone()
    result.update({"model": name, "shape": cfg, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                   "rows": [], "checks": []})
    rows: list[dict[str, Any]] = result["rows"]
    checks: list[dict[str, Any]] = result["checks"]
    plain_time: dict[str, float] = {}
    plain_err: dict[str, float] = {}
    for mode in modes:
        for variant in ("plain", "one", "all", "sas"):
            model, buf = variants[variant]
            if mode == "compile_reduce_overhead" and time.monotonic() > deadline:
                rows.append({"model": name, "mode": mode, "variant": variant, "skipped": "time budget (--budget-s)"})
                save()
                continue
            if buf is not None:  # contents for the capture; replays below change them
                fill(buf, K=1, composed=1, sas_layer=mid if variant == "sas" else None, batch=batch, seed=0,
                     scale=args.scale)
            t0 = time.monotonic()
            skips0 = int(_inductor_counters().get("cudagraph_skips", 0))
            if mode == "cuda_graph":
                replay, out = manual_graph(model, positions, x)
                run = replay
            elif mode == "compile_reduce_overhead":
                torch._dynamo.reset()
                compiled = torch.compile(model, mode="reduce-overhead")
                holder: dict[str, torch.Tensor] = {}

                def run(compiled=compiled, holder=holder) -> None:
                    with torch.no_grad():
                        holder["out"] = compiled(positions, x)
                run()
                run()
                run()
            else:
                holder = {}

                def run(model=model, holder=holder) -> None:
                    with torch.no_grad():
                        holder["out"] = model(positions, x)
            setup_s = time.monotonic() - t0
            # inductor counts graphs it could not put in a CUDA graph; nonzero means the
            # compiled row was NOT timed under CUDA graphs
            skips = int(_inductor_counters().get("cudagraph_skips", 0)) - skips0

            def output() -> torch.Tensor:
                if cuda:
                    torch.cuda.synchronize()
                return (out if mode == "cuda_graph" else holder["out"]).clone()

            if variant == "plain":
                plain_time[mode] = timed(run, cuda=cuda, iters=args.iters, repeats=args.repeats)
                run()
                plain_err[mode] = rel(output(), plain_ref)
                rows.append({"model": name, "mode": mode, "variant": "plain", "scenario": "plain",
                             "ms": plain_time[mode] * 1e3, "tokens_per_s": batch / plain_time[mode],
                             "ratio_to_plain": 1.0, "setup_s": setup_s, "cudagraph_skips": skips,
                             "err_vs_eager": plain_err[mode]})
                save()
                continue
            for scen, v, K, composed in SCENARIOS:
                if v != variant:
                    continue
                sas_layer = mid if variant == "sas" else None
                check = {"model": name, "mode": mode, "scenario": scen}
                for step in range(2):  # fill, replay, check; then change rows and indices in place
                    fill(buf, K=K, composed=composed, sas_layer=sas_layer, batch=batch, seed=100 * K + 10 * composed + step,
                         scale=args.scale)
                    run()
                    got = output()
                    with torch.no_grad():
                        want = model(positions, x).clone()
                    zero = buf.index[:batch] == 0
                    err = rel(got, want)
                    tol = 1e-3 if mode in ("cuda_graph", "eager") else max(2e-2, 3 * plain_err[mode])
                    effect = rel(want[~zero], plain_ref[~zero])
                    unsteered = rel(got[zero], plain_ref[zero])
                    # effect > 2 tol: the steering moved the output by more than the tolerance, so the
                    # comparison is not vacuous
                    ok = err <= tol and unsteered <= max(tol, plain_err[mode] * 1.01) and effect > 2 * tol
                    check[f"replay{step}"] = {"err_vs_eager": err, "tol": tol, "steer_effect": effect,
                                              "slot0_err_vs_plain": unsteered, "ok": ok}
                check["ok"] = all(check[f"replay{s}"]["ok"] for s in range(2))
                checks.append(check)
                secs = timed(run, cuda=cuda, iters=args.iters, repeats=args.repeats)
                idx = buf.index[:batch]
                rows.append({"model": name, "mode": mode, "variant": variant, "scenario": scen, "ms": secs * 1e3,
                             "tokens_per_s": batch / secs, "ratio_to_plain": secs / plain_time[mode],
                             "distinct_configs": int(idx[idx > 0].unique().numel()), "setup_s": setup_s,
                             "cudagraph_skips": skips, "replay_ok": check["ok"]})
            save()
            if mode == "compile_reduce_overhead":
                del compiled
            if cuda:
                torch.cuda.synchronize()
    del variants, weights
    if cuda:
        torch.cuda.empty_cache()


def markdown(res: dict[str, Any], command: str) -> str:
    """Results as markdown tables."""
    lines = ["## GPU graph stack: steered vs plain decoder stacks under CUDA graphs", "",
             f"Command: `{command}`  ", f"Device: {res['device']} (torch {res['torch']})  ",
             f"Batch {res['batch']} decode tokens, {NUM_SLOTS} slots, attention replaced by a token-local stand-in "
             "(steering overhead reads high).  ", f"Complete: {res['complete']}; all replay checks pass: {res['all_ok']}", ""]
    for m in res["models"]:
        if "shape" not in m:
            continue
        lines += [f"### {m['model']} ({m['shape']['layers']} layers, hidden {m['shape']['hidden']}, {m['dtype']})", "",
                  "| mode | scenario | ms/step | tokens/s | x plain | configs | graph skips | replay check |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in m["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['mode']} | {r['variant']} | skipped: {r['skipped']} | | | | | |")
                continue
            lines.append(f"| {r['mode']} | {r['scenario']} | {r['ms']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['ratio_to_plain']:.3f} | {r.get('distinct_configs', 0)} | {r['cudagraph_skips']} | "
                         f"{r.get('replay_ok', '-')} |")
        lines.append("")
    if res["smoke"]:
        lines.append("Smoke run (CPU, tiny float32 stack, eager only): the timings mean nothing.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 1 when a replay check fails."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny stack, eager only; timings mean nothing")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--models", nargs="+", help=f"of {sorted(MODELS)}")
    p.add_argument("--batch", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--scale", type=float, default=4.0, help="norm scale of the random steering vectors")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip compiled variants after this many seconds")
    args = p.parse_args(argv)
    big = not args.smoke
    table = MODELS if big else SMOKE_MODELS
    names = args.models or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {sorted(table)}")
    for key, value in dict(batch=256 if big else 16, d_sae=16384 if big else 256, iters=20 if big else 2,
                           repeats=5 if big else 1).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if big and not torch.cuda.is_available():
        print("gpu_graph_stack.py: no CUDA GPU here; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    command = "python benchmarks/gpu_graph_stack.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    models: list[dict[str, Any]] = []
    res = {"command": command, "device": torch.cuda.get_device_name() if big else "CPU", "smoke": args.smoke,
           "torch": torch.__version__, "vsteer_from": f"{VSTEER_FROM}: {Path(vsteer.__file__).parent}",
           "batch": args.batch, "num_slots": NUM_SLOTS, "d_sae": args.d_sae, "models": models,
           "complete": False, "all_ok": False}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["all_ok"] = res["complete"] and all(c["ok"] for m in models for c in m.get("checks", []))
        (args.out / "gpu_graph_stack.json").write_text(json.dumps(res, indent=2))
        (args.out / "gpu_graph_stack.md").write_text(markdown(res, command))

    # a timeout's SIGTERM ends the run through Python, so what was measured is saved below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for n in names:
            models.append({})
            bench_model(n, table[n], args, deadline, models[-1], save)
        res["complete"] = True
    finally:
        save()
    print(markdown(res, command))
    if not res["all_ok"]:
        bad = [c for m in models for c in m["checks"] if not c["ok"]]
        print(f"gpu_graph_stack.py: {len(bad)} replay checks failed; first: {json.dumps(bad[0])}", file=sys.stderr)
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
