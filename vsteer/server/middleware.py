"""ASGI middleware: validate a request's ``steering`` at the edge and hand it to vLLM.

A completion or chat-completion body may carry ``"steering": {...}`` (the spec of the README; with
the official OpenAI client, through ``extra_body``) or, for clients that only pass vLLM's extra
arguments, ``"vllm_xargs": {"steering": "<spec as JSON text>"}``. The spec is resolved once here,
against the served model and the vector store; a bad one is answered with HTTP 400 and a JSON error
whose ``param`` names the field, and never reaches the engine. A good one becomes
``vllm_xargs["vsteer"]`` (the plan as JSON text: vLLM's extra arguments are flat) and a
``cache_salt`` derived from it, so prefix caching never shares KV blocks across steering.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any

from vsteer._errors import SpecError

CONFIG_ENV = "VSTEER_SERVE_CONFIG"
STEERED_PATHS = ("/v1/completions", "/v1/chat/completions")


class _Resolver:
    """Resolves specs against the served model; built from ``$VSTEER_SERVE_CONFIG``."""

    @cached_property
    def _setup(self):
        from pathlib import Path

        from vsteer.engine.config import SteeringEngineConfig
        from vsteer.engine.plan import ModelShape
        from vsteer.models import model_info
        from vsteer.vectors import VectorStore

        raw = json.loads(os.environ[CONFIG_ENV])
        info = model_info(raw["model_path"])
        engine = SteeringEngineConfig.model_validate(raw["engine"])
        return ModelShape(info.name, info.num_layers, info.hidden_size), VectorStore(Path(engine.store)), engine, raw["max_abs_scale"]

    @cached_property
    def _saes(self):
        """The served SAEs by name, and the SAE store ``sae:<name>/<feature>`` reads."""
        from vsteer.sae import SaeStore, load_sae

        raw = json.loads(os.environ[CONFIG_ENV])
        engine = self._setup[2]
        return {name: load_sae(path) for name, path in engine.saes.items()}, SaeStore(raw.get("sae_store"))

    @cached_property
    def tenants(self):
        from vsteer.server.tenants import TenantDirectory

        return TenantDirectory.from_env(self._setup[1].root)

    def __call__(self, spec: Any, tenant: Any = None):
        from vsteer.engine.plan import resolve_spec

        model, store, engine, max_abs_scale = self._setup
        if tenant is not None:
            spec = self._tenant_refs(spec, tenant)
        plan = resolve_spec(spec, store=store, model=model, steerable_layers=engine.steerable_layers,
                            max_ablation_rank=engine.max_ablation_rank, max_slots=engine.max_slots,
                            max_abs_scale=max_abs_scale, allow_paths=False, saes=self._saes[0],
                            sae_store=self._saes[1], max_sas_support=engine.max_sas_support)
        if plan is not None and any(item.op == "sara" for item in plan.interventions):
            raise SpecError("sara is not served yet (it needs a capture pass per request); use vsteer.LLM",
                            field="interventions")
        return plan

    def _tenant_refs(self, spec: Any, tenant: Any) -> Any:
        """Replace each vector name with the sha256 it means for this tenant; a vector the tenant
        may not see does not exist for it."""
        from vsteer.engine.plan import SAE_FEATURE_PREFIX
        from vsteer.spec import parse_spec

        parsed = parse_spec(spec)
        if parsed is None:
            return None
        public = self._setup[1].names()
        items = []
        for i, item in enumerate(parsed.model_dump(mode="json")["interventions"]):
            ref = item.get("vector")
            if isinstance(ref, str) and not ref.startswith(SAE_FEATURE_PREFIX):  # SAE features are public
                sha = self.tenants.visible(tenant, ref, public)
                if sha is None:
                    raise NotFoundError(f"unknown vector {ref!r}", field=f"interventions.{i}.vector")
                item["vector"] = sha
            items.append({k: v for k, v in item.items() if v is not None})
        return {"interventions": items}


class NotFoundError(SpecError):
    """A referenced vector does not exist for this client (HTTP 404)."""


def rewrite_body(body: dict, resolve: _Resolver, tenant: Any = None) -> dict:
    """Move ``steering`` into vLLM's extra arguments as a resolved plan (raises SpecError)."""
    from vsteer.engine.plan import EXTRA_ARGS_KEY

    xargs = dict(body.get("vllm_xargs") or {})
    spec = body.pop("steering", None)
    if "steering" in xargs:
        if spec is not None:
            raise SpecError("give steering either in the body or in vllm_xargs, not both", field="steering")
        spec = xargs.pop("steering")
    if EXTRA_ARGS_KEY in xargs:
        raise SpecError(f"vllm_xargs.{EXTRA_ARGS_KEY} is reserved for vsteer", field=f"vllm_xargs.{EXTRA_ARGS_KEY}")
    plan = resolve(spec, tenant)
    if plan is not None:
        xargs[EXTRA_ARGS_KEY] = json.dumps(plan.to_extra_args())
        body["cache_salt"] = f"vsteer-{plan.hash}" + (f"-{body['cache_salt']}" if body.get("cache_salt") else "")
    if xargs:
        body["vllm_xargs"] = xargs
    else:
        body.pop("vllm_xargs", None)
    return body


