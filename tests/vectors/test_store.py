"""VectorStore: content addressing, idempotence, atomic writes, cache and path safety."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from vsteer._errors import VectorFileError
from vsteer.vectors import SteeringVector, VectorStore, save_safetensors


def make(seed=0, **kwargs) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    layers = {4: torch.randn(8, generator=gen), 9: torch.randn(8, generator=gen)}
    return SteeringVector.from_tensors(layers, **kwargs)


def test_put_get_round_trip(tmp_path):
    store = VectorStore(tmp_path / "store")
    v = make(model="m", method="caa", provenance={"seed": 0})
    sha = store.put(v)
    assert sha == v.sha256
    assert store.path(sha) == tmp_path / "store" / f"{sha}.safetensors"
    assert store.path(sha).is_file()
    w = store.get(sha)
    assert w == v and w.provenance == v.provenance and w.method == "caa"
    assert store.get(sha) is w  # served from the cache
    assert sha in store and store.list() == [sha]


def test_put_is_idempotent_and_keeps_first_metadata(tmp_path):
    store = VectorStore(tmp_path)
    v = make(model="m", method="caa")
    sha = store.put(v)
    before = os.stat(store.path(sha))
    assert store.put(make(model="m", method="pca", provenance={"other": 1})) == sha
    after = os.stat(store.path(sha))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert store.get(sha).method == "caa"
    assert store.list() == [sha]


def test_list_contains_delete(tmp_path):
    store = VectorStore(tmp_path)
    shas = sorted(store.put(make(seed=s)) for s in range(3))
    # stray files (a crashed write's temp file, notes) are not vectors
    (tmp_path / f".{shas[0]}.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / "README.txt").write_text("hi")
    assert store.list() == shas
    store.get(shas[1])
    store.delete(shas[1])
    assert shas[1] not in store
    assert store.list() == [shas[0], shas[2]]
    with pytest.raises(VectorFileError) as err:
        store.get(shas[1])  # not served from the cache after delete
    assert err.value.key == shas[1]
    with pytest.raises(VectorFileError) as err:
        store.delete(shas[1])
    assert err.value.key == shas[1]


def test_unknown_sha(tmp_path):
    store = VectorStore(tmp_path)
    sha = "0" * 64
    assert sha not in store
    with pytest.raises(VectorFileError) as err:
        store.get(sha)
    assert err.value.key == sha


@pytest.mark.parametrize(
    "bad",
    ["../" + "a" * 61, "a" * 63, "a" * 65, "g" * 64, "/etc/passwd", "a" * 64 + "/..", "", "a" * 63 + "\n"],
)
def test_rejects_non_sha_names(tmp_path, bad):
    store = VectorStore(tmp_path / "store")
    for call in (store.path, store.get, store.delete):
        with pytest.raises(ValueError, match="64 hex"):
            call(bad)
    assert bad not in store
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]


def test_uppercase_sha_is_accepted(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    assert store.get(sha.upper()) == store.get(sha)
    assert sha.upper() in store


def test_put_leaves_no_temp_files_and_failed_put_leaves_nothing(tmp_path):
    store = VectorStore(tmp_path)
    store.put(make())
    assert [p.name for p in tmp_path.iterdir()] == [f"{make().sha256}.safetensors"]
    with pytest.raises(VectorFileError):
        store.put(SteeringVector.from_tensors({-1: [1.0]}))
    assert len(list(tmp_path.iterdir())) == 1


def test_concurrent_puts_of_one_vector(tmp_path):
    store = VectorStore(tmp_path)
    v = make()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.put(v))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [v.sha256] * 8
    assert [p.name for p in tmp_path.iterdir()] == [f"{v.sha256}.safetensors"]
    assert VectorStore(tmp_path).get(v.sha256) == v


def test_get_checks_that_the_file_matches_its_name(tmp_path):
    store = VectorStore(tmp_path)
    a, b = make(seed=0), make(seed=1)
    save_safetensors(b, store.path(a.sha256))  # a file under the wrong name
    with pytest.raises(VectorFileError, match="hashes to") as err:
        store.get(a.sha256)
    assert err.value.key == a.sha256


def test_lru_cache_evicts(tmp_path):
    store = VectorStore(tmp_path, cache_size=1)
    a, b = store.put(make(seed=0)), store.put(make(seed=1))
    store.get(a)
    store.get(b)  # evicts a
    os.remove(store.path(a))
    os.remove(store.path(b))
    assert store.get(b).sha256 == b  # still cached
    with pytest.raises(VectorFileError):
        store.get(a)


def test_creates_root_and_reopens(tmp_path):
    root = tmp_path / "a" / "b"
    sha = VectorStore(root).put(make())
    assert VectorStore(root).list() == [sha]
    assert "VectorStore" in repr(VectorStore(root))


def test_a_pinned_vector_stays_readable_after_delete(tmp_path):
    """The engine pins the vectors of the requests it admitted: a delete cannot pull them from under
    a running request; unpinning lets the content go, and pinning a deleted vector fails clearly."""
    import torch

    from vsteer import SteeringVector
    from vsteer._errors import VectorFileError
    from vsteer.vectors import VectorStore

    store = VectorStore(tmp_path / "s", cache_size=0)
    vec = SteeringVector.from_tensors({3: torch.arange(8.0)})
    sha = store.put(vec)
    store.pin(sha, "engine-a")
    store.pin(sha, "engine-a")  # idempotent
    store.delete(sha)
    assert sha not in store and store.list() == []
    assert torch.equal(store.get(sha).layers[3], vec.layers[3])
    store.unpin(sha, "engine-a")
    with pytest.raises(VectorFileError):
        store.get(sha)
    with pytest.raises(VectorFileError):
        store.pin(sha, "engine-b")
    store.drop_pins("engine-b")
    assert store.pin_owners() == ["engine-a"] or store.pin_owners() == []
