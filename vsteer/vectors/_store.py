"""Vector files on disk: format dispatch (`load_vector`/`save_vector`) and `VectorStore`.

`VectorStore` is content-addressed: a vector lives at ``<root>/<sha256>.safetensors`` where the
hash covers only its numbers (`SteeringVector.sha256`), so storing the same numbers twice is a
no-op and a name can never point at different numbers.

Names are a thin layer on top: ``<root>/names.json`` maps a name to a sha256. It is replaced
atomically under ``filelock.FileLock(<root>/.lock)``, so several processes can register names in
one store at once; readers need no lock (they see the old file or the new one, never a mix) and
read it afresh on every call.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
from safetensors import safe_open

from vsteer._errors import NameConflictError, VectorFileError
from vsteer.vectors._gguf_format import (
    GGUF_MAGIC,
    PROVENANCE_MODEL_HINT,
    load_gguf,
    save_gguf,
)
from vsteer.vectors._safetensors_format import (
    _read_metadata,
    load_safetensors,
    save_safetensors,
)
from vsteer.vectors._vector import SteeringVector

__all__ = ["VectorStore", "check_vector_model", "load_vector", "save_vector"]

_SUFFIX_SAFETENSORS = ".safetensors"
_SUFFIX_GGUF = ".gguf"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STORE_FILE = re.compile(r"([0-9a-f]{64})\.safetensors")
# Names are JSON keys, never paths; 64 hex digits are refused so a name can never be read as a sha.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAMES_FILE = "names.json"
_NAMES_FORMAT_VERSION = 1
_LOCK_FILE = ".lock"
_LOCK_TIMEOUT_S = 60.0
_PINS = ".pins"  # <store>/.pins/<owner>/<sha>.safetensors: hard links held for running requests
_LAYER_TENSOR = re.compile(r"layer\.(0|[1-9][0-9]*)")


def check_vector_model(vector: SteeringVector, *, model: str, hidden_size: int) -> None:
    """Refuse a vector made for another model.

    A vector without a model name (a GGUF import, a hand-made vector) is checked on its hidden
    size only. Names are compared exactly.

    Args:
        vector: The vector about to be applied.
        model: Name of the model it would be applied to.
        hidden_size: That model's hidden size.

    Raises:
        VectorFileError: ``vector.model`` is set and differs from ``model``, or the hidden sizes
            differ. ``key`` is the vector's sha256.

    Example:
        >>> check_vector_model(v, model="SmolLM2-135M-Instruct", hidden_size=576)
    """
    _check_expected(vector, model=model, hidden_size=hidden_size)


def _check_expected(
    vector: SteeringVector,
    *,
    model: str | None,
    hidden_size: int | None,
    path: str | None = None,
) -> None:
    wrong_model = model is not None and vector.model is not None and vector.model != model
    wrong_hidden = hidden_size is not None and vector.hidden_size != hidden_size
    if not (wrong_model or wrong_hidden):
        return
    made_for = f"model {vector.model}" if vector.model is not None else "an unnamed model"
    if model is not None and hidden_size is not None:
        expected = f"{model} (hidden {hidden_size})"
    elif model is not None:
        expected = model
    else:
        expected = f"a model with hidden {hidden_size}"
    raise VectorFileError(
        f"vector was computed for {made_for} (hidden {vector.hidden_size}), not {expected}",
        path=path,
        key=vector.sha256,
    )


def save_vector(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    model_hint: str | None = None,
) -> None:
    """Write ``vector`` in the format named by the suffix of ``path``.

    Args:
        vector: The vector to write.
        path: Ends in ``.safetensors`` (vsteer's format) or ``.gguf`` (llama.cpp control vector).
        model_hint: For ``.gguf`` only: the HF model_type. Defaults to the hint the vector was
            imported with (``provenance["gguf_model_hint"]``).

    Raises:
        VectorFileError: Unknown suffix, a GGUF without a model hint, or a write failure.

    Example:
        >>> save_vector(v, "happy.gguf", model_hint="llama")
    """
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix == _SUFFIX_SAFETENSORS:
        if model_hint is not None:
            raise VectorFileError("model_hint applies to .gguf files only", path=path)
        save_safetensors(vector, path)
    elif suffix == _SUFFIX_GGUF:
        hint = model_hint if model_hint is not None else vector.provenance.get(PROVENANCE_MODEL_HINT)
        if not hint:
            raise VectorFileError(
                "a GGUF control vector needs model_hint (the target model's HF model_type, e.g. 'llama')",
                path=path,
                key="controlvector.model_hint",
            )
        save_gguf(vector, path, model_hint=hint)
    else:
        raise VectorFileError(
            f"unknown vector file suffix {suffix!r}; use .safetensors or .gguf", path=path
        )


def load_vector(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a vector file, choosing the format by suffix, else by the file's first bytes.

    Args:
        path: A ``.safetensors`` or ``.gguf`` file; with another suffix, GGUF is recognised by
            its ``GGUF`` magic and safetensors by its JSON header.

    Raises:
        VectorFileError: The file is missing, of unknown format, or invalid (see
            `load_safetensors` and `load_gguf`).

    Example:
        >>> v = load_vector("happy.safetensors")
    """
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix == _SUFFIX_SAFETENSORS:
        return load_safetensors(path)
    if suffix == _SUFFIX_GGUF:
        return load_gguf(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise VectorFileError(f"cannot read the vector file: {exc}", path=path) from exc
    if head[:4] == GGUF_MAGIC:
        return load_gguf(path)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        return load_safetensors(path)
    raise VectorFileError("unknown vector file format (neither safetensors nor GGUF)", path=path)


class VectorStore:
    """A content-addressed folder of vectors: ``<root>/<sha256>.safetensors``.

    Writes are atomic (temporary file + ``os.replace``), so readers never see a partial file,
    and idempotent: a vector whose numbers are already stored is not written again, and the
    stored model name, method and provenance are kept. Reads go through a small LRU cache.
    Safe to share between threads.

    Args:
        root: The folder; created if missing.
        cache_size: How many vectors ``get`` keeps in memory.

    Example:
        >>> store = VectorStore(Path("~/.cache/vsteer/vectors").expanduser())
        >>> sha = store.put(vector)
        >>> store.get(sha) == vector
        True
    """

    def __init__(self, root: str | os.PathLike[str], *, cache_size: int = 64) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VectorFileError(
                f"cannot create the vector store folder: {exc}", path=str(self.root)
            ) from exc
        self._cache_size = cache_size
        self._cache: OrderedDict[str, SteeringVector] = OrderedDict()
        self._lock = threading.Lock()
        # Created on first use (the lock file appears only when names are written).
        self._file_lock = filelock.FileLock(str(self.root / _LOCK_FILE), timeout=_LOCK_TIMEOUT_S)

    def path(self, sha: str) -> Path:
        """Return where the vector with this sha256 is (or would be) stored.

        Raises:
            ValueError: ``sha`` is not 64 hex characters.
        """
        return self.root / f"{_check_sha(sha)}.safetensors"

    def put(self, vector: SteeringVector) -> str:
        """Store ``vector`` unless its numbers are already stored; return its sha256.

        Raises:
            VectorFileError: The vector has negative layers or the file cannot be written.

        Example:
            >>> sha = store.put(vector)
            >>> sha == vector.sha256
            True
        """
        sha = vector.sha256
        path = self.path(sha)
        if not path.exists():
            save_safetensors(vector, path)
        return sha

    def get(self, sha: str) -> SteeringVector:
        """Return the stored vector with this sha256.

        Raises:
            ValueError: ``sha`` is not 64 hex characters.
            VectorFileError: No such vector (``key`` is the sha), or the file is invalid or does
                not hash to its name.

        Example:
            >>> store.get(sha).hidden_size
            576
        """
        sha = _check_sha(sha)
        with self._lock:
            cached = self._cache.get(sha)
            if cached is not None:
                self._cache.move_to_end(sha)
                return cached
        path = self.path(sha)
        if not path.is_file():
            path = next(self.root.glob(f"{_PINS}/*/{sha}{_SUFFIX_SAFETENSORS}"), path)  # deleted, but pinned
        if not path.is_file():
            raise VectorFileError("no such vector in the store", path=str(self.path(sha)), key=sha)
        vector = load_safetensors(path)
        if vector.sha256 != sha:
            raise VectorFileError(
                f"stored file hashes to {vector.sha256}, not to its name", path=str(path), key=sha
            )
        with self._lock:
            if self._cache_size:
                self._cache[sha] = vector
                self._cache.move_to_end(sha)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return vector

    def pin(self, sha: str, owner: str) -> None:
        """Keep the vector readable through :meth:`get` while ``owner`` pins it, even once it is
        deleted (a hard link under ``.pins/<owner>/``; a copy where links are not possible).

        Raises:
            VectorFileError: the vector is not in the store (``key`` is the sha).
        """
        src = self.path(sha)
        folder = self.root / _PINS / owner
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / src.name
        try:
            if not dst.exists():
                try:
                    os.link(src, dst)
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    raise
                except OSError:
                    import shutil

                    shutil.copyfile(src, dst)
        except FileNotFoundError:
            raise VectorFileError("no such vector in the store", path=str(src), key=sha) from None

    def unpin(self, sha: str, owner: str) -> None:
        """Undo :meth:`pin` (the content goes with the last link)."""
        (self.root / _PINS / owner / self.path(sha).name).unlink(missing_ok=True)

    def drop_pins(self, owner: str) -> None:
        """Remove every pin of ``owner`` (an engine starting or stopping)."""
        import shutil

        shutil.rmtree(self.root / _PINS / owner, ignore_errors=True)

    def pin_owners(self) -> list[str]:
        """The owners that hold pins."""
        folder = self.root / _PINS
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
            return False
        return self.path(sha).is_file()

    def list(self) -> list[str]:
        """Return the sha256 of every stored vector, sorted."""
        return sorted(
            match.group(1)
            for entry in os.scandir(self.root)
            if entry.is_file() and (match := _STORE_FILE.fullmatch(entry.name))
        )

    def delete(self, ref: str) -> None:
        """Remove a vector and every name pointing at it.

        Use `remove_name` to drop a name but keep the vector.

        Args:
            ref: A sha256 (64 hex characters) or a registered name.

        Raises:
            ValueError: ``ref`` is neither 64 hex characters nor a registered name.
            VectorFileError: No such vector (``key`` is the sha), or names.json cannot be written.

        Example:
            >>> store.delete("happy")  # the file and the names "happy", "joy", ... that share it
        """
        if isinstance(ref, str) and _SHA256.fullmatch(ref.lower()) is None:
            names = self.names()
            if ref in names:
                ref = names[ref]
        sha = _check_sha(ref)
        path = self.path(sha)
        try:
            # Under the file lock, so no other process can point a new name at a file going away.
            with self._locked():
                names = self._read_names()
                kept = {name: target for name, target in names.items() if target != sha}
                if not path.exists() and len(kept) == len(names):
                    raise VectorFileError("no such vector in the store", path=str(path), key=sha)
                # Names first, then the file: a process killed in between leaves an unnamed whole
                # vector, never a name pointing at nothing. (Names left pointing at a file removed
                # by hand are cleaned up too.)
                if len(kept) != len(names):
                    self._write_names(kept)
                path.unlink(missing_ok=True)
        finally:
            with self._lock:
                self._cache.pop(sha, None)

    # ------------------------------------------------------------------ names

    @staticmethod
    def check_name(name: object) -> str:
        """Return ``name`` if it is a valid vector name.

        Raises:
            VectorFileError: it is not (1-64 letters, digits, ``.``, ``_`` or ``-``; not a sha256).
        """
        return _check_name(name)

    def set_name(self, name: str, sha: str, *, overwrite: bool = False) -> None:
        """Point ``name`` at the stored vector ``sha``.

        Args:
            name: 1-64 letters, digits, ``.``, ``_`` or ``-``; not 64 hex digits.
            sha: sha256 of a vector already in the store.
            overwrite: Allow re-pointing a name that points at another vector.

        Raises:
            ValueError: ``sha`` is not 64 hex characters.
            VectorFileError: Invalid name, no such vector, the name already points elsewhere
                and ``overwrite`` is false (``key`` is the name), or names.json cannot be written.

        Example:
            >>> store.set_name("happy", store.put(vector))
            >>> store.resolve("happy") == vector.sha256
            True
        """
        _check_name(name)
        sha = _check_sha(sha)
        with self._locked():
            names = self._read_names()
            current = names.get(name)
            if current == sha:
                return
            if current is not None and not overwrite:
                raise NameConflictError(
                    f"name {name!r} already points at {current[:12]}; pass overwrite=True to re-point it",
                    key=name,
                )
            if not self.path(sha).is_file():
                raise VectorFileError("no such vector in the store", key=sha)
            names[name] = sha
            self._write_names(names)

    def remove_name(self, name: str) -> None:
        """Remove ``name``; the vector it pointed at stays.

        Raises:
            VectorFileError: No such name (``key`` is the name), or names.json cannot be written.

        Example:
            >>> store.remove_name("happy")
        """
        with self._locked():
            names = self._read_names()
            if not isinstance(name, str) or name not in names:
                raise VectorFileError("no such name in the store", key=str(name))
            del names[name]
            self._write_names(names)

    def names(self) -> dict[str, str]:
        """Return every name and the sha256 it points at, sorted by name (read afresh)."""
        return self._read_names()

    def resolve(self, ref: str) -> str:
        """Return the sha256 of a stored vector given its name or its sha256.

        Args:
            ref: A registered name, or the sha256 (any case) of a stored vector.

        Raises:
            VectorFileError: ``ref`` names no stored vector; ``key`` is ``ref`` and the message
                reveals neither the store's path nor its other names.

        Example:
            >>> store.resolve("happy")
            '3f1c...'
        """
        if isinstance(ref, str):
            if _SHA256.fullmatch(ref.lower()):
                if self.path(ref).is_file():
                    return ref.lower()
            elif _NAME.fullmatch(ref):
                sha = self._read_names().get(ref)
                if sha is not None:
                    if self.path(sha).is_file():
                        return sha
                    raise VectorFileError("the name points at a vector that is no longer stored", key=ref)
        raise VectorFileError("no vector with this name or sha256 in the store", key=str(ref))

    def info(self, ref: str) -> dict[str, Any]:
        """Describe a stored vector from its file header, without loading its tensors.

        The file is not re-hashed; `get` does that.

        Args:
            ref: A registered name or a sha256.

        Returns:
            ``{"sha256", "names", "model", "hidden_size", "layers", "num_positions", "method",
            "provenance", "size_bytes", "created"}``; ``num_positions`` is None except for a
            per-position vector; ``created`` is the file's mtime in ISO 8601 (UTC).

        Raises:
            VectorFileError: Unknown ``ref``, or the file is not a readable vector.

        Example:
            >>> store.info("happy")["layers"]
            [10]
        """
        sha = self.resolve(ref)
        path = self.path(sha)
        key = str(path)
        try:
            stat = path.stat()
            with safe_open(key, framework="pt", device="cpu") as f:
                header = _read_metadata(f.metadata() or {}, key)
                layers = []
                for name in f.keys():
                    match = _LAYER_TENSOR.fullmatch(name)
                    if match is None:
                        raise VectorFileError(f"unexpected tensor {name!r}", path=key, key=name)
                    layers.append(int(match.group(1)))
                # Shapes come from the header: [hidden], or [positions, hidden] per position.
                shape = f.get_slice(f"layer.{min(layers)}").get_shape() if layers else [None]
                hidden_size = header.get("hidden_size", shape[-1])
        except VectorFileError:
            raise
        except FileNotFoundError:
            raise VectorFileError("no such vector in the store", path=key, key=sha) from None
        except Exception as exc:  # safetensors raises SafetensorError and friends on bad headers
            raise VectorFileError(f"not a readable safetensors file: {exc}", path=key) from exc
        return {
            "sha256": sha,
            "names": sorted(name for name, target in self._read_names().items() if target == sha),
            "model": header.get("name"),
            "hidden_size": hidden_size,
            "layers": sorted(layers),
            "num_positions": int(shape[0]) if len(shape) == 2 else None,
            "method": header.get("method", "custom"),
            "provenance": header.get("provenance", {}),
            "size_bytes": stat.st_size,
            "created": datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat(timespec="seconds"),
        }

    # ------------------------------------------------------------------ files in and out

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        expected_model: str | None = None,
        expected_hidden: int | None = None,
        overwrite: bool = False,
    ) -> str:
        """Store the vector in a ``.safetensors`` or ``.gguf`` file; return its sha256.

        Args:
            path: The file (format chosen as in `load_vector`).
            name: Also point this name at the vector.
            expected_model: Refuse a vector whose model name is set and differs.
            expected_hidden: Refuse a vector of another hidden size.
            overwrite: Allow ``name`` to be re-pointed from another vector.

        Raises:
            VectorFileError: Invalid file or name, a model/hidden-size mismatch ("vector was
                computed for model X (hidden N), not Y (hidden M)"), or a name that already
                points elsewhere.

        Example:
            >>> sha = store.import_file("happy.gguf", name="happy", expected_hidden=576)
        """
        if name is not None:
            _check_name(name)
        path = os.fspath(path)
        vector = load_vector(path)
        _check_expected(vector, model=expected_model, hidden_size=expected_hidden, path=path)
        if name is not None and not overwrite:
            current = self._read_names().get(name)
            if current is not None and current != vector.sha256:
                # Checked before `put` too, so a refused import stores nothing new.
                raise NameConflictError(
                    f"name {name!r} already points at {current[:12]}; pass overwrite=True to re-point it",
                    key=name,
                )
        sha = self.put(vector)
        if name is not None:
            self.set_name(name, sha, overwrite=overwrite)
        return sha

    def export(
        self,
        ref: str,
        path: str | os.PathLike[str],
        *,
        model_hint: str | None = None,
    ) -> None:
        """Write a stored vector to ``path``, as safetensors or GGUF by its suffix.

        Args:
            ref: A registered name or a sha256.
            path: Ends in ``.safetensors`` or ``.gguf``.
            model_hint: For ``.gguf``: the HF model_type; defaults to the hint the vector was
                imported with (``provenance["gguf_model_hint"]``), else it is required.

        Raises:
            VectorFileError: Unknown ``ref``, unknown suffix, GGUF without a model hint.

        Example:
            >>> store.export("happy", "happy.gguf", model_hint="llama")
        """
        save_vector(self.get(self.resolve(ref)), path, model_hint=model_hint)

    check_model = staticmethod(check_vector_model)

    # ------------------------------------------------------------------ names.json

    def _locked(self) -> _FileLockGuard:
        return _FileLockGuard(self._file_lock, str(self.root / _LOCK_FILE))

    def _read_names(self) -> dict[str, str]:
        path = self.root / _NAMES_FILE
        try:
            stat = path.stat()
            # Re-read only when the file changed (it is replaced atomically, so a new inode/mtime).
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = getattr(self, "_names_cache", None)
            if cached is not None and cached[0] == stamp:
                return dict(cached[1])
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise VectorFileError(f"cannot read the names file: {exc}", path=str(path)) from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise VectorFileError(f"names file is not valid JSON: {exc}", path=str(path)) from exc
        names = data.get("names") if isinstance(data, dict) else None
        if not isinstance(names, dict):
            raise VectorFileError('names file must be {"names": {name: sha256}}', path=str(path), key="names")
        for name, sha in names.items():
            if _NAME.fullmatch(name) is None or not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
                raise VectorFileError(f"invalid entry {name!r}: {sha!r}", path=str(path), key=name)
        result = dict(sorted(names.items()))
        self._names_cache = (stamp, result)
        return dict(result)

    def _write_names(self, names: dict[str, str]) -> None:
        # Temporary file + os.replace: a reader sees the old file or the new one, never a mix.
        path = self.root / _NAMES_FILE
        data = json.dumps(
            {"format_version": _NAMES_FORMAT_VERSION, "names": dict(sorted(names.items()))}, indent=2
        )
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{_NAMES_FILE}.", suffix=".tmp", dir=self.root)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise VectorFileError(f"cannot write the names file: {exc}", path=str(path)) from exc

    def __repr__(self) -> str:
        return f"VectorStore(root={str(self.root)!r})"


class _FileLockGuard:
    """Hold a store's file lock; a timeout or an unwritable folder becomes ``error`` (a
    VectorFileError unless the store says otherwise)."""

    def __init__(self, lock: filelock.FileLock, path: str, *, error: type = VectorFileError, what: str = "store") -> None:
        self._lock, self._path, self._error, self._what = lock, path, error, what

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except filelock.Timeout as exc:
            raise self._error(
                f"another process has held the {self._what} lock for over {self._lock.timeout:.0f} s", path=self._path
            ) from exc
        except OSError as exc:
            raise self._error(f"cannot lock the {self._what}: {exc}", path=self._path) from exc

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def _check_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise VectorFileError(
            f"invalid vector name {name!r}: use 1-64 letters, digits, '.', '_' or '-'", key=str(name)
        )
    if _SHA256.fullmatch(name.lower()):
        raise VectorFileError(
            "invalid vector name: 64 hex digits would read as a sha256", key=name
        )
    return name


def _check_sha(sha: object) -> str:
    # Only 64 hex digits reach the filesystem: no separators, no '..', so no escape from root.
    if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
        raise ValueError(f"a vector sha256 must be 64 hex characters, got {sha!r}")
    return sha.lower()
