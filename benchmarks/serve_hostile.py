"""Mixed hostile and normal load on a tenant server: does one tenant's abuse reach the others?

Starts a real ``vsteer serve`` with three tenants (float32, eager, loopback). Two normal tenants run
``--clients`` concurrent clients over ``--requests`` completions (plain, steered with a public
vector, steered with an inline vector; greedy, with logprobs), after a warm-up pass of the same
requests: once alone and once while a
hostile tenant sends, as fast as it gets answers, the bodies of the issue "Serving no tenant can
break" (two Content-Type headers around a forged plan, integers of 400 digits, NaN-making
schedules and vectors, the strongest steering the bounds allow on long prompts, more
interventions than the cap, steered beam search and background responses, uploads refused for a
bad name or entries of 3e38). Afterwards every normal request is sent again alone.

Records: every status the server answered (5xx must be 0), normal responses that differ from the
same request alone (tokens; the largest logprob difference is reported), the normal tenants' p50
and p99 latency without and with the hostile traffic, and whether the store grew.

Run:  OMP_NUM_THREADS=1 python benchmarks/serve_hostile.py   (writes results/serve-hostile.json and
a RESULTS.md section)
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
SECTION = "## Serving under hostile load: one abusive tenant, two normal ones (CPU)"
LONG = " ".join(f"Line {i}: the green lamp stands next to the old clock." for i in range(30))


def hostile_bodies(upload: bytes, huge_upload: bytes) -> list[tuple[str, str, dict | bytes, list]]:
    """(method, path, body, extra headers) of each hostile request, cycled through."""
    add = lambda **kw: {"op": "add", "vector": "pub", "layers": [10], **kw}  # noqa: E731
    plan = json.dumps({"v": 1, "interventions": [{"op": "add", "vector": "0" * 64, "layers": [10], "scale": 1e6}]})
    forged = json.dumps({"model": "smollm2", "prompt": "I think", "max_tokens": 4,
                         "vllm_xargs": {"vsteer": plan, "vsteer_tenant": "normal0"}}).encode()
    c = lambda steering, **kw: {"model": "smollm2", "prompt": LONG, "max_tokens": 4, "steering": steering, **kw}  # noqa: E731
    strongest = {"interventions": [{"op": "add", "vector": [1e6] * 576, "layers": [10, 11, 12], "scale": 1e4},
                                   {"op": "add", "vector": [-1e6] * 576, "layers": [20], "scale": 1e4}]}
    return [
        ("POST", "/v1/completions", forged, [("content-type", "application/json"),
                                             ("content-type", "application/x-www-form-urlencoded")]),
        ("POST", "/v1/completions", forged, [("content-type", "application/json"), ("content-encoding", "gzip")]),
        ("POST", "/v1/completions", json.dumps(c({"interventions": [add(schedule={"kind": "window", "start": 10**400,
                                                                                  "length": 1})]})).encode(), []),
        ("POST", "/v1/completions", json.dumps(c({"interventions": [add(scale=1e-300, schedule={
            "kind": "linear", "from": 1e300, "to": 1e300, "over": 4})]})).encode(), []),
        ("POST", "/v1/completions", json.dumps(c({"interventions": [{"op": "add", "vector": [3e38] * 576,
                                                                     "layers": [10, 11]}]})).encode(), []),
        ("POST", "/v1/completions", json.dumps(c(strongest)).encode(), []),
        ("POST", "/v1/completions", json.dumps(c({"interventions": [add(positions=[i, i + 1]) for i in range(600)]})).encode(), []),
        ("POST", "/v1/completions", json.dumps(c({"interventions": [add()]}, use_beam_search=True, n=2)).encode(), []),
        ("POST", "/v1/responses", json.dumps({"model": "smollm2", "input": "Hi", "background": True,
                                              "steering": {"interventions": [add()]}}).encode(), []),
        ("POST", "/v1/vectors?name=bad%20name!", upload, [("content-type", "application/octet-stream")]),
        ("POST", "/v1/vectors?name=huge", huge_upload, [("content-type", "application/octet-stream")]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients of the normal tenants")
    ap.add_argument("--requests", type=int, default=96, help="normal requests per phase")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import httpx
    import torch

    from vsteer import SteeringVector, save_vector
    from vsteer.vectors import VectorStore

    tmp = Path(tempfile.mkdtemp(prefix="vsteer-serve-hostile-"))
    keys = {name: f"sk-{name}-{os.urandom(6).hex()}" for name in ("normal0", "normal1", "hostile")}
    (tmp / "tenants.json").write_text(json.dumps({"tenants": {n: {"keys": [k]} for n, k in keys.items()}}))
    store = VectorStore(tmp / "store")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(576, generator=g)
    store.set_name("pub", store.put(SteeringVector.from_tensors({10: v / v.norm()})))
    save_vector(SteeringVector.from_tensors({10: torch.randn(576, generator=g)}), tmp / "up.safetensors")
    save_vector(SteeringVector.from_tensors({10: torch.full((576,), 3e38)}), tmp / "huge.safetensors")
    hostile = hostile_bodies((tmp / "up.safetensors").read_bytes(), (tmp / "huge.safetensors").read_bytes())
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "VSTEER_VECTOR_STORE": str(store.root)}
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "vsteer.cli", "serve", "--tenants", str(tmp / "tenants.json"), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16"]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    inline = [(4.0 * (u := torch.randn(576, generator=g)) / u.norm()).tolist() for _ in range(8)]
    files_before = sorted(p.name for p in store.root.glob("*.safetensors"))

    def normal(i: int) -> tuple[dict, dict]:
        kind = i % 3
        body = {"model": "smollm2", "prompt": f"Visitor {i % 24} says: I think that", "max_tokens": args.max_tokens,
                "temperature": 0, "logprobs": 1}
        if kind == 1:
            body["steering"] = {"interventions": [{"op": "add", "vector": "pub", "layers": [10], "scale": 6.0}]}
        elif kind == 2:
            body["steering"] = {"interventions": [{"op": "add", "vector": inline[i % 8], "layers": [10]}]}
        return body, {"Authorization": f"Bearer {keys[f'normal{i % 2}']}"}

    async def normal_client(queue: asyncio.Queue, http: httpx.AsyncClient, out: list) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body, headers = normal(i)
            t = time.perf_counter()
            r = await http.post(base + "/v1/completions", json=body, headers=headers)
            out.append((i, r.status_code, time.perf_counter() - t, r.json() if r.status_code == 200 else r.text))

    async def hostile_client(http: httpx.AsyncClient, stop_event: asyncio.Event, out: Counter) -> None:
        auth = ("authorization", f"Bearer {keys['hostile']}")
        k = 0
        while not stop_event.is_set():
            method, path, body, headers = hostile[k % len(hostile)]
            hdrs = headers or [("content-type", "application/json")]
            r = await http.request(method, base + path, content=body, headers=[*hdrs, auth])
            out[(path.split("?")[0], k % len(hostile), r.status_code)] += 1
            k += 1

    async def phase(with_hostile: bool) -> tuple[list, Counter, float]:
        out: list = []
        abuse: Counter = Counter()
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        done = asyncio.Event()
        async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients + 4)) as http:
            bad = [asyncio.create_task(hostile_client(http, done, abuse)) for _ in range(2 if with_hostile else 0)]
            t = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(normal_client(queue, http, out) for _ in range(args.clients))),
                                   args.timeout)
            wall = time.perf_counter() - t
            done.set()
            await asyncio.gather(*bad)
        return out, abuse, wall

    try:
        try:
            wait_until_healthy(base, server)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{exc}:\n{log.read_text()[-2000:]}") from exc
        t0 = time.perf_counter()
        asyncio.run(phase(False))  # warm-up: the first requests of a fresh server pay one-time costs
        quiet, _, quiet_wall = asyncio.run(phase(False))
        mixed, abuse, mixed_wall = asyncio.run(phase(True))
        alone = {}
        with httpx.Client(timeout=120) as http:
            for i in range(args.requests):
                body, headers = normal(i)
                alone[i] = http.post(base + "/v1/completions", json=body, headers=headers).json()["choices"][0]
        total_wall = time.perf_counter() - t0
        alive = server.poll() is None
    finally:
        stop(server)
    files_after = sorted(p.name for p in store.root.glob("*.safetensors"))

    def judge(results: list) -> dict:
        statuses = Counter(s for _, s, _, _ in results)
        ok = [(i, lat, r["choices"][0]) for i, s, lat, r in results if s == 200]
        differ = sum(1 for i, _, ch in ok if ch["text"] != alone[i]["text"])
        dlp = max((abs(a - b) for i, _, ch in ok if ch["text"] == alone[i]["text"]
                   for a, b in zip(ch["logprobs"]["token_logprobs"], alone[i]["logprobs"]["token_logprobs"])), default=0.0)
        lat = sorted(lat for _, lat, _ in ok)
        return {"status_counts": dict(statuses), "differ_from_alone": differ, "max_logprob_diff": dlp,
                "p50_s": round(statistics.median(lat), 3) if lat else None,
                "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None}

    hostile_status = Counter()
    for (_, _, status), n in abuse.items():
        hostile_status[status] += n
    summary = {"requests_per_phase": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
               "without_hostile": {**judge(quiet), "wall_s": round(quiet_wall, 1)},
               "with_hostile": {**judge(mixed), "wall_s": round(mixed_wall, 1)},
               "hostile_requests": sum(abuse.values()), "hostile_status_counts": dict(hostile_status),
               "hostile_by_body": {f"{k[1]}:{k[0]}:{k[2]}": n for k, n in sorted(abuse.items())},
               "server_alive_after": alive, "store_files_before": len(files_before), "store_files_after": len(files_after),
               "run_s": round(total_wall, 1)}
    fives = sum(n for s, n in hostile_status.items() if s >= 500) + sum(
        n for ph in ("without_hostile", "with_hostile") for s, n in summary[ph]["status_counts"].items() if int(s) >= 500)
    summary["server_errors_5xx"] = fives
    print(json.dumps(summary, indent=2))
    machine = f"{cpu_description()} (shared), torch {torch.__version__}, OMP_NUM_THREADS={args.threads}, float32, eager"
    q, m = summary["without_hostile"], summary["with_hostile"]
    publish(SECTION, args.out_dir / "serve-hostile.json", {"summary": summary}, [
        f"Two normal tenants, {args.clients} concurrent clients, {args.requests} greedy completions per phase after a "
        f"discarded warm-up pass of the same requests (plain, "
        f"steered by a public vector, steered by an inline vector; {args.max_tokens} tokens, logprobs); in the second "
        f"phase a hostile tenant sends the issue's {len(hostile)} hostile bodies in a loop on 2 connections. Every normal "
        "response is compared with the same request sent alone afterwards.", "",
        "| phase | normal requests | 5xx | differ from alone (tokens) | max logprob diff | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| without hostile traffic | {args.requests} | {sum(n for s, n in q['status_counts'].items() if int(s) >= 500)} | "
        f"{q['differ_from_alone']} | {q['max_logprob_diff']:.2g} | {q['p50_s']} s | {q['p99_s']} s |",
        f"| with hostile traffic | {args.requests} | {sum(n for s, n in m['status_counts'].items() if int(s) >= 500)} | "
        f"{m['differ_from_alone']} | {m['max_logprob_diff']:.2g} | {m['p50_s']} s | {m['p99_s']} s |", "",
        f"Hostile requests: {summary['hostile_requests']}, answered {dict(sorted(hostile_status.items()))}; "
        f"server alive afterwards: {alive}; vector files in the store before/after: {len(files_before)}/{len(files_after)}."],
        machine=machine)
    if fives or q["differ_from_alone"] or m["differ_from_alone"] or not alive or files_after != files_before:
        raise SystemExit("hostile load test failed: see the table")


if __name__ == "__main__":
    main()
