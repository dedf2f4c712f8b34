"""Mixed batches, compiled vs eager, slot pressure and prefix-cache isolation, on the real engine."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from tests._reference.agreement import assert_greedy_agrees

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
GREEDY_TOP2 = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2)  # chosen token and runner-up
PROMPTS = ["I think that", "The weather today is", "My best friend", "Once upon a time"]


def _configs(directions) -> list[dict]:
    love, wedding = directions["love"].sha256, directions["wedding"].sha256
    return [
        {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 8.0}]},
        {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": -8.0}]},
        {"interventions": [{"op": "add", "vector": wedding, "layers": [10], "scale": 12.0}]},
        {"interventions": [{"op": "add", "vector": wedding, "layers": [4, 5], "scale": 6.0, "positions": "generated"}]},
        {"interventions": [{"op": "add", "vector": love, "layers": [15], "scale": 12.0, "positions": "prompt"}]},
        {"interventions": [{"op": "ablate", "vector": love, "layers": list(range(0, 30, 3))}]},
        {"interventions": [{"op": "add", "vector": love, "layers": [12], "scale": 10.0, "normalize": True}]},
        {"interventions": [
            {"op": "add", "vector": love, "layers": [8], "scale": 6.0, "positions": [0, 3]},
            {"op": "add", "vector": wedding, "layers": [8, 20], "scale": 8.0, "positions": "generated"},
        ]},
        {"interventions": [{"op": "add", "vector": [0.05] * 576, "layers": [2, 3], "scale": 20.0}]},
        {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 10.0,
                            "schedule": {"kind": "linear", "from": 1.0, "to": -1.0, "over": 8}}]},
        {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 10.0,
                            "when": {"vector": wedding, "layer": 6, "threshold": -1.0}}]},
        {"interventions": [
            {"op": "add", "vector": love, "layers": [3], "scale": 6.0},
            {"op": "add", "vector": wedding, "layers": [14], "scale": 12.0, "when": {"combine": "all", "conditions": [
                {"vector": wedding, "layer": 6, "threshold": 0.0}, {"vector": love, "layer": 12, "threshold": 0.5,
                                                                    "compare": "below", "pool": "last"}]}},
        ]},
    ]


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def alone(eager_llm, directions):
    """Every (config, prompt) run as a batch of one."""
    for v in directions.values():
        eager_llm.store.put(v)
    configs = _configs(directions)
    return {(c, p): _tokens(eager_llm.generate([PROMPTS[p]], GREEDY, steering=configs[c]))[0]
            for c in range(len(configs)) for p in range(len(PROMPTS))}


@pytest.fixture(scope="module")
def plain_vllm_tokens(plain_vllm):
    """Plain vLLM (no vsteer worker, scheduler or layers) on the same prompts."""
    return _tokens(plain_vllm.generate(PROMPTS, GREEDY, use_tqdm=False))


def _mixed_outputs(llm, directions, params=GREEDY):
    configs = _configs(directions)
    jobs = [(c, p) for c in range(len(configs)) for p in range(len(PROMPTS))]
    jobs += [(None, p) for p in range(len(PROMPTS))]
    jobs = jobs[::3] + jobs[1::3] + jobs[2::3]  # interleave configs inside the batch
    return jobs, llm.generate([PROMPTS[p] for _, p in jobs], params, steering=[None if c is None else configs[c] for c, _ in jobs])


def _mixed(llm, directions):
    jobs, outs = _mixed_outputs(llm, directions)
    return jobs, _tokens(outs)


def test_mixed_batch_equals_each_request_alone(eager_llm, directions, alone, plain_vllm_tokens):
    jobs, tokens = _mixed(eager_llm, directions)
    assert len({c for c, _ in jobs if c is not None}) >= 8
    for (c, p), got in zip(jobs, tokens):
        want = plain_vllm_tokens[p] if c is None else alone[(c, p)]
        assert got == want, f"config {c}, prompt {PROMPTS[p]!r}"
    steered_differ = {c for (c, p), got in zip(jobs, tokens) if c is not None and got != plain_vllm_tokens[p]}
    assert len(steered_differ) == len(_configs(directions)), "every config must change some output"


@pytest.mark.compiled
def test_compiled_engine_gives_the_same_tokens(compiled_llm, eager_llm, directions):
    """The compiled engine runs the mixed batch as the eager one does (which equals each request
    alone and plain vLLM, test above), up to float32 rounding: greedy tokens agree except after a
    near-tie, logprobs within LOGPROB_TOL (tests/_reference/agreement.py)."""
    jobs, got = _mixed_outputs(compiled_llm, directions, GREEDY_TOP2)
    _, want = _mixed_outputs(eager_llm, directions, GREEDY_TOP2)
    seen = [assert_greedy_agrees(g, w, label=f"compiled engine, config {c}, prompt {PROMPTS[p]!r}")
            for (c, p), g, w in zip(jobs, got, want)]
    print(f"compiled vs eager: max |dlogprob| {max(a.max_logprob_diff for a in seen):.2e}, "
          f"near-tie divergences {[(jobs[i], a.diverged_at, a.gap) for i, a in enumerate(seen) if a.diverged_at is not None]}")
    # Steering must take effect in the compiled engine: every config changes some prompt's output.
    unsteered = {p: list(o.outputs[0].token_ids) for (c, p), o in zip(jobs, got) if c is None}
    changed = {c for (c, p), o in zip(jobs, got) if c is not None and list(o.outputs[0].token_ids) != unsteered[p]}
    assert changed == set(range(len(_configs(directions)))), "a config left the compiled engine's output unchanged"


def _compile_cache_key(worker) -> tuple:
    """(pinned width, vLLM's config hash, the hash with another width): vLLM names its AOT compile
    cache (torch_compile_cache/torch_aot_compile/<hash>) by factors that include the config hash."""
    cc, cfg = worker.vllm_config.compilation_config.inductor_compile_config, worker.vllm_config
    width = cc["cpp.simdlen"]
    mine = cfg.compute_hash()
    cc["cpp.simdlen"] = 128 if width != 128 else 256
    other = cfg.compute_hash()
    cc["cpp.simdlen"] = width
    return width, mine, other


@pytest.mark.compiled
def test_compiled_engine_keys_its_compile_cache_on_the_vector_width(compiled_llm):
    """The CPU worker pinned inductor's vector width before compiling (compile_key.py), so the
    compile cache the engine wrote is named by a hash that includes it."""
    import os
    from pathlib import Path

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    [(width, mine, other)] = compiled_llm.engine.collective_rpc(_compile_cache_key)
    assert width == pick_vec_isa().bit_width() and mine != other
    aot = Path(os.environ["VLLM_CACHE_ROOT"]) / "torch_compile_cache" / "torch_aot_compile"
    assert aot.is_dir() and any(aot.iterdir()), "the compiled engine wrote no compile cache"


def test_more_configs_than_slots(few_slots_llm, directions, alone):
    small = few_slots_llm
    configs = _configs(directions)
    jobs = [(c, p) for c in range(len(configs)) for p in range(2)]
    outs = small.generate([PROMPTS[p] for _, p in jobs], GREEDY, steering=[configs[c] for c, _ in jobs])
    for (c, p), got in zip(jobs, _tokens(outs)):
        assert got == alone[(c, p)], f"config {c}, prompt {PROMPTS[p]!r} with 3 slots"
    stats = small.stats()
    assert stats["max_slots"] == 3 < len(configs)
    assert stats["loads"] >= len(configs)  # rows were evicted and reloaded, never shared


def test_prefix_cache_is_not_shared_across_steering(eager_llm, directions):
    prompt = "The history of the old castle on the hill is long and " * 25  # >= 2 full KV blocks (CPU block size 128)
    a = {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [10], "scale": 8.0}]}
    b = {"interventions": [{"op": "add", "vector": directions["wedding"].sha256, "layers": [10], "scale": 8.0}]}
    first_a = eager_llm.generate([prompt], GREEDY, steering=a)[0]
    only_b = eager_llm.generate([prompt], GREEDY, steering=b)[0]
    again_a = eager_llm.generate([prompt], GREEDY, steering=a)[0]
    plain = eager_llm.generate([prompt], GREEDY)[0]
    assert only_b.num_cached_tokens == 0, "a different steering config reused cached KV blocks"
    assert plain.num_cached_tokens == 0, "an unsteered request reused steered KV blocks"
    assert again_a.num_cached_tokens > 0, "prefix caching is not on, so this test proves nothing"
    assert list(again_a.outputs[0].token_ids) == list(first_a.outputs[0].token_ids)
