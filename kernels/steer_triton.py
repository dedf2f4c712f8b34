"""Triton implementation of the per-token residual steering op.

Same signature and semantics as
:func:`~vsteer.kernels.steer_reference.steer_residual_torch`; one program per
token row, ``BLOCK_D = next_power_of_2(d)``, float32 math, bank rows read
straight from the bank (no gathered copy). Importing this module never fails:
when Triton is missing (or broken) :data:`HAVE_TRITON` is False and calling
:func:`steer_residual_triton` raises ``RuntimeError``.
"""

from __future__ import annotations

import torch

from .bank_layout import NORM_EPS
from .steer_reference import check_steer_args

__all__ = ["HAVE_TRITON", "TRITON_IMPORT_ERROR", "steer_residual_triton"]

try:  # guarded: the package must import with plain torch
    import triton
    import triton.language as tl

    HAVE_TRITON: bool = True
    TRITON_IMPORT_ERROR: str | None = None
except Exception as _e:  # ImportError, or a broken driver / install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


if HAVE_TRITON:

    @triton.jit
    def _steer_residual_kernel(
        hid_ptr,
        res_ptr,
        bank_ptr,
        idx_ptr,
        scale_ptr,
        out_ptr,
        D,
        stride_h,
        stride_r,
        stride_b,
        stride_i,
        stride_o,
        eps,
        tmax,
        K: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One token row: out[t] = target[t] - nd(t) with nd = -delta (see reference).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D

        hid = tl.load(hid_ptr + row * stride_h + offs, mask=mask, other=0.0)
        if HAS_RES:
            target = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            hf = hid.to(tl.float32) + target.to(tl.float32)
        else:
            target = hid
            hf = hid.to(tl.float32)

        slot = tl.load(idx_ptr + row * stride_i).to(tl.int64)
        brow = bank_ptr + slot * stride_b
        m = tl.load(brow + offs, mask=mask, other=1.0)
        a = tl.load(brow + D + offs, mask=mask, other=0.0)

        # nd = -delta; exactly +0.0 for m == 1 (also if fused into an FMA).
        nd = hf - hf * m
        for k in tl.static_range(K):
            lk = tl.load(brow + 2 * D + k * D + offs, mask=mask, other=0.0)
            rk = tl.load(brow + (2 + K) * D + k * D + offs, mask=mask, other=0.0)
            c = tl.sum(hf * lk, axis=0)
            nd = nd + c * rk
        nd = nd - a

        flag = tl.load(brow + (2 + 2 * K) * D)
        out = hf - nd
        hnorm = tl.sqrt(tl.sum(hf * hf, axis=0))
        onorm = tl.sqrt(tl.sum(out * out, axis=0))
        s = hnorm / tl.maximum(onorm, eps)
        nd = tl.where(flag != 0.0, hf - out * s, nd)
        if HAS_SCALE:
            nd = nd * tl.load(scale_ptr + row)
        # Saturate as the reference does: NaN -> 0, then clamp to the target dtype's range.
        nd = tl.where(nd != nd, 0.0, nd)
        nd = tl.minimum(tl.maximum(nd, -tmax), tmax)

        # Mirror torch's `target - nd.to(dtype)`: round nd to the target dtype,
        # subtract in float32, round once.
        ndt = nd.to(target.dtype).to(tl.float32)
        res = target.to(tl.float32) - ndt
        res = tl.where(res != res, res, tl.minimum(tl.maximum(res, -tmax), tmax))  # a NaN target stays NaN
        tl.store(out_ptr + row * stride_o + offs, res.to(target.dtype), mask=mask)


def _num_warps(block_d: int) -> int:
    # About 64 elements per thread, at least 2 warps: the fastest in a CUDA-graph sweep on an H200
    # over hidden 1536/4096/8192 and 256..8192 tokens (benchmarks/gpu_profile_stack.py).
    return max(2, min(16, block_d // 2048))


def steer_residual_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    bank: torch.Tensor,
    index: torch.Tensor,
    *,
    rank: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`steer_residual_torch` (same contract, CUDA only).

    With ``hf = float32(hidden + residual)`` (or ``float32(hidden)``), ``row =
    bank[index[t]] = (m, a, L, R, flag)``::

        delta = hf * m - hf - sum_k (hf . L_k) R_k + a
        if flag: delta = (hf + delta) * ||hf|| / max(||hf + delta||, 1e-6) - hf
        delta = delta * scale[t]                  # only with ``scale``
        delta = nan_to_num(delta, nan=0).clamp(+-max)          # max of target's dtype
        return (target + delta.to(target.dtype)).clamp(+-max)  # target = residual or hidden

    Identity rows give bitwise ``target``. Out of place; reads ``index[:T]`` only.

    Args:
        hidden: ``[T, d]`` CUDA tensor, float32/bfloat16/float16.
        residual: ``[T, d]`` same dtype, or None.
        bank: float32 ``[num_slots, 2d + 2Kd + 1]`` (last dim contiguous).
        index: int32/int64 ``[>= T]``.
        rank: K (static).
        scale: float32 ``[>= T]`` per-token multiplier of the delta, or None.

    Returns:
        New contiguous ``[T, d]`` tensor in ``target``'s dtype.

    Raises:
        RuntimeError: when Triton is unavailable.
    """
    if not HAVE_TRITON:
        raise RuntimeError(f"Triton is not available ({TRITON_IMPORT_ERROR})")
    T, d = check_steer_args(hidden, residual, bank, index, rank, scale)
    target = hidden if residual is None else residual
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if bank.stride(-1) != 1:
        bank = bank.contiguous()
    if scale is not None and scale.stride(0) != 1:
        scale = scale.contiguous()
    out = torch.empty((T, d), dtype=target.dtype, device=target.device)
    if T == 0:
        return out
    block_d = triton.next_power_of_2(d)
    res_arg = residual if residual is not None else hidden
    _steer_residual_kernel[(T,)](
        hidden,
        res_arg,
        bank,
        index,
        scale if scale is not None else index,  # any valid pointer when unused
        out,
        d,
        hidden.stride(0),
        res_arg.stride(0),
        bank.stride(0),
        index.stride(0),
        out.stride(0),
        NORM_EPS,
        float(torch.finfo(target.dtype).max),
        K=rank,
        HAS_RES=residual is not None,
        HAS_SCALE=scale is not None,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
    return out
