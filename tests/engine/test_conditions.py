"""Conditional steering (CAST): each request's gate is decided on the device from its own prompt,
and its tokens and logprobs equal a float64 HF-hook reference of the formula, per request, in a
batch that mixes gated-on, gated-off, ungated and unsteered requests."""

from __future__ import annotations

import itertools

import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import condition_sim, greedy, hidden_states
from vsteer._errors import SpecError
from vsteer.engine.plan import SteeringPlan
from vsteer.methods import mean_difference

TOKENS = 10
PROMPTS = [
    "Tell me about a trip to Paris by train.",
    "How do I fix a leaking kitchen sink?",
    "Which beaches should I visit in Portugal this summer?",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def travel(eager_llm):
    """A condition vector at layers 6 and 12 (travel questions minus other questions)."""
    vector = mean_difference(
        eager_llm,
        ["Where should I go on vacation in Europe?", "What is the best way to travel to Japan by plane?",
         "Can you plan a week of sightseeing in Rome?"],
        ["How do I bake bread?", "What is the derivative of x squared?", "How do I change a car tyre?"],
        [6, 12],
    )
    eager_llm.store.put(vector)
    return vector


def _pooled(hf_model, tokenizer, prompt: str, layer: int, pool: str) -> torch.Tensor:
    h = hidden_states(hf_model, tokenizer(prompt)["input_ids"])[layer + 1][0].double()
    return h.mean(dim=0) if pool == "mean" else h[-1]


def _threshold_between(sims: list[float]) -> float:
    """A threshold halfway across the widest gap between the sims (so some hold and some do not)."""
    ordered = sorted(sims)
    gap, lo = max((b - a, a) for a, b in itertools.pairwise(ordered))
    assert gap > 1e-3, f"the prompts' similarities are too close to split: {ordered}"
    return lo + gap / 2


def test_gates_and_tokens_equal_hf_reference_in_a_mixed_batch(eager_llm, hf_model, tokenizer, directions, travel):
    love = directions["love"]
    sha, csha = love.sha256, travel.sha256
    sims6 = [condition_sim(_pooled(hf_model, tokenizer, p, 6, "mean"), travel.layers[6]) for p in PROMPTS]
    sims12 = [condition_sim(_pooled(hf_model, tokenizer, p, 12, "last"), travel.layers[12]) for p in PROMPTS]
    t6, t12 = _threshold_between(sims6), _threshold_between(sims12)
    c6 = {"vector": csha, "layer": 6, "threshold": t6, "compare": "above"}
    c12 = {"vector": csha, "layer": 12, "threshold": t12, "compare": "below", "pool": "last"}
    r6 = {"vector": travel.layers[6], "layer": 6, "threshold": t6, "compare": "above"}
    r12 = {"vector": travel.layers[12], "layer": 12, "threshold": t12, "compare": "below", "pool": "last"}
    add = lambda layers, scale, **kw: {"op": "add", "vector": sha, "layers": layers, "scale": scale, **kw}  # noqa: E731
    ref = lambda layers, scale, **kw: {"op": "add", "direction": love.layers[layers[0]], "layers": layers,  # noqa: E731
                                       "scale": scale, **kw}
    any_ref = {"combine": "any", "conditions": [r6, r12]}
    all_ref = {"combine": "all", "conditions": [r6, r12]}
    one6, one12 = {"combine": "any", "conditions": [r6]}, {"combine": "any", "conditions": [r12]}
    cases = {
        # the behaviour layer follows the condition layer: the last prompt token is steered too
        "above@6": ([add([10], 12.0, when=c6)], [ref([10], 12.0, when=one6)]),
        # the behaviour layer precedes the condition layer: only generated tokens are steered
        "below@12 last": ([add([8], 12.0, when=c12)], [ref([8], 12.0, when=one12)]),
        "any": ([add([14], 12.0, when={"conditions": [c6, c12], "combine": "any"})],
                [ref([14], 12.0, when=any_ref)]),
        "all + ungated": ([add([3], 4.0), add([14], 12.0, when={"conditions": [c6, c12], "combine": "all"})],
                          [ref([3], 4.0), ref([14], 12.0, when=all_ref)]),
        "gated + schedule": ([add([10], 12.0, when=c6, schedule={"kind": "exp", "half_life": 3})],
                             [ref([10], 12.0, when=one6, schedule=("exp", 3.0))]),
        "plain": (None, []),
    }
    names = list(cases)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    batch = [(name, p) for name in names for p in range(len(PROMPTS))]
    outs = eager_llm.generate([PROMPTS[p] for _, p in batch], params,
                              steering=[{"interventions": cases[n][0]} if cases[n][0] else None for n, _ in batch])
    got = {key: list(out.outputs[0].token_ids) for key, out in zip(batch, outs)}
    got_lps = {key: [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
               for key, out in zip(batch, outs)}
    decisions = {}
    for (name, p), out in zip(batch, outs):
        record: dict = {}
        want, want_lps = greedy(hf_model, tokenizer(PROMPTS[p])["input_ids"], TOKENS, cases[name][1], record=record)
        seq = out.outputs[0]
        assert got[(name, p)] == want, (name, PROMPTS[p], record)
        lps = [lp[t].logprob for lp, t in zip(seq.logprobs, seq.token_ids)]
        assert max(abs(x - y) for x, y in zip(lps, want_lps)) < 2e-3, (name, p)
        decisions[(name, p)] = record["gates"].get(0)
    # single conditions split the prompts (their thresholds do), and a gate that is off is exactly unsteered
    for name in ("above@6", "below@12 last"):
        on = [p for p in range(len(PROMPTS)) if decisions[(name, p)]]
        assert 0 < len(on) < len(PROMPTS), f"{name}: every gate decided alike, so this proves little"
    for name in ("above@6", "below@12 last", "any", "gated + schedule"):
        for p in range(len(PROMPTS)):
            change = max(abs(x - y) for x, y in zip(got_lps[(name, p)], got_lps[("plain", p)]))
            if got[(name, p)] != got[("plain", p)]:
                change = float("inf")
            assert (change > 1e-3) if decisions[(name, p)] else (change < 1e-5), (name, PROMPTS[p], change)


def test_bad_conditions_are_refused_naming_the_field(eager_llm, directions, travel):
    love, csha = directions["love"].sha256, travel.sha256
    cond = {"vector": csha, "layer": 6, "threshold": 0.1}

    def add(**kw):
        return {"op": "add", "vector": love, "layers": [10], "scale": 4.0, **kw}

    cases = [
        ([add(when={**cond, "layer": 7})], "interventions.0.when.layer"),  # not a condition layer
        ([add(when={"conditions": [cond, {**cond, "vector": directions["love"].sha256, "layer": 7}]})],
         "interventions.0.when.conditions.1.layer"),
        ([add(when={**cond, "layer": 99})], "interventions.0.when.layer"),
        ([add(when={**cond, "vector": [0.0] * 576})], "interventions.0.when.vector"),
        ([add(when={**cond, "vector": [1.0] * 8})], "interventions.0.when.vector"),
        ([add(when={**cond, "compare": "sideways"})], "interventions.0.when.compare"),
        ([add(when={**cond, "threshold": float("nan")})], "interventions.0.when.threshold"),
        ([add(when={"conditions": [], "combine": "any"})], "interventions.0.when.conditions"),
        ([add(when={"conditions": [cond], "combine": "most"})], "interventions.0.when.combine"),
        ([add(when={"conditions": [cond] * 3})], "interventions"),  # max_conditions=2
        ([add(when=cond), add()], "interventions.1.when"),  # one gate per layer
        ([{"op": "sas", "sae": "test-relu", "vector": "x", "when": cond}], "interventions.0"),
    ]
    for interventions, field in cases:
        with pytest.raises(SpecError) as err:
            eager_llm.resolve({"interventions": interventions})
        assert err.value.field == field, (interventions, err.value)
    # the same gate on two edits at one layer is fine; a gate's vector is stored by its sha256
    plan = eager_llm.resolve({"interventions": [add(when=cond), add(when=cond)]})
    assert plan.layer_gates()[10][1][0][0] == csha
    assert SteeringPlan.from_extra_args(plan.to_extra_args()) == plan


def test_engine_plan_json_refuses_a_malformed_gate():
    data = {"v": 1, "interventions": [{"op": "add", "vector": "0" * 64, "layers": [10], "scale": 1.0,
                                       "positions": "all", "normalize": False, "rows": 0,
                                       "when": {"combine": "any", "conditions": [{"vector": "love", "layer": 6,
                                                                                  "threshold": 0.1}]}}]}
    with pytest.raises(SpecError, match="sha256"):
        SteeringPlan.from_extra_args(data)


def test_condition_layers_the_engine_does_not_wrap_are_refused_before_it_starts(model_path, store_dir):
    from vsteer.engine.llm import LLM

    for kwargs, bad in (({"condition_layers": [6, 30]}, "[30]"),
                        ({"condition_layers": [6, 12], "steerable_layers": [6, 10]}, "[12]")):
        with pytest.raises(SpecError) as err:
            LLM(model_path, store=store_dir, enforce_eager=True, **kwargs)
        assert err.value.field == "condition_layers" and bad in err.value.reason
