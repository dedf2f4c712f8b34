"""The vector registry in PostgreSQL (``$VSTEER_REGISTRY_URL``): one registry for every replica.

Vector contents (the safetensors file, small: 4 x hidden x layers bytes), global names, tenants'
ownership, per-tenant quotas and per-tenant configs in flight live in the database, so replicas on
nodes without a shared volume see the same registry, and transactions and constraints (not
process locks) keep concurrent writers from losing each other's work.

Each process keeps its local store folder as a read-through cache of contents: content-addressed,
so a cached file can never be stale; the database alone says which vectors exist. Engines read a
vector by sha256 from the cache, fetching it once from the database; pins (vectors kept readable
for running requests after a delete) stay local to the engine's node, as in the folder store.

Schema (created on first connect, under an advisory lock so replicas starting together agree)::

    vsteer_vectors(sha256 PK, content, created)
    vsteer_names(name PK, sha256 -> vsteer_vectors ON DELETE CASCADE)
    vsteer_tenant_vectors(tenant, sha256 -> vsteer_vectors, PK (tenant, sha256))
    vsteer_tenant_names(tenant, name, sha256, PK (tenant, name), -> vsteer_tenant_vectors CASCADE)
    vsteer_leases(id PK, tenant, config, holder, expires)
"""

from __future__ import annotations

import functools
import os
import threading
from datetime import timezone
from pathlib import Path
from typing import Any, Iterator

from vsteer._errors import NameConflictError, VectorFileError
from vsteer.vectors._safetensors_format import save_safetensors
from vsteer.vectors._store import VectorStore, _check_name, _check_sha, _SHA256, _NAME
from vsteer.vectors._vector import SteeringVector

__all__ = ["REGISTRY_ENV", "PgVectorStore", "open_store", "pool", "registry_url"]

