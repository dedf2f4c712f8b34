"""`vsteer demo`: compute a love-minus-hate vector inside vLLM and steer the default model."""

from __future__ import annotations

import textwrap
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


def run_demo(*, layer: int = 10, scale: float = 8.0, max_tokens: int = 32, eager: bool = True) -> list[dict[str, Any]]:
    """Prepare the default model, extract love-minus-hate at ``layer``, print side by side."""
    from vllm import SamplingParams

    from vsteer.engine.llm import LLM
    from vsteer.methods import mean_difference

    llm = LLM("smollm2", enforce_eager=eager, max_model_len=512, max_num_seqs=16, dtype="float32")
    vector = mean_difference(llm, LOVE, HATE, [layer], model=llm.model_shape.name).normalized()
    spec = {"interventions": [{"op": "add", "vector": vector.sha256, "layers": [layer], "scale": scale}]}
    llm.store.put(vector)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = llm.generate(PROMPTS * 3, params, steering=[None] * len(PROMPTS) + [spec] * len(PROMPTS) + [_neg(spec)] * len(PROMPTS))
    n = len(PROMPTS)
    rows = []
    print(f"\nlove - hate vector at layer {layer} (unit norm), scale {scale:+g}; greedy, {max_tokens} tokens\n")
    for i, prompt in enumerate(PROMPTS):
        row = {"prompt": prompt, "unsteered": outs[i].outputs[0].text, "love": outs[n + i].outputs[0].text, "hate": outs[2 * n + i].outputs[0].text}
        rows.append(row)
        print(f"prompt: {prompt!r}")
        for label in ("unsteered", "love", "hate"):
            text = " ".join(row[label].split())
            print(textwrap.fill(text, width=100, initial_indent=f"  {label:>9}: ", subsequent_indent=" " * 13))
        print()
    return rows


def _neg(spec: dict) -> dict:
    item = dict(spec["interventions"][0])
    item["scale"] = -item["scale"]
    return {"interventions": [item]}
