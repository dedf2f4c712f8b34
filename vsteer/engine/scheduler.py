"""A vLLM scheduler that holds requests back until their steering slots can be had.

Mirrors how vLLM enforces ``max_loras``: a waiting request is admitted only if the distinct slot
keys of the running requests plus its own fit in ``max_slots``. Running requests keep their keys,
so every step's batch needs at most ``max_slots`` rows and the worker never has to evict a row in
use. Requests that do not fit wait (FCFS order kept); nothing crashes. The same holds for the SAS
feature budget: the supports of the running sas configs at one SAE layer add up to at most
``max_sas_support``, so the step's feature union always fits the engine's buffer.

Every request is checked when it arrives (:mod:`vsteer.engine.request_args`): one the runner could
not serve is finished with an error (finish reason ``"error"``, its reason in ``stop_reason``:
:mod:`vsteer.engine.failures`) and never reaches the runner, and
the request's prefix-cache salt is derived here, engine-side, from everything that determines its
KV (tenant, plan, prompt length where positions are prompt-relative, the client's salt). Capture
and effect requests never read the prefix cache.

Defence in depth: a request whose final hidden states or logits went non-finite in a step (the
runner flags it) ends with an error instead of its token; so does any running request that read a
KV block it wrote through the prefix cache. The blocks those requests wrote leave the prefix cache
and are zeroed (vLLM's own ``new_block_ids_to_zero``) before the next step runs, so no later
request reads their numbers, not even from the stale slots of a partly filled block.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import Counter
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason

from vsteer._errors import EngineError, SpecError, VectorFileError
from vsteer.engine import edge_seal
from vsteer.engine.compat import refuse_unsupported, warn_vllm_defects
from vsteer.engine.config import SteeringEngineConfig
from vsteer.engine.failures import Failure, grammar_dead_end, nonfinite
from vsteer.engine.lifetime import exit_with_parent
from vsteer.engine.plan import EXTRA_ARGS_KEY
from vsteer.engine.request_args import TENANT_ARGS_KEY, EngineLimits, RequestArgs, cache_salt, parse_request_args
from vsteer.vectors import VectorStore
from vsteer.vectors._pg_store import open_store

logger = logging.getLogger("vsteer.engine")
_NONE = RequestArgs()


def request_slot_keys(request: Any) -> frozenset[str]:
    """Slot keys a vLLM request needs (empty for unsteered requests)."""
    keys = getattr(request, "_vsteer_keys", None)
    if keys is None:
        plan = getattr(request, "_vsteer_args", _NONE).plan
        if plan is None:
            keys, loads, widths = frozenset(), {}, {}
        else:
            keys = plan.slot_keys(request.num_prompt_tokens)
            loads = {k: v for k, v in plan.sas_loads(request.num_prompt_tokens).items() if v}
            widths = plan.sas_widths()
        request._vsteer_keys = keys
        request._vsteer_sas_loads = loads
        request._vsteer_sas_widths = widths
    return keys


def request_sas_loads(request: Any) -> dict[str, dict[int, int]]:
    """Per slot key of the request, the SAS support it brings to each SAE layer (often empty)."""
    request_slot_keys(request)
    return request._vsteer_sas_loads


class SteeringScheduler(Scheduler):
    """Scheduler with steering-slot admission control (async variant chosen automatically)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is SteeringScheduler and config is not None and config.scheduler_config.async_scheduling:
            cls = SteeringAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = SteeringEngineConfig.from_vllm(self.vllm_config.additional_config)
        refuse_unsupported(self.vllm_config, effects=bool(cfg.effect_saes))
        warn_vllm_defects(self.vllm_config)
        self._vsteer_capacity = cfg.resolved_max_slots(self.vllm_config)
        hf = self.vllm_config.model_config.hf_text_config
        shape = {"num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size}
        logger.info(
            "vsteer: max_slots=%d (%s; max_num_seqs=%d), slot banks %.1f MiB",
            self._vsteer_capacity, "set" if cfg.max_slots else f"default, capped by max_bank_bytes={cfg.max_bank_bytes}",
            self.vllm_config.scheduler_config.max_num_seqs, cfg.bank_bytes(self._vsteer_capacity, **shape) / 2**20,
        )
        store = open_store(cfg.store)
        self._vsteer_store = store
        self._vsteer_limits = EngineLimits.of_engine(cfg, self.vllm_config, store.get)
        self._vsteer_secret = edge_seal.secret_from_env() if cfg.edge else None
        if cfg.edge and self._vsteer_secret is None:
            raise EngineError(f"an engine behind vsteer's edge needs ${edge_seal.SECRET_ENV} (vsteer serve sets it)")
        # vectors of admitted requests stay readable until the request is freed, even if deleted
        self._vsteer_pin_owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._vsteer_pins: Counter[str] = Counter()
        _drop_dead_pins(store)
        self._vsteer_sas_capacity = cfg.max_sas_support
        # gated requests admitted and not finished, each holding one row of the runner's gate pool
        # (max_num_seqs rows): preempted ones keep theirs, new ones wait for a free row
        self._vsteer_gated: set[str] = set()
        self._vsteer_gate_rows = int(self.vllm_config.scheduler_config.max_num_seqs)
        self._vsteer_held_back = 0  # requests held back in the last step, for metrics
        self._vsteer_reasons: dict[str, str] = {}  # request -> why it fails, until its error output is sent
        self._vsteer_zero: list[int] = []  # KV blocks non-finite requests wrote, zeroed before the next step
        self._vsteer_label_grammar_dead_ends()
        exit_with_parent()  # no orphaned engine when the server or Ray replica that started it is killed

    def _vsteer_label_grammar_dead_ends(self) -> None:
        """A request whose grammar rejects the token sampled for it ends with an error, which vLLM's
        server answers with a bare 500; label it as the client's input (400 naming the field). A
        token is rejected only when the grammar allowed none: vLLM masks every disallowed one."""
        manager = self.structured_output_manager
        accept = manager.accept_tokens

        def accept_or_label(request: Any, new_token_ids: Any) -> bool:
            accepted = accept(request, new_token_ids)
            if not accepted:
                self._vsteer_reasons[request.request_id] = grammar_dead_end().reason()
            return accepted

        manager.accept_tokens = accept_or_label

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_running_keys: set[str] = set()
        self._vsteer_running_loads: dict[str, dict[int, int]] = {}
        self._vsteer_seen = 0
        self._vsteer_held_back = 0
        return super().schedule(*args, **kwargs)

    def add_request(self, request: Any) -> None:
        if request.request_id not in self.requests:  # not a streaming-input continuation
            self._vsteer_admit(request)
        super().add_request(request)

    def _vsteer_admit(self, request: Any) -> None:
        """Parse and check the request's vsteer arguments; set its cache salt and cache reads."""
        params = request.sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        client_salt = request.cache_salt
        if self._vsteer_secret is not None:
            extra, client_salt = self._vsteer_unseal(request, extra)
        if not any(isinstance(k, str) and k.startswith("vsteer") for k in extra):
            self._vsteer_set_salt(request, client_salt)
            return
        try:
            args = parse_request_args(extra, request.num_prompt_tokens, self._vsteer_limits)
            if args.plan is not None and request.resumable:
                raise SpecError("steering positions need the whole prompt; streaming input is not supported", field="steering")
            self._vsteer_pin(request, args)
        except SpecError as exc:
            logger.warning("vsteer: request %s refused: %s", request.request_id, exc)
            request._vsteer_error = Failure(400, exc.field, str(exc)).reason()
            args = _NONE
        request._vsteer_args = args
        self._vsteer_set_salt(request, cache_salt(args, request.num_prompt_tokens, client_salt))
        if args.reads_every_token:
            _skip_prefix_cache_reads(request)

    @staticmethod
    def _vsteer_set_salt(request: Any, salt: str | None) -> None:
        if salt != request.cache_salt:
            request.cache_salt = salt
            request.block_hashes = []
            request.update_block_hashes()

    def _vsteer_unseal(self, request: Any, extra: dict) -> tuple[dict, str | None]:
        """Behind the edge: keep the vsteer arguments only under a valid seal (else drop them: the
        request runs unsteered) and the salt only if sealed (else one unique to the request).
        Returns the arguments to use and the salt."""
        secret, salt = self._vsteer_secret, request.cache_salt
        ours = [k for k in extra if isinstance(k, str) and k.lower().startswith("vsteer")]
        sealed = bool(ours) and edge_seal.args_are_sealed(secret, extra, EXTRA_ARGS_KEY, TENANT_ARGS_KEY, salt)
        if ours and not sealed:
            logger.warning("vsteer: request %s carries engine arguments its server's edge did not seal; "
                           "they are dropped and it runs unsteered", request.request_id)
            kept = {k: v for k, v in extra.items() if k not in ours}
            request.sampling_params.extra_args = kept or None
            extra = kept
        if not edge_seal.salt_is_sealed(secret, salt):
            salt = edge_seal.unsealed_salt()
        return {k: v for k, v in extra.items() if k != edge_seal.SEAL_ARGS_KEY}, salt

    def _vsteer_pin(self, request: Any, args: RequestArgs) -> None:
        """Pin the request's vectors in the store until it is freed (a delete cannot pull them from
        under it); a vector already gone refuses the request alone."""
        plan = args.plan
        if plan is None:
            return
        shas = {it.vector for it in plan.interventions} | {c[0] for _, conds in plan.gates() for c in conds}
        done = []
        try:
            for sha in shas:
                if not self._vsteer_pins[sha]:
                    self._vsteer_store.pin(sha, self._vsteer_pin_owner)
                self._vsteer_pins[sha] += 1
                done.append(sha)
        except VectorFileError as exc:
            self._vsteer_unpin(done)
            raise SpecError(f"vector {exc.key} was deleted before the request was scheduled", field="interventions") from exc
        request._vsteer_pinned = done

    def _vsteer_unpin(self, shas: list[str]) -> None:
        for sha in shas:
            self._vsteer_pins[sha] -= 1
            if self._vsteer_pins[sha] <= 0:
                del self._vsteer_pins[sha]
                self._vsteer_store.unpin(sha, self._vsteer_pin_owner)

    def _handle_blocked_waiting_request(self, request: Any) -> bool:
        if getattr(request, "_vsteer_error", None) is not None:
            self.grammar_compile_error_reqs.add(request.request_id)  # finished with FINISHED_ERROR
            self._vsteer_reasons[request.request_id] = request._vsteer_error
            return False
        if not super()._handle_blocked_waiting_request(request):
            return False
        keys = request_slot_keys(request)
        if not keys:
            return True
        gated = request._vsteer_args.gated and request.request_id not in self._vsteer_gated
        if gated and len(self._vsteer_gated) >= self._vsteer_gate_rows:
            self._vsteer_held_back += 1
            return False
        # self.running only grows during the waiting scan; fold in what was appended since.
        for req in self.running[self._vsteer_seen :]:
            self._vsteer_running_keys |= request_slot_keys(req)
            self._vsteer_running_loads.update(request_sas_loads(req))
        self._vsteer_seen = len(self.running)
        if len(self._vsteer_running_keys | keys) <= self._vsteer_capacity and self._sas_fits(request):
            if gated:
                self._vsteer_gated.add(request.request_id)
            return True
        self._vsteer_held_back += 1
        return False

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_gated.discard(request.request_id)
        if not request.is_finished() or request.get_finished_reason() != FinishReason.ERROR:
            self._vsteer_reasons.pop(request.request_id, None)  # aborted first: no error output to label
        self._vsteer_unpin(getattr(request, "_vsteer_pinned", ()))
        request._vsteer_pinned = ()
        return super()._free_request(request, *args, **kwargs)

    # --- requests that went non-finite ---------------------------------------------------------
    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        counts = model_runner_output.num_nans_in_logits
        bad = {req_id for req_id, n in (counts or {}).items() if n and req_id in self.requests}
        if bad:
            self._vsteer_fail_nonfinite(bad, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._vsteer_reasons:
            for batch in outputs.values():
                for out in batch.outputs:
                    if out.finish_reason == FinishReason.ERROR and out.request_id in self._vsteer_reasons:
                        out.stop_reason = self._vsteer_reasons.pop(out.request_id)
        return outputs

    def _vsteer_fail_nonfinite(self, bad: set[str], model_runner_output: Any) -> None:
        """Fail ``bad`` and every running request that reads a block they wrote in this step (the
        step's tokens of them are dropped); take those blocks out of the prefix cache and queue them
        for zeroing."""
        failing, dirty = set(bad), set()
        for req_id in bad:
            dirty |= self._vsteer_unverified_blocks(self.requests[req_id])
        grew = True
        while grew:  # a request reading a dirty block writes dirty blocks of its own
            grew = False
            for req in self.running:
                if req.request_id not in failing and dirty.intersection(self._vsteer_blocks(req.request_id)):
                    failing.add(req.request_id)
                    dirty |= self._vsteer_unverified_blocks(req)
                    grew = True
        logger.warning("vsteer: requests %s produced non-finite hidden states or logits%s; they end with an error "
                       "and the %d KV blocks they wrote are zeroed", sorted(bad),
                       f" (and {sorted(failing - bad)} read their KV)" if failing != bad else "", len(dirty))
        sampled = model_runner_output.sampled_token_ids
        index = getattr(model_runner_output, "req_id_to_index", None)  # vLLM 0.34 keeps only req_ids
        if index is None:
            index = {req_id: i for i, req_id in enumerate(model_runner_output.req_ids)}
        for req_id in failing:
            i = index.get(req_id)
            if sampled and i is not None and i < len(sampled):
                sampled[i] = []
            if model_runner_output.prompt_logprobs_dict:
                model_runner_output.prompt_logprobs_dict.pop(req_id, None)
            steered = getattr(self.requests[req_id], "_vsteer_args", _NONE).plan is not None
            self._vsteer_reasons[req_id] = nonfinite(steered).reason()
        self.grammar_compile_error_reqs.update(failing)
        dirty.discard(self.kv_cache_manager.block_pool.null_block.block_id)
        self.kv_cache_manager.block_pool.evict_blocks(dirty)
        self._vsteer_zero.extend(sorted(dirty))

    def _vsteer_blocks(self, req_id: str) -> list[int]:
        return [b for group in self.kv_cache_manager.get_block_ids(req_id) for b in group]

    def _vsteer_unverified_blocks(self, request: Any) -> set[int]:
        """The KV blocks holding positions of ``request`` that no finished step has checked: from
        the first position of the step being processed on (earlier steps' final hidden states were
        finite, and a NaN in any layer's KV at a position makes its final hidden state NaN)."""
        first = max(request.num_computed_tokens - request.num_in_flight_tokens, 0)
        groups = self.kv_cache_manager.get_block_ids(request.request_id)
        specs = self.kv_cache_config.kv_cache_groups
        return {b for ids, group in zip(groups, specs) for b in ids[first // group.kv_cache_spec.block_size :]}

    def _get_new_block_ids_to_zero(self) -> list[int] | None:
        ids = super()._get_new_block_ids_to_zero()
        if not self._vsteer_zero:
            return ids
        ids, self._vsteer_zero = [*(ids or ()), *self._vsteer_zero], []
        return ids

    def _sas_fits(self, request: Any) -> bool:
        """Whether the supports of the running sas configs plus the new ones stay within the
        budget at every SAE layer (a sum: conservative where supports overlap). A budget of
        d_sae or more never binds: the union cannot exceed d_sae."""
        new = {k: v for k, v in request_sas_loads(request).items() if k not in self._vsteer_running_loads}
        if not new:
            return True
        widths = request._vsteer_sas_widths
        totals: dict[int, int] = {}
        for load in (*self._vsteer_running_loads.values(), *new.values()):
            for layer, n in load.items():
                totals[layer] = totals.get(layer, 0) + n
        return all(
            totals.get(layer, 0) <= self._vsteer_sas_capacity or self._vsteer_sas_capacity >= width
            for layer, width in widths.items()
        )


def _skip_prefix_cache_reads(request: Any) -> None:
    """Make ``request`` read nothing from the prefix cache (vLLM 0.32/0.33: a flag; 0.34: a limit)."""
    request.skip_reading_prefix_cache = True
    if hasattr(request, "prefix_cache_hit_limit"):
        request.prefix_cache_hit_limit = 0


def _drop_dead_pins(store: VectorStore) -> None:
    """Remove pins left by engines of this host that are no longer running."""
    host = socket.gethostname()
    for owner in store.pin_owners():
        name, _, rest = owner.rpartition("-")[0].rpartition("-")
        if name != host or not rest.isdigit():
            continue
        try:
            os.kill(int(rest), 0)
        except ProcessLookupError:
            store.drop_pins(owner)
        except OSError:
            pass


class SteeringAsyncScheduler(SteeringScheduler, AsyncScheduler):
    """The async-scheduling variant (vLLM enables async scheduling on GPU by default)."""
