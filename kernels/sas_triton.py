"""Triton implementation of the support-restricted SAS update (DESIGN.md section 5).

Same signature and semantics as :func:`~vsteer.kernels.sas_reference.sas_delta_torch`. For the
ReLU / JumpReLU path with ``union`` given it runs three kernels, all reading the weight rows of the
union features straight from the full weight tensors (no gathered copy):

1. encode: ``C[t, u] = sigma(z + bank[index[t], f_u]) - z``, ``z = sigma(h_t . w_enc_t[f_u] +
   b_enc[f_u])``, ``f_u = union[u]``: a ``[T, U]`` tile GEMM split over ``d`` (partial sums
   into a ``[d / ENCODE_CHUNK_D, T, U]`` scratch), then an epilogue kernel that adds the partials
   in a fixed order and applies the activation, the bank gather and the subtraction;
2. decode: ``delta = C @ w_dec[union]``: a ``[T, d]`` tile GEMM over ``U``.

All math is float32 with IEEE float32 dot products (no TF32), so results match the reference up
to summation order; a zero bank row gives ``C = 0`` and a delta of exactly 0. ``C`` and the
partial sums are float32 scratch tensors allocated per call. No Python branch depends on tensor
values (no host sync), so the op traces under torch.compile and replays in CUDA graphs.

TopK (``activation="topk"``) and ``union=None`` are not restricted to a support and have no
kernel here: :func:`sas_delta_triton` calls :func:`sas_delta_torch` for them (which also raises
the reference's error for TopK with a ``union``).

Importing this module never fails: when Triton is missing (or broken) :data:`HAVE_TRITON` is
False and calling :func:`sas_delta_triton` on the kernel path raises ``RuntimeError``.
"""

from __future__ import annotations

import torch

from .sas_reference import sas_delta_torch

__all__ = ["HAVE_TRITON", "TRITON_IMPORT_ERROR", "sas_delta_triton"]

try:  # guarded: the package must import with plain torch
    import triton
    import triton.language as tl

    HAVE_TRITON: bool = True
    TRITON_IMPORT_ERROR: str | None = None
except Exception as _e:  # noqa: BLE001  (ImportError, or a broken driver / install)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


