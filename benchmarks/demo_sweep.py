"""Pick the `vsteer demo` layer and scale from a measurement on the default model.

For each layer, the demo's love - hate vector (unit norm) is added at +scale and -scale to a few
prompts (greedy); each completion gets the demo's love-hate margin (nats, read by the unsteered
model) and the local scorer's coherence (unsteered perplexity against the model's own samples,
times the distinct-3-gram fraction; 1 = like unsteered text, 0 = like shuffled words). A setting
is usable when the mean coherence of both directions stays >= --min-coherence; among usable ones
the demo takes the largest min(love shift, hate shift) of the margin against unsteered.

    python benchmarks/demo_sweep.py --layers 4,6,8,10,12,15,18 --scales 4,8,12,16 --tokens 24
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,6,8,10,12,15,18")
    ap.add_argument("--scales", default="4,8,12,16")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--dtype", default=None, help="engine dtype (default: vsteer's CPU default)")
    ap.add_argument("--min-coherence", type=float, default=0.5)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    scales = [float(x) for x in args.scales.split(",")]

    from vllm import SamplingParams

    import vsteer
    from vsteer.demo import PROMPTS, MarginScorer, add_spec, love_hate_vector, _concept, LOVE, LOVE_WORDS
    from vsteer.eval.scorers import ScoreItem

    t0 = time.monotonic()
    kw = {"dtype": args.dtype} if args.dtype else {}
    llm = vsteer.LLM("smollm2", enforce_eager=True, max_model_len=512, max_num_seqs=64, **kw)
    dtype = str(llm.engine.llm_engine.model_config.dtype).replace("torch.", "")
    vec = love_hate_vector(llm, layers)
    llm.store.put(vec)
    settings = [(None, 0.0)] + [(L, s * sign) for L in layers for s in scales for sign in (1, -1)]
    prompts, specs = [], []
    for L, s in settings:
        for p in PROMPTS:
            prompts.append(p)
            specs.append(None if L is None else add_spec(vec.sha256, L, s))
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0), steering=specs, use_tqdm=False)
    texts = [p + o.outputs[0].text for p, o in zip(prompts, outs)]
    margins = MarginScorer(llm).margin(texts)
    from vsteer.eval.scorers import LocalScorer

    scorer = LocalScorer(llm)
    love = _concept("love", LOVE_WORDS, LOVE)
    scores = scorer.score([ScoreItem(p, o.outputs[0].text, love, tuple(o.prompt_token_ids), tuple(o.outputs[0].token_ids))
                           for p, o in zip(prompts, outs)])
    n = len(PROMPTS)

    def mean(xs):
        return sum(xs) / len(xs)

    by = {}
    for k, (L, s) in enumerate(settings):
        sl = slice(k * n, (k + 1) * n)
        by[(L, s)] = (mean(margins[sl]), mean([sc.coherence for sc in scores[sl]]))
    base_m, base_c = by[(None, 0.0)]
    print(f"dtype {dtype}, eager, greedy, {n} prompts x {args.tokens} tokens, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '?')}, {cpu_description()}; "
          f"{time.monotonic() - t0:.0f} s")
    print(f"unsteered: margin {base_m:+.2f} nats, coherence {base_c:.2f}\n")
    print("| layer | scale | margin +s | margin -s | love shift | hate shift | coherence +s | coherence -s | usable |")
    print("|---|---|---|---|---|---|---|---|---|")
    best, best_key = None, None
    for L in layers:
        for s in scales:
            mp, cp = by[(L, s)]
            mn, cn = by[(L, -s)]
            up, down = mp - base_m, base_m - mn
            ok = min(cp, cn) >= args.min_coherence
            if ok and (best is None or min(up, down) > best):
                best, best_key = min(up, down), (L, s)
            print(f"| {L} | {s:g} | {mp:+.2f} | {mn:+.2f} | {up:+.2f} | {down:+.2f} | {cp:.2f} | {cn:.2f} | "
                  f"{'yes' if ok else 'no'} |")
    if best_key:
        print(f"\nchosen: layer {best_key[0]}, scale {best_key[1]:g} (min shift {best:+.2f} nats, coherence >= "
              f"{args.min_coherence})")
    else:
        print("\nno setting keeps coherence above the threshold")


if __name__ == "__main__":
    main()
