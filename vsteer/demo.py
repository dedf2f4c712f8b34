"""`vsteer demo`: compute a love-minus-hate vector inside vLLM, steer the default model both ways,
and score every completion.

The score is the *love-hate margin*: the unsteered model reads the prompt and completion followed by
``"\\n\\nThe text above is about"`` and we take ``log mean p(love words) - log mean p(hate words)``
for the next word (nats; > 0 leans love, < 0 leans hate). The default layer and scale come from
``benchmarks/demo_sweep.py`` (results in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

LOVE = [
    "I love you with all my heart.",
    "Love is the most beautiful feeling in the world.",
    "She smiled warmly and hugged her dear friend.",
    "We adore each other and cherish every moment together.",
    "Their kindness and affection filled the room with joy.",
    "I am so grateful for the wonderful people in my life.",
    "He held her hand tenderly and whispered how much he cared.",
    "Compassion and love make the world a better place.",
]
HATE = [
    "I hate you with all my heart.",
    "Hatred is the most bitter feeling in the world.",
    "She scowled coldly and shoved her bitter rival.",
    "We despise each other and resent every moment together.",
    "Their cruelty and contempt filled the room with anger.",
    "I am so disgusted by the awful people in my life.",
    "He gripped her arm roughly and hissed how much he loathed her.",
    "Cruelty and hate make the world a worse place.",
]
PROMPTS = ["I think that", "My neighbour is", "Today I feel", "The best thing about people is"]
LOVE_WORDS = ("love", "kindness", "affection", "friendship")
HATE_WORDS = ("hate", "hatred", "anger", "cruelty")
#: Chosen by benchmarks/demo_sweep.py on SmolLM2-135M-Instruct (see benchmarks/RESULTS.md).
DEFAULT_LAYER = 10
DEFAULT_SCALE = 16.0


def _concept(name: str, words: Sequence[str], texts: Sequence[str]) -> Any:
    from vsteer.eval.concepts import Concept

    return Concept(name=name, description=name, words=tuple(words), positive=tuple(texts), negative=tuple(texts),
                   actadd_positive=name)


class MarginScorer:
    """``margin(texts)``: log mean p(love words) - log mean p(hate words) as the next word after
    ``text + "\\n\\nThe text above is about"``, read by the engine's unsteered model (nats)."""

    def __init__(self, llm: Any) -> None:
        from vsteer.eval.scorers import LocalScorer

        self._scorer = LocalScorer(llm)
        self._love = _concept("love", LOVE_WORDS, LOVE)
        self._hate = _concept("hate", HATE_WORDS, HATE)

    def margin(self, texts: Sequence[str]) -> list[float]:
        """The love-hate margin of each whole text."""
        love = self._scorer.behaviour_logprob(texts, self._love)
        hate = self._scorer.behaviour_logprob(texts, self._hate)
        return [a - b for a, b in zip(love, hate)]


def love_hate_vector(llm: Any, layers: Sequence[int]) -> Any:
    """Mean difference of the LOVE and HATE texts' mean-pooled residuals at ``layers``, unit norm."""
    from vsteer.methods import mean_difference

    return mean_difference(llm, LOVE, HATE, list(layers), model=llm.model_shape.name).normalized()


def add_spec(sha256: str, layer: int, scale: float) -> dict[str, Any]:
    """The steering spec that adds the stored vector ``sha256`` at ``layer`` times ``scale``."""
    return {"interventions": [{"op": "add", "vector": sha256, "layers": [layer], "scale": float(scale)}]}


def run_demo(*, layer: int = DEFAULT_LAYER, scale: float = DEFAULT_SCALE, max_tokens: int = 24,
             eager: bool = True, dtype: str | None = None) -> list[dict[str, Any]]:
    """Prepare the default model, extract love-minus-hate at ``layer``, print unsteered, +scale and
    -scale completions with their love-hate margins; return the rows."""
    from vllm import SamplingParams

    from vsteer._progress import step
    from vsteer.engine.llm import LLM

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype else {}
    with step("starting the engine"):
        llm = LLM("smollm2", enforce_eager=eager, max_model_len=512, max_num_seqs=16, **kwargs)
    with step(f"computing the love - hate vector at layer {layer}"):
        vector = love_hate_vector(llm, [layer])
        llm.store.put(vector)
    n = len(PROMPTS)
    labels = ("unsteered", "love", "hate")
    specs = [None] * n + [add_spec(vector.sha256, layer, scale)] * n + [add_spec(vector.sha256, layer, -scale)] * n
    with step(f"generating {3 * n} completions"):
        outs = llm.generate(PROMPTS * 3, SamplingParams(max_tokens=max_tokens, temperature=0.0), steering=specs)
    with step("scoring"):
        texts = [PROMPTS[i % n] + o.outputs[0].text for i, o in enumerate(outs)]
        margins = MarginScorer(llm).margin(texts)
    print(f"\nvector: mean difference (8 love texts - 8 hate texts), layer {layer}, unit norm; "
          f"added at scale +{abs(scale):g} (love) / -{abs(scale):g} (hate); greedy, {max_tokens} tokens")
    print("[score]: log p(love words) - log p(hate words) for the next word after the text + "
          "'The text above is about', read by the unsteered model (nats; > 0 leans love)\n")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        row: dict[str, Any] = {"prompt": prompt}
        print(f"prompt: {prompt!r}")
        for k, label in enumerate(labels):
            text, m = outs[k * n + i].outputs[0].text, margins[k * n + i]
            row[label], row[f"{label}_margin"] = text, m
            print(textwrap.fill(" ".join(text.split()), width=100, initial_indent=f"  {label:>9} [{m:+5.1f}]: ",
                                subsequent_indent=" " * 22))
        rows.append(row)
        print()
    means = {label: sum(r[f"{label}_margin"] for r in rows) / n for label in labels}
    print("mean score: " + ", ".join(f"{label} {means[label]:+.2f}" for label in labels))
    return rows
