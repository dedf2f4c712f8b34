"""vLLM features steering is not known to be exact with: refused at start-up, naming the option.

Checked twice: on the engine arguments before anything is built (a clear error in the caller's
process), and on the engine's resolved ``VllmConfig`` when the scheduler starts (what the engine
really runs with, e.g. options that arrive through ``vllm serve`` flags or defaults).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from vsteer._errors import EngineError

__all__ = ["refuse_unsupported", "refuse_unsupported_kwargs", "warn_vllm_defects"]

logger = logging.getLogger("vsteer.engine")


def _refusals(*, speculative: bool, pipeline: int, data: int, sleep: bool, effects: bool,
              prefill_context: int = 1) -> list[str]:
    out = []
    if speculative:
        out.append("speculative decoding (speculative_config): draft tokens are steered before they are "
                   "accepted and the runner's positions count rejected drafts, so steering windows, "
                   "'generated' boundaries and effect sums would not be exact; turn it off")
    if pipeline > 1:
        out.append(f"pipeline parallelism (pipeline_parallel_size={pipeline}): capture, SAS and effect "
                   "buffers live on one stage and this is untested; use tensor parallelism or one stage")
    if data > 1 and effects:
        out.append(f"data parallelism (data_parallel_size={data}) with effect_saes: effect sums are read "
                   "from one engine's workers; run one engine per process instead")
    if prefill_context > 1:
        out.append(f"prefill context parallelism (prefill_context_parallel_size={prefill_context}, Model Runner V2 "
                   "only): each rank runs part of a prompt's tokens, so conditions, SAS unions, captures and "
                   "effect sums would see only that part; turn it off")
    if sleep:
        out.append("sleep mode (enable_sleep_mode): level 2 drops the steering bank and its identity slot; "
                   "turn it off")
    return out


def _raise(reasons: list[str]) -> None:
    if reasons:
        raise EngineError("vsteer refuses " + "; and ".join(reasons))


def refuse_unsupported_kwargs(engine_kwargs: Mapping[str, Any], *, effects: bool) -> None:
    """Refuse ``vllm.LLM`` keyword arguments steering cannot serve exactly."""
    _raise(_refusals(
        speculative=engine_kwargs.get("speculative_config") is not None,
        pipeline=int(engine_kwargs.get("pipeline_parallel_size") or 1),
        data=int(engine_kwargs.get("data_parallel_size") or 1),
        sleep=bool(engine_kwargs.get("enable_sleep_mode")),
        effects=effects,
        prefill_context=int(engine_kwargs.get("prefill_context_parallel_size") or 1),
    ))


def refuse_unsupported(vllm_config: Any, *, effects: bool) -> None:
    """Refuse a resolved ``VllmConfig`` steering cannot serve exactly."""
    parallel = vllm_config.parallel_config
    _raise(_refusals(
        speculative=vllm_config.speculative_config is not None,
        pipeline=parallel.pipeline_parallel_size,
        data=parallel.data_parallel_size,
        sleep=bool(vllm_config.model_config.enable_sleep_mode),
        effects=effects,
        prefill_context=getattr(parallel, "prefill_context_parallel_size", 1),
    ))


def warn_vllm_defects(vllm_config: Any) -> None:
    """Warn about vLLM defects that give wrong answers with or without steering."""
    lora = vllm_config.lora_config
    if lora is not None and vllm_config.device_config.device_type == "cpu":
        # vLLM-CPU's LoRA torch ops index the stacked adapters with the request's slot, -1 for
        # "no adapter", which selects the LAST slot (seen with plain vLLM 0.32, max_loras=1).
        logger.warning(
            "vsteer: vLLM-CPU applies the adapter in its last LoRA slot to requests without an adapter "
            "that share a batch with adapter requests, whenever that slot holds one (always with "
            "max_loras=1, now %d): set max_loras to one more than the adapters you serve", lora.max_loras)
