"""repeng-style PCA directions (vsteer.methods.pca) against numpy SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsteer.methods.pca import pca_direction


def np_pca(pos: np.ndarray, neg: np.ndarray, mode: str) -> np.ndarray:
    """Independent reference: sklearn-style PCA (centered) of repeng's training matrix, repeng's
    majority-vote sign."""
    if mode == "diff":
        train = pos - neg
    else:
        center = (pos + neg) / 2
        train = np.concatenate([pos - center, neg - center])
    train = train - train.mean(axis=0)
    _, _, vt = np.linalg.svd(train, full_matrices=False)
    v = vt[0] / np.linalg.norm(vt[0])
    proj = (pos - neg) @ v
    if np.mean(proj < 0) > np.mean(proj > 0):
        v = -v
    return v


def planted(rng, n=40, d=64, *, mean_strength=3.0, spread=2.0, noise=0.1):
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    base = rng.standard_normal((n, d))
    strength = mean_strength + spread * rng.standard_normal(n)
    pos = base + 0.5 * strength[:, None] * u + noise * rng.standard_normal((n, d))
    neg = base - 0.5 * strength[:, None] * u + noise * rng.standard_normal((n, d))
    return pos, neg, u


@pytest.mark.parametrize("mode", ["diff", "center"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_and_recovers_planted_direction(mode, seed):
    rng = np.random.default_rng(seed)
    pos, neg, u = planted(rng)
    v = pca_direction(torch.from_numpy(pos), torch.from_numpy(neg), mode=mode)
    assert v.dtype == torch.float32 and v.shape == (64,)
    assert abs(float(torch.linalg.vector_norm(v.double())) - 1.0) < 1e-6
    np.testing.assert_allclose(v.numpy(), np_pca(pos, neg, mode), atol=1e-6)
    assert float(v.double().numpy() @ u) > 0.99  # recovered, and with the positive sign


def test_center_mode_keeps_mean_difference_diff_mode_removes_it():
    rng = np.random.default_rng(3)
    d = 32
    u = np.zeros(d)
    u[0] = 1.0
    w = np.zeros(d)
    w[1] = 1.0
    base = rng.standard_normal((50, d))
    # constant shift of 5 along u, varying (zero-mean) component along w
    a = rng.standard_normal(50)
    pos = base + 2.5 * u + 0.5 * a[:, None] * w
    neg = base - 2.5 * u - 0.5 * a[:, None] * w
    v_center = pca_direction(torch.from_numpy(pos), torch.from_numpy(neg), mode="center").double().numpy()
    v_diff = pca_direction(torch.from_numpy(pos), torch.from_numpy(neg), mode="diff").double().numpy()
    assert v_center @ u > 0.99
    assert abs(v_diff @ w) > 0.99 and abs(v_diff @ u) < 1e-6


def test_sign_rule_swap_flips():
    rng = np.random.default_rng(4)
    pos, neg = rng.standard_normal((12, 16)), rng.standard_normal((12, 16))  # no planted direction
    for mode in ("diff", "center"):
        v = pca_direction(torch.from_numpy(pos), torch.from_numpy(neg), mode=mode)
        w = pca_direction(torch.from_numpy(neg), torch.from_numpy(pos), mode=mode)
        torch.testing.assert_close(w, -v, rtol=0, atol=1e-6)
        proj = (torch.from_numpy(pos - neg) @ v.double())
        assert int((proj > 0).sum()) >= int((proj < 0).sum())


def test_sign_majority_vote_not_mean():
    """repeng counts pairs: 3 pairs slightly positive along e0 beat 1 pair strongly negative."""
    d = 4
    diffs = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [-10.0, 0, 0, 0]])
    neg = np.zeros((4, d))
    v = pca_direction(torch.from_numpy(diffs), torch.from_numpy(neg), mode="center")
    assert v[0] > 0.99  # mean projection is negative, majority is positive


def test_sign_tie_broken_by_mean():
    diffs = np.array([[1.0, 0.0], [-3.0, 0.0]])
    v = pca_direction(torch.from_numpy(diffs), torch.zeros(2, 2, dtype=torch.float64), mode="center")
    assert v[0] < -0.99  # one vote each; mean projection decides


def test_single_pair_center_mode_is_the_difference():
    pos = torch.tensor([[3.0, 4.0, 0.0]])
    neg = torch.zeros(1, 3)
    v = pca_direction(pos, neg, mode="center")
    torch.testing.assert_close(v, torch.tensor([0.6, 0.8, 0.0]))


def test_float32_and_bfloat16_inputs():
    rng = np.random.default_rng(5)
    pos, neg, u = planted(rng)
    for dt in (torch.float32, torch.bfloat16):
        v = pca_direction(torch.from_numpy(pos).to(dt), torch.from_numpy(neg).to(dt))
        assert v.dtype == torch.float32 and float(v.double().numpy() @ u) > 0.99


@pytest.mark.parametrize(
    "pos,neg,mode,match",
    [
        (torch.zeros(0, 4), torch.zeros(0, 4), "diff", "empty"),
        (torch.ones(3, 4), torch.ones(2, 4), "diff", "paired"),
        (torch.ones(4), torch.ones(4), "diff", "2-D"),
        (torch.ones(2, 3, 4), torch.ones(2, 3, 4), "center", "2-D"),
        (torch.ones(3, 4), torch.ones(3, 5), "diff", "hidden sizes"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), "center", "NaN"),
        (torch.ones(1, 2), torch.tensor([[float("inf"), 1.0]]), "center", "NaN or Inf"),
        (torch.ones(2, 4), torch.zeros(2, 4), "bogus", "mode"),
        (torch.ones(1, 4), torch.zeros(1, 4), "diff", "no variance"),  # N = 1
        (torch.ones(5, 4) + torch.arange(5.0)[:, None], torch.arange(5.0)[:, None].expand(5, 4), "diff", "no variance"),
        (torch.ones(3, 4), torch.ones(3, 4), "center", "equals"),
    ],
)
def test_errors(pos, neg, mode, match):
    with pytest.raises(ValueError, match=match):
        pca_direction(pos, neg, mode=mode)
