"""Learning curves of the effect approximator: held-out quality against rollouts per vector and
against the number of training vectors.

A training job measured with ``groups=G`` (``vsteer effects measure --groups G``) keeps each group
of R / G rollouts apart, so the first g groups are the same measurement with g R / G rollouts per
vector (paired with the baseline's first g groups when the baseline is paired). Fits are closed-form
least squares (the ridge chosen on a validation tenth of the training vectors, as ``vsteer effects
fit`` does). They are scored on a separate held-out job, ideally measured with more rollouts, so
the score moves with the fit and not with the noise of the training targets; the held-out
measurement's own noise is reported beside it (split-half agreement, when it has groups).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from vsteer.effects.approximator import EffectApproximator, train_test_split
from vsteer.effects.data import EffectsFileError

RIDGES = (0.0, 0.1, 1.0, 10.0, 100.0)


@dataclass
class GroupedEffects:
    """A finished effects job with its rollout groups apart."""

    X: torch.Tensor  # [N, d_model]
    steered: torch.Tensor  # [N, G, d_sae] mean code per group
    tokens: torch.Tensor  # [N, G]
    baseline: torch.Tensor  # [G, d_sae]
    baseline_tokens: torch.Tensor  # [G]
    paired: bool
    rollouts: int  # per vector, all groups

    @property
    def groups(self) -> int:
        return self.steered.shape[1]

    def effects(self, groups: Sequence[int] | int | None = None) -> torch.Tensor:
        """Effects ``[N, d_sae]`` from the given groups (an int g: the first g; default all). A paired
        baseline uses the same groups; an independent one all of its rollouts."""
        idx = list(range(self.groups)) if groups is None else list(range(groups)) if isinstance(groups, int) else list(groups)
        if not idx or any(not 0 <= g < self.groups for g in idx):
            raise ValueError(f"groups must be within 0..{self.groups - 1}, got {idx}")
        steered = _pooled(self.steered[:, idx], self.tokens[:, idx])
        base_idx = idx if self.paired else list(range(self.groups))
        base = _pooled(self.baseline[None, base_idx], self.baseline_tokens[None, base_idx])[0]
        return (steered - base).float()


def _pooled(means: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    w = tokens.double()
    return (means.double() * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]


def load_grouped(folder: str | os.PathLike) -> GroupedEffects:
    """Read a finished job folder's chunks and baseline with their groups."""
    out = Path(folder)
    try:
        job = json.loads((out / "job.json").read_text())
        base = load_file(out / "baseline.safetensors")
        chunks = sorted((out / "chunks").glob("chunk-*.safetensors"))
        parts = [load_file(p) for p in chunks]
    except (OSError, ValueError) as exc:
        raise EffectsFileError(f"not a finished effects job: {exc}", path=str(out)) from exc
    if not (out / "effects.safetensors").exists():
        raise EffectsFileError("the job is not finished (no effects.safetensors); rerun its measure command", path=str(out))
    if "group_mean" not in base or any("group_mean" not in p for p in parts):
        raise EffectsFileError("measured without rollout groups; measure with --groups G (G > 1) for learning curves",
                               path=str(out))
    return GroupedEffects(
        X=torch.cat([p["directions"] for p in parts]).float(),
        steered=torch.cat([p["group_mean"] for p in parts]),
        tokens=torch.cat([p["group_tokens"] for p in parts]),
        baseline=base["group_mean"][0], baseline_tokens=base["group_tokens"][0],
        paired=job.get("baseline", "paired") == "paired", rollouts=int(job["rollouts"]),
    )


def fit_with_validation(X: torch.Tensor, Y: torch.Tensor, ridges: Sequence[float] = RIDGES, seed: int = 0) -> EffectApproximator:
    """Least squares with the ridge that scores best (R^2) on a validation tenth, refitted on all rows."""
    train, val = train_test_split(len(X), 0.1, seed) if len(X) >= 20 else (torch.arange(len(X)), torch.arange(0))
    best = ridges[0]
    if len(val):
        scores = {r: EffectApproximator.fit_least_squares(X[train], Y[train], ridge=r).evaluate(X[val], Y[val])["r2"]
                  for r in ridges}
        best = max(scores, key=lambda r: scores[r])
    return EffectApproximator.fit_least_squares(X, Y, ridge=best)


