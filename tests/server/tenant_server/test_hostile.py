"""A hostile tenant against the shared tenant server (conftest.py): each of the issue's eight
repros, over real HTTP, is refused with a 4xx naming the field or is harmless, and the other
tenants' output afterwards equals what they got before (tokens and logprobs).

erin is the hostile tenant here, frank the bystander."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from tests.server.tenant_server import MODEL, auth
from vsteer import SteeringVector, save_vector

LONG_PROMPT = " ".join(f"Line {i}: the green lamp stands next to the old clock." for i in range(30))


@pytest.fixture(scope="module")
def http(tenant_server):
    with httpx.Client(base_url=tenant_server, timeout=180) as client:
        yield client


def _body(prompt: str = "The weather today is", steering=None, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2, **extra}
    if steering is not None:
        body["steering"] = steering
    return body


def _answer(r: httpx.Response) -> tuple[str, list]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _refused(r: httpx.Response, status: int, param: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def _add(vector, layers=(10,), scale=1.0, **extra) -> dict:
    return {"interventions": [{"op": "add", "vector": vector, "layers": list(layers), "scale": scale, **extra}]}


def _store_files(store) -> set:
    return {p.name for p in store.glob("*.safetensors")}


def _store_returns_to(store, files: set, within: float = 10.0) -> bool:
    """Whether the store holds exactly ``files`` within ``within`` seconds (a request's inline
    vectors are collected just after its reply is sent)."""
    deadline = time.monotonic() + within
    while _store_files(store) != files and time.monotonic() < deadline:
        time.sleep(0.05)
    return _store_files(store) == files


@pytest.fixture(scope="module")
def baseline(http):
    """frank's answers before any hostile traffic: plain, and steered with the public vector."""
    plain = _answer(http.post("/v1/completions", json=_body(), headers=auth("frank")))
    steered = _answer(http.post("/v1/completions", json=_body(steering=_add("pub", scale=6.0)), headers=auth("frank")))
    return plain, steered


ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations",
          "/v1/chat/completions/batch", "/inference/v1/generate", "/cohere/v2/chat", "/tokenize", "/v1/vectors"]