#: A ``postgresql://`` URL: the registry lives in that database instead of the store folder.
REGISTRY_ENV = "VSTEER_REGISTRY_URL"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vsteer_vectors (
    sha256 char(64) PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content bytea NOT NULL,
    created timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS vsteer_names (
    name text PRIMARY KEY,
    sha256 char(64) NOT NULL REFERENCES vsteer_vectors ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS vsteer_tenant_vectors (
    tenant text NOT NULL,
    sha256 char(64) NOT NULL REFERENCES vsteer_vectors ON DELETE RESTRICT,
    PRIMARY KEY (tenant, sha256));
CREATE TABLE IF NOT EXISTS vsteer_tenant_names (
    tenant text NOT NULL,
    name text NOT NULL,
    sha256 char(64) NOT NULL,
    PRIMARY KEY (tenant, name),
    FOREIGN KEY (tenant, sha256) REFERENCES vsteer_tenant_vectors ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS vsteer_leases (
    id uuid PRIMARY KEY,
    tenant text NOT NULL,
    config text NOT NULL,
    holder text NOT NULL,
    expires timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS vsteer_leases_tenant ON vsteer_leases (tenant, expires);
"""
_SCHEMA_LOCK = 0x76737465  # pg_advisory_xact_lock key of schema creation ("vste")


def registry_url() -> str | None:
    """``$VSTEER_REGISTRY_URL``, checked to be a PostgreSQL URL (None when unset or empty).

    Raises:
        VectorFileError: it is set to something else (``key`` names the variable).
    """
    url = os.environ.get(REGISTRY_ENV, "").strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise VectorFileError("must be a postgresql:// URL", key=REGISTRY_ENV)
    return url


@functools.lru_cache(maxsize=None)
def _pool_for(url: str, pid: int) -> Any:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(url, min_size=1, max_size=int(os.environ.get("VSTEER_REGISTRY_POOL", 8)),
                          kwargs={"autocommit": True}, open=False, name="vsteer-registry")
    try:
        pool.open(wait=True, timeout=float(os.environ.get("VSTEER_REGISTRY_TIMEOUT", 30)))
    except Exception as exc:  # noqa: BLE001 - psycopg's PoolTimeout hides the cause in the log
        pool.close()
        raise VectorFileError(f"cannot connect to the registry database: {type(exc).__name__}: {exc}",
                              key=REGISTRY_ENV) from None
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)
    return pool


def pool(url: str) -> Any:
    """This process's connection pool for ``url`` (opened, schema created, on first use)."""
    return _pool_for(url, os.getpid())  # a forked child opens its own connections


def open_store(root: str | os.PathLike[str]) -> VectorStore:
    """The vector store of this process: in PostgreSQL when ``$VSTEER_REGISTRY_URL`` is set (with
    ``root`` as its local cache), else the folder ``root``."""
    url = registry_url()
    return PgVectorStore(root, url) if url else VectorStore(root)


class PgVectorStore(VectorStore):
    """`VectorStore` whose contents and names live in PostgreSQL; ``root`` is a local cache.

    Args:
        root: Local cache folder (created if missing); need not be shared between replicas.
        url: The database (``postgresql://...``).
    """

    def __init__(self, root: str | os.PathLike[str], url: str, *, cache_size: int = 64) -> None:
        super().__init__(root, cache_size=cache_size)
        self.url = url
        self._fetch_lock = threading.Lock()

    def _conn(self) -> Iterator[Any]:
        return pool(self.url).connection()

    # --- contents ------------------------------------------------------------------------------
    def put(self, vector: SteeringVector) -> str:
        sha = vector.sha256
        path = self.path(sha)
        if not path.exists():
            save_safetensors(vector, path)
        with self._conn() as conn:
            conn.execute("INSERT INTO vsteer_vectors (sha256, content) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (sha, path.read_bytes()))
        return sha

    def _fetch(self, sha: str) -> Path:
        """The local file of a vector, fetched from the database on a miss."""
        path = self.path(sha)
        if path.is_file():
            return path
        with self._conn() as conn:
            row = conn.execute("SELECT content FROM vsteer_vectors WHERE sha256 = %s", (sha,)).fetchone()
        if row is None:
            return path
        with self._fetch_lock:
            tmp = path.with_name(f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(bytes(row[0]))
            os.replace(tmp, path)
        return path

    def get(self, sha: str) -> SteeringVector:
        self._fetch(_check_sha(sha))
        return super().get(sha)

    def pin(self, sha: str, owner: str) -> None:
        self._fetch(_check_sha(sha))
        super().pin(sha, owner)

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
            return False
        with self._conn() as conn:
            return conn.execute("SELECT 1 FROM vsteer_vectors WHERE sha256 = %s", (sha.lower(),)).fetchone() is not None

    def list(self) -> list[str]:
        with self._conn() as conn:
            return [r[0] for r in conn.execute("SELECT sha256 FROM vsteer_vectors ORDER BY sha256")]

    def delete(self, ref: str) -> None:
        if isinstance(ref, str) and _SHA256.fullmatch(ref.lower()) is None:
            ref = self.names().get(ref, ref)
        sha = _check_sha(ref)
        from psycopg import errors

        try:
            with self._conn() as conn:
                deleted = conn.execute("DELETE FROM vsteer_vectors WHERE sha256 = %s", (sha,)).rowcount
        except errors.ForeignKeyViolation:
            raise VectorFileError("a tenant owns this vector", key=sha) from None
        finally:
            with self._lock:
                self._cache.pop(sha, None)
        self.path(sha).unlink(missing_ok=True)
        if not deleted:
            raise VectorFileError("no such vector in the store", key=sha)

    def delete_unowned(self, sha: str) -> bool:
        """Delete a vector's content unless a tenant owns it or a global name points at it (one
        statement, so an owner added meanwhile on another replica keeps it). True if deleted."""
        sha = _check_sha(sha)
        from psycopg import errors

        try:
            with self._conn() as conn:
                deleted = conn.execute(
                    "DELETE FROM vsteer_vectors v WHERE sha256 = %s"
                    " AND NOT EXISTS (SELECT 1 FROM vsteer_tenant_vectors t WHERE t.sha256 = v.sha256)"
                    " AND NOT EXISTS (SELECT 1 FROM vsteer_names n WHERE n.sha256 = v.sha256)", (sha,)).rowcount
        except errors.ForeignKeyViolation:  # an owner committed between the check and the delete
            return False
        if deleted:
            with self._lock:
                self._cache.pop(sha, None)
            self.path(sha).unlink(missing_ok=True)
        return bool(deleted)

    # --- names ---------------------------------------------------------------------------------
    def set_name(self, name: str, sha: str, *, overwrite: bool = False) -> None:
        _check_name(name)
        sha = _check_sha(sha)
        from psycopg import errors

        with self._conn() as conn, conn.transaction():
            row = conn.execute("SELECT sha256 FROM vsteer_names WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is not None and row[0] == sha:
                return
            if row is not None and not overwrite:
                raise NameConflictError(
                    f"name {name!r} already points at {row[0][:12]}; pass overwrite=True to re-point it", key=name)
            try:
                conn.execute("INSERT INTO vsteer_names (name, sha256) VALUES (%s, %s)"
                             " ON CONFLICT (name) DO UPDATE SET sha256 = EXCLUDED.sha256", (name, sha))
            except errors.ForeignKeyViolation:
                raise VectorFileError("no such vector in the store", key=sha) from None

    def remove_name(self, name: str) -> None:
        with self._conn() as conn:
            if not conn.execute("DELETE FROM vsteer_names WHERE name = %s", (str(name),)).rowcount:
                raise VectorFileError("no such name in the store", key=str(name))

    def _read_names(self) -> dict[str, str]:
        with self._conn() as conn:
            return dict(conn.execute("SELECT name, sha256 FROM vsteer_names ORDER BY name").fetchall())

    def resolve(self, ref: str) -> str:
        if isinstance(ref, str):
            with self._conn() as conn:
                if _SHA256.fullmatch(ref.lower()):
                    query, arg = "SELECT sha256 FROM vsteer_vectors WHERE sha256 = %s", ref.lower()
                elif _NAME.fullmatch(ref):
                    query, arg = "SELECT sha256 FROM vsteer_names WHERE name = %s", ref
                else:
                    query = None
                row = conn.execute(query, (arg,)).fetchone() if query else None
            if row is not None:
                return row[0]
        raise VectorFileError("no vector with this name or sha256 in the store", key=str(ref))

    def info(self, ref: str) -> dict[str, Any]:
        sha = self.resolve(ref)
        self._fetch(sha)
        info = super().info(sha)
        with self._conn() as conn:
            row = conn.execute("SELECT created FROM vsteer_vectors WHERE sha256 = %s", (sha,)).fetchone()
        if row is not None:
            info["created"] = row[0].astimezone(timezone.utc).isoformat(timespec="seconds")
        return info

    def import_folder(self, source: VectorStore) -> dict[str, int]:
        """Copy every vector and global name of a folder store into this registry (existing
        names are kept; a name that points elsewhere here is reported, not re-pointed).

        Returns:
            ``{"vectors": copied, "names": copied, "conflicts": names left as they were}``.
        """
        counts = {"vectors": 0, "names": 0, "conflicts": 0}
        for sha in source.list():
            if sha not in self:
                self.put(source.get(sha))
                counts["vectors"] += 1
        current = self.names()
        for name, sha in source.names().items():
            if current.get(name) == sha:
                continue
            if name in current:
                counts["conflicts"] += 1
                continue
            self.set_name(name, sha)
            counts["names"] += 1
        return counts

    def __repr__(self) -> str:
        return f"PgVectorStore(root={str(self.root)!r})"