def learning_curve(
    train: GroupedEffects,
    heldout_X: torch.Tensor,
    heldout_Y: torch.Tensor,
    *,
    groups: Sequence[int] | None = None,
    vectors: Sequence[int] | None = None,
    ridges: Sequence[float] = RIDGES,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Held-out R^2, centred cosine and top-10 overlap for every (first g groups, first n of a
    seeded shuffle of the training vectors). Default: every g and n = 1/8, 1/4, 1/2, all.

    Each row also has ``offset_sq`` (squared distance between the fit's mean prediction and the
    held-out mean effect) and the metrics with that offset removed: with rollouts that share seeds
    across vectors, part of the noise is common to every vector, it lands in the fit's bias, and
    only more rollouts (not more vectors) shrink it."""
    from tqdm import tqdm

    groups = list(groups or range(1, train.groups + 1))
    n_all = len(train.X)
    vectors = sorted({min(n, n_all) for n in (vectors or (n_all // 8, n_all // 4, n_all // 2, n_all))} - {0})
    order = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))
    rows = []
    for g in tqdm(groups, desc="learning curve", unit="group", disable=not progress):
        Y = train.effects(g)
        for n in vectors:
            idx = order[:n]
            approx = fit_with_validation(train.X[idx], Y[idx], ridges, seed)
            m = approx.evaluate(heldout_X, heldout_Y)
            # the same fit with its mean prediction moved onto the held-out mean: what it gets right
            # besides the offset that noise shared by all training vectors puts into its bias
            shift = approx.predict(_unit(heldout_X)).double().mean(0) - heldout_Y.double().mean(0)
            moved = EffectApproximator(approx.M, approx.b - shift.float()).evaluate(heldout_X, heldout_Y)
            rows.append({"rollouts": g * train.rollouts // train.groups, "vectors": n, "ridge": approx.meta["fit"]["ridge"],
                         "r2": m["r2"], "cosine_centered": m["cosine_centered"], "topk_overlap": m["topk_overlap"],
                         "offset_sq": float((shift ** 2).sum()), "r2_offset_removed": moved["r2"],
                         "cosine_centered_offset_removed": moved["cosine_centered"]})
    return rows


def _unit(X: torch.Tensor) -> torch.Tensor:
    return X.float() / X.float().norm(dim=1, keepdim=True)


def split_half(data: GroupedEffects) -> dict[str, float]:
    """How well one half of a measurement's rollouts predicts the other half: R^2 and centred cosine
    of the first half's effects against the second half's (the noise in the held-out targets)."""
    if data.groups < 2:
        raise ValueError("split-half agreement needs at least two rollout groups")
    half = data.groups // 2
    a, b = data.effects(range(half)), data.effects(range(half, 2 * half))
    mean = b.double().mean(0)
    r2 = 1.0 - float(((a.double() - b) ** 2).sum()) / float(((b.double() - mean) ** 2).sum())
    cos = torch.nn.functional.cosine_similarity(a.double() - mean, b.double() - mean, dim=1, eps=1e-12).mean()
    return {"r2": r2, "cosine_centered": float(cos), "rollouts_per_half": half * data.rollouts // data.groups}


def plot_learning_curve(rows: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Held-out R^2 and centred cosine against rollouts per vector (one line per vector count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("r2", "held-out R²"), ("cosine_centered", "held-out centred cosine")]
    if all("r2_offset_removed" in r for r in rows):
        panels += [("r2_offset_removed", "held-out R², offset removed"),
                   ("cosine_centered_offset_removed", "centred cosine, offset removed")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for n in sorted({r["vectors"] for r in rows}):
            pts = sorted((r["rollouts"], r[key]) for r in rows if r["vectors"] == n)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} vectors")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rollouts per vector")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
