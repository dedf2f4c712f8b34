"""The adapter of vLLM's Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, which the CPU V2
runner subclasses; the only runner from vLLM 0.34 on): its hook points, turned into the calls of
:class:`vsteer.engine.runner.SteeringRunnerMixin`.

V2 has no cached request states and no persistent batch: ``add_requests`` sees each new request's
``NewRequestData``, ``finish_requests`` the finished and preempted ids, and ``prepare_inputs``
returns the step's ``InputBatch`` (rows ordered decodes first), from which the token map is built.
A preempted request comes back through ``add_requests`` as new; its steering state, effect rows and
captures were kept, so it is not registered again. Dummy runs (warm-up, graph capture) skip
``prepare_inputs`` and happen before any request.
"""

from __future__ import annotations

from typing import Any

import torch

from vsteer.engine.runner import SteeringRunnerMixin
from vsteer.engine.token_map import step_runs


class V2RunnerAdapter(SteeringRunnerMixin):
    """Steering in a Model Runner V2. Mixed in ahead of the runner class."""

    vsteer_runner = "v2"

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        self._vsteer_live: set[str] = set()  # requests registered and not finished

    def finish_requests(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:  # not the preempted ones: they come back
            self._vsteer_forget(req_id)
            self._vsteer_live.discard(req_id)
        super().finish_requests(scheduler_output)

    def add_requests(self, scheduler_output: Any) -> None:
        super().add_requests(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id not in self._vsteer_live:
                self._vsteer_live.add(new.req_id)
                self._vsteer_register(new.req_id, new.prompt_len, new.sampling_params)

    def update_requests(self, scheduler_output: Any) -> None:
        ids = scheduler_output.new_block_ids_to_zero
        if ids and self.kv_block_zeroer is None:
            # vLLM builds its zeroing kernel only for models whose KV it zeroes itself; the
            # scheduler also zeroes the blocks of requests that went non-finite
            if self.device.type == "cuda":
                self._init_kv_zero_meta()
            else:
                _zero_blocks(self, ids)
                scheduler_output.new_block_ids_to_zero = None
        super().update_requests(scheduler_output)

    def prepare_inputs(self, *args: Any, **kwargs: Any) -> Any:
        batch = super().prepare_inputs(*args, **kwargs)
        self._vsteer_fill_index(step_runs(batch.req_ids, batch.num_scheduled_tokens, batch.num_computed_tokens_np))
        return batch

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)
        state = getattr(self, "execute_model_state", None)  # the forward ran; sample_tokens comes next
        if state is not None:
            self._vsteer_after_forward(state.hidden_states, None, [])  # V2 computes logits when sampling
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        out = super().sample_tokens(*args, **kwargs)
        self._vsteer_label_output(getattr(out, "model_runner_output", out))  # the async output wraps it
        return out


def _zero_blocks(runner: Any, block_ids: list[int]) -> None:
    """Zero KV blocks with torch on a CPU (each layer's cache is [num_blocks, ...])."""
    seen: set[int] = set()
    index = torch.tensor(block_ids, dtype=torch.long)
    for ctx in runner.compilation_config.static_forward_context.values():
        kv = getattr(ctx, "kv_cache", None)
        if isinstance(kv, torch.Tensor) and kv.data_ptr() not in seen:
            seen.add(kv.data_ptr())
            kv.index_fill_(0, index, 0)
