"""Vector methods computed inside the real engine, checked against HF transformers in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from tests._reference.hf_steering import actadd_prehook, greedy, hidden_states
from vsteer import SpecError, SteeringVector
from vsteer.methods import (
    ABItem,
    SaraSet,
    actadd_vector,
    caa_vector,
    mean_difference,
    pca_vector,
    sara_r,
)
from vsteer.methods.actadd import pad_pair
from vsteer.methods.caa import ab_prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0)
PROMPTS = ["I think that", "My neighbour is a", "The best thing about people is"]
LP_TOL = 2e-3


def _check_against_hf(outs, hf_model, items_for):
    for out in outs:
        ids = list(out.prompt_token_ids)
        ref, ref_lp = items_for(ids)
        got = list(out.outputs[0].token_ids)
        assert got == ref
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(got_lp, ref_lp)) < LP_TOL


def test_actadd_vector_and_prompt_pass_steering_match_hf(eager_llm, hf_model, tokenizer):
    layer = 5  # = the paper's block 6
    v = actadd_vector(eager_llm, "Love", "Hate", layer, coefficient=5.0)
    pos_ids, neg_ids = pad_pair(tokenizer, "Love", "Hate")
    ref = 5.0 * (hidden_states(hf_model, pos_ids)[layer + 1][0].double() - hidden_states(hf_model, neg_ids)[layer + 1][0].double())
    assert v.num_positions == len(pos_ids) and v.provenance["block"] == layer + 1
    torch.testing.assert_close(v.layers[layer].double(), ref, atol=2e-3, rtol=1e-3)
    eager_llm.store.put(v)
    outs = eager_llm.generate(PROMPTS, GREEDY, steering={"interventions": [{"op": "add", "vector": v.sha256}]})

    def reference(ids):
        with actadd_prehook(hf_model, layer + 1, v.layers[layer]):
            return greedy(hf_model, ids, 10)

    _check_against_hf(outs, hf_model, reference)
    plain = eager_llm.generate(PROMPTS, GREEDY)
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs, plain))


AB = [
    ABItem("Would you rather help a stranger or ignore them?\n(A) Help them\n(B) Ignore them", "A", "B"),
    ABItem("Someone insults you. Do you\n(A) shout back angrily\n(B) stay kind and calm", "B", "A"),
    ABItem("Is it good to share with others?\n(A) Yes, sharing is kind\n(B) No, keep everything", "A", "B"),
]


def test_caa_vector_equals_hf_float64_and_applies_from_the_last_prompt_token(eager_llm, hf_model, tokenizer):
    layers = [10, 14]
    v = caa_vector(eager_llm, AB, layers)
    for layer in layers:
        diffs = []
        for item in AB:
            hp = hidden_states(hf_model, ab_prompt(tokenizer, item.question, item.matching))[layer + 1][0, -1].double()
            hn = hidden_states(hf_model, ab_prompt(tokenizer, item.question, item.other))[layer + 1][0, -1].double()
            diffs.append(hp - hn)
        torch.testing.assert_close(v.layers[layer].double(), torch.stack(diffs).mean(0), atol=2e-3, rtol=1e-3)
    eager_llm.store.put(v)
    spec = {"interventions": [{"op": "add", "vector": v.sha256, "scale": 4.0, "positions": "from_last_prompt_token"}]}
    outs = eager_llm.generate(PROMPTS, GREEDY, steering=spec)
    items = [dict(op="add", direction=dict(v.layers), layers=layers, scale=4.0, positions="from_last_prompt_token")]
    _check_against_hf(outs, hf_model, lambda ids: greedy(hf_model, ids, 10, items))


def _np_sara_r(a, x_att, x_rep):
    """float64 numpy SARA: reduce with thin SVD (largest-|.| entry of each u positive), per-neuron cos."""
    def red(m, k):
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        for j in range(u.shape[1]):
            if u[np.argmax(np.abs(u[:, j])), j] < 0:
                u[:, j] = -u[:, j]
        return u[:, :k] * s[:k]

    k = min(a.shape[1], x_att.shape[1], x_rep.shape[1])
    ra, rt, rr = red(a, k), red(x_att, k), red(x_rep, k)

    def cos(x, y):
        den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        return np.where(den > 0, (x * y).sum(1) / np.where(den > 0, den, 1), 0.0)

    return cos(ra, rt) - cos(ra, rr)


def test_sara_on_captured_activations_matches_numpy_and_hf(eager_llm, hf_model, tokenizer):
    layer, c = 12, 1.0
    attract, repel = "I love helping people, kindness is wonderful.", "I hate everyone, cruelty is wonderful."
    caps = eager_llm.capture([attract, repel], [layer])
    sara_set = SaraSet.from_activations(caps[0][layer].double().T, caps[1][layer].double().T)
    spec = {"interventions": [{"op": "sara", "attract": attract, "repel": repel, "layers": [layer], "scale": c}]}
    outs = eager_llm.generate(PROMPTS, GREEDY, steering=spec)
    zero = eager_llm.generate(PROMPTS, GREEDY, steering={"interventions": [dict(spec["interventions"][0], scale=0.0)]})
    plain = eager_llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in zero] == [o.outputs[0].token_ids for o in plain], "c = 0 must be unsteered"
    for prompt, out in zip(PROMPTS, outs):
        a = eager_llm.capture([prompt], [layer])[0][layer].double().T
        r = sara_r(a, sara_set)
        np.testing.assert_allclose(r.numpy(), _np_sara_r(a.numpy(), caps[0][layer].double().T.numpy(), caps[1][layer].double().T.numpy()), atol=1e-9)
        factor = 1 + c * r
        item = [dict(op="mul", direction=factor.float(), layers=[layer], positions="all")]
        ref, ref_lp = greedy(hf_model, list(out.prompt_token_ids), 10, item)
        assert list(out.outputs[0].token_ids) == ref
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs, plain))


def test_pca_vector_points_like_the_mean_difference(eager_llm):
    pos = ["I love this.", "What a wonderful day.", "She is so kind."]
    neg = ["I hate this.", "What an awful day.", "She is so cruel."]
    p = pca_vector(eager_llm, pos, neg, [10], mode="center")
    md = mean_difference(eager_llm, pos, neg, [10], pooling="last")
    cos = float(p.layers[10] @ md.layers[10] / md.layers[10].norm())
    assert cos > 0.5, cos  # sign: the positive side projects positive


def test_bad_method_input(eager_llm):
    with pytest.raises(ValueError, match="at least one"):
        mean_difference(eager_llm, [], ["x"], [10])
    with pytest.raises(ValueError, match="paired"):
        pca_vector(eager_llm, ["a", "b"], ["c"], [10])
    with pytest.raises(ValueError, match="non-empty"):
        actadd_vector(eager_llm, "", "Hate", 5)
    with pytest.raises(SpecError, match="layer 30 is out of range"):
        mean_difference(eager_llm, ["a"], ["b"], [30])
    other = SteeringVector.from_tensors({10: torch.ones(576)}, model="Llama-3-8B")
    eager_llm.store.put(other)
    with pytest.raises(SpecError, match="computed for model 'Llama-3-8B'"):
        eager_llm.generate(["hi"], GREEDY, steering={"interventions": [{"op": "add", "vector": other.sha256}]})
