"""The serving edge under hostile input, faults and load: a real `vsteer serve` with tenants on
loopback (this folder's, shared with test_tenants.py: conftest.py), driven over real HTTP.

- No client-supplied engine argument (``vllm_xargs`` keys starting with ``vsteer``) reaches the
  engine on any route; the server keeps serving.
- Client cache salts live in their own namespace; tenants never share KV blocks.
- Fuzzed steering fields are answered 4xx or 200, never 5xx, and change nothing afterwards.
- Clients that disconnect release what they held; uploads and deletes never corrupt the store
  (under SIGKILL: test_upload_crash.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import start_serve
from tests.server.tenant_server import MODEL, auth
from vsteer import SteeringVector, save_vector

RESERVED = ["vsteer", "vsteer_capture", "vsteer_effects", "vsteer_tenant", "VSteer", "VSTEER_EFFECTS", "vSteer_anything"]
#: A prompt of more than two 128-token KV blocks (the CPU block size), so that prefix caching shows.
LONG_PROMPT = " ".join(f"Item {i} of the list is a small red box on a shelf." for i in range(30))


def _start(model_path: str, log: Path, store: Path, vsteer_args=(), vllm_args=(), max_model_len: int = 512):
    """Start `vsteer serve` for these tests; returns (process, base URL)."""
    return start_serve(model_path, log, vsteer_args, vllm_args, store=store, served_model_name=MODEL,
                       max_model_len=max_model_len)


@pytest.fixture(scope="module")
def http(tenant_server):
    with httpx.Client(base_url=tenant_server, timeout=120) as client:
        yield client


def _steering(scale: float = 8.0, vector: object = "pub") -> dict:
    return {"interventions": [{"op": "add", "vector": vector, "layers": [10], "scale": scale}]}


def _complete(http: httpx.Client, who: str = "alice", prompt: str = "I think that", max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return http.post("/v1/completions", json=body, headers=auth(who))


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _cached(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    details = r.json()["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")))


# --- smuggled engine arguments ------------------------------------------------------------------

def _route_bodies(key: str, value: str) -> dict[str, dict]:
    xargs = {key: value}
    chat = [{"role": "user", "content": "Hi"}]
    return {
        "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "vllm_xargs": xargs},
        "/v1/chat/completions": {"model": MODEL, "messages": chat, "max_tokens": 1, "vllm_xargs": xargs},
        "/v1/responses": {"model": MODEL, "input": "Hi", "max_output_tokens": 1, "vllm_xargs": xargs},
        "/v1/messages": {"model": MODEL, "messages": chat, "max_tokens": 1, "vllm_xargs": xargs},
        "/invocations": {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "vllm_xargs": xargs},
        "/v1/chat/completions/batch": {"model": MODEL, "messages": [chat], "max_tokens": 1, "vllm_xargs": xargs},
        "/inference/v1/generate": {"model": MODEL, "token_ids": [1, 2], "sampling_params": {"max_tokens": 1, "extra_args": xargs}},
    }


def test_every_route_that_takes_engine_arguments_is_covered(http):
    """Every route of this vLLM whose request body has ``vllm_xargs`` is one the edge steers and tags."""
    from vsteer.server.middleware import XARGS_PATHS

    spec = http.get("/openapi.json", headers=auth("alice")).json()
    schemas = spec["components"]["schemas"]
    with_xargs = set()
    for path, methods in spec["paths"].items():
        for op in methods.values():
            ref = json.dumps(op.get("requestBody", {}))
            for name, schema in schemas.items():
                if f'"#/components/schemas/{name}"' in ref and "vllm_xargs" in schema.get("properties", {}):
                    with_xargs.add(path)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"} <= with_xargs
    assert with_xargs <= XARGS_PATHS, with_xargs - XARGS_PATHS


@pytest.mark.parametrize("key", RESERVED)
def test_reserved_engine_keys_are_refused_on_every_route(http, key):
    value = json.dumps({"interventions": [{"op": "add", "vector": "0" * 64, "layers": [10], "scale": 1e30}]})
    for route, body in _route_bodies(key, value).items():
        r = http.post(route, json=body, headers=auth("alice"))
        assert r.status_code == 400, (route, r.text)
        param = r.json()["error"]["param"]
        want = f"sampling_params.extra_args.{key}" if route == "/inference/v1/generate" else f"vllm_xargs.{key}"
        assert param == want, (route, r.json())
    # a form body (vLLM's audio routes take vllm_xargs as JSON text in a form field)
    form = http.post("/v1/audio/transcriptions", data={"model": MODEL, "vllm_xargs": json.dumps({key: value})},
                     files={"file": ("a.wav", b"RIFF0000WAVE", "audio/wav")}, headers=auth("alice"))
    assert form.status_code == 400 and form.json()["error"]["param"] == f"vllm_xargs.{key}", form.text
    # nested in a batch, with steering beside it, or as JSON text in a JSON body
    nested = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "steering": _steering(), "vllm_xargs": {"steering": "null", key: 1}}
    r = http.post("/v1/completions", json=nested, headers=auth("alice"))
    assert r.status_code == 400 and r.json()["error"]["param"] == f"vllm_xargs.{key}", r.text
    assert _complete(http, max_tokens=2).status_code == 200  # still serving


def test_steering_on_a_route_that_cannot_carry_it_is_refused(http):
    chat = [[{"role": "user", "content": "Hi"}]]
    r = http.post("/v1/chat/completions/batch", json={"model": MODEL, "messages": chat, "max_tokens": 1, "steering": _steering()},
                  headers=auth("alice"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering", r.text


def test_steering_on_responses_and_messages_routes(http):
    """The edge steers every route that carries vllm_xargs, not only the completion routes."""
    chat = [{"role": "user", "content": "Describe your neighbour."}]
    base = {"model": MODEL, "messages": chat, "max_tokens": 8, "temperature": 0}
    plain = http.post("/v1/messages", json=base, headers=auth("alice"))
    steered = http.post("/v1/messages", json={**base, "steering": _steering(12.0)}, headers=auth("alice"))
    assert plain.status_code == 200 and steered.status_code == 200, (plain.text, steered.text)
    assert plain.json()["content"] != steered.json()["content"]
    bad = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 4,
                                           "steering": _steering(vector="not-a-vector")}, headers=auth("alice"))
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "interventions.0.vector", bad.text


def test_every_route_needs_a_key(http):
    assert http.post("/invocations", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code == 401
    assert http.post("/tokenize", json={"model": MODEL, "prompt": "Hi"}).status_code == 401
    assert http.get("/health").status_code == 200


# --- cache salts and KV isolation ----------------------------------------------------------------

def test_a_client_salt_cannot_plant_unsteered_kv_for_a_steered_request(http, tenant_store, model_path):
    """The old edge salted steered requests with ``vsteer-<plan hash>``: a client that sent that
    salt on an unsteered request planted KV that a steered request would then read. Client salts
    now live in their own namespace."""
    from vsteer.engine.plan import ModelShape, resolve_spec
    from vsteer.models import model_info
    from vsteer.vectors import VectorStore

    info = model_info(model_path)
    sha = VectorStore(tenant_store).names()["pub"]
    plan = resolve_spec({"interventions": [{"op": "add", "vector": sha, "layers": [10], "scale": 6.0}]},
                        store=VectorStore(tenant_store), model=ModelShape(info.name, info.num_layers, info.hidden_size))
    prompt = "Salted. " + LONG_PROMPT
    for salt in (f"vsteer-{plan.hash}", f"vsteer:{plan.hash}", "vsteer-" + "0" * 64):
        assert _complete(http, prompt=prompt, max_tokens=2, cache_salt=salt).status_code == 200  # plant
        assert _cached(_complete(http, prompt=prompt, max_tokens=2, cache_salt=salt)) >= 256  # the same salt shares KV
    steered = _complete(http, prompt=prompt, max_tokens=6, steering=_steering(6.0))
    assert _cached(steered) == 0  # the steered request read none of the planted KV


def test_tenants_never_share_kv_blocks(http):
    """Needs the engine to salt every request with its tenant (``vllm_xargs["vsteer_tenant"]``)."""
    prompt = "Tenants. " + LONG_PROMPT
    first = _complete(http, who="alice", prompt=prompt, max_tokens=2)
    assert first.status_code == 200
    assert _cached(_complete(http, who="alice", prompt=prompt, max_tokens=2)) >= 256  # the cache works
    assert _cached(_complete(http, who="bob", prompt=prompt, max_tokens=2)) == 0


def test_a_steered_request_never_reads_unsteered_kv(http):
    """Needs the engine to salt steered requests by plan (the edge no longer writes that salt)."""
    prompt = "Steered. " + LONG_PROMPT
    _complete(http, prompt=prompt, max_tokens=2)
    cold = _complete(http, prompt=prompt, max_tokens=6, steering=_steering())
    assert _cached(cold) == 0
    # a steered request with a client salt never reads the unsteered KV of the same client salt
    assert _complete(http, prompt=prompt, max_tokens=2, cache_salt="mine").status_code == 200
    salted = _complete(http, prompt=prompt, max_tokens=6, steering=_steering(), cache_salt="mine")
    assert _cached(salted) == 0 and _text(salted) == _text(cold)


# --- serving defaults -----------------------------------------------------------------------------

def test_served_engine_has_no_capture_buffers(http):
    _complete(http, max_tokens=1)
    deadline = time.time() + 15
    while "vsteer_capture_bytes" not in http.get("/metrics").text and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2.5)  # the workers' statistics are polled every 2 s
    assert _metric(http, "vsteer_slot_loads") >= 0  # the poll has answered
    assert _metric(http, "vsteer_capture_bytes") == 0
    # this server runs on Model Runner V2 (tests/_site harness); tests/server/shared_server on V1
    assert 'vsteer_runner_info{runner="v2"} 1.0' in http.get("/metrics").text


def test_vsteer_start_up_lines_reach_stock_vllms_log(http, tenant_server_log):
    """In stock vLLM's server nothing configures Python logging; vsteer logs through vLLM's handlers."""
    assert ("vsteer: steering vLLM's vllm.v1.worker.cpu.model_runner.CPUModelRunner (Model Runner V2); "
            "scheduling: async") in tenant_server_log.read_text()


def test_capture_layers_option():
    import click

    from vsteer.cli.serve import _capture_layers

    assert _capture_layers("none") == [] and _capture_layers("all") is None and _capture_layers("10, 12") == [10, 12]
    for bad in ("ten", "-1"):
        with pytest.raises(click.BadParameter) as err:
            _capture_layers(bad)
        assert "--capture-layers" in err.value.format_message() or err.value.param_hint == "--capture-layers"


# --- faults ---------------------------------------------------------------------------------------

def test_clients_that_disconnect_mid_stream_release_their_slots(http, tenant_server):
    body = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True, "steering": _steering(3.0)}
    for _ in range(3):
        with httpx.Client(base_url=tenant_server, timeout=60) as own:
            with own.stream("POST", "/v1/completions", json=body, headers=auth("bob")) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                next(lines)
                next(lines)
        # the connection is closed here, mid-stream
    deadline = time.time() + 30
    while _metric(http, "vsteer_configs_in_flight") != 0 and time.time() < deadline:
        time.sleep(0.5)
    assert _metric(http, "vsteer_configs_in_flight") == 0
    # bob may run one config at a time: a different config runs, so his count was released
    other = _complete(http, who="bob", max_tokens=2, steering=_steering(5.0))
    assert other.status_code == 200, other.text


def test_concurrent_upload_and_delete_of_one_name_never_corrupt_the_store(http, tenant_server, tenant_store, tmp_path):
    """Two tenants upload and delete the same name (and the same contents, stored once) at once."""
    files = []
    for i in range(3):
        v = SteeringVector.from_tensors({10: torch.full((576,), 0.01 * (i + 1))})
        save_vector(v, tmp_path / f"{i}.safetensors")
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    codes: list[int] = []
    errors: list[BaseException] = []

    def worker(who: str, n: int) -> None:
        try:
            with httpx.Client(base_url=tenant_server, timeout=60, headers=auth(who)) as c:
                for j in range(10):
                    if (n + j) % 2:
                        codes.append(c.post("/v1/vectors", params={"name": "race"}, content=files[(n + j) % 3]).status_code)
                    else:
                        codes.append(c.delete("/v1/vectors/race").status_code)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(who, n)) for who in ("alice", "bob") for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(codes) <= {200, 201, 404, 409}, sorted(set(codes))  # 409: "race" points at other content
    assert 201 in codes and 200 in codes
    _check_store(tenant_store)
    for who in ("alice", "bob"):
        if http.get("/v1/vectors/race", headers=auth(who)).status_code == 200:  # whatever won serves a whole vector
            assert _complete(http, who=who, max_tokens=2, steering=_steering(vector="race")).status_code == 200


def _check_store(root: Path) -> None:
    """Every stored file is a whole vector whose content hash is its name; every name and tenant
    entry points to a stored vector."""
    from vsteer.vectors import VectorStore

    store = VectorStore(root)
    shas = store.list()
    for sha in shas:
        assert store.get(sha).sha256 == sha
    for name, sha in store.names().items():
        assert sha in shas, name
    for path in (root / "tenants").glob("*.json"):
        data = json.loads(path.read_text())
        for name, sha in data["names"].items():
            assert sha in data["vectors"], (path.name, name)
            assert sha in shas, (path.name, name)
    assert not [p.name for p in root.glob("*.safetensors") if len(p.stem) != 64], "a temporary file was left as a vector"


# --- fuzzing --------------------------------------------------------------------------------------

class _Deep:
    """``n`` nested empty JSON arrays."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"_Deep({self.n})"


