"""ActAdd (Turner et al. 2023, "Steering Language Models With Activation Engineering").

A prompt pair (e.g. "Love" / "Hate") is tokenized, the shorter side right-padded with the token
for " " to equal length n, and the residual difference is taken at EVERY position:
``h_A = c * (h+ - h-)``, a per-position vector ``[n, hidden]``. It is added front-aligned to the
first n positions of the prompt being steered, during the prompt pass only; generated tokens feel
it through the KV cache (the reference hook does nothing when seq_len == 1).

Layer convention: the paper reads and steers the INPUT of block l. In vsteer "layer L" is the
OUTPUT of decoder layer L, which is the input of block L + 1; so ActAdd at block l is vsteer layer
l - 1 (the paper's README example, block 6, is vsteer layer 5). Block 0 (the embeddings) is not
supported. The prompt is tokenized as the engine tokenizes it (SmolLM2 adds no BOS; models whose
tokenizer adds one get it at position 0, as TransformerLens does).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from vsteer.vectors import SteeringVector


class _Engine(Protocol):
    def capture(self, prompts: Sequence[Any], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]: ...

    def get_tokenizer(self) -> Any: ...


def pad_pair(tokenizer: Any, positive: str, negative: str) -> tuple[list[int], list[int]]:
    """Token ids of the pair, the shorter right-padded with the token for " " (ActAdd's rule)."""
    pos = tokenizer(positive)["input_ids"]
    neg = tokenizer(negative)["input_ids"]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(space) != 1:
        raise ValueError(f"the tokenizer encodes ' ' as {len(space)} tokens; ActAdd pads with one")
    n = max(len(pos), len(neg))
    return pos + space * (n - len(pos)), neg + space * (n - len(neg))


def actadd_vector(
    llm: _Engine,
    positive: str,
    negative: str,
    layer: int,
    *,
    coefficient: float = 1.0,
    model: str | None = None,
) -> SteeringVector:
    """h_A = coefficient * (h(positive) - h(negative)) at every position, at ``layer``'s output.

    Args:
        llm: a ``vsteer.LLM``.
        positive, negative: the prompt pair (e.g. "Love", "Hate").
        layer: vsteer layer (output of decoder layer L = input of block L + 1).
        coefficient: c; apply with ``scale=1`` (or fold c into the spec's scale instead).

    Returns:
        A per-position vector ``{layer: [n, hidden]}``; add it with ``positions="prompt"`` (the
        default "all" is the same: rows only ever cover prompt positions).

    Example:
        >>> v = actadd_vector(llm, "Love", "Hate", layer=5, coefficient=5.0)
    """
    if not positive or not negative:
        raise ValueError("ActAdd needs a non-empty positive and negative prompt")
    pos_ids, neg_ids = pad_pair(llm.get_tokenizer(), positive, negative)
    acts = llm.capture([pos_ids, neg_ids], [layer])
    diff = (acts[0][layer].double() - acts[1][layer].double()) * coefficient
    return SteeringVector.from_tensors(
        {layer: diff.float()},
        model=model,
        method="actadd",
        provenance={
            "positive": positive,
            "negative": negative,
            "coefficient": coefficient,
            "padding": "right, with the token for ' '",
            "block": layer + 1,
            "positive_ids": pos_ids,
            "negative_ids": neg_ids,
        },
    )
