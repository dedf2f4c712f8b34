"""vsteer inside vLLM equals an HF transformers model steered with forward hooks (float32)."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import greedy, hidden_states

PROMPTS = ["I think that", "My favourite thing about the city is", "Tell me about your day."]
MAX_TOKENS = 12
LOGPROB_TOL = 2e-3  # float32 vLLM vs float32 HF: kernels and summation order differ

CASES = {
    "add-all": [dict(op="add", v="love", layers=[10], scale=8.0, positions="all")],
    "add-prompt": [dict(op="add", v="wedding", layers=[6], scale=-20.0, positions="prompt")],
    "add-generated": [dict(op="add", v="love", layers=[20], scale=10.0, positions="generated")],
    "add-range": [dict(op="add", v="wedding", layers=[3], scale=12.0, positions=(1, 4))],
    "add-normalize": [dict(op="add", v="love", layers=[12], scale=6.0, positions="all", normalize=True)],
    "ablate": [dict(op="ablate", v="love", layers=[8, 9, 10], positions="all")],
    "compose": [
        dict(op="add", v="love", layers=[10, 14], scale=5.0, positions="all"),
        dict(op="ablate", v="wedding", layers=[10], positions="all"),
        dict(op="add", v="wedding", layers=[10], scale=4.0, positions="prompt"),
    ],
}


def _spec(case, directions):
    items = []
    for it in case:
        d = {k: v for k, v in it.items() if k != "v"}
        d["vector"] = directions[it["v"]].sha256
        if isinstance(d.get("positions"), tuple):
            d["positions"] = list(d["positions"])
        items.append(d)
    return {"interventions": items}


def _hf_items(case, directions):
    return [dict(it, direction=dict(directions[it["v"]].layers)) for it in case]


@pytest.fixture(scope="module")
def vsteer_outputs(eager_llm, directions):
    for v in directions.values():
        eager_llm.store.put(v)
    names = list(CASES)
    prompts = [p for _ in names for p in PROMPTS]
    specs = [_spec(CASES[n], directions) for n in names for _ in PROMPTS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    outs = eager_llm.generate(prompts, params, steering=specs)  # one mixed batch
    return {(n, p): outs[i * len(PROMPTS) + j] for i, n in enumerate(names) for j, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_and_logprobs_match_hf_hooks(case, vsteer_outputs, hf_model, tokenizer, directions):
    for prompt in PROMPTS:
        out = vsteer_outputs[(case, prompt)]
        ids = list(out.prompt_token_ids)
        ref_tokens, ref_lp = greedy(hf_model, ids, MAX_TOKENS, _hf_items(CASES[case], directions))
        got = list(out.outputs[0].token_ids)
        assert got == ref_tokens, f"{case} / {prompt!r}: {tokenizer.decode(got)!r} != {tokenizer.decode(ref_tokens)!r}"
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(got_lp, ref_lp)) < LOGPROB_TOL


def test_steering_changes_the_output(vsteer_outputs, eager_llm):
    plain = eager_llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    changed = [
        case for case in CASES
        if any(vsteer_outputs[(case, p)].outputs[0].token_ids != plain[j].outputs[0].token_ids for j, p in enumerate(PROMPTS))
    ]
    assert set(changed) == set(CASES), f"these cases did not change any output: {set(CASES) - set(changed)}"


def test_capture_equals_hf_hidden_states(eager_llm, hf_model, tokenizer):
    layers = [0, 10, 29]
    caps = eager_llm.capture(PROMPTS, layers)
    for prompt, cap in zip(PROMPTS, caps):
        ids = tokenizer(prompt)["input_ids"]
        ref = hidden_states(hf_model, ids)
        for layer in layers:
            assert cap[layer].shape == (len(ids), 576)
            if layer == 29:
                continue  # HF's last hidden state has the final norm applied
            torch.testing.assert_close(cap[layer], ref[layer + 1][0], atol=2e-3, rtol=1e-3)
