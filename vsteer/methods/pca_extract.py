"""PCA steering vectors (repeng's ``pca_diff`` / ``pca_center``) from activations captured in vLLM."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from vsteer.methods.caa import Pooling, _Captures, _pool, _texts_sha
from vsteer.methods.pca import pca_direction
from vsteer.vectors import SteeringVector


def pca_vector(
    llm: _Captures,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    *,
    mode: Literal["diff", "center"] = "center",
    pooling: Pooling = "last",
    model: str | None = None,
) -> SteeringVector:
    """First principal component of paired activations, unit norm, sign so positive projects
    positive (see ``pca_direction``). ``positive[i]`` and ``negative[i]`` form pair i.

    Example:
        >>> v = pca_vector(llm, ["I love it"], ["I hate it"], layers=[10])
    """
    if len(positive) != len(negative):
        raise ValueError(f"PCA needs paired texts: got {len(positive)} positive and {len(negative)} negative")
    if not positive:
        raise ValueError("PCA needs at least one pair of texts")
    layers = [int(x) for x in layers]
    acts = llm.capture(list(positive) + list(negative), layers)
    n = len(positive)
    out = {}
    for layer in layers:
        pos = torch.stack([_pool(a[layer].double(), pooling) for a in acts[:n]])
        neg = torch.stack([_pool(a[layer].double(), pooling) for a in acts[n:]])
        out[layer] = pca_direction(pos, neg, mode=mode)
    return SteeringVector.from_tensors(
        out,
        model=model,
        method=f"pca-{mode}",
        provenance={"mode": mode, "pooling": pooling, "num_pairs": n,
                    "positive_sha256": _texts_sha(positive), "negative_sha256": _texts_sha(negative)},
    )
