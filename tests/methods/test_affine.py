"""The affine op h' = h + scale * ((h A^T) B + b): folded into the slot bank exactly, composed in
order with add and ablate, equal on the real engine to an HF model edited by forward hooks."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vsteer.kernels import BankLayout, steer_residual_torch
from tests._reference.hf_steering import greedy
from vsteer._errors import SpecError
from vsteer.engine.plan import ResolvedIntervention as RI
from vsteer.engine.plan import fold_layer
from vsteer.methods import affine_vector, loreft_vector, split_affine
from vsteer.vectors import SteeringVector

D = 16


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fold_of_add_affine_ablate_equals_applying_them_in_turn():
    aff = affine_vector({3: (_rand(2, D, seed=1), 0.3 * _rand(2, D, seed=2), _rand(D, seed=3))})
    add = SteeringVector.from_tensors({3: _rand(D, seed=4)})
    abl = SteeringVector.from_tensors({3: _rand(D, seed=5)})
    store = {v.sha256: v for v in (aff, add, abl)}
    items = [RI("add", add.sha256, (3,), 2.0), RI("affine", aff.sha256, (3,), 0.7), RI("ablate", abl.sha256, (3,))]
    layout = BankLayout(hidden_size=D, rank=3)
    row = fold_layer(items, 3, store.__getitem__, layout)
    h = _rand(5, D, seed=6)
    A, B, b = (t.double() for t in split_affine(aff.layers[3]))
    u = abl.layers[3].double() / abl.layers[3].double().norm()
    want = h + 2.0 * add.layers[3].double()
    want = want + 0.7 * ((want @ A.T) @ B + b)
    want = want - (want @ u)[:, None] * u
    got = steer_residual_torch(h.float(), None, torch.stack([layout.identity_row(), row]),
                               torch.ones(5, dtype=torch.int64), rank=3)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_affine_rank_counts_toward_the_bank_rank():
    aff = affine_vector({3: (_rand(2, D, seed=1), _rand(2, D, seed=2), _rand(D, seed=3))})
    with pytest.raises(SpecError, match="max_ablation_rank"):
        fold_layer([RI("affine", aff.sha256, (3,))], 3, {aff.sha256: aff}.__getitem__, BankLayout(hidden_size=D, rank=1))


def test_loreft_is_the_affine_edit_it_names():
    R, W, bias, h = _rand(2, D, seed=1), _rand(2, D, seed=2), _rand(2, seed=3), _rand(4, D, seed=4)
    A, B, b = (t.double() for t in split_affine(loreft_vector(3, R, W, bias).layers[3]))
    torch.testing.assert_close(h + (h @ A.T) @ B + b, h + (h @ W.T + bias - h @ R.T) @ R, atol=1e-5, rtol=1e-5)


def test_affine_vector_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="A \\[r, d\\]"):
        affine_vector({3: (_rand(2, D, seed=1), _rand(3, D, seed=2), _rand(D, seed=3))})


def test_engine_equals_hf_hooks_and_composes_per_request(eager_llm, hf_model, tokenizer, directions, tmp_path):
    """A rank-1 edit (the test engines' max_ablation_rank) at layer 10 (positions "generated") next to an add at layer 12, in a batch with an
    unsteered request: tokens and logprobs equal the float64 HF hook reference."""
    d = 576
    A, B, b = 0.05 * _rand(1, d, seed=7), 0.05 * _rand(1, d, seed=8), 2.0 * _rand(d, seed=9) / d ** 0.5
    path = tmp_path / "edit.safetensors"
    from vsteer import save_vector

    save_vector(affine_vector({10: (A, B, b)}), path)
    love = directions["love"]
    spec = {"interventions": [
        {"op": "affine", "vector": str(path), "scale": 3.0, "positions": "generated"},
        {"op": "add", "vector": love.sha256, "layers": [12], "scale": 6.0},
    ]}
    eager_llm.store.put(love)
    prompt = "I think that"
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    outs = eager_llm.generate([prompt, prompt], params, steering=[spec, None])
    ids = tokenizer(prompt)["input_ids"]
    want_tokens, want_lps = greedy(hf_model, ids, 8, [
        {"op": "affine", "affine": {10: (A, B, b)}, "layers": [10], "scale": 3.0, "positions": "generated"},
        {"op": "add", "direction": love.layers[12], "layers": [12], "scale": 6.0},
    ])
    got = outs[0].outputs[0]
    assert list(got.token_ids) == want_tokens
    got_lps = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
    assert max(abs(x - y) for x, y in zip(got_lps, want_lps)) < 2e-3
    plain = eager_llm.generate([prompt], params)[0].outputs[0]
    assert list(outs[1].outputs[0].token_ids) == list(plain.token_ids)
    assert list(got.token_ids) != list(plain.token_ids), "the edit changed nothing, so this test proves nothing"


def test_a_bad_affine_file_is_refused_naming_the_field(eager_llm, tmp_path):
    from vsteer import save_vector

    path = tmp_path / "flat.safetensors"
    save_vector(SteeringVector.from_tensors({10: torch.ones(576)}), path)
    with pytest.raises(SpecError) as err:
        eager_llm.resolve({"interventions": [{"op": "affine", "vector": str(path)}]})
    assert err.value.field == "interventions.0.vector" and "[2r + 1, d]" in err.value.reason
