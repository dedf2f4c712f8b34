"""What one request asks of the engine (``SamplingParams.extra_args``), checked engine-side.

The scheduler parses and checks every request when it arrives, before the runner sees it: a
request the runner could not serve (unknown op, a vector missing from the store or of the wrong
size, a layer that is not wrapped, more slots than the engine has...) is finished with an error
instead of reaching code where an exception would stop the engine for everyone.

It also derives the request's prefix-cache salt: KV a block holds must be a function of everything
that determined it, so the salt covers the tenant, the steering plan, where the prompt ends when
the plan's positions are prompt-relative, and the client's own salt.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from vsteer._errors import SpecError, VsteerError
from vsteer.engine.plan import (EXTRA_ARGS_KEY, SteeringPlan, _direction, _layer_tensor, check_affine_shape,
                                 check_gates, check_magnitudes, check_schedules, fold_layer, magnitude_limit)
from vsteer.kernels import BankLayout
from vsteer.spec import MAX_TOKEN_INDEX

#: ``extra_args[CAPTURE_ARGS_KEY] = {"layers": [int], "path": str}``: write the residuals at the
#: output of ``layers`` for every prompt token to ``path`` (safetensors).
CAPTURE_ARGS_KEY = "vsteer_capture"
#: ``extra_args[EFFECTS_ARGS_KEY] = {"key": str, "start": int, "tokens": int}``: sum the SAE codes
#: at every effect layer over absolute positions [start, prompt_len + tokens), then hand them out
#: under ``key`` (``vsteer_take_effects``).
EFFECTS_ARGS_KEY = "vsteer_effects"
#: ``extra_args[TENANT_ARGS_KEY] = name``: the serving tenant (set by ``vsteer serve``'s edge);
#: part of the prefix-cache salt, so tenants never share KV blocks.
TENANT_ARGS_KEY = "vsteer_tenant"

_ENGINE_OPS = frozenset({"add", "ablate", "mul", "sas", "affine"})
_PROMPT_RELATIVE = frozenset({"prompt", "generated", "from_last_prompt_token"})


@dataclass(frozen=True)
class EngineLimits:
    """What the engine can serve, as the scheduler sees it."""

    num_layers: int
    hidden_size: int
    steerable: frozenset[int]
    capture: frozenset[int]
    max_slots: int
    max_ablation_rank: int
    sae_shapes: Mapping[str, tuple[int, int]]  # name -> (layer, d_sae)
    effects: bool
    vectors: Callable[[str], Any]  # sha -> SteeringVector (the engine's store)
    condition_layers: frozenset[int] = frozenset()
    max_conditions: int = 2
    magnitude: float = magnitude_limit()  # check_magnitudes' bound for the engine's dtype

    @classmethod
    def of_engine(cls, cfg: Any, vllm_config: Any, vectors: Callable[[str], Any]) -> "EngineLimits":
        """The limits of an engine with vsteer settings ``cfg`` and vLLM config ``vllm_config``
        (the scheduler's, and the serving edge's copy of them)."""
        hf = vllm_config.model_config.hf_text_config
        steerable = frozenset(range(hf.num_hidden_layers) if cfg.steerable_layers is None else cfg.steerable_layers)
        return cls(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            steerable=steerable,
            capture=steerable if cfg.capture_layers is None else frozenset(cfg.capture_layers) & steerable,
            max_slots=cfg.resolved_max_slots(vllm_config),
            max_ablation_rank=cfg.max_ablation_rank,
            sae_shapes=dict(cfg.sae_shapes),
            effects=bool(cfg.effect_saes),
            vectors=vectors,
            condition_layers=frozenset(cfg.condition_layers),
            max_conditions=cfg.max_conditions,
            magnitude=magnitude_limit(vllm_config.model_config.dtype),
        )


@dataclass(frozen=True)
class RequestArgs:
    """The parsed vsteer part of one request's ``extra_args``."""

    plan: SteeringPlan | None = None
    capture: dict | None = None
    effects: dict | None = None
    tenant: str | None = None

    @property
    def gated(self) -> bool:
        """Whether the plan has conditional (``when``) edits."""
        return self.plan is not None and bool(self.plan.gates())

    @property
    def reads_every_token(self) -> bool:
        """Capture, effect and gated requests run every prompt token through the model (no cache
        reads): a gate pools the whole prompt."""
        return self.capture is not None or self.effects is not None or self.gated


