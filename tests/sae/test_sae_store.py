"""SaeStore: names, caching, overwrite, remove, resolve, path safety, default root."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vsteer._errors import SaeFileError
from vsteer.sae import (
    SaeConfig,
    SaeStore,
    SparseAutoencoder,
    default_sae_store,
    save_sae,
)


def make(seed: int = 0, activation: str = "relu", d_in: int = 8, d_sae: int = 24) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, activation=activation, layer=1))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_add_get_names_remove(tmp_path):
    store = SaeStore(tmp_path / "store")
    assert store.names() == [] and "a" not in store
    a, b = make(1), make(2, "jumprelu")
    path = store.add("a", a)
    assert path == store.path("a") == tmp_path / "store" / "a"
    assert (path / "sae.json").is_file() and (path / "sae.safetensors").is_file()
    store.add("b.v2_x-y", b)
    assert store.names() == ["a", "b.v2_x-y"]
    assert "a" in store and "b.v2_x-y" in store and "c" not in store and 3 not in store
    got = store.get("a")
    assert got.sha256() == a.sha256() and got.config == a.config
    assert store.get("a") is got  # cached
    assert store.get("b.v2_x-y").activation == "jumprelu"
    store.remove("a")
    assert store.names() == ["b.v2_x-y"] and "a" not in store
    with pytest.raises(SaeFileError, match=r"unknown SAE 'a' \(known: \['b.v2_x-y'\]\)") as err:
        store.get("a")  # not served from the cache after remove
    assert err.value.key == "a"
    with pytest.raises(SaeFileError, match=r"unknown SAE 'a'"):
        store.remove("a")
    # no temporary folders left behind
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".lock")) == ["b.v2_x-y"]


def test_overwrite(tmp_path):
    store = SaeStore(tmp_path)
    store.add("x", make(1))
    first = store.get("x")
    with pytest.raises(SaeFileError, match="already stored; pass overwrite=True"):
        store.add("x", make(2))
    assert store.get("x") is first
    store.add("x", make(2), overwrite=True)
    assert store.get("x").sha256() == make(2).sha256()
    assert store.names() == ["x"]


def test_other_instance_sees_replacement(tmp_path):
    s1, s2 = SaeStore(tmp_path), SaeStore(tmp_path)
    s1.add("x", make(1))
    assert s1.get("x").sha256() == make(1).sha256()
    s2.add("x", make(3), overwrite=True)
    assert s1.get("x").sha256() == make(3).sha256()  # the cache notices the new folder
    s2.remove("x")
    with pytest.raises(SaeFileError, match="unknown SAE 'x'"):
        s1.get("x")


def test_cache_size_zero_and_lru(tmp_path):
    store = SaeStore(tmp_path, cache_size=0)
    store.add("x", make(1))
    assert store.get("x") is not store.get("x")
    lru = SaeStore(tmp_path / "l", cache_size=1)
    lru.add("a", make(1))
    lru.add("b", make(2))
    a = lru.get("a")
    lru.get("b")
    assert lru.get("a") is not a
    with pytest.raises(ValueError, match="cache_size"):
        SaeStore(tmp_path, cache_size=-1)


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "x" * 65, "f" * 64, None, 3])
def test_invalid_names(tmp_path, bad):
    store = SaeStore(tmp_path / "s")
    with pytest.raises(SaeFileError, match="invalid SAE name"):
        store.add(bad, make())  # type: ignore[arg-type]
    with pytest.raises(SaeFileError, match="invalid SAE name"):
        store.path(bad)  # type: ignore[arg-type]
    assert bad not in store
    assert not any(p.name != ".lock" for p in (tmp_path / "s").iterdir())
    assert not (tmp_path / "x").exists()


def test_names_ignores_strays(tmp_path):
    store = SaeStore(tmp_path)
    store.add("ok", make())
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()  # no sae.json
    (tmp_path / ".add-x.abc.tmp").mkdir()  # a crashed write
    (tmp_path / ("f" * 64)).mkdir()
    (tmp_path / ("f" * 64) / "sae.json").write_text("{}")
    assert store.names() == ["ok"]


def test_resolve(tmp_path):
    store = SaeStore(tmp_path / "store")
    store.add("mine", make(1))
    assert store.resolve("mine") is store.get("mine")
    # a path to our folder, a SAELens folder, a Gemma Scope file
    ours = save_sae(make(2), tmp_path / "elsewhere")
    assert store.resolve(ours).sha256() == make(2).sha256()
    assert store.resolve(str(ours)).sha256() == make(2).sha256()
    sl = tmp_path / "saelens"
    sl.mkdir()
    (sl / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 24, "hook_name": "blocks.1.hook_resid_post"}))
    sae = make(4)
    save_file({k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(sl / "sae_weights.safetensors"))
    got = store.resolve(sl)
    assert got.layer == 1 and torch.equal(got.W_enc, sae.W_enc)
    with pytest.raises(SaeFileError, match=r"unknown SAE 'nope' \(known: \['mine'\]\)"):
        store.resolve("nope")
    with pytest.raises(SaeFileError, match="unknown SAE"):
        store.resolve(str(tmp_path / "missing" / "dir"))


def test_resolve_prefers_store_name_over_relative_path(tmp_path, monkeypatch):
    store = SaeStore(tmp_path / "store")
    store.add("dup", make(1))
    save_sae(make(2), tmp_path / "cwd" / "dup")
    monkeypatch.chdir(tmp_path / "cwd")
    assert store.resolve("dup").sha256() == make(1).sha256()
    assert store.resolve(Path("dup")).sha256() == make(2).sha256()  # a Path is always a path


def test_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("VSTEER_SAE_STORE", raising=False)
    monkeypatch.setenv("VSTEER_CACHE", str(tmp_path / "cache"))
    assert default_sae_store() == tmp_path / "cache" / "saes"
    assert SaeStore().root == tmp_path / "cache" / "saes"
    monkeypatch.setenv("VSTEER_SAE_STORE", str(tmp_path / "elsewhere"))
    assert default_sae_store() == tmp_path / "elsewhere"
    assert SaeStore().root.is_dir()


def test_concurrent_adds(tmp_path):
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            SaeStore(tmp_path).add(f"s{i}", make(i), overwrite=True)
            SaeStore(tmp_path).add("shared", make(i), overwrite=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = SaeStore(tmp_path)
    assert store.names() == ["s0", "s1", "s2", "s3", "s4", "s5", "shared"]
    assert store.get("shared").sha256() in {make(i).sha256() for i in range(6)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []
