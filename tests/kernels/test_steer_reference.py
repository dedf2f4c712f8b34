"""CPU tests for the slot-bank layout and the pure-torch steering reference."""

from __future__ import annotations

import math

import pytest
import torch
from vsteer.kernels import BankLayout, get_steer_backend, steer_residual_torch

# Per-dtype tolerances for result vs. a float64 oracle (scaled by max |oracle|).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern of a float tensor (so -0.0 != +0.0)."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def make_bank(
    layout: BankLayout,
    num_slots: int,
    gen: torch.Generator,
    *,
    identity_slots: tuple[int, ...] = (0,),
    normalize_every: int = 2,
) -> torch.Tensor:
    """Random bank: listed slots identity, others random m/a/L/R, every n-th normalized."""
    d, K = layout.hidden_size, layout.rank
    bank = layout.identity_bank(num_slots)
    for s in range(num_slots):
        if s in identity_slots:
            continue
        k = (s % K) + 1 if K else 0  # exercise partially filled low-rank slots
        L = torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=-1)
        R = L * (0.5 + torch.rand(k, 1, generator=gen))
        bank[s] = layout.pack_row(
            1.0 + 0.2 * torch.randn(d, generator=gen),
            0.5 * torch.randn(d, generator=gen),
            L,
            R,
            normalize=(s % normalize_every == 0),
        )
    return bank


