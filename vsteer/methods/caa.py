"""Mean-difference (CAA-style) steering vectors from activations captured inside vLLM.

This is what most users mean by "CAA": the mean activation over a set of positive texts minus the
mean over a set of negative texts, at the output of each chosen layer. Each text is pooled to one
vector first, either by the mean over its tokens (``pooling="mean"``) or by its last token
(``pooling="last"``). The paper's A/B-item variant is a separate method.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Protocol, Sequence

import torch

from vsteer.vectors import SteeringVector

Pooling = Literal["mean", "last"]


class _Captures(Protocol):
    def capture(self, prompts: Sequence[str], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]: ...


def _pool(acts: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    return acts.mean(dim=0) if pooling == "mean" else acts[-1]


def _texts_sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def mean_difference(
    llm: _Captures,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: Pooling = "mean",
    model: str | None = None,
) -> SteeringVector:
    """v_L = mean_i pool(h_L(pos_i)) - mean_j pool(h_L(neg_j)) for each layer L.

    Args:
        llm: a ``vsteer.LLM`` (anything with ``capture``).
        positive: texts showing the behaviour.
        negative: texts showing its opposite.
        layers: decoder layers whose OUTPUT is read (and later steered).
        pooling: "mean" over each text's tokens, or its "last" token.
        model: model name recorded in the vector.

    Example:
        >>> v = mean_difference(llm, ["I love you"], ["I hate you"], layers=[10])
    """
    if not positive or not negative:
        raise ValueError("mean_difference needs at least one positive and one negative text")
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    layers = [int(x) for x in layers]
    acts = llm.capture(list(positive) + list(negative), layers)
    pos, neg = acts[: len(positive)], acts[len(positive) :]
    out = {}
    for layer in layers:
        p = torch.stack([_pool(a[layer].double(), pooling) for a in pos]).mean(dim=0)
        n = torch.stack([_pool(a[layer].double(), pooling) for a in neg]).mean(dim=0)
        out[layer] = (p - n).float()
    return SteeringVector.from_tensors(
        out,
        model=model,
        method="caa-mean-difference",
        provenance={
            "pooling": pooling,
            "num_positive": len(positive),
            "num_negative": len(negative),
            "positive_sha256": _texts_sha(positive),
            "negative_sha256": _texts_sha(negative),
            "read_at": "output of decoder layer (HF hidden_states[L+1])",
        },
    )
