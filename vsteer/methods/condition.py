"""CAST condition vectors and the search for a condition point (Lee et al. 2024, "Programming Refusal
with Conditional Activation Steering"; IBM's ``activation-steering``).

A condition vector ``c`` at layer L is read from texts where the condition should hold (positive)
and texts where it should not (negative), each mean-pooled over its tokens (IBM accumulates every
token). A prompt's similarity is ``cos(h, tanh(P h))``, ``P = c c^T / (c^T c)``, ``h`` its pooled
residual at the output of L; the condition holds when the similarity is above (or below) a
threshold. :func:`search_condition` picks, per layer, the threshold and direction that maximise F1
on labelled prompts (IBM's ``find_best_condition_point``; the thresholds tried are every midpoint
between consecutive similarities rather than a fixed grid, so the optimum is exact).

Layer ids: vsteer's layer L is the OUTPUT of decoder layer L. IBM's ``LeashLayer`` i reads the
INPUT of decoder layer i, which is vsteer's layer i - 1.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch

from vsteer.methods.caa import _Captures, mean_difference
from vsteer.methods.pca_extract import pca_vector
from vsteer.vectors import SteeringVector

Pool = Literal["mean", "last"]
Compare = Literal["above", "below"]


def cast_similarity(pooled: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``cos(h, tanh(P h))`` in float64 for pooled states ``[..., d]`` and one condition vector ``[d]``."""
    h, c = pooled.double(), condition.double()
    c = c / c.norm()
    proj = torch.tanh((h @ c)[..., None] * c)
    return torch.nn.functional.cosine_similarity(h, proj, dim=-1)


def condition_vector(
    llm: _Captures,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    *,
    method: Literal["pca-center", "mean-difference"] = "pca-center",
    model: str | None = None,
) -> SteeringVector:
    """Condition vectors at ``layers`` from texts where the condition holds (``positive``) and where
    it does not, mean-pooled over each text's tokens. ``pca-center`` (IBM's default) pairs
    ``positive[i]`` with ``negative[i]``; ``mean-difference`` takes any two sets.

    Example:
        >>> c = condition_vector(llm, ["Plan my trip to Rome"], ["How do I bake bread?"], [6])
    """
    if method == "pca-center":
        if len(positive) != len(negative):
            raise ValueError(f"pca-center pairs the texts: got {len(positive)} positive and {len(negative)} negative "
                             "(give as many of each, or use mean-difference)")
        vector = pca_vector(llm, positive, negative, layers, mode="center", pooling="mean", model=model)
    elif method == "mean-difference":
        vector = mean_difference(llm, positive, negative, layers, pooling="mean", model=model)
    else:
        raise ValueError(f"method must be 'pca-center' or 'mean-difference', got {method!r}")
    return SteeringVector(vector.layers, hidden_size=vector.hidden_size, model=vector.model,
                          method=f"cast-condition-{method}", provenance=vector.provenance)


def prompt_similarities(llm: _Captures, vector: SteeringVector, prompts: Sequence[str], layers: Sequence[int],
                        pool: Pool = "mean") -> torch.Tensor:
    """Similarity of each prompt at each layer, float64 ``[len(prompts), len(layers)]``, from the
    residuals captured inside the engine (the same states a gate pools)."""
    layers = [int(x) for x in layers]
    missing = [layer for layer in layers if layer not in vector.layers]
    if missing:
        raise ValueError(f"the condition vector has no direction at layers {missing} (it has {sorted(vector.layers)})")
    acts = llm.capture(list(prompts), layers)
    out = torch.empty(len(prompts), len(layers), dtype=torch.float64)
    for i, act in enumerate(acts):
        for j, layer in enumerate(layers):
            h = act[layer].double()
            out[i, j] = cast_similarity(h.mean(dim=0) if pool == "mean" else h[-1], vector.layers[layer])
    return out


