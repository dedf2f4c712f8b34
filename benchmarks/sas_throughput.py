"""SAS inside the engine: tokens/s of SAS vs additive steering vs plain vLLM, on the default model.

Workload: ``--num-prompts`` prompts (default 64, one batch) x ``--max-tokens`` greedy tokens, fixed
length. Scenarios, each in one ``generate`` call after a warm-up:

- plain vLLM;
- additive: every request its own random unit vector x ``--scale`` at the SAE's layer (K = 64);
- SAS, all requests: every request its own random sparse vector in the SAE's feature space with
  ``support`` non-zero features (values +-``--sas-value``), support in ``--supports``;
- SAS, a quarter: every 4th request SAS (support as above), the others additive.

The SAE is the default model's own (``vsteer sae train`` / ``benchmarks/sae_train.py`` store it as
``smollm2-l15-4k``). The engine is eager by default: there the SAS op encodes only the step's
union of supports (with 64 distinct random vectors of support 128 the union is ~3,500 of 4,096
features). ``--compile`` runs the compiled engine, whose union buffer has the fixed size
``--max-sas-support`` (default: d_sae, the full width).

Run:  python benchmarks/sas_throughput.py   (writes results/sas-throughput-cpu.{json,png} and a RESULTS.md section)
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
SECTION = "## SAS throughput (CPU)"
AIM = 0.90  # SAS with support <= 128 costs <= 10% over additive steering


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="smollm2-l15-4k", help="SAE name in the SAE store, or a path")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--supports", default="16,128,1024")
    ap.add_argument("--scale", type=float, default=4.0, help="norm of the additive vectors")
    ap.add_argument("--sas-value", type=float, default=2.0, help="|s| on each support feature (lambda = 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per scenario; the median is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-sas-support", type=int, default=None, help="default: the SAE's d_sae")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    supports = [int(s) for s in args.supports.split(",")]
    cpu_env(args.threads)

    import torch
    import vllm

    from vsteer.engine.llm import LLM
    from vsteer.models import prepare_default_model
    from vsteer.vectors import SteeringVector

    torch.set_num_threads(args.threads)
    sae = stored_sae(args.sae, "sas_throughput")
    layer, d_sae = sae.layer, sae.d_sae
    model_path = str(prepare_default_model())
    n = args.num_prompts
    subjects = ["the sea", "a city", "my family", "the future", "music", "a forest", "winter", "old friends"]
    prompts = [f"Write about {subjects[i % len(subjects)]}, part {i}:" for i in range(n)]
    params = vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine_kw = dict(enforce_eager=not args.compile, dtype=args.dtype, max_model_len=512, max_num_seqs=n,
                     kv_cache_memory_bytes=2 * 2**30)
    rows: list[dict] = []

    def timed(name: str, run, **info) -> None:
        run()  # warm-up (also loads the slots)
        samples = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = run()
            samples.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
        rows.append({"scenario": name, **info, "tokens_per_s": round(statistics.median(samples), 1),
                     "samples": [round(s, 1) for s in samples]})
        print(f"{name:40s} {rows[-1]['tokens_per_s']:9.1f} tok/s  {rows[-1]['samples']}", flush=True)

    plain = vllm.LLM(model=model_path, **engine_kw)
    timed("plain vLLM", lambda: plain.generate(prompts, params, use_tqdm=False))

    llm = LLM(model_path, store=tempfile.mkdtemp(), saes=[args.sae], max_sas_support=args.max_sas_support or d_sae, **engine_kw)
    g = torch.Generator().manual_seed(0)
    add_specs = []
    for _ in range(n):
        v = torch.randn(sae.d_in, generator=g)
        sha = llm.store.put(SteeringVector({layer: args.scale * v / v.norm()}, hidden_size=sae.d_in))
        add_specs.append({"interventions": [{"op": "add", "vector": sha, "layers": [layer]}]})
    timed("additive, all requests", lambda: llm.generate(prompts, params, steering=add_specs), support=None, sas_share=0.0)

    for support in supports:
        sas_specs = []
        for _ in range(n):
            s = torch.zeros(d_sae)
            feats = torch.randperm(d_sae, generator=g)[:support]
            s[feats] = args.sas_value * torch.where(torch.rand(support, generator=g) < 0.5, -1.0, 1.0)
            sha = llm.store.put(SteeringVector({layer: s}, hidden_size=d_sae))
            sas_specs.append({"interventions": [{"op": "sas", "vector": sha, "sae": args.sae, "scale": 1.0}]})
        timed(f"SAS support {support}, all requests", lambda: llm.generate(prompts, params, steering=sas_specs),
              support=support, sas_share=1.0)
        rows[-1]["union"] = llm.stats()["sas_union"].get(layer)  # the last step's: all requests still running
        quarter = [sas_specs[i] if i % 4 == 0 else add_specs[i] for i in range(n)]
        timed(f"SAS support {support}, 1/4 of requests", lambda: llm.generate(prompts, params, steering=quarter),
              support=support, sas_share=0.25)

    plain_tps, add_tps = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    for r in rows:
        r["x_plain_vllm"] = round(r["tokens_per_s"] / plain_tps, 3)
        r["x_additive"] = round(r["tokens_per_s"] / add_tps, 3)
    aim_rows = [r for r in rows if r.get("support") is not None and r["support"] <= 128]
    aim_met = all(r["x_additive"] >= AIM for r in aim_rows)
    mode = "compiled" if args.compile else "eager"
    machine = (f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, "
               f"{args.threads} threads, {args.dtype}, {mode}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, supports, args.out_dir / "sas-throughput-cpu.png")
    lines = [f"{n} prompts x {args.max_tokens} greedy tokens (fixed length), one batch; SAE `{args.sae}` "
             f"(layer {layer}, d_sae {d_sae}, {sae.activation}); every request its own random vector: additive "
             f"unit x {args.scale}, or sparse SAS (+-{args.sas_value} on `support` random features, lambda 1). "
             f"Median of {args.repeats} runs after a warm-up. Plot: `results/sas-throughput-cpu.png`.", "",
             "| scenario | union of the supports per step | tok/s | x plain vLLM | x additive |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r.get('union', '') or ''} | {r['tokens_per_s']} | {r['x_plain_vllm']} | {r['x_additive']} |"
              for r in rows]
    lines += ["", "Eager engines encode only the union's features while it covers less than half of d_sae, and "
              "every feature beyond that (reading all rows in order is cheaper than gathering most of them).",
              "", f"Aim (support <= 128 costs <= 10% over additive, i.e. x additive >= {AIM}): "
              f"{'met' if aim_met else 'NOT met'}."]
    publish(SECTION, args.out_dir / "sas-throughput-cpu.json", {"rows": rows, "aim_met": aim_met, "mode": mode},
            lines, machine=machine)


def _plot(rows: list[dict], supports: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for share, label in ((1.0, "SAS, all requests"), (0.25, "SAS, 1/4 of requests")):
        pts = [r for r in rows if r.get("sas_share") == share and r.get("support")]
        ax.plot([r["support"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=label)
    ax.axhline(rows[0]["tokens_per_s"], color="k", ls="--", label="plain vLLM")
    ax.axhline(rows[1]["tokens_per_s"], color="g", ls=":", label="additive, all requests")
    ax.set_xscale("log")
    ax.set_xticks(supports, [str(s) for s in supports])
    ax.set_xlabel("SAS support (non-zero features per vector)")
    ax.set_ylabel("tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
