"""ASGI middleware: the serving edge. It validates a request's ``steering`` and is the only writer
of vsteer's engine arguments.

A completion, chat-completion, responses or messages body may carry ``"steering": {...}`` (the spec
of the README; with the official OpenAI client, through ``extra_body``) or, for clients that only
pass vLLM's extra arguments, ``"vllm_xargs": {"steering": "<spec as JSON text>"}``. The spec is
resolved once here (in a worker thread, never on the event loop), against the served model, the
vector store and the caller's tenant; a bad one is answered with HTTP 400 (404 for a vector the
caller may not see) and a JSON error whose ``param`` names the field, and never reaches the engine.
A good one becomes ``vllm_xargs["vsteer"]`` (the plan as JSON text: vLLM's extra arguments are flat).

Reserved keys: every ``vllm_xargs`` (or ``sampling_params.extra_args``) key whose name starts with
``vsteer``, in any case, on any route. A client that sends one gets 400 naming
``vllm_xargs.<key>``. Only this edge writes them: ``vsteer`` (the plan), ``vsteer_tenant`` on every
request of a tenant, and ``vsteer_seal``: an HMAC under the server's secret that binds plan, tenant
and cache salt together (:mod:`vsteer.engine.edge_seal`). The engine drops whatever it receives
unsealed, so a body that reached vLLM some other way runs unsteered in no tenant's namespace.

One parser: a request with several ``Content-Type``, ``Authorization``, ``Content-Encoding``,
``Content-Length`` or ``Transfer-Encoding`` headers, or a ``Content-Encoding`` other than identity,
is refused; a JSON body is parsed here and forwarded as this edge re-serialized it, under
``Content-Type: application/json`` (a body that is not a JSON object is refused with 400); a form
body is forwarded only after its fields were checked.

Cache salts: on every route that takes one, the forwarded ``cache_salt`` is the edge's sealed salt
of the tenant and the client's own salt; the engine derives the steered salt from it, and gives a
salt unique to the request to anything unsealed. Beam search (which drops engine arguments) keeps
the sealed salt, so tenants never share KV there either, but it cannot carry steering: steering (or
a server default) with ``use_beam_search`` is refused, as is steering on a ``background`` response
(its HTTP reply ends before the engine finishes).

``"steering_compare": true`` (completions and chat completions) runs the request twice, steered and
unsteered, each half through this edge like any request; see :mod:`vsteer.server.compare`.
"""


from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vsteer._errors import EngineError, SpecError, VectorFileError, VsteerError
from vsteer.engine import edge_seal
from vsteer.engine.request_args import TENANT_ARGS_KEY  # written on every request of a tenant
from vsteer.server.compare import no_steering, run_pair, split_compare
from vsteer.server.http import error_body as _error, read_body, respond as _respond

CONFIG_ENV = "VSTEER_SERVE_CONFIG"
#: Routes whose body takes ``vllm_xargs`` (vLLM 0.32): steering and the tenant tag travel there.
#: ``/invocations`` dispatches a completion or chat body by its shape.
XARGS_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations"})
#: Routes with a ``cache_salt`` but no ``vllm_xargs``: the tenant goes into the salt instead.
SALT_ONLY_PATHS = frozenset({"/v1/chat/completions/batch", "/v1/systemone", "/generative_scoring", "/inference/v1/generate"})
#: Kept for callers of the previous name.
STEERED_PATHS = tuple(sorted(XARGS_PATHS))
#: Engine-argument keys starting with this (in any case) are written only by the edge.
RESERVED_PREFIX = "vsteer"
#: Largest JSON or form body the edge reads (``$VSTEER_MAX_BODY_BYTES``); larger ones get 413.
MAX_BODY_BYTES = int(os.environ.get("VSTEER_MAX_BODY_BYTES", 16 * 2**20))
#: Headers a request may carry at most once (two could be read differently by the edge and vLLM).
_SINGLE_HEADERS = (b"content-type", b"authorization", b"content-encoding", b"content-length", b"transfer-encoding")
#: Interventions one served request may carry (``$VSTEER_MAX_INTERVENTIONS``).
MAX_INTERVENTIONS = int(os.environ.get("VSTEER_MAX_INTERVENTIONS", 32))
#: Body fields that become ``SamplingParams.extra_args`` on some vLLM route.
_XARGS_FIELDS = ("vllm_xargs", "extra_args")
_BODY_METHODS = ("POST", "PUT", "PATCH")
#: Paths that answer without an API key when tenants are configured (they carry no client data).
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/load"})


