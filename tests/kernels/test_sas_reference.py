"""sas_delta_torch (the per-token SAS update) against SparseAutoencoder.sas.

The engine's layout: weights padded with a zero feature at index ``d_sae`` (the padding column),
``bank[0] = 0`` (unsteered), ``bank[slot] = lambda * s`` of that slot, ``union`` = sorted union of
the slots' supports padded with ``d_sae`` to a fixed length.
"""

from __future__ import annotations

import pytest
import torch
from vsteer.kernels import sas_delta_torch

from vsteer.sae import SaeConfig, SparseAutoencoder

D, M = 20, 64


def make_sae(activation: str, *, k: int | None = None, apply_b: bool = True, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=D, d_sae=M, activation=activation, k=k, apply_b_dec_to_input=apply_b))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, M, generator=g) / D**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=g))
        sae.W_dec.copy_(torch.randn(M, D, generator=g) / M**0.5)
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g))
        if activation == "jumprelu":
            sae.threshold.copy_(0.4 * torch.rand(M, generator=g))
    return sae


def padded_weights(sae: SparseAutoencoder):
    """``[M + 1, D]`` encoder (transposed) / decoder and ``[M + 1]`` biases with a zero padding feature."""
    with torch.no_grad():
        w_enc_t = torch.cat([sae.W_enc.t(), torch.zeros(1, D)])
        b_enc = torch.cat([sae.encoder_bias(), torch.zeros(1)])
        w_dec = torch.cat([sae.W_dec, torch.zeros(1, D)])
        thr = torch.cat([sae.threshold, torch.zeros(1)])
    return w_enc_t.contiguous(), b_enc.contiguous(), w_dec.contiguous(), thr.contiguous()


def make_slots(num_slots: int, seed: int, *, support: int = 4):
    """Sparse SAS vectors s (``[num_slots + 1, M]``, row 0 zero), scales, and the bank ``[S + 1, M + 1]``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(num_slots + 1, M)
    for slot in range(1, num_slots + 1):
        feats = torch.randperm(M, generator=g)[:support]
        s[slot, feats] = 2 * torch.randn(support, generator=g)
    scales = torch.rand(num_slots + 1, generator=g) * 4 - 1
    scales[0] = 0.0
    bank = torch.zeros(num_slots + 1, M + 1)
    bank[:, :M] = scales[:, None] * s
    return s, scales, bank


def union_of(bank: torch.Tensor, pad_to: int) -> torch.Tensor:
    feats = (bank[:, :M] != 0).any(0).nonzero().flatten()
    assert feats.numel() <= pad_to
    return torch.cat([feats, torch.full((pad_to - feats.numel(),), M, dtype=torch.int64)])


def expected_delta(sae: SparseAutoencoder, h: torch.Tensor, index: torch.Tensor, s, scales) -> torch.Tensor:
    """Per token: SparseAutoencoder.sas(h_t, s_slot, lambda_slot) - h_t, in float64."""
    sae64 = SparseAutoencoder(sae.config, dtype=torch.float64)
    sae64.load_state_dict({k: v.double() for k, v in sae.state_dict().items()})
    rows = []
    with torch.no_grad():
        for t in range(h.shape[0]):
            slot = int(index[t])
            x = h[t:t + 1].double()
            rows.append(sae64.sas(x, s[slot].double(), float(scales[slot])) - x)
    return torch.cat(rows)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("pad_to", [24, 40])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_support_restricted_equals_full_sas(activation, pad_to, index_dtype):
    sae = make_sae(activation, seed=1)
    w_enc_t, b_enc, w_dec, thr = padded_weights(sae)
    s, scales, bank = make_slots(5, seed=2)
    union = union_of(bank, pad_to)
    T = 23
    g = torch.Generator().manual_seed(3)
    h = 2 * torch.randn(T, D, generator=g)
    index = torch.randint(0, 6, (T + 4,), generator=g).to(index_dtype)
    index[:3] = torch.tensor([0, 1, 0])
    index[T:] = 999  # past T: never read
    delta = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr if activation == "jumprelu" else None,
                            union, activation=activation)
    assert delta.shape == (T, D) and delta.dtype == torch.float32
    want = expected_delta(sae, h, index, s, scales)
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=2e-5)
    zero = index[:T] == 0
    assert zero.any() and torch.equal(delta[zero], torch.zeros_like(delta[zero]))
    # and the same as SparseAutoencoder.sas on the whole batch, token by token in float32
    with torch.no_grad():
        for t in (1, 5, 11):
            slot = int(index[t])
            full = sae.sas(h[t:t + 1], s[slot], float(scales[slot]))
            torch.testing.assert_close(h[t:t + 1] + delta[t:t + 1], full, rtol=1e-5, atol=1e-5)
    # padding and a superset union change nothing; all features == the unrestricted path
    every = torch.arange(M + 1)
    d_all = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr if activation == "jumprelu" else None,
                            every, activation=activation)
    d_none = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr if activation == "jumprelu" else None,
                             None, activation=activation)
    torch.testing.assert_close(d_all, delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_none, delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_each_token_its_own_slot(activation):
    sae = make_sae(activation, seed=4, apply_b=False)
    w_enc_t, b_enc, w_dec, thr = padded_weights(sae)
    s, scales, bank = make_slots(7, seed=5, support=3)
    union = union_of(bank, 32)
    h = torch.randn(8, D, generator=torch.Generator().manual_seed(6))
    index = torch.arange(8)  # token t on slot t; token 0 unsteered
    delta = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr, union, activation=activation)
    torch.testing.assert_close(delta.double(), expected_delta(sae, h, index, s, scales), rtol=1e-5, atol=2e-5)
    assert torch.equal(delta[0], torch.zeros(D))
    assert (delta[1:].abs().sum(-1) > 0).sum() >= 4  # most slots really steer


def test_bf16_input_computed_in_float32():
    sae = make_sae("relu", seed=7)
    w_enc_t, b_enc, w_dec, _ = padded_weights(sae)
    _s, _scales, bank = make_slots(3, seed=8)
    union = union_of(bank, 16)
    h = torch.randn(6, D).to(torch.bfloat16)
    index = torch.tensor([0, 1, 2, 3, 1, 0])
    got = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, None, union)
    want = sas_delta_torch(h.float(), index, bank, w_enc_t, b_enc, w_dec, None, union)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_topk_full_encode_equals_sas():
    k = 6
    sae = make_sae("topk", k=k, seed=9)
    with torch.no_grad():
        w_enc_t, b_enc, w_dec = sae.W_enc.t().contiguous(), sae.encoder_bias(), sae.W_dec
    s, scales, bank_p = make_slots(4, seed=10)
    bank = bank_p[:, :M].contiguous()  # TopK: no padding column needed
    h = 2 * torch.randn(12, D, generator=torch.Generator().manual_seed(11))
    index = torch.tensor([0, 1, 2, 3, 4, 0, 4, 3, 2, 1, 1, 0])
    delta = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, None, None, activation="topk", k=k)
    torch.testing.assert_close(delta.double(), expected_delta(sae, h, index, s, scales), rtol=1e-5, atol=2e-5)
    assert torch.equal(delta[index == 0], torch.zeros_like(delta[index == 0]))
    with pytest.raises(ValueError, match="TopK SAS needs the full encode"):
        sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, None, torch.arange(4), activation="topk", k=k)
