"""vsteer on Ray Serve, started as deploy/serve_config.yaml says (`serve run`), on a real Ray
cluster (loopback only) with two replicas that each host a steering engine, and one registry in a
real PostgreSQL server: uploads over both replicas lose nothing, a tenant's limits and vectors hold
on every replica, metrics are per replica, and a replica whose engine is killed answers only 503
until Ray Serve has replaced it."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from tests._ray_serve import start_ray_serve, wait_for_replica_engines
from tests.conftest import subprocess_env
from vsteer import SteeringVector, save_vector

pytestmark = pytest.mark.ray

TENANTS = {"tenants": {"alice": {"keys": ["sk-alice-ray"], "max_configs_in_flight": 2},
                       "bob": {"keys": ["sk-bob-ray"]}}}
ALICE, BOB = ({"Authorization": "Bearer sk-alice-ray"}, {"Authorization": "Bearer sk-bob-ray"})


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    """(base URL, metrics URL, registry URL) of `serve run deploy/serve_config.yaml` on a fresh
    loopback Ray cluster (tests/_ray_serve.py)."""
    root = tmp_path_factory.mktemp("ray-serve")
    registry = postgres.new_database()
    env = {**subprocess_env(), "VSTEER_REGISTRY_URL": registry, "VSTEER_TENANTS": json.dumps(TENANTS),
           "VSTEER_VECTOR_STORE": str(root / "store")}
    serve = start_ray_serve(root, env)
    try:
        serve.wait_for_replicas(2, 600, BOB)
        yield serve, registry
    finally:
        serve.stop()


def _vector_file(seed: int, tmp_path: Path) -> tuple[str, bytes]:
    v = SteeringVector.from_tensors({10: torch.randn(576, generator=torch.Generator().manual_seed(seed)) / 10})
    save_vector(v, tmp_path / f"{seed}.safetensors")
    return v.sha256, (tmp_path / f"{seed}.safetensors").read_bytes()


def _complete(base: str, headers: dict, steering=None, **extra) -> httpx.Response:
    body = {"model": "smollm2", "prompt": "My favourite food is", "max_tokens": 6, "temperature": 0, **extra}
    if steering is not None:
        body["steering"] = steering
    return httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=120)


def test_uploads_over_both_replicas_lose_none_and_every_replica_sees_them(cluster, tmp_path):
    base = cluster[0].base
    files = [_vector_file(seed, tmp_path) for seed in range(200)]
    replies: list[httpx.Response] = []

    def upload(chunk: list[int]) -> None:
        with httpx.Client(base_url=base, headers=ALICE, timeout=120) as client:
            for i in chunk:
                replies.append(client.post("/v1/vectors", params={"name": f"v{i}"}, content=files[i][1]))

    threads = [threading.Thread(target=upload, args=(list(range(k, 200, 20)),)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(r.status_code for r in replies) == {201: 200}
    assert len({r.headers["vsteer-replica"] for r in replies}) == 2  # spread over both
    listed = httpx.get(base + "/v1/vectors", headers=ALICE, timeout=60).json()["data"]
    assert {item["sha256"] for item in listed} >= {sha for sha, _ in files}
    # the vector named on one replica steers on every replica; bob sees it by neither name nor hash
    spec = {"interventions": [{"op": "add", "vector": "v7", "layers": [10], "scale": 40.0}]}
    steered = [_complete(base, ALICE, spec) for _ in range(6)]
    assert {r.status_code for r in steered} == {200} and len({r.headers["vsteer-replica"] for r in steered}) == 2
    assert len({r.json()["choices"][0]["text"] for r in steered}) == 1
    assert steered[0].json()["choices"][0]["text"] != _complete(base, ALICE).json()["choices"][0]["text"]
    for ref in ("v7", files[7][0]):
        theirs = _complete(base, BOB, {"interventions": [{"op": "add", "vector": ref, "layers": [10]}]})
        assert theirs.status_code == 404, theirs.text
    # deleted through one replica: gone on every replica
    assert httpx.delete(base + "/v1/vectors/v7", headers=ALICE, timeout=60).status_code == 200
    gone = [_complete(base, ALICE, spec) for _ in range(6)]
    assert {r.status_code for r in gone} == {404} and len({r.headers["vsteer-replica"] for r in gone}) == 2


def test_a_tenants_configs_in_flight_are_limited_across_replicas(cluster, tmp_path):
    base = cluster[0].base
    names = []
    for seed in (1001, 1002, 1003):
        _, data = _vector_file(seed, tmp_path)
        assert httpx.post(base + "/v1/vectors", params={"name": f"c{seed}"}, content=data, headers=ALICE).status_code == 201
        names.append(f"c{seed}")
    specs = [{"interventions": [{"op": "add", "vector": n, "layers": [10], "scale": 4.0}]} for n in names]
    long = {"max_tokens": 400, "ignore_eos": True, "stream": True}
    streams, clients = [], []
    for spec in specs[:2]:  # two configs in flight (alice's limit), on whichever replicas
        client = httpx.Client(base_url=base, headers=ALICE, timeout=300)
        body = {"model": "smollm2", "prompt": "Once", "temperature": 0, "steering": spec, **long}
        stream = client.stream("POST", "/v1/completions", json=body)
        reply = stream.__enter__()
        assert reply.status_code == 200
        lines = reply.iter_lines()  # kept: dropping the iterator closes the stream (a disconnect)
        next(lines)
        streams.append((stream, lines))
        clients.append(client)
    try:
        third = [_complete(base, ALICE, specs[2]) for _ in range(6)]
        assert {r.status_code for r in third} == {429}, [r.text for r in third]
        assert len({r.headers["vsteer-replica"] for r in third}) == 2  # refused by both replicas
        assert _complete(base, BOB, {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [10]}]}).status_code == 200
    finally:
        for (stream, _), client in zip(streams, clients):
            stream.__exit__(None, None, None)
            client.close()
    deadline = time.monotonic() + 60  # the streams' leases end with them
    while _complete(base, ALICE, specs[2]).status_code == 429 and time.monotonic() < deadline:
        time.sleep(1)
    assert _complete(base, ALICE, specs[2]).status_code == 200


def _scrape(metrics_url: str, name: str) -> dict[str, float]:
    """``name``'s value per replica, from the Ray node's metrics export port."""
    out: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith(name + "{") and 'op="none"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_metrics_are_per_replica_and_never_go_backwards(cluster):
    base, metrics_url = cluster[0].base, cluster[0].metrics_url
    for _ in range(8):
        assert _complete(base, BOB).status_code == 200
    time.sleep(4)  # the replicas report every second (RAY_metrics_report_interval_ms)
    first = _scrape(metrics_url, "ray_vsteer_requests_total")
    for _ in range(8):
        assert _complete(base, BOB).status_code == 200
    time.sleep(4)
    second = _scrape(metrics_url, "ray_vsteer_requests_total")
    assert len(first) == 2 and set(second) == set(first), (first, second)
    assert all(second[r] >= first[r] for r in first) and sum(second.values()) >= sum(first.values()) + 8


def test_a_replica_whose_engine_dies_answers_503_and_is_replaced(cluster):
    """SIGKILL one replica's engine under load: only 200 and 503 answers; Ray Serve marks the
    replica unhealthy and starts a replacement, and the other replica serves every request
    meanwhile (benchmarks/serve_ray_fault.py records the replacement serving)."""
    serve = cluster[0]
    engines = wait_for_replica_engines(2)
    codes: Counter = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=serve.base, headers=BOB, timeout=120) as client:
            while not stop.is_set():
                body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
                try:
                    codes[client.post("/v1/completions", json=body).status_code] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    engines[0].kill()
    marked = "failed the health check 3 times in a row, marking it unhealthy"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not ("Adding 1 replica" in serve.log.read_text() and marked in serve.log.read_text()):
        time.sleep(1)
    time.sleep(2)  # the dead replica is out of the routing table
    stop.set()
    for t in threads:
        t.join()
    log = serve.log.read_text()
    assert marked in log and "Adding 1 replica" in log[log.index(marked):], log[-3000:]
    assert set(codes) <= {200, 503} and codes[503] >= 1 and codes[200] >= 1, codes
    answers = [_complete(serve.base, BOB) for _ in range(10)]
    assert [r.status_code for r in answers] == [200] * 10
