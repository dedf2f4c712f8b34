"""Steered load on two Ray Serve replicas, one of whose engines is killed midway.

Starts a private PostgreSQL server (the registry) and `serve run deploy/serve_config.yaml` on a
loopback Ray cluster (two replicas of the embedded SmolLM2, float32, eager; tests/_ray_serve.py).
Two tenants upload their vectors, then ``--clients`` clients send a mixed load for ``--seconds``:
plain, steered by an uploaded vector's name, steered with an inline vector (greedy, 16 tokens).
After ``--kill-at`` seconds one replica's vLLM engine process gets SIGKILL.

Records: requests sent and answered, answers by status (any 5xx other than 503 is a failure of
the design), client errors, p50/p99 latency of successful requests before the kill, between the
kill and the replacement replica's first answer, and after; the time from the kill to the last
503 and to the replacement's first answer. Plot: every request's latency over time, by status.

Run:  OMP_NUM_THREADS=1 python benchmarks/serve_ray_fault.py   (writes results/serve-ray-fault.json,
results/serve-ray-fault.png and a RESULTS.md section)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import cpu_description, publish  # noqa: E402

from tests._postgres import PostgresServer  # noqa: E402
from tests._ray_serve import replica_engines, start_ray_serve  # noqa: E402
from vsteer import SteeringVector, save_vector  # noqa: E402

SECTION = "## Ray Serve: steered load on two replicas, one engine killed midway (CPU)"
TENANTS = {"tenants": {"t1": {"keys": ["sk-bench-t1"]}, "t2": {"keys": ["sk-bench-t2"]}}}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--kill-at", type=float, default=45.0)
    args = parser.parse_args()

    postgres = PostgresServer().start()
    root = Path(tempfile.mkdtemp(prefix="vsteer-ray-fault-"))
    env = {**os.environ, "VSTEER_REGISTRY_URL": postgres.new_database(), "VSTEER_TENANTS": json.dumps(TENANTS),
           "VSTEER_VECTOR_STORE": str(root / "store"), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    headers = [{"Authorization": f"Bearer sk-bench-{t}"} for t in TENANTS["tenants"]]
    serve = start_ray_serve(root, env)
    try:
        started = time.monotonic()
        print("starting two replicas ...", flush=True)
        replicas = serve.wait_for_replicas(2, 900, headers[0])
        print(f"two replicas up after {time.monotonic() - started:.0f} s", flush=True)
        for i, h in enumerate(headers):
            v = SteeringVector.from_tensors({10: torch.randn(576, generator=torch.Generator().manual_seed(i)) / 4})
            save_vector(v, root / f"v{i}.safetensors")
            up = httpx.post(serve.base + "/v1/vectors", params={"name": "mine"}, headers=h,
                            content=(root / f"v{i}.safetensors").read_bytes(), timeout=60)
            assert up.status_code == 201, up.text
        records = run_load(serve, headers, replicas, args)
    finally:
        serve.stop()
        postgres.stop()
    report(records, args)


def run_load(serve, headers: list[dict], replicas: set[str], args) -> dict:
    bodies = [
        {},
        {"steering": {"interventions": [{"op": "add", "vector": "mine", "layers": [10], "scale": 8.0}]}},
        {"steering": {"interventions": [{"op": "add", "vector": [0.05] * 576, "layers": [12], "scale": 4.0}]}},
    ]
    log: list[tuple[float, float, object, str]] = []  # (start, latency, status or error, replica)
    stop = threading.Event()
    t0 = time.monotonic()

    def client(k: int) -> None:
        with httpx.Client(base_url=serve.base, headers=headers[k % 2], timeout=120) as c:
            i = k
            while not stop.is_set():
                body = {"model": "smollm2", "prompt": f"Request {i}: my favourite place is", "max_tokens": 16,
                        "temperature": 0, **bodies[i % 3]}
                start = time.monotonic()
                try:
                    r = c.post("/v1/completions", json=body)
                    log.append((start - t0, time.monotonic() - start, r.status_code, r.headers.get("vsteer-replica", "")))
                except httpx.HTTPError as exc:
                    log.append((start - t0, time.monotonic() - start, type(exc).__name__, ""))
                i += args.clients
                time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.kill_at)
    engine = replica_engines()[0]
    killed = time.monotonic() - t0
    engine.kill()
    print(f"killed engine pid {engine.pid} at {killed:.0f} s", flush=True)
    replaced = None
    while time.monotonic() - t0 < args.seconds:
        try:
            r = httpx.get(serve.base + "/v1/models", headers=headers[0], timeout=30)
            if r.status_code == 200 and r.headers["vsteer-replica"] not in replicas and replaced is None:
                replaced = time.monotonic() - t0
                print(f"replacement replica answered at {replaced:.0f} s", flush=True)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    return {"log": log, "killed_at_s": killed, "replaced_at_s": replaced}


def report(records: dict, args) -> None:
    log, killed, replaced = records["log"], records["killed_at_s"], records["replaced_at_s"]
    statuses = Counter(str(status) for _, _, status, _ in log)
    ok = lambda lo, hi: [lat for t, lat, s, _ in log if s == 200 and lo <= t < hi]  # noqa: E731
    end = max(t for t, *_ in log)
    phases = {"before the kill": ok(0, killed), "kill to replacement": ok(killed, replaced or end + 1),
              "after the replacement": ok(replaced or end + 1, end + 1)}
    last_503 = max((t + lat for t, lat, s, _ in log if s == 503), default=None)
    bad = {s: n for s, n in statuses.items() if s not in ("200", "503")}
    data = {
        "clients": args.clients, "seconds": args.seconds, "kill_at_s": round(killed, 1),
        "requests_sent": len(log), "answered": sum(1 for *_, s, _ in log if isinstance(s, int)),
        "by_status": dict(statuses), "other_than_200_or_503": bad,
        "latency_s": {name: {"n": len(v), "p50": _pct(v, 0.5), "p99": _pct(v, 0.99)} for name, v in phases.items()},
        "last_503_after_kill_s": None if last_503 is None else round(last_503 - killed, 1),
        "replacement_answered_after_kill_s": None if replaced is None else round(replaced - killed, 1),
        "mean_ok_latency_s": round(statistics.mean(lat for _, lat, s, _ in log if s == 200), 3),
    }
    plot(log, killed, replaced, HERE / "results" / "serve-ray-fault.png")
    body = [
        f"{args.clients} clients for {args.seconds:.0f} s (plain / steered by name / steered inline, greedy, 16 "
        f"tokens) against `serve run deploy/serve_config.yaml` (two replicas, PostgreSQL registry); one replica's "
        f"engine got SIGKILL at {killed:.0f} s.",
        "",
        f"- requests sent: {data['requests_sent']}, answered: {data['answered']}; by status: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        f"- answers other than 200 or 503: {bad or 'none'}",
        f"- last 503 {data['last_503_after_kill_s']} s after the kill; the replacement replica answered "
        f"{data['replacement_answered_after_kill_s']} s after the kill",
        "",
        "| phase | successful requests | p50 (s) | p99 (s) |",
        "|---|---|---|---|",
        *[f"| {name} | {v['n']} | {v['p50']} | {v['p99']} |" for name, v in data["latency_s"].items()],
        "",
        "The 503s come from the replica whose engine died: it answers at once until Ray Serve's health check "
        "(every 5 s, three failures) has taken it out; the other replica serves meanwhile, and the replacement "
        "starts its own engine (about a minute on this machine). Plot: `results/serve-ray-fault.png`.",
    ]
    publish(SECTION, HERE / "results" / "serve-ray-fault.json", data, body, machine=cpu_description())
    print(json.dumps(data, indent=2))


def plot(log: list, killed: float, replaced: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for status, colour in ((200, "tab:green"), (503, "tab:orange")):
        points = [(t, lat) for t, lat, s, _ in log if s == status]
        if points:
            ax.scatter(*zip(*points), s=6, color=colour, label=f"{status} ({len(points)})")
    other = [(t, lat) for t, lat, s, _ in log if s not in (200, 503)]
    if other:
        ax.scatter(*zip(*other), s=12, color="tab:red", marker="x", label=f"other ({len(other)})")
    ax.axvline(killed, color="black", linestyle="--", label="engine killed")
    if replaced is not None:
        ax.axvline(replaced, color="tab:blue", linestyle=":", label="replacement answers")
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("Two Ray Serve replicas, one engine killed")
    ax.legend(loc="upper right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
