"""Per-request SAE-code sums for feature-effect measurement, in a fixed pool of device rows.

Each effect request sums f(h) over absolute positions ``[start, end)``; a watermark (``done``)
keeps a prefix recomputed after preemption from being counted twice. The pool has
``max_num_seqs`` rows, one per request that can be scheduled in a step. A request that is not
scheduled this step (preempted, or waiting) may lose its row to one that is: its sums are parked
on the host and restored when it runs again, so no request ever finds the pool empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vsteer.engine.token_map import StepRun


@dataclass
class _Effect:
    key: str
    start: int
    end: int
    done: int  # positions below this were summed
    row: int | None = None
    parked: dict[int, torch.Tensor] | None = None  # layer -> host copy of the sums while rowless
    lost: bool = False  # no row was free: nothing more is summed, the result is partial


class EffectBook:
    """Effect requests, their rows in ``sums`` (layer -> [rows + 1, d_sae]; row 0 sums nothing)
    and their finished results."""

    def __init__(self, sums: dict[int, torch.Tensor], num_rows: int) -> None:
        self.sums = sums
        self._free = list(range(num_rows, 0, -1))
        self._live: dict[str, _Effect] = {}
        self.results: dict[str, dict] = {}
        self.finishing: list[str] = []  # requests whose last position runs this step

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._live

    def register(self, req_id: str, spec: dict, prompt_len: int) -> None:
        if req_id in self._live:  # the same request again: keep its sums and watermark
            return
        start = int(spec.get("start", 0))
        self._live[req_id] = _Effect(str(spec["key"]), start, prompt_len + int(spec["tokens"]), start)

    def fill(self, runs: list[StepRun], index: np.ndarray) -> None:
        """Write the step's effect-row index (0 = not summed) for the batch rows of ``runs``."""
        self.finishing = []
        scheduled = {run.req_id for run in runs if run.req_id in self._live}
        for run in runs:
            index[run.off : run.off + run.n] = 0
            eff = self._live.get(run.req_id)
            if eff is None:
                continue
            lo, hi = max(run.start, eff.done), min(run.start + run.n, eff.end)
            if lo < hi:
                row = self._row_for(eff, scheduled)
                if row:
                    index[run.off + lo - run.start : run.off + hi - run.start] = row
                    eff.done = hi
            if eff.done >= eff.end:
                self.finishing.append(run.req_id)

    def finish(self, req_id: str) -> None:
        """Hand out a request's sums (``partial`` if it ended before its last position)."""
        eff = self._live.pop(req_id, None)
        if eff is None:
            return
        if eff.row is not None:
            sums = {layer: t[eff.row].cpu().clone() for layer, t in self.sums.items()}
            self._free.append(eff.row)
        elif eff.parked is not None:
            sums = eff.parked
        else:
            sums = {layer: torch.zeros(t.shape[1]) for layer, t in self.sums.items()}
        self.results[eff.key] = {"sums": sums, "count": eff.done - eff.start, "partial": eff.lost or eff.done < eff.end}

    def take(self, keys: list[str]) -> dict[str, dict]:
        return {k: self.results.pop(k) for k in keys if k in self.results}

    def _row_for(self, eff: _Effect, scheduled: set[str]) -> int:
        if eff.row is not None:
            return eff.row
        row = self._free.pop() if self._free else self._take_row(scheduled)
        if row == 0:
            eff.lost, eff.done = True, eff.end  # nothing more is summed; finish() reports it partial
            return 0
        for layer, t in self.sums.items():
            if eff.parked is not None:
                t[row].copy_(eff.parked[layer])
            else:
                t[row].zero_()
        eff.parked, eff.row = None, row
        return row

    def _take_row(self, scheduled: set[str]) -> int:
        """Park the sums of a request not in this step and take its row (0 if none: unreachable, a
        step schedules at most max_num_seqs requests, the number of rows; the request is then
        reported partial rather than stopping the engine)."""
        for req_id, other in self._live.items():
            if other.row is not None and req_id not in scheduled:
                row, other.row = other.row, None
                other.parked = {layer: t[row].cpu().clone() for layer, t in self.sums.items()}
                return row
        return 0
