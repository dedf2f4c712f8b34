"""Feature effects on the real engine: fused (summed inside vLLM during generation) equals the
two-pass reference on the same rollouts, K vectors at once equal each alone, scale selection,
and a job that is interrupted and resumed."""

from __future__ import annotations

import pytest
import torch

from vsteer.effects.measure import RolloutConfig, measure_effects, rollout_sums
from vsteer.effects.scales import pick_scales, select_scales

CONFIG = RolloutConfig(prompts=("I think", "The weather"), rollouts=4, baseline="independent", baseline_rollouts=6,
                       tokens=8, seed=3)


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
    config = RolloutConfig(prompts=CONFIG.prompts, rollouts=6, tokens=8, seed=3)  # a paired baseline
    result = measure_effects(eager_llm, sae, directions[:1], 0.0, config)
    assert float(result.effects.abs().max()) < 1e-5


def test_pick_scales_interpolates_to_the_threshold():
    losses = torch.tensor([[2.0, 2.2, 2.8, 4.0], [2.0, 2.0, 2.1, 2.2], [3.0, 3.6, 3.7, 3.8]])
    got = pick_scales(losses, [0, 10, 20, 30], losses[:, 0] + 0.5)
    assert got.tolist() == pytest.approx([10 + 10 * (0.3 / 0.6), 30.0, 10 * (0.5 / 0.6)])
    # the reference code's rule: one absolute loss for every row
    assert pick_scales(losses, [0, 10, 20, 30], 2.5).tolist() == pytest.approx([10 + 10 * (0.3 / 0.6), 30.0, 0.0])


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
                     prompts=list(CONFIG.prompts), rollouts=3, baseline="independent", baseline_rollouts=4, tokens=6, seed=1)
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


