"""Host-side steering plans: segments, slot keys, folding composition into one bank row."""

from __future__ import annotations

import pytest
import torch
from vsteer.kernels import BankLayout, steer_residual_torch

from vsteer import SlotCapacityError
from vsteer.engine.plan import ResolvedIntervention as RI
from vsteer.engine.plan import SteeringPlan, fold_layer
from vsteer.engine.slots import LRUSlotManager
from vsteer.vectors import SteeringVector

D = 16


@pytest.fixture
def vectors():
    g = torch.Generator().manual_seed(0)
    vs = {name: SteeringVector.from_tensors({3: torch.randn(D, generator=g), 5: torch.randn(D, generator=g)}) for name in "abc"}
    return {v.sha256: v for v in vs.values()}, [v.sha256 for v in vs.values()]


def _sequential(h, items, layer, vectors):
    """Apply interventions one after another, exactly as their definitions say."""
    before = h.clone()
    normalize = False
    for it in items:
        if layer not in it.layers:
            continue
        v = vectors[it.vector].layers[layer].double()
        if it.op == "add":
            h = h + it.scale * v
            normalize |= it.normalize
        else:
            u = v / v.norm()
            h = h - (h @ u)[:, None] * u
    if normalize:
        h = h * before.norm(dim=-1, keepdim=True) / h.norm(dim=-1, keepdim=True)
    return h


@pytest.mark.parametrize("order", ["add-ablate", "ablate-add", "add-add-normalize", "ablate-ablate"])
def test_fold_equals_sequential_application(order, vectors):
    store, (a, b, c) = vectors
    items = {
        "add-ablate": [RI("add", a, (3,), 2.0), RI("ablate", b, (3,))],
        "ablate-add": [RI("ablate", b, (3,)), RI("add", a, (3,), 2.0)],
        "add-add-normalize": [RI("add", a, (3,), 2.0, normalize=True), RI("add", c, (3, 5), -1.5)],
        "ablate-ablate": [RI("ablate", a, (3,)), RI("add", c, (3,), 3.0), RI("ablate", b, (3,))],
    }[order]
    layout = BankLayout(hidden_size=D, rank=2)
    row = fold_layer(items, 3, store.__getitem__, layout)
    h = torch.randn(7, D, dtype=torch.float64)
    want = _sequential(h, items, 3, store)
    bank = torch.stack([layout.identity_row(), row])
    got = steer_residual_torch(h.float(), None, bank, torch.ones(7, dtype=torch.int64), rank=2)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_fold_order_matters_for_ablation(vectors):
    store, (a, b, _) = vectors
    layout = BankLayout(hidden_size=D, rank=1)
    r1 = fold_layer([RI("add", a, (3,), 2.0), RI("ablate", b, (3,))], 3, store.__getitem__, layout)
    r2 = fold_layer([RI("ablate", b, (3,)), RI("add", a, (3,), 2.0)], 3, store.__getitem__, layout)
    assert not torch.equal(r1, r2)


def test_layer_not_listed_is_identity(vectors):
    store, (a, _, _) = vectors
    layout = BankLayout(hidden_size=D, rank=1)
    assert layout.is_identity_row(fold_layer([RI("add", a, (3,), 2.0)], 5, store.__getitem__, layout))


def test_segments_cover_positions(vectors):
    _, (a, b, _) = vectors
    plan = SteeringPlan((RI("add", a, (3,), 1.0, positions="prompt"), RI("add", b, (3,), 1.0, positions=(2, 9))))
    segs = plan.segments(prompt_len=5)
    assert [(s.start, s.end, s.active) for s in segs][:3] == [(0, 2, (0,)), (2, 5, (0, 1)), (5, 9, (1,))]
    assert segs[-1].active == () and segs[-1].key is None
    assert len(plan.slot_keys(5)) == 3
    # the same active interventions give the same key, whatever the positions
    other = SteeringPlan((RI("add", b, (3,), 1.0, positions="all"),))
    assert other.segments(5)[0].key == segs[2].key


def test_plan_round_trips_through_extra_args(vectors):
    _, (a, b, _) = vectors
    plan = SteeringPlan((RI("add", a, (3, 5), 2.5, positions=(1, 4), normalize=True), RI("ablate", b, (5,))))
    assert SteeringPlan.from_extra_args(plan.to_extra_args()) == plan
    assert plan.hash == SteeringPlan.from_extra_args(plan.to_extra_args()).hash


def test_lru_slots_pin_evict_and_refuse():
    written = []
    mgr = LRUSlotManager(num_slots=2, write=lambda slot, key: written.append((slot, key)))
    mgr.begin_step()
    assert mgr.acquire("x") == 1 and mgr.acquire("y") == 2 and mgr.acquire("x") == 1
    with pytest.raises(SlotCapacityError, match="capacity|engine has 2"):
        mgr.acquire("z")  # both slots are in use by this step
    mgr.begin_step()
    assert mgr.acquire("y") == 2  # hit, no write
    assert mgr.acquire("z") == 1  # evicts x, the least recently used unpinned slot
    assert written == [(1, "x"), (2, "y"), (1, "z")] and mgr.loads == 3
