"""Bootstrap intervals for the steering-quality metric (max over scales of mean(behaviour) x
mean(coherence)) and for differences between methods.

Sample i of every cell shares its sampling seed (``vsteer.eval.harness``), so resampling draws the
same sample indices in every cell of a concept: differences between methods are paired, and the
maximum over scales is taken again in every resample. Concepts are resampled independently; the
mean over concepts is the per-method headline.

The maximum over scales of noisy means is biased upwards (the scale that won is partly the one
whose samples were lucky). ``split`` scores that away: the best scale is chosen on the even
samples and the metric is read on the odd ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _cells(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[float, tuple[np.ndarray, np.ndarray]]]:
    """(concept, method) -> scale -> (behaviour [n], coherence [n]), NaN where unscored; the latest
    record of a cell wins."""
    out: dict[tuple[str, str], dict[float, tuple[np.ndarray, np.ndarray]]] = {}
    for r in records:
        samples = sorted(r["samples"], key=lambda s: s["sample"])
        b = np.array([np.nan if s["behaviour"] is None else s["behaviour"] for s in samples], dtype=np.float64)
        c = np.array([np.nan if s["coherence"] is None else s["coherence"] for s in samples], dtype=np.float64)
        out.setdefault((r["concept"], r["method"]), {})[float(r["scale"])] = (b, c)
    return out


def _products(cells: Mapping[float, tuple[np.ndarray, np.ndarray]], idx: np.ndarray) -> np.ndarray:
    """mean(b) * mean(c) per resample (rows of ``idx``) and scale: ``[reps, scales]``."""
    cols = []
    for scale in sorted(cells):
        b, c = cells[scale]
        cols.append(np.nanmean(b[idx], axis=-1) * np.nanmean(c[idx], axis=-1))
    return np.stack(cols, axis=-1)


def quality_intervals(
    records: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str] | None = None,
    baseline: str | None = None,
    reps: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Point values and percentile-bootstrap intervals of the metric per (concept, method), of its
    mean over concepts per method, and of every method's difference from ``baseline`` (default: the
    first method); for ``max`` (the protocol's maximum over scales, all samples) and ``split``
    (scale chosen on even samples, metric on odd ones)."""
    cells = _cells(records)
    concepts = list(dict.fromkeys(c for c, _ in cells))
    methods = list(methods or dict.fromkeys(m for _, m in cells))
    baseline = baseline or methods[0]
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    point: dict[str, dict[tuple[str, str], float]] = {"max": {}, "split": {}}
    draws: dict[str, dict[tuple[str, str], np.ndarray]] = {"max": {}, "split": {}}
    for concept in concepts:
        mine = {m: cells[(concept, m)] for m in methods if (concept, m) in cells}
        n = min(len(b) for cell in mine.values() for b, _ in cell.values())
        if n < 2:
            raise ValueError(f"{concept}: intervals need at least 2 samples per cell, got {n}")
        idx = rng.integers(0, n, size=(reps, n))
        even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
        odd_idx = odd[rng.integers(0, len(odd), size=(reps, len(odd)))]
        for m, cell in mine.items():
            trimmed = {s: (b[:n], c[:n]) for s, (b, c) in cell.items()}
            point["max"][(concept, m)] = float(_products(trimmed, np.arange(n)[None]).max())
            draws["max"][(concept, m)] = _products(trimmed, idx).max(axis=1)
            best = int(_products(trimmed, even[None])[0].argmax())
            point["split"][(concept, m)] = float(_products(trimmed, odd[None])[0, best])
            draws["split"][(concept, m)] = _products(trimmed, odd_idx)[:, best]

    def interval(x: np.ndarray) -> list[float]:
        return [float(np.quantile(x, lo_q)), float(np.quantile(x, hi_q))]

    out: dict[str, Any] = {"level": level, "reps": reps, "baseline": baseline, "concepts": concepts, "methods": methods}
    for kind in ("max", "split"):
        per_cell = [{"concept": c, "method": m, "value": point[kind][(c, m)], "interval": interval(draws[kind][(c, m)])}
                    for c in concepts for m in methods if (c, m) in point[kind]]
        full = [m for m in methods if all((c, m) in point[kind] for c in concepts)]
        means = {m: {"value": float(np.mean([point[kind][(c, m)] for c in concepts])),
                     "interval": interval(np.mean([draws[kind][(c, m)] for c in concepts], axis=0))} for m in full}
        diffs = {}
        if baseline in full:
            for m in full:
                if m == baseline:
                    continue
                d = np.mean([draws[kind][(c, m)] - draws[kind][(c, baseline)] for c in concepts], axis=0)
                per = {c: {"value": point[kind][(c, m)] - point[kind][(c, baseline)],
                           "interval": interval(draws[kind][(c, m)] - draws[kind][(c, baseline)])} for c in concepts}
                diffs[m] = {"value": means[m]["value"] - means[baseline]["value"], "interval": interval(d),
                            "per_concept": per}
        out[kind] = {"cells": per_cell, "mean": means, "minus_baseline": diffs}
    return out


def interval_tables(result: Mapping[str, Any]) -> list[str]:
    """Markdown tables of :func:`quality_intervals`: per concept and method, the mean, and the
    differences from the baseline method, each as value [low, high]."""
    pct = round(100 * result["level"])

    def fmt(x: Mapping[str, Any]) -> str:
        return f"{x['value']:.3f} [{x['interval'][0]:.3f}, {x['interval'][1]:.3f}]"

    lines: list[str] = []
    methods, concepts, base = result["methods"], result["concepts"], result["baseline"]
    for kind, what in (("max", "max over scales, all samples (the protocol's metric)"),
                       ("split", "scale chosen on the even samples, metric on the odd ones")):
        part = result[kind]
        by = {(c["concept"], c["method"]): c for c in part["cells"]}
        lines += [f"Behaviour x coherence, {what}, with {pct}% bootstrap intervals ({result['reps']} resamples):", "",
                  "| concept | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for c in concepts:
            lines.append(f"| {c} | " + " | ".join(fmt(by[(c, m)]) if (c, m) in by else "-" for m in methods) + " |")
        lines.append("| **mean** | " + " | ".join(fmt(part["mean"][m]) if m in part["mean"] else "-" for m in methods) + " |")
        others = [m for m in methods if m in part["minus_baseline"]]
        if others:
            lines += ["", f"Difference from {base} ({what}; paired by sample seed):", "",
                      "| concept | " + " | ".join(f"{m} - {base}" for m in others) + " |", "|---|" + "---:|" * len(others)]
            for c in concepts:
                lines.append(f"| {c} | " + " | ".join(fmt(part["minus_baseline"][m]["per_concept"][c]) for m in others) + " |")
            lines.append("| **mean** | " + " | ".join(fmt(part["minus_baseline"][m]) for m in others) + " |")
        lines.append("")
    return lines
