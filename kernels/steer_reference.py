"""Pure-torch reference implementation of the per-token residual steering op.

This is the semantic contract that :mod:`steer_triton` must match; it is also
the backend used on CPU and wherever Triton is unavailable. It is safe to trace
with ``torch.compile`` (``fullgraph=True``) and to capture in CUDA graphs: the
only Python branches are on ``rank == 0`` and ``residual is None`` (static),
plus shape checks.
"""

from __future__ import annotations

import torch

from .bank_layout import NORM_EPS

__all__ = ["steer_residual_torch", "check_steer_args"]


def check_steer_args(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    bank: torch.Tensor,
    index: torch.Tensor,
    rank: int,
    scale: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate shapes/dtypes (static properties only) and return ``(T, d)``.

    Raises:
        ValueError: on any mismatch with the contract of :func:`steer_residual_torch`.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, d], got shape {tuple(hidden.shape)}")
    T, d = hidden.shape
    if residual is not None:
        if residual.shape != hidden.shape:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} != hidden shape {tuple(hidden.shape)}"
            )
        if residual.dtype != hidden.dtype:
            raise ValueError(f"residual dtype {residual.dtype} != hidden dtype {hidden.dtype}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if bank.dim() != 2 or bank.shape[1] != 2 * d + 2 * rank * d + 1:
        raise ValueError(
            f"bank must be [num_slots, {2 * d + 2 * rank * d + 1}] for d={d}, rank={rank}; "
            f"got {tuple(bank.shape)}"
        )
    if bank.dtype != torch.float32:
        raise ValueError(f"bank must be float32, got {bank.dtype}")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.shape[0] < T:
        raise ValueError(f"index has {index.shape[0]} entries, fewer than T={T} tokens")
    if scale is not None:
        if scale.dim() != 1 or scale.dtype != torch.float32:
            raise ValueError(f"scale must be a 1-D float32 tensor, got {scale.dtype} {tuple(scale.shape)}")
        if scale.shape[0] < T:
            raise ValueError(f"scale has {scale.shape[0]} entries, fewer than T={T} tokens")
    return T, d


def steer_residual_torch(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    bank: torch.Tensor,
    index: torch.Tensor,
    *,
    rank: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply per-token slot steering to a decoder layer's output (out of place).

    With ``h = hidden + residual`` (or ``h = hidden`` when ``residual`` is None),
    ``hf = float32(h)`` and ``row = bank[index[t]]`` split as ``(m, a, L, R, flag)``
    (see :class:`~vsteer.kernels.bank_layout.BankLayout`)::

        out   = hf * m - sum_k (hf . L_k) R_k + a
        delta = (hf * m - hf) - sum_k (hf . L_k) R_k + a     # == out - hf
        if flag:                                  # branch-free (torch.where)
            s     = ||hf|| / max(||out||, 1e-6)
            delta = (hf + delta) * s - hf         # i.e. out_n - hf
        delta = delta * scale[t]                  # only with ``scale`` (a schedule's multiplier)
        delta = nan_to_num(delta, nan=0, +-inf -> +-max).clamp(+-max)   # max of target's dtype
        return (target + delta.to(target.dtype)).clamp(+-max)  # target = residual, or hidden if None

    ``flag`` is treated as a boolean (any non-zero value normalizes) and applied
    with a select, so flag-0 rows are unaffected by the norm math even if it
    overflows. The delta is accumulated negated (``nd = -delta``) and the result is formed as
    ``target - nd`` (bitwise the same as ``target + delta``). For the identity row
    (m=1, a=0, L=R=0, flag=0) ``nd`` is exactly ``+0.0`` for every finite ``h``
    (including ``h == 0``), so the output is bitwise equal to ``target``, signed
    zeros included.

    Args:
        hidden: ``[T, d]`` float tensor (any float dtype).
        residual: ``[T, d]`` same dtype as ``hidden``, or None.
        bank: float32 ``[num_slots, 2d + 2Kd + 1]`` slot bank.
        index: int32/int64 ``[>= T]`` slot id per token; only ``index[:T]`` is used.
        rank: K, the bank's ablation rank (static).
        scale: float32 ``[>= T]`` multiplier of each token's delta, or None (no multiply; a
            multiplier of exactly 1.0 gives bitwise the same result).

    Returns:
        New ``[T, d]`` tensor in ``target``'s dtype: the steered residual (or the
        steered hidden when ``residual`` is None). Inputs are never modified.
    """
    T, d = check_steer_args(hidden, residual, bank, index, rank, scale)
    if residual is None:
        target = hidden
        hf = hidden.float()
    else:
        target = residual
        hf = hidden.float() + residual.float()

    rows = bank.index_select(0, index[:T])  # [T, W] float32, one gather
    m = rows[:, 0:d]
    a = rows[:, d : 2 * d]
    flag = rows[:, 2 * d + 2 * rank * d :]  # [T, 1]

    nd = hf - hf * m  # -(hf * (m - 1)); exactly +0.0 where m == 1
    if rank > 0:
        L = rows[:, 2 * d : 2 * d + rank * d].view(T, rank, d)
        R = rows[:, 2 * d + rank * d : 2 * d + 2 * rank * d].view(T, rank, d)
        coef = (L * hf.unsqueeze(1)).sum(dim=-1, keepdim=True)  # [T, K, 1] = hf . L_k
        nd = nd + (coef * R).sum(dim=1)
    nd = nd - a

    # Branch-free renormalization: out = hf - nd; nd_n = hf - out * s. A select
    # (not ``nd + flag * (...)``) so flag-0 rows never see the norm math at all.
    out = hf - nd
    s = torch.linalg.vector_norm(hf, dim=-1, keepdim=True) / torch.linalg.vector_norm(
        out, dim=-1, keepdim=True
    ).clamp_min(NORM_EPS)
    nd = torch.where(flag != 0, hf - out * s, nd)
    if scale is not None:
        nd = nd * scale[:T, None]

    # Finite in, finite out: an overflowed change saturates at the dtype's largest value (and a NaN
    # from inf - inf inside the row math changes nothing), so no step can write inf or NaN to the KV.
    tmax = torch.finfo(target.dtype).max
    nd = torch.nan_to_num(nd, nan=0.0, posinf=tmax, neginf=-tmax).clamp(-tmax, tmax)
    return (target - nd.to(target.dtype)).clamp(-tmax, tmax)