@pytest.mark.parametrize("route", ROUTES)
def test_1_two_content_types_and_odd_encodings_are_refused(http, route):
    """The walk-around of the issue (JSON first, form last) and its relatives: refused before vLLM,
    on every route."""
    raw = b'{"model": "smollm2", "prompt": "x", "vllm_xargs": {"vsteer": "{}"}}'
    for headers, status, param in [
        ([("content-type", "application/json"), ("content-type", "application/x-www-form-urlencoded")], 400, "content-type"),
        ([("content-type", "application/x-www-form-urlencoded"), ("content-type", "application/json")], 400, "content-type"),
        ([("content-type", "application/json"), ("content-encoding", "gzip")], 415, "content-encoding"),
        ([("content-type", "application/json"), ("content-encoding", "identity"), ("content-encoding", "br")], 415,
         "content-encoding"),
    ]:
        r = http.post(route, content=raw, headers=[*headers, *auth("erin").items()])
        _refused(r, status, param)
    two_keys = [("content-type", "application/json"), *auth("erin").items(), *auth("frank").items()]
    _refused(http.post(route, content=raw, headers=two_keys), 400, "authorization")
    if route == "/v1/vectors":
        return
    # a body that is not a JSON object is answered by the edge, never forwarded as it came
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe{"):
        r = http.post(route, content=content, headers={"content-type": "application/json", **auth("erin")})
        assert r.status_code == 400, r.text
    _refused(http.post(route, content=raw, headers={"content-type": "application/json", **auth("erin")}), 400,
             "vllm_xargs.vsteer")
    # reserved keys stay reserved, whatever the content type says, and in a chunked body
    r = http.post(route, content=raw, headers={"content-type": "text/plain", **auth("erin")})
    _refused(r, 400, "vllm_xargs.vsteer")
    r = http.post(route, content=iter([raw[:20], raw[20:]]), headers={"content-type": "application/json", **auth("erin")})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    _refused(r, 400, "vllm_xargs.vsteer")


def test_root_path_is_stripped_before_routing():
    from vsteer.server.middleware import route_path

    assert route_path({"path": "/api/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert route_path({"path": "/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert route_path({"path": "/apiv1/completions", "root_path": "/api"}) == "/apiv1/completions"
    assert route_path({"path": "/api", "root_path": "/api/"}) == "/"


def test_2_huge_integers_are_refused_and_the_server_keeps_serving(http, baseline):
    for schedule, field in [({"kind": "window", "start": 10**400, "length": 1}, "start"),
                            ({"kind": "linear", "from": 0, "to": 1, "over": 10**400}, "over"),
                            ({"kind": "window", "start": 0, "length": 2**63}, "length")]:
        r = http.post("/v1/completions", json=_body(steering=_add("pub", schedule=schedule)), headers=auth("erin"))
        _refused(r, 400, f"interventions.0.schedule.{field}")
    r = http.post("/v1/completions", json=_body(steering=_add("pub", positions=[0, 10**400])), headers=auth("erin"))
    _refused(r, 400, "interventions.0.positions")
    assert _answer(http.post("/v1/completions", json=_body(), headers=auth("frank"))) == baseline[0]


def test_3_nan_makers_are_refused_and_the_largest_allowed_steering_poisons_nobody(http, baseline, tenant_store):
    """The issue's NaN specs get 400; then erin runs the strongest steering the bounds allow on a
    long prompt, several times, and frank's next answers equal his answers before (no dirty KV)."""
    _refused(http.post("/v1/completions", json=_body(steering=_add("pub", scale=1e-300, schedule={
        "kind": "linear", "from": 1e300, "to": 1e300, "over": 4})), headers=auth("erin")), 400,
        "interventions.0.schedule.from")
    _refused(http.post("/v1/completions", json=_body(steering=_add("pub", scale=1e-35, schedule={
        "kind": "linear", "from": 1e39, "to": 0, "over": 4})), headers=auth("erin")), 400,
        "interventions.0.schedule.from")
    _refused(http.post("/v1/completions", json=_body(steering=_add([3e38] * 576, layers=(10, 11))),
                       headers=auth("erin")), 400, "interventions.0.vector")
    huge = SteeringVector.from_tensors({10: torch.full((576,), 3e38), 11: torch.full((576,), 3e38)})
    path = tenant_store.parent / "huge.safetensors"
    save_vector(huge, path)
    before = _store_files(tenant_store)
    r = http.post("/v1/vectors?name=huge", content=path.read_bytes(), headers=auth("erin"))
    _refused(r, 400, "file")
    assert _store_files(tenant_store) == before
    strongest = {"interventions": [
        {"op": "add", "vector": [1e6] * 576, "layers": [10, 11, 12], "scale": 1e4},
        {"op": "add", "vector": [-1e6] * 576, "layers": [20], "scale": 1e4,
         "schedule": {"kind": "linear", "from": 1.0, "to": 1.0, "over": 1}},
    ]}
    for prompt in (LONG_PROMPT, "The weather today is"):
        r = http.post("/v1/completions", json=_body(prompt, steering=strongest, max_tokens=4), headers=auth("erin"))
        assert r.status_code in (200, 400), r.text
    assert _answer(http.post("/v1/completions", json=_body(), headers=auth("frank"))) == baseline[0]
    assert _answer(http.post("/v1/completions", json=_body(steering=_add("pub", scale=6.0)),
                             headers=auth("frank"))) == baseline[1]
    assert _store_returns_to(tenant_store, before)  # the inline vectors went with their requests


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_whose_forward_pass_goes_nan_is_a_422_and_poisons_nobody(http, baseline, route):
    """Defence in depth over HTTP: the server's engine carries the fault of tests/_faults.py, so
    erin's request steered with scale FAULT_SCALE goes NaN from layer 3 on (its KV, hidden states and
    logits). It is answered 422 naming "steering" (a stream: an error event), the server keeps
    serving, and frank's next answers (handed erin's freed KV blocks first) equal his answers before."""
    from tests._faults import FAULT_SCALE

    spec = _add("pub", scale=FAULT_SCALE)
    if route == "/v1/completions":
        body = _body(LONG_PROMPT, steering=spec, max_tokens=4)
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 4, "steering": spec}
    r = http.post(route, json=body, headers=auth("erin"))
    _refused(r, 422, "steering")
    assert "non-finite" in r.json()["error"]["message"]
    with http.stream("POST", route, json={**body, "stream": True}, headers=auth("erin")) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert any('"code":422' in e.replace(" ", "") and "non-finite" in e for e in events), events
    assert _answer(http.post("/v1/completions", json=_body(), headers=auth("frank"))) == baseline[0]
    assert _answer(http.post("/v1/completions", json=_body(steering=_add("pub", scale=6.0)),
                             headers=auth("frank"))) == baseline[1]
    r = http.post(route, json={**body, "steering": _add("pub", scale=1.0)}, headers=auth("erin"))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_grammar_that_admits_no_text_is_a_400_naming_structured_outputs(http, baseline, route):
    """vLLM masks every token, samples one anyway and ends the request when its grammar rejects it,
    which its server answers with a bare 500; vsteer's scheduler labels it the client's input. On
    this server's V2 runner as on V1 (tests/server/shared_server/test_sampling_fuzz.py)."""
    grammars = [{"structured_outputs": {"grammar": "root ::= root"}},
                {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}}]
    for grammar in grammars:
        body = _body(steering=_add("pub", scale=6.0), **grammar)
        if route == "/v1/chat/completions":
            body = {**{k: v for k, v in body.items() if k not in ("prompt", "logprobs")},
                    "messages": [{"role": "user", "content": body["prompt"]}]}
        _refused(http.post(route, json=body, headers=auth("erin")), 400, "structured_outputs")
    assert _answer(http.post("/v1/completions", json=_body(), headers=auth("frank"))) == baseline[0]


def test_4_more_slots_than_the_engine_has_is_a_400(http, tenant_store):
    """A per-position vector with more rows than the engine has slots: the edge knows the engine's
    resolved max_slots even without --max-slots or --max-num-seqs."""
    rows = SteeringVector.from_tensors({10: torch.randn(600, 576) * 0.01})
    path = tenant_store.parent / "rows.safetensors"
    save_vector(rows, path)
    assert http.post("/v1/vectors?name=rows", content=path.read_bytes(), headers=auth("erin")).status_code == 201
    r = http.post("/v1/completions", json=_body(steering=_add("rows", positions="prompt")),
                  headers=auth("erin"))
    _refused(r, 400, "interventions")
    assert "slots" in r.json()["error"]["message"]


def test_5_beam_search_refuses_steering_and_keeps_tenants_apart(http):
    r = http.post("/v1/completions", json={**_body(steering=_add("pub")), "use_beam_search": True, "n": 2},
                  headers=auth("erin"))
    _refused(r, 400, "use_beam_search")
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 2, "use_beam_search": True, "n": 2}
    assert http.post("/v1/completions", json=body, headers=auth("erin")).status_code == 200
    # frank's plain request of the same prompt finds nothing erin's beams cached
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1},
                  headers=auth("frank"))
    assert r.status_code == 200
    details = r.json()["usage"].get("prompt_tokens_details") or {}
    assert (details.get("cached_tokens") or 0) == 0


