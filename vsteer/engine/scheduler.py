"""A vLLM scheduler that holds requests back until their steering slots can be had.

Mirrors how vLLM enforces ``max_loras``: a waiting request is admitted only if the distinct slot
keys of the running requests plus its own fit in ``max_slots``. Running requests keep their keys,
so every step's batch needs at most ``max_slots`` rows and the worker never has to evict a row in
use. Requests that do not fit wait (FCFS order kept); nothing crashes. The same holds for the SAS
feature budget: the supports of the running sas configs at one SAE layer add up to at most
``max_sas_support``, so the step's feature union always fits the engine's buffer.
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
        if data is None:
            keys, loads, widths = frozenset(), {}, {}
        else:
            plan = SteeringPlan.from_extra_args(data)
            keys = plan.slot_keys(request.num_prompt_tokens)
            loads = {k: v for k, v in plan.sas_loads(request.num_prompt_tokens).items() if v}
            widths = plan.sas_widths()
        request._vsteer_keys = keys
        request._vsteer_sas_loads = loads
        request._vsteer_sas_widths = widths
    return keys


def request_sas_loads(request: Any) -> dict[str, dict[int, int]]:
    """Per slot key of the request, the SAS support it brings to each SAE layer (often empty)."""
    request_slot_keys(request)
    return request._vsteer_sas_loads


class SteeringScheduler(Scheduler):
    """Scheduler with steering-slot admission control (async variant chosen automatically)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is SteeringScheduler and config is not None and config.scheduler_config.async_scheduling:
            cls = SteeringAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = SteeringEngineConfig.from_vllm(self.vllm_config.additional_config)
        self._vsteer_capacity = cfg.max_slots
        self._vsteer_sas_capacity = cfg.max_sas_support
        self._vsteer_held_back = 0  # requests held back in the last step, for metrics

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_running_keys: set[str] = set()
        self._vsteer_running_loads: dict[str, dict[int, int]] = {}
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
            self._vsteer_running_loads.update(request_sas_loads(req))
        self._vsteer_seen = len(self.running)
        if len(self._vsteer_running_keys | keys) <= self._vsteer_capacity and self._sas_fits(request):
            return True
        self._vsteer_held_back += 1
        return False

    def _sas_fits(self, request: Any) -> bool:
        """Whether the supports of the running sas configs plus the new ones stay within the
        budget at every SAE layer (a sum: conservative where supports overlap). A budget of
        d_sae or more never binds: the union cannot exceed d_sae."""
        new = {k: v for k, v in request_sas_loads(request).items() if k not in self._vsteer_running_loads}
        if not new:
            return True
        widths = request._vsteer_sas_widths
        totals: dict[int, int] = {}
        for load in (*self._vsteer_running_loads.values(), *new.values()):
            for layer, n in load.items():
                totals[layer] = totals.get(layer, 0) + n
        return all(
            totals.get(layer, 0) <= self._vsteer_sas_capacity or self._vsteer_sas_capacity >= width
            for layer, width in widths.items()
        )


class SteeringAsyncScheduler(SteeringScheduler, AsyncScheduler):
    """The async-scheduling variant (vLLM enables async scheduling on GPU by default)."""
