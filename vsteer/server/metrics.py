"""Steering metrics on vLLM's Prometheus endpoint (``/metrics``), kept by the API process.

- ``vsteer_requests_total{op}``: requests by steering op (``none`` for unsteered requests).
- ``vsteer_requests_rejected_total{code}``: requests vsteer answered itself with a 4xx.
- ``vsteer_configs_in_flight``: distinct steering configs of running or queued requests.
- ``vsteer_max_slots``: the engine's steering slots.
- ``vsteer_configs_beyond_slots``: ``max(0, configs_in_flight - max_slots)``, a lower bound on the
  configs whose requests wait for a slot in the engine's scheduler (a config needs one slot per
  distinct set of active interventions, usually one).
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from functools import cache
from typing import Iterator


@cache
def _metrics():
    from prometheus_client import Counter as PCounter
    from prometheus_client import Gauge

    return {
        "requests": PCounter("vsteer_requests", "Completion requests by steering op.", ["op"]),
        "rejected": PCounter("vsteer_requests_rejected", "Requests vsteer refused with a 4xx.", ["code"]),
        "configs": Gauge("vsteer_configs_in_flight", "Distinct steering configs of running or queued requests."),
        "max_slots": Gauge("vsteer_max_slots", "Steering slots of the engine."),
        "beyond": Gauge("vsteer_configs_beyond_slots", "Configs in flight beyond the slot count (they wait)."),
    }


class SteeringMetrics:
    def __init__(self, max_slots: int) -> None:
        self._m = _metrics()
        self._m["max_slots"].set(max_slots)
        self._max_slots = max_slots
        self._configs: Counter[str] = Counter()
        self._lock = threading.Lock()

    def rejected(self, code: int) -> None:
        self._m["rejected"].labels(code=str(code)).inc()

    @contextmanager
    def request(self, ops: list[str], config: str | None) -> Iterator[None]:
        for op in ops or ["none"]:
            self._m["requests"].labels(op=op).inc()
        self._update(config, +1)
        try:
            yield
        finally:
            self._update(config, -1)

    def _update(self, config: str | None, delta: int) -> None:
        if config is None:
            return
        with self._lock:
            self._configs[config] += delta
            if self._configs[config] <= 0:
                del self._configs[config]
            n = len(self._configs)
        self._m["configs"].set(n)
        self._m["beyond"].set(max(0, n - self._max_slots))
