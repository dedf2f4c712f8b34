"""The vector registry REST API of ``vsteer serve``: upload, list, show and delete vectors.

    POST   /v1/vectors?name=NAME[&overwrite=true]
                                   body: a .safetensors or GGUF control-vector file -> 201 + info
                                   409 if NAME points at another vector (unless overwrite=true)
    GET    /v1/vectors             -> {"object": "list", "data": [info, ...]}
    GET    /v1/vectors/{ref}       -> info (ref: a name or sha256)          404 if unknown
    DELETE /v1/vectors/{ref}       -> {"deleted": sha256}                    409 while in use

Vectors are stored content-addressed in the server's vector store (a folder, or the PostgreSQL
registry of ``$VSTEER_REGISTRY_URL``), where the engine reads them by sha256 (nothing is pickled per
request). A vector that running requests on this server use cannot be deleted until they finish. A
refused request stores nothing; every refusal is counted in ``vsteer_requests_rejected_total``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote

from vsteer._errors import NameConflictError, SpecError, VectorFileError
from vsteer.server.http import error_body as _error, read_body, respond as _respond

PREFIX = "/v1/vectors"
#: Largest accepted upload (a float32 vector for 100 layers of hidden 16384 is 6.5 MB).
MAX_UPLOAD_BYTES = int(os.environ.get("VSTEER_MAX_UPLOAD_BYTES", 64 * 2**20))


class VectorRegistryAPI:
    def __init__(self, resolver: Any, rejected: Any = None) -> None:
        self._resolver = resolver
        self._rejected = rejected or (lambda status: None)  # counts each 4xx this API answers
        self._in_use: Counter[str] = Counter()
        #: vectors stored only because a request gave them inline: deleted once no request uses them
        self._inline: set[str] = set()
        default = resolver.default
        #: vectors of the server's --default-steering: never deleted while it serves
        self._pinned = frozenset(item.vector for item in default.interventions) if default else frozenset()
        #: Held while a request resolves and marks its vectors in use, while an upload stores and
        #: names a vector, and while a delete checks and removes one: none sees another half done.
        self.lock = threading.RLock()

    def handles(self, path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    # --- in-use tracking ------------------------------------------------------------------------
    def acquire(self, shas: frozenset[str]) -> None:
        """Mark vectors in use by one more request (they cannot be deleted until released)."""
        with self.lock:
            self._in_use.update(shas)

    def acquire_existing(self, shas: frozenset[str]) -> None:
        """``acquire``, after checking under the lock that every vector is still stored.

        Raises:
            NotFoundError: one was deleted since the request resolved it.
        """
        from vsteer.server.middleware import NotFoundError

        with self.lock:
            gone = next((sha for sha in shas if sha not in self._store), None)
            if gone is not None:
                raise NotFoundError(f"vector {gone} was deleted while this request was checked", field="steering")
            self.acquire(shas)

    def note_inline(self, created: set[str]) -> None:
        """Vectors a request stored because it gave them inline (collected once unused)."""
        if created:
            with self.lock:
                self._inline |= created

    def release(self, shas: frozenset[str]) -> None:
        """Undo one ``acquire``; an inline vector no request uses any more is deleted."""
        with self.lock:
            self._in_use.subtract(shas)
            self._in_use += Counter()  # drop zero counts
            for sha in shas & self._inline:
                if not self._in_use.get(sha):
                    self._inline.discard(sha)
                    try:
                        self._store.delete(sha)
                    except VectorFileError:
                        pass  # already gone

    @contextmanager
    def using(self, shas: frozenset[str]) -> Iterator[None]:
        """``acquire`` for the duration of a block."""
        self.acquire(shas)
        try:
            yield
        finally:
            self.release(shas)

    # --- HTTP -------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any, tenant: Any = None) -> None:
        """Answer one registry request; file work runs in a worker thread, off the event loop."""
        from functools import partial

        from anyio import to_thread

        from vsteer.server.tenants import _LimitError

        method, path = scope["method"], scope["path"]
        ref = unquote(path[len(PREFIX) + 1:]) if path.startswith(PREFIX + "/") else None
        try:
            if method == "POST" and ref is None:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
                name, overwrite = _one(query, "name"), _flag(query, "overwrite")
                try:
                    data = await read_body(receive, MAX_UPLOAD_BYTES)
                except OverflowError:
                    raise _HTTPError(413, f"upload exceeds {MAX_UPLOAD_BYTES} bytes", "file") from None
                status, payload = 201, await to_thread.run_sync(partial(self._upload, tenant, data, name, overwrite))
            elif method == "GET" and ref is None:
                status, payload = 200, {"object": "list", "data": await to_thread.run_sync(self._list, tenant)}
            elif method == "GET":
                status, payload = 200, await to_thread.run_sync(lambda: self._info(tenant, self._sha(tenant, ref)))
            elif method == "DELETE" and ref is not None:
                status, payload = 200, await to_thread.run_sync(self._delete, tenant, ref)
            else:
                raise _HTTPError(405, f"{method} {path} is not supported", None)
        except _HTTPError as exc:
            status, payload = exc.status, _error(exc.status, exc.message, exc.param)
        except _LimitError as exc:
            status, payload = 429, _error(429, str(exc), "file")
        except NameConflictError as exc:
            status, payload = 409, _error(409, exc.reason, "name")
        except (SpecError, VectorFileError, ValueError) as exc:
            message = exc.reason if isinstance(exc, VectorFileError) else str(exc)  # never the server's paths
            status, payload = 400, _error(400, message, getattr(exc, "field", None) or getattr(exc, "key", None))
        else:
            payload = json.dumps(payload).encode()
        if status >= 400:
            self._rejected(status)
        await _respond(send, status, payload)

    @property
    def _store(self):
        return self._resolver._setup[1]

    @property
    def _tenants(self):
        return self._resolver.tenants

    def _list(self, tenant: Any) -> list[dict]:
        out = []
        for sha in self._visible_shas(tenant):
            try:
                out.append(self._info(tenant, sha))
            except (VectorFileError, OSError):
                pass  # deleted while listing
        return out

    def _visible_shas(self, tenant: Any) -> list[str]:
        if tenant is None:
            return self._store.list()
        owned = self._tenants.owned(tenant)["vectors"]
        return sorted(set(owned) | set(self._store.names().values()))

    def _sha(self, tenant: Any, ref: str) -> str:
        if tenant is not None:
            sha = self._tenants.visible(tenant, ref, self._store.names())
            if sha is None or sha not in self._store:
                raise _HTTPError(404, f"no vector named {ref!r}", "ref")
            return sha
        try:
            return self._store.resolve(ref)
        except VectorFileError:
            raise _HTTPError(404, f"no vector named {ref!r}", "ref") from None

    def _info(self, tenant: Any, sha: str) -> dict:
        info = self._store.info(sha)
        info["in_use"] = self._in_use.get(sha, 0)
        if tenant is not None:  # names are per tenant: show only this tenant's and public ones
            own = self._tenants.owned(tenant)["names"]
            info["names"] = sorted([n for n, s in own.items() if s == sha] + [n for n in info["names"]])
        return info

    def _upload(self, tenant: Any, data: bytes, name: str | None, overwrite: bool = False) -> dict:
        from vsteer.vectors import load_vector

        model = self._resolver._setup[0]
        suffix = ".gguf" if data[:4] == b"GGUF" else ".safetensors"
        with tempfile.TemporaryDirectory(prefix="vsteer-upload-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                vector = load_vector(path)
            except VectorFileError as exc:
                raise _HTTPError(400, f"not a readable vector file: {exc.reason}", "file") from exc
        if vector.hidden_size != model.hidden_size:
            raise _HTTPError(400, f"vector has hidden size {vector.hidden_size} but {model.name} has {model.hidden_size}", "file")
        if vector.model is not None and vector.model != model.name:
            raise _HTTPError(400, f"vector was computed for model {vector.model!r}, not {model.name!r}", "file")
        if max(vector.layers) >= model.num_layers:
            raise _HTTPError(400, f"vector has layer {max(vector.layers)} but {model.name} has {model.num_layers} layers", "file")
        _check_entries(vector)
        with self.lock:  # checked, stored and named in one step with respect to deletes
            sha = vector.sha256
            try:  # nothing is stored for a refused upload
                if tenant is not None:
                    self._tenants.check_add(tenant, sha, name, overwrite=overwrite)
                elif name:
                    self._store.check_name(name)
                    current = self._store.names().get(name)
                    if current is not None and current != sha and not overwrite:
                        raise NameConflictError(f"name {name!r} already points at {current[:12]}; pass "
                                                "overwrite=true to re-point it", key=name)
            except NameConflictError:
                raise
            except VectorFileError as exc:
                raise _HTTPError(400, exc.reason, "name") from exc
            for attempt in range(3):  # another replica may delete the content between put and add
                self._store.put(vector)
                try:
                    if tenant is not None:
                        self._tenants.add(tenant, sha, name, overwrite=overwrite)
                    elif name:
                        self._store.set_name(name, sha, overwrite=overwrite)
                    break
                except NameConflictError:
                    raise
                except VectorFileError:
                    if attempt == 2:
                        raise
            self._inline.discard(sha)  # uploaded: owned now, no longer collected
            return self._info(tenant, sha)

    def _delete(self, tenant: Any, ref: str) -> dict:
        with self.lock:
            sha = self._sha(tenant, ref)
            if tenant is not None and sha not in self._tenants.owned(tenant)["vectors"]:
                raise _HTTPError(404, f"no vector named {ref!r} of yours", "ref")  # public vectors are the operator's
            if sha in self._pinned:
                raise _HTTPError(409, f"vector {ref!r} is used by the server's --default-steering", "ref")
            if self._in_use.get(sha):
                raise _HTTPError(409, f"vector {ref!r} is in use by {self._in_use[sha]} running request(s)", "ref")
            if tenant is not None:
                self._tenants.remove(tenant, sha)
                self._tenants.collect(sha, self._store)  # the content stays for its other owners
            else:
                self._store.delete(sha)
        return {"deleted": sha}


def _check_entries(vector: Any) -> None:
    """Refuse an upload with an entry that is not finite or is past the spec's bound."""
    import torch

    from vsteer.spec import MAX_ABS_VECTOR_ENTRY

    for layer, tensor in sorted(vector.layers.items()):
        t = tensor.to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise _HTTPError(400, f"vector has a NaN or infinite entry at layer {layer}", "file")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > MAX_ABS_VECTOR_ENTRY:
            raise _HTTPError(400, f"vector has an entry of magnitude {peak:g} at layer {layer}; entries are bounded by "
                                  f"{MAX_ABS_VECTOR_ENTRY:g}", "file")


def _one(query: dict[str, list[str]], key: str) -> str | None:
    """The one value of a query parameter (None if absent); 400 when it is given twice."""
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise _HTTPError(400, f"give ?{key}= once, not {len(values)} times", key)
    return values[0]


def _flag(query: dict[str, list[str]], key: str) -> bool:
    value = _one(query, key)
    if value is None:
        return False
    if value.lower() not in ("true", "false", "1", "0"):
        raise _HTTPError(400, f"?{key}= must be true or false, not {value[:20]!r}", key)
    return value.lower() in ("true", "1")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
