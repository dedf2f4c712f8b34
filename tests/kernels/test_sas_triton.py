"""Triton SAS kernel vs the torch reference, and the SAS backend pick.

GPU tests are marked ``gpu`` and skipped without CUDA+Triton. One CPU test runs the same kernels
through Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess), so their semantics are
checked without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vsteer.kernels import BACKEND_ENV, get_sas_backend, sas_delta_torch

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001
    _HAVE_TRITON = False

_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (_CUDA and _HAVE_TRITON), reason="needs a CUDA GPU with Triton")


def make_case(T, d, m, U, num_slots, dtype, seed, device="cuda", support=None, weight_dtype=torch.float32):
    """Padded SAE weights ([m + 1] features, zero padding feature m), a bank, a padded union."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w_enc_t = torch.randn(m + 1, d, generator=g) / d**0.5
    b_enc = 0.1 * torch.randn(m + 1, generator=g)
    w_dec = torch.randn(m + 1, d, generator=g) / 8
    thr = 0.3 * torch.rand(m + 1, generator=g)
    for t in (w_enc_t, w_dec):
        t[m] = 0
    b_enc[m], thr[m] = 0, 0
    n_real = min(U, m) if support is None else support
    feats = torch.randperm(m, generator=g)[:n_real].sort().values
    union = torch.cat([feats, torch.full((U - n_real,), m, dtype=torch.int64)])
    bank = torch.zeros(num_slots + 1, m + 1)
    for slot in range(1, num_slots + 1):
        pick = feats[torch.rand(n_real, generator=g) < 0.5]
        bank[slot, pick] = 3 * torch.randn(pick.numel(), generator=g)
    h = (2 * torch.randn(T, d, generator=g)).to(dtype)
    index = torch.randint(0, num_slots + 1, (T + 3,), generator=g, dtype=torch.int32)
    if T:
        index[0] = 0
    index[T:] = 2**30  # never read
    to = lambda x: x.to(device)
    return (to(h), to(index), to(bank), to(w_enc_t).to(weight_dtype), to(b_enc), to(w_dec).to(weight_dtype),
            to(thr), to(union))


def check(T, d, m, U, num_slots, dtype, activation, seed, **kw):
    from vsteer.kernels.sas_triton import sas_delta_triton

    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(T, d, m, U, num_slots, dtype, seed, **kw)
    th = thr if activation == "jumprelu" else None
    snap = [x.clone() for x in (h, index, bank, union)]
    got = sas_delta_triton(h, index, bank, w_enc_t, b_enc, w_dec, th, union, activation=activation)
    want = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, th, union, activation=activation)
    torch.cuda.synchronize()
    assert got.dtype == torch.float32 and got.shape == (T, d)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    zero = index[:T] == 0
    assert torch.equal(got[zero], torch.zeros_like(got[zero]))
    for x, y in zip(snap, (h, index, bank, union)):
        assert torch.equal(x, y)
    return got


