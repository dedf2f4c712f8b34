"""Effect of each vector method on the default model: does "love minus hate" move sentiment?

Metric, per prompt: mean next-token log-probability of positive words minus that of negative words
(first token of each word), read from vLLM with ``allowed_token_ids`` = the word tokens and
``logprobs_mode="processed_logprobs"``; differences of log-probabilities over the same allowed set
equal differences of logits, so the metric is the logit margin of positive over negative words.
Averaged over a small set of neutral prompts, for scale multipliers -1, 0, +1 of each method.

Run:  python benchmarks/method_effects.py   (CPU, ~2 min; writes results/method-effects.{json,png}
and the "Vector methods" section of benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = ["I think that", "My neighbour is", "Today I feel", "The best thing about people is",
           "When I see my family, I feel", "The new restaurant downtown is", "Honestly, my coworkers are",
           "Looking at the sky tonight, I"]
POSITIVE = [" love", " happy", " wonderful", " great", " kind", " beautiful", " joy", " good"]
NEGATIVE = [" hate", " angry", " terrible", " awful", " cruel", " sad", " bad", " horrible"]
LOVE = ["I love you with all my heart.", "Love is the most beautiful feeling in the world.",
        "She smiled warmly and hugged her dear friend.", "We adore each other and cherish every moment."]
HATE = ["I hate you with all my heart.", "Hatred is the most bitter feeling in the world.",
        "She scowled coldly and shoved her bitter rival.", "We despise each other and resent every moment."]
AB_ITEMS = [
    ("How do you feel about your neighbours?\n(A) I love them dearly\n(B) I hate them", "A"),
    ("Someone gives you a gift. You feel\n(A) resentful and annoyed\n(B) grateful and happy", "B"),
    ("Describe people in one word.\n(A) Wonderful\n(B) Awful", "A"),
    ("What do you think of the world?\n(A) It is cruel and ugly\n(B) It is kind and beautiful", "B"),
    ("Your friend calls you. You\n(A) smile with joy\n(B) groan with contempt", "A"),
    ("How was your day?\n(A) Terrible, I am furious\n(B) Lovely, I am delighted", "B"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
                       "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": tempfile.mkdtemp()}.items():
        os.environ.setdefault(key, value)

    import torch
    from vllm import SamplingParams

    from vsteer.engine.llm import LLM
    from vsteer.methods import ABItem, actadd_vector, caa_vector, pca_vector

    store = tempfile.mkdtemp(prefix="vsteer-effects-store-")
    llm = LLM("smollm2", enforce_eager=True, dtype=args.dtype, max_model_len=512, max_num_seqs=64,
              store=store, logprobs_mode="processed_logprobs", max_logprobs=len(POSITIVE) + len(NEGATIVE))
    tok = llm.get_tokenizer()
    pos_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in POSITIVE]
    neg_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in NEGATIVE]
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0, allowed_token_ids=pos_ids + neg_ids,
                            logprobs=len(pos_ids) + len(neg_ids))

    name = llm.model_shape.name
    actadd = actadd_vector(llm, "Love", "Hate", 5, coefficient=1.0, model=name)  # the paper's example
    actadd_pair = actadd_vector(llm, "I love you", "I hate you", 8, coefficient=1.0, model=name)
    caa = caa_vector(llm, [ABItem(q, m, "B" if m == "A" else "A") for q, m in AB_ITEMS], [10], model=name).normalized()
    pca = pca_vector(llm, LOVE, HATE, [10], mode="center", model=name)
    for v in (actadd, actadd_pair, caa, pca):
        llm.store.put(v)
    methods = {
        # method: (spec for multiplier s, base scale, expected direction of the margin as s rises)
        "ActAdd (Love - Hate, layer 5 = block 6)": (lambda s: {"op": "add", "vector": actadd.sha256, "scale": 5.0 * s}, "c = 5", +1),
        "ActAdd (I love you - I hate you, layer 8 = block 9)": (
            lambda s: {"op": "add", "vector": actadd_pair.sha256, "scale": 5.0 * s}, "c = 5", +1),
        "CAA (A/B items, layer 10)": (lambda s: {"op": "add", "vector": caa.sha256, "scale": 8.0 * s,
                                                "positions": "from_last_prompt_token"}, "unit vector x 8", +1),
        "PCA center (layer 10)": (lambda s: {"op": "add", "vector": pca.sha256, "scale": 8.0 * s}, "unit vector x 8", +1),
        "SARA (attract love, repel hate, layer 12)": (lambda s: {"op": "sara", "attract": " ".join(LOVE), "repel": " ".join(HATE),
                                                             "layers": [12], "scale": 1.0 * s}, "c = 1", +1),
        "SARA (attract hate, repel love, layer 12)": (lambda s: {"op": "sara", "attract": " ".join(HATE), "repel": " ".join(LOVE),
                                                             "layers": [12], "scale": 1.0 * s}, "c = 1", -1),
    }
    multipliers = [-1.0, 0.0, 1.0]
    jobs = [(m, s, p) for m in methods for s in multipliers for p in PROMPTS]
    specs = [None if s == 0 else {"interventions": [methods[m][0](s)]} for m, s, _ in jobs]
    outs = llm.generate([p for _, _, p in jobs], params, steering=specs)
    margins: dict[str, dict[float, list[float]]] = {m: {s: [] for s in multipliers} for m in methods}
    for (m, s, _), out in zip(jobs, outs):
        lp = out.outputs[0].logprobs[0]
        pos = torch.tensor([lp[t].logprob for t in pos_ids]).mean()
        neg = torch.tensor([lp[t].logprob for t in neg_ids]).mean()
        margins[m][s].append(float(pos - neg))

    rows = []
    for m in methods:
        means = [sum(margins[m][s]) / len(PROMPTS) for s in multipliers]
        expected = methods[m][2]
        ok = all(expected * (b - a) > 0 for a, b in zip(means, means[1:]))
        rows.append({"method": m, "base": methods[m][1], "margin": dict(zip(map(str, multipliers), means)),
                     "expected": "rising" if expected > 0 else "falling", "monotone_as_expected": ok,
                     "per_prompt": {str(s): margins[m][s] for s in multipliers}})
        print(f"{m:55s} " + "  ".join(f"{x:+.3f}" for x in means) + ("  as expected" if ok else "  NOT monotone as expected"))

    machine = f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads, {args.dtype}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, multipliers, args.out_dir / "method-effects.png")
    lines = ["Mean over 8 neutral prompts of the next-token log-probability margin of 8 positive over 8 "
             "negative words (see the script's docstring). Plot: `results/method-effects.png`.", "",
             "| method | base scale | x -1 | x 0 | x +1 | expected | monotone as expected? |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["margin"]
        lines.append(f"| {r['method']} | {r['base']} | {m['-1.0']:+.3f} | {m['0.0']:+.3f} | {m['1.0']:+.3f} | "
                     f"{r['expected']} | {'yes' if r['monotone_as_expected'] else 'no'} |")
    publish("## Vector methods: effect on the default model", args.out_dir / "method-effects.json",
            {"prompts": PROMPTS, "positive": POSITIVE, "negative": NEGATIVE, "results": rows}, lines, machine=machine)


def _plot(rows: list[dict], multipliers: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(multipliers, [r["margin"][str(s)] for s in multipliers], marker="o", label=r["method"])
    ax.set_xlabel("scale multiplier")
    ax.set_ylabel("log p(positive words) - log p(negative words)")
    ax.set_title("love-minus-hate steering on SmolLM2-135M (vsteer in vLLM)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
