"""The dataset job fanned out over a real 2-actor Ray pool on CPU, losing one actor on the way."""

from __future__ import annotations

import pytest

from tests.conftest import ENGINE_KW
from tests.jobs.test_rollouts import assert_same_records
from vsteer.jobs import RolloutJob, ray_executor, run_job
from vsteer.jobs.io import read_jsonl

pytestmark = pytest.mark.ray


def test_two_actors_give_the_single_process_rows_even_after_losing_one(reference, dataset, model_path, eager_llm, tmp_path, monkeypatch):
    import ray

    out, _ = reference
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("VSTEER_FAULT_CRASH_CHUNK", f"2:{marker}")  # the actor taking chunk 2 dies once
    engine = {k: v for k, v in ENGINE_KW.items() if k != "enable_prefix_caching"}
    engine.update(enforce_eager=True, store=str(eager_llm.store.root))
    job = RolloutJob(dataset, tmp_path / "ray.jsonl", model=model_path, seed=7, chunk_rows=2, engine=engine)
    executor = ray_executor(job, workers=2, cpus_per_worker=1)
    try:
        summary = run_job(job, executor, progress=False)
    finally:
        ray.shutdown()
    assert marker.exists(), "the fault was not injected, so nothing was retried"
    assert executor.retries >= 1
    assert summary["chunks"] == 6
    assert_same_records(list(read_jsonl(job.output)), list(read_jsonl(out)))
    assert list(read_jsonl(job.errors)) == list(read_jsonl(out.with_name("out.errors.jsonl")))
