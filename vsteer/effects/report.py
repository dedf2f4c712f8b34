"""Reading feature effects: a top-effects table (like SAE-TS table 1) and two plots.

Plots use matplotlib's object API (``Figure`` + ``savefig``), never pyplot, so they neither pick
nor change the caller's backend. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_approximator_fit", "plot_effect_heatmap", "top_effects_table"]

FeatureLabels = Mapping[int, str] | Sequence[str]


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "vsteer's effect plots need matplotlib: pip install matplotlib (or vsteer[dev])"
        ) from exc
    return Figure(**kwargs)


def _label(labels: FeatureLabels | None, feature: int) -> str:
    if labels is None:
        return ""
    if isinstance(labels, Mapping):
        text = labels.get(feature, "")
    else:
        text = labels[feature] if 0 <= feature < len(labels) else ""
    return str(text).replace("|", "\\|").replace("\n", " ")


def top_effects_table(
    y: torch.Tensor, k: int = 10, feature_labels: FeatureLabels | None = None, *, largest: bool = True
) -> str:
    """A markdown table of the ``k`` largest (or most negative) entries of an effect vector.

    Args:
        y: ``[d_sae]`` effect (measured or predicted).
        k: Rows.
        feature_labels: Descriptions by feature id (a mapping or a list indexed by id); adds a
            "Feature description" column.
        largest: Largest effects first (default), else the most negative first.

    Example:
        >>> print(top_effects_table(torch.tensor([0.1, 4.58, -2.0]), k=2))
        | Act diff | Feature id |
        |---:|---:|
        | 4.5800 | 1 |
        | 0.1000 | 0 |
    """
    if y.ndim != 1 or y.numel() == 0:
        raise ValueError(f"y must be a non-empty 1-D tensor, got shape {tuple(y.shape)}")
    k = max(0, min(int(k), y.numel()))
    values, ids = y.detach().cpu().double().topk(k, largest=largest)
    header = ["Act diff", "Feature id"] + (["Feature description"] if feature_labels is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:", "---:", "---"][: len(header)]) + "|"]
    for value, feature in zip(values.tolist(), ids.tolist()):
        row = [f"{value:.4f}", str(feature)]
        if feature_labels is not None:
            row.append(_label(feature_labels, feature))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_effect_heatmap(
    Y: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    k: int = 20,
    features: Sequence[int] | None = None,
    row_labels: Sequence[str] | None = None,
    feature_labels: FeatureLabels | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of effects: one row per vector, one column per feature (diverging, centred at 0).

    Args:
        Y: ``[N, d_sae]`` effects (or ``[d_sae]`` for one vector).
        path: Image file to write (format from the suffix, e.g. ``.png``, ``.pdf``).
        k: Columns: the ``k`` features with the largest mean ``|effect|`` over the rows.
        features: Show exactly these features instead.
        row_labels: One label per row (vector names).
        feature_labels: Descriptions by feature id, appended to the column ticks.
        title: Figure title.

    Returns:
        ``path``.
    """
    Y = Y.detach().cpu().double()
    Y = Y.unsqueeze(0) if Y.ndim == 1 else Y
    if Y.ndim != 2 or 0 in Y.shape:
        raise ValueError(f"Y must be [N, d_sae], got shape {tuple(Y.shape)}")
    if features is None:
        cols = Y.abs().mean(dim=0).topk(max(1, min(k, Y.shape[1]))).indices.tolist()
    else:
        cols = [int(f) for f in features]
    data = Y[:, cols].numpy()
    vmax = float(abs(data).max()) or 1.0
    n_rows, n_cols = data.shape
    fig = _figure(figsize=(min(2 + 0.45 * n_cols, 30), min(1.5 + 0.35 * n_rows, 30)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="effect (steered - unsteered)")
    ticks = [str(f) + (f" {_label(feature_labels, f)[:30]}" if feature_labels is not None else "") for f in cols]
    ax.set_xticks(range(n_cols), ticks, rotation=90, fontsize=7)
    if row_labels is not None:
        if len(row_labels) != n_rows:
            raise ValueError(f"row_labels has {len(row_labels)} entries for {n_rows} rows")
        ax.set_yticks(range(n_rows), [str(r) for r in row_labels], fontsize=7)
    ax.set_xlabel("SAE feature")
    ax.set_ylabel("steering vector")
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path


def plot_approximator_fit(
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    max_points: int = 50_000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Scatter of predicted against measured effects (every entry), with ``y = x`` and R^2.

    R^2 is ``1 - SS_res/SS_tot`` over all entries, ``SS_tot`` about each feature's mean (as
    `EffectApproximator.evaluate` computes it). At most ``max_points`` entries are drawn, chosen
    at random with ``seed``.

    Returns:
        ``path``.
    """
    y_true = y_true.detach().cpu().double()
    y_pred = y_pred.detach().cpu().double()
    if y_true.shape != y_pred.shape or y_true.numel() == 0:
        raise ValueError(f"y_true and y_pred must have the same non-empty shape, got {tuple(y_true.shape)} and {tuple(y_pred.shape)}")
    t2 = y_true.reshape(-1, y_true.shape[-1]) if y_true.ndim > 1 else y_true.unsqueeze(1)
    p2 = y_pred.reshape(t2.shape)
    ss_res = float(((p2 - t2) ** 2).sum())
    ss_tot = float(((t2 - t2.mean(dim=0)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    t, p = t2.flatten(), p2.flatten()
    if t.numel() > max_points:
        idx = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(seed))[:max_points]
        t, p = t[idx], p[idx]
    fig = _figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(t.numpy(), p.numpy(), s=2, alpha=0.3, linewidths=0)
    lo = float(min(t.min(), p.min()))
    hi = float(max(t.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xlabel("measured effect")
    ax.set_ylabel("predicted effect")
    ax.set_title(f"{title + ': ' if title else ''}R$^2$ = {r2:.3f} ({t2.shape[0]} vectors)")
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path
