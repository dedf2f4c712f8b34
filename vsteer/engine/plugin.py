"""vsteer as a vLLM plugin: stock vLLM steers when ``additional_config["vsteer"]`` is given.

``vllm.general_plugins`` loads :func:`register` in every vLLM process. It wraps
``EngineArgs.create_engine_config`` (the one place every engine, server or offline, is configured)
with :func:`steer_engine_args`, which does nothing unless the engine arguments carry
``additional_config["vsteer"]``. Then it reads them as :class:`SteeringSettings`, builds the
engine's :class:`~vsteer.engine.config.SteeringEngineConfig` in their place, and selects vsteer's
worker and scheduler. An OpenAI-compatible server (``vllm serve``) always gets an engine that
accepts steering only under vsteer's edge seal, and needs the edge: the ``vllm.endpoint_plugins``
entry of the same name (:mod:`vsteer.server.plugin`), which vLLM loads only when ``VLLM_PLUGINS``
names ``vsteer``; without it the server refuses to start.

Importing this module is cheap and has no side effects: vLLM imports it in every process.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vsteer.engine.config import ADDITIONAL_CONFIG_KEY, DEFAULT_MAX_BANK_BYTES

__all__ = ["PLUGIN_NAME", "SCHEDULER", "WORKERS", "SteeringSettings", "engine_setup", "register", "steer_engine_args"]

logger = logging.getLogger("vsteer.engine")

#: The entry-point name of both plugins (``VLLM_PLUGINS=vsteer`` loads them).
PLUGIN_NAME = "vsteer"
SCHEDULER = "vsteer.engine.scheduler.SteeringScheduler"
WORKERS = {"cpu": "vsteer.engine.worker.SteeredCPUWorker", "cuda": "vsteer.engine.worker.SteeredGPUWorker"}
_WRAPPED = "__vsteer_wrapped__"


class SteeringSettings(BaseModel):
    """What ``additional_config["vsteer"]`` says when vLLM is started the stock way (``vllm serve
    MODEL --additional-config '{"vsteer": {...}}'`` or ``vllm.LLM(..., additional_config=...)``).
    The engine fields mean what :class:`~vsteer.engine.config.SteeringEngineConfig` says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_slots: int | None = Field(default=None, ge=1)
    max_bank_bytes: int = Field(default=DEFAULT_MAX_BANK_BYTES, ge=1)
    max_ablation_rank: int = Field(default=1, ge=0, le=16)
    steerable_layers: list[int] | None = None
    capture_layers: list[int] | None = Field(default_factory=list,
                                             description="Capture buffers (default none; null: every steerable layer).")
    vector_store: str | None = Field(default=None, description="Vector store folder (default $VSTEER_VECTOR_STORE "
                                     "or ~/.cache/vsteer/vectors).")
    saes: list[str] = Field(default_factory=list, description="SAEs for sas ops: names in the SAE store or paths.")
    sae_store: str | None = None
    effect_saes: list[str] = Field(default_factory=list)
    max_sas_support: int = Field(default=1024, ge=1)
    condition_layers: list[int] = Field(default_factory=list)
    max_conditions: int = Field(default=2, ge=1, le=16)
    # the HTTP edge's own settings (an OpenAI-compatible server only)
    max_abs_scale: float = Field(default=1.0e4, gt=0, allow_inf_nan=False, description="Refuse specs with a larger |scale|.")
    default_steering: Any = Field(default=None, description="Spec for requests without a steering key.")
    tenants: str | None = Field(default=None, description="Tenants file (default $VSTEER_TENANTS: a tenants file's path or JSON text; else single-tenant).")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM calls it in every process)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _WRAPPED, False):
        return
    _log_with_vllm()

    @functools.wraps(original)
    def create_engine_config(self: Any, usage_context: Any = None, *args: Any, **kwargs: Any) -> Any:
        steer_engine_args(self, usage_context)
        return original(self, usage_context, *args, **kwargs)

    setattr(create_engine_config, _WRAPPED, True)
    EngineArgs.create_engine_config = create_engine_config


def _log_with_vllm() -> None:
    """In a process where nobody configured Python logging (stock ``vllm serve``, a script), send
    vsteer's log records where vLLM sends its own, so that what vsteer reports at start-up (its
    settings, the runner it steers) shows in vLLM's log. A configured process is left alone."""
    ours = logging.getLogger("vsteer")
    if ours.handlers or logging.getLogger().handlers:
        return
    vllm_logger = logging.getLogger("vllm")
    for handler in vllm_logger.handlers:
        ours.addHandler(handler)
    if vllm_logger.handlers:
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False