def _dumps(body: dict) -> str:
    deep: list[int] = []

    def default(obj: object) -> str:
        if isinstance(obj, _Deep):
            deep.append(obj.n)
            return f"\x00DEEP{len(deep) - 1}\x00"
        raise TypeError(type(obj).__name__)

    text = json.dumps(body, default=default)
    for i, n in enumerate(deep):
        text = text.replace(f'"\\u0000DEEP{i}\\u0000"', "[" * n + "]" * n, 1)
    return text


def _strategies():
    from hypothesis import strategies as st

    from tests._fuzz import numbers as any_number

    numbers = any_number()
    text = (st.text(max_size=12) | st.sampled_from(["\u0000", "\ud7ff\uffff", "🙂", "\u202e"])
            | st.integers(1, 20000).map(lambda n: "é🙂x"[n % 3] * n))
    scalars = st.none() | st.booleans() | numbers | text
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4), max_leaves=12)
    deep = st.integers(20, 100_000).map(_Deep)  # written out as text: json itself cannot nest that deep
    ops = st.sampled_from(["add", "ablate", "sara", "sas", "ADD", "", "mul", "add "]) | text
    refs = (st.sampled_from(["pub", "nope", "0" * 64, "sae:none/1", "sae:x/-1", "/etc/hostname", "../pub", "PUB", ""])
            | st.lists(numbers, max_size=8) | st.lists(numbers, min_size=576, max_size=576)
            | st.builds(lambda: [0.01] * 576) | st.builds(lambda: [0.01] * 575 + [float("nan")]) | values)
    layers = (st.lists(st.integers(-5, 40), max_size=6) | st.integers(-(10**20), 10**20) | values
              | st.builds(lambda: list(range(20000))) | st.builds(lambda: [10] * 5000))
    positions = st.sampled_from(["all", "prompt", "generated", "bogus", None]) | st.lists(st.integers(-(10**20), 10**20), max_size=3) | values
    schedules = st.fixed_dictionaries(
        {"kind": st.sampled_from(["constant", "linear", "exp", "window", "Linear", ""]) | text},
        optional={"from": numbers | values, "to": numbers | values, "over": numbers | values,
                  "half_life": numbers | values, "start": numbers | values, "length": numbers | values,
                  "unknown": values}) | values
    condition = st.fixed_dictionaries({"vector": refs, "layer": st.integers(-3, 40) | numbers | values,
                                       "threshold": numbers | values},
                                      optional={"compare": st.sampled_from(["above", "below", "up"]) | values,
                                                "pool": st.sampled_from(["mean", "last", "max"]) | values,
                                                "unknown": values})
    whens = (condition | st.fixed_dictionaries({"conditions": st.lists(condition, max_size=4) | values},
                                               optional={"combine": st.sampled_from(["any", "all", "most"]) | values})
             | values)
    fuzzed = st.fixed_dictionaries({"op": ops, "vector": refs, "layers": layers},
                                   optional={"scale": numbers | text | values, "positions": positions, "normalize": values,
                                             "sae": text, "unknown": values, "schedule": schedules, "when": whens})
    valid = st.builds(lambda scale, layer: {"op": "add", "vector": "pub", "layers": [layer], "scale": scale},
                      st.floats(-20, 20, allow_nan=False), st.integers(0, 29))
    valid_scheduled = st.builds(
        lambda scale, layer, sched: {"op": "add", "vector": "pub", "layers": [layer], "scale": scale, "schedule": sched},
        st.floats(-20, 20, allow_nan=False), st.integers(0, 29),
        st.sampled_from([{"kind": "linear", "from": 1.0, "to": -1.0, "over": 3}, {"kind": "exp", "half_life": 0.5},
                         {"kind": "window", "start": 0, "length": 1}, {"kind": "constant"}]))
    valid_gated = st.builds(
        lambda scale, layer, threshold, compare, pool: {
            "op": "add", "vector": "pub", "layers": [layer], "scale": scale,
            "when": {"vector": "pub", "layer": 6, "threshold": threshold, "compare": compare, "pool": pool}},
        st.floats(-20, 20, allow_nan=False), st.integers(0, 29), st.floats(-1.5, 1.5, allow_nan=False),
        st.sampled_from(["above", "below"]), st.sampled_from(["mean", "last"]))
    interventions = st.lists(fuzzed | valid | valid_scheduled | valid_gated, max_size=5)
    steering = (st.fixed_dictionaries({"interventions": interventions}) | interventions | values | deep
                | st.dictionaries(text, values, max_size=3) | st.fixed_dictionaries({"interventions": values}))
    return st.tuples(steering, st.sampled_from(["body", "xargs_text", "xargs_object", "both"]))


def test_fuzzed_steering_is_answered_4xx_or_200_never_5xx(http, tenant_server):
    from hypothesis import HealthCheck, given, settings

    good = _steering(8.0)
    before = (_text(_complete(http, steering=good)), _text(_complete(http)))
    statuses: list[int] = []
    session = httpx.Client(base_url=tenant_server, timeout=60, headers={**auth("alice"), "content-type": "application/json"})

    @settings(max_examples=2000, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_strategies())
    def check(case):
        steering, where = case
        body: dict = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        if where in ("body", "both"):
            body["steering"] = steering
        if where in ("xargs_text", "both"):
            body["vllm_xargs"] = {"steering": _dumps({"s": steering})[6:-1]}
        if where == "xargs_object":
            body["vllm_xargs"] = {"steering": steering}
        content = _dumps(body)
        r = session.post("/v1/completions", content=content)
        statuses.append(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text[:500], content[:500])
        assert r.status_code == 200 or r.json()["error"]["message"], r.text[:300]

    with session:
        check()
    print("fuzz statuses:", sorted(Counter(statuses).items()))
    assert len(statuses) >= 2000
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert (_text(_complete(http, steering=good)), _text(_complete(http))) == before