class _Resolver:
    """Resolves specs against the served model; built from ``$VSTEER_SERVE_CONFIG``."""

    @cached_property
    def _raw(self) -> dict:
        return json.loads(os.environ[CONFIG_ENV])

    @cached_property
    def _setup(self):
        from pathlib import Path

        from vsteer.engine.config import SteeringEngineConfig
        from vsteer.engine.plan import ModelShape
        from vsteer.models import model_info
        from vsteer.vectors._pg_store import open_store

        raw = self._raw
        info = model_info(raw["model_path"])
        engine = SteeringEngineConfig.model_validate(raw["engine"])
        return ModelShape(info.name, info.num_layers, info.hidden_size), open_store(Path(engine.store)), engine, raw["max_abs_scale"]

    @cached_property
    def _saes(self):
        """The served SAEs by name, and the SAE store ``sae:<name>/<feature>`` reads."""
        from vsteer.sae import SaeStore, load_sae

        engine = self._setup[2]
        return {name: load_sae(path) for name, path in engine.saes.items()}, SaeStore(self._raw.get("sae_store"))

    @cached_property
    def tenants(self):
        from vsteer.server.tenants import TenantDirectory

        return TenantDirectory.from_env(self._setup[1].root)

    def warm(self) -> None:
        """Read the configuration, load every served SAE and resolve the default steering now (at
        start-up, not in a request)."""
        self._setup, self._saes, self.tenants, self.default  # noqa: B018 - cached on first access

    @cached_property
    def default(self):
        """The plan of ``vsteer serve --default-steering`` (None without one), resolved once with
        the operator's authority: it may name any vector in the store."""
        spec = self._raw.get("default_steering")
        if spec is None:
            return None
        try:
            return self(spec)
        except SpecError as exc:
            raise SpecError(f"{exc.field}: {exc.reason}" if exc.field else exc.reason, field="--default-steering") from exc

    #: The engine's own limits (``EngineLimits``: resolved max_slots, magnitude bound...), once it is up.
    engine_check: Any = None

    def know_engine(self, vllm_config: Any) -> None:
        """Take the running engine's resolved ``max_slots``, dtype and limits, so the edge refuses
        what the engine would (it would otherwise answer 500): every plan then also passes the
        engine's own check (:func:`vsteer.engine.request_args.check_plan`) here."""
        from vsteer.engine.request_args import EngineLimits

        self.engine_check = EngineLimits.of_engine(self._setup[2], vllm_config, self._setup[1].get)

    def __call__(self, spec: Any, tenant: Any = None, created: set[str] | None = None):
        from vsteer.engine.plan import resolve_spec

        model, store, engine, max_abs_scale = self._setup
        limits = self.engine_check
        max_slots, magnitude = (limits.max_slots, limits.magnitude) if limits is not None else (None, None)
        try:
            spec = self._visible_refs(spec, tenant)
            return resolve_spec(spec, store=store, model=model, steerable_layers=engine.steerable_layers,
                                max_ablation_rank=engine.max_ablation_rank, max_slots=max_slots or engine.max_slots,
                                max_abs_scale=max_abs_scale, allow_paths=False, saes=self._saes[0],
                                sae_store=self._saes[1], max_sas_support=engine.max_sas_support,
                                condition_layers=engine.condition_layers, max_conditions=engine.max_conditions,
                                max_interventions=MAX_INTERVENTIONS, magnitude=magnitude, created=created,
                                check=self._served)
        except SpecError:
            raise
        except (TypeError, ValueError, ArithmeticError, RecursionError, MemoryError, VsteerError, KeyError) as exc:
            # what validation did not name (e.g. a number too large for a float): still the client's
            raise SpecError(f"invalid steering: {type(exc).__name__}: {str(exc)[:200]}", field="steering") from exc

    def _served(self, plan: Any, vectors: Any) -> None:
        """What only a server refuses (sara), then the engine's own check of the plan for any prompt
        length (once the engine is up), so the engine never refuses what the edge passed."""
        if any(item.op == "sara" for item in plan.interventions):
            raise SpecError("sara is not served yet (it needs a capture pass per request); use vsteer.LLM",
                            field="interventions")
        if self.engine_check is not None:
            import dataclasses

            from vsteer.engine.request_args import check_plan

            check_plan(plan, None, dataclasses.replace(self.engine_check, vectors=vectors))

    def _visible_refs(self, spec: Any, tenant: Any) -> Any:
        """Replace each vector name with the sha256 it means for this caller (a tenant, or anyone
        on a server without tenants); a vector the caller may not see does not exist for it (404,
        with or without tenants)."""
        from vsteer.engine.plan import SAE_FEATURE_PREFIX
        from vsteer.spec import parse_spec

        parsed = parse_spec(spec)
        if parsed is None:
            return None
        store = self._setup[1]
        public = store.names()

        def lookup(ref: str) -> str | None:
            if tenant is not None:
                sha = self.tenants.visible(tenant, ref, public)
                return sha if sha is not None and sha in store else None
            try:
                return store.resolve(ref)
            except VectorFileError:
                return None

        def visible(holder: dict, field: str) -> None:
            ref = holder.get("vector")
            if isinstance(ref, str) and not ref.startswith(SAE_FEATURE_PREFIX):  # SAE features are public
                sha = lookup(ref)
                if sha is None:
                    raise NotFoundError(f"unknown vector {ref!r}", field=f"{field}.vector")
                holder["vector"] = sha

        items = []
        for i, item in enumerate(parsed.model_dump(mode="json")["interventions"]):
            visible(item, f"interventions.{i}")
            when = item.get("when")
            if isinstance(when, dict) and "conditions" in when:  # a condition vector is a vector too
                for k, cond in enumerate(when["conditions"]):
                    visible(cond, f"interventions.{i}.when.conditions.{k}")
            elif isinstance(when, dict):
                visible(when, f"interventions.{i}.when")
            items.append({k: v for k, v in item.items() if v is not None})
        return {"interventions": items}