def steer_engine_args(engine_args: Any, usage_context: Any = None) -> None:
    """Turn ``additional_config["vsteer"]`` settings into a steering engine, in place.

    Nothing happens without that key, or when the arguments already name vsteer's worker and
    scheduler (``vsteer.LLM`` builds its engine configuration itself).

    Raises:
        EngineError: settings that are not valid (naming the field), a worker or scheduler of
            someone else's, options steering refuses, or a server without vsteer's edge.
    """
    from vsteer._errors import EngineError, SpecError

    additional = dict(engine_args.additional_config or {})
    raw = additional.get(ADDITIONAL_CONFIG_KEY)
    if raw is None:
        return
    if engine_args.worker_cls in WORKERS.values() and engine_args.scheduler_cls == SCHEDULER:
        return
    if engine_args.worker_cls != "auto" or engine_args.scheduler_cls not in (None, _default_scheduler()):
        raise EngineError(f"additional_config['{ADDITIONAL_CONFIG_KEY}'] runs vsteer's worker and scheduler; "
                          f"drop --worker-cls/--scheduler-cls ({engine_args.worker_cls}, {engine_args.scheduler_cls})")
    try:
        settings = SteeringSettings.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise EngineError(f"additional_config['{ADDITIONAL_CONFIG_KEY}'].{field}: {err['msg']}") from None
    server = _is_server(usage_context)
    from vsteer.models import resolve_model

    model_path = resolve_model(engine_args.model)
    try:
        config, _, sae_store, _ = engine_setup(settings, model_path, edge=server)
    except SpecError as exc:
        raise EngineError(f"additional_config['{ADDITIONAL_CONFIG_KEY}'].{exc.field}: {exc.reason}") from None
    from vllm.platforms import current_platform

    from vsteer.engine.compat import refuse_unsupported_kwargs

    refuse_unsupported_kwargs(vars(engine_args), effects=bool(settings.effect_saes))
    device = current_platform.device_type
    if device not in WORKERS:
        raise EngineError(f"vsteer supports CPU and CUDA devices, not {device!r}")
    if server:
        from vsteer.server.plugin import prepare_edge

        prepare_edge(settings, config, model_path, sae_store.root)
    engine_args.additional_config = {**additional, ADDITIONAL_CONFIG_KEY: config.model_dump()}
    engine_args.worker_cls = WORKERS[device]
    engine_args.scheduler_cls = SCHEDULER
    logger.info("vsteer: steering engine (%s edge) with %s", "behind its" if server else "no", config.model_dump())


def engine_setup(settings: SteeringSettings, model_path: str, *, edge: bool):
    """The steering engine ``settings`` describe for the model folder ``model_path``: its
    configuration, the model's shape, the SAE store and the loaded SAEs by name.

    Raises:
        SpecError: naming the setting that does not fit the model or the SAEs.
    """
    from pathlib import Path

    from vsteer._errors import SpecError
    from vsteer.engine.config import SteeringEngineConfig
    from vsteer.engine.plan import ModelShape
    from vsteer.models import default_vector_store, model_info

    info = model_info(model_path)
    shape = ModelShape(info.name, info.num_layers, info.hidden_size)
    sae_store, saes, paths = _engine_saes(settings.saes, settings.sae_store, shape)
    unknown = sorted(set(settings.effect_saes) - set(saes))
    if unknown:
        raise SpecError(f"{unknown} are not among saes {sorted(saes)}", field="effect_saes")
    store = Path(settings.vector_store).expanduser() if settings.vector_store else default_vector_store()
    config = SteeringEngineConfig(
        max_slots=settings.max_slots, max_bank_bytes=settings.max_bank_bytes, max_ablation_rank=settings.max_ablation_rank,
        steerable_layers=settings.steerable_layers,
        capture_layers=None if settings.capture_layers is None else sorted(set(settings.capture_layers)),
        store=str(store.absolute()), saes=paths, sae_shapes={n: (s.layer, s.d_sae) for n, s in saes.items()},
        effect_saes=settings.effect_saes, max_sas_support=settings.max_sas_support,
        condition_layers=sorted(set(settings.condition_layers)), max_conditions=settings.max_conditions, edge=edge)
    config.check_condition_layers(info.num_layers)
    return config, shape, sae_store, saes


def _engine_saes(refs: list[str], root: str | None, model: Any):
    """The SAE store, the engine's SAEs by name, and their paths for the worker."""
    from pathlib import Path

    from vsteer._errors import SpecError
    from vsteer.sae import SaeStore, check_sae_for_model, default_sae_store

    sae_store = SaeStore(Path(root) if root else default_sae_store())
    saes, paths = {}, {}
    for ref in refs:
        if ref in sae_store:
            name, path = ref, sae_store.path(ref)
            sae = sae_store.get(ref)
        else:
            sae = sae_store.resolve(ref)
            path = Path(ref).expanduser().resolve()
            name = sae.config.name or path.stem
        check_sae_for_model(sae, hidden_size=model.hidden_size, num_layers=model.num_layers, model_name=model.name)
        if name in saes:
            raise SpecError(f"two SAEs are named {name!r}", field="saes")
        saes[name], paths[name] = sae, str(path)
    layers = [sae.layer for sae in saes.values()]
    if len(set(layers)) != len(layers):
        raise SpecError(f"the engine takes one SAE per layer, got layers {sorted(layers)}", field="saes")
    return sae_store, saes, paths


def _is_server(usage_context: Any) -> bool:
    """Whether the engine serves clients over the network (vLLM's OpenAI-compatible server)."""
    return getattr(usage_context, "name", None) == "OPENAI_API_SERVER"


def _default_scheduler() -> Any:
    from vllm.config import SchedulerConfig

    return SchedulerConfig.scheduler_cls
