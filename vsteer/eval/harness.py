"""The steering-quality harness (SAE-TS evaluation protocol, METHODS.md).

For every (concept, method, scale) cell: generate ``n`` completions of a neutral prompt ("I
think") with that steering, score each for behaviour and coherence (0..1), and take
``mean(behaviour) * mean(coherence)``; per (concept, method) report the maximum over scales.

All cells go to the engine together, in large batched ``generate`` calls where every request
carries its own steering spec. Identical requests (the unsteered scale-0 cells of every concept
and method, same seeds) are generated once, and each distinct (text, concept) is scored once.
Sample ``i`` of every cell uses seed ``seed * 100_000 + i`` (common random numbers across cells).

Outputs in ``out_dir``:
    results.jsonl   one line per finished cell (all samples, texts, scores, spec, scorer)
    summary.json    per-cell means, the best scale per (concept, method), per-method means
    scorer_reference.json   the scorer's coherence anchors from the unsteered samples (local scorer)
    results.md      markdown tables
    quality.png     behaviour, coherence and their product against scale (matplotlib, optional)
    best.png        the best product per concept and method

Resumable: a cell whose record in results.jsonl has the same fingerprint (prompt, n, tokens,
seed, sampling, scorer, method settings, concept data) is not run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vsteer.eval.concepts import Concept, load_concepts
from vsteer.eval.methods import SteeringMethod, get_method
from vsteer.eval.scorers import Score, ScoreItem, Scorer

DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 0.3, "top_k": 50}
RESULTS_FILE = "results.jsonl"
REFERENCE_FILE = "scorer_reference.json"
SEED_STRIDE = 100_000


@dataclass(frozen=True)
class Cell:
    """One point of the sweep."""

    concept: str
    method: str
    scale: float


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _scales_for(method: SteeringMethod, scales: Sequence[float] | Mapping[str, Sequence[float]] | None) -> list[float]:
    if scales is None:
        chosen = method.default_scales
    elif isinstance(scales, Mapping):
        chosen = scales.get(method.name, scales.get("*", method.default_scales))
    else:
        chosen = scales
    out = sorted({float(s) for s in chosen})
    if not out:
        raise ValueError(f"no scales for method {method.name!r}")
    return out


def load_records(out_dir: str | Path) -> list[dict]:
    """Cell records of ``results.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_eval(
    llm: Any,
    concepts: Sequence[str | Concept],
    methods: Sequence[str | SteeringMethod],
    scales: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    *,
    prompt: str = "I think",
    n: int = 16,
    max_tokens: int = 30,
    seed: int = 0,
    scorer: Scorer,
    out_dir: str | Path,
    sampling: Mapping[str, Any] | None = None,
    chunk_requests: int = 512,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run the sweep, write the outputs to ``out_dir`` and return the summary.

    Args:
        llm: a ``vsteer.LLM``.
        concepts: concept names (see ``vsteer.eval.concepts``) or ``Concept`` objects.
        methods: method names (``vsteer.eval.methods.available_methods()``) or instances.
        scales: one sweep for every method, a mapping method -> sweep (key ``"*"``: the sweep of
            methods not named), or None for each method's ``default_scales``. Scale 0 is the
            unsteered model.
        prompt, n, max_tokens, seed: the protocol (SAE-TS: "I think", 256 samples, 30 tokens).
        scorer: ``LocalScorer`` or ``JudgeScorer`` (anything with ``describe`` and ``score``).
        sampling: ``SamplingParams`` keywords (default: temperature 1, top_p 0.3, top_k 50).
        chunk_requests: about this many requests per ``generate`` call (results are written
            after each chunk, which is the resume granularity).
    """
    from vllm import SamplingParams

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    concept_objs = [c if isinstance(c, Concept) else load_concepts([c])[0] for c in concepts]
    method_objs = [get_method(m) for m in methods]
    if n < 1 or max_tokens < 1:
        raise ValueError("n and max_tokens must be >= 1")
    sampling = dict(DEFAULT_SAMPLING if sampling is None else sampling)
    scorer_info = scorer.describe()
    base = {"prompt": prompt, "n": n, "max_tokens": max_tokens, "seed": seed, "sampling": sampling, "scorer": scorer_info}
    sweeps = {m.name: _scales_for(m, scales) for m in method_objs}

    def fingerprint(c: Concept, m: SteeringMethod) -> str:
        return _digest({**base, "method": m.describe(), "concept": asdict(c)})

    cells: list[tuple[Cell, Concept, SteeringMethod, str]] = []
    for c in concept_objs:
        for m in method_objs:
            fp = fingerprint(c, m)
            cells += [(Cell(c.name, m.name, s), c, m, fp) for s in sweeps[m.name]]
    done = {(r["concept"], r["method"], float(r["scale"]), r["fingerprint"]) for r in load_records(out)}
    pending = [x for x in cells if (x[0].concept, x[0].method, x[0].scale, x[3]) not in done]
    pending.sort(key=lambda x: (x[0].scale != 0.0,))  # unsteered cells first: one shared batch

    if pending and hasattr(scorer, "check"):
        scorer.check()  # an unreachable judge fails before any generation
    prepared: dict[tuple[str, str], Any] = {}
    texts: dict[tuple[str, int], Any] = {}  # (spec json, seed) -> (prompt ids, CompletionOutput)
    if pending and hasattr(scorer, "set_reference"):
        # the unsteered samples (shared by every scale-0 cell) are the scorer's coherence reference
        plain = [("null", seed * SEED_STRIDE + k) for k in range(n)]
        outs = llm.generate([prompt] * n, [SamplingParams(max_tokens=max_tokens, seed=s, **sampling) for _, s in plain])
        for key, o in zip(plain, outs):
            texts[key] = (tuple(o.prompt_token_ids), o.outputs[0])
        ref = scorer.set_reference(prompt, [(texts[k][0], texts[k][1].token_ids) for k in plain])
        (out / REFERENCE_FILE).write_text(json.dumps({"prompt": prompt, **(ref or {})}))
    bar = _progress(len(pending), progress)
    with (out / RESULTS_FILE).open("a") as fh:
        i = 0
        while i < len(pending):
            group = []
            while i < len(pending) and (not group or len(group) * n < chunk_requests):
                group.append(pending[i])
                i += 1
            specs = []
            for cell, c, m, _ in group:
                if cell.scale == 0.0:
                    specs.append(None)
                    continue
                if (m.name, c.name) not in prepared:
                    prepared[(m.name, c.name)] = m.prepare(llm, c)
                specs.append(m.spec(prepared[(m.name, c.name)], cell.scale))
            keys = [[(json.dumps(spec, sort_keys=True), seed * SEED_STRIDE + k) for k in range(n)] for spec in specs]
            todo = list(dict.fromkeys(key for ks, spec in zip(keys, specs) for key in ks if key not in texts))
            spec_of = {json.dumps(s, sort_keys=True): s for s in specs}
            if todo:
                params = [SamplingParams(max_tokens=max_tokens, seed=s, **sampling) for _, s in todo]
                outs = llm.generate([prompt] * len(todo), params, steering=[spec_of[k] for k, _ in todo])
                for key, o in zip(todo, outs):
                    texts[key] = (tuple(o.prompt_token_ids), o.outputs[0])
            # score each distinct (text, concept) once
            items: dict[tuple, ScoreItem] = {}
            for (cell, c, _, _), ks in zip(group, keys):
                for key in ks:
                    p_ids, comp = texts[key]
                    ik = (p_ids, tuple(comp.token_ids), c.name)
                    if ik not in items:
                        items[ik] = ScoreItem(prompt, comp.text, c, p_ids, tuple(comp.token_ids))
            scores: dict[tuple, Score] = dict(zip(items, scorer.score(list(items.values()))))
            for (cell, c, m, fp), spec, ks in zip(group, specs, keys):
                samples = []
                for k, key in enumerate(ks):
                    p_ids, comp = texts[key]
                    sc = scores[(p_ids, tuple(comp.token_ids), c.name)]
                    samples.append({"sample": k, "seed": key[1], "completion": comp.text,
                                    "finish_reason": comp.finish_reason, "behaviour": sc.behaviour,
                                    "coherence": sc.coherence, "details": sc.details})
                b = _mean([s["behaviour"] for s in samples])
                co = _mean([s["coherence"] for s in samples])
                record = {"concept": cell.concept, "method": cell.method, "scale": cell.scale, "fingerprint": fp,
                          "behaviour": b, "coherence": co, "product": None if b is None or co is None else b * co,
                          "n_scored": sum(s["behaviour"] is not None and s["coherence"] is not None for s in samples),
                          "spec": spec, "method_settings": m.describe(), "scorer": scorer_info, "prompt": prompt,
                          "max_tokens": max_tokens, "sampling": sampling, "samples": samples}
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            bar.update(len(group))
    bar.close()
    return summarize(out, cells=[(x[0], x[3]) for x in cells], base=base, methods=method_objs, plots=plots)


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        class _Null:
            def update(self, k: int) -> None: ...

            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc="eval cells", unit="cell")


def summarize(out: Path, *, cells: Sequence[tuple[Cell, str]], base: dict, methods: Sequence[SteeringMethod],
              plots: bool = True) -> dict[str, Any]:
    """Per-cell means, best scale per (concept, method), per-method means; writes summary.json,
    results.md and the plots."""
    latest: dict[tuple, dict] = {}
    for r in load_records(out):
        latest[(r["concept"], r["method"], float(r["scale"]), r["fingerprint"])] = r
    rows = []
    for cell, fp in cells:
        r = latest[(cell.concept, cell.method, cell.scale, fp)]
        rows.append({"concept": cell.concept, "method": cell.method, "scale": cell.scale, "behaviour": r["behaviour"],
                     "coherence": r["coherence"], "product": r["product"], "n_scored": r["n_scored"]})
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    method_names = list(dict.fromkeys(r["method"] for r in rows))
    best = []
    for c in concepts:
        for m in method_names:
            mine = [r for r in rows if r["concept"] == c and r["method"] == m and r["product"] is not None]
            if mine:
                b = max(mine, key=lambda r: (r["product"], -r["scale"]))
                best.append({"concept": c, "method": m, "scale": b["scale"], "product": b["product"],
                             "behaviour": b["behaviour"], "coherence": b["coherence"]})
    per_method = {m: _mean([b["product"] for b in best if b["method"] == m]) for m in method_names}
    unsteered = {c: _mean([r["behaviour"] for r in rows if r["concept"] == c and r["scale"] == 0.0]) for c in concepts}
    summary = {"protocol": "SAE-TS: max over scales of mean(behaviour) * mean(coherence)", **base,
               "methods": {m.name: m.describe() for m in methods}, "concepts": concepts,
               "cells": rows, "best": best, "per_method_mean_best": per_method,
               "unsteered_behaviour": unsteered, "plots": []}
    if (out / REFERENCE_FILE).exists():
        summary["scorer_reference"] = json.loads((out / REFERENCE_FILE).read_text())
    if plots:
        summary["plots"] = write_plots(out, rows, best, concepts, method_names, base["scorer"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text("\n".join(markdown_tables(summary)) + "\n")
    return summary


def scorer_label(info: Mapping[str, Any]) -> str:
    """One line naming the scorer that produced the numbers."""
    if info.get("name") == "judge":
        return f"judge {info.get('model')} at {info.get('url')} (prompts {info.get('version')})"
    return f"{info.get('name')} scorer {info.get('version')} (model {info.get('model')})"


def markdown_tables(summary: Mapping[str, Any]) -> list[str]:
    """Markdown: the best product per concept and method, then behaviour/coherence at that scale."""
    concepts, best = summary["concepts"], summary["best"]
    methods = list(summary["per_method_mean_best"])
    by = {(b["concept"], b["method"]): b for b in best}

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    head = (f"Scorer: {scorer_label(summary['scorer'])}. Prompt {summary['prompt']!r}, {summary['n']} samples x "
            f"{summary['max_tokens']} tokens per cell, sampling {json.dumps(summary['sampling'])}, seed {summary['seed']}.")
    lines = [head,
             "",
             "Max over scales of mean(behaviour) x mean(coherence) (scale of the max in parentheses):",
             "",
             "| concept | " + " | ".join(methods) + " | unsteered behaviour |",
             "|---|" + "---:|" * (len(methods) + 1)]
    for c in concepts:
        cells = [f"{fmt(by[(c, m)]['product'])} ({by[(c, m)]['scale']:g})" if (c, m) in by else "-" for m in methods]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {fmt(summary['unsteered_behaviour'].get(c))} |")
    lines.append("| **mean** | " + " | ".join(fmt(summary["per_method_mean_best"][m]) for m in methods) + " | |")
    lines += ["", "Behaviour / coherence at the best scale:", "",
              "| concept | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for c in concepts:
        cells = [f"{fmt(by[(c, m)]['behaviour'])} / {fmt(by[(c, m)]['coherence'])}" if (c, m) in by else "-"
                 for m in methods]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    settings = summary.get("methods", {})
    if settings:
        lines += ["", "Methods: " + "; ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())]
    return lines


def write_plots(out: Path, rows: Sequence[dict], best: Sequence[dict], concepts: Sequence[str],
                methods: Sequence[str], scorer: Mapping[str, Any]) -> list[str]:
    """quality.png (per concept x method: behaviour, coherence, product against scale) and best.png."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = scorer_label(scorer)
    fig, axes = plt.subplots(len(concepts), len(methods), figsize=(3.2 * len(methods), 2.4 * len(concepts)),
                             squeeze=False, sharey=True)
    for i, c in enumerate(concepts):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            mine = sorted((r for r in rows if r["concept"] == c and r["method"] == m), key=lambda r: r["scale"])
            xs = [r["scale"] for r in mine]
            for key, style in (("behaviour", "o-"), ("coherence", "s--"), ("product", "^-")):
                ax.plot(xs, [r[key] if r[key] is not None else float("nan") for r in mine], style, label=key, ms=3)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(m)
            if j == 0:
                ax.set_ylabel(c)
            if i == len(concepts) - 1:
                ax.set_xlabel("scale")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"steering quality ({label})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(concepts) * max(1, len(methods)) * 0.5), 3.6))
    width = 0.8 / max(1, len(methods))
    by = {(b["concept"], b["method"]): b["product"] for b in best}
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(concepts))], [by.get((c, m)) or 0.0 for c in concepts], width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(concepts))], concepts)
    ax.set_ylabel("max over scales of beh x coh")
    ax.set_title(f"best steering quality per concept ({label})", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "best.png", dpi=110)
    plt.close(fig)
    return ["quality.png", "best.png"]
