"""Pure-torch reference of the per-token SAS update (DESIGN.md section 5).

For token t with slot ``index[t]``: ``delta_t = (sigma(z_t + bank[index[t]]) - z_t) @ W_dec`` with
``z_t = sigma(h_t @ W_enc + b_enc)``, ``bank[slot] = lambda * s`` of that slot's request (row 0 is
zero: unsteered). The error term is kept by returning only the change, so a zero bank row gives a
delta of exactly 0.

ReLU / JumpReLU: ``sigma(z) = z`` wherever the bank row is zero, so only the features in
``union`` (the union of the supports of the step's slots) need encoding and decoding: the weights
are gathered to ``[U, d]`` and the cost is ``d x U`` per token instead of ``d x d_sae``. Entries of
``union`` past the real union must name a feature whose bank column is zero in every row (the
engine keeps a zero padding column at index ``d_sae``), so padding changes nothing. TopK has no
such shortcut: ``union=None`` encodes every feature.

No Python branch depends on the data; it traces under torch.compile and replays in CUDA graphs.
"""

from __future__ import annotations

import torch

__all__ = ["sas_delta_torch", "sae_activate"]


def sae_activate(pre: torch.Tensor, activation: str, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
    """ReLU, JumpReLU (``relu(p) * (p > threshold)``) or TopK (top k of ``relu(p)``)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jumprelu":
        return torch.relu(pre) * (pre > threshold)
    if activation == "topk":
        top = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    raise ValueError(f"unknown SAE activation {activation!r}")


def sas_delta_torch(
    h: torch.Tensor,
    index: torch.Tensor,
    bank: torch.Tensor,
    w_enc_t: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    union: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    k: int | None = None,
) -> torch.Tensor:
    """The SAS change to the residual stream, float32 ``[T, d]``.

    Args:
        h: residual stream ``[T, d]`` (any float dtype; computed in float32).
        index: ``[>= T]`` int32/int64 slot per token.
        bank: ``[num_slots + 1, F]`` float32, row ``s`` = lambda * (sparse SAS vector) of slot s.
        w_enc_t: encoder, transposed: ``[F, d]`` (row j reads feature j).
        b_enc: ``[F]`` encoder bias (with any ``b_dec`` input offset already folded in).
        w_dec: ``[F, d]`` decoder rows.
        threshold: ``[F]`` JumpReLU thresholds (None otherwise).
        union: ``[U]`` int64 feature ids to restrict to (ReLU/JumpReLU), or None for all.
        activation: ``relu``, ``jumprelu`` or ``topk`` (``union`` must be None for TopK).
        k: TopK's k.
    """
    if activation == "topk" and union is not None:
        raise ValueError("TopK SAS needs the full encode: union must be None")
    T = h.shape[0]
    x = h.float()
    rows = bank
    if union is not None:
        w_enc_t, w_dec, b_enc = w_enc_t[union], w_dec[union], b_enc[union]
        threshold = threshold[union] if threshold is not None else None
        rows = bank[:, union]
    z = sae_activate(x @ w_enc_t.float().t() + b_enc.float(), activation, threshold, k)
    shifted = sae_activate(z + rows[index[:T].long()], activation, threshold, k)
    return (shifted - z) @ w_dec.float()