def oracle(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    bank: torch.Tensor,
    index: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """Independent float64 per-token loop implementation of the contract."""
    T, d = hidden.shape
    target = hidden if residual is None else residual
    h_all = hidden.double() if residual is None else hidden.double() + residual.double()
    out_rows = []
    for t in range(T):
        h = h_all[t]
        row = bank[int(index[t])].double()
        m, a = row[:d], row[d : 2 * d]
        out = h * m + a
        for k in range(rank):
            Lk = row[2 * d + k * d : 2 * d + (k + 1) * d]
            Rk = row[2 * d + rank * d + k * d : 2 * d + rank * d + (k + 1) * d]
            out = out - torch.dot(h, Lk) * Rk
        if float(row[-1]) != 0.0:
            out = out * (float(h.norm()) / max(float(out.norm()), 1e-6))
        out_rows.append(target[t].double() + (out - h))
    return torch.stack(out_rows) if out_rows else torch.empty(0, d, dtype=torch.float64)


def assert_close_to_oracle(res: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(res.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


# ----------------------------------------------------------------- layout


def test_layout_slices_and_width():
    lay = BankLayout(hidden_size=5, rank=2)
    d, K = 5, 2
    assert lay.width == 2 * d + 2 * K * d + 1 == 31
    assert lay.m_slice == slice(0, 5)
    assert lay.a_slice == slice(5, 10)
    assert lay.l_slice == slice(10, 20)
    assert lay.r_slice == slice(20, 30)
    assert lay.flag_index == 30 and lay.flag_slice == slice(30, 31)
    lay0 = BankLayout(7, 0)
    assert lay0.width == 15 and lay0.l_slice == slice(14, 14) and lay0.r_slice == slice(14, 14)
    with pytest.raises(AttributeError):
        lay.rank = 3  # frozen
    with pytest.raises(ValueError):
        BankLayout(0, 1)
    with pytest.raises(ValueError):
        BankLayout(4, -1)


def test_identity_and_pack_row():
    lay = BankLayout(4, 2)
    ident = lay.identity_row()
    assert ident.dtype == torch.float32 and ident.shape == (lay.width,)
    assert torch.equal(ident[lay.m_slice], torch.ones(4))
    assert torch.count_nonzero(ident[4:]) == 0
    assert torch.equal(lay.pack_row(), ident)
    assert lay.is_identity_row(ident)

    m, a = torch.arange(4.0), -torch.arange(4.0)
    L = torch.eye(4)[:1]
    R = 2 * torch.eye(4)[1:2]
    row = lay.pack_row(m, a, L, R, normalize=True)
    um, ua, uL, uR, un = lay.unpack_row(row)
    assert torch.equal(um, m) and torch.equal(ua, a) and un is True
    assert torch.equal(uL[0], L[0]) and torch.equal(uR[0], R[0])
    assert torch.count_nonzero(uL[1]) == 0 and torch.count_nonzero(uR[1]) == 0  # padded
    assert row[lay.flag_index] == 1.0
    assert not lay.is_identity_row(row)
    # 1-D L/R are rank-1
    row1 = lay.pack_row(L=L[0], R=R[0])
    assert torch.equal(lay.unpack_row(row1)[2][0], L[0])

    with pytest.raises(ValueError):
        lay.pack_row(L=torch.zeros(3, 4), R=torch.zeros(3, 4))  # k > K
    with pytest.raises(ValueError):
        lay.pack_row(L=torch.zeros(1, 4))  # R missing
    with pytest.raises(ValueError):
        lay.pack_row(m=torch.ones(5))
    with pytest.raises(ValueError):
        lay.pack_row(a=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError):
        BankLayout(4, 0).pack_row(L=torch.zeros(1, 4), R=torch.zeros(1, 4))

    bank = lay.identity_bank(3)
    assert bank.shape == (3, lay.width) and all(lay.is_identity_row(r) for r in bank)


# ---------------------------------------------------------- reference vs oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("d", [16, 33])
def test_matches_oracle(dtype, rank, with_residual, d):
    gen = torch.Generator().manual_seed(1000 * rank + d + with_residual)
    lay = BankLayout(d, rank)
    S, T = 9, 23
    bank = make_bank(lay, S, gen, identity_slots=(0, 3))
    index = torch.randint(0, S, (T + 4,), generator=gen, dtype=torch.int64)  # extra entries unused
    index[-4:] = 10**6  # would be out of range if read
    index_i32 = index.to(torch.int32)
    hidden = (2 * torch.randn(T, d, generator=gen)).to(dtype)
    residual = (3 * torch.randn(T, d, generator=gen)).to(dtype) if with_residual else None

    snap = [x.clone() for x in (hidden, bank, index)] + ([residual.clone()] if with_residual else [])
    res = steer_residual_torch(hidden, residual, bank, index, rank=rank)
    res32 = steer_residual_torch(hidden, residual, bank, index_i32, rank=rank)

    target = residual if with_residual else hidden
    assert res.dtype == dtype and res.shape == (T, d)
    assert res.data_ptr() not in (hidden.data_ptr(), target.data_ptr())
    assert torch.equal(_bits(res), _bits(res32))
    assert_close_to_oracle(res, oracle(hidden, residual, bank, index, rank), dtype)

    ident = (index[:T] == 0) | (index[:T] == 3)
    assert ident.any() and (~ident).any()
    assert torch.equal(_bits(res[ident]), _bits(target[ident]))

    # out of place: nothing was modified
    after = [hidden, bank, index] + ([residual] if with_residual else [])
    for x, y in zip(snap, after):
        assert torch.equal(_bits(x), _bits(y))


def test_steered_rows_actually_change_and_normalize():
    gen = torch.Generator().manual_seed(7)
    d, K = 32, 1
    lay = BankLayout(d, K)
    bank = lay.identity_bank(3)
    L = torch.nn.functional.normalize(torch.randn(1, d, generator=gen), dim=-1)
    bank[1] = lay.pack_row(L=L, R=L)  # project out direction L
    bank[2] = lay.pack_row(m=torch.full((d,), 3.0), normalize=True)  # scale, then renorm: no-op
    hidden, residual = torch.randn(3, d, generator=gen), torch.randn(3, d, generator=gen)
    index = torch.tensor([0, 1, 2])
    res = steer_residual_torch(hidden, residual, bank, index, rank=K)
    new_h = hidden + res
    assert torch.equal(res[0], residual[0])
    assert abs(float(new_h[1] @ L[0])) < 1e-5  # ablated
    torch.testing.assert_close(new_h[2], hidden[2] + residual[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ identity / edge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("with_residual", [True, False])
def test_identity_rows_bitwise(dtype, rank, with_residual):
    gen = torch.Generator().manual_seed(3)
    d, T = 24, 17
    lay = BankLayout(d, rank)
    bank = make_bank(lay, 5, gen, identity_slots=(0, 2))
    hidden = (10 * torch.randn(T, d, generator=gen)).to(dtype)
    residual = (10 * torch.randn(T, d, generator=gen)).to(dtype) if with_residual else None
    target = residual if with_residual else hidden
    # Signed zeros, h == 0 rows, tiny and large values in the target.
    target[0] = -0.0
    target[1, ::2] = 0.0
    target[1, 1::2] = -0.0
    target[2] = torch.finfo(dtype).tiny
    target[3] = -1e4 if dtype is not torch.float16 else -6e4
    if with_residual:
        hidden[1] = -residual[1]  # h == 0 exactly
        hidden[4] = -residual[4]
    else:
        hidden[4] = 0.0
    for idx_val in (0, 2):
        index = torch.full((T,), idx_val, dtype=torch.int32)
        res = steer_residual_torch(hidden, residual, bank, index, rank=rank)
        assert torch.equal(_bits(res), _bits(target))


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("with_residual", [True, False])
def test_zero_h_with_normalize_no_nan(rank, with_residual):
    d, T = 16, 4
    lay = BankLayout(d, rank)
    gen = torch.Generator().manual_seed(11)
    bank = lay.identity_bank(4)
    LR = dict(L=torch.ones(1, d), R=torch.ones(1, d)) if rank else {}
    bank[1] = lay.pack_row(m=torch.full((d,), 2.0), normalize=True, **LR)  # out == 0 too
    bank[2] = lay.pack_row(a=torch.randn(d, generator=gen), normalize=True, **LR)  # out != 0
    bank[3] = lay.identity_row()
    bank[3][lay.flag_index] = 1.0  # identity + normalize
    hidden = torch.zeros(T, d)
    residual = torch.zeros(T, d) if with_residual else None
    if with_residual:
        residual.normal_(generator=gen)
        hidden = -residual
    index = torch.arange(T)
    res = steer_residual_torch(hidden, residual, bank, index, rank=rank)
    assert torch.isfinite(res).all()
    target = residual if with_residual else hidden
    # ||h|| == 0 so every normalized output is rescaled to 0: delta = -h = 0.
    assert torch.equal(res, target)
    assert_close_to_oracle(res, oracle(hidden, residual, bank, index, rank), torch.float32)


def test_empty_and_validation():
    lay = BankLayout(8, 1)
    bank = lay.identity_bank(2)
    h = torch.zeros(0, 8)
    out = steer_residual_torch(h, h, bank, torch.zeros(0, dtype=torch.int64), rank=1)
    assert out.shape == (0, 8)
    with pytest.raises(ValueError):
        steer_residual_torch(torch.zeros(2, 8), None, bank, torch.zeros(2, dtype=torch.int64), rank=0)
    with pytest.raises(ValueError):
        steer_residual_torch(torch.zeros(2, 8), None, bank.double(), torch.zeros(2, dtype=torch.int64), rank=1)
    with pytest.raises(ValueError):
        steer_residual_torch(torch.zeros(3, 8), None, bank, torch.zeros(2, dtype=torch.int64), rank=1)
    with pytest.raises(ValueError):
        steer_residual_torch(torch.zeros(2, 8), torch.zeros(2, 8).half(), bank, torch.zeros(2, dtype=torch.int64), rank=1)
    with pytest.raises(ValueError):
        steer_residual_torch(torch.zeros(2, 8), None, bank, torch.zeros(2), rank=1)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("VSTEER_STEER_BACKEND", raising=False)
    assert get_steer_backend("cpu") is steer_residual_torch
    assert get_steer_backend(torch.device("cpu")) is steer_residual_torch
    if not torch.cuda.is_available():
        assert get_steer_backend("cuda") is steer_residual_torch
        monkeypatch.setenv("VSTEER_STEER_BACKEND", "triton")
        with pytest.raises(RuntimeError):
            get_steer_backend("cuda")
    monkeypatch.setenv("VSTEER_STEER_BACKEND", "torch")
    assert get_steer_backend("cuda") is steer_residual_torch
    monkeypatch.setenv("VSTEER_STEER_BACKEND", "bogus")
    with pytest.raises(ValueError):
        get_steer_backend("cpu")


def test_import_does_not_need_triton():
    import subprocess
    import sys

    code = (
        "import sys, vsteer.kernels as k; "
        "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
        "k.get_steer_backend('cpu'); assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- torch.compile

_COMPILE_BACKEND: str | None = None


def _compile_backend() -> str:
    """'inductor' if it compiles on this machine, else 'aot_eager'."""
    global _COMPILE_BACKEND
    if _COMPILE_BACKEND is None:
        try:
            torch._dynamo.reset()
            f = torch.compile(lambda x: x * 2 + 1, backend="inductor", fullgraph=True)
            assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
            _COMPILE_BACKEND = "inductor"
        except Exception:
            _COMPILE_BACKEND = "aot_eager"
        torch._dynamo.reset()
    return _COMPILE_BACKEND


@pytest.mark.parametrize(
    "rank,with_residual,dtype",
    [(2, True, torch.float32), (0, False, torch.bfloat16)],
)
def test_torch_compile_follows_inplace_updates(rank, with_residual, dtype):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(_compile_backend())
    compiled = torch.compile(steer_residual_torch, backend=counter, fullgraph=True)

    gen = torch.Generator().manual_seed(5)
    d, S, T = 32, 6, 10
    lay = BankLayout(d, rank)
    bank = make_bank(lay, S, gen, identity_slots=(0,))
    index = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    hidden = torch.randn(T, d, generator=gen).to(dtype)
    residual = torch.randn(T, d, generator=gen).to(dtype) if with_residual else None
    target = residual if with_residual else hidden
    tol = TOL[dtype]

    def check() -> None:
        got = compiled(hidden, residual, bank, index, rank=rank)
        want = steer_residual_torch(hidden, residual, bank, index, rank=rank)
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"])
        ident = index[:T] == 0
        assert torch.equal(_bits(got[ident]), _bits(target[ident]))
        return got

    first = check()
    # New slot assignment (in place) and rewritten bank rows (in place).
    index.copy_(torch.tensor([(i * 5 + 1) % S for i in range(T)], dtype=torch.int32))
    index[0] = 0
    new_bank = make_bank(lay, S, torch.Generator().manual_seed(99), identity_slots=(0,), normalize_every=3)
    bank[1:].copy_(new_bank[1:])
    second = check()
    assert not torch.equal(first, second)
    # All-identity assignment: output must be the target.
    index.zero_()
    third = check()
    assert torch.equal(_bits(third), _bits(target))
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    torch._dynamo.reset()


def test_norm_eps_constant():
    from vsteer.kernels import NORM_EPS

    assert math.isclose(NORM_EPS, 1e-6)
