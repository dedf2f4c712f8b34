"""The model-runner side of steering: per-step slot index and slot rows, runner-independent.

``SteeringRunnerMixin`` holds everything steering does per request and per step, the way vLLM's
LoRA mixin does for adapters; a thin adapter per vLLM model runner (:mod:`vsteer.engine.runner_v1`
for V1's ``GPUModelRunner``/``CPUModelRunner``, :mod:`vsteer.engine.runner_v2` for Model Runner
V2) calls it from that runner's own hook points: ``load_model`` wraps the decoder layers; new and
finished requests go to :meth:`~SteeringRunnerMixin._vsteer_register` and
:meth:`~SteeringRunnerMixin._vsteer_forget`; once the runner has laid out the step's batch, the
adapter turns it into the step's token map (:mod:`vsteer.engine.token_map`) and
:meth:`~SteeringRunnerMixin._vsteer_fill_index` fills from it the per-token slot index (host work,
then one in-place copy), the schedule multipliers, the gates, the effect-row index
(:mod:`vsteer.engine.effect_rows`) and the capture rows to read (:mod:`vsteer.engine.capture`);
after the forward pass :meth:`~SteeringRunnerMixin._vsteer_after_forward` copies captures out and
flags the requests whose final hidden states or logits went non-finite, which
:meth:`~SteeringRunnerMixin._vsteer_label_output` hands to the scheduler through the step's output
(:mod:`vsteer.engine.failures`). The scheduler has checked every request
(:mod:`vsteer.engine.request_args`) before it gets here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsteer import schedules
from vsteer.engine.capture import CaptureBook
from vsteer.engine.config import SteeringEngineConfig
from vsteer.engine.effect_rows import EffectBook
from vsteer.engine.failures import blank_requests, flagged_requests
from vsteer.engine.gates import GateBook
from vsteer.engine.layers import SteeringBuffers, wrap_decoder_layers
from vsteer._errors import EngineError
from vsteer.engine.plan import EXTRA_ARGS_KEY, Segment, SteeringPlan, _direction, fold_layer
from vsteer.engine.request_args import CAPTURE_ARGS_KEY, EFFECTS_ARGS_KEY, TENANT_ARGS_KEY
from vsteer.engine.slots import LRUSlotManager
from vsteer.engine.token_map import StepRun
from vsteer.kernels import BankLayout
from vsteer.vectors._pg_store import open_store

__all__ = ["CAPTURE_ARGS_KEY", "EFFECTS_ARGS_KEY", "TENANT_ARGS_KEY", "SteeringRunnerMixin", "steered_runner_class"]


@dataclass
class _RequestSteering:
    segments: list[Segment]
    keys: frozenset[str]
    single_key: str | None | bool  # the key when one segment covers everything, else False
    prompt_len: int = 0
    scheduled: tuple[tuple[np.ndarray, tuple], ...] = ()  # (bank rows of the layers, their schedule)


class SteeringRunnerMixin:
    """Per-request steering in a vLLM model runner; an adapter mixes it in ahead of the runner
    class and calls it from that runner's hook points."""

    #: which vLLM model runner the adapter serves ("v1" or "v2"; in ``vsteer_stats``)
    vsteer_runner = "?"

    # --- load ---------------------------------------------------------------------------------
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        cfg = SteeringEngineConfig.from_vllm(self.vllm_config.additional_config)
        hf = self.model_config.hf_text_config
        self._vsteer_cfg = cfg
        self._vsteer_layout = BankLayout(hidden_size=hf.hidden_size, rank=cfg.max_ablation_rank)
        max_tokens = max(
            self.scheduler_config.max_num_batched_tokens,
            self.compilation_config.max_cudagraph_capture_size or 0,
        )
        saes, names = _load_engine_saes(cfg.saes, hf.hidden_size)
        unknown = sorted(set(cfg.effect_saes) - set(names))
        if unknown:
            raise EngineError(f"effect_saes {unknown} are not among the engine's SAEs {sorted(names)}")
        effect_rows = self.scheduler_config.max_num_seqs
        num_slots = cfg.resolved_max_slots(self.vllm_config)
        self._vsteer_buffers: SteeringBuffers = wrap_decoder_layers(
            self.get_model(),
            layout=self._vsteer_layout,
            num_slots=num_slots,
            max_tokens=max_tokens,
            steerable_layers=cfg.steerable_layers,
            capture_layers=cfg.capture_layers,
            device=self.device,
            dtype=self.model_config.dtype,
            eager=self.model_config.enforce_eager,
            saes=saes,
            max_sas_support=cfg.max_sas_support,
            effect_layers=frozenset(names[n] for n in cfg.effect_saes),
            effect_rows=effect_rows if cfg.effect_saes else 0,
            condition_layers=frozenset(cfg.condition_layers),
            gate_rows=int(self.scheduler_config.max_num_seqs),
            max_conditions=cfg.max_conditions,
        )
        self._vsteer_effects = EffectBook(
            {layer: sas.effect_sums for layer, sas in self._vsteer_buffers.sas.items() if sas.effect_sums is not None},
            effect_rows if cfg.effect_saes else 0,
        )
        self._vsteer_effect_host = np.zeros(max_tokens, dtype=np.int64)
        self._vsteer_effect_stage = torch.from_numpy(self._vsteer_effect_host)  # shares the host array
        self._vsteer_effect_prev = 0
        # slot -> SAS layer -> the features its bank row touches; refreshed union per step
        self._vsteer_slot_support: dict[int, dict[int, np.ndarray]] = {}
        self._vsteer_union_stamp: tuple | None = None
        self._vsteer_slot_writes = 0
        self._vsteer_slot_layers: dict[int, frozenset[int]] = {}  # slot -> layers its row changes
        self._vsteer_layer_row = {layer: i for i, layer in enumerate(self._vsteer_buffers.layers)}
        self._vsteer_store = open_store(Path(cfg.store))
        gates = self._vsteer_buffers.gates
        self._vsteer_gates = GateBook(gates, self._vsteer_layer_row, self._vsteer_store.get) if gates else None
        self._vsteer_slots = LRUSlotManager(num_slots, self._vsteer_write_slot)
        self._vsteer_index_host = np.zeros(max_tokens, dtype=np.int32)
        self._vsteer_index_stage = torch.from_numpy(self._vsteer_index_host)
        self._vsteer_scale_stage = torch.ones(len(self._vsteer_buffers.layers), max_tokens, dtype=torch.float32)
        if self.device.type == "cuda":
            self._vsteer_index_stage = self._vsteer_index_stage.pin_memory()
            self._vsteer_index_host = self._vsteer_index_stage.numpy()
            self._vsteer_scale_stage = self._vsteer_scale_stage.pin_memory()
        self._vsteer_scale_host = self._vsteer_scale_stage.numpy()
        self._vsteer_scale_prev = 0  # tokens whose multipliers the last step wrote
        self._vsteer_scheduled: set[str] = set()  # requests with a schedule: the only ones fill_scale visits
        self._vsteer_prev_tokens = 0
        self._vsteer_requests: dict[str, _RequestSteering] = {}
        # slot key -> (a plan using it, its active interventions, first position, live requests)
        self._vsteer_key_source: dict[str, tuple[SteeringPlan, tuple[int, ...], int, int]] = {}
        self._vsteer_captures = CaptureBook(hf.hidden_size)
        self._vsteer_capturing = False  # this step computes rows a capture request needs
        self._vsteer_runs: list[StepRun] = []  # the step's token map
        self._vsteer_nonfinite: set[str] = set()  # requests whose hidden states or logits went non-finite

    # --- request bookkeeping ----------------------------------------------------------------
    def _vsteer_register(self, req_id: str, prompt_len: int, params: Any) -> None:
        """Start tracking a new request (``params``: its ``SamplingParams``, or None)."""
        extra = (params.extra_args or {}) if params is not None else {}
        plan_data = extra.get(EXTRA_ARGS_KEY)
        if plan_data is not None:
            plan = SteeringPlan.from_extra_args(plan_data)
            segments = plan.segments(prompt_len)
            self._vsteer_forget_steering(req_id)  # a resubmitted id replaces its old state
            keys = frozenset(s.key for s in segments if s.key)
            for key in keys:  # one reference per request, however many segments share the key
                seg = next(s for s in segments if s.key == key)
                source = self._vsteer_key_source.get(key)
                refs = source[3] if source else 0
                self._vsteer_key_source[key] = (plan, seg.active, seg.start, refs + 1)
            single = segments[0].key if len(segments) == 1 else False
            by_schedule: dict[tuple, list[int]] = {}
            for layer, sched in plan.layer_schedules().items():
                if layer in self._vsteer_layer_row:
                    by_schedule.setdefault(sched, []).append(self._vsteer_layer_row[layer])
            scheduled = tuple((np.array(sorted(rows)), sched) for sched, rows in by_schedule.items())
            self._vsteer_requests[req_id] = _RequestSteering(segments, keys, single, prompt_len, scheduled)
            if scheduled:
                self._vsteer_scheduled.add(req_id)
            if self._vsteer_gates is not None and plan.gates():
                self._vsteer_gates.register(req_id, plan, prompt_len)
        eff = extra.get(EFFECTS_ARGS_KEY)
        if eff is not None:
            self._vsteer_effects.register(req_id, eff, prompt_len)
        cap = extra.get(CAPTURE_ARGS_KEY)
        if cap is not None:
            self._vsteer_captures.register(req_id, cap, prompt_len)

    def vsteer_take_effects(self, keys: list[str]) -> dict[str, dict]:
        """Pop the finished effect sums of ``keys`` ({key: {"sums": {layer: [d_sae]}, "count", "partial"}})."""
        return self._vsteer_effects.take(keys)

    def _vsteer_forget(self, req_id: str) -> None:
        """Stop tracking a finished request (its effect sums become ready to take)."""
        self._vsteer_effects.finish(req_id)
        self._vsteer_captures.forget(req_id)
        self._vsteer_forget_steering(req_id)

    def _vsteer_forget_steering(self, req_id: str) -> None:
        self._vsteer_scheduled.discard(req_id)
        if self._vsteer_gates is not None:
            self._vsteer_gates.forget(req_id)
        st = self._vsteer_requests.pop(req_id, None)
        for key in st.keys if st else ():
            plan, active, start, refs = self._vsteer_key_source[key]
            if refs > 1:
                self._vsteer_key_source[key] = (plan, active, start, refs - 1)
            else:
                del self._vsteer_key_source[key]

    def _vsteer_write_slot(self, slot: int, key: str) -> None:
        """Fold the transform named ``key`` into bank row ``slot`` of every wrapped layer."""
        plan, active, start, _ = self._vsteer_key_source[key]
        items = [plan.interventions[i] for i in active]
        touched = {layer for it in items for layer in it.layers}
        layout = self._vsteer_layout
        rows = torch.empty(len(self._vsteer_buffers.layers), layout.width)
        for i, layer in enumerate(self._vsteer_buffers.layers):
            rows[i] = fold_layer(items, layer, self._vsteer_store.get, layout, start) if layer in touched else layout.identity_row()
        self._vsteer_buffers.bank[:, slot, :].copy_(rows.to(self.device))
        self._vsteer_slot_layers[slot] = frozenset(touched)
        self._vsteer_slot_writes += 1
        support: dict[int, np.ndarray] = {}
        for layer, sas in self._vsteer_buffers.sas.items():
            row = torch.zeros(sas.bank.shape[1], dtype=torch.float64)
            for it in items:
                if it.op == "sas" and it.layers[0] == layer:
                    row[: sas.d_sae] += it.scale * _direction(self._vsteer_store.get(it.vector), layer).double()
            sas.bank[slot].copy_(row.float().to(self.device))
            support[layer] = np.flatnonzero(row[: sas.d_sae].numpy())
        self._vsteer_slot_support[slot] = support

    def _vsteer_fill_unions(self) -> None:
        """Per SAE layer, the union of the supports of this step's slots (padded with d_sae)."""
        pinned = self._vsteer_slots.pinned_slots
        stamp = (pinned, self._vsteer_slot_writes)
        if stamp == self._vsteer_union_stamp:
            return
        self._vsteer_union_stamp = stamp
        for layer, sas in self._vsteer_buffers.sas.items():
            if sas.union is None:
                continue
            parts = [self._vsteer_slot_support[s][layer] for s in pinned if s in self._vsteer_slot_support]
            union = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            if len(union) > sas.union.shape[0]:  # the scheduler's budget makes this unreachable
                raise EngineError(
                    f"SAS feature union of {len(union)} at layer {layer} exceeds max_sas_support="
                    f"{sas.union.shape[0]}"
                )
            host = np.full(sas.union.shape[0], sas.d_sae, dtype=np.int64)
            host[: len(union)] = union
            sas.union.copy_(torch.from_numpy(host))
            self._vsteer_buffers.activity.sas_len[layer] = len(union)

    # --- per step ------------------------------------------------------------------------------
    def _vsteer_fill_index(self, runs: list[StepRun]) -> None:
        """Fill the step's steering inputs from its token map ``runs`` (batch order)."""
        self._vsteer_runs = runs
        idx = self._vsteer_index_host
        steered = self._vsteer_requests
        self._vsteer_slots.begin_step()
        any_steered = False
        for run in runs:
            off, n, start = run.off, run.n, run.start
            st = steered.get(run.req_id)
            if st is None:
                idx[off : off + n] = 0
                continue
            any_steered = True
            if st.single_key is not False:
                idx[off : off + n] = self._vsteer_slots.acquire(st.single_key) if st.single_key else 0
                continue
            for seg in st.segments:
                lo, hi = max(seg.start, start), min(seg.end, start + n)
                if lo < hi:
                    idx[off + lo - start : off + hi - start] = self._vsteer_slots.acquire(seg.key) if seg.key else 0
        off = runs[-1].off + runs[-1].n if runs else 0
        self._vsteer_fill_scale(runs)
        if self._vsteer_gates is not None:
            activity = self._vsteer_buffers.activity
            activity.gated, activity.pooling, activity.finalizing = self._vsteer_gates.fill(runs)
        self._vsteer_capturing = self._vsteer_captures.plan_step(runs)
        if self._vsteer_buffers.sas:
            self._vsteer_fill_unions()
        if self._vsteer_effects or self._vsteer_effect_prev:
            self._vsteer_fill_effect_index(runs, off)
        if self.model_config.enforce_eager:  # only eager layers read it (see StepActivity)
            activity = self._vsteer_buffers.activity
            activity.steer = frozenset().union(*(self._vsteer_slot_layers[s] for s in self._vsteer_slots.pinned_slots))
            activity.capture = self._vsteer_capturing
        end = max(off, self._vsteer_prev_tokens)
        idx[off:end] = 0
        if any_steered or self._vsteer_prev_tokens:
            self._vsteer_buffers.index[:end].copy_(self._vsteer_index_stage[:end], non_blocking=True)
        self._vsteer_prev_tokens = off if any_steered else 0

    def _vsteer_fill_scale(self, runs: list[StepRun]) -> None:
        """Per wrapped layer and token, the schedule's multiplier of the token's change (1 where
        nothing is scheduled, and on tokens whose slot is the identity)."""
        prev = self._vsteer_scale_prev
        if not (prev or self._vsteer_scheduled):
            return  # nothing scheduled now or last step: the device buffer holds ones
        scale, idx = self._vsteer_scale_host, self._vsteer_index_host
        if prev:
            scale[:, :prev] = 1.0
        end = 0
        for run in runs:
            if run.req_id not in self._vsteer_scheduled:
                continue
            st = self._vsteer_requests[run.req_id]
            t = np.arange(run.start, run.start + run.n) - st.prompt_len
            live = idx[run.off : run.off + run.n] != 0
            for rows, sched in st.scheduled:
                scale[rows, run.off : run.off + run.n] = np.where(live, schedules.values(sched, t), 1.0)
            end = run.off + run.n
        top = max(end, prev)
        if top:
            self._vsteer_buffers.scale[:, :top].copy_(self._vsteer_scale_stage[:, :top], non_blocking=True)
        self._vsteer_scale_prev = end
        self._vsteer_buffers.activity.scaled = end > 0

    def _vsteer_fill_effect_index(self, runs: list[StepRun], off: int) -> None:
        idx = self._vsteer_effect_host
        self._vsteer_effects.fill(runs, idx)
        end = max(off, self._vsteer_effect_prev)
        idx[off:end] = 0
        self._vsteer_buffers.effect_index[:end].copy_(self._vsteer_effect_stage[:end], non_blocking=True)
        self._vsteer_effect_prev = off if self._vsteer_effects else 0
        self._vsteer_buffers.activity.accumulate = bool(self._vsteer_effects)

    def _vsteer_after_forward(self, hidden: Any, logits: Any, logit_rows: list[str | None]) -> None:
        """After the step's forward pass: copy captured rows out, finish effect rows, and flag the
        requests whose final hidden states (``hidden``) or logits went non-finite (defence in depth:
        whatever made them, those requests end with an error), zeroing their rows so that the
        step's sampling stays safe for the rest of the batch."""
        if self._vsteer_capturing:
            self._vsteer_captures.read(self._vsteer_buffers.capture)
            self._vsteer_capturing = False
        for req_id in self._vsteer_effects.finishing:
            self._vsteer_effects.finish(req_id)
        self._vsteer_effects.finishing = []
        hidden = hidden if isinstance(hidden, torch.Tensor) else None
        self._vsteer_nonfinite = flagged_requests(hidden, self._vsteer_runs, logits, logit_rows)
        if self._vsteer_nonfinite:
            blank_requests(self._vsteer_nonfinite, hidden, self._vsteer_runs, logits, logit_rows)
        self._vsteer_runs = []

    def _vsteer_label_output(self, output: Any) -> None:
        """Put the flagged requests into ``output.num_nans_in_logits``, vLLM's own per-request
        channel to the scheduler (which fails them)."""
        bad, self._vsteer_nonfinite = self._vsteer_nonfinite, set()
        if bad and output is not None:
            counts = dict(output.num_nans_in_logits or {})
            counts.update({req_id: max(counts.get(req_id, 0), 1) for req_id in bad})
            output.num_nans_in_logits = counts

    # --- introspection (collective_rpc) ---------------------------------------------------------
    def vsteer_stats(self) -> dict:
        """Slot usage, for metrics and tests."""
        return {
            "runner": self.vsteer_runner,  # "v1" or "v2": the adapter in use
            "max_slots": self._vsteer_slots.num_slots,
            "resident": len(self._vsteer_slots.resident),
            "in_use": self._vsteer_slots.pinned,  # slots the last step's tokens used
            "loads": self._vsteer_slots.loads,
            "steered_requests": len(self._vsteer_requests),
            "slot_refs": {k: v[3] for k, v in self._vsteer_key_source.items()},
            "bank_bytes": self._vsteer_buffers.bank.numel() * self._vsteer_buffers.bank.element_size(),
            "capture_bytes": sum(t.numel() * t.element_size() for t in self._vsteer_buffers.capture.values()),
            "wrapped_layers": list(self._vsteer_buffers.layers),
            "capture_layers": sorted(self._vsteer_buffers.capture),
            "sas_layers": sorted(self._vsteer_buffers.sas),
            "sas_union": dict(self._vsteer_buffers.activity.sas_len),
        }


