"""Vector files on disk: format dispatch (`load_vector`/`save_vector`) and `VectorStore`.

`VectorStore` is content-addressed: a vector lives at ``<root>/<sha256>.safetensors`` where the
hash covers only its numbers (`SteeringVector.sha256`), so storing the same numbers twice is a
no-op and a name can never point at different numbers.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from vsteer._errors import VectorFileError
from vsteer.vectors._gguf_format import GGUF_MAGIC, PROVENANCE_MODEL_HINT, load_gguf, save_gguf
from vsteer.vectors._safetensors_format import load_safetensors, save_safetensors
from vsteer.vectors._vector import SteeringVector

__all__ = ["VectorStore", "load_vector", "save_vector"]

_SUFFIX_SAFETENSORS = ".safetensors"
_SUFFIX_GGUF = ".gguf"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STORE_FILE = re.compile(r"([0-9a-f]{64})\.safetensors")


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
            raise VectorFileError("no such vector in the store", path=str(path), key=sha)
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

    def delete(self, sha: str) -> None:
        """Remove the vector with this sha256.

        Raises:
            ValueError: ``sha`` is not 64 hex characters.
            VectorFileError: No such vector (``key`` is the sha).
        """
        sha = _check_sha(sha)
        with self._lock:
            self._cache.pop(sha, None)
        path = self.path(sha)
        try:
            path.unlink()
        except FileNotFoundError:
            raise VectorFileError("no such vector in the store", path=str(path), key=sha) from None

    def __repr__(self) -> str:
        return f"VectorStore(root={str(self.root)!r})"


def _check_sha(sha: object) -> str:
    # Only 64 hex digits reach the filesystem: no separators, no '..', so no escape from root.
    if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
        raise ValueError(f"a vector sha256 must be 64 hex characters, got {sha!r}")
    return sha.lower()
