"""vsteer against what people steer with today, on one workload and one machine, in one run.

Workload: ``--num-prompts`` prompts x ``--max-tokens`` new tokens, greedy, fixed length. Scenarios:

- plain vLLM (no steering);
- vsteer with K distinct steering configs in the batch (each a random unit vector x ``--scale`` at
  layer 10, assigned round-robin), K in ``--ks``;
- HF transformers ``generate`` with a forward hook on layer 10 adding each row's own vector
  (left-padded batch; K distinct as above), which is how hook libraries steer;
- the ``steering-vectors`` library (one vector for the whole batch: it has no per-row vectors),
  when it imports (it pins transformers<5; install it with ``--no-deps``).

Also the slot-bank memory: the formula from the README and the engine's measured bank size.

Run:  python benchmarks/compare.py     (writes results/compare-cpu.{json,png} and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import publish  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Against the alternatives (CPU)"
LAYER = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,8,64")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    os.environ.update(OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                      VLLM_NO_USAGE_STATS="1")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp())
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vsteer.engine.llm import LLM
    from vsteer.models import prepare_default_model
    from vsteer.vectors import SteeringVector

    torch.set_num_threads(args.threads)
    model_path = str(prepare_default_model())
    dtype = getattr(torch, args.dtype)
    subjects = ["the sea", "a city", "my family", "the future", "music", "a forest", "winter", "old friends"]
    prompts = [f"Write about {subjects[i % len(subjects)]}, part {i}:" for i in range(args.num_prompts)]
    g = torch.Generator().manual_seed(0)
    directions = [(lambda v: args.scale * v / v.norm())(torch.randn(576, generator=g)) for _ in range(max(ks))]
    rows: list[dict] = []

    def record(name: str, k: int | None, seconds: float, tokens: int) -> None:
        rows.append({"scenario": name, "k": k, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)})
        print(f"{name:45s} {tokens / seconds:9.1f} tok/s", flush=True)

    engine_kw = dict(enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=args.num_prompts,
                     kv_cache_memory_bytes=2 * 2**30)
    params = vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    plain = vllm.LLM(model=model_path, **engine_kw)
    plain.generate(prompts[:4], params, use_tqdm=False)
    t = time.perf_counter()
    outs = plain.generate(prompts, params, use_tqdm=False)
    record("plain vLLM", None, time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))

    llm = LLM(model_path, store=tempfile.mkdtemp(), **engine_kw)
    shas = [llm.store.put(SteeringVector.from_tensors({LAYER: d})) for d in directions]
    llm.generate(prompts[:4], params)
    for k in ks:
        specs = [{"interventions": [{"op": "add", "vector": shas[i % k], "layers": [LAYER]}]} for i in range(len(prompts))]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, steering=specs)
        record(f"vsteer, K={k}", k, time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))
    stats = llm.stats()

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)

    def hf_generate() -> int:
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    hf_generate()  # warm-up
    for k in ks:
        per_row = torch.stack([directions[i % k] for i in range(len(prompts))]).to(dtype)[:, None, :]

        def hook(module, inputs, output, per_row=per_row):
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden + per_row
            return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

        handle = hf.model.layers[LAYER].register_forward_hook(hook)
        t = time.perf_counter()
        tokens = hf_generate()
        record(f"HF generate + forward hook, K={k}", k, time.perf_counter() - t, tokens)
        handle.remove()

    try:
        from steering_vectors import SteeringVector as LibVector

        lib = LibVector(layer_activations={LAYER: directions[0].to(dtype)}, layer_type="decoder_block")
        with lib.apply(hf, multiplier=1.0):
            t = time.perf_counter()
            tokens = hf_generate()
        record("steering-vectors library (one vector), K=1", 1, time.perf_counter() - t, tokens)
    except Exception as exc:  # noqa: BLE001 - an optional baseline
        print(f"steering-vectors not run: {exc}", flush=True)

    plain_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_plain_vllm"] = round(r["tokens_per_s"] / plain_tps, 3)
    layers, slots, rank, hidden = 30, stats["max_slots"] + 1, 1, 576
    memory = {"bank_bytes_formula": layers * slots * (2 + 2 * rank) * hidden * 4 + layers * slots * 4,
              "bank_bytes_measured": stats["bank_bytes"], "capture_bytes_measured": stats["capture_bytes"],
              "per_slot_per_layer_bytes": (2 + 2 * rank) * hidden * 4 + 4}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, vLLM {vllm.__version__}, {args.threads} threads, {args.dtype}, eager"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out_dir / "compare-cpu.png")
    lines = [f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens (fixed length), K distinct random unit "
             f"vectors x {args.scale} at layer {LAYER}, round-robin over the prompts. One run, after a warm-up of "
             "each engine. Plot: `results/compare-cpu.png`.", "",
             "| scenario | tok/s | x plain vLLM |", "|---|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['tokens_per_s']} | {r['x_plain_vllm']} |" for r in rows]
    lines += ["", f"Slot-bank memory: `layers x (max_slots + 1) x ((2 + 2*max_ablation_rank) x hidden + 1) x 4` bytes "
              f"= {memory['bank_bytes_formula']:,} bytes for 30 layers, {slots} slots, rank 1, hidden 576; the "
              f"engine's bank measures {memory['bank_bytes_measured']:,} bytes ({memory['per_slot_per_layer_bytes']:,} "
              f"bytes per slot per layer). Capture buffers: {memory['capture_bytes_measured']:,} bytes."]
    publish(SECTION, args.out_dir / "compare-cpu.json", {"rows": rows, "memory": memory}, lines, machine=machine)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for prefix, marker in (("vsteer", "o"), ("HF generate", "s")):
        pts = [(r["k"], r["tokens_per_s"]) for r in rows if r["scenario"].startswith(prefix)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=prefix)
    ax.axhline(rows[0]["tokens_per_s"], color="gray", linestyle="--", label="plain vLLM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct steering configs in the batch (K)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("SmolLM2-135M on 2 CPU cores")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
