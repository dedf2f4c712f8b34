"""vsteer against what people steer with today, on one workload and one machine, in one run.

Workload: ``--num-prompts`` prompts x ``--max-tokens`` new tokens, fixed length, once greedy and
once sampled (temperature 1, top_p 0.9, top_k 50; ``--decoding``). Scenarios, for each decoding:

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Against the alternatives (CPU)"
LAYER = 10
SAMPLING = {
    "greedy": {"vllm": {"temperature": 0.0}, "hf": {"do_sample": False}},
    "sampled": {"vllm": {"temperature": 1.0, "top_p": 0.9, "top_k": 50},
                "hf": {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 50}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,8,64")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decoding", default="greedy,sampled", help="greedy and/or sampled (temperature 1, top_p 0.9, top_k 50)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    decodings = [d.strip() for d in args.decoding.split(",") if d.strip()]
    if not decodings or set(decodings) - set(SAMPLING):
        sys.exit(f"--decoding: choose from {', '.join(SAMPLING)}")
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

    def record(name: str, k: int | None, decoding: str, seconds: float, tokens: int) -> None:
        rows.append({"scenario": name, "k": k, "decoding": decoding, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1)})
        print(f"{name:45s} {decoding:8s} {tokens / seconds:9.1f} tok/s", flush=True)

    engine_kw = dict(enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=args.num_prompts,
                     kv_cache_memory_bytes=2 * 2**30)
    params = {d: vllm.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **SAMPLING[d]["vllm"]) for d in decodings}
    plain = vllm.LLM(model=model_path, seed=0, **engine_kw)
    llm = LLM(model_path, store=tempfile.mkdtemp(), seed=0, **engine_kw)
    shas = [llm.store.put(SteeringVector.from_tensors({LAYER: d})) for d in directions]
    plain.generate(prompts[:4], params[decodings[0]], use_tqdm=False)
    llm.generate(prompts[:4], params[decodings[0]])
    for decoding in decodings:
        t = time.perf_counter()
        outs = plain.generate(prompts, params[decoding], use_tqdm=False)
        record("plain vLLM", None, decoding, time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))
        for k in ks:
            specs = [{"interventions": [{"op": "add", "vector": shas[i % k], "layers": [LAYER]}]} for i in range(len(prompts))]
            t = time.perf_counter()
            outs = llm.generate(prompts, params[decoding], steering=specs)
            record(f"vsteer, K={k}", k, decoding, time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))
    stats = llm.stats()

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)

    def hf_generate(decoding: str) -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                              pad_token_id=tok.pad_token_id, **SAMPLING[decoding]["hf"])
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    hf_generate(decodings[0])  # warm-up
    try:
        from steering_vectors import SteeringVector as LibVector
    except Exception as exc:  # noqa: BLE001 - an optional baseline
        LibVector = None
        print(f"steering-vectors not run: {exc}", flush=True)
    for decoding in decodings:
        for k in ks:
            per_row = torch.stack([directions[i % k] for i in range(len(prompts))]).to(dtype)[:, None, :]

            def hook(module, inputs, output, per_row=per_row):
                hidden = output[0] if isinstance(output, tuple) else output
                steered = hidden + per_row
                return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

            handle = hf.model.layers[LAYER].register_forward_hook(hook)
            t = time.perf_counter()
            tokens = hf_generate(decoding)
            record(f"HF generate + forward hook, K={k}", k, decoding, time.perf_counter() - t, tokens)
            handle.remove()
        if LibVector is not None:
            lib = LibVector(layer_activations={LAYER: directions[0].to(dtype)}, layer_type="decoder_block")
            with lib.apply(hf, multiplier=1.0):
                t = time.perf_counter()
                tokens = hf_generate(decoding)
            record("steering-vectors library (one vector), K=1", 1, decoding, time.perf_counter() - t, tokens)

    plain_tps = {r["decoding"]: r["tokens_per_s"] for r in rows if r["scenario"] == "plain vLLM"}
    for r in rows:
        r["x_plain_vllm"] = round(r["tokens_per_s"] / plain_tps[r["decoding"]], 3)
    layers, slots, rank, hidden = 30, stats["max_slots"] + 1, 1, 576
    memory = {"bank_bytes_formula": layers * slots * (2 + 2 * rank) * hidden * 4 + layers * slots * 4,
              "bank_bytes_measured": stats["bank_bytes"], "capture_bytes_measured": stats["capture_bytes"],
              "per_slot_per_layer_bytes": (2 + 2 * rank) * hidden * 4 + 4}
    machine = f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, {args.threads} threads, {args.dtype}, eager"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out_dir / "compare-cpu.png")
    lines = [f"{args.num_prompts} prompts x {args.max_tokens} new tokens (fixed length), greedy and sampled "
             "(temperature 1, top_p 0.9, top_k 50), K distinct random unit "
             f"vectors x {args.scale} at layer {LAYER}, round-robin over the prompts. One run, after a warm-up of "
             "each engine. Plot: `results/compare-cpu.png`.", "",
             "| scenario | decoding | tok/s | x plain vLLM (same decoding) |", "|---|---|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['decoding']} | {r['tokens_per_s']} | {r['x_plain_vllm']} |" for r in rows]
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
    for decoding, style in (("greedy", "-"), ("sampled", ":")):
        for prefix, marker in (("vsteer", "o"), ("HF generate", "s")):
            pts = [(r["k"], r["tokens_per_s"]) for r in rows if r["scenario"].startswith(prefix) and r["decoding"] == decoding]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, label=f"{prefix}, {decoding}")
        for r in rows:
            if r["scenario"] == "plain vLLM" and r["decoding"] == decoding:
                ax.axhline(r["tokens_per_s"], color="gray", linestyle="--" if decoding == "greedy" else ":",
                           label=f"plain vLLM, {decoding}")
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
