"""The effect-row pool: more live effect requests than rows (preempted requests keep living) never
runs out, parks and restores sums exactly, and never counts a recomputed position twice."""

from __future__ import annotations

import numpy as np
import torch

from vsteer.engine.effect_rows import EffectBook
from vsteer.engine.token_map import StepRun


def _step(book: EffectBook, runs: list[StepRun]) -> None:
    """What the forward pass does: every batch row adds 1 + its position to its effect row."""
    total = runs[-1].off + runs[-1].n
    index = np.zeros(total, dtype=np.int64)
    book.fill(runs, index)
    for run in runs:
        for i in range(run.n):
            row = index[run.off + i]
            book.sums[7][row] += 1.0 + run.start + i
    book.sums[7][0].zero_()  # row 0 sums nothing
    for req_id in book.finishing:
        book.finish(req_id)


def test_three_requests_on_two_rows_with_preemption_and_recompute():
    book = EffectBook({7: torch.zeros(3, 2)}, num_rows=2)
    for r in "abc":
        book.register(r, {"key": r, "start": 1, "tokens": 3}, prompt_len=2)  # positions [1, 5)
    _step(book, [StepRun("a", 0, 2, 0), StepRun("b", 2, 2, 0)])  # both rows taken
    _step(book, [StepRun("c", 0, 3, 0)])  # a and b preempted: c takes a parked row
    _step(book, [StepRun("a", 0, 4, 0)])  # a recomputed from 0 after preemption: 1 counted once
    _step(book, [StepRun("b", 0, 3, 0), StepRun("c", 3, 1, 3)])
    _step(book, [StepRun("a", 0, 1, 4), StepRun("c", 1, 1, 4)])
    _step(book, [StepRun("b", 0, 2, 3)])
    want = sum(1.0 + p for p in range(1, 5))  # positions 1..4, each once
    results = book.take(["a", "b", "c"])
    assert set(results) == {"a", "b", "c"}
    for key, res in results.items():
        assert res["count"] == 4 and not res["partial"], key
        assert torch.equal(res["sums"][7], torch.full((2,), want)), key


def test_a_request_that_ends_early_is_partial_and_frees_its_row():
    book = EffectBook({7: torch.zeros(2, 1)}, num_rows=1)
    book.register("a", {"key": "a", "tokens": 10}, prompt_len=2)
    _step(book, [StepRun("a", 0, 3, 0)])
    book.finish("a")  # stopped (EOS) before its last position
    res = book.take(["a"])["a"]
    assert res["partial"] and res["count"] == 3
    book.register("b", {"key": "b", "tokens": 1}, prompt_len=1)
    _step(book, [StepRun("b", 0, 2, 0)])
    assert book.take(["b"])["b"]["sums"][7].item() == 1.0 + 2.0
