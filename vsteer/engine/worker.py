"""vLLM worker classes that run steered models; select one with ``worker_cls``.

Both swap their model runner's class for its steered subclass before the model is loaded, so the
decoder layers are wrapped before torch.compile traces them and before CUDA graphs are captured.
Whichever model runner vLLM picked (V1, or Model Runner V2: vLLM's default on GPUs, and on CPUs
when ``VLLM_USE_V2_MODEL_RUNNER=1`` and Triton has a CPU backend) gets its adapter
(:func:`vsteer.engine.runner.steered_runner_class`).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vsteer._errors import EngineError
from vsteer.engine.compile_key import pin_vector_width
from vsteer.engine.runner import steered_runner_class

logger = logging.getLogger("vsteer.engine")


class _SteeredWorkerMixin:
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        runner = self.model_runner
        if self.vllm_config.parallel_config.enable_dbo:
            raise EngineError("vsteer does not support dual-batch overlap (enable_dbo); turn it off")
        base = type(runner)
        runner.__class__ = steered_runner_class(base)
        logger.info("vsteer: steering vLLM's %s.%s (Model Runner %s); scheduling: %s", base.__module__, base.__name__,
                    runner.vsteer_runner.upper(),
                    "async" if self.vllm_config.scheduler_config.async_scheduling else "synchronous")
        super().load_model(*args, **kwargs)

    def vsteer_stats(self) -> dict:
        """Steering slot statistics of this worker (call through ``collective_rpc``)."""
        return self.model_runner.vsteer_stats()

    def vsteer_take_effects(self, keys: list[str]) -> dict:
        """Finished feature-effect sums by key (call through ``collective_rpc``)."""
        return self.model_runner.vsteer_take_effects(keys)


class SteeredCPUWorker(_SteeredWorkerMixin, CPUWorker):
    """CPU worker with per-request steering."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        # before the model is built and traced: vLLM hashes the config into its cache paths then
        pin_vector_width(self.vllm_config.compilation_config)
        super().load_model(*args, **kwargs)


class SteeredGPUWorker(_SteeredWorkerMixin, Worker):
    """CUDA worker with per-request steering."""
