"""Tenants' vectors, quotas and configs in flight in the PostgreSQL registry (every replica shares
them; see :mod:`vsteer.vectors._pg_store` for the schema).

Ownership and quotas: each change runs in one transaction holding the tenant's advisory lock, so
two replicas adding vectors for one tenant at once both land and ``max_vectors`` holds across
replicas. Configs in flight are leases: a row per running request with an expiry that the holding
process renews every few seconds; a replica that dies stops renewing, and its leases lapse after
``$VSTEER_LEASE_SECONDS`` (30 s), so a dead replica cannot keep a tenant at its limit.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from vsteer._errors import VectorFileError
from vsteer.server.tenants import Tenant, TenantDirectory, TenantsFile, _LimitError
from vsteer.vectors._pg_store import pool

#: Seconds a lease outlives its holder's last renewal.
LEASE_SECONDS = float(os.environ.get("VSTEER_LEASE_SECONDS", 30))


def _tenant_lock(conn: Any, tenant: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("vsteer-tenant:" + tenant,))


class PgTenantDirectory(TenantDirectory):
    """`TenantDirectory` over the registry database at ``url``."""

    def __init__(self, config: TenantsFile, store_root: Path, url: str) -> None:
        super().__init__(config, store_root)
        self.url = url
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._leases: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        pool(url)  # fail at start-up, not in the first request, when the database is unreachable

    def _conn(self) -> Any:
        return pool(self.url).connection()

    # --- ownership ---------------------------------------------------------------------------
    def owned(self, tenant: Tenant) -> dict:
        with self._conn() as conn:
            return _owned(conn, tenant.name)

    def add(self, tenant: Tenant, sha: str, name: str | None, *, overwrite: bool = False) -> None:
        from psycopg import errors

        try:
            with self._conn() as conn, conn.transaction():
                _tenant_lock(conn, tenant.name)
                data = self._check_add(tenant, sha, name, _owned(conn, tenant.name), overwrite=overwrite)
                if sha not in data["vectors"]:
                    conn.execute("INSERT INTO vsteer_tenant_vectors (tenant, sha256) VALUES (%s, %s)", (tenant.name, sha))
                if name:
                    conn.execute("INSERT INTO vsteer_tenant_names (tenant, name, sha256) VALUES (%s, %s, %s)"
                                 " ON CONFLICT (tenant, name) DO UPDATE SET sha256 = EXCLUDED.sha256",
                                 (tenant.name, name, sha))
        except errors.ForeignKeyViolation:  # the content was deleted between put and add
            raise VectorFileError("the vector was deleted while it was being added; upload it again", key=sha) from None

    def remove(self, tenant: Tenant, sha: str) -> None:
        with self._conn() as conn, conn.transaction():
            _tenant_lock(conn, tenant.name)
            conn.execute("DELETE FROM vsteer_tenant_vectors WHERE tenant = %s AND sha256 = %s", (tenant.name, sha))

    def collect(self, sha: str, store: Any) -> None:
        store.delete_unowned(sha)

    def owners(self, sha: str) -> int:
        with self._conn() as conn:
            return conn.execute("SELECT count(*) FROM vsteer_tenant_vectors WHERE sha256 = %s", (sha,)).fetchone()[0]

    def import_folder(self, root: Path) -> int:
        """Copy the ownership files of a folder store (``<root>/tenants/*.json``) of this
        directory's tenants into the database; returns how many tenants were imported. Their
        vectors must be in the registry already (`PgVectorStore.import_folder`).

        Raises:
            _LimitError: a tenant would own more than its ``max_vectors``.
            NameConflictError: a tenant's name already points at another vector here.
        """
        tenants = {t.name: t for t in self._by_key.values()}
        count = 0
        for path in sorted((Path(root) / "tenants").glob("*.json")):
            tenant = tenants.get(path.stem)
            if tenant is None:
                continue
            data = json.loads(path.read_text())
            named = set(data["names"].values())
            for name, sha in data["names"].items():
                self.add(tenant, sha, name)
            for sha in data["vectors"]:
                if sha not in named:
                    self.add(tenant, sha, None)
            count += 1
        return count

    # --- configs in flight: leases --------------------------------------------------------------
    def start(self, tenant: Tenant, config: str) -> None:
        lease = str(uuid.uuid4())
        with self._conn() as conn, conn.transaction():
            _tenant_lock(conn, tenant.name)
            conn.execute("DELETE FROM vsteer_leases WHERE tenant = %s AND expires < now()", (tenant.name,))
            running = {r[0] for r in conn.execute("SELECT DISTINCT config FROM vsteer_leases WHERE tenant = %s",
                                                  (tenant.name,))}
            if config not in running and len(running) >= tenant.limits.max_configs_in_flight:
                raise _LimitError(f"tenant {tenant.name!r} has {len(running)} distinct steering configs in flight "
                                  f"(max_configs_in_flight={tenant.limits.max_configs_in_flight})")
            conn.execute("INSERT INTO vsteer_leases (id, tenant, config, holder, expires)"
                         " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
                         (lease, tenant.name, config, self.holder, LEASE_SECONDS))
        with self._lock:
            self._leases[(tenant.name, config)].append(lease)
            self._start_renewer()

    def finish(self, tenant: Tenant, config: str) -> None:
        with self._lock:
            held = self._leases.get((tenant.name, config))
            lease = held.pop() if held else None
            if held == []:
                del self._leases[(tenant.name, config)]
        if lease is not None:
            with self._conn() as conn:
                conn.execute("DELETE FROM vsteer_leases WHERE id = %s", (lease,))

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew, name="vsteer-lease-renewer", daemon=True)
            self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                with self._conn() as conn:
                    conn.execute("UPDATE vsteer_leases SET expires = now() + make_interval(secs => %s)"
                                 " WHERE holder = %s", (LEASE_SECONDS, self.holder))
            except Exception:  # noqa: BLE001 - the database is back at the next round, or leases lapse
                pass

    def close(self) -> None:
        """Stop renewing and drop this process's leases."""
        self._stop.set()
        with self._conn() as conn:
            conn.execute("DELETE FROM vsteer_leases WHERE holder = %s", (self.holder,))


def _owned(conn: Any, tenant: str) -> dict:
    vectors = [r[0] for r in conn.execute(
        "SELECT sha256 FROM vsteer_tenant_vectors WHERE tenant = %s ORDER BY sha256", (tenant,))]
    names = dict(conn.execute("SELECT name, sha256 FROM vsteer_tenant_names WHERE tenant = %s ORDER BY name",
                              (tenant,)).fetchall())
    return {"names": names, "vectors": vectors}
