"""Shared vs per-vector rollout seeds for the SAE-TS effect approximator (issue: "SAE-Targeted
Steering that does what the paper says", item 2).

With shared seeds, rollout r of every vector has seed r, so part of the sampling noise is common to
all vectors and goes into a fitted approximator's bias (``benchmarks/sae_ts_protocol.py`` found it
dominates held-out R^2). Per-vector seeds (``--seeds per-vector``) give every vector its own.

Stages (each kept in ``--work-dir``; a rerun resumes):

1. Held-out job: decoder rows ``--heldout-rows`` at their loss-rule scales, ``--heldout-rollouts``
   rollouts each on per-vector seeds, independent baseline (its noise shared with no training job).
2. Two training jobs on rows ``--train-rows``, identical but for the seeds: shared and per-vector,
   both with an independent baseline of ``--baseline-rollouts``, ``--train-rollouts`` rollouts in
   ``--groups`` groups.
3. Learning curves of both on the held-out job (``vsteer.effects.curve``).

Run:  python benchmarks/sae_ts_seeds.py   (CPU, 2 threads; writes results/sae-ts-seeds.json and a
RESULTS.md section)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, cpu_env, publish, stored_sae  # noqa: E402
from sae_ts_protocol import _rows  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## SAE-TS effect approximator: shared vs per-vector seeds (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="smollm2-l15-4k")
    ap.add_argument("--train-rows", default="0:512")
    ap.add_argument("--heldout-rows", default="3840:3968")
    ap.add_argument("--train-rollouts", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--heldout-rollouts", type=int, default=32)
    ap.add_argument("--baseline-rollouts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--candidates", default="0,25,50,75,100,150,200")
    ap.add_argument("--loss-texts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "vsteer" / "effects" / "sae-ts-seeds")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    cpu_env(args.threads)

    import torch
    import vllm

    from vsteer.effects.curve import learning_curve, load_grouped
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, engine_kwargs, run_effects_job
    from vsteer.effects.scales import DEFAULT_LOSS_TEXTS
    from vsteer.engine.llm import LLM

    torch.set_num_threads(args.threads)
    sae = stored_sae(args.sae, "sae_ts_seeds")
    common = dict(sae=args.sae, vectors="decoder", auto_scale=True, tokens=args.tokens, chunk_size=args.chunk_size,
                  scale_candidates=[float(x) for x in args.candidates.split(",")], baseline="independent",
                  baseline_rollouts=args.baseline_rollouts, loss_texts=list(DEFAULT_LOSS_TEXTS[:args.loss_texts]),
                  engine={"enforce_eager": False, "max_num_seqs": 256})
    jobs = {
        "heldout": EffectsJob(features=_rows(args.heldout_rows), rollouts=args.heldout_rollouts, groups=2,
                              seeds="per_vector", **common),
        "shared": EffectsJob(features=_rows(args.train_rows), rollouts=args.train_rollouts, groups=args.groups,
                             seeds="shared", **common),
        "per_vector": EffectsJob(features=_rows(args.train_rows), rollouts=args.train_rollouts, groups=args.groups,
                                 seeds="per_vector", **common),
    }
    work = args.work_dir
    engine: dict = {}
    summaries = {}
    for name, job in jobs.items():
        llm = None
        if not (work / name / "effects.safetensors").exists():
            if "llm" not in engine:
                t0 = time.time()
                engine["llm"] = LLM(**engine_kwargs(job), store=tempfile.mkdtemp(prefix="vsteer-sae-ts-store-"),
                                    kv_cache_memory_bytes=2 * 2**30)
                work.mkdir(parents=True, exist_ok=True)
                (work / "engine-start.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
            llm = engine["llm"]
        summaries[name] = run_effects_job(job, work / name, llm=llm)
        if not summaries[name]["complete"]:
            sys.exit(f"{name} job incomplete: {summaries[name]}")

    heldout = load_effects(work / "heldout")
    curves = {name: learning_curve(load_grouped(work / name), heldout.X, heldout.Y) for name in ("shared", "per_vector")}
    spread = float(((heldout.Y.double() - heldout.Y.double().mean(0)) ** 2).sum(1).mean())
    started = work / "engine-start.json"
    t_engine = json.loads(started.read_text())["seconds"] if started.exists() else float("nan")
    measuring = sum(s["total"]["seconds"] for s in summaries.values())
    rollouts = sum(s["total"]["rollouts"] for s in summaries.values())

    per_vectors = sorted({r["vectors"] for r in curves["shared"]})
    table = ["| rollouts per vector | seeds | " + " | ".join(f"{n} vectors" for n in per_vectors) + " |",
             "|---:|---|" + "---:|" * len(per_vectors)]
    for ro in sorted({r["rollouts"] for r in curves["shared"]}):
        for name in ("shared", "per_vector"):
            cells = []
            for n in per_vectors:
                r = next(x for x in curves[name] if x["rollouts"] == ro and x["vectors"] == n)
                cells.append(f"{r['r2']:.3f} / {r['r2_offset_removed']:.3f} / {r['cosine_centered_offset_removed']:.3f}"
                             f" / {r['offset_sq']:.1f}")
            table.append(f"| {ro} | {name.replace('_', '-')} | " + " | ".join(cells) + " |")
    lines = [
        f"Training: decoder rows {args.train_rows} of `{args.sae}` (layer {sae.layer}) at their loss-rule scales, "
        f"{args.train_rollouts} rollouts of {args.tokens} tokens in {args.groups} groups, independent baseline of "
        f"{args.baseline_rollouts} rollouts, measured twice: every vector's rollout r on seed r (shared), and every "
        f"vector on seeds of its own (per-vector). Held out: rows {args.heldout_rows}, {args.heldout_rollouts} "
        "rollouts each on per-vector seeds (so no training job shares its noise). Fits: least squares, ridge chosen "
        f"on a validation tenth. Engine start {t_engine:.0f} s; measuring {measuring:.0f} s for {rollouts} rollouts "
        "(loss-rule sweeps included), summed over every run.",
        "",
        "Held-out R^2 / R^2 and centred cosine with the fit's mean prediction moved onto the held-out mean / "
        f"squared length of that offset (held-out effects vary by {spread:.1f} per vector, squared, about their mean):",
        "",
        *table,
    ]
    data = {"curves": curves, "jobs": {k: j.manifest() for k, j in jobs.items()}, "summaries": summaries,
            "engine_seconds": t_engine, "heldout_spread": spread}
    machine = f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, {args.threads} threads, compiled"
    publish(SECTION, args.out_dir / "sae-ts-seeds.json", data, lines, machine=machine)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