SHAPES = [  # T, d, m (d_sae), U
    (1, 64, 512, 16),
    (7, 576, 4096, 16),
    (300, 2304, 16384, 128),
    (33, 2304, 65536, 1024),
    (129, 100, 700, 37),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T,d,m,U", SHAPES)
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(T, d, m, U, activation, dtype):
    check(T, d, m, U, 6, dtype, activation, seed=T + d + U)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_triton_edge_cases(activation):
    from vsteer.kernels.sas_triton import sas_delta_triton

    check(0, 64, 128, 16, 3, torch.float32, activation, seed=1)  # no tokens
    check(5, 64, 128, 16, 3, torch.float16, activation, seed=2)
    check(5, 64, 128, 16, 3, torch.float32, activation, seed=3, weight_dtype=torch.bfloat16)
    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(9, 64, 128, 16, 3, torch.float32, 4)
    th = thr if activation == "jumprelu" else None
    empty = union[:0]
    assert torch.equal(sas_delta_triton(h, index, bank, w_enc_t, b_enc, w_dec, th, empty, activation=activation),
                       torch.zeros(9, 64, device="cuda"))
    got = sas_delta_triton(h, index.long(), bank, w_enc_t, b_enc, w_dec, th, union.int(), activation=activation)
    want = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, th, union, activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a strided (non-contiguous rows) h is fine
    wide = torch.randn(9, 128, device="cuda")
    got = sas_delta_triton(wide[:, :64], index, bank, w_enc_t, b_enc, w_dec, th, union, activation=activation)
    want = sas_delta_torch(wide[:, :64], index, bank, w_enc_t, b_enc, w_dec, th, union, activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_triton_topk_and_no_union_fall_back_to_reference():
    from vsteer.kernels.sas_triton import sas_delta_triton

    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(11, 64, 128, 16, 3, torch.float32, 5)
    for act, k in (("topk", 8), ("relu", None), ("jumprelu", None)):
        th = thr if act == "jumprelu" else None
        got = sas_delta_triton(h, index, bank, w_enc_t, b_enc, w_dec, th, None, activation=act, k=k)
        want = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, th, None, activation=act, k=k)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="TopK SAS needs the full encode"):
        sas_delta_triton(h, index, bank, w_enc_t, b_enc, w_dec, None, union, activation="topk", k=8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_follows_inplace_updates(backend):
    from vsteer.kernels.sas_triton import sas_delta_triton

    fn = sas_delta_triton if backend == "triton" else sas_delta_torch
    T, d, m, U = 16, 256, 1024, 32
    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(T, d, m, U, 4, torch.bfloat16, 6, support=U - 4)
    index.zero_()

    def run():
        return fn(h, index, bank, w_enc_t, b_enc, w_dec, thr, union, activation="jumprelu")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    def replay_and_check():
        graph.replay()
        torch.cuda.synchronize()
        want = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr, union, activation="jumprelu")
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
        return out.clone()

    assert torch.equal(replay_and_check(), torch.zeros(T, d, device="cuda"))
    index[:T].copy_(torch.arange(T, device="cuda") % 5)
    o1 = replay_and_check()
    assert o1.abs().sum() > 0
    bank[2].mul_(-1.5)
    replay_and_check()
    # a new feature enters the union in place of a padding entry
    outside = next(f for f in range(m) if f not in set(union.tolist()))
    union[-1] = outside
    bank[3, outside] = 2.0
    o3 = replay_and_check()
    assert not torch.equal(o3[index[:T] == 3], o1[index[:T] == 3])
    h.copy_(torch.randn_like(h))
    replay_and_check()


@pytest.mark.gpu
@needs_gpu
def test_triton_under_torch_compile():
    from vsteer.kernels.sas_triton import sas_delta_triton

    torch._dynamo.reset()
    compiled = torch.compile(sas_delta_triton, fullgraph=True)
    h, index, bank, w_enc_t, b_enc, w_dec, thr, union = make_case(7, 576, 4096, 64, 4, torch.bfloat16, 7)
    for step in range(3):
        got = compiled(h, index, bank, w_enc_t, b_enc, w_dec, thr, union, activation="jumprelu")
        want = sas_delta_torch(h, index, bank, w_enc_t, b_enc, w_dec, thr, union, activation="jumprelu")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
        index[:7].copy_((index[:7] + 1) % 5)
        bank[1 + step].mul_(2.0)
    torch._dynamo.reset()


