"""Triton steering kernel vs. the torch reference.

GPU tests are marked ``gpu`` and skipped without CUDA+Triton. One CPU test runs
the same kernel through Triton's interpreter (``TRITON_INTERPRET=1``, in a
subprocess) so the kernel's semantics are checked even without a GPU.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vsteer.kernels import BankLayout, steer_residual_torch

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except Exception:
    _HAVE_TRITON = False

_CUDA = torch.cuda.is_available()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [64, 576, 2048, 4096]
SLOTS = [1, 8, 257]
TOKENS = [1, 7, 512]
RANKS = [0, 1, 2]

# Triton vs torch reference (both float32 math; differences are reduction order
# plus at most a rounding flip in the output dtype). atol is scaled by max |ref|.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _is_identity_slot(s: int) -> bool:
    return s == 0 or s % 5 == 3


def make_bank(d: int, rank: int, num_slots: int, seed: int, device: str = "cuda") -> torch.Tensor:
    """Vectorized random bank: identity slots per ``_is_identity_slot``, odd slots normalized."""
    lay = BankLayout(d, rank)
    g = torch.Generator(device=device).manual_seed(seed)
    S = num_slots
    bank = lay.identity_bank(S, device=device)
    steered = torch.tensor([not _is_identity_slot(s) for s in range(S)], device=device)
    m = 1.0 + 0.2 * torch.randn(S, d, generator=g, device=device)
    a = 0.5 * torch.randn(S, d, generator=g, device=device)
    L = torch.nn.functional.normalize(torch.randn(S, rank, d, generator=g, device=device), dim=-1)
    R = L * (0.5 + torch.rand(S, rank, 1, generator=g, device=device))
    flag = (torch.arange(S, device=device) % 2 == 1).float()
    rows = torch.cat(
        [m, a, L.reshape(S, rank * d), R.reshape(S, rank * d), flag[:, None]], dim=1
    )
    bank[steered] = rows[steered]
    return bank


def make_inputs(T, d, dtype, num_slots, seed, with_residual=True, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (2 * torch.randn(T, d, generator=g, device=device)).to(dtype)
    residual = (3 * torch.randn(T, d, generator=g, device=device)).to(dtype) if with_residual else None
    index = torch.randint(0, num_slots, (T + 3,), generator=g, device=device, dtype=torch.int32)
    index[T:] = 2**30  # never read
    return hidden, residual, index


def check_against_reference(hidden, residual, bank, index, rank, dtype):
    from vsteer.kernels.steer_triton import steer_residual_triton

    T = hidden.shape[0]
    snap = [x.clone() for x in (hidden, bank, index)]
    got = steer_residual_triton(hidden, residual, bank, index, rank=rank)
    want = steer_residual_torch(hidden, residual, bank, index, rank=rank)
    torch.cuda.synchronize()
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)
    target = hidden if residual is None else residual
    ident = torch.tensor([_is_identity_slot(int(s)) for s in index[:T].tolist()], device=hidden.device)
    if ident.any():
        assert torch.equal(_bits(got[ident]), _bits(target[ident]))
    for x, y in zip(snap, (hidden, bank, index)):
        assert torch.equal(x, y)  # out of place
    return got


@pytest.mark.parametrize(
    "dtype,d,num_slots,T,rank",
    list(itertools.product(DTYPES, HIDDEN, SLOTS, TOKENS, RANKS)),
    ids=lambda v: str(v).replace("torch.", ""),
)
@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
def test_triton_matches_reference(dtype, d, num_slots, T, rank):
    bank = make_bank(d, rank, num_slots, seed=d + num_slots + rank)
    hidden, residual, index = make_inputs(T, d, dtype, num_slots, seed=T * 31 + d)
    check_against_reference(hidden, residual, bank, index, rank, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
def test_triton_matches_reference_no_residual(dtype, d, rank):
    bank = make_bank(d, rank, 8, seed=d + rank)
    hidden, _, index = make_inputs(7, d, dtype, 8, seed=d, with_residual=False)
    check_against_reference(hidden, None, bank, index.to(torch.int64), rank, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
def test_triton_per_token_scale_matches_reference(dtype, rank):
    from vsteer.kernels.steer_triton import steer_residual_triton

    d, T = 576, 40
    bank = make_bank(d, rank, 8, seed=rank)
    hidden, residual, index = make_inputs(T, d, dtype, 8, seed=rank + 5)
    scale = torch.linspace(-1.0, 2.0, T + 8, device="cuda")
    got = steer_residual_triton(hidden, residual, bank, index, rank=rank, scale=scale)
    want = steer_residual_torch(hidden, residual, bank, index, rank=rank, scale=scale)
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(want.abs().max())))
    ones = torch.ones(T, device="cuda")
    assert torch.equal(steer_residual_triton(hidden, residual, bank, index, rank=rank, scale=ones),
                       steer_residual_triton(hidden, residual, bank, index, rank=rank))


@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_identity_zero_h_and_signed_zeros(dtype):
    from vsteer.kernels.steer_triton import steer_residual_triton

    d, rank, T = 576, 1, 6
    lay = BankLayout(d, rank)
    bank = lay.identity_bank(3, device="cuda")
    bank[1] = lay.identity_row("cuda")
    bank[1, lay.flag_index] = 1.0  # identity + normalize
    bank[2] = lay.pack_row(m=torch.full((d,), 2.0, device="cuda"), normalize=True)
    residual = (3 * torch.randn(T, d, device="cuda")).to(dtype)
    residual[0] = -0.0
    hidden = -residual  # h == 0
    hidden[3:] = 1.0
    for slot in range(3):
        index = torch.full((T,), slot, dtype=torch.int64, device="cuda")
        got = steer_residual_triton(hidden, residual, bank, index, rank=rank)
        assert torch.isfinite(got).all()
        if slot == 0:
            assert torch.equal(_bits(got), _bits(residual))
        else:
            assert torch.equal(got[:3], residual[:3])  # ||h|| == 0 -> delta == 0


# ------------------------------------------------------------------ CUDA graphs


class _Tiny(torch.nn.Module):
    def __init__(self, fn, bank: torch.Tensor, index: torch.Tensor, rank: int, d: int, dtype):
        super().__init__()
        self.fn, self.rank = fn, rank
        self.proj = torch.nn.Linear(d, d, device="cuda", dtype=dtype)
        self.register_buffer("bank", bank)
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        hidden = self.proj(x)
        return hidden, self.fn(hidden, residual, self.bank, self.index, rank=self.rank)


@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_follows_inplace_updates(backend):
    from vsteer.kernels.steer_triton import steer_residual_triton

    fn = steer_residual_triton if backend == "triton" else steer_residual_torch
    dtype, d, rank, S, T = torch.bfloat16, 256, 2, 16, 32
    lay = BankLayout(d, rank)
    bank = make_bank(d, rank, S, seed=1)
    index = torch.zeros(T + 8, dtype=torch.int32, device="cuda")  # padded like a max-batch buffer
    x = torch.randn(T, d, device="cuda", dtype=dtype)
    residual = torch.randn(T, d, device="cuda", dtype=dtype)
    mod = _Tiny(fn, bank, index, rank, d, dtype)
    assert mod.bank.data_ptr() == bank.data_ptr() and mod.index.data_ptr() == index.data_ptr()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            mod(x, residual)  # warm up / compile Triton outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        hidden_out, out = mod(x, residual)

    identity_slots = {s for s in range(S) if _is_identity_slot(s)}  # follows the bank rewrites below

    def replay_and_check():
        graph.replay()
        torch.cuda.synchronize()
        want = steer_residual_torch(hidden_out, residual, bank, index, rank=rank)
        scale = max(1.0, float(want.abs().max()))
        tol = TOL[dtype]
        torch.testing.assert_close(out, want, rtol=tol["rtol"], atol=tol["atol"] * scale)
        ident = torch.tensor([int(s) in identity_slots for s in index[:T].tolist()], device="cuda")
        assert torch.equal(_bits(out[ident]), _bits(residual[ident]))
        return out.clone()

    o0 = replay_and_check()
    assert torch.equal(o0, residual)  # all tokens on slot 0

    # New slot assignment, in place.
    index[:T].copy_(torch.arange(T, device="cuda", dtype=torch.int32) % S)
    o1 = replay_and_check()
    assert not torch.equal(o1, o0)

    # Rewrite bank rows in place: slot 1 -> identity, slot 3 -> steered (+normalize).
    bank[1].copy_(lay.identity_row("cuda"))
    identity_slots = (identity_slots | {1}) - {3}
    g = torch.Generator(device="cuda").manual_seed(123)
    L = torch.nn.functional.normalize(torch.randn(1, d, generator=g, device="cuda"), dim=-1)
    bank[3].copy_(
        lay.pack_row(
            m=torch.full((d,), 0.5, device="cuda"),
            a=torch.randn(d, generator=g, device="cuda"),
            L=L,
            R=L,
            normalize=True,
        )
    )
    o2 = replay_and_check()
    rows1 = (index[:T] == 1).nonzero().flatten()
    rows3 = (index[:T] == 3).nonzero().flatten()
    assert torch.equal(_bits(o2[rows1]), _bits(residual[rows1]))
    assert not torch.equal(o2[rows3], o1[rows3])

    # New input contents too.
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    replay_and_check()


@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")
def test_triton_under_torch_compile_follows_inplace_updates():
    from vsteer.kernels.steer_triton import steer_residual_triton

    torch._dynamo.reset()
    compiled = torch.compile(steer_residual_triton, fullgraph=True)
    dtype, d, rank, S, T = torch.bfloat16, 2048, 1, 8, 7
    bank = make_bank(d, rank, S, seed=3)
    hidden, residual, index = make_inputs(T, d, dtype, S, seed=4)
    tol = TOL[dtype]
    for step in range(3):
        got = compiled(hidden, residual, bank, index, rank=rank)
        want = steer_residual_torch(hidden, residual, bank, index, rank=rank)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)
        index[:T].copy_((index[:T] + 1) % S)
        bank[5].copy_(make_bank(d, rank, S, seed=10 + step)[5])
    torch._dynamo.reset()


# ------------------------------------------------- CPU: Triton interpreter run

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from vsteer.kernels import BankLayout, steer_residual_torch
    from vsteer.kernels.steer_triton import steer_residual_triton

    torch.manual_seed(0)
    TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d, K, has_res in ((64, 0, True), (48, 2, True), (100, 1, False)):
            lay = BankLayout(d, K)
            S, T = 9, 11
            bank = lay.identity_bank(S)
            for s in range(2, S):
                L = torch.nn.functional.normalize(torch.randn(K, d), dim=-1)
                bank[s] = lay.pack_row(1 + 0.2 * torch.randn(d), 0.5 * torch.randn(d), L,
                                       L * (0.5 + torch.rand(K, 1)), normalize=bool(s % 2))
            idx = torch.randint(0, S, (T + 3,), dtype=torch.int32)
            idx[T:] = 2**30
            idx[:2] = torch.tensor([0, 1])
            h = (2 * torch.randn(T, d)).to(dtype)
            r = (3 * torch.randn(T, d)).to(dtype) if has_res else None
            tgt = r if has_res else h
            tgt[0, ::3] = -0.0
            want = steer_residual_torch(h, r, bank, idx, rank=K)
            got = steer_residual_triton(h, r, bank, idx, rank=K)
            assert got.dtype == dtype and got.shape == (T, d)
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
            ident = idx[:T] <= 1
            assert torch.equal(got[ident], tgt[ident])
            if dtype is torch.float32:
                assert torch.equal(got[ident].view(torch.int32), tgt[ident].view(torch.int32))
            # a per-token multiplier of the delta (schedules): 1.0 is bitwise no multiplier
            mult = torch.linspace(-1.5, 2.0, T + 3)
            mult[T - 1] = 1.0
            want = steer_residual_torch(h, r, bank, idx, rank=K, scale=mult)
            got = steer_residual_triton(h, r, bank, idx, rank=K, scale=mult)
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
            one = steer_residual_torch(h, r, bank, idx, rank=K, scale=torch.ones(T))
            assert torch.equal(one, steer_residual_torch(h, r, bank, idx, rank=K))
            plain_want = steer_residual_torch(h, r, bank, idx, rank=K)
            torch.testing.assert_close(got[T - 1], plain_want[T - 1], rtol=TOL[dtype], atol=TOL[dtype] * scale)
    print("INTERPRET_OK")
    """
)


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton not installed")
def test_triton_kernel_in_interpreter_matches_reference():
    """Runs the real kernel on CPU via TRITON_INTERPRET=1 (semantics only, not speed)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "INTERPRET_OK" in proc.stdout, proc.stderr[-4000:]


_SATURATE_SCRIPT = textwrap.dedent(
    """
    import torch
    from vsteer.kernels import BankLayout, steer_residual_torch
    from vsteer.kernels.steer_triton import steer_residual_triton

    lay = BankLayout(hidden_size=8, rank=1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = (torch.randn(3, 8) * 100).to(dtype)
        r = torch.randn(3, 8).to(dtype)
        huge = lay.pack_row(torch.full((8,), 3e38), torch.full((8,), -3e38), torch.full((1, 8), 1e30),
                            torch.ones(1, 8), False)
        bank = torch.stack([lay.identity_row(), huge, huge])
        scale = torch.tensor([1.0, 2.0, 3e38])
        ref = steer_residual_torch(h, r, bank, torch.tensor([0, 1, 2]), rank=1, scale=scale)
        out = steer_residual_triton(h, r, bank, torch.tensor([0, 1, 2]), rank=1, scale=scale)
        assert bool(torch.isfinite(ref).all()) and torch.equal(ref, out), (dtype, ref, out)
    print("SATURATE_OK")
    """
)


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton not installed")
def test_triton_kernel_saturates_like_the_reference_in_the_interpreter():
    """Finite inputs whose change overflows: both the kernel and the reference saturate at the
    dtype's largest value, never inf or NaN (TRITON_INTERPRET=1, CPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SATURATE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SATURATE_OK" in proc.stdout, proc.stderr[-4000:]
