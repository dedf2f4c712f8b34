"""Tenants of ``vsteer serve``: API keys, per-tenant vector namespaces and limits.

Tenants come from ``--tenants FILE`` (or ``$VSTEER_TENANTS``, the same JSON as text)::

    {"tenants": {"alice": {"keys": ["sk-..."], "max_vectors": 100, "max_configs_in_flight": 16},
                 "bob":   {"keys": ["sk-..."]}}}

With tenants configured, every request except ``/health``, ``/ping``, ``/version``, ``/metrics``
and ``/load`` needs ``Authorization: Bearer <key>`` (401 otherwise). A tenant sees and uses its own vectors and the public ones (the store's global names,
managed by the operator with ``vsteer vectors``); another tenant's vectors do not exist for it
(404). Vector contents are stored once, content-addressed; ownership is a per-tenant file of names
and hashes under ``<store>/tenants/``. Keys are kept only as sha256 digests and never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import filelock

from vsteer._errors import EngineError, NameConflictError, VectorFileError

TENANTS_ENV = "VSTEER_TENANTS"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(min_length=1, description="API keys of this tenant.")
    max_vectors: int = Field(default=1000, ge=0, description="Vectors this tenant may own.")
    max_configs_in_flight: int = Field(default=64, ge=1, description="Distinct steering configs running at once.")


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantLimits]


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantDirectory:
    """Key lookup, ownership files and in-flight accounting for every tenant."""

    def __init__(self, config: TenantsFile, store_root: Path) -> None:
        self._by_key: dict[str, Tenant] = {}
        for name, limits in config.tenants.items():
            if not _NAME.fullmatch(name):
                raise EngineError(f"tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
            for key in limits.keys:
                digest = _digest(key)
                if digest in self._by_key:
                    raise EngineError(f"an API key of tenant {name!r} is also another tenant's")
                self._by_key[digest] = Tenant(name, limits)
        self._root = store_root / "tenants"
        self._root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._in_flight: dict[str, Counter[str]] = {}

    @classmethod
    def from_env(cls, store_root: Path) -> "TenantDirectory | None":
        """The tenants of ``$VSTEER_TENANTS`` (None without), in the PostgreSQL registry when
        ``$VSTEER_REGISTRY_URL`` is set, else in ``<store_root>/tenants/``."""
        raw = os.environ.get(TENANTS_ENV)
        if not raw:
            return None
        config = TenantsFile.model_validate_json(raw)
        from vsteer.vectors._pg_store import registry_url

        url = registry_url()
        if url:
            from vsteer.server.tenants_pg import PgTenantDirectory

            return PgTenantDirectory(config, store_root, url)
        return cls(config, store_root)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key is in an ``Authorization: Bearer <key>`` header, or None."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self._by_key.get(_digest(authorization[7:].strip()))

    # --- ownership ---------------------------------------------------------------------------
    def _file(self, tenant: Tenant) -> Path:
        return self._root / f"{tenant.name}.json"

    def owned(self, tenant: Tenant) -> dict:
        """{"names": {name: sha}, "vectors": [sha, ...]}"""
        path = self._file(tenant)
        if not path.exists():
            return {"names": {}, "vectors": []}
        return json.loads(path.read_text())

    def _save(self, tenant: Tenant, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._root, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self._file(tenant))

    def _locked(self) -> filelock.FileLock:
        """Held (in this process and across processes sharing the folder) while a tenant's file is
        read, changed and replaced, so concurrent writers never lose each other's changes."""
        return filelock.FileLock(str(self._root / ".lock"), timeout=60)

    def check_add(self, tenant: Tenant, sha: str, name: str | None, *, overwrite: bool = False) -> dict:
        """What the tenant owns, after checking that :meth:`add` of ``sha`` and ``name`` would pass.

        Raises:
            _LimitError: the tenant's ``max_vectors`` is reached.
            VectorFileError: a bad name.
            NameConflictError: ``name`` points at another vector and ``overwrite`` is false.
        """
        return self._check_add(tenant, sha, name, self.owned(tenant), overwrite=overwrite)

    @staticmethod
    def _check_add(tenant: Tenant, sha: str, name: str | None, data: dict, *, overwrite: bool = False) -> dict:
        if sha not in data["vectors"] and len(data["vectors"]) >= tenant.limits.max_vectors:
            raise _LimitError(f"tenant {tenant.name!r} already owns {len(data['vectors'])} vectors "
                              f"(max_vectors={tenant.limits.max_vectors})")
        if name and (not _NAME.fullmatch(name) or re.fullmatch(r"[0-9a-fA-F]{64}", name)):
            raise VectorFileError("names are 1-64 letters, digits, '.', '_' or '-' (not a sha256)", key=name)
        current = data["names"].get(name) if name else None
        if current is not None and current != sha and not overwrite:
            raise NameConflictError(f"name {name!r} already points at {current[:12]}; pass overwrite=true to "
                                    "re-point it", key=name)
        return data

    def add(self, tenant: Tenant, sha: str, name: str | None, *, overwrite: bool = False) -> None:
        """Give ``tenant`` the vector ``sha`` (and the name ``name`` for it)."""
        with self._lock, self._locked():
            data = self.check_add(tenant, sha, name, overwrite=overwrite)
            if sha not in data["vectors"]:
                data["vectors"].append(sha)
            if name:
                data["names"][name] = sha
            self._save(tenant, data)

    def remove(self, tenant: Tenant, sha: str) -> None:
        """Take the vector ``sha`` and every name for it from ``tenant``."""
        with self._lock, self._locked():
            data = self.owned(tenant)
            data["vectors"] = [s for s in data["vectors"] if s != sha]
            data["names"] = {n: s for n, s in data["names"].items() if s != sha}
            self._save(tenant, data)

    def collect(self, sha: str, store: Any) -> None:
        """Delete a vector's content from ``store`` once no tenant owns it and no global name
        points at it."""
        with self._locked():
            if not self.owners(sha) and sha not in store.names().values():
                try:
                    store.delete(sha)
                except VectorFileError:
                    pass  # already gone

    def owners(self, sha: str) -> int:
        """How many tenants own a vector (its content is deleted only when none do)."""
        return sum(1 for p in self._root.glob("*.json") if sha in json.loads(p.read_text())["vectors"])

    def visible(self, tenant: Tenant, ref: str, public: dict[str, str]) -> str | None:
        """The sha256 ``ref`` means for this tenant (own name, public name, own or public sha)."""
        data = self.owned(tenant)
        if ref in data["names"]:
            return data["names"][ref]
        if ref in public:
            return public[ref]
        if ref in data["vectors"] or ref in public.values():
            return ref
        return None

    # --- in-flight configs ---------------------------------------------------------------------
    def start(self, tenant: Tenant, config: str) -> None:
        with self._lock:
            running = self._in_flight.setdefault(tenant.name, Counter())
            if config not in running and len(running) >= tenant.limits.max_configs_in_flight:
                raise _LimitError(f"tenant {tenant.name!r} has {len(running)} distinct steering configs in flight "
                                  f"(max_configs_in_flight={tenant.limits.max_configs_in_flight})")
            running[config] += 1

    def finish(self, tenant: Tenant, config: str) -> None:
        with self._lock:
            running = self._in_flight[tenant.name]
            running[config] -= 1
            if running[config] <= 0:
                del running[config]


class _LimitError(Exception):
    """A tenant limit was reached (HTTP 429)."""