if HAVE_TRITON:

    @triton.jit
    def _sas_encode_partial_kernel(
        h_ptr,
        wenc_ptr,
        union_ptr,
        part_ptr,
        T,
        U,
        D,
        stride_h,
        stride_we,
        stride_un,
        stride_pk,
        stride_pt,
        BLOCK_T: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_D: tl.constexpr,
        CHUNK_D: tl.constexpr,
    ):
        # part[k, t, u] = h[t, chunk k] . w_enc_t[union[u], chunk k]; chunk k = [k*CHUNK_D, (k+1)*CHUNK_D)
        pid_t = tl.program_id(0)
        pid_u = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_u = pid_u.to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
        mask_t = offs_t < T
        mask_u = offs_u < U
        feat = tl.load(union_ptr + offs_u * stride_un, mask=mask_u, other=0).to(tl.int64)

        acc = tl.zeros((BLOCK_T, BLOCK_U), dtype=tl.float32)
        d_start = pid_k.to(tl.int64) * CHUNK_D
        for d0 in range(0, CHUNK_D, BLOCK_D):
            offs_d = d_start + d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            hb = tl.load(
                h_ptr + offs_t[:, None] * stride_h + offs_d[None, :],
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            wb = tl.load(
                wenc_ptr + feat[None, :] * stride_we + offs_d[:, None],
                mask=mask_u[None, :] & mask_d[:, None],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(hb, wb, acc, input_precision="ieee")
        mask_tu = mask_t[:, None] & mask_u[None, :]
        tl.store(part_ptr + pid_k * stride_pk + offs_t[:, None] * stride_pt + offs_u[None, :], acc, mask=mask_tu)

    @triton.jit
    def _sas_encode_epilogue_kernel(
        part_ptr,
        idx_ptr,
        bank_ptr,
        benc_ptr,
        thr_ptr,
        union_ptr,
        c_ptr,
        T,
        U,
        SPLIT,
        stride_pk,
        stride_pt,
        stride_i,
        stride_bank,
        stride_be,
        stride_th,
        stride_un,
        stride_c,
        JUMP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_U: tl.constexpr,
    ):
        # Sum the d-chunks in a fixed order (deterministic), then the activation, the bank gather and
        # the subtraction: C[t, u] = sigma(z + bank[index[t], f_u]) - z.
        pid_t = tl.program_id(0)
        pid_u = tl.program_id(1)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_u = pid_u.to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
        mask_t = offs_t < T
        mask_u = offs_u < U
        mask_tu = mask_t[:, None] & mask_u[None, :]
        feat = tl.load(union_ptr + offs_u * stride_un, mask=mask_u, other=0).to(tl.int64)

        acc = tl.zeros((BLOCK_T, BLOCK_U), dtype=tl.float32)
        for k in range(0, SPLIT):
            acc += tl.load(part_ptr + k * stride_pk + offs_t[:, None] * stride_pt + offs_u[None, :], mask=mask_tu,
                           other=0.0)

        b = tl.load(benc_ptr + feat * stride_be, mask=mask_u, other=0.0).to(tl.float32)
        pre = acc + b[None, :]
        if JUMP:
            th = tl.load(thr_ptr + feat * stride_th, mask=mask_u, other=0.0).to(tl.float32)
            z = tl.where(pre > th[None, :], tl.maximum(pre, 0.0), 0.0)
        else:
            z = tl.maximum(pre, 0.0)

        slot = tl.load(idx_ptr + offs_t * stride_i, mask=mask_t, other=0).to(tl.int64)
        s = tl.load(bank_ptr + slot[:, None] * stride_bank + feat[None, :], mask=mask_tu, other=0.0).to(tl.float32)
        y = z + s
        if JUMP:
            shifted = tl.where(y > th[None, :], tl.maximum(y, 0.0), 0.0)
        else:
            shifted = tl.maximum(y, 0.0)
        c = shifted - z
        tl.store(c_ptr + offs_t[:, None] * stride_c + offs_u[None, :], c, mask=mask_tu)

    @triton.jit
    def _sas_decode_kernel(
        c_ptr,
        wdec_ptr,
        union_ptr,
        out_ptr,
        T,
        U,
        D,
        stride_c,
        stride_wd,
        stride_un,
        stride_o,
        BLOCK_T: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_t = offs_t < T
        mask_d = offs_d < D

        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for u0 in range(0, U, BLOCK_U):
            offs_u = u0 + tl.arange(0, BLOCK_U)
            mask_u = offs_u < U
            feat = tl.load(union_ptr + offs_u * stride_un, mask=mask_u, other=0).to(tl.int64)
            cb = tl.load(
                c_ptr + offs_t[:, None] * stride_c + offs_u[None, :],
                mask=mask_t[:, None] & mask_u[None, :],
                other=0.0,
            )
            wb = tl.load(
                wdec_ptr + feat[:, None] * stride_wd + offs_d[None, :],
                mask=mask_u[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(cb, wb, acc, input_precision="ieee")
        tl.store(out_ptr + offs_t[:, None] * stride_o + offs_d[None, :], acc, mask=mask_t[:, None] & mask_d[None, :])


#: Tile sizes, constants on purpose. The token count ``T`` is symbolic when vLLM traces the model
#: and vLLM drops dynamo's guards, so a block size computed from ``T`` in Python would be fixed at
#: whatever size was traced and reused for every other size. ``U`` (the union buffer) has a fixed
#: size in a compiled engine but is kept off the choice too, so nothing here depends on a shape.
#: 32 token rows suit decode batches and chunked prefill alike; ``tl.dot`` needs every dim >= 16.
ENCODE_BLOCK_T, ENCODE_BLOCK_U, ENCODE_BLOCK_D = 32, 64, 32
#: The encode GEMM is split over ``d`` into chunks of this many columns, one program each, so a
#: decode batch (few token tiles) still fills the GPU; the chunks' partial sums are added in a
#: fixed order by the epilogue kernel (deterministic, unlike atomics). The split count depends on
#: ``d`` only, which is static per model.
ENCODE_CHUNK_D = 256
DECODE_BLOCK_T, DECODE_BLOCK_U, DECODE_BLOCK_D = 32, 32, 64


def _check_args(h, index, bank, w_enc_t, b_enc, w_dec, threshold, union, activation) -> tuple[int, int, int]:
    if h.dim() != 2:
        raise ValueError(f"h must be [T, d], got shape {tuple(h.shape)}")
    T, d = h.shape
    if w_enc_t.dim() != 2 or w_enc_t.shape[1] != d:
        raise ValueError(f"w_enc_t must be [F, d={d}], got {tuple(w_enc_t.shape)}")
    F = w_enc_t.shape[0]
    if tuple(w_dec.shape) != (F, d):
        raise ValueError(f"w_dec must be [F={F}, d={d}], got {tuple(w_dec.shape)}")
    if tuple(b_enc.shape) != (F,):
        raise ValueError(f"b_enc must be [F={F}], got {tuple(b_enc.shape)}")
    if bank.dim() != 2 or bank.shape[1] != F:
        raise ValueError(f"bank must be [num_slots + 1, F={F}], got {tuple(bank.shape)}")
    if index.dim() != 1 or index.shape[0] < T:
        raise ValueError(f"index must be 1-D with >= T={T} entries, got {tuple(index.shape)}")
    if union.dim() != 1:
        raise ValueError(f"union must be 1-D, got {tuple(union.shape)}")
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("a JumpReLU SAE needs threshold")
        if tuple(threshold.shape) != (F,):
            raise ValueError(f"threshold must be [F={F}], got {tuple(threshold.shape)}")
    elif activation != "relu":
        raise ValueError(f"unknown SAE activation {activation!r}")
    return T, d, union.shape[0]


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sas_delta_triton(
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
    """Triton version of :func:`sas_delta_torch` (same contract; CUDA, or Triton's interpreter).

    For token ``t``, slot ``index[t]``, and each ``f`` in ``union``: ``z = sigma(h_t . w_enc_t[f] +
    b_enc[f])``, ``delta_t += (sigma(z + bank[slot, f]) - z) * w_dec[f]``. ReLU / JumpReLU with
    ``union`` given run the kernels; TopK or ``union=None`` call :func:`sas_delta_torch`.

    Args:
        h: residual stream ``[T, d]`` (float32/bfloat16/float16; computed in float32).
        index: ``[>= T]`` int32/int64 slot per token (only ``index[:T]`` is read).
        bank: ``[num_slots + 1, F]``, row ``s`` = lambda * (sparse SAS vector) of slot ``s``.
        w_enc_t: encoder, transposed: ``[F, d]``.
        b_enc: ``[F]`` encoder bias (any ``b_dec`` input offset already folded in).
        w_dec: ``[F, d]`` decoder rows.
        threshold: ``[F]`` JumpReLU thresholds (required for JumpReLU).
        union: ``[U]`` int32/int64 feature ids; padding entries must name a feature whose bank
            column is zero in every row (ids are not range-checked on the device).
        activation: ``relu``, ``jumprelu`` or ``topk``.
        k: TopK's k.

    Returns:
        float32 ``[T, d]``, a new tensor.

    Raises:
        RuntimeError: Triton is unavailable (kernel path only).
        ValueError: Mismatched shapes, JumpReLU without threshold, TopK with a union.
    """
    if activation == "topk" or union is None:
        return sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, threshold, union, activation=activation, k=k)
    if not HAVE_TRITON:
        raise RuntimeError(f"Triton is not available ({TRITON_IMPORT_ERROR})")
    T, d, U = _check_args(h, index, bank, w_enc_t, b_enc, w_dec, threshold, union, activation)
    out = torch.empty((T, d), dtype=torch.float32, device=h.device)
    if T == 0:
        return out
    if U == 0:
        return out.zero_()
    h, bank, w_enc_t, w_dec = (_last_contiguous(x) for x in (h, bank, w_enc_t, w_dec))
    jump = activation == "jumprelu"
    thr = threshold if jump else b_enc  # any valid pointer when unused

    c = torch.empty((T, U), dtype=torch.float32, device=h.device)
    split = triton.cdiv(d, ENCODE_CHUNK_D)
    part = torch.empty((split, T, U), dtype=torch.float32, device=h.device)
    _sas_encode_partial_kernel[(triton.cdiv(T, ENCODE_BLOCK_T), triton.cdiv(U, ENCODE_BLOCK_U), split)](
        h, w_enc_t, union, part,
        T, U, d,
        h.stride(0), w_enc_t.stride(0), union.stride(0), part.stride(0), part.stride(1),
        BLOCK_T=ENCODE_BLOCK_T, BLOCK_U=ENCODE_BLOCK_U, BLOCK_D=ENCODE_BLOCK_D, CHUNK_D=ENCODE_CHUNK_D,
        num_warps=4,
    )
    _sas_encode_epilogue_kernel[(triton.cdiv(T, ENCODE_BLOCK_T), triton.cdiv(U, ENCODE_BLOCK_U))](
        part, index, bank, b_enc, thr, union, c,
        T, U, split,
        part.stride(0), part.stride(1), index.stride(0), bank.stride(0), b_enc.stride(0), thr.stride(0),
        union.stride(0), c.stride(0),
        JUMP=jump, BLOCK_T=ENCODE_BLOCK_T, BLOCK_U=ENCODE_BLOCK_U,
        num_warps=4,
    )
    _sas_decode_kernel[(triton.cdiv(T, DECODE_BLOCK_T), triton.cdiv(d, DECODE_BLOCK_D))](
        c, w_dec, union, out,
        T, U, d,
        c.stride(0), w_dec.stride(0), union.stride(0), out.stride(0),
        BLOCK_T=DECODE_BLOCK_T, BLOCK_U=DECODE_BLOCK_U, BLOCK_D=DECODE_BLOCK_D,
        num_warps=4,
    )
    return out
