"""Bounded load test of ``vsteer serve`` on loopback: many clients, each with its own vector.

Starts a real server (float32 so that results are comparable across batch compositions), then runs
``--clients`` concurrent clients for ``--requests`` requests each. Every client steers with its own
inline random unit vector at layer 10, so there are more distinct configs in flight than
``--max-slots``: requests must wait for slots, never fail. Afterwards each client's request is sent
again alone, and every response under load must equal it (correct steering, no cross-talk).
Records completion count, HTTP status counts, p50/p99 latency and throughput. Stops by itself.

Run:  python benchmarks/serve_load.py   (writes results/serve-load.json and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import publish  # noqa: E402

from vsteer.server.process import free_port, stop, wait_until_healthy  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Serving under load (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="give up (and fail) after this many seconds")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import httpx
    import torch

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": tempfile.mkdtemp(), "VSTEER_VECTOR_STORE": tempfile.mkdtemp()}
    log = Path(tempfile.mkdtemp()) / "server.log"
    cmd = [sys.executable, "-m", "vsteer.cli", "serve", "--max-slots", str(args.max_slots), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
           "--max-num-seqs", str(args.max_num_seqs)]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(base, server)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{exc}:\n{log.read_text()[-2000:]}") from exc
        g = torch.Generator().manual_seed(0)
        vectors = []
        for _ in range(args.clients):
            v = torch.randn(576, generator=g)
            vectors.append((8.0 * v / v.norm()).tolist())

        def body(c: int) -> dict:
            return {"model": "smollm2", "prompt": f"Client {c} says: I think that", "max_tokens": args.max_tokens,
                    "temperature": 0, "steering": {"interventions": [{"op": "add", "vector": vectors[c], "layers": [10]}]}}

        async def client(c: int, http: httpx.AsyncClient, out: list) -> None:
            for _ in range(args.requests):
                t = time.perf_counter()
                r = await http.post(base + "/v1/completions", json=body(c))
                out.append((c, r.status_code, time.perf_counter() - t, r.json() if r.status_code == 200 else r.text))

        async def load() -> tuple[list, float]:
            out: list = []
            async with httpx.AsyncClient(timeout=args.timeout) as http:
                t = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(client(c, http, out) for c in range(args.clients))), args.timeout)
                return out, time.perf_counter() - t

        results, wall = asyncio.run(load())
        alone = {}
        with httpx.Client(timeout=120) as http:
            for c in range(args.clients):
                alone[c] = http.post(base + "/v1/completions", json=body(c)).json()["choices"][0]["text"]
    finally:
        stop(server)

    statuses = Counter(status for _, status, _, _ in results)
    ok = [(c, lat, r) for c, status, lat, r in results if status == 200]
    mismatched = sum(1 for c, _, r in ok if r["choices"][0]["text"] != alone[c])
    distinct_texts = len({alone[c] for c in alone})
    latencies = sorted(lat for _, lat, _ in ok)
    tokens = sum(r["usage"]["completion_tokens"] for _, _, r in ok)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    summary = {
        "clients": args.clients, "requests": len(results), "completed": len(ok), "status_counts": dict(statuses),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500), "mismatched_vs_alone": mismatched,
        "distinct_outputs": distinct_texts, "max_slots": args.max_slots, "max_num_seqs": args.max_num_seqs,
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None, "p99_latency_s": round(p99, 3),
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
    }
    print(json.dumps(summary, indent=2))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, float32, eager"
    s = summary
    publish(SECTION, args.out_dir / "serve-load.json", {"summary": summary}, [
        f"{s['clients']} concurrent clients on loopback x {args.requests} requests, each client steering with its own "
        f"inline vector ({s['clients']} distinct configs, {s['max_slots']} slots, max_num_seqs {s['max_num_seqs']}), "
        f"{args.max_tokens} greedy tokens each.", "",
        "| requests | completed | 5xx | differ from the same request alone | p50 latency | p99 latency | req/s | tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['completed']} | {s['server_errors_5xx']} | {s['mismatched_vs_alone']} | "
        f"{s['p50_latency_s']} s | {s['p99_latency_s']} s | {s['requests_per_s']} | {s['tokens_per_s']} |"], machine=machine)
    if s["completed"] != s["requests"] or s["server_errors_5xx"] or s["mismatched_vs_alone"]:
        raise SystemExit("load test failed: see the table")


if __name__ == "__main__":
    main()