@functools.lru_cache(maxsize=None)
def shared_resolver() -> _Resolver:
    """The process's resolver (configuration read and SAEs loaded once, by whoever asks first)."""
    return _Resolver()


class NotFoundError(SpecError):
    """A referenced vector does not exist for this client (HTTP 404)."""


def reserved_key(body: Any) -> str | None:
    """The dotted path (e.g. ``vllm_xargs.vsteer``) of the first engine-argument key in a client
    body that only the edge may write, or None. Looks at every ``vllm_xargs`` and ``extra_args``
    object (or JSON text of one) at any depth."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}{key}"
                if isinstance(key, str) and key.lower() in _XARGS_FIELDS:
                    xargs = item
                    if isinstance(xargs, str):  # form routes take the object as JSON text
                        try:
                            xargs = json.loads(xargs)
                        except (ValueError, RecursionError):
                            xargs = None
                    if isinstance(xargs, dict):
                        for name in xargs:
                            if isinstance(name, str) and name.lower().startswith(RESERVED_PREFIX):
                                return f"{where}.{name}"
                stack.append((item, where + "."))
        elif isinstance(value, list):
            stack.extend((item, f"{path}{i}.") for i, item in enumerate(value))
    return None


def rewrite_body(body: dict, resolve: _Resolver, tenant: Any = None, path: str = "/v1/completions",
                 secret: bytes | None = None, created: set[str] | None = None):
    """Rewrite a client body for the engine: resolve ``steering`` into ``vllm_xargs["vsteer"]``,
    seal the cache salt (tenant and client salt) and the engine arguments. Returns the body and the
    plan (or None). ``created`` receives the hashes of inline vectors newly stored.

    Raises:
        SpecError: a bad spec, steering on a route or vLLM path that cannot carry it
            (``NotFoundError``: a vector this tenant may not see).
    """
    from vsteer.engine.plan import EXTRA_ARGS_KEY

    secret = secret if secret is not None else _secret()
    key = reserved_key(body)
    if key is not None:
        raise SpecError(f"{key} is reserved: only the server writes vsteer engine arguments", field=key)
    raw_xargs = body.get("vllm_xargs")
    xargs = dict(raw_xargs) if isinstance(raw_xargs, dict) else None
    said = "steering" in body  # "steering": null says "unsteered", which a server default does not override
    spec = body.pop("steering", None)
    if xargs is not None and "steering" in xargs:
        if said:
            raise SpecError("give steering either in the body or in vllm_xargs, not both", field="steering")
        said, spec = True, xargs.pop("steering")
    if spec is not None and path not in XARGS_PATHS:
        raise SpecError(f"steering is served on {', '.join(sorted(XARGS_PATHS))}, not on {path}", field="steering")
    if said:
        plan = None if spec is None else resolve(spec, tenant, created)
    else:
        plan = resolve.default if path in XARGS_PATHS else None
    if plan is not None and body.get("use_beam_search"):
        raise SpecError("steering (or the server's default steering) cannot run with beam search: vLLM's beam "
                        'search drops engine arguments; send "steering": null to run it unsteered', field="use_beam_search")
    if plan is not None and body.get("background"):
        raise SpecError("a steered response cannot run in the background (its vectors must outlive the request)",
                        field="background")
    if path not in XARGS_PATHS and path not in SALT_ONLY_PATHS:
        return body, plan
    name = tenant.name if tenant is not None else None
    salt = body.get("cache_salt")
    if salt is None or (isinstance(salt, str) and salt):  # anything else: vLLM refuses it
        body["cache_salt"] = edge_seal.seal_salt(secret, name, salt)
    if path in XARGS_PATHS and (xargs is not None or raw_xargs is None):  # a non-object: vLLM refuses it
        xargs = xargs or {}
        plan_text = json.dumps(plan.to_extra_args()) if plan is not None else None
        if plan_text is not None:
            xargs[EXTRA_ARGS_KEY] = plan_text
        if name is not None:
            xargs[TENANT_ARGS_KEY] = name
        xargs[edge_seal.SEAL_ARGS_KEY] = edge_seal.seal_args(secret, plan_text, name, body.get("cache_salt"))
        body["vllm_xargs"] = xargs
    return body, plan


@functools.lru_cache(maxsize=None)
def _secret() -> bytes:
    """This server's edge secret (``vsteer serve`` sets it before the engine starts)."""
    secret = edge_seal.secret_from_env()
    if secret is None:
        raise EngineError(f"the steering middleware needs ${edge_seal.SECRET_ENV}; start the server with vsteer serve")
    return secret