def test_6_a_costly_body_does_not_stall_another_tenant(http):
    """erin sends the largest spec the edge takes (32 interventions, distinct ranges) and one far
    over the cap, concurrently with frank's plain completions; frank's latency stays within 10 s
    (the issue measured 78 s) and the over-cap body is refused at once."""
    items = [{"op": "add", "vector": "pub", "layers": [10], "scale": 0.1, "positions": [i, i + 1 + (i % 3)]}
             for i in range(32)]
    over = [*items] * 40
    _refused(http.post("/v1/completions", json=_body(steering={"interventions": over}), headers=auth("erin")), 400,
             "interventions")
    done = []

    def hostile():
        for _ in range(3):
            r = http.post("/v1/completions", json=_body(steering={"interventions": items}, max_tokens=1),
                          headers=auth("erin"))
            done.append(r.status_code)

    thread = threading.Thread(target=hostile)
    thread.start()
    worst = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        assert http.post("/v1/completions", json=_body(max_tokens=1), headers=auth("frank")).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
    thread.join()
    assert all(s in (200, 400) for s in done), done
    assert worst < 10.0, worst


def test_7_refused_uploads_and_inline_vectors_leave_no_file(http, tenant_store):
    before = _store_files(tenant_store)
    v = SteeringVector.from_tensors({10: torch.randn(576, generator=torch.Generator().manual_seed(77))})
    path = tenant_store.parent / "named.safetensors"
    save_vector(v, path)
    _refused(http.post("/v1/vectors?name=bad%20name!", content=path.read_bytes(), headers=auth("erin")), 400, "name")
    assert _store_files(tenant_store) == before
    inline = torch.randn(576, generator=torch.Generator().manual_seed(78)).tolist()
    assert http.post("/v1/completions", json=_body(steering=_add(inline)), headers=auth("erin")).status_code == 200
    assert _store_returns_to(tenant_store, before)


def test_8_a_steered_background_response_is_refused(http):
    body = {"model": MODEL, "input": "Hello", "max_output_tokens": 4, "background": True, "steering": _add("pub")}
    _refused(http.post("/v1/responses", json=body, headers=auth("erin")), 400, "background")
