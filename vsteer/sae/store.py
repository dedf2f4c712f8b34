"""`SaeStore`: named SAEs in a folder, one vsteer-format folder per name (``<root>/<name>/``).

Names follow the vector-store rules (1-64 letters, digits, ``.``, ``_``, ``-``; not 64 hex digits;
:func:`vsteer.vectors._store._check_name`) and, being folder names here, may not start with ``.``
(which also keeps ``.`` / ``..`` and the store's temporary folders out). Writers hold
``filelock.FileLock(<root>/.lock)``; an SAE is written under a temporary name and renamed into
place, so readers never see half a folder. Reads go through a small cache that notices a folder
replaced by another process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import filelock

from vsteer._errors import SaeFileError, VectorFileError
from vsteer.models import default_cache_dir
from vsteer.sae.formats import CONFIG_FILE, load_sae, save_sae
from vsteer.sae.model import SparseAutoencoder
from vsteer.vectors._store import _check_name, _FileLockGuard

__all__ = ["SAE_STORE_ENV", "SaeStore", "default_sae_store"]

#: Environment override of the default store folder.
SAE_STORE_ENV = "VSTEER_SAE_STORE"
_LOCK_FILE = ".lock"
_LOCK_TIMEOUT_S = 60.0


def default_sae_store() -> Path:
    """The SAE store folder: ``$VSTEER_SAE_STORE``, else ``<cache>/saes``."""
    env = os.environ.get(SAE_STORE_ENV)
    return Path(env).expanduser().absolute() if env else default_cache_dir() / "saes"


def _check_sae_name(name: object) -> str:
    try:
        _check_name(name)
    except VectorFileError as exc:
        raise SaeFileError(
            f"invalid SAE name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not 64 hex digits)",
            key=str(name),
        ) from exc
    assert isinstance(name, str)
    if name.startswith("."):
        raise SaeFileError(f"invalid SAE name {name!r}: it may not start with '.'", key=name)
    return name


class SaeStore:
    """Named SAEs in ``<root>/<name>/`` (vsteer's SAE format). Safe to share between threads.

    Args:
        root: The folder (default :func:`default_sae_store`); created if missing.
        cache_size: How many SAEs ``get`` keeps in memory. Cached SAEs are shared: do not modify
            one in place (``.to(...)`` on an ``nn.Module`` is in place; copy first).

    Example:
        >>> store = SaeStore()
        >>> store.add("gemma-l12", load_sae("layer_12/width_16k/average_l0_82/params.npz"))
        >>> store.get("gemma-l12").d_sae
        16384
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, cache_size: int = 4) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.root = Path(root).expanduser() if root is not None else default_sae_store()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SaeFileError(f"cannot create the SAE store folder: {exc}", path=str(self.root)) from exc
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[tuple[int, int, int], SparseAutoencoder]] = OrderedDict()
        self._lock = threading.Lock()
        self._file_lock = filelock.FileLock(str(self.root / _LOCK_FILE), timeout=_LOCK_TIMEOUT_S)

    # ------------------------------------------------------------------ queries

    def path(self, name: str) -> Path:
        """Where the SAE called ``name`` is (or would be) stored.

        Raises:
            SaeFileError: Invalid name.
        """
        return self.root / _check_sae_name(name)

    def names(self) -> list[str]:
        """Every stored SAE's name, sorted (read afresh)."""
        out = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                _check_sae_name(entry.name)
            except SaeFileError:
                continue
            if os.path.isfile(os.path.join(entry.path, CONFIG_FILE)):
                out.append(entry.name)
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        try:
            return (self.path(name) / CONFIG_FILE).is_file()  # type: ignore[arg-type]
        except SaeFileError:
            return False

    def get(self, name: str) -> SparseAutoencoder:
        """Return the stored SAE ``name`` (cached).

        Raises:
            SaeFileError: Invalid or unknown name (``"unknown SAE 'x' (known: [...])"``), or an
                invalid stored folder.
        """
        folder = self.path(name)
        stamp = self._stamp(folder)
        if stamp is None:
            raise self._unknown(name)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(name)
                return hit[1]
        sae = load_sae(folder)
        with self._lock:
            if self._cache_size:
                self._cache[name] = (stamp, sae)
                self._cache.move_to_end(name)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return sae

    def resolve(self, ref: str | os.PathLike[str]) -> SparseAutoencoder:
        """An SAE from a stored name, else from a path to an SAE file or folder (any layout
        :func:`~vsteer.sae.formats.load_sae` reads). A stored name wins over a relative path.

        Raises:
            SaeFileError: ``ref`` is neither (``"unknown SAE 'x' (known: [...])"``), or the file
                at the path is invalid.
        """
        if isinstance(ref, str) and ref in self:
            return self.get(ref)
        path = Path(ref).expanduser()
        if path.exists():
            return load_sae(path)
        raise self._unknown(str(ref))

    # ------------------------------------------------------------------ changes

    def add(self, name: str, sae: SparseAutoencoder, overwrite: bool = False) -> Path:
        """Store ``sae`` as ``name``; return its folder.

        The SAE is written beside the target under a temporary name, then renamed into place under
        the store's file lock (a replaced SAE's old folder is removed afterwards).

        Raises:
            SaeFileError: Invalid name, ``name`` taken and ``overwrite`` false, or a write failure.
        """
        target = self.path(name)
        if not overwrite and (target / CONFIG_FILE).exists():
            raise self._taken(name)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".add-{name}.", suffix=".tmp", dir=self.root))
        except OSError as exc:
            raise SaeFileError(f"cannot write to the SAE store: {exc}", path=str(self.root)) from exc
        old: Path | None = None
        try:
            staged = save_sae(sae, tmp / "sae")
            with self._locked():
                if target.exists():
                    if not overwrite:
                        raise self._taken(name)
                    old = tmp / "old"
                    os.rename(target, old)
                os.rename(staged, target)
        except OSError as exc:
            raise SaeFileError(f"cannot write the SAE: {exc}", path=str(target), key=name) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._cache.pop(name, None)
        return target

    def remove(self, name: str) -> None:
        """Delete the stored SAE ``name``.

        Raises:
            SaeFileError: Invalid or unknown name, or a removal failure.
        """
        target = self.path(name)
        try:
            with self._locked():
                if not (target / CONFIG_FILE).is_file():
                    raise self._unknown(name)
                trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}.", suffix=".tmp", dir=self.root))
                os.rename(target, trash / "sae")
        except OSError as exc:
            raise SaeFileError(f"cannot remove the SAE: {exc}", path=str(target), key=name) from exc
        finally:
            with self._lock:
                self._cache.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ internals

    def _stamp(self, folder: Path) -> tuple[int, int, int] | None:
        try:
            st = (folder / CONFIG_FILE).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _unknown(self, name: str) -> SaeFileError:
        return SaeFileError(f"unknown SAE {name!r} (known: {self.names()})", key=name)

    def _taken(self, name: str) -> SaeFileError:
        return SaeFileError(f"an SAE named {name!r} is already stored; pass overwrite=True to replace it", key=name)

    def _locked(self) -> _FileLockGuard:
        return _FileLockGuard(self._file_lock, str(self.root / _LOCK_FILE), error=SaeFileError, what="SAE store")

    def __repr__(self) -> str:
        return f"SaeStore(root={str(self.root)!r})"

