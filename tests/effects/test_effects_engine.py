"""Feature effects on the real engine: fused (summed inside vLLM during generation) equals the
two-pass reference on the same rollouts, K vectors at once equal each alone, scale selection,
and a job that is interrupted and resumed."""

from __future__ import annotations

import pytest
import torch

from vsteer.effects.measure import RolloutConfig, measure_effects, rollout_sums
from vsteer.effects.scales import pick_scales, select_scales

CONFIG = RolloutConfig(prompts=("I think", "The weather"), rollouts=4, baseline_rollouts=6, tokens=8, seed=3)


@pytest.fixture(scope="module")
def sae(eager_llm):
    return eager_llm.saes["test-relu"]


@pytest.fixture(scope="module")
def directions(sae):
    d = sae.W_dec.detach()[[5, 77, 300]].float()
    return d / d.norm(dim=1, keepdim=True)


def test_fused_equals_two_pass_on_the_same_rollouts(eager_llm, sae, directions):
    fused = measure_effects(eager_llm, sae, directions, 8.0, CONFIG, method="fused")
    two = measure_effects(eager_llm, sae, directions, 8.0, CONFIG, method="two_pass")
    assert torch.equal(fused.tokens, two.tokens)  # same positions: rollout text minus position 0
    assert int(fused.tokens[0]) == sum(len(t) - 1 + CONFIG.tokens for t in (eager_llm.get_tokenizer()(p)["input_ids"] for p in ("I think", "The weather")) for _ in range(2))
    # prefill-at-once vs token-by-token residuals differ by float32 rounding only
    torch.testing.assert_close(fused.steered, two.steered, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(fused.baseline, two.baseline, atol=2e-4, rtol=1e-3)
    assert float(fused.effects.abs().max()) > 0.05  # the vectors do something measurable


def test_k_vectors_at_once_equal_each_alone(eager_llm, sae, directions):
    together = measure_effects(eager_llm, sae, directions, torch.tensor([8.0, -6.0, 4.0]), CONFIG)
    for i, scale in enumerate([8.0, -6.0, 4.0]):
        alone, _ = rollout_sums(eager_llm, sae, [{"interventions": [{"op": "add", "vector": directions[i].tolist(), "layers": [sae.layer], "scale": scale}]}], CONFIG, CONFIG.rollouts)
        torch.testing.assert_close(together.steered[i], alone[0] / together.tokens[i], atol=1e-5, rtol=1e-5)


def test_scale_zero_has_zero_effect_with_common_random_numbers(eager_llm, sae, directions):
    config = RolloutConfig(prompts=CONFIG.prompts, rollouts=6, baseline_rollouts=6, tokens=8, seed=3)
    result = measure_effects(eager_llm, sae, directions[:1], 0.0, config)
    assert float(result.effects.abs().max()) < 1e-5


def test_pick_scales_interpolates_to_the_threshold():
    losses = torch.tensor([[2.0, 2.2, 2.8, 4.0], [2.0, 2.0, 2.1, 2.2], [3.0, 3.6, 3.7, 3.8]])
    got = pick_scales(losses, [0, 10, 20, 30], losses[:, 0] + 0.5)
    assert got.tolist() == pytest.approx([10 + 10 * (0.3 / 0.6), 30.0, 10 * (0.5 / 0.6)])


def test_select_scales_on_the_engine(eager_llm, sae, directions):
    chosen = select_scales(eager_llm, directions[:2], sae.layer, candidates=[0, 10, 40, 160], rise=0.5)
    assert chosen.shape == (2,) and bool(((chosen > 0) & (chosen <= 160)).all())
    from vsteer.effects.scales import DEFAULT_LOSS_TEXTS, steered_losses

    losses = steered_losses(eager_llm, directions[:1], [0, 40, 160], sae.layer, DEFAULT_LOSS_TEXTS[:2])
    assert float(losses[0, 2]) > float(losses[0, 0]) + 0.5  # a big push hurts the loss


def test_job_interrupted_and_resumed_counts_every_chunk_once(eager_llm, sae, sae_store_dir, tmp_path, monkeypatch):
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, run_effects_job

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    job = EffectsJob(sae="test-relu", vectors="decoder", features=[1, 2, 3, 4, 5], scale=6.0, chunk_size=2,
                     prompts=list(CONFIG.prompts), rollouts=3, baseline_rollouts=4, tokens=6, seed=1)
    first = run_effects_job(job, tmp_path / "a", llm=eager_llm, max_chunks=1, progress=False)
    assert first["done"] == 1 and not first["complete"] and not (tmp_path / "a" / "effects.safetensors").exists()
    second = run_effects_job(job, tmp_path / "a", llm=eager_llm, progress=False)
    assert second == {**second, "done": 3, "resumed": 1, "complete": True}
    # the running totals add up both runs, and every rollout is counted once
    assert second["total"]["runs"] == 2 and second["total"]["rollouts"] == first["rollouts"] + second["rollouts"] == 5 * 3 + 4
    assert second["total"]["seconds"] >= first["seconds"] + second["seconds"] - 0.02
    whole = run_effects_job(job, tmp_path / "b", llm=eager_llm, progress=False)
    a, b = load_effects(tmp_path / "a"), load_effects(tmp_path / "b")
    assert a.X.shape == (5, 576) and a.Y.shape == (5, sae.d_sae)
    torch.testing.assert_close(a.Y, b.Y, atol=1e-5, rtol=1e-5)
    assert whole["rollouts"] == 5 * 3 + 4
    with pytest.raises(Exception, match="other settings"):
        run_effects_job(job.model_copy(update={"scale": 7.0}), tmp_path / "a", llm=eager_llm, progress=False)
