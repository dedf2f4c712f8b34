"""A vLLM scheduler that holds requests back until their steering slots can be had.

Mirrors how vLLM enforces ``max_loras``: a waiting request is admitted only if the distinct slot
keys of the running requests plus its own fit in ``max_slots``. Running requests keep their keys,
so every step's batch needs at most ``max_slots`` rows and the worker never has to evict a row in
use. Requests that do not fit wait (FCFS order kept); nothing crashes.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vsteer.engine.config import SteeringEngineConfig
from vsteer.engine.plan import EXTRA_ARGS_KEY, SteeringPlan


def request_slot_keys(request: Any) -> frozenset[str]:
    """Slot keys a vLLM request needs (empty for unsteered requests)."""
    keys = getattr(request, "_vsteer_keys", None)
    if keys is None:
        params = request.sampling_params
        data = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
        keys = frozenset() if data is None else SteeringPlan.from_extra_args(data).slot_keys(request.num_prompt_tokens)
        request._vsteer_keys = keys
    return keys


class SteeringScheduler(Scheduler):
    """Scheduler with steering-slot admission control (async variant chosen automatically)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is SteeringScheduler and config is not None and config.scheduler_config.async_scheduling:
            cls = SteeringAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._vsteer_capacity = SteeringEngineConfig.from_vllm(self.vllm_config.additional_config).max_slots
        self._vsteer_held_back = 0  # requests held back in the last step, for metrics

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_running_keys: set[str] = set()
        self._vsteer_seen = 0
        self._vsteer_held_back = 0
        return super().schedule(*args, **kwargs)

    def _handle_blocked_waiting_request(self, request: Any) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        keys = request_slot_keys(request)
        if not keys:
            return True
        # self.running only grows during the waiting scan; fold in what was appended since.
        for req in self.running[self._vsteer_seen :]:
            self._vsteer_running_keys |= request_slot_keys(req)
        self._vsteer_seen = len(self.running)
        if len(self._vsteer_running_keys | keys) <= self._vsteer_capacity:
            return True
        self._vsteer_held_back += 1
        return False


class SteeringAsyncScheduler(SteeringScheduler, AsyncScheduler):
    """The async-scheduling variant (vLLM enables async scheduling on GPU by default)."""
