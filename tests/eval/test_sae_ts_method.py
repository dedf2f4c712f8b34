"""The ``sae-ts`` evaluation method on the real engine: an approximator fitted here on effects the
engine measures, the targeted vector it builds, and the errors a user meets without one."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from vsteer._errors import SpecError
from vsteer.cli.eval import eval_group
from vsteer.effects import EffectApproximator
from vsteer.effects.measure import RolloutConfig, measure_effects
from vsteer.eval import get_method, load_concepts
from vsteer.eval.sae_methods import concept_feature

SAE = "test-relu"  # an effect SAE of eager_llm (tests/conftest.py), layer 10
SCALE = 32.0


CONCEPTS = ["wedding", "london", "love", "anger", "french"]


@pytest.fixture(scope="module")
def fitted(eager_llm, tmp_path_factory):
    """Approximator from effects the engine measures for 32 decoder rows: those of the concepts'
    features and 27 others. Returns (file, the concept whose feature its own row moves most, that feature)."""
    sae = eager_llm.saes[SAE]
    concepts = load_concepts(CONCEPTS)
    targets = [concept_feature(eager_llm, sae, c) for c in concepts]
    rows = list(dict.fromkeys(targets + list(range(64))))[:32]
    d = sae.W_dec.detach()[rows].float()
    d = d / d.norm(dim=1, keepdim=True)
    res = measure_effects(eager_llm, sae, d, SCALE, RolloutConfig(rollouts=4, baseline="independent", baseline_rollouts=8, tokens=12))
    own = [float(res.effects[rows.index(j), j]) for j in targets]
    best = max(range(len(concepts)), key=own.__getitem__)
    assert own[best] > 0, f"no concept feature moved when steered with its own decoder row: {own}"
    approx = EffectApproximator.fit_least_squares(d, res.effects, ridge=0.1, layer=sae.layer, sae=SAE,
                                                  model=eager_llm.model_shape.name)
    return approx.save(tmp_path_factory.mktemp("sae-ts") / "approx.safetensors"), concepts[best], targets[best]


def test_sae_ts_builds_the_targeted_vector_and_the_engine_runs_it(eager_llm, fitted):
    from vllm import SamplingParams

    path, concept, target = fitted
    method = get_method("sae-ts", sae=SAE, approximator=path)
    sha = method.prepare(eager_llm, concept)
    vector = eager_llm.store.get(sha)
    assert vector.method == "sae-ts" and vector.provenance["feature"] == target
    assert vector.layer_indices == [10]
    assert float(vector.layers[10].norm()) == pytest.approx(1.0, abs=1e-5)
    assert method.spec(sha, 0.0) is None
    assert method.describe()["approximator"] == EffectApproximator.load(path).sha256[:12]
    outs = eager_llm.generate(["I think"] * 2, SamplingParams(max_tokens=12, temperature=0.0),
                              steering=[method.spec(sha, 3 * SCALE), None])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_sae_ts_vector_raises_its_target_feature(eager_llm, fitted):
    path, concept, target = fitted
    sae = eager_llm.saes[SAE]
    sha = get_method("sae-ts", sae=SAE, approximator=path).prepare(eager_llm, concept)
    v = eager_llm.store.get(sha).layers[10][None]
    res = measure_effects(eager_llm, sae, v, SCALE, RolloutConfig(rollouts=16, tokens=12, seed=50))
    effect = res.effects[0]
    assert float(effect[target]) > 0
    # the target moves more than a typical feature does
    assert float(effect[target]) > float(effect.abs().median())


def test_sae_ts_without_or_with_a_mismatched_approximator_is_a_clear_error(fitted, tmp_path):
    path = fitted[0]
    with pytest.raises(SpecError, match="needs an effect approximator"):
        get_method("sae-ts", sae=SAE)
    with pytest.raises(SpecError, match="no approximator file"):
        get_method("sae-ts", sae=SAE, approximator=tmp_path / "missing.safetensors")
    with pytest.raises(SpecError, match="fitted on effects read by SAE 'test-relu', not 'test-topk'"):
        get_method("sae-ts", sae="test-topk", approximator=path)


def test_sae_ts_method_checks_the_engine_sae_and_the_target_column(eager_llm, tmp_path):
    sae, wedding = eager_llm.saes[SAE], load_concepts(["wedding"])[0]
    wrong = EffectApproximator(torch.randn(sae.d_in, sae.d_sae), torch.zeros(sae.d_sae), layer=sae.layer + 1, sae=SAE)
    method = get_method("sae-ts", sae=SAE, approximator=wrong.save(tmp_path / "wrong.safetensors"))
    with pytest.raises(SpecError, match="does not match the approximator"):
        method.prepare(eager_llm, wedding)
    # a feature the measured effects never moved has a zero column: no direction to steer in
    blind = EffectApproximator(torch.zeros(sae.d_in, sae.d_sae), torch.zeros(sae.d_sae), layer=sae.layer, sae=SAE)
    method = get_method("sae-ts", sae=SAE, approximator=blind.save(tmp_path / "blind.safetensors"))
    feature = concept_feature(eager_llm, sae, wedding)
    with pytest.raises(SpecError, match=f"predicts no effect on feature {feature}"):
        method.prepare(eager_llm, wedding)


def test_eval_cli_lists_sae_ts_and_refuses_it_without_an_approximator(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(eval_group, ["methods"])
    assert listed.exit_code == 0 and "sae-ts" in listed.output and "sas" in listed.output
    run = runner.invoke(eval_group, ["run", "--methods", "caa,sae-ts", "--out", str(tmp_path / "out")])
    assert run.exit_code != 0 and isinstance(run.exception, SpecError)
    assert "--approximator" in str(run.exception) and not (tmp_path / "out").exists()
