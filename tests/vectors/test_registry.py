"""VectorStore names and file exchange: set/resolve/remove, names.json, delete, import/export, info."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime

import pytest
import torch

from vsteer._errors import VectorFileError
from vsteer.vectors import SteeringVector, VectorStore, check_vector_model, save_vector


def make(seed=0, **kwargs) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    layers = {4: torch.randn(8, generator=gen), 9: torch.randn(8, generator=gen)}
    return SteeringVector.from_tensors(layers, **kwargs)


# ---------------------------------------------------------------------- names


def test_set_name_and_resolve(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    store.set_name("happy", sha)
    store.set_name("joy.v2_final-1", sha)
    assert store.resolve("happy") == sha
    assert store.resolve(sha) == sha
    assert store.resolve(sha.upper()) == sha
    assert store.names() == {"happy": sha, "joy.v2_final-1": sha}
    store.set_name("happy", sha)  # same target: a no-op, no overwrite needed


def test_resolve_unknown_names_only_the_ref(tmp_path):
    store = VectorStore(tmp_path)
    store.set_name("secret-name", store.put(make()))
    for ref in ("nope", "0" * 64, "../etc/passwd", ""):
        with pytest.raises(VectorFileError) as err:
            store.resolve(ref)
        assert err.value.key == ref
        assert err.value.path is None
        assert "secret-name" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_repointing_a_name_needs_overwrite(tmp_path):
    store = VectorStore(tmp_path)
    a, b = store.put(make(seed=0)), store.put(make(seed=1))
    store.set_name("happy", a)
    with pytest.raises(VectorFileError, match="'happy' already points at") as err:
        store.set_name("happy", b)
    assert err.value.key == "happy"
    assert store.resolve("happy") == a
    store.set_name("happy", b, overwrite=True)
    assert store.resolve("happy") == b


@pytest.mark.parametrize(
    "bad", ["", "a" * 65, "has space", "slash/name", "../up", "é", "tab\t", "a" * 64, "F" * 64, "0123abcd" * 8]
)
def test_invalid_names_are_refused(tmp_path, bad):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    with pytest.raises(VectorFileError) as err:
        store.set_name(bad, sha)
    assert err.value.key == bad
    assert store.names() == {}


def test_longest_name_and_hex_like_names_are_allowed(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    for name in ("g" * 64, "a" * 63, "deadbeef"):
        store.set_name(name, sha)
        assert store.resolve(name) == sha


def test_set_name_needs_a_stored_vector(tmp_path):
    store = VectorStore(tmp_path)
    with pytest.raises(VectorFileError, match="no such vector"):
        store.set_name("happy", make().sha256)
    with pytest.raises(ValueError, match="64 hex"):
        store.set_name("happy", "not-a-sha")
    assert store.names() == {}


def test_remove_name_keeps_the_vector(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    store.set_name("happy", sha)
    store.remove_name("happy")
    assert store.names() == {} and sha in store
    with pytest.raises(VectorFileError) as err:
        store.remove_name("happy")
    assert err.value.key == "happy"


def test_names_json_is_shared_between_instances(tmp_path):
    first, second = VectorStore(tmp_path), VectorStore(tmp_path)
    sha = first.put(make())
    first.set_name("happy", sha)
    assert second.resolve("happy") == sha  # read fresh, not cached
    second.set_name("joy", sha)
    assert first.names() == {"happy": sha, "joy": sha}
    second.remove_name("happy")
    with pytest.raises(VectorFileError):
        first.resolve("happy")


def test_names_json_is_written_atomically(tmp_path, monkeypatch):
    store = VectorStore(tmp_path)
    a, b = store.put(make(seed=0)), store.put(make(seed=1))
    store.set_name("happy", a)
    data = json.loads((tmp_path / "names.json").read_text())
    assert data == {"format_version": 1, "names": {"happy": a}}

    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(VectorFileError, match="disk full"):
        store.set_name("joy", b)
    monkeypatch.setattr(os, "replace", real_replace)
    # The old file is intact and no temporary file is left behind.
    assert store.names() == {"happy": a}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")) == [
        ".lock",
        "names.json",
    ]


def test_corrupt_names_json_is_a_vector_file_error(tmp_path):
    store = VectorStore(tmp_path)
    (tmp_path / "names.json").write_text("{not json")
    with pytest.raises(VectorFileError, match="not valid JSON") as err:
        store.names()
    assert err.value.path == str(tmp_path / "names.json")
    (tmp_path / "names.json").write_text(json.dumps({"names": {"x": "short"}}))
    with pytest.raises(VectorFileError, match="invalid entry") as err:
        store.resolve("x")
    assert err.value.key == "x"


def _register_many(root: str, prefix: str, sha: str, count: int) -> None:
    store = VectorStore(root)
    for i in range(count):
        store.set_name(f"{prefix}{i}", sha)


def test_two_processes_register_concurrently(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(str(tmp_path), p, sha, 25)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert set(store.names()) == {f"{p}{i}" for p in "ab" for i in range(25)}


# ---------------------------------------------------------------------- delete


def test_delete_removes_every_name_pointing_at_the_vector(tmp_path):
    store = VectorStore(tmp_path)
    a, b = store.put(make(seed=0)), store.put(make(seed=1))
    store.set_name("happy", a)
    store.set_name("joy", a)
    store.set_name("sad", b)
    store.get(a)
    store.delete("happy")  # by name: the vector goes, and so does "joy"
    assert a not in store
    assert store.names() == {"sad": b}
    with pytest.raises(VectorFileError):
        store.get(a)  # not served from the cache
    store.delete(b)  # by sha
    assert store.names() == {} and store.list() == []


def test_delete_cleans_names_of_a_file_removed_by_hand(tmp_path):
    store = VectorStore(tmp_path)
    sha = store.put(make())
    store.set_name("happy", sha)
    os.remove(store.path(sha))
    with pytest.raises(VectorFileError, match="no longer stored"):
        store.resolve("happy")
    store.delete(sha)
    assert store.names() == {}
    with pytest.raises(VectorFileError):
        store.delete(sha)


# ---------------------------------------------------------------------- import / export


def test_import_with_name(tmp_path):
    store = VectorStore(tmp_path / "store")
    v = make(model="m", method="caa")
    save_vector(v, tmp_path / "v.safetensors")
    sha = store.import_file(tmp_path / "v.safetensors", name="happy", expected_model="m", expected_hidden=8)
    assert sha == v.sha256 and store.resolve("happy") == sha
    assert store.get(sha) == v


def test_import_refuses_another_model(tmp_path):
    store = VectorStore(tmp_path / "store")
    save_vector(make(model="m"), tmp_path / "v.safetensors")
    with pytest.raises(VectorFileError) as err:
        store.import_file(tmp_path / "v.safetensors", name="happy", expected_model="other", expected_hidden=16)
    assert "vector was computed for model m (hidden 8), not other (hidden 16)" in str(err.value)
    assert err.value.path == str(tmp_path / "v.safetensors")
    with pytest.raises(VectorFileError, match=r"model m \(hidden 8\), not other \(path="):
        store.import_file(tmp_path / "v.safetensors", expected_model="other")
    with pytest.raises(VectorFileError, match="not a model with hidden 16"):
        store.import_file(tmp_path / "v.safetensors", expected_hidden=16)
    assert store.list() == [] and store.names() == {}


def test_import_of_an_unnamed_vector_checks_only_hidden(tmp_path):
    store = VectorStore(tmp_path / "store")
    v = make()  # model=None
    save_vector(v, tmp_path / "v.gguf", model_hint="llama")
    assert store.import_file(tmp_path / "v.gguf", expected_model="anything", expected_hidden=8) == v.sha256
    with pytest.raises(VectorFileError, match="an unnamed model \\(hidden 8\\), not x \\(hidden 4\\)"):
        store.import_file(tmp_path / "v.gguf", expected_model="x", expected_hidden=4)


def test_import_refuses_to_repoint_a_name_and_stores_nothing(tmp_path):
    store = VectorStore(tmp_path / "store")
    a = store.put(make(seed=0))
    store.set_name("happy", a)
    other = make(seed=1)
    save_vector(other, tmp_path / "b.safetensors")
    with pytest.raises(VectorFileError, match="already points at"):
        store.import_file(tmp_path / "b.safetensors", name="happy")
    assert store.list() == [a]
    assert store.import_file(tmp_path / "b.safetensors", name="happy", overwrite=True) == other.sha256
    assert store.resolve("happy") == other.sha256


def test_import_invalid_name_is_checked_first(tmp_path):
    store = VectorStore(tmp_path / "store")
    save_vector(make(), tmp_path / "v.safetensors")
    with pytest.raises(VectorFileError, match="invalid vector name"):
        store.import_file(tmp_path / "v.safetensors", name="bad name")
    assert store.list() == []


def test_export_to_gguf_and_back_is_equal(tmp_path):
    store = VectorStore(tmp_path / "store")
    v = make()
    store.set_name("happy", store.put(v))
    store.export("happy", tmp_path / "happy.gguf", model_hint="llama")
    back = VectorStore(tmp_path / "other")
    sha = back.import_file(tmp_path / "happy.gguf")
    w = back.get(sha)
    assert w == v and sha == v.sha256
    for layer in v.layers:
        assert torch.equal(w.layers[layer], v.layers[layer])
    # The hint travels in the provenance, so a second export needs no argument.
    assert w.provenance == {"gguf_model_hint": "llama"}
    back.export(sha, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "happy.gguf").read_bytes()


def test_export_gguf_needs_a_hint_and_safetensors_round_trips(tmp_path):
    store = VectorStore(tmp_path / "store")
    v = make(model="m", method="caa", provenance={"seed": 3})
    sha = store.put(v)
    with pytest.raises(VectorFileError, match="model_hint"):
        store.export(sha, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    store.export(sha, tmp_path / "x.safetensors")
    w = VectorStore(tmp_path / "other").get(VectorStore(tmp_path / "other").import_file(tmp_path / "x.safetensors"))
    assert w == v and w.provenance == v.provenance and w.method == "caa"
    with pytest.raises(VectorFileError):
        store.export("nope", tmp_path / "y.safetensors")


# ---------------------------------------------------------------------- info and model checks


def test_info_fields(tmp_path):
    store = VectorStore(tmp_path)
    v = make(model="m", method="caa", provenance={"seed": 3})
    sha = store.put(v)
    store.set_name("joy", sha)
    store.set_name("happy", sha)
    info = store.info("happy")
    created = info.pop("created")
    assert info == {
        "sha256": sha,
        "names": ["happy", "joy"],
        "model": "m",
        "hidden_size": 8,
        "layers": [4, 9],
        "num_positions": None,
        "method": "caa",
        "provenance": {"seed": 3},
        "size_bytes": os.path.getsize(store.path(sha)),
    }
    assert datetime.fromisoformat(created).timestamp() == pytest.approx(
        os.path.getmtime(store.path(sha)), abs=1
    )
    assert store.info(sha)["names"] == ["happy", "joy"]
    with pytest.raises(VectorFileError) as err:
        store.info("nope")
    assert err.value.key == "nope"


def test_info_of_a_per_position_vector(tmp_path):
    store = VectorStore(tmp_path)
    v = SteeringVector.from_tensors({3: torch.ones(2, 8)}, method="actadd")
    info = store.info(store.put(v))
    assert (info["hidden_size"], info["num_positions"], info["layers"]) == (8, 2, [3])


def test_info_of_a_damaged_file(tmp_path):
    store = VectorStore(tmp_path)
    sha = make().sha256
    store.path(sha).write_bytes(b"\x00" * 20)
    with pytest.raises(VectorFileError, match="not a readable safetensors file"):
        store.info(sha)


def test_check_vector_model():
    v = make(model="m")
    check_vector_model(v, model="m", hidden_size=8)
    check_vector_model(make(), model="anything", hidden_size=8)  # unnamed: hidden size only
    with pytest.raises(VectorFileError, match=r"^vector was computed for model m \(hidden 8\), not x \(hidden 8\)") as err:
        check_vector_model(v, model="x", hidden_size=8)
    assert err.value.key == v.sha256
    with pytest.raises(VectorFileError, match=r"not m \(hidden 576\)"):
        check_vector_model(v, model="m", hidden_size=576)
    assert VectorStore.check_model is check_vector_model
