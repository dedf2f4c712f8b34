"""The effects job on a real 2-actor Ray pool (CPU), losing an actor on the way, equals the
single-process run."""

from __future__ import annotations

import pytest

import torch

from tests.conftest import ENGINE_KW

pytestmark = pytest.mark.ray


def test_two_actors_equal_single_process_even_after_losing_one(eager_llm, sae_store_dir, tmp_path, monkeypatch):
    import ray

    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, run_effects_job

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    marker = tmp_path / "crashed-once"
    engine = {k: v for k, v in ENGINE_KW.items() if k != "enable_prefix_caching"}
    engine.update(enforce_eager=True, store=str(eager_llm.store.root))
    job = EffectsJob(model=str(eager_llm.model_path), sae="test-relu", vectors="random", count=6, scale=6.0,
                     chunk_size=2, prompts=["I think", "The weather"], rollouts=3, baseline="independent", baseline_rollouts=4, tokens=6,
                     seed=2, engine=engine)
    local = run_effects_job(job, tmp_path / "local", llm=eager_llm, progress=False)
    monkeypatch.setenv("VSTEER_FAULT_CRASH_CHUNK", f"1:{marker}")  # the actor taking chunk 1 dies once
    try:
        fanned = run_effects_job(job, tmp_path / "ray", workers=2, cpus_per_worker=1, progress=False)
    finally:
        ray.shutdown()
    assert marker.exists() and fanned["retries"] >= 1
    assert local["complete"] and fanned["complete"] and fanned["done"] == 3
    a, b = load_effects(tmp_path / "local"), load_effects(tmp_path / "ray")
    assert torch.equal(a.X, b.X)
    torch.testing.assert_close(a.Y, b.Y, atol=1e-4, rtol=1e-4)
    assert a.meta["tokens"] == b.meta["tokens"]  # nothing lost, nothing counted twice