def parse_request_args(extra_args: Mapping[str, Any] | None, prompt_len: int, limits: EngineLimits) -> RequestArgs:
    """Parse and check the vsteer keys of ``extra_args``.

    Raises:
        SpecError: naming what the engine cannot serve.
    """
    extra = extra_args or {}
    try:
        plan = _check_plan(extra[EXTRA_ARGS_KEY], prompt_len, limits) if extra.get(EXTRA_ARGS_KEY) is not None else None
        capture = _check_capture(extra[CAPTURE_ARGS_KEY], limits) if extra.get(CAPTURE_ARGS_KEY) is not None else None
        effects = _check_effects(extra[EFFECTS_ARGS_KEY], limits) if extra.get(EFFECTS_ARGS_KEY) is not None else None
    except SpecError:
        raise
    except (VsteerError, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise SpecError(f"invalid vsteer request: {type(exc).__name__}: {str(exc)[:300]}", field="extra_args") from exc
    tenant = extra.get(TENANT_ARGS_KEY)
    if tenant is not None and not isinstance(tenant, str):
        raise SpecError("the tenant tag must be a string", field=TENANT_ARGS_KEY)
    return RequestArgs(plan, capture, effects, tenant)


def cache_salt(args: RequestArgs, prompt_len: int, client_salt: str | None) -> str | None:
    """The prefix-cache salt of a request: ``client_salt`` unchanged for plain requests, else a
    digest of the tenant, the plan, the prompt length when the plan's positions or schedules depend
    on where the prompt ends, and the client's salt."""
    if args.plan is None and args.tenant is None:
        return client_salt
    plan = args.plan
    relative = plan is not None and any(
        it.rows or it.schedule is not None or it.when is not None or (isinstance(it.positions, str) and it.positions in _PROMPT_RELATIVE)
        for it in plan.interventions
    )
    parts = [args.tenant, plan.hash if plan else None, prompt_len if relative else None, client_salt]
    return "vsteer:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _check_plan(data: Any, prompt_len: int, limits: EngineLimits) -> SteeringPlan:
    return check_plan(SteeringPlan.from_extra_args(data), prompt_len, limits)


def check_plan(plan: SteeringPlan, prompt_len: int | None, limits: EngineLimits) -> SteeringPlan:
    """The engine's check of a plan for a prompt of ``prompt_len`` tokens (None: the longest
    prompt any request can have, which needs the most rows and segments; the serving edge uses it).

    Raises:
        SpecError: naming what the engine cannot serve.
    """
    if prompt_len is None:
        prompt_len = MAX_TOKEN_INDEX
    cache: dict[str, Any] = {}

    def vector(sha: str) -> Any:
        if sha not in cache:
            cache[sha] = limits.vectors(sha)
        return cache[sha]

    for i, it in enumerate(plan.interventions):
        where = f"interventions.{i}"
        if it.op not in _ENGINE_OPS:
            raise SpecError(f"op {it.op!r} does not reach the engine (sara is made into mul by vsteer.LLM)", field=f"{where}.op")
        if not math.isfinite(it.scale):
            raise SpecError(f"scale {it.scale} is not finite", field=f"{where}.scale")
        bad = sorted(set(it.layers) - limits.steerable)
        if bad or not it.layers:
            raise SpecError(f"layers {bad or []} are not steerable in this engine (steerable: {sorted(limits.steerable)})", field=f"{where}.layers")
        vec = vector(it.vector)
        if it.op == "sas":
            shape = limits.sae_shapes.get(it.sae or "")
            if shape is None or shape[0] != it.layers[0]:
                raise SpecError(f"the engine has no SAE {it.sae!r} at layer {it.layers[0]}", field=f"{where}.sae")
            size = _direction(vec, it.layers[0]).numel()
            if size != shape[1]:
                raise SpecError(f"sas vector has {size} features but SAE {it.sae!r} has {shape[1]}", field=f"{where}.vector")
            continue
        for layer in it.layers:
            if it.op == "affine":
                check_affine_shape(_layer_tensor(vec, layer), layer, f"{where}.vector")
            size = _direction(vec, layer).shape[-1]
            if size != limits.hidden_size:
                raise SpecError(f"vector has hidden size {size}, the model {limits.hidden_size}", field=f"{where}.vector")
        if it.rows:
            rows = min(it.rows, prompt_len)
            for layer in it.layers:
                tensor = _layer_tensor(vec, layer)
                if tensor.ndim != 2 or tensor.shape[0] < rows:
                    raise SpecError(f"per-position vector has fewer than {rows} rows at layer {layer}", field=f"{where}.vector")
    check_schedules(plan)
    check_magnitudes(plan, vector, limits.magnitude)
    check_gates(plan, limits.condition_layers, limits.max_conditions)
    for _, conditions in plan.gates():
        for sha, layer, *_ in conditions:
            size = _direction(vector(sha), layer).shape[-1]
            if size != limits.hidden_size:
                raise SpecError(f"condition vector has hidden size {size}, the model {limits.hidden_size}", field="when")
    segments = plan.segments(prompt_len)
    keys = {s.key for s in segments if s.key is not None}
    if len(keys) > limits.max_slots:
        raise SpecError(f"this request needs {len(keys)} steering slots; the engine has max_slots={limits.max_slots}", field="interventions")
    layout = BankLayout(hidden_size=limits.hidden_size, rank=limits.max_ablation_rank)
    seen: set[str] = set()
    for seg in segments:  # every transform the runner will fold must fold (rank, shapes)
        if seg.key is None or seg.key in seen:
            continue
        seen.add(seg.key)
        items = [plan.interventions[j] for j in seg.active]
        for layer in sorted({layer for item in items if item.op != "sas" for layer in item.layers}):
            fold_layer(items, layer, vector, layout, seg.start)
    return plan


def _check_capture(data: Any, limits: EngineLimits) -> dict:
    layers = [int(x) for x in data["layers"]]
    path = data["path"]
    if not isinstance(path, str) or not path:
        raise SpecError("capture needs a file path", field=f"{CAPTURE_ARGS_KEY}.path")
    bad = sorted(set(layers) - limits.capture)
    if bad or not layers:
        raise SpecError(f"layers {bad} have no capture buffer (capture layers: {sorted(limits.capture)})", field=f"{CAPTURE_ARGS_KEY}.layers")
    return {"layers": layers, "path": path}


def _check_effects(data: Any, limits: EngineLimits) -> dict:
    if not limits.effects:
        raise SpecError("this engine measures no feature effects (start it with effect_saes=[...])", field=EFFECTS_ARGS_KEY)
    spec = {"key": str(data["key"]), "start": int(data.get("start", 0)), "tokens": int(data["tokens"])}
    if spec["start"] < 0 or spec["tokens"] < 0:
        raise SpecError("effect start and tokens are 0 or more", field=EFFECTS_ARGS_KEY)
    return spec
