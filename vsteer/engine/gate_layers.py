"""Conditional steering (CAST) on the device: pooling each gated request's prompt at the condition
layers, deciding its conditions when the prompt ends, and the per-token gate multipliers.

A gated request owns one row ``r`` of a fixed pool (``max_num_seqs`` rows, row 0 unused). At each
condition layer the wrapped layer adds every token's residual (before its own steering) to the
row its token is pooled into (``pool_index[0]``; 0 = not pooled), and the last prompt token's to a
second sum (``pool_index[1]``). It then evaluates every row's conditions in one fixed-shape pass,

    h = pooled state,  a = c_hat . h,  sim = cos(h, tanh(a c_hat)),  met = sign * (sim - threshold) > 0,

and keeps ``met`` only for the rows the host marked as ending their prompt in this step
(``finalize``) whose condition reads this layer. Gates combine conditions (``any``: max of met;
``all``: 1 - max of (1 - met)). ``gate`` holds ``[1, 0, gate of (row, group) ...]``: a token's
multiplier at layer L is ``gate[gate_index[L, t]]`` (0: ungated, 1: gate not known yet, off).
No host sync and no data-dependent Python branch: the graph replays it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: entries of ``gate`` before the per-(row, group) gates: 0 = ungated (1.0), 1 = off (0.0)
GATE_UNGATED, GATE_OFF, GATE_FIRST = 0, 1, 2
_COS_EPS = 1e-8  # torch.cosine_similarity's


class GateBuffers(NamedTuple):
    """Device state of conditional steering (allocated once)."""

    rows: int  # request rows besides row 0
    k: int  # conditions (and gates) per row
    pool_index: torch.Tensor  # [2, max_tokens] int64: pooled row, last-token row (0 = none)
    finalize: torch.Tensor  # [rows + 1] float32: 1 where the row's gate is decided this step
    count: torch.Tensor  # [rows + 1] float32: prompt length of the row's request (1 when unused)
    cond_vec: torch.Tensor  # [rows + 1, k, d] float32 unit condition vectors
    cond_layer: torch.Tensor  # [rows + 1, k] int64 layer of each condition (-1 = unused)
    cond_thr: torch.Tensor  # [rows + 1, k] float32
    cond_sign: torch.Tensor  # [rows + 1, k] float32: +1 above, -1 below
    cond_last: torch.Tensor  # [rows + 1, k] float32: 1 = pool the last prompt token, 0 = the mean
    cond_met: torch.Tensor  # [rows + 1, k] float32 (0/1)
    member: torch.Tensor  # [rows + 1, k, k] float32: gate g has condition j
    group_all: torch.Tensor  # [rows + 1, k] float32: 1 = combine "all"
    gate: torch.Tensor  # [2 + (rows + 1) * k] float32
    gate_index: torch.Tensor  # [wrapped layers, max_tokens] int64
    pools: dict[int, tuple[torch.Tensor, torch.Tensor]]  # condition layer -> (sum, last) [rows + 1, d]

    def gate_slot(self, row: int, group: int) -> int:
        """Index in ``gate`` of gate ``group`` of request row ``row``."""
        return GATE_FIRST + row * self.k + group


def gate_buffers(*, rows: int, k: int, hidden: int, layers: int, max_tokens: int, condition_layers: list[int],
                 device: torch.device) -> GateBuffers:
    """Allocate the gate state for ``rows`` gated requests and the given condition layers."""
    f32 = dict(dtype=torch.float32, device=device)
    gate = torch.zeros(GATE_FIRST + (rows + 1) * k, **f32)
    gate[GATE_UNGATED] = 1.0
    return GateBuffers(
        rows, k,
        pool_index=torch.zeros(2, max_tokens, dtype=torch.int64, device=device),
        finalize=torch.zeros(rows + 1, **f32),
        count=torch.ones(rows + 1, **f32),
        cond_vec=torch.zeros(rows + 1, k, hidden, **f32),
        cond_layer=torch.full((rows + 1, k), -1, dtype=torch.int64, device=device),
        cond_thr=torch.zeros(rows + 1, k, **f32),
        cond_sign=torch.ones(rows + 1, k, **f32),
        cond_last=torch.zeros(rows + 1, k, **f32),
        cond_met=torch.zeros(rows + 1, k, **f32),
        member=torch.zeros(rows + 1, k, k, **f32),
        group_all=torch.zeros(rows + 1, k, **f32),
        gate=gate,
        gate_index=torch.zeros(layers, max_tokens, dtype=torch.int64, device=device),
        pools={layer: (torch.zeros(rows + 1, hidden, **f32), torch.zeros(rows + 1, hidden, **f32))
               for layer in condition_layers},
    )


_SHARED = ("finalize", "count", "cond_vec", "cond_layer", "cond_thr", "cond_sign", "cond_last", "cond_met",
           "member", "group_all")


def attach_gates(module: torch.nn.Module, gates: GateBuffers | None, layer: int, row: int) -> None:
    """Register the gate buffers a wrapped layer reads (all of them on condition layers)."""
    module._vsteer_gated = gates is not None
    if gates is None or layer not in gates.pools:
        module._vsteer_pool_sum = None
    if gates is None:
        return
    module.register_buffer("_vsteer_gate", gates.gate, persistent=False)
    module.register_buffer("_vsteer_gate_index", gates.gate_index[row], persistent=False)
    if layer not in gates.pools:
        return
    pool_sum, pool_last = gates.pools[layer]
    module.register_buffer("_vsteer_pool_sum", pool_sum, persistent=False)
    module.register_buffer("_vsteer_pool_last", pool_last, persistent=False)
    module.register_buffer("_vsteer_pool_index", gates.pool_index, persistent=False)
    for name in _SHARED:
        module.register_buffer(f"_vsteer_{name}", getattr(gates, name), persistent=False)


def condition_sims(pooled: torch.Tensor, cond_vec: torch.Tensor) -> torch.Tensor:
    """``cos(h, tanh(P h))`` with ``P h = c_hat (c_hat . h)``: pooled ``[..., d]``, unit ``c_hat`` ``[..., d]``."""
    proj = torch.tanh((pooled * cond_vec).sum(-1, keepdim=True) * cond_vec)
    norms = pooled.norm(dim=-1).clamp_min(_COS_EPS) * proj.norm(dim=-1).clamp_min(_COS_EPS)
    return (pooled * proj).sum(-1) / norms


class ConditionLayer:
    """Mixin for wrapped layers: pool the stream of gated prompts and decide conditions (condition
    layers only; the choice is static, fixed when the layer is wrapped)."""

    def _vsteer_conditions(self, stream: torch.Tensor, n: int) -> None:
        act = self._vsteer_activity
        if self._vsteer_eager and not act.pooling:
            return
        h = stream.float()
        self._vsteer_pool_sum.index_add_(0, self._vsteer_pool_index[0, :n], h)
        self._vsteer_pool_last.index_add_(0, self._vsteer_pool_index[1, :n], h)
        if self._vsteer_eager and not act.finalizing:
            return
        mean = self._vsteer_pool_sum / self._vsteer_count[:, None]
        pooled = torch.where(self._vsteer_cond_last[..., None] != 0, self._vsteer_pool_last[:, None, :],
                             mean[:, None, :])  # [rows + 1, k, d]
        sims = condition_sims(pooled, self._vsteer_cond_vec)
        met = (self._vsteer_cond_sign * (sims - self._vsteer_cond_thr) > 0).float()
        decide = (self._vsteer_finalize[:, None] != 0) & (self._vsteer_cond_layer == self._vsteer_layer)
        self._vsteer_cond_met.copy_(torch.where(decide, met, self._vsteer_cond_met))
        every = self._vsteer_group_all[:, :, None] != 0  # [rows + 1, k, 1]
        held = torch.where(every, 1.0 - self._vsteer_cond_met[:, None, :], self._vsteer_cond_met[:, None, :])
        hit = (held * self._vsteer_member).amax(dim=-1)  # [rows + 1, k]
        gates = torch.where(self._vsteer_group_all != 0, 1.0 - hit, hit)
        self._vsteer_gate[GATE_FIRST:].copy_(gates.flatten())

    def _vsteer_gate_scale(self, scale: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The per-token multipliers times the tokens' gates (unchanged in engines without gates)."""
        if not self._vsteer_gated or (self._vsteer_eager and not self._vsteer_activity.gated):
            return scale
        gate = self._vsteer_gate.index_select(0, self._vsteer_gate_index[:n])
        return gate if scale is None else scale * gate