# ------------------------------------------------- CPU: Triton interpreter run

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import itertools, torch
    from vsteer.kernels.sas_reference import sas_delta_torch
    from vsteer.kernels.sas_triton import sas_delta_triton
    from tests.kernels.test_sas_triton import make_case

    cases = [  # T, d, m, U, slots, support
        (1, 16, 40, 16, 2, None),
        (19, 48, 100, 20, 4, 12),
        (70, 100, 300, 70, 5, None),
        (5, 33, 64, 64, 3, 64),   # the whole SAE, no padding
        (9, 600, 80, 20, 3, None),  # d split into 3 chunks, the last one partial
        (0, 16, 40, 16, 2, None),  # no tokens
    ]
    for (T, d, m, U, S, sup), act, dtype, idx_t in itertools.product(
            cases, ("relu", "jumprelu"), (torch.float32, torch.bfloat16), (torch.int32, torch.int64)):
        h, index, bank, we, be, wd, thr, union = make_case(T, d, m, U, S, dtype, seed=T + d + U, device="cpu",
                                                           support=sup)
        index, union = index.to(idx_t), union.to(idx_t)
        th = thr if act == "jumprelu" else None
        got = sas_delta_triton(h, index, bank, we, be, wd, th, union, activation=act)
        want = sas_delta_torch(h, index, bank, we, be, wd, th, union, activation=act)
        assert got.dtype == torch.float32 and got.shape == (T, d), (got.dtype, got.shape)
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
        zero = index[:T] == 0
        assert torch.equal(got[zero], torch.zeros_like(got[zero]))
        if T > 1:
            assert got[~zero].abs().sum() > 0
    # an empty union, and the fallbacks
    h, index, bank, we, be, wd, thr, union = make_case(4, 16, 40, 16, 2, torch.float32, 0, device="cpu")
    assert torch.equal(sas_delta_triton(h, index, bank, we, be, wd, None, union[:0]), torch.zeros(4, 16))
    assert torch.equal(sas_delta_triton(h, index, bank, we, be, wd, None, None),
                       sas_delta_torch(h, index, bank, we, be, wd, None, None))
    assert torch.equal(sas_delta_triton(h, index, bank, we, be, wd, None, None, activation="topk", k=3),
                       sas_delta_torch(h, index, bank, we, be, wd, None, None, activation="topk", k=3))
    for bad, match in ((dict(threshold=None, activation="jumprelu"), "needs threshold"),
                       (dict(w_dec=wd[:, :8]), "w_dec must be")):
        args = dict(h=h, index=index, bank=bank, w_enc_t=we, b_enc=be, w_dec=wd, threshold=thr, union=union)
        args.update(bad)
        try:
            sas_delta_triton(**args)
        except ValueError as exc:
            assert match in str(exc), exc
        else:
            raise AssertionError(f"no error for {bad}")
    print("INTERPRET_OK")
    """
)


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton not installed")
def test_triton_kernel_in_interpreter_matches_reference():
    """Runs the real kernels on CPU via TRITON_INTERPRET=1 (semantics only, not speed)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], check=False, env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRET_OK" in proc.stdout, proc.stderr[-4000:]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from triton.runtime.interpreter import InterpretedFunction
    from vsteer.kernels.sas_reference import sas_delta_torch
    from vsteer.kernels.sas_triton import sas_delta_triton
    from tests.kernels.test_sas_triton import make_case

    # On a GPU dynamo wraps a Triton JITFunction launch in its own graph node. Under
    # TRITON_INTERPRET=1 a kernel is an InterpretedFunction that dynamo does not know and would trace
    # into (and fail on), so its launch runs outside dynamo here: a graph break at the launch, with
    # everything around it (shapes, grid, block sizes, scratch allocation) traced as in the engine.
    for name in ("run", "__call__"):
        setattr(InterpretedFunction, name, torch._dynamo.disable(getattr(InterpretedFunction, name)))

    compiled = torch.compile(sas_delta_triton, backend="aot_eager")
    h, index, bank, we, be, wd, thr, union = make_case(70, 48, 100, 40, 4, torch.float32, seed=11, device="cpu",
                                                       support=24)
    for step, T in enumerate((7, 70, 3)):
        x = h[:T]
        torch._dynamo.mark_dynamic(x, 0)  # the token dimension, dynamic as in vLLM's traced model
        got = compiled(x, index, bank, we, be, wd, thr, union, activation="jumprelu")
        want = sas_delta_torch(x, index, bank, we, be, wd, thr, union, activation="jumprelu")
        assert got.shape == (T, 48)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))
        assert got[index[:T] != 0].abs().sum() > 0
        bank[1 + step].mul_(-2.0)  # bank contents written after compilation take effect
    # One compiled entry served every token count: nothing in the traced Python (block sizes
    # included) guarded on T, so vLLM dropping the guards cannot freeze a size-dependent choice.
    entries = _debug_get_cache_entry_list(sas_delta_triton.__code__)
    assert len(entries) == 1, f"{len(entries)} compiled entries: something guards on the token count"
    print("COMPILE_OK")
    """
)


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton not installed")
def test_triton_kernel_under_torch_compile_one_graph_for_all_token_counts():
    """sas_delta_triton under torch.compile with a dynamic token count, kernels in Triton's
    interpreter: one compiled function at T = 7, 70 and 3 matches the reference, no recompile."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], check=False, env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "COMPILE_OK" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------- backend pick (CPU)


def test_sas_backend_pick(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert get_sas_backend("cpu") is sas_delta_torch
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert get_sas_backend("cuda:0") is sas_delta_torch
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="auto|torch|triton"):
        get_sas_backend("cpu")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="Triton cannot be used on cpu"):
        get_sas_backend("cpu")
    if _CUDA and _HAVE_TRITON:
        from vsteer.kernels.sas_triton import sas_delta_triton

        monkeypatch.delenv(BACKEND_ENV)
        assert get_sas_backend("cuda") is sas_delta_triton


def test_lazy_export():
    import vsteer.kernels as k

    assert "sas_delta_triton" in dir(k) and "get_sas_backend" in k.__all__
    if _HAVE_TRITON:
        from vsteer.kernels.sas_triton import sas_delta_triton

        assert k.sas_delta_triton is sas_delta_triton

