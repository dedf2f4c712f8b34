"""A tiny LoRA adapter made with peft, and the HF + peft + hooks reference that steered and
adapter requests are held to (tests/engine/test_vllm_features.py on V1, test_runner_v2.py on V2)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from tests._reference.agreement import LOGPROB_TOL  # float32 vLLM vs float32 HF
from tests._reference.hf_steering import greedy

#: (name, with the adapter, steered): the four requests of one batch
LORA_CASES = [("steered+lora", True, True), ("lora", True, False), ("steered", False, True), ("plain", False, False)]


def build_adapter(model_path: str, folder: Path) -> Path:
    """A random rank-4 adapter on every projection of layers 5-15, saved by peft into ``folder``."""
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
    model.save_pretrained(folder)
    return folder


def check_lora_cases(got: Sequence[tuple[list[int], list[float]]], prompt_ids: list[int], peft_model, hf_model,
                     interventions: list[dict], max_tokens: int) -> None:
    """``got``: (tokens, logprobs) of the LORA_CASES requests, greedy; each must equal HF (with the
    peft adapter where the case has it) steered by hooks with ``interventions`` where it is steered,
    and the four must differ (the adapter and the steering both change the output)."""
    inner = peft_model.base_model.model  # the Llama model, its projections wrapped by peft in place
    results = {}
    for (tokens, logprobs), (name, with_lora, steered) in zip(got, LORA_CASES, strict=True):
        want, want_lp = greedy(inner if with_lora else hf_model, prompt_ids, max_tokens,
                               interventions if steered else [])
        assert tokens == want, name
        assert max(abs(a - b) for a, b in zip(logprobs, want_lp)) < LOGPROB_TOL, name
        results[name] = tuple(tokens)
    assert len(set(results.values())) == 4, f"adapter or steering changed nothing: {results}"
