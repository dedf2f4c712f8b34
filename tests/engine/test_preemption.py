"""Requests preempted for lack of KV cache keep their own steering when they resume."""

from __future__ import annotations

from vllm import SamplingParams

PARAMS = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
PROMPTS = ["I think that", "The weather today is", "My best friend", "Once upon a time"] * 2
_KEEP = []  # an engine that is garbage-collected tears down vLLM's process-wide parallel state


def test_preempted_requests_keep_their_steering(model_path, store_dir, directions, eager_llm):
    from vsteer.engine.llm import LLM

    # ~170 tokens of float32 KV cache in 32-token blocks for 8 requests that grow to ~500:
    # running requests run out of blocks mid-generation and vLLM must preempt some.
    tight = LLM(model_path, enforce_eager=True, store=store_dir, dtype="float32", max_model_len=128, block_size=32,
                max_num_seqs=8, max_slots=8, kv_cache_memory_bytes=8 * 2**20, enable_prefix_caching=False,
                disable_log_stats=False)
    _KEEP.append(tight)
    love = directions["love"].sha256
    specs = [{"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": s}]} if s else None
             for s in (8.0, -8.0, 0, 12.0, 4.0, 0, -4.0, 16.0)]
    got = tight.generate(PROMPTS, PARAMS, steering=specs)
    want = eager_llm.generate(PROMPTS, PARAMS, steering=specs)  # a roomy engine: no preemption
    for i, (g, w) in enumerate(zip(got, want)):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids), f"request {i}"
    preemptions = [m.value for m in tight.engine.get_metrics() if m.name == "vllm:num_preemptions"]
    assert preemptions and preemptions[0] > 0, "the KV cache was large enough: nothing was preempted"
