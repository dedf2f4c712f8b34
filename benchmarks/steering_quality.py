"""Steering quality on the default model with the SAE-TS evaluation protocol (METHODS.md).

For each concept, method and scale: N completions of "I think" (30 tokens, temperature 1, top_p
0.3, top_k 50), scored for behaviour and coherence in [0, 1] by the local scorer (the unsteered
SmolLM2 itself: concept-word log-probability after "The text above is about", calibrated on
on-/off-topic reference texts; per-token perplexity against natural vs word-shuffled references,
times the distinct-3-gram fraction). Metric per (concept, method): max over scales of
mean(behaviour) x mean(coherence). All cells run as batched `generate` calls in which every
request carries its own steering (see vsteer/eval/harness.py).

Run:  python benchmarks/steering_quality.py   (CPU, 1 thread: ~15 min for 6 methods x 5 concepts; writes results/steering-quality.{json,png},
results/steering-quality-best.png and the "Steering quality" section of benchmarks/RESULTS.md)
Methods: --methods caa,actadd,sara,sae,sae-ts,sas (any registered in vsteer.eval.methods); sae-ts needs
--approximator (python benchmarks/sae_ts_approximator.py writes one for the default SAE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish

HERE = Path(__file__).resolve().parent
TITLE = "## Steering quality (SAE-TS protocol, local scorer)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="wedding,london,love,anger,french")
    ap.add_argument("--methods", default="caa,actadd,sara", help="any registered methods (vsteer eval methods)")
    ap.add_argument("--scales", action="append", default=[],
                    help="'0,4,8' for every method or 'caa=0,32,64' for one (repeatable); default: each method's sweep")
    ap.add_argument("--n", type=int, default=24, help="completions per (concept, method, scale)")
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="raw run folder (results.jsonl, resumable); default: a fresh temporary folder")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--sae", default="smollm2-l15-4k", help="SAE of the sae, sae-ts and sas methods")
    ap.add_argument("--baseline", default=None, help="method the others are compared with (default: the first)")
    ap.add_argument("--title", default=TITLE, help="RESULTS.md section to write")
    ap.add_argument("--name", default="steering-quality", help="results/<name>.json, <name>.png, <name>-best.png")
    ap.add_argument("--approximator", default=None,
                    help="sae-ts: effect approximator file (python benchmarks/sae_ts_approximator.py writes one)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                       "VLLM_CACHE_ROOT": tempfile.mkdtemp()}.items():
        os.environ.setdefault(key, value)

    import torch

    from vsteer.cli.eval import build_methods, parse_scales
    from vsteer.engine.llm import LLM
    from vsteer.eval import LocalScorer, load_concepts, run_eval
    from vsteer.eval import load_records
    from vsteer.eval.harness import markdown_tables, scorer_label
    from vsteer.eval.intervals import interval_tables, quality_intervals

    concepts = load_concepts([c.strip() for c in args.concepts.split(",") if c.strip()])
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = build_methods(names, sae=args.sae, approximator=args.approximator)
    scales = parse_scales(tuple(args.scales))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vsteer-steering-quality-"))

    t0 = time.time()
    llm = LLM("smollm2", enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=True, kv_cache_memory_bytes=2**30, store=tempfile.mkdtemp(prefix="vsteer-sq-store-"),
              saes=[args.sae] if "sas" in names else None)
    t_engine = time.time() - t0
    scorer = LocalScorer(llm)
    t1 = time.time()
    summary = run_eval(llm, concepts, methods, scales, n=args.n, max_tokens=args.max_tokens, seed=args.seed,
                       scorer=scorer, out_dir=work)
    t_eval = time.time() - t1
    print("\n".join(markdown_tables(summary)))
    intervals = quality_intervals(load_records(work), methods=names, baseline=args.baseline)
    print("\n".join(interval_tables(intervals)))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for src, dst in (("quality.png", f"{args.name}.png"), ("best.png", f"{args.name}-best.png")):
        if (work / src).exists():
            shutil.copyfile(work / src, args.out_dir / dst)
            plots.append(f"`results/{dst}`")
    n_requests = sum(1 for c in summary["cells"] if c["scale"] != 0) * args.n + args.n
    examples = _examples(work, summary, concepts[0].name)
    machine = (f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads, "
               f"{args.dtype}, eager")
    lines = [
        (f"SAE-TS protocol (METHODS.md) on SmolLM2-135M-Instruct, numbers from the **{scorer_label(summary['scorer'])}**, "
        "not an LLM judge: behaviour = calibrated log-probability of the concept words after \"The text above is "
        "about\" (about 0.02 for typical off-topic text, 0.98 for typical on-topic text); coherence = the unsteered "
        "model's per-token perplexity between that of its own unsteered samples (1) and of the same samples with "
        "their words shuffled (0), times the "
        "distinct-3-gram fraction. Scales are in each method's own units (CAA: x unit vector, residual norm ~150 "
        "at layer 10; ActAdd: coefficient c; SARA: c; SAE feature: x decoder row; SAE-TS: x unit vector; SAS: lambda). "
        f"Run time: engine start {t_engine:.0f} s, {n_requests} steered/unsteered generations + scoring "
        f"{t_eval:.0f} s. Plots: {', '.join(plots) if plots else 'none (matplotlib missing)'}."),
        "",
        *markdown_tables(summary),
        "",
        *interval_tables(intervals),
        f"Examples ({concepts[0].name}, first sample at each method's best scale):",
        "",
        *examples,
    ]
    data = {"summary": {k: v for k, v in summary.items() if k != "plots"}, "engine_start_s": t_engine,
            "eval_s": t_eval, "requests": n_requests, "intervals": intervals}
    publish(args.title, args.out_dir / f"{args.name}.json", data, lines, machine=machine)


def _examples(work: Path, summary: dict, concept: str) -> list[str]:
    from vsteer.eval import load_records

    records = {(r["concept"], r["method"], float(r["scale"])): r for r in load_records(work)}
    out = []
    first = next((r for (c, _, s), r in records.items() if c == concept and s == 0.0), None)
    if first:
        out.append(f"- unsteered: {_quote(first['samples'][0]['completion'])}")
    for b in summary["best"]:
        if b["concept"] == concept and b["scale"] != 0.0:
            r = records[(concept, b["method"], float(b["scale"]))]
            s = r["samples"][0]
            out.append(f"- {b['method']} @ {b['scale']:g} (behaviour {s['behaviour']:.2f}, coherence "
                       f"{s['coherence']:.2f}): {_quote(s['completion'])}")
    return out


def _quote(text: str) -> str:
    return "`" + " ".join(("I think" + text).split()).replace("`", "'") + "`"


if __name__ == "__main__":
    main()
