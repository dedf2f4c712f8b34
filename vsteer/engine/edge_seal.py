"""The seal the serving edge puts on the engine arguments it writes, and the engine's check of it.

A server's engine accepts steering, a tenant tag or a cache salt only when the edge of that same
server wrote them: the edge binds them together with an HMAC-SHA256 under a secret that the server
generates at start-up and hands to its engine through the environment (``$VSTEER_EDGE_SECRET``;
never in vLLM's config, which is logged and hashed). A client that walks around the edge (a header
trick, a route the edge does not know, a vLLM path that rebuilds the request) cannot forge a seal,
so what it wrote is dropped: its request runs unsteered, in a cache namespace of its own.

Two seals:

- the *salt seal*: the edge writes a request's ``cache_salt`` as ``vsteer-edge:<id>:<mac>``,
  ``<id>`` a digest of the tenant and the client's own salt, ``<mac>`` its MAC. It survives vLLM paths that drop ``extra_args`` (beam search keeps ``cache_salt``), so tenants
  never share KV blocks there either;
- the *args seal* (``extra_args["vsteer_seal"]``): a MAC over the plan's JSON text, the tenant and
  the request's ``cache_salt`` exactly as forwarded.

The engine (:class:`vsteer.engine.scheduler.SteeringScheduler`) checks both when a request arrives:
an unsealed or wrongly sealed request loses every ``vsteer*`` key, and a request whose salt is not
a valid salt seal (or that has none) gets a salt unique to it (no tenant's namespace, and no other
request's: it reads no cached prefix).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

SECRET_ENV = "VSTEER_EDGE_SECRET"
SEAL_ARGS_KEY = "vsteer_seal"
SALT_PREFIX = "vsteer-edge:"
#: Salts the engine gives requests whose salt is not sealed (followed by a random token).
UNSEALED_PREFIX = "vsteer-unsealed:"
_VERSION = 1


def new_secret() -> str:
    """A fresh secret (hex) for one server."""
    return secrets.token_hex(32)


def secret_from_env() -> bytes | None:
    """The server's secret, or None where none is set (``vsteer.LLM`` in-process: no edge)."""
    raw = os.environ.get(SECRET_ENV)
    return raw.encode() if raw else None


def _mac(secret: bytes, parts: list) -> str:
    return hmac.new(secret, json.dumps([_VERSION, *parts], separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def seal_salt(secret: bytes, tenant: str | None, client_salt: str | None) -> str:
    """The ``cache_salt`` the edge forwards on every route that takes one:
    ``vsteer-edge:<id>:<mac of id>`` (77 characters, within vLLM's 128), ``<id>`` a digest of the
    tenant and the client's salt (the same for neither: the server's shared namespace)."""
    ident = hashlib.sha256(json.dumps([tenant, client_salt]).encode()).hexdigest()[:32]
    return f"{SALT_PREFIX}{ident}:{_mac(secret, ['salt', ident])[:32]}"


def salt_is_sealed(secret: bytes, salt: object) -> bool:
    """Whether ``salt`` is a salt :func:`seal_salt` made under ``secret``."""
    if not isinstance(salt, str) or not salt.startswith(SALT_PREFIX):
        return False
    ident, _, mac = salt[len(SALT_PREFIX):].partition(":")
    return hmac.compare_digest(mac, _mac(secret, ["salt", ident])[:32])


def seal_args(secret: bytes, plan_text: str | None, tenant: str | None, salt: str | None) -> str:
    """The args seal of a request whose plan (JSON text), tenant and forwarded salt these are."""
    return _mac(secret, ["args", plan_text, tenant, salt])


def args_are_sealed(secret: bytes, extra: dict, plan_key: str, tenant_key: str, salt: str | None) -> bool:
    """Whether ``extra`` carries a valid args seal over its plan, tenant and ``salt``; only those
    two vsteer keys may accompany the seal."""
    seal = extra.get(SEAL_ARGS_KEY)
    if not isinstance(seal, str):
        return False
    others = {k for k in extra if isinstance(k, str) and k.lower().startswith("vsteer")} - {SEAL_ARGS_KEY, plan_key, tenant_key}
    plan, tenant = extra.get(plan_key), extra.get(tenant_key)
    if others or not isinstance(plan, (str, type(None))) or not isinstance(tenant, (str, type(None))):
        return False
    return hmac.compare_digest(seal, seal_args(secret, plan, tenant, salt))


def unsealed_salt() -> str:
    """A salt no other request has."""
    return UNSEALED_PREFIX + secrets.token_hex(16)
