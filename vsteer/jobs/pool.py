"""A Ray actor pool of vsteer engines: one engine per actor (one per GPU, or N CPU actors).

Work items go to whichever actor is free; each actor runs ``fn(llm, *args)`` where ``fn`` is named
by import path (so any job, rollouts or feature effects, can use the same pool). When an actor
dies (node lost, OOM, crash) its item is retried on a fresh actor, up to ``max_retries`` times;
an exception raised by ``fn`` itself is a bug or bad input and is re-raised at once.
"""

from __future__ import annotations

import importlib
import os
from collections import deque
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator

#: Environment forwarded to the actors (vLLM on CPU reads these at engine start).
FORWARDED_ENV = (
    "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE",
    "VLLM_NO_USAGE_STATS", "VLLM_DO_NOT_TRACK", "VSTEER_CACHE", "VSTEER_VECTOR_STORE", "VSTEER_SAE_STORE",
    "VSTEER_FAULT_CRASH_CHUNK", "VLLM_USE_V2_MODEL_RUNNER",
)


def maybe_crash(index: int) -> None:
    """Fault injection for tests of actor loss: ``VSTEER_FAULT_CRASH_CHUNK="<chunk>:<marker file>"``
    makes the first actor that takes that chunk exit abruptly (the marker file makes it once)."""
    spec = os.environ.get("VSTEER_FAULT_CRASH_CHUNK")
    if not spec:
        return
    chunk, _, marker = spec.partition(":")
    if int(chunk) == index and marker and not os.path.exists(marker):
        Path(marker).write_text("crashed\n")
        os._exit(17)


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _EngineActor:
    def __init__(self, llm_kwargs: dict) -> None:
        import tempfile

        os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vsteer-actor-"))
        from vsteer.engine.llm import LLM

        self.llm = LLM(**llm_kwargs)

    def run(self, fn_path: str, *args: Any) -> Any:
        return _resolve(fn_path)(self.llm, *args)

    def ping(self) -> bool:
        return True


class EnginePool:
    """``workers`` actors, each holding a ``vsteer.LLM(**llm_kwargs)``.

    Example:
        >>> pool = EnginePool(2, {"model": "smollm2", "enforce_eager": True}, cpus_per_worker=1)
        >>> for key, result in pool.map("mymodule.work", [(0, (arg,)), (1, (arg,))]): ...
    """

    def __init__(self, workers: int, llm_kwargs: dict, *, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 max_retries: int = 2, address: str | None = None) -> None:
        import ray

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kw["address"] = address
            else:
                kw["num_cpus"] = max(int(workers * cpus_per_worker), 1)
            ray.init(**kw)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self._ray = ray
        self._cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0,
                               runtime_env={"env_vars": env})(_EngineActor)
        self._llm_kwargs = llm_kwargs
        self.max_retries = max_retries
        self.retries = 0  # items retried after an actor died, for reports and tests
        self._actors = [self._cls.remote(llm_kwargs) for _ in range(workers)]

    def map(self, fn_path: str, items: Iterable[tuple[Hashable, tuple]]) -> Iterator[tuple[Hashable, Any]]:
        """Run ``fn(llm, *args)`` for every ``(key, args)``; yields ``(key, result)`` as they finish."""
        ray = self._ray
        todo = iter(items)
        retry: deque[tuple[Hashable, tuple, int]] = deque()
        idle = list(self._actors)
        running: dict[Any, tuple[Any, Hashable, tuple, int]] = {}

        def submit(actor) -> bool:
            if retry:
                key, args, attempt = retry.popleft()
            else:
                nxt = next(todo, None)
                if nxt is None:
                    return False
                (key, args), attempt = nxt, 0
            running[actor.run.remote(fn_path, *args)] = (actor, key, args, attempt)
            return True

        while idle and submit(idle[-1]):
            idle.pop()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            actor, key, args, attempt = running.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                if attempt >= self.max_retries:
                    raise RuntimeError(f"item {key!r} failed on {attempt + 1} actors; last: {exc}") from exc
                self.retries += 1
                retry.append((key, args, attempt + 1))
                self._actors.remove(actor)
                actor = self._cls.remote(self._llm_kwargs)  # replace the lost actor
                self._actors.append(actor)
            else:
                yield key, result
            if not submit(actor):
                idle.append(actor)

    def wait_ready(self) -> None:
        """Block until every actor has built its engine."""
        self._ray.get([actor.ping.remote() for actor in self._actors])

    def shutdown(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