def _load_engine_saes(paths: dict[str, str], hidden_size: int) -> tuple[dict[int, Any], dict[str, int]]:
    """Load the engine's SAEs (name -> path): {layer: SAE} (one per layer) and {name: layer}."""
    if not paths:
        return {}, {}
    from vsteer.sae import load_sae

    by_layer: dict[int, Any] = {}
    for name, path in paths.items():
        sae = load_sae(path)
        if sae.d_in != hidden_size:
            raise EngineError(f"SAE {name!r} has d_in={sae.d_in} but the model's hidden size is {hidden_size}")
        if sae.layer is None:
            raise EngineError(f"SAE {name!r} does not record the layer it reads")
        if sae.layer in by_layer:
            raise EngineError(f"two SAEs read layer {sae.layer}; the engine takes one SAE per layer")
        by_layer[sae.layer] = sae
    return by_layer, {name: sae.layer for name, sae in zip(paths, by_layer.values())}


_RUNNER_CLASSES: dict[type, type] = {}


def steered_runner_class(cls: type) -> type:
    """The steered subclass of a vLLM model runner class (V1 or Model Runner V2)."""
    if cls not in _RUNNER_CLASSES:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

        if issubclass(cls, V2Runner):
            from vsteer.engine.runner_v2 import V2RunnerAdapter as adapter
        else:
            from vsteer.engine.runner_v1 import V1RunnerAdapter as adapter
        _RUNNER_CLASSES[cls] = type(f"Steered{cls.__name__}", (adapter, cls), {})
    return _RUNNER_CLASSES[cls]
