"""Steering together with vLLM features a request can turn on: parallel sampling (``n > 1``),
structured outputs (JSON schema) and LoRA adapters. Each steered result equals what the request
alone would get: the same request with ``n = 1`` and the child's seed, an HF model steered by
hooks and constrained by the same grammar (xgrammar), and an HF + peft model steered by hooks.
"""

from __future__ import annotations

import json

import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import greedy
from tests._reference.lora import LORA_CASES, check_lora_cases

PROMPT = "Tell me about your day."
_KEEP = []  # an engine that is garbage-collected tears down vLLM's process-wide parallel state


def _love(directions, scale: float = 8.0, positions="all") -> dict:
    return {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [10],
                               "scale": scale, "positions": positions}]}


def _hf_love(directions, scale: float = 8.0, positions="all") -> list[dict]:
    return [dict(op="add", direction=dict(directions["love"].layers), layers=[10], scale=scale, positions=positions)]


def _tokens(out, i: int = 0) -> list[int]:
    return list(out.outputs[i].token_ids)


# --- n > 1 --------------------------------------------------------------------------------------
def test_every_parallel_sample_is_steered_like_a_single_request(eager_llm, directions):
    """vLLM runs each of the n choices as its own request (child i gets seed + i); each carries
    the parent's steering and equals the single request with that seed."""
    spec = _love(directions, positions="generated")
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12)
    parent = eager_llm.generate([PROMPT], params, steering=spec)[0]
    assert len(parent.outputs) == 3
    plain = eager_llm.generate([PROMPT], params)[0]
    for i in range(3):
        alone = eager_llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=1234 + i, max_tokens=12), steering=spec)[0]
        assert _tokens(parent, i) == _tokens(alone), f"choice {i} differs from the single request with seed {1234 + i}"
    assert any(_tokens(parent, i) != _tokens(plain, i) for i in range(3)), "steering changed no choice"



# --- structured outputs -------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "angry", "calm"]},
                                           "reason": {"type": "string", "maxLength": 40}},
          "required": ["mood", "reason"], "additionalProperties": False}
JSON_PROMPT = "Answer in JSON with your mood and a short reason. How do you feel about your neighbour?"


class _SchemaGrammar:
    """The schema as xgrammar (vLLM's default structured-output backend) compiles it with vLLM's
    defaults, as a constraint for the reference greedy decoder."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA)))
        self.bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def mask(self, logits: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.float()[None]
        self._apply(masked, self.bitmask)
        logits[torch.isinf(masked[0])] = float("-inf")

    def accept(self, token: int) -> bool:
        assert self.matcher.accept_token(token)
        return self.matcher.is_terminated()


def test_structured_output_is_steered_like_hf_with_the_same_grammar(eager_llm, hf_model, tokenizer, directions):
    from vllm.sampling_params import StructuredOutputsParams

    structured = SamplingParams(temperature=0.0, max_tokens=40,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
    free = SamplingParams(temperature=0.0, max_tokens=12)
    specs = [_love(directions, 12.0), None, _love(directions, -12.0), _love(directions, 12.0)]
    # one batch: steered and unsteered structured requests next to a steered free-text one
    outs = eager_llm.generate([JSON_PROMPT] * 4, [structured, structured, structured, free], steering=specs)
    ids = list(outs[0].prompt_token_ids)
    for out, scale in zip(outs[:3], (12.0, 0.0, -12.0)):
        want, _ = greedy(hf_model, ids, 40, _hf_love(directions, scale) if scale else [],
                         _SchemaGrammar(tokenizer, hf_model.config.vocab_size))
        assert _tokens(out) == want, f"scale {scale}: {out.outputs[0].text!r} != {tokenizer.decode(want)!r}"
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        answer = json.loads(out.outputs[0].text)
        assert answer["mood"] in SCHEMA["properties"]["mood"]["enum"]
    assert len({outs[i].outputs[0].text for i in range(3)}) > 1, "steering changed no structured answer"
    assert not outs[3].outputs[0].text.lstrip().startswith("{"), "the grammar leaked into a free-text request"


# --- LoRA -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_llm(model_path, store_dir):
    from vsteer.engine.llm import LLM

    llm = LLM(model_path, enforce_eager=True, store=store_dir, dtype="float32", max_model_len=256, max_num_seqs=8,
              enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes=64 * 2**20)
    _KEEP.append(llm)
    return llm


def test_steered_and_lora_requests_in_one_batch_equal_hf_peft_hooks(lora_llm, peft_model, hf_model, adapter_dir, directions):
    from vllm.lora.request import LoRARequest

    for v in directions.values():
        lora_llm.store.put(v)
    lora = LoRARequest("tiny", 1, str(adapter_dir))
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0)
    outs = lora_llm.generate([PROMPT] * 4, params, steering=[_love(directions) if s else None for _, _, s in LORA_CASES],
                             lora_request=[lora if a else None for _, a, _ in LORA_CASES])
    got = [(_tokens(o), [step[t].logprob for step, t in zip(o.outputs[0].logprobs, _tokens(o))]) for o in outs]
    check_lora_cases(got, list(outs[0].prompt_token_ids), peft_model, hf_model, _hf_love(directions), 10)

