"""CAST's similarity and the threshold search, against brute force (pure torch, no engine)."""

from __future__ import annotations

import torch

from tests._reference.hf_steering import condition_sim
from vsteer.methods.condition import best_threshold, cast_similarity


def test_cast_similarity_equals_the_projection_formula():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(64, generator=gen, dtype=torch.float64) * 3
    for _ in range(5):
        h = torch.randn(64, generator=gen, dtype=torch.float64) * 10
        assert abs(float(cast_similarity(h, c)) - condition_sim(h, c)) < 1e-12
    batch = torch.randn(7, 64, generator=gen, dtype=torch.float64)
    assert cast_similarity(batch, c).shape == (7,)


def _f1(sims, labels, t, compare):
    hold = [(s > t) if compare == "above" else (s < t) for s in sims]
    tp = sum(h and lab for h, lab in zip(hold, labels))
    fp = sum(h and not lab for h, lab in zip(hold, labels))
    fn = sum(lab and not h for h, lab in zip(hold, labels))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def test_best_threshold_is_the_best_f1_over_a_fine_grid():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        pos = torch.randn(9, generator=gen, dtype=torch.float64) * 0.05 + (0.02 if trial % 2 else -0.02)
        neg = torch.randn(11, generator=gen, dtype=torch.float64) * 0.05
        t, compare, f1, precision, recall, margin = best_threshold(pos, neg)
        sims, labels = pos.tolist() + neg.tolist(), [True] * 9 + [False] * 11
        assert abs(_f1(sims, labels, t, compare) - f1) < 1e-12
        assert margin == min(abs(s - t) for s in sims) > 0
        grid = torch.linspace(min(sims) - 0.01, max(sims) + 0.01, 2001).tolist()
        brute = max(_f1(sims, labels, g, c) for g in grid for c in ("above", "below"))
        assert f1 >= brute - 1e-12, (trial, f1, brute)


def test_best_threshold_separates_separable_sets_in_either_direction():
    low, high = torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.10, 0.12])
    t, compare, f1, *_ = best_threshold(high, low)
    assert (compare, f1) == ("above", 1.0) and 0.03 < t < 0.10
    t, compare, f1, *_ = best_threshold(low, high)
    assert (compare, f1) == ("below", 1.0) and 0.03 < t < 0.10
