"""vsteer on Ray Serve: every replica hosts a steering vLLM engine and vLLM's OpenAI app, with
vsteer's edge in front, in the replica's own process (no subprocess, no proxy).

Start it the Ray way, from a Ray Serve config file (``deploy/serve_config.yaml``)::

    serve run deploy/serve_config.yaml

whose application names ``import_path: vsteer.server.ray_app:build`` and gives ``args``:
``model`` (a path or the ``smollm2`` alias), ``vllm_args`` (``vllm serve`` options) and ``vsteer``
(the steering settings of ``--additional-config '{"vsteer": ...}'``). Tenants
(``$VSTEER_TENANTS``, a file's path or its JSON text) and the registry (``$VSTEER_REGISTRY_URL``,
one PostgreSQL database for every replica) come from the replicas' environment.

A replica whose engine died answers 503 to every request (those in flight on it too) and fails
Ray Serve's health check, so Ray Serve replaces it while the other replicas serve.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vsteer.engine.plugin import SteeringSettings

__all__ = ["ReplicaArgs", "SteeringReplica", "build"]

#: the deployment's name in Ray Serve (and in a config file's ``deployments`` list)
DEPLOYMENT = "vsteer"


class ReplicaArgs(BaseModel):
    """The ``args`` of the application in a Ray Serve config file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2", description="A model path or vsteer's alias (smollm2).")
    vllm_args: list[str] = Field(default_factory=list, description="Options of `vllm serve`.")
    vsteer: SteeringSettings = Field(default_factory=SteeringSettings, description="vsteer's settings.")


class SteeringReplica:
    """One replica: vLLM's engine (with vsteer) and its OpenAI app, built in this process."""

    async def __init__(self, args: dict | ReplicaArgs | None = None) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        from vsteer.server.metrics import METRICS_ENV
        from vsteer.server.serve import stock_argv

        settings = args if isinstance(args, ReplicaArgs) else ReplicaArgs.model_validate(args or {})
        os.environ[METRICS_ENV] = "ray"  # vsteer's metrics, per replica, through Ray's pipeline
        parsed = _parse(stock_argv([settings.model, *settings.vllm_args], settings.vsteer))
        engine_args = AsyncEngineArgs.from_cli_args(parsed)
        usage = UsageContext.OPENAI_API_SERVER  # the steering engine behind vsteer's edge
        self.engine = AsyncLLM.from_vllm_config(
            engine_args.create_engine_config(usage_context=usage), usage_context=usage,
            stat_loggers=[RayPrometheusStatLogger],  # vLLM's metrics too, tagged per replica
            enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats)
        tasks = await self.engine.get_supported_tasks()
        self._vllm_app = build_app(parsed, tasks, self.engine.model_config)
        await init_app_state(self.engine, self._vllm_app.state, parsed, tasks)
        # vLLM's error handler stops "the server" once the engine is dead; here Ray Serve does
        # that (check_health), so it gets a stand-in to set.
        self._vllm_app.state.server = SimpleNamespace(should_exit=False)

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id.encode()
        app = self._vllm_app

        async def tagged(scope: dict, receive: Any, send: Any) -> None:
            """vLLM's app; every HTTP response says which replica answered (``vsteer-replica``)."""
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_tagged(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"vsteer-replica", replica)]}
                await send(message)

            await app(scope, receive, send_tagged)

        return tagged

    async def check_health(self) -> None:
        """Ray Serve's health check: raises once the engine has died (the replica is replaced)."""
        if getattr(self.engine, "errored", False):
            raise RuntimeError("the replica's vLLM engine has stopped")
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _parse(argv: list[str]) -> Any:
    try:  # vLLM 0.33 and later
        from vllm.entrypoints.common.cli_args import validate_parsed_serve_args
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    from vsteer.server.serve import serve_arg_parser

    parsed = serve_arg_parser("vsteer (Ray Serve replica)").parse_args(argv)
    validate_parsed_serve_args(parsed)
    return parsed


def build(args: dict) -> Any:
    """The application builder a Ray Serve config names (``vsteer.server.ray_app:build``).

    Raises:
        pydantic.ValidationError: ``args`` is not a valid :class:`ReplicaArgs` (names the field).
    """
    from ray import serve

    checked = ReplicaArgs.model_validate(args)
    os.environ.setdefault("VLLM_PLUGINS", "vsteer")
    deployment = serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30,
                                  max_ongoing_requests=64)(serve.ingress()(SteeringReplica))
    return deployment.bind(checked.model_dump(mode="json", exclude_defaults=True))
