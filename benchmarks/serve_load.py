"""Bounded load test of ``vsteer serve`` on loopback: many tenants, many configs, few slots.

Starts a real server with ``--tenants`` (float32, so results are comparable across batch
compositions), then ``--clients`` concurrent clients send ``--requests`` completions in all, spread
over ``--configs`` distinct steering configs (request i uses config i mod configs; each config is
its own inline random unit vector at layer 10 and its own prompt) and over ``--tenants`` tenants.
There are far more configs than ``--max-slots``, so requests must wait for slots, never fail.
Afterwards every config's request is sent again alone, and every response under load must equal
it (greedy: correct steering, no cross-talk). Records status counts, p50/p99 latency and throughput.

Run:  OMP_NUM_THREADS=1 python benchmarks/serve_load.py   (writes results/serve-load-tenants.json
and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish  # noqa: E402

from vsteer.server.process import free_port, stop, wait_until_healthy  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Serving under load: tenants, 200 configs, 16 slots (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512, help="requests in all")
    ap.add_argument("--configs", type=int, default=200, help="distinct steering configs")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--timeout", type=float, default=1200, help="give up (and fail) after this many seconds")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import httpx
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="vsteer-serve-load-"))
    keys = {f"tenant{t}": f"sk-load-{t}-{os.urandom(6).hex()}" for t in range(args.tenants)}
    (tmp / "tenants.json").write_text(json.dumps({"tenants": {name: {"keys": [key]} for name, key in keys.items()}}))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "VSTEER_VECTOR_STORE": str(tmp / "store")}
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "vsteer.cli", "serve", "--max-slots", str(args.max_slots), "--tenants", str(tmp / "tenants.json"),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
           "--max-num-seqs", str(args.max_num_seqs)]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    key_list = list(keys.values())
    try:
        try:
            wait_until_healthy(base, server)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{exc}:\n{log.read_text()[-2000:]}") from exc
        g = torch.Generator().manual_seed(0)
        vectors = []
        for _ in range(args.configs):
            v = torch.randn(576, generator=g)
            vectors.append((8.0 * v / v.norm()).tolist())

        def request(i: int) -> tuple[int, dict, dict]:
            c = i % args.configs
            body = {"model": "smollm2", "prompt": f"Visitor {c} says: I think that", "max_tokens": args.max_tokens,
                    "temperature": 0, "steering": {"interventions": [{"op": "add", "vector": vectors[c], "layers": [10]}]}}
            return c, body, {"Authorization": f"Bearer {key_list[c % len(key_list)]}"}

        async def client(queue: asyncio.Queue, http: httpx.AsyncClient, out: list) -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                c, body, headers = request(i)
                t = time.perf_counter()
                r = await http.post(base + "/v1/completions", json=body, headers=headers)
                out.append((c, r.status_code, time.perf_counter() - t, r.json() if r.status_code == 200 else r.text))

        async def load() -> tuple[list, float]:
            out: list = []
            queue: asyncio.Queue = asyncio.Queue()
            for i in range(args.requests):
                queue.put_nowait(i)
            async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients)) as http:
                t = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(client(queue, http, out) for _ in range(args.clients))), args.timeout)
                return out, time.perf_counter() - t

        results, wall = asyncio.run(load())
        alone = {}
        with httpx.Client(timeout=120) as http:
            for c in range(args.configs):
                _, body, headers = request(c)
                alone[c] = http.post(base + "/v1/completions", json=body, headers=headers).json()["choices"][0]["text"]
    finally:
        stop(server)

    statuses = Counter(status for _, status, _, _ in results)
    ok = [(c, lat, r) for c, status, lat, r in results if status == 200]
    mismatched = sum(1 for c, _, r in ok if r["choices"][0]["text"] != alone[c])
    latencies = sorted(lat for _, lat, _ in ok)
    tokens = sum(r["usage"]["completion_tokens"] for _, _, r in ok)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    summary = {
        "clients": args.clients, "requests": len(results), "completed": len(ok), "status_counts": dict(statuses),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500), "mismatched_vs_alone": mismatched,
        "configs": args.configs, "tenants": args.tenants, "distinct_outputs": len(set(alone.values())),
        "max_slots": args.max_slots, "max_num_seqs": args.max_num_seqs, "max_tokens": args.max_tokens,
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None, "p99_latency_s": round(p99, 3),
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
    }
    print(json.dumps(summary, indent=2))
    machine = (f"{cpu_description()} (shared), torch {torch.__version__}, "
               f"OMP_NUM_THREADS={args.threads}, float32, eager")
    s = summary
    publish(SECTION, args.out_dir / "serve-load-tenants.json", {"summary": summary}, [
        f"{s['clients']} concurrent clients on loopback, {s['requests']} requests in all over {s['configs']} distinct steering "
        f"configs (each its own inline unit vector x 8 at layer 10) and {s['tenants']} tenants; {s['max_slots']} slots, "
        f"max_num_seqs {s['max_num_seqs']}, {s['max_tokens']} greedy tokens each. Every response under load is compared "
        "with the same request sent alone afterwards.", "",
        "| requests | completed | 5xx | differ from the same request alone | p50 latency | p99 latency | req/s | tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['completed']} | {s['server_errors_5xx']} | {s['mismatched_vs_alone']} | "
        f"{s['p50_latency_s']} s | {s['p99_latency_s']} s | {s['requests_per_s']} | {s['tokens_per_s']} |"], machine=machine)
    if s["completed"] != s["requests"] or s["server_errors_5xx"] or s["mismatched_vs_alone"]:
        raise SystemExit("load test failed: see the table")


if __name__ == "__main__":
    main()
