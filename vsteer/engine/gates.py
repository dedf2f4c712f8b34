"""Host side of conditional steering: each gated request's row, its conditions, and the per-step
token indexes the condition layers and the steer op read (:mod:`vsteer.engine.gate_layers`).

Per request, the token map decides:

- pooling: prompt positions ``[done, prompt_len)`` are added to the request's row (``done`` is a
  watermark, so a prefix recomputed after preemption is not pooled twice); the last prompt token
  also goes to the "last" sum and marks the row for its conditions to be decided in this step;
- gating: at a gated layer, generated positions read the request's gate; the last prompt token
  reads it at layers after every condition layer of that gate (the gate is known there, in the
  same forward pass); other prompt positions are not steered by the gated edits (gate "off").

The scheduler admits at most ``rows`` gated requests at once (preempted ones keep their row), so a
row is always free when a request registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vsteer.engine.gate_layers import GATE_OFF, GATE_UNGATED, GateBuffers
from vsteer.engine.plan import SteeringPlan, _direction
from vsteer.engine.token_map import StepRun


@dataclass
class _Gated:
    row: int
    prompt_len: int
    done: int  # prompt positions below this were pooled
    # per gate: its bank rows, those of them after the gate's last condition layer (the last prompt
    # token reads the gate there), and its gate slot; fixed at registration, so a step builds no index arrays
    layers: tuple[tuple[np.ndarray, np.ndarray, int], ...]


class GateBook:
    """Gated requests, their rows, and the step's pool/gate indexes."""

    def __init__(self, buffers: GateBuffers, layer_row: dict[int, int], vectors: Callable[[str], object]) -> None:
        self.buffers = buffers
        self._layer_row = layer_row
        self._vectors = vectors
        self._free = list(range(buffers.rows, 0, -1))
        self._live: dict[str, _Gated] = {}
        # host staging (pinned on CUDA, like the slot index, so the copies do not wait for the GPU)
        pin = buffers.gate_index.device.type == "cuda"
        stage = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, pin_memory=pin)  # noqa: E731
        self._pool_stage = stage(2, buffers.pool_index.shape[1], dtype=torch.int64)
        self._gate_stage = stage(len(layer_row), buffers.gate_index.shape[1], dtype=torch.int64)
        self._finalize_stage = stage(buffers.rows + 1, dtype=torch.float32)
        self._pool, self._gate = self._pool_stage.numpy(), self._gate_stage.numpy()
        self._finalize = self._finalize_stage.numpy()
        self._prev = 0  # batch rows the last step wrote
        self._prev_final = False

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._live

    def register(self, req_id: str, plan: SteeringPlan, prompt_len: int) -> None:
        """Give a gated request a row and write its conditions there."""
        self.forget(req_id)
        if not self._free:  # the scheduler's admission control makes this unreachable
            raise RuntimeError("no free gate row: more gated requests than the scheduler admits")
        row = self._free.pop()
        g = self.buffers
        k = g.k
        vec = torch.zeros(k, g.cond_vec.shape[2], dtype=torch.float64)
        layer = torch.full((k,), -1, dtype=torch.int64)
        thr, sign, last = torch.zeros(k), torch.ones(k), torch.zeros(k)
        member, every = torch.zeros(k, k), torch.zeros(k)
        gate_layers: dict[tuple, int] = {}  # gate -> largest condition layer
        j = 0
        for group, (combine, conditions) in enumerate(plan.gates()):
            every[group] = float(combine == "all")
            for sha, lc, threshold, compare, pool in conditions:
                c = _direction(self._vectors(sha), lc).double()
                vec[j], layer[j], thr[j] = c / c.norm(), lc, threshold
                sign[j], last[j] = (1.0 if compare == "above" else -1.0), float(pool == "last")
                member[group, j] = 1.0
                j += 1
            gate_layers[(combine, conditions)] = max(c[1] for c in conditions)
        dev = g.cond_vec.device
        g.cond_vec[row].copy_(vec.float().to(dev))
        g.cond_layer[row].copy_(layer.to(dev))
        g.cond_thr[row].copy_(thr.to(dev))
        g.cond_sign[row].copy_(sign.to(dev))
        g.cond_last[row].copy_(last.to(dev))
        g.cond_met[row].zero_()
        g.member[row].copy_(member.to(dev))
        g.group_all[row].copy_(every.to(dev))
        g.count[row] = float(max(prompt_len, 1))
        for pool_sum, pool_last in g.pools.values():
            pool_sum[row].zero_()
            pool_last[row].zero_()
        groups = list(gate_layers)
        by_gate: dict[tuple, list[int]] = {}
        for lyr, gate in plan.layer_gates().items():
            if lyr in self._layer_row:
                by_gate.setdefault(gate, []).append(lyr)
        layers = tuple(
            (np.array([self._layer_row[x] for x in ls]),
             np.array([self._layer_row[x] for x in ls if x > gate_layers[gate]], dtype=np.int64),
             g.gate_slot(row, groups.index(gate)))
            for gate, ls in by_gate.items()
        )
        self._live[req_id] = _Gated(row, prompt_len, 0, layers)

    def forget(self, req_id: str) -> None:
        st = self._live.pop(req_id, None)
        if st is not None:
            self._free.append(st.row)

    def fill(self, runs: list[StepRun]) -> tuple[bool, bool, bool]:
        """Write the step's pool and gate indexes for ``runs``; returns (gated, pooling, finalizing)."""
        prev = self._prev
        if not (prev or self._live):
            return False, False, False
        pool, gate, fin = self._pool, self._gate, self._finalize
        if prev:
            pool[:, :prev] = 0
            gate[:, :prev] = GATE_UNGATED
        if self._prev_final:
            fin[:] = 0.0
        end, pooling, finalizing = 0, False, False
        for run in runs:
            st = self._live.get(run.req_id)
            if st is None:
                continue
            off, n, start = run.off, run.n, run.start
            end = off + n
            last = st.prompt_len - 1
            lo, hi = max(start, st.done), min(start + n, st.prompt_len)
            if lo < hi:
                pool[0, off + lo - start : off + hi - start] = st.row
                pooling = True
                if lo <= last < hi:
                    pool[1, off + last - start] = st.row
                    fin[st.row] = 1.0
                    finalizing = True
                st.done = hi
            generated = off + min(max(st.prompt_len - start, 0), n)  # first generated position in the step
            for rows, known_rows, slot in st.layers:
                gate[rows, off:generated] = GATE_OFF
                gate[rows, generated:end] = slot
                if start <= last < start + n:  # the gate is known after its last condition layer
                    gate[known_rows, off + last - start] = slot
        top = max(end, prev)
        g = self.buffers
        if top:
            g.pool_index[:, :top].copy_(self._pool_stage[:, :top], non_blocking=True)
            g.gate_index[:, :top].copy_(self._gate_stage[:, :top], non_blocking=True)
        if finalizing or self._prev_final:
            g.finalize.copy_(self._finalize_stage, non_blocking=True)
        self._prev, self._prev_final = end, finalizing
        return end > 0, pooling, finalizing
