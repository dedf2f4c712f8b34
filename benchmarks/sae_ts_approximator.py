"""SAE-TS on the default model: measure feature effects, fit the effect approximator, and check
that the targeted vectors hit their feature (SAE-TS sec. 4, METHODS.md "SAE-TS").

1. Effects (resumable jobs, ``vsteer.effects.job``): decoder rows 0..``--features``-1 of the SAE,
   unit norm x ``--scale``, added at the SAE's layer; ``--rollouts`` rollouts of ``--tokens`` tokens
   from "I think" per vector; SAE codes summed inside the engine (fused). One job folder per
   ``--part-size`` rows (``<work-dir>/rows-<a>-<b>``); stopping and rerunning the same command
   resumes from the last finished chunk, and ``vsteer effects measure --features a:b`` with the same
   settings fills the same folder.
2. Fits on a 90/10 split: closed-form least squares with the ridge chosen on a validation tenth of
   the training rows, and the paper's Adam fit; held-out R^2, centred cosine and top-10 overlap.
   The better one on validation is saved as ``<work-dir>/approximator.safetensors`` (what the
   ``sae-ts`` method of ``vsteer eval`` reads).
3. Targeting, measured: for the feature the ``sae`` evaluation method picks for each concept, the
   effects of its decoder row and of its SAE-TS vector (eq. 3) at the same scale, on fresh rollouts
   (other seeds than the training rollouts). Reported: the effect on the target feature and the
   on-target share ``y_j / |y|`` (1 = nothing but the target moves).

Run:  python benchmarks/sae_ts_approximator.py   (CPU, 2 threads: ~12 min per 2048 vectors; writes
<work-dir>/approximator.safetensors, results/sae-ts-approximator.{json,png} and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, cpu_env, publish, stored_sae  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## SAE-TS effect approximator (CPU)"
RIDGES = (0.0, 0.1, 1.0, 10.0, 100.0)


def _fmt(m: dict) -> str:
    return f"{m['r2']:.3f} | {m['cosine_centered']:.3f} | {m['topk_overlap']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="smollm2-l15-4k")
    ap.add_argument("--features", type=int, default=4096, help="measure decoder rows 0..N-1")
    ap.add_argument("--part-size", type=int, default=2048, help="decoder rows per job folder")
    ap.add_argument("--adam-epochs", type=int, default=200)
    ap.add_argument("--scale", type=float, default=64.0)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--baseline", choices=["paired", "independent"], default="paired")
    ap.add_argument("--baseline-rollouts", type=int, default=None, help="independent baseline only (default 256)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--check-rollouts", type=int, default=32, help="rollouts per vector in the targeting check")
    ap.add_argument("--concepts", default="wedding,london,love,anger,french")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "vsteer" / "effects" / "smollm2-l15-4k")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    cpu_env(args.threads)

    import torch
    import vllm

    from vsteer.effects import EffectApproximator, EffectData, load_effects, targeted_vector, train_test_split
    from vsteer.effects.job import EffectsJob, engine_kwargs, run_effects_job
    from vsteer.effects.measure import RolloutConfig, measure_effects
    from vsteer.effects.report import plot_approximator_fit
    from vsteer.engine.llm import LLM
    from vsteer.eval import load_concepts
    from vsteer.eval.sae_methods import concept_feature

    torch.set_num_threads(args.threads)
    sae = stored_sae(args.sae, "sae_ts_approximator")
    parts = [(a, min(a + args.part_size, args.features)) for a in range(0, args.features, args.part_size)]
    jobs = [EffectsJob(sae=args.sae, vectors="decoder", features=list(range(a, b)), scale=args.scale,
                       rollouts=args.rollouts, tokens=args.tokens, baseline=args.baseline,
                       baseline_rollouts=args.baseline_rollouts,
                       chunk_size=args.chunk_size, engine={"enforce_eager": False, "max_num_seqs": 256})
            for a, b in parts]
    t0 = time.time()
    llm = LLM(**engine_kwargs(jobs[0]), store=tempfile.mkdtemp(prefix="vsteer-sae-ts-store-"), kv_cache_memory_bytes=2 * 2**30)
    t_engine = time.time() - t0
    job_summaries = []
    for job, (a, b) in zip(jobs, parts):
        job_summaries.append(run_effects_job(job, args.work_dir / f"rows-{a}-{b}", llm=llm))
        if not job_summaries[-1]["complete"]:
            sys.exit(f"effects job rows {a}:{b} incomplete: {job_summaries[-1]}")
    t_measure = sum(j["total"]["seconds"] for j in job_summaries)
    measured_rollouts = sum(j["total"]["rollouts"] for j in job_summaries)
    timing_runs = sum(j["total"]["runs"] for j in job_summaries)
    loaded = [load_effects(args.work_dir / f"rows-{a}-{b}") for a, b in parts]
    data = EffectData(torch.cat([d.X for d in loaded]), torch.cat([d.Y for d in loaded]), loaded[0].layer,
                      loaded[0].sae, loaded[0].model)

    # fits: validation tenth of the training rows picks the ridge and the fit
    train, test = train_test_split(data.n, 0.1, seed=0)
    fit_idx, val_idx = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))].split(
        [len(train) - len(train) // 10, len(train) // 10])
    where = {"layer": data.layer, "sae": data.sae, "model": data.model}
    X, Y = data.X, data.Y
    val = {}
    for ridge in RIDGES:
        a = EffectApproximator.fit_least_squares(X[fit_idx], Y[fit_idx], ridge=ridge, **where)
        val[("lstsq", ridge)] = a.evaluate(X[val_idx], Y[val_idx])["cosine_centered"]
    best_ridge = max(RIDGES, key=lambda r: val[("lstsq", r)])
    t0 = time.time()
    adam = {"epochs": args.adam_epochs, "seed": 0, "progress": False}
    adam_val = EffectApproximator.fit_adam(X[fit_idx], Y[fit_idx], **adam, **where).evaluate(X[val_idx], Y[val_idx])
    val[("adam", None)] = adam_val["cosine_centered"]
    fits = {"lstsq": EffectApproximator.fit_least_squares(X[train], Y[train], ridge=best_ridge, **where),
            "adam": EffectApproximator.fit_adam(X[train], Y[train], **adam, **where)}
    t_fit = time.time() - t0
    metrics = {name: {"train": a.evaluate(X[train], Y[train]), "test": a.evaluate(X[test], Y[test])}
               for name, a in fits.items()}
    chosen = "lstsq" if val[("lstsq", best_ridge)] >= val[("adam", None)] else "adam"
    approx = fits[chosen]
    approx.meta["metrics"] = metrics[chosen]
    approx.meta["effects"] = {"paths": [str(args.work_dir / f"rows-{a}-{b}") for a, b in parts], "n": data.n,
                              "test_fraction": 0.1, "split_seed": 0}
    approx_path = approx.save(args.work_dir / "approximator.safetensors")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_approximator_fit(Y[test], approx.predict(X[test] / X[test].norm(dim=1, keepdim=True)),
                                 args.out_dir / "sae-ts-approximator.png", title=f"held out ({chosen})")

    # targeting check on fresh rollouts: decoder row vs SAE-TS vector for each concept's feature
    concepts = load_concepts([c.strip() for c in args.concepts.split(",") if c.strip()])
    feats = [concept_feature(llm, sae, c) for c in concepts]
    dirs = [sae.W_dec.detach()[j].float() for j in feats] + [targeted_vector(approx, j).layers[data.layer] for j in feats]
    dirs_t = torch.stack([d / d.norm() for d in dirs])
    check_cfg = RolloutConfig(rollouts=args.check_rollouts, baseline=args.baseline,
                              baseline_rollouts=args.baseline_rollouts if args.baseline == "independent" else None,
                              tokens=args.tokens, seed=100_000)
    t0 = time.time()
    res = measure_effects(llm, sae, dirs_t, args.scale, check_cfg)
    t_check = time.time() - t0
    eff = res.effects.double()
    pred = approx.predict(dirs_t).double()
    k = len(feats)
    check = []
    for i, (c, j) in enumerate(zip(concepts, feats)):
        row = {"concept": c.name, "feature": j}
        for name, idx in (("decoder", i), ("sae_ts", k + i)):
            y = eff[idx]
            row[name] = {"effect": round(float(y[j]), 4), "share": round(float(y[j] / y.norm()), 4),
                         "rank": int((y > y[j]).sum()) + 1, "predicted": round(float(pred[idx][j]), 4)}
        check.append(row)
        print(row, flush=True)

    machine = (f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, "
               f"{args.threads} threads, compiled")
    m = metrics
    lines = [
        f"Effects of {data.n} decoder rows of `{args.sae}` (layer {data.layer}, d_sae {sae.d_sae}), each unit norm x "
        f"{args.scale:g}, {args.rollouts} rollouts x {args.tokens} tokens from \"I think\" (top_k 50, top_p 0.3), "
        f"{jobs[0].baseline} baseline of {jobs[0].rollout_config().baseline_rollouts} rollouts; SAE codes summed inside the engine (fused). Measuring took "
        f"{t_measure:.0f} s for {measured_rollouts} rollouts ({measured_rollouts / max(t_measure, 1e-9):.1f}/s) summed "
        f"over every run of the jobs ({timing_runs} runs; this run resumed {sum(j['resumed'] for j in job_summaries)} "
        f"of {sum(j['chunks'] for j in job_summaries)} chunks; engine start {t_engine:.0f} s). Held-out split: {len(test)} random vectors; least-squares ridge chosen on a "
        f"validation tenth of the rest: {best_ridge:g}; Adam: lr 2e-4, batch 64, {args.adam_epochs} epochs; "
        f"fits {t_fit:.0f} s. R^2 is over all features; centred cosine compares predicted and measured effects "
        "after subtracting the mean effect; top-10 overlap is the share of the 10 largest measured effects among "
        "the 10 largest predicted.",
        "",
        "| fit | train R^2 | train centred cosine | train top-10 overlap | held-out R^2 | held-out centred cosine | held-out top-10 overlap |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name}{' (saved)' if name == chosen else ''} | {_fmt(m[name]['train'])} | {_fmt(m[name]['test'])} |"
          for name in fits],
        "",
        f"Saved: `{approx_path}` (sha256 {approx.sha256[:12]}). Plot: `results/sae-ts-approximator.png`.",
        "",
        f"Targeting, measured on {args.check_rollouts} fresh rollouts per vector (seeds from 100000) at scale "
        f"{args.scale:g} ({t_check:.0f} s): the concept's feature (as the `sae` evaluation method picks it), steered "
        "with its decoder row or with its SAE-TS vector (eq. 3, lambda 1). effect = change of the feature's mean "
        "code; share = effect / norm of the whole effect vector; rank = place of the target among all features "
        "by effect; predicted = the approximator's prediction.",
        "",
        "| concept | feature | decoder effect / share / rank | SAE-TS effect / share / rank | SAE-TS predicted |",
        "|---|---:|---|---|---:|",
        *[f"| {r['concept']} | {r['feature']} | {r['decoder']['effect']:.3f} / {r['decoder']['share']:.2f} / "
          f"{r['decoder']['rank']} | {r['sae_ts']['effect']:.3f} / {r['sae_ts']['share']:.2f} / {r['sae_ts']['rank']} | "
          f"{r['sae_ts']['predicted']:.3f} |" for r in check],
    ]
    publish(SECTION, args.out_dir / "sae-ts-approximator.json",
            {"jobs": [j.manifest() for j in jobs], "job_summaries": job_summaries, "ridge": best_ridge, "validation": {f"{a}:{b}": v for (a, b), v in val.items()},
             "metrics": metrics, "chosen": chosen, "approximator": str(approx_path), "approximator_sha256": approx.sha256,
             "check": check, "plot": str(plot)}, lines, machine=machine)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
