"""vsteer's HTTP edge as a ``vllm.endpoint_plugins`` entry: stock ``vllm serve`` serves steering.

Started the stock way::

    VLLM_PLUGINS=vsteer vllm serve MODEL --additional-config '{"vsteer": {...}}'

the general plugin (:mod:`vsteer.engine.plugin`) builds the steering engine and calls
:func:`prepare_edge` in the API-server process before the engine starts; vLLM then loads
:class:`SteeringEndpointPlugin` (endpoint plugins load only when ``VLLM_PLUGINS`` names them),
which puts :class:`~vsteer.server.middleware.SteeringMiddleware` in front of every route and the
vector registry under ``/v1/vectors``, exactly as ``vsteer serve`` does (it runs this same path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vsteer.engine.config import ADDITIONAL_CONFIG_KEY
from vsteer.engine.plugin import PLUGIN_NAME

__all__ = ["SteeringEndpointPlugin", "prepare_edge"]


def prepare_edge(settings: Any, config: Any, model_path: str, sae_root: Any) -> None:
    """Hand the edge its settings (``$VSTEER_SERVE_CONFIG``, read by the middleware in this process
    and any API-server process vLLM starts from it) and the seal's secret (``$VSTEER_EDGE_SECRET``,
    inherited by the engine), before the engine starts. A bad ``default_steering`` is refused now.

    Raises:
        EngineError: vLLM will not load the edge (``VLLM_PLUGINS`` does not name ``vsteer``).
        SpecError: ``default_steering`` or ``tenants`` is not valid.
    """
    from vsteer._errors import EngineError, SpecError, VsteerError
    from vsteer.engine.edge_seal import SECRET_ENV, new_secret
    from vsteer.server.middleware import CONFIG_ENV, shared_resolver
    from vsteer.server.tenants import TENANTS_ENV, TenantDirectory, TenantsFile

    # read as vLLM reads it; not through vllm.envs, whose values vLLM may have cached in this process
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is None or PLUGIN_NAME not in allowed.split(","):
        raise EngineError(f"a server with additional_config['{ADDITIONAL_CONFIG_KEY}'] serves steering only behind "
                          f"vsteer's HTTP edge, which vLLM loads when VLLM_PLUGINS names it: set "
                          f"VLLM_PLUGINS={PLUGIN_NAME} (plus any other plugins you use, comma-separated)")
    # the tenants file, or $VSTEER_TENANTS (its JSON text or its path): checked whole now, and
    # handed to the edge as JSON text
    source = settings.tenants if settings.tenants is not None else os.environ.get(TENANTS_ENV)
    if source:
        try:
            if source.lstrip().startswith("{"):
                text = source
            else:
                with open(source, encoding="utf-8") as f:
                    text = f.read()
            tenants = TenantsFile.model_validate_json(text)
            TenantDirectory(tenants, Path(config.store))  # names and keys
        except (OSError, ValueError, EngineError) as exc:
            where = "$" + TENANTS_ENV if settings.tenants is None else settings.tenants
            raise SpecError(f"{where}: {exc}", field="tenants") from None
        os.environ[TENANTS_ENV] = tenants.model_dump_json()
    from vsteer.vectors._pg_store import REGISTRY_ENV, pool, registry_url

    try:  # a registry database that is unreachable stops the server now, not in the first request
        url = registry_url()
        if url:
            pool(url)
    except VsteerError as exc:
        raise EngineError(f"${REGISTRY_ENV}: {getattr(exc, 'reason', exc)}") from None
    os.environ.setdefault(SECRET_ENV, new_secret())
    os.environ[CONFIG_ENV] = json.dumps({"model_path": model_path, "engine": config.model_dump(),
                                         "max_abs_scale": settings.max_abs_scale, "sae_store": str(sae_root),
                                         "default_steering": settings.default_steering})
    shared_resolver.cache_clear()  # settings read before (another engine in this process) are stale
    if settings.default_steering is not None:
        shared_resolver().default  # noqa: B018 - raises SpecError now rather than when the server is up


class SteeringEndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry: vsteer's edge in front of a steering engine's server."""

    name = PLUGIN_NAME
    #: every server: the edge (keys, tenants, seals) must stand in front of any steering engine,
    #: whatever its tasks
    required_tasks = None

    def __init__(self) -> None:
        self.attached = False

    def attach_router(self, app: Any) -> None:
        """Add the edge, when this server's engine steers (vLLM builds the app before serving)."""
        from vsteer.server.middleware import SteeringMiddleware

        args = getattr(app.state, "args", None)
        if ADDITIONAL_CONFIG_KEY in (getattr(args, "additional_config", None) or {}):
            app.add_middleware(SteeringMiddleware)
            self.attached = True

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        """Check that the engine accepts only sealed steering, and give the edge its limits."""
        from vsteer._errors import EngineError
        from vsteer.server.engine_failures import raise_engine_failures
        from vsteer.server.middleware import shared_resolver

        config = getattr(engine_client, "vllm_config", None)
        steering = (getattr(config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
        if steering is None:
            return
        if not self.attached:
            raise EngineError("vsteer's HTTP edge was not put in front of this steering server; refusing to serve "
                              "without it (keys and tenants would not be checked)")
        if not steering.get("edge"):
            raise EngineError("the steering engine behind vsteer's HTTP edge must accept only sealed steering (edge)")
        shared_resolver().know_engine(config)
        raise_engine_failures(engine_client)
