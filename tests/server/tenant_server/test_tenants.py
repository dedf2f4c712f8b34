"""Tenants on a real steering server (stock vLLM's own server with vsteer's plugins, started the
stock way): keys, per-tenant vectors, limits; over real HTTP, with httpx and the OpenAI client. The
server (tenants carol and dave here) is this folder's, shared with test_edge.py (conftest.py)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.server.tenant_server import KEYS, MODEL, PUBLIC, auth
from vsteer import SteeringVector, save_vector


def _complete(base: str, who: str | None, vector: object, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": "My weekend", "max_tokens": 6, "temperature": 0,
            "steering": {"interventions": [{"op": "add", "vector": vector, "layers": [10], "scale": 8.0}]}, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers=auth(who) if who else {}, timeout=60)


def test_the_openai_client_steers_stock_vllm(tenant_server):
    """The official OpenAI client against stock vLLM's server: a tenant's steered completion and
    chat differ from its plain ones and repeat exactly (streamed too); a wrong key and a vector
    the tenant cannot see come back as the client's own errors."""
    import openai

    client = openai.OpenAI(base_url=tenant_server + "/v1", api_key=KEYS["carol"], max_retries=0)
    spec = {"interventions": [{"op": "add", "vector": PUBLIC[0], "layers": [10], "scale": 40.0}]}
    ask = dict(model=MODEL, prompt="My weekend", max_tokens=8, temperature=0)
    steered = client.completions.create(**ask, extra_body={"steering": spec}).choices[0].text
    plain = client.completions.create(**ask).choices[0].text
    assert steered != plain
    assert client.completions.create(**ask, extra_body={"steering": spec}).choices[0].text == steered
    stream = client.completions.create(**ask, stream=True, extra_body={"steering": spec})
    assert "".join(chunk.choices[0].text for chunk in stream) == steered
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Describe your weekend."}], max_tokens=8, temperature=0)
    assert (client.chat.completions.create(**chat, extra_body={"steering": spec}).choices[0].message.content
            != client.chat.completions.create(**chat).choices[0].message.content)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tenant_server + "/v1", api_key="sk-wrong", max_retries=0).completions.create(**ask)
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(**ask, extra_body={"steering": {"interventions": [
            {"op": "add", "vector": "nobody-has-this", "layers": [10], "scale": 8.0}]}})
    assert 400 <= refused.value.status_code < 500 and "vector" in str(refused.value.body)


def test_keys_are_required(tenant_server):
    assert httpx.get(f"{tenant_server}/v1/models").status_code == 401
    assert httpx.get(f"{tenant_server}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{tenant_server}/v1/models", headers=auth("dave")).status_code == 200
    assert httpx.get(f"{tenant_server}/health").status_code == 200


def test_a_tenant_cannot_see_use_or_delete_another_tenants_vector(tenant_server, tenant_store, tmp_path):
    from vsteer.vectors import VectorStore

    v = SteeringVector.from_tensors({10: torch.linspace(-1, 1, 576)})
    save_vector(v, tmp_path / "v.safetensors")
    up = httpx.post(f"{tenant_server}/v1/vectors", params={"name": "mine"}, content=(tmp_path / "v.safetensors").read_bytes(),
                    headers=auth("carol"))
    assert up.status_code == 201 and up.json()["names"] == ["mine"]
    sha = up.json()["sha256"]
    assert _complete(tenant_server, "carol", "mine").status_code == 200
    assert _complete(tenant_server, "carol", sha).status_code == 200
    listed_by_dave = [item["sha256"] for item in httpx.get(f"{tenant_server}/v1/vectors", headers=auth("dave")).json()["data"]]
    public = {VectorStore(tenant_store).names()[name] for name in PUBLIC}
    assert sha not in listed_by_dave and set(listed_by_dave) == public and len(listed_by_dave) == len(public)
    assert httpx.get(f"{tenant_server}/v1/vectors/mine", headers=auth("dave")).status_code == 404
    assert httpx.get(f"{tenant_server}/v1/vectors/{sha}", headers=auth("dave")).status_code == 404
    for ref in ("mine", sha):
        denied = _complete(tenant_server, "dave", ref)
        assert denied.status_code == 404 and denied.json()["error"]["param"] == "interventions.0.vector"
    assert httpx.delete(f"{tenant_server}/v1/vectors/{sha}", headers=auth("dave")).status_code == 404
    # a condition vector is a vector too: carol may gate on hers, dave may not
    cond = {"vector": "mine", "layer": 6, "threshold": 0.0}
    for when, param in ((cond, "interventions.0.when.vector"),
                        ({"conditions": [cond]}, "interventions.0.when.conditions.0.vector")):
        gated = {"steering": {"interventions": [{"op": "add", "vector": "public-ones", "layers": [10], "when": when}]}}
        body = {"model": MODEL, "prompt": "My weekend", "max_tokens": 4, "temperature": 0, **gated}
        assert httpx.post(f"{tenant_server}/v1/completions", json=body, headers=auth("carol"), timeout=60).status_code == 200
        denied = httpx.post(f"{tenant_server}/v1/completions", json=body, headers=auth("dave"), timeout=60)
        assert denied.status_code == 404 and denied.json()["error"]["param"] == param, denied.text
    assert httpx.get(f"{tenant_server}/v1/vectors/mine", headers=auth("carol")).status_code == 200
    # both see and use the operator's public vector, neither can delete it
    for who in ("carol", "dave"):
        assert _complete(tenant_server, who, "public-ones").status_code == 200
        assert httpx.delete(f"{tenant_server}/v1/vectors/public-ones", headers=auth(who)).status_code == 404


def test_vector_limit(tenant_server, tmp_path):
    codes = []
    for i in range(3):
        v = SteeringVector.from_tensors({10: torch.full((576,), 0.01 * (i + 1))})
        save_vector(v, tmp_path / f"{i}.safetensors")
        codes.append(httpx.post(f"{tenant_server}/v1/vectors", content=(tmp_path / f"{i}.safetensors").read_bytes(),
                                headers=auth("carol")).status_code)
    assert 429 in codes  # carol may own 2 vectors and already owns one from the test above
    assert httpx.get(f"{tenant_server}/v1/models", headers=auth("carol")).status_code == 200


def test_configs_in_flight_limit(tenant_server):
    """dave may run one distinct steering config at a time: a second one is refused while the first streams."""
    body = lambda scale: {"model": MODEL, "prompt": "Tell a story:", "max_tokens": 150, "temperature": 0, "ignore_eos": True,  # noqa: E731
                          "stream": True, "steering": {"interventions": [{"op": "add", "vector": "public-ones", "layers": [10], "scale": scale}]}}
    with httpx.stream("POST", f"{tenant_server}/v1/completions", json=body(4.0), headers=auth("dave"), timeout=120) as first:
        lines = first.iter_lines()  # keep the iterator: dropping it closes the stream (a disconnect)
        next(lines)
        second = httpx.post(f"{tenant_server}/v1/completions", json=dict(body(5.0), stream=False, max_tokens=2), headers=auth("dave"))
        assert second.status_code == 429 and "max_configs_in_flight=1" in second.json()["error"]["message"]
        same = httpx.post(f"{tenant_server}/v1/completions", json=dict(body(4.0), stream=False, max_tokens=2), headers=auth("dave"))
        assert same.status_code == 200  # the config already running is fine
        for _ in lines:
            pass
    after = httpx.post(f"{tenant_server}/v1/completions", json=dict(body(5.0), stream=False, max_tokens=2), headers=auth("dave"))
    assert after.status_code == 200
