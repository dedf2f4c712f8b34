"""Numbers are finite by construction: whatever a spec says, across the whole float and integer
range, either validation refuses it (SpecError naming a field) or every row the engine folds, every
schedule multiplier and every steered residual stays finite in float32. And the steer op itself
cannot turn finite inputs into inf or NaN.

Also the engine's seal check (vsteer.engine.edge_seal) on real vLLM requests: engine arguments a
client wrote, however they reached the engine, are dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vsteer import SteeringVector, schedules
from vsteer._errors import SpecError
from vsteer.engine.plan import ModelShape, fold_layer, magnitude_limit, resolve_spec
from vsteer.kernels import BankLayout
from vsteer.vectors import VectorStore

MODEL = ModelShape("smollm2", 30, 576)
LAYOUT = BankLayout(hidden_size=576, rank=1)
F32_MAX = float(np.finfo(np.float32).max)

#: every float a JSON body can carry (no NaN/inf: JSON has none, and pydantic refuses them), from
#: subnormals to 1e308, both signs and -0.0
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-38, 3e38, 3.5e38, 1e39, 1e300, 1e308, -1e308]))
ints = st.one_of(st.integers(), st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, 10**40, 10**400, -1]))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("finite") / "store")
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    store.set_name("unit", store.put(SteeringVector.from_tensors({10: v / v.norm(), 11: v / v.norm()})))
    return store


def _resolve(spec: dict, store: VectorStore):
    return resolve_spec(spec, store=store, model=MODEL, max_slots=128, allow_paths=False)


def _assert_finite_everywhere(plan, store: VectorStore) -> None:
    """Every folded row finite in float32, every schedule multiplier finite in float32, and the
    steered residual of a finite hidden state finite (the steer op over the folded rows)."""
    from vsteer.kernels import steer_residual_torch

    t = np.array([0, 1, 7, 2**20, 2**31 - 1], dtype=np.float64)
    for seg in plan.segments(16):
        if seg.key is None:
            continue
        items = [plan.interventions[i] for i in seg.active]
        h = torch.randn(1, 576, generator=torch.Generator().manual_seed(1)) * 50
        for layer in sorted({layer for it in items for layer in it.layers}):
            row = fold_layer(items, layer, store.get, LAYOUT, seg.start)
            assert bool(torch.isfinite(row).all()), (layer, items)
            sched = plan.layer_schedules().get(layer)
            mult = schedules.values(sched, t).astype(np.float32)
            assert np.isfinite(mult).all()
            for m in mult:
                out = steer_residual_torch(h, None, row[None], torch.zeros(1, dtype=torch.int64), rank=1,
                                           scale=torch.tensor([m]))
                assert bool(torch.isfinite(out).all())
            h = steer_residual_torch(h, None, row[None], torch.zeros(1, dtype=torch.int64), rank=1)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=floats, start=floats, end=floats, over=ints, entry=floats, layers=st.lists(st.integers(9, 12), min_size=1,
       max_size=3, unique=True))
def test_linear_schedules_and_inline_vectors_are_finite_or_refused(store, scale, start, end, over, entry, layers):
    vec = [entry] * 576
    spec = {"interventions": [
        {"op": "add", "vector": vec, "layers": layers, "scale": scale,
         "schedule": {"kind": "linear", "from": start, "to": end, "over": over}},
        {"op": "add", "vector": "unit", "layers": [10, 11], "scale": scale},
    ]}
    try:
        plan = _resolve(spec, store)
    except SpecError as exc:
        assert exc.field  # a refusal names the field
        return
    _assert_finite_everywhere(plan, store)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=ints, length=ints, half_life=floats, lo=ints, hi=ints, scale=floats)
def test_window_exp_and_position_ranges_are_finite_or_refused(store, start, length, half_life, lo, hi, scale):
    spec = {"interventions": [
        {"op": "add", "vector": "unit", "layers": [10], "scale": scale,
         "schedule": {"kind": "window", "start": start, "length": length}},
        {"op": "add", "vector": "unit", "layers": [11], "scale": scale, "positions": [lo, hi],
         "schedule": {"kind": "exp", "half_life": half_life}},
    ]}
    try:
        plan = _resolve(spec, store)
    except SpecError as exc:
        assert exc.field
        return
    _assert_finite_everywhere(plan, store)
    plan.max_slots_needed()  # no OverflowError on any bound


@pytest.mark.parametrize("spec, field", [
    ({"op": "add", "vector": "unit", "layers": [10], "schedule": {"kind": "window", "start": 10**400, "length": 1}},
     "interventions.0.schedule.start"),
    ({"op": "add", "vector": "unit", "layers": [10], "schedule": {"kind": "linear", "from": 0, "to": 1, "over": 10**400}},
     "interventions.0.schedule.over"),
    ({"op": "add", "vector": "unit", "layers": [10], "scale": 1e-300,
      "schedule": {"kind": "linear", "from": 1e300, "to": 1e300, "over": 4}}, "interventions.0.schedule.from"),
    ({"op": "add", "vector": "unit", "layers": [10], "scale": 1e-35,
      "schedule": {"kind": "linear", "from": 1e39, "to": 0, "over": 4}}, "interventions.0.schedule.from"),
    ({"op": "add", "vector": [3e38] * 576, "layers": [10, 11]}, "interventions.0.vector"),
    ({"op": "add", "vector": "unit", "layers": [10], "positions": [0, 10**400]}, "interventions.0.positions"),
])
def test_the_issue_repros_are_refused_naming_the_field(store, spec, field):
    with pytest.raises(SpecError) as err:
        _resolve({"interventions": [spec]}, store)
    assert err.value.field == field


def test_a_stored_vector_past_the_bound_is_refused_and_nothing_is_written(store):
    """A stored vector of huge entries (an operator's file) fails the magnitude bound; an inline
    vector of a refused request is not written to the store."""
    big = store.put(SteeringVector.from_tensors({10: torch.full((576,), 1e30)}))
    with pytest.raises(SpecError) as err:
        _resolve({"interventions": [{"op": "add", "vector": big, "layers": [10]}]}, store)
    assert err.value.field == "interventions"
    before = set(store.list())
    inline = torch.randn(576, generator=torch.Generator().manual_seed(5)).tolist()
    with pytest.raises(SpecError):
        _resolve({"interventions": [{"op": "add", "vector": inline, "layers": [10]},
                                    {"op": "add", "vector": "unit", "layers": [99]}]}, store)
    assert set(store.list()) == before
    created: set[str] = set()
    resolve_spec({"interventions": [{"op": "add", "vector": inline, "layers": [10]}]}, store=store, model=MODEL,
                 created=created)
    assert len(created) == 1 and set(store.list()) == before | created


def test_magnitude_limit_follows_the_engine_dtype():
    assert magnitude_limit("float32") == magnitude_limit(torch.bfloat16) > 1e15
    assert magnitude_limit(torch.float16) < float(torch.finfo(torch.float16).max)


@settings(max_examples=300, deadline=None)
@given(h=floats, m=floats, a=floats, mult=floats, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_the_steer_op_never_emits_non_finite_from_finite_inputs(h, m, a, mult, dtype):
    from vsteer.kernels import steer_residual_torch

    d = 4
    tmax = float(torch.finfo(dtype).max)
    clip = lambda x: max(-F32_MAX, min(F32_MAX, x))  # noqa: E731 - bank rows are float32
    hidden = torch.full((2, d), max(-tmax, min(tmax, h)), dtype=dtype)
    residual = torch.full((2, d), max(-tmax, min(tmax, -h / 3)), dtype=dtype)
    row = LAYOUT_SMALL.pack_row(torch.full((d,), clip(m)), torch.full((d,), clip(a)), torch.full((1, d), clip(m)),
                                torch.zeros(1, d), False)
    bank = torch.stack([LAYOUT_SMALL.identity_row(), row])
    out = steer_residual_torch(hidden, residual, bank, torch.tensor([0, 1]), rank=1,
                               scale=torch.tensor([1.0, clip(mult)], dtype=torch.float32))
    if torch.isfinite(hidden.float() + residual.float()).all():
        assert bool(torch.isfinite(out).all())
    assert torch.equal(out[0], residual[0])  # the identity row still changes nothing


LAYOUT_SMALL = BankLayout(hidden_size=4, rank=1)


def test_engine_drops_unsealed_arguments_on_a_real_vllm_request(monkeypatch):
    """The scheduler's seal check on real ``vllm.v1.request.Request`` objects: a forged plan,
    tenant tag or salt is dropped (the request runs unsteered with a salt of its own); what the
    edge sealed is kept exactly."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.request import Request

    from vsteer.engine import edge_seal
    from vsteer.engine.scheduler import SteeringScheduler

    secret = b"0" * 64
    gate = SimpleNamespace(_vsteer_secret=secret)

    def request(extra: dict | None, salt: str | None) -> Request:
        params = SamplingParams(max_tokens=1, extra_args=dict(extra) if extra else None)
        return Request("r", prompt_token_ids=[1, 2, 3], sampling_params=params, pooling_params=None,
                       cache_salt=salt, block_hasher=None)

    plan = '{"v": 1, "interventions": []}'
    forged = {"vsteer": plan, "vsteer_tenant": "bob", "vsteer_seal": "0" * 64}
    req = request(forged, f"{edge_seal.SALT_PREFIX}{'0' * 32}:{'0' * 32}")
    extra, salt = SteeringScheduler._vsteer_unseal(gate, req, dict(forged))
    assert extra == {} and req.sampling_params.extra_args is None
    assert salt.startswith(edge_seal.UNSEALED_PREFIX)
    other = SteeringScheduler._vsteer_unseal(gate, request(None, None), {})[1]
    assert other.startswith(edge_seal.UNSEALED_PREFIX) and other != salt  # no shared namespace

    good_salt = edge_seal.seal_salt(secret, "bob", "x")
    sealed = {"vsteer": plan, "vsteer_tenant": "bob", "keep": 1,
              "vsteer_seal": edge_seal.seal_args(secret, plan, "bob", good_salt)}
    req = request(sealed, good_salt)
    extra, salt = SteeringScheduler._vsteer_unseal(gate, req, dict(sealed))
    assert extra == {"vsteer": plan, "vsteer_tenant": "bob", "keep": 1} and salt == good_salt
    # the same seal over another tenant, another salt or an extra vsteer key does not verify
    for change in ({"vsteer_tenant": "alice"}, {"vsteer_capture": {"layers": [1], "path": "/tmp/x"}}):
        bad = {**sealed, **change}
        assert SteeringScheduler._vsteer_unseal(gate, request(bad, good_salt), dict(bad))[0] == {"keep": 1}
    assert SteeringScheduler._vsteer_unseal(gate, request(sealed, good_salt + "y"), dict(sealed))[0] == {"keep": 1}
    assert len(good_salt) <= 128 and good_salt != edge_seal.seal_salt(secret, "alice", "x")
    assert edge_seal.seal_salt(secret, "bob", "x") != edge_seal.seal_salt(b"1" * 64, "bob", "x")


def test_a_request_that_goes_non_finite_fails_alone_and_leaves_no_dirty_kv(eager_llm, directions):
    """Defence in depth, in the real engine: a fault makes one steered request's residual stream NaN
    from layer 3 on (tests/_faults.py), so its KV blocks, hidden states and logits are NaN. That
    request ends with finish reason "error" and a 422 failure naming "steering"; a request in the
    same batch and every request after it (which are handed the failed request's freed blocks
    first) equal what they gave before, tokens and logprobs; the failed request's blocks left the
    prefix cache."""
    from vllm import SamplingParams

    from tests import _faults
    from vsteer.engine.failures import parse_failure

    sp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    poisoned = "Numbers can overflow when a long chain of products grows without bound, " * 5 + "and then"
    others = ["The capital of France is", "My favourite colour is", "Once upon a time there was"]
    spec = {"interventions": [{"op": "add", "vector": directions["love"].sha256, "layers": [8],
                               "scale": _faults.FAULT_SCALE}]}

    def run(prompts, steering):
        return [(list(o.outputs[0].token_ids), [{k: v.logprob for k, v in p.items()} for p in o.outputs[0].logprobs or []],
                 o.outputs[0].finish_reason, o.outputs[0].stop_reason, o.num_cached_tokens)
                for o in eager_llm.generate(prompts, sp, steering=steering)]

    def assert_same(got, want):
        assert got[0] == want[0] and got[2] == want[2] != "error"
        for g, w in zip(got[1], want[1], strict=True):
            assert g.keys() == w.keys() and all(abs(g[k] - w[k]) < 1e-4 for k in g)

    before = run(others, None)
    eager_llm.engine.collective_rpc(lambda worker: _faults.install(worker.model_runner))
    try:
        mixed = run([poisoned, others[0]], [spec, None])
        alone = run([poisoned], [spec])
    finally:
        eager_llm.engine.collective_rpc(lambda worker: _faults.remove(worker.model_runner))
    for tokens, logprobs, reason, stop, _ in (mixed[0], alone[0]):
        failure = parse_failure(stop)
        assert reason == "error" and failure is not None, (reason, stop)
        assert failure.status == 422 and failure.field == "steering" and "non-finite" in failure.message
        assert tokens == []
    assert_same(mixed[1], before[0])
    for got, want in zip(run(others, None), before, strict=True):
        assert_same(got, want)
    clean = run([poisoned], [spec])[0]  # no fault now: the scale is harmless
    assert clean[2] != "error" and clean[0]
    assert clean[4] == 0, "the failed request's blocks were left in the prefix cache"


@pytest.mark.parametrize("failure, code, param", [
    ((400, "interventions", "vector abc was deleted: before it ran"), 400, "interventions"),
    ((422, "steering", "non-finite: lower the scale"), 422, "steering"),
    ((500, None, "non-finite"), 500, None),
])
def test_a_failure_reason_travels_to_the_http_error_it_names(failure, code, param):
    """The label the scheduler writes into stop_reason reads back whole (colons in the message too),
    and vLLM's own error-response builder answers it with that status and field."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from vsteer.engine.failures import Failure, parse_failure
    from vsteer.server.engine_failures import failure_error

    f = Failure(*failure)
    assert parse_failure(f.reason()) == f
    assert parse_failure("length") is None and parse_failure(7) is None and parse_failure(None) is None
    err = create_error_response(failure_error(f)).error
    assert (err.code, err.param) == (code, param) and f.message in err.message
