"""SparseAutoencoder / SaeConfig against hand-written formulas (pure torch, float64 oracles)."""

from __future__ import annotations

import pytest
import torch

from vsteer.sae import SaeConfig, SparseAutoencoder

D_IN, D_SAE = 12, 40


def make_sae(activation: str = "relu", *, k: int | None = None, apply_b: bool = False, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """Random SAE; JumpReLU thresholds in [0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SaeConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=k, layer=3, apply_b_dec_to_input=apply_b)
    sae = SparseAutoencoder(cfg, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5)
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        if activation == "jumprelu":
            sae.threshold.copy_(0.5 * torch.rand(D_SAE, generator=g))
    return sae


def weights64(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {n: getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def oracle_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """f(x) in float64, written out per element / per row."""
    w = weights64(sae)
    x = x.double()
    if sae.config.apply_b_dec_to_input:
        x = x - w["b_dec"]
    pre = x @ w["W_enc"] + w["b_enc"]
    if sae.activation == "relu":
        return torch.where(pre > 0, pre, torch.zeros_like(pre))
    if sae.activation == "jumprelu":
        # thresholds are >= 0 here, so relu(p) * (p > t) == p where p > t, else 0
        return torch.where(pre > w["threshold"], pre, torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    for r in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[r, j]))[: sae.config.k]
        for j in order:
            out[r, j] = max(float(pre[r, j]), 0.0)
    return out


def oracle_activate(sae: SparseAutoencoder, pre: torch.Tensor) -> torch.Tensor:
    w = weights64(sae)
    if sae.activation == "relu":
        return pre.clamp_min(0)
    if sae.activation == "jumprelu":
        return torch.where(pre > w["threshold"], pre.clamp_min(0), torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    idx = pre.topk(sae.config.k, dim=-1).indices
    return out.scatter(-1, idx, pre.gather(-1, idx).clamp_min(0))


ACTS = [("relu", None), ("jumprelu", None), ("topk", 5)]


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("apply_b", [False, True])
def test_encode_decode_match_formulas(activation, k, apply_b):
    sae = make_sae(activation, k=k, apply_b=apply_b)
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(1))
    f = sae.encode(x)
    assert f.shape == (9, D_SAE) and f.dtype == torch.float32
    want = oracle_encode(sae, x)
    torch.testing.assert_close(f.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(f != 0, want != 0)  # same active set
    if activation == "topk":
        assert int((f != 0).sum(-1).max()) <= k
    w = weights64(sae)
    torch.testing.assert_close(sae.decode(f).double(), f.double() @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), sae.decode(f))
    torch.testing.assert_close(sae.reconstruction_error(x), x - sae(x))


def test_encoder_bias_folds_b_dec():
    sae = make_sae("relu", apply_b=True)
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(sae.pre_activation(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc, rtol=1e-5, atol=1e-6)
    plain = make_sae("relu", apply_b=False)
    assert torch.equal(plain.encoder_bias(), plain.b_enc)


@pytest.mark.parametrize("activation,k", ACTS)
def test_sas_scale_zero_returns_x_exactly(activation, k):
    sae = make_sae(activation, k=k, seed=2)
    x = 3 * torch.randn(16, D_IN, generator=torch.Generator().manual_seed(3))
    s = torch.zeros(D_SAE)
    s[[1, 5, 7]] = torch.tensor([2.0, -1.0, 4.0])
    with torch.no_grad():
        assert torch.equal(sae.sas(x, s, 0.0), x)
        assert torch.equal(sae.sas(x, torch.zeros(D_SAE), 7.5), x)  # a zero vector changes nothing


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("scale", [0.5, 3.0, -2.0])
def test_sas_matches_float64_direct_formula(activation, k, scale):
    """a' = a_hat(sigma(z + lambda s)) + (a - a_hat(z)) (METHODS.md, SAS), all in float64."""
    sae = make_sae(activation, k=k, seed=4)
    x = 2 * torch.randn(10, D_IN, generator=torch.Generator().manual_seed(5))
    s = torch.zeros(D_SAE)
    s[[0, 3, 11, 30]] = torch.tensor([1.5, -0.7, 2.0, 0.9])
    w = weights64(sae)
    z = oracle_encode(sae, x)
    steered = oracle_activate(sae, z + scale * s.double())
    a_hat = lambda f: f @ w["W_dec"] + w["b_dec"]
    want = a_hat(steered) + (x.double() - a_hat(z))
    with torch.no_grad():
        got = sae.sas(x, s, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, x)  # it did steer


def test_sas_tensor_scale_broadcasts_per_token():
    sae = make_sae("relu", seed=6)
    x = torch.randn(3, D_IN)
    s = torch.zeros(D_SAE)
    s[2] = 1.0
    scale = torch.tensor([[0.0], [1.0], [2.0]])
    with torch.no_grad():
        got = sae.sas(x, s, scale)
        assert torch.equal(got[0], x[0])
        torch.testing.assert_close(got[2], sae.sas(x[2:3], s, 2.0)[0])


def test_feature_direction():
    sae = make_sae("relu")
    v = sae.feature_direction(D_SAE - 1)
    assert torch.equal(v, sae.W_dec[D_SAE - 1])
    v += 1  # a copy
    assert not torch.equal(v, sae.W_dec[D_SAE - 1])
    for bad in (D_SAE, -1, 10**6):
        with pytest.raises(IndexError, match=f"0..{D_SAE - 1}"):
            sae.feature_direction(bad)


def test_sha256_covers_weights_not_name():
    a, b = make_sae("relu", seed=1), make_sae("relu", seed=1)
    assert a.sha256() == b.sha256()
    c = SparseAutoencoder(SaeConfig(**{**a.config.to_json(), "name": "other", "provenance": {"x": 1}}))
    c.load_state_dict(a.state_dict())
    assert c.sha256() == a.sha256()
    with torch.no_grad():
        b.W_dec[0, 0] += 1e-3
    assert b.sha256() != a.sha256()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"d_in": 0, "d_sae": 4}, "d_in and d_sae must be positive"),
        ({"d_in": 4, "d_sae": -1}, "d_in and d_sae must be positive"),
        ({"d_in": 4, "d_sae": 8, "activation": "gelu"}, "unknown SAE activation 'gelu'"),
        ({"d_in": 4, "d_sae": 8, "activation": "topk"}, "TopK SAE needs 0 < k <= d_sae=8"),
        ({"d_in": 4, "d_sae": 8, "activation": "topk", "k": 9}, "k=9"),
        ({"d_in": 4, "d_sae": 8, "activation": "topk", "k": 0}, "k=0"),
        ({"d_in": 4, "d_sae": 8, "activation": "relu", "k": 2}, "k is only meaningful for a TopK SAE"),
        ({"d_in": 4, "d_sae": 8, "hook": "resid_pre"}, "unsupported SAE hook point 'resid_pre'"),
        ({"d_in": 4, "d_sae": 8, "layer": -1}, "layer must be >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaeConfig(**kwargs)


def test_config_json_round_trip_and_unknown_keys():
    cfg = SaeConfig(d_in=4, d_sae=8, activation="topk", k=3, layer=2, model="m", name="n",
                    apply_b_dec_to_input=True, provenance={"source": "x"})
    assert SaeConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown SAE config keys \['bogus'\]"):
        SaeConfig.from_json({**cfg.to_json(), "bogus": 1})