def _error(status: int, message: str, param: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}).encode()


class SteeringMiddleware:
    """Pure ASGI middleware (vLLM adds it with ``--middleware``): steering on completions, and
    the vector registry under ``/v1/vectors``."""

    def __init__(self, app: Any) -> None:
        from vsteer.server.registry import VectorRegistryAPI

        self.app = app
        self.resolve = _Resolver()
        self.registry = VectorRegistryAPI(self.resolve)
        self._metrics = None

    @property
    def metrics(self):
        if self._metrics is None:
            from vsteer.server.metrics import SteeringMetrics

            self._metrics = SteeringMetrics(self.resolve._setup[2].max_slots)
        return self._metrics

    async def _refuse(self, send: Any, status: int, message: str, param: str | None) -> None:
        self.metrics.rejected(status)
        await _respond(send, status, _error(status, message, param))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        self.metrics.start_polling(getattr(getattr(app, "state", None), "engine_client", None))
        tenant = None
        if self.resolve.tenants is not None and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            tenant = self.resolve.tenants.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            if tenant is None:
                await self._refuse(send, 401, "a valid API key is required (Authorization: Bearer <key>)", None)
                return
        if self.registry.handles(scope["path"]):
            await self.registry(scope, receive, send, tenant)
            return
        if scope["method"] != "POST" or scope["path"] not in STEERED_PATHS:
            await self.app(scope, receive, send)
            return
        raw = await read_body(receive)
        in_use: frozenset[str] = frozenset()
        config = None
        ops: list[str] = []
        try:
            body = json.loads(raw) if raw else {}
            if isinstance(body, dict) and ("steering" in body or "steering" in (body.get("vllm_xargs") or {})):
                body = rewrite_body(body, self.resolve, tenant)
                raw = json.dumps(body).encode()
                in_use = self.registry.vectors_of(body)
                config = body.get("cache_salt")
                ops = self.registry.ops_of(body)
            if tenant is not None and config is not None:
                self.resolve.tenants.start(tenant, config)
        except NotFoundError as exc:
            await self._refuse(send, 404, str(exc), exc.field)
            return
        except SpecError as exc:
            await self._refuse(send, 400, str(exc), exc.field)
            return
        except json.JSONDecodeError:
            pass  # vLLM answers malformed JSON itself
        except Exception as exc:  # noqa: BLE001 - only the tenant limit is expected here
            if type(exc).__name__ != "_LimitError":
                raise
            await self._refuse(send, 429, str(exc), "steering")
            return
        try:
            # a vector in use is not deleted from under its requests
            with self.registry.using(in_use), self.metrics.request(ops, config):
                await self._forward(scope, receive, send, raw)
        finally:
            if tenant is not None and config is not None:
                self.resolve.tenants.finish(tenant, config)

    async def _forward(self, scope: dict, receive: Any, send: Any, raw: bytes) -> None:
        """Pass the (rewritten) request on; returns when its response (streamed or not) is done
        or the client has gone."""
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


async def read_body(receive: Any, limit: int | None = None) -> bytes:
    """The whole request body (raises ``OverflowError`` past ``limit`` bytes)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise OverflowError(size)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Any, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
