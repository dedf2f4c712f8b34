"""SARA (vsteer.methods.sara) against an independent float64 numpy implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vsteer._errors import VectorFileError
from vsteer.methods.sara import SaraSet, apply_sara, reduce, sara_factor, sara_r

# ---------------------------------------------------------------- numpy reference

def np_reduce(m: np.ndarray, k: int | None = None) -> np.ndarray:
    u, s, _ = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    k = min(m.shape) if k is None else min(k, min(m.shape))
    u, s = u[:, :k], s[:k]
    for j in range(k):
        i = int(np.argmax(np.abs(u[:, j])))  # first index on ties
        if u[i, j] < 0:
            u[:, j] = -u[:, j]
    return u * s[None, :]


def np_cos_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        nx, ny = np.linalg.norm(x[i]), np.linalg.norm(y[i])
        if nx > 0 and ny > 0:
            out[i] = float(x[i] @ y[i]) / (nx * ny)
    return out


def np_sara(a: np.ndarray, x_att: np.ndarray, x_rep: np.ndarray, c: float):
    k = min(a.shape[1], x_att.shape[1], x_rep.shape[1], a.shape[0])
    ra, rat, rrep = np_reduce(a, k), np_reduce(x_att, k), np_reduce(x_rep, k)
    r = np_cos_rows(ra, rat) - np_cos_rows(ra, rrep)
    factor = 1.0 + c * r
    return r, factor, a * factor[:, None]


def rand(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape))


# ---------------------------------------------------------------- reduce

@pytest.mark.parametrize("shape", [(32, 5), (16, 16), (8, 20), (1, 4), (7, 1)])
@pytest.mark.parametrize("k", [None, 1, 3, 100])
def test_reduce_matches_numpy(shape, k):
    rng = np.random.default_rng(hash((shape, k)) % 2**32)
    m = rng.standard_normal(shape)
    got = reduce(torch.from_numpy(m), k)
    want = np_reduce(m, k)
    assert got.dtype == torch.float64
    assert got.shape == want.shape == (shape[0], min(shape[0], shape[1], k or 10**9))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_reduce_float32_input_computed_in_float64():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((24, 6)).astype(np.float32)
    got = reduce(torch.from_numpy(m))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np_reduce(m.astype(np.float64)), atol=1e-10)


def test_reduce_sign_rule_and_determinism():
    rng = np.random.default_rng(2)
    m = rand(rng, 40, 6)
    red = reduce(m)
    # largest-|.| entry of every column is positive
    idx = red.abs().argmax(dim=0)
    assert bool((red.gather(0, idx[None])[0] > 0).all())
    # -M and M @ Q (Q orthogonal) have the same left singular vectors: same result after the rule
    q, _ = torch.linalg.qr(rand(rng, 6, 6))
    torch.testing.assert_close(reduce(-m), red, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reduce(m @ q), red, rtol=1e-10, atol=1e-10)
    # repeated calls are bit-identical
    assert torch.equal(reduce(m), red)


def test_reduce_sign_tie_takes_first_index():
    # one column whose left singular vector is (-1, 1)/sqrt(2) or (1, -1)/sqrt(2): equal magnitudes,
    # so the first entry decides and must come out positive.
    m = torch.tensor([[-3.0], [3.0]], dtype=torch.float64)
    red = reduce(m)
    torch.testing.assert_close(red, torch.tensor([[3.0], [-3.0]], dtype=torch.float64))
    assert red[0, 0] > 0


def test_reduce_prefix_property():
    rng = np.random.default_rng(3)
    m = rand(rng, 30, 7)
    full = reduce(m)
    for k in range(1, 8):
        torch.testing.assert_close(reduce(m, k), full[:, :k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3, 4), torch.zeros(0, 3), torch.full((3, 2), float("nan"))])
def test_reduce_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        reduce(bad)


def test_reduce_rejects_bad_k():
    with pytest.raises(ValueError):
        reduce(torch.ones(4, 2), 0)


# ---------------------------------------------------------------- sara_r / factor / apply

# (d, n, n_att, n_rep): k limited by n, by n_att, by n_rep, and by d (tokens >= d)
SHAPES = [
    (48, 3, 9, 7),   # k = n
    (48, 10, 4, 12),  # k = n_att
    (48, 10, 12, 5),  # k = n_rep
    (6, 10, 12, 9),   # k = d
    (32, 1, 5, 6),    # the reference's decoding step: n = 1
]


@pytest.mark.parametrize("d,n,n_att,n_rep", SHAPES)
@pytest.mark.parametrize("c", [0.0, 1.0, -0.7, 2.5])
def test_sara_matches_numpy(d, n, n_att, n_rep, c):
    rng = np.random.default_rng(d * 1000 + n * 100 + n_att * 10 + n_rep)
    a, xa, xr = rng.standard_normal((d, n)), rng.standard_normal((d, n_att)), rng.standard_normal((d, n_rep))
    r_np, f_np, out_np = np_sara(a, xa, xr, c)
    s = SaraSet.from_activations(torch.from_numpy(xa), torch.from_numpy(xr))
    assert s.attract.shape == (d, min(d, n_att)) and s.repel.shape == (d, min(d, n_rep))
    r = sara_r(torch.from_numpy(a), s)
    assert r.dtype == torch.float64 and r.shape == (d,)
    np.testing.assert_allclose(r.numpy(), r_np, rtol=1e-9, atol=1e-9)
    assert float(r.abs().max()) <= 2.0
    f = sara_factor(r, c)
    np.testing.assert_allclose(f.numpy(), f_np, rtol=1e-9, atol=1e-9)
    out = apply_sara(torch.from_numpy(a), s, c)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), out_np, rtol=1e-9, atol=1e-9)


def test_n1_factor_collapses_to_three_values():
    """With n = 1 (k = 1) cos is a sign product, so 1 + c r is in {1 - 2c, 1, 1 + 2c}."""
    rng = np.random.default_rng(5)
    s = SaraSet.from_activations(rand(rng, 64, 7), rand(rng, 64, 9))
    f = sara_factor(sara_r(rand(rng, 64, 1), s), 1.0)
    vals = set(np.round(f.numpy(), 9).tolist())
    assert vals <= {-1.0, 1.0, 3.0}


def test_c_zero_gives_exactly_a():
    rng = np.random.default_rng(6)
    s = SaraSet.from_activations(rand(rng, 20, 4), rand(rng, 20, 6))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        a = rand(rng, 20, 5).to(dtype)
        out = apply_sara(a, s, 0.0)
        assert out.dtype == dtype
        assert torch.equal(out, a)
    assert torch.equal(sara_factor(torch.tensor([0.5, -2.0, 0.0]), 0), torch.ones(3, dtype=torch.float64))


def test_zero_rows_give_no_nan():
    rng = np.random.default_rng(7)
    a, xa, xr = rand(rng, 16, 4), rand(rng, 16, 5), rand(rng, 16, 6)
    a[3] = 0.0
    xa[5] = 0.0
    xr[5] = 0.0
    xr[9] = 0.0
    s = SaraSet.from_activations(xa, xr)
    r = sara_r(a, s)
    assert bool(torch.isfinite(r).all())
    assert r[3] == 0.0 and r[5] == 0.0
    np.testing.assert_allclose(r.numpy(), np_sara(a.numpy(), xa.numpy(), xr.numpy(), 1.0)[0], atol=1e-9)
    # everything zero
    z = SaraSet.from_activations(torch.zeros(8, 3), torch.zeros(8, 2))
    assert torch.equal(sara_r(torch.zeros(8, 4), z), torch.zeros(8, dtype=torch.float64))


def test_attract_equals_repel_gives_zero_r():
    rng = np.random.default_rng(8)
    x = rand(rng, 16, 5)
    s = SaraSet.from_activations(x, x.clone())
    assert torch.equal(sara_r(rand(rng, 16, 3), s), torch.zeros(16, dtype=torch.float64))


def test_sara_r_rejects_mismatched_hidden_size():
    s = SaraSet.from_activations(torch.randn(8, 3), torch.randn(8, 3))
    with pytest.raises(ValueError, match="hidden size"):
        sara_r(torch.randn(9, 3), s)
    with pytest.raises(ValueError, match="hidden sizes"):
        SaraSet.from_activations(torch.randn(8, 3), torch.randn(9, 3))


# ---------------------------------------------------------------- SaraSet

def test_truncate_equals_reduce_k():
    rng = np.random.default_rng(9)
    xa, xr = rand(rng, 40, 8), rand(rng, 40, 5)
    s = SaraSet.from_activations(xa, xr)
    for k in (1, 3, 5, 8, 20):
        t = s.truncate(k)
        torch.testing.assert_close(t.attract, reduce(xa, k), rtol=0, atol=1e-12)
        torch.testing.assert_close(t.repel, reduce(xr, k), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        s.truncate(0)


def test_save_load_round_trip_exact(tmp_path):
    rng = np.random.default_rng(10)
    prov = {"layer": 6, "attract": "be kind", "repel": "be cruel"}
    s = SaraSet.from_activations(rand(rng, 24, 7), rand(rng, 24, 3), provenance=prov)
    for name, st in (("f64", s), ("f32", SaraSet(s.attract.float(), s.repel.float(), None)),
                     ("trunc", s.truncate(2))):
        path = tmp_path / f"{name}.safetensors"
        st.save(path)
        back = SaraSet.load(path)
        assert back.attract.dtype == st.attract.dtype and back.repel.dtype == st.repel.dtype
        assert torch.equal(back.attract, st.attract) and torch.equal(back.repel, st.repel)
        assert back.provenance == st.provenance

    from safetensors import safe_open

    with safe_open(str(tmp_path / "f64.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"attract", "repel"}
    assert meta["vsteer.method"] == "sara-set"
    assert meta["vsteer.format_version"] == "1"
    assert json.loads(meta["vsteer.provenance"]) == prov


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(VectorFileError):
        SaraSet.load(tmp_path / "missing.safetensors")
    p = tmp_path / "vec.safetensors"
    save_file({"layer.0": torch.zeros(4)}, str(p), metadata={"vsteer.method": "caa"})
    with pytest.raises(VectorFileError, match="not a SARA set"):
        SaraSet.load(p)
    save_file({"attract": torch.zeros(4, 2)}, str(p), metadata={"vsteer.method": "sara-set", "vsteer.format_version": "1"})
    with pytest.raises(VectorFileError):
        SaraSet.load(p)
    save_file({"attract": torch.ones(4, 2), "repel": torch.ones(4, 1)}, str(p),
              metadata={"vsteer.method": "sara-set", "vsteer.format_version": "2"})
    with pytest.raises(VectorFileError, match="version"):
        SaraSet.load(p)
    q = tmp_path / "junk.safetensors"
    q.write_bytes(b"not safetensors at all")
    with pytest.raises(VectorFileError):
        SaraSet.load(q)


def test_saraset_validation():
    with pytest.raises(ValueError):
        SaraSet(torch.zeros(4, 2, dtype=torch.float16), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        SaraSet(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError):
        SaraSet(torch.zeros(2, 4), torch.zeros(2, 1))  # more columns than rows
    with pytest.raises(ValueError):
        SaraSet(torch.zeros(4, 2), torch.zeros(4, 2), provenance={"x": object()})
