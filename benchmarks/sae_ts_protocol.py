"""SAE-TS protocol on the default model: paired vs independent baselines, and learning curves of the
effect approximator (issue: "SAE-Targeted Steering that does what the paper says").

Stages (each one's results are kept in ``--work-dir``; a rerun resumes where it stopped):

1. Held-out job: decoder rows ``--heldout-rows`` of the SAE, each at the scale where the steered
   LM loss rises by 0.5 over unsteered (the paper's rule, ``--auto-scale``), ``--heldout-rollouts``
   rollouts each in two groups (split-half noise of the targets), paired baseline.
2. Noise: for the first ``--noise-vectors`` held-out rows at their rule scales, the same steered
   rollouts estimated against a paired baseline and against an independent one of as many
   rollouts (``vsteer.effects.noise.compare_baselines``): the variance of each estimate.
3. Training job: decoder rows ``--train-rows``, rule scales, ``--train-rollouts`` rollouts each in
   ``--groups`` groups (the first g groups = g x rollouts / groups rollouts per vector).
4. Learning curve: least-squares fits (ridge chosen on a validation tenth) on the first g groups and
   the first n of the training vectors (seeded shuffle), scored on the held-out job.

Run:  python benchmarks/sae_ts_protocol.py   (CPU, 2 threads; writes results/sae-ts-protocol.{json,png}
and two RESULTS.md sections)
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

HERE = Path(__file__).resolve().parent
NOISE_SECTION = "## SAE-TS effects: paired vs independent baseline (CPU)"
CURVE_SECTION = "## SAE-TS effect approximator: learning curve (CPU)"


def _rows(text: str) -> list[int]:
    a, b = (int(x) for x in text.split(":"))
    return list(range(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="smollm2-l15-4k")
    ap.add_argument("--train-rows", default="0:1536")
    ap.add_argument("--heldout-rows", default="3840:4096")
    ap.add_argument("--train-rollouts", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--heldout-rollouts", type=int, default=64)
    ap.add_argument("--noise-vectors", type=int, default=64)
    ap.add_argument("--noise-rollouts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--vectors", default=None, help="training-set sizes for the curve (default N/8, N/4, N/2, N)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--candidates", default="0,25,50,75,100,150,200",
                    help="scales swept for the loss rule (interpolated between)")
    ap.add_argument("--loss-texts", type=int, default=4, help="how many of the default loss texts the rule uses")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "vsteer" / "effects" / "sae-ts-protocol")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    cpu_env(args.threads)

    import torch
    import vllm
    from safetensors.torch import load_file

    from vsteer.effects.curve import fit_with_validation, learning_curve, load_grouped, plot_learning_curve, split_half
    from vsteer.effects.approximator import EffectApproximator
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, engine_kwargs, run_effects_job
    from vsteer.effects.measure import RolloutConfig
    from vsteer.effects.noise import compare_baselines
    from vsteer.engine.llm import LLM

    torch.set_num_threads(args.threads)
    sae = stored_sae(args.sae, "sae_ts_protocol")
    from vsteer.effects.scales import DEFAULT_LOSS_TEXTS

    common = dict(sae=args.sae, vectors="decoder", auto_scale=True, tokens=args.tokens, chunk_size=args.chunk_size,
                  scale_candidates=[float(x) for x in args.candidates.split(",")],
                  loss_texts=list(DEFAULT_LOSS_TEXTS[:args.loss_texts]), engine={"enforce_eager": False, "max_num_seqs": 256})
    held_job = EffectsJob(features=_rows(args.heldout_rows), rollouts=args.heldout_rollouts, groups=2, **common)
    train_job = EffectsJob(features=_rows(args.train_rows), rollouts=args.train_rollouts, groups=args.groups, **common)
    work = args.work_dir
    engine: dict = {}

    def llm_for(folder: Path | None = None):
        """The engine, started the first time something is left to measure (a finished rerun starts none)."""
        if folder is not None and (folder / "effects.safetensors").exists():
            return None
        if "llm" not in engine:
            t0 = time.time()
            engine["llm"] = LLM(**engine_kwargs(held_job), store=tempfile.mkdtemp(prefix="vsteer-sae-ts-store-"),
                                kv_cache_memory_bytes=2 * 2**30)
            engine["seconds"] = time.time() - t0
            (work / "engine-start.json").parent.mkdir(parents=True, exist_ok=True)
            (work / "engine-start.json").write_text(json.dumps({"seconds": round(engine["seconds"], 1)}))
        return engine["llm"]

    held = run_effects_job(held_job, work / "heldout", llm=llm_for(work / "heldout"))
    if not held["complete"]:
        sys.exit(f"held-out job incomplete: {held}")

    noise_path = work / "noise.json"
    if not noise_path.exists():
        chunk = load_file(work / "heldout" / "chunks" / "chunk-000000.safetensors")
        n = args.noise_vectors
        config = RolloutConfig(rollouts=args.noise_rollouts, tokens=args.tokens)
        t0 = time.time()
        cmp = compare_baselines(llm_for(), sae, chunk["directions"][:n], chunk["scales"][:n], config)
        paired, independent = cmp.total_variance()
        diff = (cmp.paired - cmp.independent)
        noise = {"vectors": n, "rollouts": args.noise_rollouts, "independent_rollouts": cmp.baseline_rollouts,
                 "scales": chunk["scales"][:n].tolist(), "paired_var": paired.tolist(), "independent_var": independent.tolist(),
                 "ratio": cmp.rollouts_saved().tolist(), "centred_var": cmp.centred_total_variance().tolist(),
                 "effect_norm": cmp.paired.norm(dim=1).tolist(),
                 # both estimate the same effect: their difference is the two baselines' difference
                 "estimate_difference_norm": diff.norm(dim=1).tolist(), "seconds": round(time.time() - t0, 1)}
        noise_path.write_text(json.dumps(noise))
    noise = json.loads(noise_path.read_text())

    train = run_effects_job(train_job, work / "train", llm=llm_for(work / "train"))
    if not train["complete"]:
        sys.exit(f"training job incomplete: {train}")

    t0 = time.time()
    grouped = load_grouped(work / "train")
    heldout = load_effects(work / "heldout")
    counts = [int(x) for x in args.vectors.split(",")] if args.vectors else None
    rows = learning_curve(grouped, heldout.X, heldout.Y, vectors=counts)
    ceiling = split_half(load_grouped(work / "heldout"))
    t_curve = time.time() - t0
    # the approximator the headline evaluation uses: every measured vector, training and held out
    fitted = fit_with_validation(torch.cat([grouped.X, heldout.X]), torch.cat([grouped.effects(), heldout.Y]))
    approx = EffectApproximator(fitted.M, fitted.b, layer=heldout.layer, sae=heldout.sae, model=heldout.model,
                                meta={**fitted.meta, "effects": {"paths": [str(work / "train"), str(work / "heldout")],
                                                                 "n": len(grouped.X) + len(heldout.X)}})
    approx_path = approx.save(work / "approximator.safetensors")
    started = work / "engine-start.json"  # the last run that started the engine
    t_engine = json.loads(started.read_text())["seconds"] if started.exists() else float("nan")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_learning_curve(rows, args.out_dir / "sae-ts-learning-curve.png",
                               title=f"{args.sae}: held-out fit vs rollouts per vector ({len(heldout.X)} held-out vectors)")

    machine = (f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, {args.threads} threads, compiled")
    scales = torch.cat([load_file(p)["scales"] for p in sorted((work / "train" / "chunks").glob("*.safetensors"))])
    ratio = torch.tensor(noise["ratio"])
    pv, iv = torch.tensor(noise["paired_var"]), torch.tensor(noise["independent_var"])
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    rq = ratio.double().quantile(q).tolist()
    noise_lines = [
        f"Effects of {noise['vectors']} decoder rows of `{args.sae}` (rows {args.heldout_rows.split(':')[0]} on), each at "
        f"its loss-rule scale (LM loss +0.5 over unsteered; median {float(torch.tensor(noise['scales']).median()):.0f}), "
        f"{noise['rollouts']} rollouts of {args.tokens} tokens from \"I think\" (top_k 50, top_p 0.3). The same steered "
        f"rollouts are estimated against a paired baseline (unsteered rollouts on the same seeds) and against an "
        f"independent one ({noise['independent_rollouts']} rollouts on other seeds, the paper's way). Variance of an "
        "estimate = expected squared error of the whole effect vector (summed over features), from the spread of "
        f"per-rollout sums (`vsteer.effects.noise`). Took {noise['seconds']} s.",
        "",
        "| | paired | independent |",
        "|---|---:|---:|",
        f"| mean variance of the effect estimate | {float(pv.mean()):.4g} | {float(iv.mean()):.4g} |",
        f"| mean squared norm of the paired effect | {float(torch.tensor(noise['effect_norm']).pow(2).mean()):.4g} | |",
        f"| mean variance after subtracting the mean over vectors (what a fit with a bias sees) | "
        f"{float(torch.tensor(noise['centred_var']).mean()):.4g} | the same |",
        "",
        f"Independent / paired variance per vector (= how many times the rollouts the independent estimator needs "
        f"for the paired one's precision at equal baseline size): median {rq[1]:.2f}, 10th-90th percentile "
        f"{rq[0]:.2f}-{rq[2]:.2f}, smallest {float(ratio.min()):.2f}. With an unlimited independent baseline the "
        f"independent variance would fall to its steered half; the paired one still needs only R baseline rollouts. "
        "Every vector's rollouts share the seeds as well, so much of the noise is common to all vectors; the "
        "approximator's bias absorbs it whichever the baseline, and per rollout, subtracting the mean over vectors "
        "removes the baseline entirely: for the fit, the two baselines are the same (last row).",
    ]
    per_rollouts = sorted({r["rollouts"] for r in rows})
    per_vectors = sorted({r["vectors"] for r in rows})
    table = ["| rollouts per vector | " + " | ".join(f"{n} vectors" for n in per_vectors) + " |",
             "|---:|" + "---:|" * len(per_vectors)]
    for ro in per_rollouts:
        cells = []
        for n in per_vectors:
            r = next(x for x in rows if x["rollouts"] == ro and x["vectors"] == n)
            cells.append(f"{r['r2']:.3f} / {r['cosine_centered']:.3f} / {r['r2_offset_removed']:.3f} / "
                         f"{r['cosine_centered_offset_removed']:.3f} / {r['offset_sq']:.1f}")
        table.append(f"| {ro} | " + " | ".join(cells) + " |")
    curve_lines = [
        f"Training: decoder rows {args.train_rows} of `{args.sae}` (layer {sae.layer}), each at its loss-rule scale "
        f"(median {float(scales.median()):.0f}, {int((scales >= max(train_job.scale_candidates)).sum())} of {len(scales)} "
        f"capped at the largest candidate, {max(train_job.scale_candidates):g}; loss on {args.loss_texts} texts), "
        f"{args.train_rollouts} rollouts of {args.tokens} tokens in {args.groups} groups, paired baseline, fused. "
        f"Held out: rows {args.heldout_rows}, {args.heldout_rollouts} rollouts each. Fits: least squares, ridge chosen on a "
        "validation tenth of the training vectors; the training vectors are a seeded shuffle, each size the first n. "
        f"Engine start {t_engine:.0f} s (the last run that needed the engine); measuring {train['total']['seconds'] + held['total']['seconds']:.0f} s for "
        f"{train['total']['rollouts'] + held['total']['rollouts']} rollouts (including the loss-rule scale sweeps), "
        f"summed over every run; fits {t_curve:.0f} s.",
        "",
        "Held-out R^2 / centred cosine / the same two with the fit's mean prediction moved onto the held-out "
        "mean / squared length of that offset (held-out effects vary by "
        f"{float(((heldout.Y.double() - heldout.Y.double().mean(0)) ** 2).sum(1).mean()):.1f} per vector, "
        "squared, about their mean):",
        "",
        *table,
        "",
        f"The held-out targets are themselves measured: one half of their rollouts predicts the other half with R^2 "
        f"{ceiling['r2']:.3f} and centred cosine {ceiling['cosine_centered']:.3f} ({ceiling['rollouts_per_half']} "
        f"rollouts per half), which bounds what any fit can score against them. Plot: `results/{plot.name}`.",
        "",
        "Every vector's rollout r uses seed r, so the noise common to all vectors does not average out over "
        "vectors: it goes into the fit's bias as an offset that only more rollouts shrink, and at these rollout "
        "counts it costs more held-out R^2 than anything the fit gets wrong about single vectors (compare the "
        "offset with the held-out spread above). The paired baseline cancels part of it per vector (noise section "
        "above) but, by the same argument, not for the fit.",
        "",
        f"Approximator for the SAE-TS evaluation: least squares on all {len(grouped.X) + len(heldout.X)} vectors "
        f"(ridge {approx.meta['fit']['ridge']:g}), `{approx_path}` (sha256 {approx.sha256[:12]}).",
    ]
    data = {"noise": noise, "curve": rows, "heldout_split_half": ceiling, "train_job": train_job.manifest(),
            "heldout_job": held_job.manifest(), "train_summary": train, "heldout_summary": held,
            "engine_seconds": round(t_engine, 1), "curve_seconds": round(t_curve, 1), "plot": str(plot),
            "approximator": str(approx_path), "approximator_sha256": approx.sha256}
    publish(NOISE_SECTION, args.out_dir / "sae-ts-protocol.json", data, noise_lines, machine=machine)
    publish(CURVE_SECTION, args.out_dir / "sae-ts-protocol.json", data, curve_lines, machine=machine)
    print("\n".join(noise_lines + [""] + curve_lines))


if __name__ == "__main__":
    main()