@dataclass
class _Prepared:
    raw: bytes
    shas: frozenset = frozenset()
    config: str | None = None
    ops: list = field(default_factory=list)
    json: bool = False  # forwarded as application/json (the edge wrote the body)
    created: frozenset = frozenset()  # inline vectors this request stored (collected when unused)


@dataclass
class _PreparedPair:
    """A ``steering_compare`` request: its steered and unsteered halves, and their seed."""

    halves: tuple[_Prepared, _Prepared]
    seed: Any


class SteeringMiddleware:
    """Pure ASGI middleware (vLLM adds it with ``--middleware``): the serving edge for every route,
    and the vector registry under ``/v1/vectors``."""

    def __init__(self, app: Any) -> None:
        from vsteer.server.registry import VectorRegistryAPI

        self.app = app
        self.resolve = shared_resolver()
        self.resolve.warm()  # vLLM builds the middleware stack at start-up: load SAEs here
        self.registry = VectorRegistryAPI(self.resolve, rejected=lambda status: self.metrics.rejected(status))
        self._metrics = None
        self._metrics_lock = threading.Lock()

    @property
    def metrics(self):
        with self._metrics_lock:
            if self._metrics is None:
                from vsteer.server.metrics import SteeringMetrics

                self._metrics = SteeringMetrics(self.resolve._setup[2].max_slots)  # None: the engine resolves it
            return self._metrics

    async def _refuse(self, send: Any, status: int, message: str, param: str | None) -> None:
        self.metrics.rejected(status)
        await _respond(send, status, _error(status, message, param))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and self.resolve.tenants is not None:
            headers = dict(scope["headers"])
            if self.resolve.tenants.authenticate(headers.get(b"authorization", b"").decode("latin-1")) is None:
                await send({"type": "websocket.close", "code": 1008})  # policy violation: no valid key
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import anyio

        from vsteer.server.engine_failures import raise_engine_failures
        from vsteer.server.tenants import _LimitError

        app = scope.get("app")
        engine_client = getattr(getattr(app, "state", None), "engine_client", None)
        self.metrics.start_polling(engine_client)
        if self.resolve.engine_check is None and getattr(engine_client, "vllm_config", None) is not None:
            self.resolve.know_engine(engine_client.vllm_config)
            raise_engine_failures(engine_client)
        path = route_path(scope)
        if _engine_dead(engine_client) and path not in PUBLIC_PATHS:
            await _respond(send, 503, _error(503, ENGINE_DEAD_MESSAGE, None))
            return
        send = _unavailable_once_dead(send, engine_client)
        ambiguous = _ambiguous_headers(scope["headers"])
        if ambiguous is not None:
            await self._refuse(send, ambiguous[0], ambiguous[1], ambiguous[2])
            return
        tenant = None
        if self.resolve.tenants is not None and path not in PUBLIC_PATHS:
            headers = dict(scope["headers"])
            tenant = self.resolve.tenants.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            if tenant is None:
                await self._refuse(send, 401, "a valid API key is required (Authorization: Bearer <key>)", None)
                return
        if self.registry.handles(path):
            await self.registry({**scope, "path": path}, receive, send, tenant)
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_body(receive, MAX_BODY_BYTES)
        except OverflowError:
            await self._refuse(send, 413, f"the request body exceeds {MAX_BODY_BYTES} bytes", None)
            return
        try:
            body = await _parse_body(scope, raw)
            prepared = await anyio.to_thread.run_sync(self._prepare, body, raw, path, tenant)
        except RecursionError:
            await self._refuse(send, 400, "the request body is nested too deeply", None)
            return
        except NotFoundError as exc:
            await self._refuse(send, 404, str(exc), exc.field)
            return
        except SpecError as exc:
            await self._refuse(send, 400, str(exc), exc.field)
            return
        except _LimitError as exc:
            await self._refuse(send, 429, str(exc), "steering")
            return
        halves = prepared.halves if isinstance(prepared, _PreparedPair) else (prepared,)
        try:
            if isinstance(prepared, _PreparedPair):
                await run_pair([functools.partial(self._run, half) for half in halves], scope, receive, send,
                               prepared.seed)
            else:
                await self._run(prepared, scope, receive, send)
        finally:
            for half in halves:
                self._release(half, tenant)

    async def _run(self, prepared: _Prepared, scope: dict, receive: Any, send: Any) -> None:
        """Forward one prepared request, counted in the metrics while it runs."""
        with self.metrics.request(prepared.ops, prepared.config):
            await self._forward(scope, receive, send, prepared.raw, prepared.json)

    def _release(self, prepared: _Prepared, tenant: Any) -> None:
        """Undo what :meth:`_prepare_body` took: vectors in use (inline ones no request uses any more
        are deleted), the tenant's running config."""
        self.registry.release(prepared.shas)  # a vector in use is not deleted from under its requests
        if tenant is not None and prepared.config is not None:
            self.resolve.tenants.finish(tenant, prepared.config)

    def _prepare(self, body: Any, raw: bytes, path: str, tenant: Any) -> _Prepared | _PreparedPair:
        """Check and rewrite one body (runs in a worker thread: it reads the vector store). The
        vectors it uses are marked in use, and its tenant's config started, before it returns. A
        body with ``"steering_compare": true`` becomes two: steered and unsteered."""
        if isinstance(body, _FormXargs):
            if body.reserved is not None:
                raise SpecError(f"{body.reserved} is reserved: only the server writes vsteer engine arguments",
                                field=body.reserved)
            return _Prepared(raw)
        if body is None:
            return _Prepared(raw)  # no body: nothing to read or smuggle
        try:
            body = json.loads(raw)  # here, not on the event loop: bodies can be large
        except ValueError:
            raise SpecError("the request body is not valid JSON", field=None) from None
        if not isinstance(body, dict):
            raise SpecError(f"the request body must be a JSON object, not {type(body).__name__}", field=None)
        pair = split_compare(body, path)
        if pair is None:
            return self._prepare_body(body, path, tenant)[0]
        steered, plan = self._prepare_body(pair.steered, path, tenant)
        try:
            if plan is None:
                raise no_steering()
            unsteered = self._prepare_body(pair.unsteered, path, tenant)[0]
        except BaseException:
            self._release(steered, tenant)
            raise
        return _PreparedPair((steered, unsteered), pair.seed)

    def _prepare_body(self, body: dict, path: str, tenant: Any) -> tuple[_Prepared, Any]:
        """Rewrite one JSON body (see :meth:`_prepare`); returns it prepared, and its plan (or None)."""
        created: set[str] = set()
        try:
            body, plan = rewrite_body(body, self.resolve, tenant, path, created=created)  # outside any lock
        finally:
            self.registry.note_inline(created)
        items = plan.interventions if plan is not None else ()
        shas = frozenset(item.vector for item in items) | frozenset(
            c[0] for _, conds in (plan.gates() if plan is not None else ()) for c in conds)
        self.registry.acquire_existing(shas)  # NotFoundError if one was deleted since it was resolved
        try:
            config = plan.hash if plan is not None else None
            if tenant is not None and config is not None:
                self.resolve.tenants.start(tenant, config)
            return _Prepared(json.dumps(body).encode(), shas, config, [item.op for item in items], True), plan
        except BaseException:
            self.registry.release(shas)
            raise

    async def _forward(self, scope: dict, receive: Any, send: Any, raw: bytes, prepared_json: bool = False) -> None:
        """Pass the (rewritten) request on; returns when its response (streamed or not) is done
        or the client has gone."""
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        drop = (b"content-length", b"transfer-encoding") + ((b"content-type",) if prepared_json else ())
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
        headers.append((b"content-length", str(len(raw)).encode()))
        if prepared_json:
            headers.append((b"content-type", b"application/json"))
        await self.app({**scope, "headers": headers}, replay, send)


