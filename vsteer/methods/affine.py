"""Low-rank affine interventions ``h' = h + (h A^T) B + b`` as vector files for the ``affine`` op.

An affine file is an ordinary vsteer vector file whose tensor at each layer stacks ``A [r, d]``,
``B [r, d]`` and ``b [d]`` into ``[2r + 1, d]`` (method ``"affine"``, ``provenance["rank"] = r``).
It covers directional ablation (``A = u``, ``B = -u``, ``b = 0`` for a unit ``u``),
learned low-rank edits and LoReFT (Wu et al. 2024): ``h + R^T (W h + b - R h)`` is
``A = W - R``, ``B = R``, ``b = R^T b``. pyreft's own checkpoint layout is not a documented
format, so its tensors are taken as arguments here rather than read from its files.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vsteer.engine.plan import split_affine  # the engine reads the layout this module writes
from vsteer.vectors import SteeringVector

__all__ = ["affine_vector", "loreft_vector", "split_affine"]


def affine_vector(
    layers: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    model: str | None = None,
    provenance: Mapping | None = None,
) -> SteeringVector:
    """An affine file from ``{layer: (A [r, d], B [r, d], b [d])}`` (the same r at every layer)."""
    tensors, ranks = {}, set()
    for layer, (A, B, b) in layers.items():
        A, B, b = (torch.as_tensor(x, dtype=torch.float32) for x in (A, B, b))
        if A.ndim != 2 or A.shape != B.shape or b.shape != (A.shape[1],):
            raise ValueError(f"layer {layer}: need A [r, d], B [r, d], b [d]; got {list(A.shape)}, "
                             f"{list(B.shape)}, {list(b.shape)}")
        if A.shape[0] < 1:
            raise ValueError(f"layer {layer}: rank must be at least 1")
        ranks.add(A.shape[0])
        tensors[int(layer)] = torch.cat([A, B, b[None]])
    if len(ranks) != 1:
        raise ValueError(f"every layer needs the same rank, got {sorted(ranks)}")
    return SteeringVector.from_tensors(tensors, model=model, method="affine",
                                       provenance={"rank": ranks.pop(), **(provenance or {})})


def loreft_vector(layer: int, R: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, *,
                  model: str | None = None) -> SteeringVector:
    """LoReFT ``h + R^T (W h + bias - R h)`` with ``R, W [r, d]`` and ``bias [r]`` as an affine file."""
    R, W, bias = (torch.as_tensor(x, dtype=torch.float64) for x in (R, W, bias))
    return affine_vector({layer: (W - R, R, R.T @ bias)}, model=model, provenance={"source": "loreft"})
