"""The step's token map: which request owns which run of the flattened batch, at which positions.

Built once per step from what the runner really scheduled (``num_computed_tokens`` is where the
request's scheduled tokens start, after prefix-cache hits, chunked-prefill steps and preemption
recompute), and read by everything that places per-token work: the slot index, capture, effect
sums. Speculative decoding is refused at start-up (:mod:`vsteer.engine.compat`), so every
scheduled token is a real token at position ``start + i``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class StepRun(NamedTuple):
    """Request ``req_id`` owns batch rows ``[off, off + n)``, holding positions ``[start, start + n)``."""

    req_id: str
    off: int
    n: int
    start: int


def step_runs(req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray) -> list[StepRun]:
    """The step's runs, in batch order (the runner's persistent-batch order)."""
    runs, off = [], 0
    for i, req_id in enumerate(req_ids):
        n = int(num_scheduled[i])
        runs.append(StepRun(req_id, off, n, int(num_computed[i])))
        off += n
    return runs