@dataclass(frozen=True)
class ConditionPoint:
    """The best threshold and direction at one layer, and how well it separates the prompts."""

    layer: int
    threshold: float
    compare: Compare
    pool: Pool
    f1: float
    precision: float
    recall: float
    margin: float  # distance from the threshold to the nearest similarity

    def when(self, vector: str) -> dict:
        """This point as a spec's ``when`` for the condition vector ``vector`` (a name or sha256)."""
        return {"vector": vector, "layer": self.layer, "threshold": self.threshold, "compare": self.compare,
                "pool": self.pool}


def _scores(hold: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    tp = int((hold & labels).sum())
    fp = int((hold & ~labels).sum())
    fn = int((~hold & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall


def best_threshold(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, Compare, float, float, float, float]:
    """``(threshold, compare, f1, precision, recall, margin)`` maximising F1 for similarities of
    prompts where the condition should hold (``positive``) and where it should not. Ties go to
    the larger margin, then to ``above``."""
    sims = torch.cat([positive.double().flatten(), negative.double().flatten()])
    if sims.numel() == 0:
        raise ValueError("no similarities to search")
    labels = torch.cat([torch.ones(positive.numel(), dtype=torch.bool), torch.zeros(negative.numel(), dtype=torch.bool)])
    values = torch.unique(sims)  # sorted
    candidates = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    best: tuple | None = None
    for t in candidates.tolist():
        margin = float((sims - t).abs().min())
        for compare in ("above", "below"):
            hold = sims > t if compare == "above" else sims < t
            f1, precision, recall = _scores(hold, labels)
            key = (f1, margin, compare == "above")
            if best is None or key > best[0]:
                best = (key, (t, compare, f1, precision, recall, margin))
    return best[1]


def search_condition(llm: _Captures, vector: SteeringVector, positive: Sequence[str], negative: Sequence[str],
                     layers: Sequence[int], pool: Pool = "mean") -> list[ConditionPoint]:
    """The best :class:`ConditionPoint` at each layer for labelled prompts (``positive``: the
    condition should hold); pick the best with ``max(points, key=lambda p: (p.f1, p.margin))``."""
    if not positive or not negative:
        raise ValueError("the search needs prompts where the condition holds and prompts where it does not")
    layers = [int(x) for x in layers]
    sims = prompt_similarities(llm, vector, list(positive) + list(negative), layers, pool)
    n = len(positive)
    points = []
    for j, layer in enumerate(layers):
        t, compare, f1, precision, recall, margin = best_threshold(sims[:n, j], sims[n:, j])
        points.append(ConditionPoint(layer, t, compare, pool, f1, precision, recall, margin))
    return points


def best_point(points: Sequence[ConditionPoint]) -> ConditionPoint:
    """The point with the highest F1 (then the largest margin, then the lowest layer)."""
    return max(points, key=lambda p: (p.f1, p.margin, -p.layer))


def plot_condition_search(points: Sequence[ConditionPoint], path: str | os.PathLike, title: str = "") -> None:
    """F1, precision and recall of each layer's best threshold, the chosen layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [p.layer for p in points]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for field, style in (("f1", "o-"), ("precision", "s--"), ("recall", "^--")):
        ax.plot(layers, [getattr(p, field) for p in points], style, label=field, markersize=4)
    best = best_point(points)
    ax.axvline(best.layer, color="grey", linewidth=0.8)
    ax.annotate(f"layer {best.layer}\n{best.compare} {best.threshold:.4f}", (best.layer, best.f1),
                textcoords="offset points", xytext=(6, -28), fontsize=8)
    ax.set_xticks(layers)
    ax.set_xlabel("condition layer (output of decoder layer)")
    ax.set_ylabel("score on the labelled prompts")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title or "CAST condition point search")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def points_table(points: Sequence[ConditionPoint]) -> list[dict[str, Any]]:
    """The points as plain dicts (for JSON and tables)."""
    return [asdict(p) for p in points]