#: What a request gets from a server whose engine has died (HTTP 503: retry, another replica serves it).
ENGINE_DEAD_MESSAGE = "this server's engine has stopped; retry the request (it is being restarted)"


def _engine_dead(engine_client: Any) -> bool:
    return bool(engine_client is not None and getattr(engine_client, "errored", False))


def _unavailable_once_dead(send: Any, engine_client: Any) -> Any:
    """``send``, except that a 500 answered while the engine is dead becomes a 503 (a request in
    flight when the engine died: retryable, not the server's bug). A stream already under way
    keeps its status and ends with vLLM's error event."""
    replaced = False

    async def guarded(message: dict) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message.get("status") == 500 and _engine_dead(engine_client):
            replaced = True
            await _respond(send, 503, _error(503, ENGINE_DEAD_MESSAGE, None))
            return
        if replaced and message["type"] == "http.response.body":
            return  # the 500's body, already replaced
        await send(message)

    return guarded


@dataclass
class _FormXargs:
    """A form body (vLLM's audio routes take ``vllm_xargs`` as a JSON-text form field)."""

    reserved: str | None


#: ``_parse_body``'s answer for a body to read as JSON (in a worker thread).
_JSON = object()


def route_path(scope: dict) -> str:
    """The request's path as vLLM's router matches it: without the server's ``--root-path``
    (ASGI servers may or may not include ``root_path`` in ``path``)."""
    path, root = scope["path"], (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    return path


def _ambiguous_headers(headers: list) -> tuple[int, str, str] | None:
    """(status, message, header) for a request whose headers the edge and vLLM could read
    differently, else None."""
    seen: dict[bytes, int] = {}
    for key, value in headers:
        key = key.lower()
        seen[key] = seen.get(key, 0) + 1
        if key == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return 415, f"Content-Encoding {value.decode('latin-1')[:40]!r} is not accepted; send the body uncompressed", "content-encoding"
    for key in _SINGLE_HEADERS:
        if seen.get(key, 0) > 1:
            return 400, f"the request has {seen[key]} {key.decode()} headers; send one", key.decode()
    return None


async def _parse_body(scope: dict, raw: bytes) -> Any:
    """A form's verdict on reserved keys, ``_JSON`` for any other non-empty body, or None."""
    headers = dict(scope["headers"])
    ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        from starlette.requests import Request

        async def once() -> dict:
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(scope, once).form()
            values = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        except Exception:  # noqa: BLE001 - an unreadable form is vLLM's to answer
            return None
        return _FormXargs(reserved_key(values))
    return _JSON if raw.strip() else None
