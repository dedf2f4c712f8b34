"""Dataset jobs: steered rollout generation, in-process or fanned out over a Ray engine pool."""

from vsteer.jobs.rollouts import (
    RolloutJob,
    generate_chunk,
    local_executor,
    ray_executor,
    run_job,
)

__all__ = ["RolloutJob", "generate_chunk", "local_executor", "ray_executor", "run_job"]
