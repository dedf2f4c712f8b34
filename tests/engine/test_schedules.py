"""Scale schedules: the scale as a function of the generated-token index, applied per token
inside the batch. The engine's tokens and logprobs equal a float64 HF hook reference that scales
each layer's composed change by the schedule's value, per request, in a batch that mixes
schedules with unscheduled and unsteered requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import greedy
from vsteer import save_vector, schedules
from vsteer._errors import SpecError
from vsteer.engine.plan import SteeringPlan
from vsteer.methods import affine_vector

PROMPT = "I think that"
TOKENS = 10


def test_schedule_values_follow_their_formulas():
    t = np.array([-3, 0, 1, 2, 5, 8, 20])
    np.testing.assert_allclose(schedules.values(("linear", 2.0, -1.0, 6), t),
                               [2.0, 2.0, 1.5, 1.0, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(schedules.values(("exp", 2.0), t), 0.5 ** (np.maximum(t, 0) / 2.0))
    np.testing.assert_array_equal(schedules.values(("window", 1, 4), t), [0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(schedules.values(None, t), np.ones(7))
    for sched in (("linear", 2.0, -1.0, 6), ("exp", 2.0), ("window", 1, 4)):
        assert schedules.as_tuple(schedules.from_tuple(sched)) == sched
    assert schedules.as_tuple({"kind": "constant"}) is None


def test_bad_schedules_are_refused_naming_the_field(eager_llm, directions):
    love = eager_llm.store.put(directions["love"])

    def add(**kw):
        return {"op": "add", "vector": love, "layers": [10], "scale": 4.0, **kw}

    cases = [
        ([add(schedule={"kind": "linear", "from": 1, "to": 0, "over": 0})], "interventions.0.schedule.over"),
        ([add(schedule={"kind": "exp", "half_life": 0})], "interventions.0.schedule.half_life"),
        ([add(schedule={"kind": "spiral"})], "interventions.0.schedule"),
        ([add(schedule={"kind": "window", "start": -1, "length": 2})], "interventions.0.schedule.start"),
        ([add(normalize=True, schedule={"kind": "exp", "half_life": 2})], "interventions.0"),
        ([{"op": "ablate", "vector": love, "layers": [10], "schedule": {"kind": "exp", "half_life": 2}}],
         "interventions.0"),
        ([add(schedule={"kind": "exp", "half_life": 2}), add()], "interventions.1.schedule"),
        ([add(schedule={"kind": "exp", "half_life": 2}), add(schedule={"kind": "exp", "half_life": 3})],
         "interventions.1.schedule"),
        ([add(scale=100.0, schedule={"kind": "linear", "from": 1000, "to": 0, "over": 4})],
         "interventions.0.schedule"),
    ]
    for interventions, field in cases:
        with pytest.raises(SpecError) as err:
            eager_llm.resolve({"interventions": interventions})
        assert err.value.field == field, (interventions, err.value)
    # the same schedule on two edits at one layer is fine; constant is no schedule at all
    ok = eager_llm.resolve({"interventions": [add(schedule={"kind": "window", "start": 0, "length": 3}),
                                              add(schedule={"kind": "window", "start": 0, "length": 3})]})
    assert ok.layer_schedules() == {10: ("window", 0, 3)}
    const = eager_llm.resolve({"interventions": [add(schedule={"kind": "constant"})]})
    assert const.hash == eager_llm.resolve({"interventions": [add()]}).hash


def test_engine_plan_json_refuses_a_malformed_schedule():
    data = {"v": 1, "interventions": [{"op": "add", "vector": "0" * 64, "layers": [10], "scale": 1.0,
                                       "positions": "all", "normalize": False, "rows": 0,
                                       "schedule": {"kind": "linear", "from": 1.0}}]}
    with pytest.raises(SpecError, match="schedule"):
        SteeringPlan.from_extra_args(data)


def test_schedules_equal_hf_hooks_per_request_in_one_batch(eager_llm, hf_model, tokenizer, directions, tmp_path):
    love = directions["love"]
    sha = eager_llm.store.put(love)
    d = love.hidden_size
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(1, d, generator=gen, dtype=torch.float64) * 0.05
    B = torch.randn(1, d, generator=gen, dtype=torch.float64) * 0.05
    b = torch.randn(d, generator=gen, dtype=torch.float64) * 3.0 / d ** 0.5
    path = tmp_path / "edit.safetensors"
    save_vector(affine_vector({10: (A, B, b)}), path)
    lin = {"kind": "linear", "from": 1.5, "to": -1.0, "over": 6}
    win = {"kind": "window", "start": 2, "length": 4}
    specs = {
        "linear": [{"op": "add", "vector": sha, "layers": [10], "scale": 8.0, "schedule": lin}],
        "exp+window": [{"op": "add", "vector": sha, "layers": [10], "scale": 8.0,
                        "schedule": {"kind": "exp", "half_life": 2}},
                       {"op": "affine", "vector": str(path), "layers": [12], "scale": 2.0, "schedule": win}],
        "shared window": [{"op": "add", "vector": sha, "layers": [10], "scale": 8.0, "schedule": win},
                          {"op": "affine", "vector": str(path), "layers": [10], "scale": 2.0, "schedule": win}],
        "unscheduled": [{"op": "add", "vector": sha, "layers": [10], "scale": 8.0}],
        "plain": None,
    }
    hf_items = {
        "linear": [{"op": "add", "direction": love.layers[10], "layers": [10], "scale": 8.0,
                    "schedule": ("linear", 1.5, -1.0, 6)}],
        "exp+window": [{"op": "add", "direction": love.layers[10], "layers": [10], "scale": 8.0,
                        "schedule": ("exp", 2.0)},
                       {"op": "affine", "affine": {12: (A, B, b)}, "layers": [12], "scale": 2.0,
                        "schedule": ("window", 2, 4)}],
        "shared window": [{"op": "add", "direction": love.layers[10], "layers": [10], "scale": 8.0,
                           "schedule": ("window", 2, 4)},
                          {"op": "affine", "affine": {10: (A, B, b)}, "layers": [10], "scale": 2.0,
                           "schedule": ("window", 2, 4)}],
        "unscheduled": [{"op": "add", "direction": love.layers[10], "layers": [10], "scale": 8.0}],
        "plain": [],
    }
    names = list(specs)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = eager_llm.generate([PROMPT] * len(names), params,
                              steering=[{"interventions": specs[n]} if specs[n] else None for n in names])
    ids = tokenizer(PROMPT)["input_ids"]
    got = {}
    for name, out in zip(names, outs):
        want_tokens, want_lps = greedy(hf_model, ids, TOKENS, hf_items[name])
        seq = out.outputs[0]
        assert list(seq.token_ids) == want_tokens, name
        lps = [lp[t].logprob for lp, t in zip(seq.logprobs, seq.token_ids)]
        assert max(abs(x - y) for x, y in zip(lps, want_lps)) < 2e-3, name
        got[name] = list(seq.token_ids)
    # the schedules changed something: each scheduled run differs from the unscheduled one
    for name in ("linear", "exp+window", "shared window"):
        assert got[name] != got["unscheduled"], f"{name}: the schedule changed nothing, so this proves nothing"