def _exact_one_token_effect(llm, sae, spec, config):
    """The effect of ``spec`` on one-token rollouts, by enumeration: with top-k sampling at
    temperature 1 the first token is one of the k most likely, with their renormalised
    probabilities, and the counted positions are the prompt's (the same with and without steering:
    the SAE reads the residual before the add) and that token's. So the effect is
    sum_t (p_steered(t) - p_unsteered(t)) f(h(prompt + t)) / positions."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=config.top_k)
    steered, plain = llm.generate([config.prompts[0]] * 2, params, steering=[spec, None])
    ids = list(plain.prompt_token_ids)

    def top_k_probs(out):
        lps = sorted(out.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)[:config.top_k]
        p = torch.tensor([lp.logprob for _, lp in lps], dtype=torch.float64).softmax(0)
        return dict(zip((t for t, _ in lps), p.tolist()))

    ps, pb = top_k_probs(steered), top_k_probs(plain)
    tokens = sorted(set(ps) | set(pb))
    caps = llm.capture([ids + [t] for t in tokens], [sae.layer])
    with torch.no_grad():
        codes = torch.stack([sae.encode(cap[sae.layer][len(ids)].float()).double() for cap in caps])
    weights = torch.tensor([ps.get(t, 0.0) - pb.get(t, 0.0) for t in tokens], dtype=torch.float64)
    positions = len(ids) - config.start + config.tokens
    return weights @ codes / positions


def test_paired_and_independent_baselines_are_unbiased_for_a_known_effect(eager_llm, sae, directions):
    """Both estimators, over many seeded one-token rollouts, land on the effect computed exactly by
    enumerating the first token; the paired one with less variance."""
    from vsteer.effects.noise import compare_baselines

    config = RolloutConfig(prompts=("I think",), rollouts=256, tokens=1, top_k=3, top_p=1.0, seed=11)
    scale = 12.0
    spec = {"interventions": [{"op": "add", "vector": directions[0].tolist(), "layers": [sae.layer], "scale": scale}]}
    exact = _exact_one_token_effect(eager_llm, sae, spec, config)
    got = compare_baselines(eager_llm, sae, directions[:1], scale, config)
    top = exact.abs().topk(8).indices
    for est, var in ((got.paired[0], got.paired_var[0]), (got.independent[0], got.independent_var[0])):
        z = (est[top] - exact[top]) / var[top].sqrt()
        assert bool((z.abs() < 4.5).all()), (z, est[top], exact[top])
        moved = var > 0
        assert float(((est[moved] - exact[moved]) ** 2 / var[moved]).mean()) < 2.5  # ~1 when unbiased
    # the test has power: the effect is many standard errors from zero on its largest features
    assert float((exact[top].abs() / got.paired_var[0, top].sqrt()).max()) > 8
    paired, independent = got.total_variance()
    assert float(independent[0]) > 1.5 * float(paired[0]), (paired, independent)


def test_per_vector_seeds_are_unbiased_and_their_noise_is_not_shared(eager_llm, sae, directions):
    """Per-vector seeds: eight copies of one vector, 32 one-token rollouts each, against an
    independent baseline. Each copy is an unbiased estimate of the exact effect (their mean lands
    on it), and their sampling noise is independent: the copies differ from each other about as
    much as their standard error says. With shared seeds the eight copies are one estimate eight
    times: their common noise cannot average out over vectors."""
    from vsteer.effects.measure import rollout_group_sums

    k, rollouts, scale = 8, 32, 12.0
    config = RolloutConfig(prompts=("I think",), rollouts=rollouts, tokens=1, top_k=3, top_p=1.0, seed=11,
                           baseline="independent", baseline_rollouts=256, seeds="per_vector")
    spec = {"interventions": [{"op": "add", "vector": directions[0].tolist(), "layers": [sae.layer], "scale": scale}]}
    exact = _exact_one_token_effect(eager_llm, sae, spec, config)
    sums, counts = rollout_group_sums(eager_llm, sae, [spec] * k, config, rollouts, groups=rollouts)
    base_sums, base_counts = rollout_group_sums(eager_llm, sae, [None], config, 256, groups=256, baseline=True)
    per_rollout = sums / counts[..., None]  # [k, R, d]: every rollout has the same number of positions
    base = base_sums[0] / base_counts[0][:, None]
    copies = per_rollout.mean(1) - base.mean(0)  # [k, d]: each copy's estimate
    var_mean = per_rollout.reshape(k * rollouts, -1).var(0) / (k * rollouts) + base.var(0) / 256
    top = exact.abs().topk(8).indices
    z = (copies.mean(0)[top] - exact[top]) / var_mean[top].sqrt()
    assert bool((z.abs() < 4.5).all()), (z, copies.mean(0)[top], exact[top])
    moved = var_mean > 0
    assert float(((copies.mean(0)[moved] - exact[moved]) ** 2 / var_mean[moved]).mean()) < 2.5  # ~1 when unbiased
    # the copies' spread around their mean is their steered noise: on the features that move most,
    # the sample variance over copies, against each copy's steered-side variance, is ~1 (chi-square, 7 df)
    spread = copies[:, top].var(0) / (per_rollout[:, :, top].var(1).mean(0) / rollouts)
    assert 0.3 < float(spread.mean()) < 2.5, spread
    assert len({tuple(c.tolist()) for c in copies}) == k  # no two copies share their rollouts
    shared = RolloutConfig(**{**config.__dict__, "seeds": "shared"})
    same, _ = rollout_group_sums(eager_llm, sae, [spec] * 2, shared, 4)
    assert torch.equal(same[0], same[1])  # shared seeds: the same rollouts for every vector


def test_per_vector_seeds_do_not_depend_on_chunking(eager_llm, sae_store_dir, tmp_path, monkeypatch):
    """A vector's seeds come from its place in the job, not in its chunk: other chunk sizes give
    the same effects, and no two vectors got the same rollouts."""
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, run_effects_job

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    job = EffectsJob(sae="test-relu", features=[7, 7, 7, 40, 41, 42], scale=6.0, chunk_size=4, prompts=["I think"],
                     rollouts=3, tokens=4, seed=2, top_p=1.0, baseline="independent", baseline_rollouts=4,
                     seeds="per_vector")
    run_effects_job(job, tmp_path / "four", llm=eager_llm, progress=False)
    run_effects_job(job.model_copy(update={"chunk_size": 3}), tmp_path / "three", llm=eager_llm, progress=False)
    four, three = load_effects(tmp_path / "four").Y, load_effects(tmp_path / "three").Y
    torch.testing.assert_close(four, three, atol=1e-5, rtol=1e-5)  # float32 sums in other batch shapes
    assert not torch.equal(four[0], four[1]) and not torch.equal(four[1], four[2])  # one vector, other seeds


def test_rollout_groups_add_up_and_feed_the_learning_curve(eager_llm, sae, sae_store_dir, tmp_path, monkeypatch):
    from vsteer.effects.curve import learning_curve, load_grouped, split_half
    from vsteer.effects.data import load_effects
    from vsteer.effects.job import EffectsJob, run_effects_job
    from vsteer.effects.measure import rollout_group_sums

    config = RolloutConfig(prompts=CONFIG.prompts, rollouts=4, tokens=6, seed=5, groups=2)
    spec = [{"interventions": [{"op": "add", "vector": directions_list(sae, 9), "layers": [sae.layer], "scale": 6.0}]}]
    grouped, counts = rollout_group_sums(eager_llm, sae, spec, config, 4, groups=2)
    whole, whole_counts = rollout_sums(eager_llm, sae, spec, config, 4)
    torch.testing.assert_close(grouped.sum(1), whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(counts.sum(1), whole_counts)

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    job = EffectsJob(sae="test-relu", features=list(range(16)), scale=6.0, chunk_size=8, prompts=["I think"],
                     rollouts=4, groups=2, tokens=4, seed=2)
    run_effects_job(job, tmp_path / "train", llm=eager_llm, progress=False)
    held = job.model_copy(update={"features": list(range(16, 20))})
    run_effects_job(held, tmp_path / "held", llm=eager_llm, progress=False)
    data, train = load_effects(tmp_path / "train"), load_grouped(tmp_path / "train")
    torch.testing.assert_close(train.effects(), data.Y, atol=1e-5, rtol=1e-5)  # all groups: the job's effects
    # the first group alone is the same measurement with half the rollouts (paired with its half of the baseline)
    half = EffectsJob(**{**job.model_dump(), "rollouts": 2, "groups": 1, "features": list(range(8))})
    run_effects_job(half, tmp_path / "half", llm=eager_llm, progress=False)
    torch.testing.assert_close(train.effects(1)[:8], load_effects(tmp_path / "half").Y, atol=1e-5, rtol=1e-5)
    heldout = load_effects(tmp_path / "held")
    rows = learning_curve(train, heldout.X, heldout.Y, vectors=[8, 16], progress=False)
    assert [(r["rollouts"], r["vectors"]) for r in rows] == [(2, 8), (2, 16), (4, 8), (4, 16)]
    assert all(-10 < r["r2"] <= 1 and -1 <= r["cosine_centered"] <= 1 for r in rows)
    assert split_half(load_grouped(tmp_path / "held"))["rollouts_per_half"] == 2


def directions_list(sae, row: int) -> list[float]:
    d = sae.W_dec.detach()[row].float()
    return (d / d.norm()).tolist()


def test_rollout_config_refuses_settings_that_do_not_fit():
    with pytest.raises(ValueError, match="baseline_rollouts must equal rollouts"):
        RolloutConfig(rollouts=4, baseline_rollouts=8)
    with pytest.raises(ValueError, match="groups"):
        RolloutConfig(rollouts=6, groups=4)
    assert RolloutConfig(rollouts=6).baseline_rollouts == 6
    assert RolloutConfig(rollouts=6, baseline="independent").baseline_rollouts == 256
    independent = RolloutConfig(rollouts=6, baseline="independent", seed=3)
    assert independent.seed_of(2) == 5 and independent.seed_of(2, baseline=True) != 5
    assert RolloutConfig(rollouts=6, seed=3).seed_of(2, baseline=True) == 5
    with pytest.raises(ValueError, match="per-vector seeds need baseline='independent'"):
        RolloutConfig(rollouts=6, seeds="per_vector")
    per_vector = RolloutConfig(rollouts=6, seed=3, baseline="independent", seeds="per_vector")
    assert [per_vector.seed_of(2, vector=v) for v in range(3)] == [5, 11, 17]
    assert per_vector.seed_of(2, baseline=True) == independent.seed_of(2, baseline=True)
    with pytest.raises(ValueError, match="reach the baseline's seeds"):
        per_vector.seed_of(0, vector=2**30)
