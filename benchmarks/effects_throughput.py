"""Feature-effect measurement throughput on the default model: fused (SAE codes summed inside the
engine during generation) vs the two-pass reference vs plain vLLM generating the same rollouts.

Workload: ``--vectors`` decoder rows of the SAE (unit norm, x ``--scale``) at its layer, each with
``--rollouts`` rollouts of ``--tokens`` tokens from "I think" (top_k 50, top_p 0.3, no EOS stop:
the SAE-TS reference's sampling), all in one batched call per scenario:

- plain vLLM: the same number of rollouts, unsteered, no measurement;
- vsteer steered, no measurement: the same steered rollouts (same seeds), nothing summed;
- vsteer fused: every rollout its own steering and effect row (``vsteer.effects`` method fused);
- vsteer two-pass: steered generation, then ``capture`` of the finished texts and the SAE encode
  on the host (method two_pass).

Rollouts/s and measured vectors per hour at the paper's 896 rollouts per vector. The unsteered
baseline is measured once per job and left out of all three.

Run:  python benchmarks/effects_throughput.py   (writes results/effects-throughput-cpu.json and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, cpu_env, publish, stored_sae  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Feature-effect measurement throughput (CPU)"
AIM = 0.90
PAPER_ROLLOUTS = 896


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="smollm2-l15-4k")
    ap.add_argument("--vectors", type=int, default=16)
    ap.add_argument("--rollouts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    cpu_env(args.threads)

    import torch
    import vllm

    from vsteer.effects.measure import RolloutConfig, probe_specs, rollout_sums
    from vsteer.engine.llm import LLM
    from vsteer.models import prepare_default_model

    torch.set_num_threads(args.threads)
    sae = stored_sae(args.sae, "effects_throughput")
    model_path = str(prepare_default_model())
    config = RolloutConfig(rollouts=args.rollouts, tokens=args.tokens)
    n_rollouts = args.vectors * args.rollouts
    engine_kw = dict(enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=args.max_num_seqs,
                     kv_cache_memory_bytes=3 * 2**30)
    rows: list[dict] = []

    def timed(name: str, run) -> None:
        run()  # warm-up
        samples = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            samples.append(n_rollouts / (time.perf_counter() - t))
        rps = statistics.median(samples)
        rows.append({"scenario": name, "rollouts_per_s": round(rps, 2), "samples": [round(s, 2) for s in samples],
                     "vectors_per_hour_at_896": round(rps * 3600 / PAPER_ROLLOUTS, 1)})
        print(f"{name:32s} {rps:8.2f} rollouts/s  {rows[-1]['samples']}", flush=True)

    plain = vllm.LLM(model=model_path, **engine_kw)
    params = [vllm.SamplingParams(max_tokens=args.tokens, temperature=1.0, top_k=50, top_p=0.3, seed=r, ignore_eos=True)
              for _ in range(args.vectors) for r in range(args.rollouts)]
    timed("plain vLLM (same rollouts)", lambda: plain.generate(["I think"] * n_rollouts, params, use_tqdm=False))

    llm = LLM(model_path, store=tempfile.mkdtemp(), saes=[args.sae], effect_saes=[args.sae], **engine_kw)
    d = sae.W_dec.detach()[: args.vectors].float()
    specs = probe_specs(llm, d / d.norm(dim=1, keepdim=True), torch.full((args.vectors,), args.scale), sae.layer)
    steering = [spec for spec in specs for _ in range(args.rollouts)]
    timed("vsteer steered, no measurement", lambda: llm.generate(["I think"] * n_rollouts, params, steering=steering))
    timed("vsteer fused", lambda: rollout_sums(llm, sae, specs, config, args.rollouts, method="fused"))
    timed("vsteer two-pass", lambda: rollout_sums(llm, sae, specs, config, args.rollouts, method="two_pass"))

    base = rows[0]["rollouts_per_s"]
    for r in rows:
        r["x_plain_vllm"] = round(r["rollouts_per_s"] / base, 3)
    steered, fused, two = rows[1], rows[2], rows[3]
    aim_met = fused["x_plain_vllm"] >= AIM
    machine = (f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, "
               f"{args.threads} threads, {args.dtype}, eager")
    lines = [f"{args.vectors} vectors (decoder rows of `{args.sae}`, layer {sae.layer}, d_sae {sae.d_sae}) x "
             f"{args.rollouts} rollouts x {args.tokens} tokens from \"I think\" (top_k 50, top_p 0.3, no EOS stop), "
             f"scale {args.scale}; one batched call per scenario, max_num_seqs {args.max_num_seqs}; median of "
             f"{args.repeats} runs after a warm-up.", "",
             "| scenario | rollouts/s | x plain vLLM | vectors/hour at 896 rollouts |", "|---|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['rollouts_per_s']} | {r['x_plain_vllm']} | {r['vectors_per_hour_at_896']} |" for r in rows]
    lines += ["", f"Fused vs two-pass: {fused['rollouts_per_s'] / two['rollouts_per_s']:.2f}x; fused vs the same steered "
              f"rollouts without measurement: {fused['rollouts_per_s'] / steered['rollouts_per_s']:.2f}x (the measurement's "
              f"own cost, including its extra token per rollout). Aim (fused >= {AIM} x plain "
              f"vLLM): {'met' if aim_met else 'NOT met'}."]
    publish(SECTION, args.out_dir / "effects-throughput-cpu.json", {"rows": rows, "aim_met": aim_met}, lines, machine=machine)


if __name__ == "__main__":
    main()
