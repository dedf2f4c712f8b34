"""Steering metrics on vLLM's Prometheus endpoint (``/metrics``), kept by the API process.

- ``vsteer_requests_total{op}``: requests by steering op (``none`` for unsteered requests).
- ``vsteer_requests_rejected_total{code}``: requests vsteer answered itself with a 4xx.
- ``vsteer_configs_in_flight``: distinct steering configs of running or queued requests.
- ``vsteer_max_slots``: the engine's steering slots.
- ``vsteer_configs_beyond_slots``: ``max(0, configs_in_flight - max_slots)``, a lower bound on the
  configs whose requests wait for a slot in the engine's scheduler (a config needs one slot per
  distinct set of active interventions, usually one).

From the engine's workers, polled every ``POLL_S`` seconds through ``collective_rpc``:

- ``vsteer_slots_in_use``: slots used by the tokens of the engine's last step.
- ``vsteer_slots_resident``: slots holding a folded config (in use, or cached for reuse).
- ``vsteer_slot_loads``: bank rows written so far (a config taking a slot it was not cached in).
- ``vsteer_capture_bytes``: bytes of the workers' activation-capture buffers (0 unless
  ``--capture-layers`` asks for some).
- ``vsteer_runner_info{runner}``: 1 for the vLLM model runner steering runs on (``v1`` or ``v2``).

In a Ray Serve replica (``$VSTEER_METRICS=ray``, set by :mod:`vsteer.server.ray_app`) the same
metrics go through Ray's metrics pipeline instead (``ray.serve.metrics``), tagged with the
deployment, the application and the replica, and are scraped from each Ray node's metrics export
port (Prometheus names ``ray_vsteer_...``): through the Serve endpoint, ``/metrics`` would answer
for whichever replica took the request.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from functools import cache
from typing import Iterator


#: ``ray``: report through Ray Serve's metrics (one series per replica); else prometheus_client.
METRICS_ENV = "VSTEER_METRICS"


class _RayMetric:
    """A ``ray.serve.metrics`` Counter or Gauge with prometheus_client's ``labels().inc()/set()``."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...] = (), tags: dict | None = None):
        from ray.serve import metrics

        self._metric = (metrics.Counter if kind == "counter" else metrics.Gauge)(name, description=doc, tag_keys=labels)
        self._kind, self._name, self._doc, self._labels, self._tags = kind, name, doc, labels, tags or {}

    def labels(self, **tags: str) -> "_RayMetric":
        bound = _RayMetric.__new__(_RayMetric)
        bound.__dict__.update(self.__dict__)
        bound._tags = tags
        return bound

    def inc(self, value: float = 1.0) -> None:
        self._metric.inc(value, tags=self._tags or None)

    def set(self, value: float) -> None:
        self._metric.set(value, tags=self._tags or None)


@cache
def _metrics():
    import os

    if os.environ.get(METRICS_ENV) == "ray":
        def PCounter(name, doc, labels=()):  # noqa: N802 - stands in for the class
            return _RayMetric("counter", name + "_total", doc, tuple(labels))

        def Gauge(name, doc, labels=()):  # noqa: N802
            return _RayMetric("gauge", name, doc, tuple(labels))
    else:
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge

    return {
        "requests": PCounter("vsteer_requests", "Completion requests by steering op.", ["op"]),
        "rejected": PCounter("vsteer_requests_rejected", "Requests vsteer refused with a 4xx.", ["code"]),
        "configs": Gauge("vsteer_configs_in_flight", "Distinct steering configs of running or queued requests."),
        "max_slots": Gauge("vsteer_max_slots", "Steering slots of the engine."),
        "beyond": Gauge("vsteer_configs_beyond_slots", "Configs in flight beyond the slot count (they wait)."),
        "in_use": Gauge("vsteer_slots_in_use", "Steering slots used by the engine's last step."),
        "resident": Gauge("vsteer_slots_resident", "Steering slots holding a folded config."),
        "loads": Gauge("vsteer_slot_loads", "Bank rows written since the engine started."),
        "capture": Gauge("vsteer_capture_bytes", "Bytes of the engine's activation-capture buffers."),
        "runner": Gauge("vsteer_runner_info", "1 for the vLLM model runner steering runs on.", ["runner"]),
    }


POLL_S = 2.0


class SteeringMetrics:
    def __init__(self, max_slots: int | None) -> None:
        """``max_slots``: the engine's slots, or None until the first poll reads the resolved value."""
        self._m = _metrics()
        self._max_slots = max_slots or 0
        self._m["max_slots"].set(self._max_slots)
        self._configs: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start_polling(self, engine_client) -> None:
        """Poll the workers' slot statistics in the background (once per process)."""
        import asyncio

        if getattr(self, "_poller", None) is None and engine_client is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(engine_client))

    async def _poll(self, engine_client) -> None:
        import asyncio

        while True:
            try:
                stats = (await engine_client.collective_rpc("vsteer_stats"))[0]
                self._max_slots = stats["max_slots"]
                self._m["max_slots"].set(self._max_slots)
                self._m["in_use"].set(stats["in_use"])
                self._m["resident"].set(stats["resident"])
                self._m["loads"].set(stats["loads"])
                self._m["capture"].set(stats.get("capture_bytes", 0))
                self._m["runner"].labels(runner=stats["runner"]).set(1)
            except Exception:  # noqa: BLE001 - the engine may be starting or stopping; try again
                pass
            await asyncio.sleep(POLL_S)

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
        if self._max_slots:  # unknown until the first poll: no guess
            self._m["beyond"].set(max(0, n - self._max_slots))
