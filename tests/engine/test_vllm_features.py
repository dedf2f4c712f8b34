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

from tests._reference.agreement import LOGPROB_TOL  # float32 vLLM vs float32 HF
from tests._reference.hf_steering import greedy

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
def adapter_dir(tmp_path_factory, model_path):
    """A tiny random LoRA adapter (rank 4 on every projection of layers 5-15), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, layers_to_transform=list(range(5, 16)),
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # small enough to keep text fluent, large enough to change it
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp("lora-adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_llm(model_path, store_dir):
    from vsteer.engine.llm import LLM

    llm = LLM(model_path, enforce_eager=True, store=store_dir, dtype="float32", max_model_len=256, max_num_seqs=8,
              enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes=64 * 2**20)
    _KEEP.append(llm)
    return llm


@pytest.fixture(scope="module")
def peft_model(model_path, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_steered_and_lora_requests_in_one_batch_equal_hf_peft_hooks(lora_llm, peft_model, hf_model, adapter_dir, directions):
    from vllm.lora.request import LoRARequest

    for v in directions.values():
        lora_llm.store.put(v)
    lora = LoRARequest("tiny", 1, str(adapter_dir))
    cases = [("steered+lora", True, True), ("lora", True, False), ("steered", False, True), ("plain", False, False)]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0)
    outs = lora_llm.generate([PROMPT] * 4, params, steering=[_love(directions) if s else None for _, _, s in cases],
                             lora_request=[lora if a else None for _, a, _ in cases])
    ids = list(outs[0].prompt_token_ids)
    inner = peft_model.base_model.model  # the Llama model, its projections wrapped by peft in place
    results = {}
    for out, (name, with_lora, steered) in zip(outs, cases):
        interventions = _hf_love(directions) if steered else []
        want, want_lp = greedy(inner if with_lora else hf_model, ids, 10, interventions)
        got = _tokens(out)
        assert got == want, f"{name}: {out.outputs[0].text!r}"
        got_lp = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < LOGPROB_TOL, name
        results[name] = got
    assert len({tuple(t) for t in results.values()}) == 4, f"adapter or steering changed nothing: {results}"

